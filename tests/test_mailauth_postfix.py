"""
DKIM signatures survive a relay through Postfix: a signed message is
submitted to a private Postfix instance on loopback, which relays it to
Postfix's smtp-sink; the copy that arrives verifies, for both algorithms.
Signed by L{DKIMSigner} directly, and signed by a running mailstack's
built-in signer and delivered by its queue to Postfix.
Needs root and Debian's postfix package (.ci/run installs it).
"""

import os
import re
import shutil
import smtplib
import socket
import subprocess
import tempfile
import time

import dkim
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailstack.mailauth import keys
from mailstack.mailauth.dkim import DKIMSigner
from mailstack.mailauth.testing import ZoneResolver, serve_zone
from tests.support import (
    add_user, client_context, in_thread, short_tempdir, smtp_session, start_server,
)
from tests.test_mailauth_dkim import dnsfunc, key_set, zone_for
from tests.test_mailauth_wiring import published, verify_both

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {work}/queue
data_directory = {work}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = relay.postfix.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
relayhost = [127.0.0.1]:{sink}
smtp_host_lookup = native
smtp_dns_support_level = disabled
maillog_file = {work}/maillog
maillog_file_prefixes = {work}
biff = no
"""

# Header forms that a relay's header rewriting could change: display names,
# quoting, address lists, folding, 8-bit text; an 8-bit body.
MESSAGE = ("From: \"Alice Example\" <alice@example.org>\n"
           "To: bob@example.net, Carol  <carol@example.net>\n"
           "Cc: \"Dave, Jr.\" <dave@example.net>\n"
           "Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?= and a long subject line that goes on\n"
           " and is folded onto a second line\n"
           "Date: Sun, 29 Nov 2026 18:00:00 +0000\n"
           "Message-ID: <relay-1@example.org>\n"
           "MIME-Version: 1.0\n"
           "Content-Type: text/plain; charset=utf-8\n"
           "Content-Transfer-Encoding: 8bit\n"
           "\n"
           "Grüße aus Köln.\n"
           ".a line starting with a dot\n"
           "\n"
           "trailing spaces   \n").encode()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"nothing listens on 127.0.0.1:{port}")


def start_postfix(testcase):
    """
    Start a private Postfix on loopback (its own main.cf and master.cf in a
    temporary directory, stopped after the test) that relays everything to
    an smtp-sink; returns (Postfix's port, a function returning the first
    message the sink got).  Skips without root or Postfix.
    """
    if os.geteuid() != 0:
        raise SkipTest("Postfix needs root")
    for name in ("postfix", "smtp-sink"):
        if not (shutil.which(name) or os.path.exists(f"/usr/sbin/{name}")):
            raise SkipTest("postfix is not installed (apt-get install postfix)")
    # Postfix's daemons run as "postfix" and must reach the queue: a
    # directory outside the test's private temporary tree.
    work = tempfile.mkdtemp(prefix="ms-postfix-")
    testcase.addCleanup(shutil.rmtree, work, True)
    for sub in ("conf", "queue", "data", "sink"):
        os.makedirs(os.path.join(work, sub))
    os.chmod(work, 0o755)
    shutil.chown(os.path.join(work, "data"), "postfix")
    shutil.chown(os.path.join(work, "sink"), "nobody")
    sink_port, port = free_port(), free_port()
    sink = subprocess.Popen([shutil.which("smtp-sink") or "/usr/sbin/smtp-sink", "-u",
                             "nobody", "-d", os.path.join(work, "sink", "%H%M%S."),
                             f"127.0.0.1:{sink_port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testcase.addCleanup(sink.wait)
    testcase.addCleanup(sink.kill)
    conf = os.path.join(work, "conf")
    with open(os.path.join(conf, "main.cf"), "w") as f:
        f.write(MAIN_CF.format(work=work, sink=sink_port))
    shipped = [p for p in ("/etc/postfix/master.cf", "/usr/share/postfix/master.cf.dist")
               if os.path.exists(p)]
    with open(shipped[0]) as f:
        master = f.read()
    master = re.sub(r"(?m)^smtp\s+inet\s.*$",
                    f"127.0.0.1:{port} inet n - n - - smtpd", master)
    with open(os.path.join(conf, "master.cf"), "w") as f:
        f.write(master)
    subprocess.run(["postfix", "-c", conf, "start"], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    testcase.addCleanup(subprocess.run, ["postfix", "-c", conf, "stop"],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port)
    wait_for_port(sink_port)

    def arrived(timeout=60):
        sink_dir = os.path.join(work, "sink")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:  # Postfix relays on its own schedule
            names = os.listdir(sink_dir)
            if names:
                time.sleep(0.2)  # smtp-sink writes the file as the message arrives
                with open(os.path.join(sink_dir, names[0]), "rb") as f:
                    return f.read()
            time.sleep(0.1)
        with open(os.path.join(work, "maillog"), errors="replace") as f:
            raise AssertionError("nothing relayed:\n" + f.read()[-2000:])

    return port, arrived


class PostfixRelayTests(SynchronousTestCase):
    def setUp(self):
        self.port, self.arrived = start_postfix(self)

    def relayed(self, data, timeout=60):
        with smtplib.SMTP("127.0.0.1", self.port, timeout=30) as client:
            client.sendmail("alice@example.org", ["bob@example.net"], data)
        return self.arrived(timeout)

    def test_signatures_survive(self):
        """
        Both signatures of a message with display names, address lists, a
        folded 8-bit Subject and an 8-bit body verify after Postfix relayed
        it (Postfix added its Received field).
        """
        made = key_set()
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        arrived = self.relayed(signed.replace(b"\n", b"\r\n"))
        self.assertIn(b"by relay.postfix.test", arrived)
        self.assertIn("Grüße".encode(), arrived)
        for idx in range(2):
            self.assertTrue(dkim.DKIM(arrived).verify(idx, dnsfunc=dnsfunc(made)), arrived)


class ServerThroughPostfixTests(TestCase):
    """
    The whole way: mail submitted to mailstack is signed by its built-in
    signer, queued, delivered to a private Postfix (a --route), relayed by
    Postfix to smtp-sink; the copy that arrives verifies with dkimpy, both
    algorithms, against the keys a test DNS server serves.
    """

    @inlineCallbacks
    def setUp(self):
        self.port, self.arrived = start_postfix(self)
        self.data = short_tempdir(self)
        self.made, _ = keys.generate(self.data, "example.org", "s1")
        zone_port, listening = serve_zone(reactor, ZoneResolver(zone_for(self.made)))
        for p in listening:
            self.addCleanup(p.stopListening)
        self.dnsfunc = yield published("example.org", self.made, zone_port)

    @inlineCallbacks
    def test_signed_by_server_survives(self):
        server = yield start_server(self, submission="tcp:0:interface=127.0.0.1",
                                    data_dir=self.data, domain=["example.org"],
                                    route=[f"example.net=127.0.0.1:{self.port}"])
        add_user(server, "alice@example.org")
        context = client_context(server)

        def submit(client):
            client.starttls(context=context)
            client.login("alice@example.org", "secret")
            client.sendmail("alice@example.org", ["bob@example.net"],
                            MESSAGE.replace(b"\n", b"\r\n"), mail_options=["BODY=8BITMIME"])

        yield in_thread(smtp_session, server.ports["submission"], submit, host="localhost")
        arrived = yield in_thread(self.arrived)
        self.assertIn(b"by relay.postfix.test", arrived)
        self.assertIn(b"by mx.test (mailstack)", arrived)
        self.assertIn("Grüße aus Köln".encode(), arrived)
        sigs = verify_both(self, arrived, self.dnsfunc)
        self.assertEqual(sorted(s[b"a"] for s in sigs), [b"ed25519-sha256", b"rsa-sha256"])
