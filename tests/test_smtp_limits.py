"""
The SMTP server's limits against slow and greedy clients: the per-command
deadline, the minimum DATA rate, and the cap on input held while a command
is pending (fake clock and transport), then the same over a real socket
behind a slow password check.
"""

import base64
import smtplib

from twisted.cred.error import UnauthorizedLogin
from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.smtp.reply import Reply
from mailstack.smtp.server import MAX_PENDING_INPUT, ServerSettings, SMTPServerFactory
from tests import test_smtp_server as base
from tests.support import add_user, client_context, in_thread, start_server


class SlowClientTests(SynchronousTestCase):
    """
    A session over a StringTransport with a fake clock, as in
    L{tests.test_smtp_server}.
    """

    def setUp(self):
        self.clock = Clock()
        self.policy = base.ScriptedPolicy()
        self.settings = ServerSettings(hostname="mx.test", max_message_size=10**7,
                                       timeout=300, min_data_rate=500)
        self.factory = SMTPServerFactory(self.policy, self.settings, self.clock,
                                         tls=lambda: "TLS-CONTEXT")
        self.transport = base.TLSStringTransport()
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.assertEqual(self.replies(), [b"220 mx.test ESMTP mailstack"])

    def replies(self):
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def send(self, data):
        self.proto.dataReceived(data)
        return self.replies()

    def codes(self, data):
        return [line[:3] for line in self.send(data) if line[3:4] == b" "]

    def test_one_byte_a_minute(self):
        """
        A command trickled one byte a minute is cut off when the time for a
        whole command is up, though no minute was idle.
        """
        for byte in b"NOOP":
            self.clock.advance(60)
            self.send(bytes([byte]))
        self.clock.advance(59)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(1)  # 300 s after the greeting
        self.assertEqual(self.replies(), [b"421 4.4.2 mx.test Error: timeout exceeded"])
        self.assertTrue(self.transport.disconnecting)

    def test_each_command_gets_the_time(self):
        """
        A client that sends whole commands is never cut off, however long
        the session.
        """
        for _ in range(20):
            self.clock.advance(299)
            self.assertEqual(self.codes(b"NOOP\r\n"), [b"250"])
        self.assertFalse(self.transport.disconnecting)

    def begin_data(self):
        self.assertEqual(self.codes(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n"
                                    b"RCPT TO:<u@mx.test>\r\nDATA\r\n"),
                         [b"250", b"250", b"250", b"354"])

    def test_data_rate_kept(self):
        """
        A client keeping up 500 octets a second sends a long message: the
        deadline moves with what it sends.
        """
        self.begin_data()
        line = b"x" * 98 + b"\r\n"
        for _ in range(120):
            self.clock.advance(10)
            self.send(line * 50)  # 5000 octets every 10 seconds
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.codes(b".\r\n"), [b"250"])
        self.assertEqual(len(self.policy.delivered), 1)

    def test_data_trickled(self):
        """
        A client sending DATA at 100 octets a second falls behind the
        minimum rate and is cut off long before the 20 minutes it would
        need, though it is never idle for a minute.
        """
        self.begin_data()
        line = b"x" * 98 + b"\r\n"
        for _ in range(120):
            self.clock.advance(10)
            if self.transport.disconnecting:
                break
            self.send(line * 10)  # 1000 octets every 10 seconds
        self.assertTrue(self.transport.disconnecting)
        self.assertLess(self.clock.seconds(), 500)
        self.assertIn(b"421 4.4.2 mx.test Error: timeout exceeded", self.replies())
        self.assertEqual(self.policy.delivered, [])

    def test_data_rate_after_spill_pause(self):
        """
        When DATA pauses for the spill thread (the disk is slower than the
        client) and resumes, the deadline goes on counting the DATA rate:
        a client keeping up 500 octets a second is not cut off after
        --smtp-timeout, however long the message.
        """
        import tempfile

        from mailstack.message import MessageSpool

        self.patch(MessageSpool, "memory_limit", 1000)
        self.patch(MessageSpool, "backlog_limit", 20000)
        writes = []

        def blocking(f, *args):
            d = Deferred()
            writes.append((d, f, args))
            return d

        self.factory.spool_dir = tempfile.mkdtemp()
        self.addCleanup(__import__("shutil").rmtree, self.factory.spool_dir)
        self.factory.blocking = blocking
        self.begin_data()
        line = b"x" * 98 + b"\r\n"
        paused = 0
        for i in range(100):
            self.clock.advance(10)
            self.send(line * 50)  # 5000 octets every 10 seconds
            if self.transport.producerState == "paused":
                paused += 1
            while writes and i >= 5:  # the spill thread is slow at first, then keeps up
                d, f, args = writes.pop(0)
                d.callback(f(*args))
        self.assertGreater(paused, 0)
        self.assertFalse(self.transport.disconnecting)
        replies = self.send(b".\r\n")
        while writes:
            d, f, args = writes.pop(0)
            d.callback(f(*args))
        replies += self.replies()
        self.assertEqual([r[:3] for r in replies], [b"250"])
        self.assertEqual(len(self.policy.delivered), 1)

    def test_input_capped_while_pending(self):
        """
        Megabytes of pipelined commands behind a command whose answer is
        pending (a slow check): the session holds at most
        MAX_PENDING_INPUT octets, then answers 421 and closes; none of the
        pipelined commands runs.
        """
        pending = Deferred()
        self.policy.auth = lambda protocol, arg: pending
        self.assertEqual(self.codes(b"EHLO c.test\r\n"), [b"250"])
        self.send(b"AUTH PLAIN AGFsaWNlAHdyb25n\r\n")
        # Nothing waits behind AUTH yet: reading stops with the next input.
        self.assertEqual(self.transport.producerState, "producing")
        chunk = b"NOOP\r\n" * 10000  # 60,000 octets a read
        self.proto.dataReceived(chunk)
        self.assertEqual(self.transport.producerState, "paused")
        for _ in range(100):  # 6 MB
            self.proto.dataReceived(chunk)
            self.assertLessEqual(len(self.proto._buffer), MAX_PENDING_INPUT)
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.replies(),
                         [b"421 4.7.0 mx.test Error: too much pipelined input"])
        pending.callback(Reply(535, "5.7.8", "Error: authentication failed"))
        self.assertEqual(self.replies(), [])

    def test_client_not_reading_replies(self):
        """
        When the transport's write buffer is full (the client pipelines but
        does not read), no further command runs; what the client sends
        meanwhile is held up to MAX_PENDING_INPUT, then 421 and close.  A
        client that reads again is served again.
        """
        self.assertEqual(self.codes(b"EHLO c.test\r\n"), [b"250"])
        self.proto.pauseProducing()  # as the transport does when its buffer is full
        self.assertEqual(self.send(b"NOOP\r\n" * 3), [])
        self.proto.resumeProducing()
        self.assertEqual(self.replies(), [b"250 2.0.0 Ok"] * 3)
        self.proto.pauseProducing()
        for _ in range(100):
            self.proto.dataReceived(b"NOOP\r\n" * 10000)
            self.assertLessEqual(len(self.proto._buffer), MAX_PENDING_INPUT)
            if self.transport.disconnecting:
                break
        self.assertEqual(self.replies(),
                         [b"421 4.7.0 mx.test Error: too much pipelined input"])
        self.assertTrue(self.transport.disconnecting)

    def test_client_never_reading_is_aborted(self):
        """
        A client that stops reading is cut off at the command deadline:
        aborted, since a 421 would never get through.
        """
        self.proto.pauseProducing()
        self.send(b"NOOP\r\n")
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)
        self.clock.advance(300)
        self.assertEqual(aborted, [True])

    def test_pipelining_within_the_cap(self):
        """
        What a client may legitimately pipeline behind a pending command is
        held and answered in order.
        """
        pending = Deferred()
        self.policy.mail_result = pending
        rcpts = b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(100))
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n" + rcpts + b"DATA\r\n")
        pending.callback(None)
        self.assertEqual(self.codes(b""), [b"250"] * 101 + [b"354"])


