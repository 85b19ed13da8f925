"""
Log injection: text from clients and remote servers is escaped in log
lines (L{mailstack.logsafe.safe}), checked at the helper and end to end
with real clients, the log events captured by a twisted.logger observer.
"""

import imaplib
import poplib
import smtplib

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.protocols.basic import LineOnlyReceiver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import parse_address
from mailstack.logsafe import safe
from mailstack.smtp.client import Timeouts
from mailstack.testing import FakeResolver
from tests.support import add_user, client_context, in_thread, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"


class SafeTests(SynchronousTestCase):
    def test_control_characters(self):
        """
        If text holds CR, LF, NUL, ESC, TAB or DEL, then each becomes C{\\xNN}.
        """
        self.assertEqual(safe("evil\r\nuser"), "evil\\x0d\\x0auser")
        self.assertEqual(safe("a\0b\x1b[31mc\td\x7f"), "a\\x00b\\x1b[31mc\\x09d\\x7f")

    def test_printable_kept(self):
        """
        If text is printable (UTF-8 included), then it is kept as it is.
        """
        for text in ("alice@example.org", "Grüße, 世界 ✓", "550 5.1.1 <a b> (c) [d]"):
            self.assertIs(safe(text), text)

    def test_other_non_printables(self):
        """
        If text holds non-printable characters beyond Latin-1 (a
        right-to-left override, a line separator), then they are escaped too.
        """
        self.assertEqual(safe("abc\u202edef\u2028"), "abc\\u202edef\\u2028")
        self.assertEqual(safe("\U000e0041"), "\\U000e0041")
        self.assertEqual(safe("\x85\xa0"), "\\x85\\xa0")

    def test_backslash(self):
        """
        If text holds a backslash, then it is doubled, so that an escape in
        the log always means the character was sent.
        """
        self.assertEqual(safe("\\x0d"), "\\\\x0d")

    def test_bytes(self):
        """
        If the value is bytes, then UTF-8 is decoded and other bytes become
        C{\\xNN}.
        """
        self.assertEqual(safe(b"caf\xc3\xa9 \xff\xfe\r"), "café \\xff\\xfe\\x0d")

    def test_limit(self):
        """
        If a limit is given, then longer text is cut there and marked.
        """
        self.assertEqual(safe("a" * 10, 4), "aaaa...")
        self.assertEqual(safe("a\r", 4), "a\\x0d")

    def test_objects(self):
        """
        If the value is not text, then its C{str} is made safe.
        """
        self.assertEqual(safe(ValueError("bad\nthing")), "bad\\x0athing")
        self.assertEqual(safe(parse_address("a@example.org")), "a@example.org")


class LogCapture:
    """
    Collects the log events whose text contains C{marker}, formatted.
    """

    def __init__(self, testcase, marker):
        self.marker = marker
        self.lines = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        text = formatEvent(event)
        if self.marker in text:
            self.lines.append(text)


