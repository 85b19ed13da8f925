"""
SIGHUP re-reads the configuration file without dropping sessions; a bad
file keeps the old configuration; SIGTERM lets SMTP transactions in flight
finish.
"""

import os
import signal
import smtplib
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.config import build_config
from mailstack.reload import Drain, reload
from mailstack.service import MailStack
from mailstack.testing import FakeResolver
from tests.processes import Twistd
from tests.support import add_user, in_thread, read_messages, short_tempdir

OFF = {name: "none" for name in ("submission", "submissions", "imap", "imaps", "pop3")}


def write_toml(path, **values):
    lines = []
    for key, value in values.items():
        if isinstance(value, list):
            value = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, str):
            value = f'"{value}"'
        lines.append(f"{key} = {value}")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def rcpt(port, address, session=None):
    """
    The reply code to RCPT TO:<address> (in C{session} if given).
    """
    client = session or smtplib.SMTP("127.0.0.1", port, timeout=30)
    try:
        client.ehlo("client.test")
        client.mail("x@remote.test")
        code = client.rcpt(address)[0]
        client.rset()
        return code
    finally:
        if session is None:
            client.quit()


class ReloadTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.data = short_tempdir(self)
        self.path = os.path.join(self.data, "mailstack.toml")
        self.values = dict(OFF, **{"data-dir": self.data, "hostname": "mx.test",
                                   "domain": ["localhost"],
                                   "smtp": "tcp:0:interface=127.0.0.1",
                                   "imaps": "tcp:0:interface=127.0.0.1"})
        write_toml(self.path, **self.values)
        self.stack = MailStack(build_config({}, self.path), reactor, resolver=FakeResolver())
        self.stack.privilegedStartService()
        self.stack.startService()
        self.addCleanup(self.stack.stopService)
        port = yield next(s for s in self.stack if getattr(s, "label", "") == "smtp").listening
        self.port = port.getHost().port
        add_user(self.stack, "alice@new.test")

    def load(self):
        return build_config({}, self.path)

    @inlineCallbacks
    def test_domain_added_without_restart(self):
        """
        If the file gains a domain, L{reload} makes it local for new
        transactions, also in a session opened before; mail is delivered.
        """
        session = yield in_thread(smtplib.SMTP, "127.0.0.1", self.port, timeout=30)
        self.addCleanup(session.close)
        self.assertEqual((yield in_thread(rcpt, self.port, "alice@new.test", session)), 554)
        write_toml(self.path, **dict(self.values, domain=["localhost", "new.test"],
                                     **{"max-message-size": "1M"}))
        self.assertTrue(reload(self.stack, self.load))
        self.assertEqual(self.stack.config.domain, ("localhost", "new.test"))
        imap = next(s.factory for s in self.stack if getattr(s, "label", "") == "imaps")
        while not hasattr(imap, "max_message_size"):  # inside the limits and TLS
            imap = imap.wrappedFactory
        self.assertEqual(imap.max_message_size, 1048576)
        self.assertEqual((yield in_thread(rcpt, self.port, "alice@new.test", session)), 250)

        def send():
            session.sendmail("x@remote.test", ["alice@new.test"], b"Subject: s\r\n\r\nx\r\n")
            return session.ehlo()[1]

        features = yield in_thread(send)
        self.assertEqual(len(read_messages(self.stack, "alice@new.test")), 1)
        # The session keeps its settings; a new one sees the new limit.
        self.assertIn(b"SIZE 26214400", features)
        fresh = yield in_thread(smtplib.SMTP, "127.0.0.1", self.port, timeout=30)
        self.addCleanup(fresh.close)
        self.assertIn(b"SIZE 1048576", (yield in_thread(fresh.ehlo))[1])

    @inlineCallbacks
    def test_bad_file_keeps_old_configuration(self):
        """
        If the file does not parse, or names a value that is wrong, or TLS
        files that do not load, nothing changes and the error is logged;
        listener changes are reported as needing a restart.
        """
        with open(self.path, "a") as f:
            f.write("domain = [\n")
        self.assertFalse(reload(self.stack, self.load))
        write_toml(self.path, **dict(self.values, domain=["new.test"],
                                     **{"relay-networks": "not-a-network"}))
        self.assertFalse(reload(self.stack, self.load))
        bad_cert = os.path.join(self.data, "bad.pem")
        with open(bad_cert, "w") as f:
            f.write("not a certificate\n")
        write_toml(self.path, **dict(self.values, domain=["new.test"],
                                     **{"tls-cert": bad_cert, "tls-key": bad_cert}))
        self.assertFalse(reload(self.stack, self.load))
        self.assertEqual(self.stack.router.domains, frozenset({"localhost"}))
        self.assertEqual((yield in_thread(rcpt, self.port, "alice@new.test")), 554)

        write_toml(self.path, **dict(self.values, smtp="tcp:0:interface=127.0.0.2",
                                     hostname="other.test"))
        self.assertTrue(reload(self.stack, self.load))
        self.assertEqual(self.stack.config.smtp, "tcp:0:interface=127.0.0.1")
        self.assertEqual(self.stack.config.hostname, "mx.test")


