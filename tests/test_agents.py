"""
Delivery agents chosen per domain and per user: Dovecot's real LMTP server
(Debian's dovecot-lmtpd, a private instance on a loopback port) with
per-recipient replies, and pipe(8)-like commands, both run from the queue.
"""

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import textwrap
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from mailstack.plugins.lmtp import dot_stuffed
from tests.support import add_user, in_thread, read_messages, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"


@inlineCallbacks
def until(condition, timeout=30.0):
    """
    Poll another process's effect (Dovecot's, a command's) until true.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        yield deferLater(reactor, 0.05, lambda: None)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def send(port, rcpts, body=b"hello", sender="sender@localhost"):
    def talk(client):
        client.ehlo("client.test")
        return client.sendmail(sender, rcpts, b"Subject: agents\r\n\r\n" + body + b"\r\n")
    return in_thread(smtp_session, port, talk)


def record_of(server):
    [record] = server.queue.records.values()
    return {r.address: r for r in record.recipients}, record


class Dovecot:
    """
    A private Dovecot serving LMTP on 127.0.0.1, its own config in a temp dir.
    """

    def __init__(self, users):
        if shutil.which("dovecot") is None:
            raise SkipTest("Dovecot is not installed (apt-get install dovecot-lmtpd)")
        self.dir = tempfile.mkdtemp(prefix="dv-")
        os.chmod(self.dir, 0o755)
        if os.getuid() == 0:  # Dovecot never delivers as root
            entry = pwd.getpwnam("nobody")
            self.uid, self.gid = entry.pw_uid, entry.pw_gid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.mail = os.path.join(self.dir, "mail")
        os.mkdir(self.mail)
        os.chown(self.mail, self.uid, self.gid)
        self.port = free_port()
        with open(os.path.join(self.dir, "users"), "w") as f:
            f.writelines(f"{u}::::::\n" for u in users)
        me = pwd.getpwuid(os.getuid()).pw_name
        config = textwrap.dedent(f"""
            protocols = lmtp
            base_dir = {self.dir}/run
            state_dir = {self.dir}/state
            log_path = {self.dir}/dovecot.log
            ssl = no
            listen = 127.0.0.1
            mail_location = maildir:{self.mail}/%d/%n
            default_internal_user = {me}
            default_login_user = {me}
            first_valid_uid = 1
            passdb {{
              driver = static
              args = nopassword=y
            }}
            userdb {{
              driver = passwd-file
              args = {self.dir}/users
              default_fields = uid={self.uid} gid={self.gid} home={self.mail}/%d/%n
            }}
            service lmtp {{
              inet_listener lmtp {{
                address = 127.0.0.1
                port = {self.port}
              }}
              unix_listener lmtp {{
                mode = 0600
              }}
            }}
            service anvil {{
              chroot =
            }}
            recipient_delimiter = +
        """)
        self.config = os.path.join(self.dir, "dovecot.conf")
        with open(self.config, "w") as f:
            f.write(config)
        self.process = subprocess.Popen(["dovecot", "-F", "-c", self.config])
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.stop()
                    raise AssertionError("Dovecot did not start") from None
                time.sleep(0.05)  # waiting for another process to listen

    def messages(self, user):
        local, domain = user.split("@")
        new = os.path.join(self.mail, domain, local, "new")
        if not os.path.isdir(new):
            return []
        out = []
        for name in sorted(os.listdir(new)):
            with open(os.path.join(new, name), "rb") as f:
                out.append(f.read())
        return out

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.dir, True)


class LMTPTests(TestCase):
    @inlineCallbacks
    def test_dovecot_per_recipient(self):
        """
        Mail for example.test goes to Dovecot over LMTP from the queue:
        alice's copy is saved; bob's 451 (an unwritable mailbox) defers
        bob only, delivered after the fault is fixed and the queue flushed;
        carol, unknown to Dovecot, bounces to the sender; dave is routed to
        a Maildir by a per-user choice.
        """
        dovecot = Dovecot(["alice@example.test", "bob@example.test", "dave@example.test"])
        self.addCleanup(dovecot.stop)
        broken = os.path.join(dovecot.mail, "example.test", "bob")
        os.makedirs(broken)
        os.chown(os.path.dirname(broken), dovecot.uid, dovecot.gid)
        os.chmod(broken, 0o700)
        if os.getuid() != 0:
            os.chmod(broken, 0o000)
        server = yield start_server(
            self, smtp=LISTEN, relay_networks="127.0.0.0/8",
            delivery=["example.test=lmtp", "dave@example.test=maildir"],
            plugins={"lmtp": {"server": f"127.0.0.1:{dovecot.port}", "timeout": 30}})
        for user in ("alice", "bob", "carol", "dave"):
            add_user(server, f"{user}@example.test")
        add_user(server, "sender@localhost")
        body = b"hello\r\n.dot line"
        refused = yield send(server.ports["smtp"], [
            "alice@example.test", "bob@example.test", "carol@example.test",
            "dave@example.test"], body=body)
        self.assertEqual(refused, {})
        yield until(lambda: server.queue.records and
                    list(server.queue.records.values())[0].attempts >= 1
                    and not server.queue.active)
        [alice] = dovecot.messages("alice@example.test")
        self.assertIn(b"Subject: agents\n", alice)
        self.assertTrue(alice.endswith(b"\n\nhello\n.dot line\n"))
        self.assertIn(b"Received: from client.test", alice)
        states, record = record_of(server)
        self.assertEqual(states["alice@example.test"].state, "sent")
        self.assertEqual(states["bob@example.test"].state, "pending")
        self.assertIn("451 4.2.0", states["bob@example.test"].last_error)
        self.assertEqual(states["carol@example.test"].state, "failed")
        self.assertNotIn("dave@example.test", states)
        [dave] = read_messages(server, "dave@example.test")
        self.assertIn(b"hello", dave)
        yield until(lambda: read_messages(server, "sender@localhost"))
        [bounce] = read_messages(server, "sender@localhost")
        self.assertIn(b"carol@example.test", bounce)
        self.assertIn(b"550 5.1.1", bounce)
        # The mailbox is repaired; the next attempt delivers bob only.
        os.chown(broken, dovecot.uid, dovecot.gid)
        os.chmod(broken, 0o700)
        server.queue.flush()
        yield until(lambda: not server.queue.records)
        [bob] = dovecot.messages("bob@example.test")
        self.assertIn(b"hello", bob)
        self.assertEqual(len(dovecot.messages("alice@example.test")), 1)
        self.assertEqual(read_messages(server, "alice@example.test"), [])

    @inlineCallbacks
    def test_server_down_defers(self):
        """
        An LMTP server that is not listening defers every recipient: the
        message stays queued, nothing is lost.
        """
        server = yield start_server(
            self, smtp=LISTEN, delivery=["lmtp"],
            plugins={"lmtp": {"server": f"127.0.0.1:{free_port()}"}})
        add_user(server, "alice@example.test")
        refused = yield send(server.ports["smtp"], ["alice@example.test"],
                             sender="x@remote.test")
        self.assertEqual(refused, {})
        yield until(lambda: server.queue.records and
                    list(server.queue.records.values())[0].attempts >= 1)
        states, _ = record_of(server)
        self.assertEqual(states["alice@example.test"].state, "pending")
        self.assertIn("4.4.1", states["alice@example.test"].last_error)

    def test_dot_stuffing(self):
        self.assertEqual(dot_stuffed(b".a\nb\n..c\n"), b"..a\r\nb\r\n...c\r\n.\r\n")
        self.assertEqual(dot_stuffed(b"no newline"), b"no newline\r\n.\r\n")
        self.assertEqual(dot_stuffed(b""), b".\r\n")

    def test_no_bare_cr(self):
        """
        A bare CR in the content (a file from elsewhere) goes out as a line
        end, with the dot after it doubled: an LMTP server that takes a bare
        CR for a line end never sees C{.} alone on a line before the end.
        """
        self.assertEqual(dot_stuffed(b"a\r.\rb\n"), b"a\r\n..\r\nb\r\n.\r\n")
        self.assertEqual(dot_stuffed(b"a\r\n.\r\n"), b"a\r\n..\r\n.\r\n")


SCRIPT = """\
out="$OUTDIR/$1"
cat > "$out"
echo "sender=$SENDER user=$USER extension=$EXTENSION" >> "$out"
case "$USER" in
  later) exit 75 ;;
  bad) echo "no such mailbox here"; exit 67 ;;
  slow) exec sleep 30 ;;
