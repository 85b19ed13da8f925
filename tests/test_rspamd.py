"""
The rspamd filter against a real rspamd (Debian's package), a private
instance started by the test with its own configuration on a loopback
port: each action becomes the right verdict for a real server and
smtplib; a stopped rspamd tempfails or passes by the option.

rspamd compiles its URL and regexp databases on first start (about two
minutes here); they are kept in a cache directory in the system's
temporary directory, so later runs start in seconds.
"""

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
import textwrap
import time

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from mailstack.plugins.rspamd import spamd_result
from tests.support import add_user, in_thread, read_messages, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Rspamd:
    def __init__(self):
        if shutil.which("rspamd") is None:
            raise SkipTest("rspamd is not installed (apt-get install rspamd)")
        self.dir = tempfile.mkdtemp(prefix="rspamd-")
        cache = os.path.join(tempfile.gettempdir(), f"mailstack-test-rspamd-{os.getuid()}")
        os.makedirs(cache, exist_ok=True)
        local = os.path.join(self.dir, "local")
        os.makedirs(os.path.join(local, "local.d"))
        os.makedirs(os.path.join(self.dir, "run"))
        self.port = free_port()
        maps = {"grey": ("greylist-me", 35), "junk": ("junk-me", 55),
                "rewrite": ("rewrite-me", 75), "soft": ("soft-me", 1)}
        multimap = []
        for name, (word, score) in maps.items():
            path = os.path.join(self.dir, f"{name}.map")
            with open(path, "w") as f:
                f.write(f"/{word}/i\n")
            multimap.append(f'MS_{name.upper()} {{ type = "header"; header = "Subject"; '
                            f'regexp = true; map = "{path}"; score = {score}; }}')
        files = {
            "actions.conf": "greylist = 30;\nadd_header = 50;\nrewrite_subject = 70;\n"
                            "reject = 150;\n",
            "multimap.conf": "\n".join(multimap) + "\n",
            "force_actions.conf": 'rules { MS_SOFT_RULE { action = "soft reject"; '
                                  'expression = "MS_SOFT"; message = "Rspamd says later"; } }\n',
        }
        for name, text in files.items():
            with open(os.path.join(local, "local.d", name), "w") as f:
                f.write(text)
        config = os.path.join(self.dir, "rspamd.conf")
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""
                .include "$CONFDIR/common.conf"
                options {{
                    pidfile = "$RUNDIR/rspamd.pid";
                    .include "$CONFDIR/options.inc"
                    dns {{ nameserver = ["127.0.0.1:1"]; timeout = 1s; retransmits = 1; }}
                }}
                logging {{ type = "file"; filename = "{self.dir}/rspamd.log"; level = "info"; }}
                worker "normal" {{
                    bind_socket = "127.0.0.1:{self.port}";
                    .include "$CONFDIR/worker-normal.inc"
                }}
            """))
        argv = ["rspamd", "-f", "-c", config, f"--var=DBDIR={cache}",
                f"--var=RUNDIR={self.dir}/run", f"--var=LOGDIR={self.dir}",
                f"--var=LOCAL_CONFDIR={local}"]
        if os.getuid() == 0:
            argv[2:2] = ["-i", "-u", "root", "-g", "root"]
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 400
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise AssertionError("rspamd did not start") from None
                time.sleep(0.2)  # waiting for another process to listen

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, True)


def send(port, subject, body=b"hello"):
    def talk(client):
        client.ehlo("client.test")
        try:
            client.sendmail("x@remote.test", ["alice@localhost"],
                            b"From: x@remote.test\r\nTo: alice@localhost\r\nSubject: " +
                            subject + b"\r\n\r\n" + body + b"\r\n")
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    return in_thread(smtp_session, port, talk)


def junk(server):
    new = os.path.join(server.data_dir, "mail", "localhost", "alice", ".Junk", "new")
    out = []
    for name in sorted(os.listdir(new)) if os.path.isdir(new) else []:
        with open(os.path.join(new, name), "rb") as f:
            out.append(f.read())
    return out


class RspamdTests(TestCase):
    timeout = 600

    @inlineCallbacks
    def test_actions_and_failure(self):
        rspamd = Rspamd()
        self.addCleanup(rspamd.stop)
        server = yield start_server(self, smtp=LISTEN, filter=["rspamd"], plugins={
            "rspamd": {"url": f"http://127.0.0.1:{rspamd.port}", "timeout": 30}})
        add_user(server, "alice@localhost")
        port = server.ports["smtp"]

        self.assertEqual((yield send(port, b"plain")), (250, b""))
        [inbox] = read_messages(server, "alice@localhost")
        head = inbox.split(b"\n\n", 1)[0]
        self.assertIn(b"\nX-Spamd-Result: default: False [", head)
        self.assertIn(b"\nX-Spam: No\n", head)

        self.assertEqual((yield send(port, b"junk-me")), (250, b""))
        self.assertEqual((yield send(port, b"rewrite-me")), (250, b""))
        filed = junk(server)
        self.assertEqual(len(filed), 2)
        for message in filed:
            self.assertIn(b"\nX-Spam: Yes\n", message)
            self.assertIn(b"MS_", message)
        self.assertTrue(any(b"\nSubject: rewrite-me\n" in m for m in filed))

        grey = yield send(port, b"greylist-me")
        self.assertEqual(grey[0], 451)
        self.assertTrue(grey[1].startswith(b"4.7.1"))
        soft = yield send(port, b"soft-me")
        self.assertEqual(soft, (451, b"4.7.1 Rspamd says later"))
        rejected = yield send(port, b"gtube", GTUBE)
        self.assertEqual(rejected[0], 554)
        self.assertTrue(rejected[1].startswith(b"5.7.1"))
        self.assertEqual(len(read_messages(server, "alice@localhost")), 1)
        self.assertEqual(len(junk(server)), 2)

        # rspamd stops: the default tempfails, nothing is lost or let through.
        rspamd.stop()
        down = yield send(port, b"plain again")
        self.assertEqual(down, (451, b"4.7.1 Error: the message could not be scanned, "
                                     b"try again later"))
        self.assertEqual(len(read_messages(server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_unreachable_accept(self):
        """
        With on-failure = "accept", an unreachable rspamd lets mail in
        unscanned (no X-Spam fields).
        """
        server = yield start_server(self, smtp=LISTEN, filter=["rspamd"], plugins={
            "rspamd": {"url": f"http://127.0.0.1:{free_port()}", "on-failure": "accept"}})
        add_user(server, "alice@localhost")
        self.assertEqual((yield send(server.ports["smtp"], b"x")), (250, b""))
        [message] = read_messages(server, "alice@localhost")
        self.assertNotIn(b"X-Spam", message)

    def test_spamd_result_is_folded_and_clean(self):
        field = spamd_result({"action": "add header", "score": 6.5, "required_score": 15,
                              "symbols": {"B": {"score": 1, "options": ["x\x00y"]},
                                          "A": {"score": 5.5}}})
        self.assertEqual(field, "X-Spamd-Result: default: True [6.50 / 15.00];\n"
                                "\tA(5.50);\n\tB(1.00)[x?y]")