class LoginLogTests(TestCase):
    """
    User names with CR LF, through real clients over TLS, give one log line
    each, with the CR LF escaped.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, submission=LISTEN, imap=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)
        self.log = LogCapture(self, "evil")

    def assertOneEscapedLine(self, expected):
        self.assertEqual(len(self.log.lines), 1, self.log.lines)
        [line] = self.log.lines
        self.assertNotIn("\r", line)
        self.assertNotIn("\n", line)
        self.assertIn(expected, line)

    @inlineCallbacks
    def test_smtp_auth_login(self):
        """
        If an AUTH LOGIN user name holds CR LF, then the failed login is
        logged on one line with C{\\x0d\\x0a}.
        """
        def run(client):
            client.starttls(context=self.context)
            client.ehlo("client.test")
            client.user, client.password = "evil\r\nsasl_username=alice@localhost", "x"
            try:
                client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code

        def session(client):
            client.ehlo("client.test")
            return run(client)

        code = yield in_thread(smtp_session, self.server.ports["submission"], session,
                               host="localhost")
        self.assertEqual(code, 535)
        self.assertOneEscapedLine("user=<evil\\x0d\\x0asasl_username=alice@localhost>")

    @inlineCallbacks
    def test_imap_literal(self):
        """
        If an IMAP LOGIN user name is a literal holding CR LF, then the
        failed login is logged on one line with C{\\x0d\\x0a}.
        """
        def run():
            client = imaplib.IMAP4("localhost", self.server.ports["imap"], timeout=30)
            try:
                client.starttls(self.context)
                name = b"evil\r\nimap: login of alice@localhost"
                client.send(b"x1 LOGIN {%d}\r\n" % len(name))
                continuation = client.readline()
                client.send(name + b' "wrong"\r\n')
                return continuation, client.readline()
            finally:
                client.shutdown()

        continuation, answer = yield in_thread(run)
        self.assertTrue(continuation.startswith(b"+"), continuation)
        self.assertTrue(answer.startswith(b"x1 NO"), answer)
        self.assertOneEscapedLine("failed login for evil\\x0d\\x0aimap: login of alice")

    @inlineCallbacks
    def test_pop3_user(self):
        """
        If a POP3 user name holds a bare CR, then the failed login is logged
        on one line with C{\\x0d}.
        """
        def run():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=30)
            try:
                client.stls(self.context)
                client.sock.sendall(b"USER evil\rpop3:login_of_alice@localhost\r\n")
                first = client.file.readline()
                client.sock.sendall(b"PASS wrong\r\n")
                return first, client.file.readline()
            finally:
                client.sock.close()

        first, answer = yield in_thread(run)
        self.assertTrue(first.startswith(b"+OK"), first)
        self.assertTrue(answer.startswith(b"-ERR [AUTH]"), answer)
        self.assertOneEscapedLine("failed login for evil\\x0dpop3:login_of_alice")


class HostileRemote(LineOnlyReceiver):
    """
    A remote MTA whose refusal of RCPT holds a bare CR.
    """

    reply = b"550 5.1.1 evil\rstatus=sent (250 ok)"

    def connectionMade(self):
        self.sendLine(b"220 remote.test ESMTP")

    def lineReceived(self, line):
        verb = line.split(b" ", 1)[0].upper()
        if verb == b"RCPT":
            self.sendLine(self.reply)
        elif verb == b"QUIT":
            self.sendLine(b"221 bye")
            self.transport.loseConnection()
        elif verb == b"DATA":
            self.sendLine(b"554 no valid recipients")
        else:
            self.sendLine(b"250 remote.test")


class RemoteReplyLogTests(TestCase):
    @inlineCallbacks
    def test_remote_reply_with_cr(self):
        """
        If a remote server's reply holds a bare CR, then the delivery
        status is logged on one line with C{\\x0d}.
        """
        port = yield serverFromString(reactor, LISTEN).listen(
            Factory.forProtocol(HostileRemote))
        self.addCleanup(port.stopListening)
        number = port.getHost().port
        resolver = FakeResolver(mx={"remote.test": [(10, "mx.remote.test")]},
                                a={"mx.remote.test": ["127.0.0.10"]})
        clock = Clock()
        server = yield start_server(
            self, resolver=resolver, clock=clock, relay_timeouts=Timeouts(5, 5, 5, 5, 5),
            relay_endpoint=lambda ip, _: TCP4ClientEndpoint(reactor, "127.0.0.1", number,
                                                            timeout=5))
        yield server.queue.loaded
        add_user(server, "alice@localhost")
        log = LogCapture(self, "evil")
        yield server.dispatcher.inject(parse_address("alice@localhost"),
                                       [parse_address("bob@remote.test")],
                                       b"Subject: x\n\nhello\n")
        clock.advance(0)
        yield DeferredList(list(server.queue.active.values()))
        self.assertEqual(len(log.lines), 1, log.lines)
        [line] = log.lines
        self.assertNotIn("\r", line)
        self.assertIn("to=<bob@remote.test>", line)
        self.assertIn("status=bounced (550 evil\\x0dstatus=sent (250 ok))", line)