esac
exit 0
"""


class PipeTests(TestCase):
    @inlineCallbacks
    def test_exit_codes(self):
        """
        0 delivers, 75 defers, 67 bounces with the command's output as the
        reason, a command over its time limit is killed and deferred.
        """
        outdir = tempfile.mkdtemp(prefix="pipe-")
        self.addCleanup(shutil.rmtree, outdir, True)
        script = os.path.join(outdir, "deliver.sh")
        with open(script, "w") as f:
            f.write(SCRIPT)
        server = yield start_server(
            self, smtp=LISTEN, delivery=["example.test=pipe"],
            plugins={"pipe": {"command": ["/bin/sh", "-c", f"OUTDIR={outdir} exec /bin/sh "
                                          f"{script} \"$0\"", "{recipient}"],
                              "timeout": 1}})
        for user in ("ok", "later", "bad", "slow"):
            add_user(server, f"{user}@example.test")
        add_user(server, "sender@localhost")
        refused = yield send(server.ports["smtp"], [
            "ok+tag@example.test", "later@example.test", "bad@example.test",
            "slow@example.test"])
        self.assertEqual(refused, {})
        yield until(lambda: server.queue.records and
                    list(server.queue.records.values())[0].attempts >= 1
                    and not server.queue.active)
        with open(os.path.join(outdir, "ok+tag@example.test"), "rb") as f:
            delivered = f.read()
        self.assertIn(b"\n\nhello\n", delivered)
        self.assertTrue(delivered.endswith(b"sender=sender@localhost user=ok extension=tag\n"))
        states, _ = record_of(server)
        self.assertEqual(states["ok+tag@example.test"].state, "sent")
        self.assertEqual(states["later@example.test"].state, "pending")
        self.assertEqual(states["slow@example.test"].state, "pending")
        self.assertIn("time limit", states["slow@example.test"].last_error)
        self.assertEqual(states["bad@example.test"].state, "failed")
        yield until(lambda: read_messages(server, "sender@localhost"))
        [bounce] = read_messages(server, "sender@localhost")
        self.assertIn(b"no such mailbox here", bounce)


INLINE_AGENT = '''
from twisted.internet.defer import succeed
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.interfaces import IDeliveryAgent, IDeliveryAgentFactory

DELIVERED = []


@implementer(IDeliveryAgent)
class Memory:
    name = "memory"

    def deliver(self, envelope, spool):
        for rcpt in envelope.local:
            DELIVERED.append((str(rcpt.user), spool.read()))
        return succeed(None)


@implementer(IPlugin, IDeliveryAgentFactory)
class MemoryFactory:
    name = "memory"
    description = "keeps messages in a list, for the tests"

    def build(self, config, reactor):
        return Memory()


memory = MemoryFactory()
'''


class InlineAgentTests(TestCase):
    @inlineCallbacks
    def test_third_party_agent_at_data(self):
        """
        An IDeliveryAgent from a plugin directory outside the package runs
        at DATA for the user it is chosen for; others stay in Maildir, and
        nothing goes through the queue.
        """
        import sys

        from mailstack import plugins
        root = self.mktemp()
        directory = os.path.join(root, "mailstack", "plugins")
        os.makedirs(directory)
        with open(os.path.join(directory, "memory_agent.py"), "w") as f:
            f.write(INLINE_AGENT)
        plugins.__path__.append(directory)
        self.addCleanup(plugins.__path__.remove, directory)
        self.addCleanup(sys.modules.pop, "mailstack.plugins.memory_agent", None)
        server = yield start_server(self, smtp=LISTEN,
                                    delivery=["carol@example.test=memory"])
        add_user(server, "alice@example.test")
        add_user(server, "carol@example.test")
        refused = yield send(server.ports["smtp"], ["alice@example.test",
                                                    "carol+x@example.test"],
                             sender="x@remote.test")
        self.assertEqual(refused, {})
        from mailstack.plugins.memory_agent import DELIVERED
        [(user, content)] = DELIVERED
        self.assertEqual(user, "carol@example.test")
        self.assertIn(b"\n\nhello\n", content)
        self.assertEqual(len(read_messages(server, "alice@example.test")), 1)
        self.assertEqual(read_messages(server, "carol@example.test"), [])
        self.assertEqual(server.queue.records, {})