class SignalTests(SynchronousTestCase):
    def test_sighup_in_a_real_server(self):
        """
        C{kill -HUP} on C{twistd mailstack --config FILE}: the server keeps
        running, logs the change, and accepts mail for the new domain.
        """
        data = short_tempdir(self)
        path = os.path.join(data, "mailstack.toml")
        values = dict(OFF, **{"data-dir": data, "hostname": "mx.test", "domain": ["localhost"],
                              "smtp": "tcp:0:interface=127.0.0.1"})
        write_toml(path, **values)
        server = Twistd(["--config", path])
        self.addCleanup(server.stop)
        port = server.ports("smtp")["smtp"]
        from mailstack.address import local_address
        from mailstack.auth import hash_password
        from mailstack.users import UserDatabase
        UserDatabase(data).add(local_address("bob@new.test"), hash_password("pw"))
        self.assertEqual(rcpt(port, "bob@new.test"), 554)
        write_toml(path, **dict(values, domain=["localhost", "new.test"]))
        server.process.send_signal(signal.SIGHUP)
        server.wait_for(r"reload: changed domain = \['localhost', 'new.test'\]")
        self.assertEqual(rcpt(port, "bob@new.test"), 250)
        self.assertIsNone(server.process.poll())
        # SIGTERM: a clean stop (twistd ends by the signal, as systemd expects).
        server.process.send_signal(signal.SIGTERM)
        self.assertEqual(server.process.wait(30), -signal.SIGTERM)
        server.wait_for("Server Shut Down")


class DrainTests(TestCase):
    @inlineCallbacks
    def test_transaction_finishes_after_sigterm(self):
        """
        When the service stops, an idle session gets 421 4.3.2 at once, a
        session in DATA may finish its message (250) and then gets 421;
        no new connection is accepted.
        """
        from tests.support import start_server
        stack = yield start_server(self, smtp="tcp:0:interface=127.0.0.1")
        Drain(stack, reactor, 30).setServiceParent(stack)
        add_user(stack, "alice@localhost")
        port = stack.ports["smtp"]

        def open_session(in_data):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            f = s.makefile("rb")
            f.readline()
            commands = [b"EHLO c.test"]
            if in_data:
                commands += [b"MAIL FROM:<x@remote.test>", b"RCPT TO:<alice@localhost>", b"DATA"]
            for command in commands:
                s.sendall(command + b"\r\n")
                while True:
                    line = f.readline()
                    if line[3:4] != b"-":
                        break
            if in_data:
                s.sendall(b"Subject: drained\r\n\r\nfirst half\r\n")
            return s, f

        idle, idle_file = yield in_thread(open_session, False)
        busy, busy_file = yield in_thread(open_session, True)
        self.addCleanup(idle.close)
        self.addCleanup(busy.close)
        stopped = stack.stopService()
        self.assertEqual((yield in_thread(idle_file.readline))[:9], b"421 4.3.2")
        with self.assertRaises(OSError):
            yield in_thread(socket.create_connection, ("127.0.0.1", port), 5)
        self.assertNoResult(stopped)

        def finish():
            busy.sendall(b"second half\r\n.\r\n")
            return busy_file.readline(), busy_file.readline()

        done, goodbye = yield in_thread(finish)
        self.assertEqual(done[:3], b"250")
        self.assertEqual(goodbye[:9], b"421 4.3.2")
        yield stopped
        [message] = read_messages(stack, "alice@localhost")
        self.assertIn(b"second half", message)


class FakeSession:
    def __init__(self, busy):
        self.envelope = object() if busy else None
        self._data = None
        self._busy = False
        self._closed = False
        self.aborted = False
        self.sent = []
        self.settings = type("S", (), {"hostname": "mx.test"})
        self.transport = self

    def _send(self, reply):
        self.sent.append(reply.code)

    def _close(self):
        self._closed = True

    def abortConnection(self):
        self.aborted = self._closed = True


class DrainDeadlineTests(SynchronousTestCase):
    def test_cut_after_grace(self):
        """
        A session still in a transaction when the grace period ends is cut.
        """
        clock = Clock()
        session = FakeSession(busy=True)
        from mailstack.smtp.server import SMTPServerFactory
        factory = SMTPServerFactory.__new__(SMTPServerFactory)
        factory.sessions = {session}
        listener = type("L", (), {"factory": factory})()
        drain = Drain([listener], clock, grace=10)
        drain.startService()
        d = drain.stopService()
        clock.advance(9.9)
        self.assertNoResult(d)
        self.assertFalse(session.aborted)
        clock.advance(0.2)
        self.successResultOf(d)
        self.assertTrue(session.aborted)
        self.assertEqual(session.sent, [])


class ReceiversReloadTests(SynchronousTestCase):
    def test_receivers_restart_with_new_domain(self):
        """
        With --receivers 2, a reload that adds a domain restarts the
        receiver process (it finishes its sessions first); afterwards every
        process accepts mail for the new domain.
        """
        import time

        data = short_tempdir(self)
        path = os.path.join(data, "mailstack.toml")
        values = dict(OFF, **{"data-dir": data, "hostname": "mx.test", "domain": ["localhost"],
                              "smtp": "tcp:0:interface=127.0.0.1", "receivers": 2})
        write_toml(path, **values)
        server = Twistd(["--config", path])
        self.addCleanup(server.stop)
        port = server.ports("smtp")["smtp"]
        server.wait_for(r"receiver 1 \(pid \d+\) accepting")
        from mailstack.address import local_address
        from mailstack.auth import hash_password
        from mailstack.users import UserDatabase
        UserDatabase(data).add(local_address("bob@new.test"), hash_password("pw"))
        write_toml(path, **dict(values, domain=["localhost", "new.test"]))
        server.process.send_signal(signal.SIGHUP)
        server.wait_for("receiver 1 stopped; starting it with the new configuration")
        deadline = time.monotonic() + 60
        while (sum("receiver 1 (pid" in line and "accepting" in line for line in server.lines)
               < 2 and time.monotonic() < deadline):
            time.sleep(0.05)
        # Many connections: the kernel hands them to both processes.
        codes = [rcpt(port, "bob@new.test") for _ in range(12)]
        self.assertEqual(codes, [250] * 12, server.output())
        self.assertNotIn("takes effect after a restart", server.output())