def recv_all(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


@inlineCallbacks
def wait_for(condition):
    for _ in range(1000):
        if condition():
            return
        yield deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition not reached")


def session_of(server, listener):
    [wrapper] = server.getServiceNamed(listener).factory.protocols
    return wrapper.wrappedProtocol


class FloodTests(TestCase):
    """
    Real clients write megabytes of pipelined commands behind a command
    whose answer is slow: a password check, a sender check.
    """

    @inlineCallbacks
    def test_flood_behind_slow_auth(self):
        """
        Over TLS on the submission port, AUTH with a slow password check,
        then 4 MB of NOOPs in the same write: while the check runs the
        server reads nothing more (the client's write blocks) and holds at
        most MAX_PENDING_INPUT; afterwards every command is answered, in
        order.
        """
        server = yield start_server(self, submission="tcp:0:interface=127.0.0.1")
        add_user(server, "alice@localhost")
        checks = []

        def slow_check(credentials):
            d = Deferred()
            checks.append(d)
            return d

        server.checker.requestAvatarId = slow_check
        port = server.ports["submission"]
        context = client_context(server)
        token = base64.b64encode(b"\0alice@localhost\0wrong")
        count = 8000
        flood = b"NOOP " + b"x" * 500 + b"\r\n"

        def client():
            smtp = smtplib.SMTP("127.0.0.1", port, timeout=30)
            smtp.starttls(context=context)
            smtp.ehlo("c.test")
            sock = smtp.sock
            try:
                sock.sendall(b"AUTH PLAIN " + token + b"\r\n" + flood * count + b"QUIT\r\n")
            except OSError:
                pass  # closed by the server before all was sent
            data = recv_all(sock)
            sock.close()
            return data

        finished = in_thread(client)
        yield wait_for(lambda: checks)
        session = session_of(server, "submission")
        yield deferLater(reactor, 0.2, lambda: None)  # the client keeps writing
        self.assertLessEqual(len(session._buffer), MAX_PENDING_INPUT)
        self.assertTrue(session._paused)
        checks[0].errback(UnauthorizedLogin())
        answer = yield finished
        lines = answer.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"535 "), lines[0])
        self.assertEqual(lines[1:], [b"250 2.0.0 Ok"] * count + [b"221 2.0.0 Bye", b""])

    @inlineCallbacks
    def test_pipelining_client_that_reads(self):
        """
        A client that pipelines 4 MB of commands behind a slow MAIL check
        but reads its replies as it goes is answered in full and in order,
        the server never holding more than MAX_PENDING_INPUT of its input.
        """
        import socket
        import threading

        server = yield start_server(self, smtp="tcp:0:interface=127.0.0.1")
        policy = server.getServiceNamed("smtp").factory.wrappedFactory.policy
        checks = []

        def slow_mail(session, sender):
            d = Deferred()
            checks.append(d)
            return d

        policy.mail = slow_mail
        count = 8000
        flood = b"NOOP " + b"x" * 500 + b"\r\n"
        biggest = []

        def client():
            sock = socket.create_connection(("127.0.0.1", server.ports["smtp"]), timeout=30)
            writer = threading.Thread(target=sock.sendall, args=(
                b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n" + flood * count + b"QUIT\r\n",))
            writer.start()
            data = recv_all(sock)
            writer.join()
            sock.close()
            return data

        finished = in_thread(client)
        yield wait_for(lambda: checks)
        session = session_of(server, "smtp")
        yield deferLater(reactor, 0.2, lambda: None)
        biggest.append(len(session._buffer))
        checks[0].callback(None)
        answer = yield finished
        self.assertLessEqual(max(biggest), MAX_PENDING_INPUT)
        replies = [line[:4] for line in answer.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(replies, [b"220 ", b"250 ", b"250 "] + [b"250 "] * count + [b"221 "])
