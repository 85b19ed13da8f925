"""
IMAP and POP3 against hostile clients: input while a command is pending,
literals, idle timeouts (fake time), and malformed commands in every
state (real TLS sessions on 127.0.0.1 port 0).
"""

import re
import socket
import ssl
import threading

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.mail.imap4 import IAccount
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.access.imap import IMAPFactory
from mailstack.access.limits import AccessLimits
from mailstack.access.pop3 import POP3Factory
from mailstack.throttle import LoginThrottle
from tests.support import add_user, client_context, in_thread, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"
LINE = b"x" * (64 * 1024 - 2)  # a 64 KiB line with its CRLF


class PendingPortal:
    """
    A portal whose logins wait until the test answers them.
    """

    def __init__(self):
        self.pending = []

    def login(self, credentials, mind, *interfaces):
        d = Deferred()
        self.pending.append(d)
        return d


class Transport(StringTransport):
    def abortConnection(self):
        self.aborted = True
        self.loseConnection()


def imap_session(clock, limits=AccessLimits(), max_message_size=1000):
    portal = PendingPortal()
    factory = IMAPFactory(portal, clock, LoginThrottle(clock), None, max_message_size,
                          implicit_tls=True, limits=limits)
    server = factory.buildProtocol(None)
    transport = Transport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport, portal


def pop3_session(clock, limits=AccessLimits()):
    portal = PendingPortal()
    factory = POP3Factory(portal, clock, None, LoginThrottle(clock), implicit_tls=True,
                          limits=limits)
    server = factory.buildProtocol(None)
    transport = Transport()
    server.makeConnection(transport)
    transport.clear()
    return server, transport, portal


def refuse(portal):
    from twisted.cred.error import UnauthorizedLogin
    portal.pending.pop(0).errback(UnauthorizedLogin())


class PendingInputTests(SynchronousTestCase):
    """
    While a command runs the session stops reading and keeps at most
    C{max_buffered} bytes.
    """

    def test_imap_pauses_while_login_pending(self):
        """
        A wrong LOGIN and 64 KiB lines in the same read: reading stops at
        once; when the login is refused the waiting lines are answered, and
        the garbage ends the session after 20 invalid commands.
        """
        clock = Clock()
        server, transport, portal = imap_session(clock)
        server.dataReceived(b"a LOGIN alice wrong\r\n" + (LINE + b"\r\n") * 3)
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(len(server._waiting), 3)
        self.assertEqual(transport.value(), b"")  # nothing answered out of order
        refuse(portal)
        clock.advance(0)
        lines = transport.value().split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"a NO"), lines[0])
        self.assertEqual(len([x for x in lines if x.startswith(b"* BAD")]), 3)
        self.assertEqual(transport.producerState, "producing")  # reading again

    def test_imap_cap_on_buffered_input(self):
        """
        One read bigger than the cap (here a thousand 64 KiB lines in one
        call) ends the session with BYE; what is kept never exceeds the cap.
        """
        clock = Clock()
        limits = AccessLimits(max_buffered=256 * 1024)
        server, transport, portal = imap_session(clock, limits)
        kept = []
        original = server._stop_reading

        def spy():
            kept.append(server._waiting_bytes)
            original()
        server._stop_reading = spy
        server.dataReceived(b"a LOGIN alice wrong\r\n" + (LINE + b"\r\n") * 1000)
        self.assertIn(b"* BYE Too much input", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual(server._waiting, [])
        self.assertLessEqual(max(kept), limits.max_buffered + len(LINE) + 2)
        self.assertLess(len(kept), 10)  # stopped looking at the rest
        self.flushLoggedErrors()

    def test_imap_too_many_invalid_commands(self):
        """
        Twenty BAD answers in a row end the session (Dovecot's rule); a good
        command in between resets the count.
        """
        clock = Clock()
        server, transport, _ = imap_session(clock)
        for i in range(19):
            server.dataReceived(b"t%d FROB\r\n" % i)
        server.dataReceived(b"n NOOP\r\n")
        for i in range(19):
            server.dataReceived(b"u%d FROB\r\n" % i)
        self.assertFalse(transport.disconnecting)
        server.dataReceived(b"v FROB\r\n")
        self.assertIn(b"* BYE Too many invalid commands", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_pop3_pauses_while_password_checked(self):
        """
        POP3 too: commands sent behind PASS wait for its answer (no reply
        out of order), reading stops, and the cap closes with -ERR.
        """
        clock = Clock()
        server, transport, portal = pop3_session(clock)
        server.dataReceived(b"USER alice\r\nPASS wrong\r\nCAPA\r\nSTAT\r\n")
        self.assertEqual(transport.producerState, "paused")
        self.assertEqual(transport.value(), b"+OK USER accepted, send PASS\r\n")
        refuse(portal)
        replies = transport.value().split(b"\r\n")
        self.assertTrue(replies[1].startswith(b"-ERR [AUTH]"), replies)
        self.assertTrue(replies[2].startswith(b"+OK"), replies)  # CAPA, after the PASS
        self.assertEqual(transport.producerState, "producing")

        server2, transport2, _ = pop3_session(clock, AccessLimits(max_buffered=100_000))
        server2.dataReceived(b"USER alice\r\nPASS wrong\r\n" + (b"y" * 500 + b"\r\n") * 1000)
        self.assertIn(b"-ERR Too much input", transport2.value())
        self.assertTrue(transport2.disconnecting)
        self.assertLessEqual(len(server2.blocked or []), 200)


class LiteralTests(SynchronousTestCase):
    def test_bad_literal_sizes(self):
        """
        A literal size must be digits: {-1}, {+5}, { 5}, {5x} are BAD and
        the next command is not swallowed.
        """
        clock = Clock()
        server, transport, _ = imap_session(clock)
        for spec in (b"{-1}", b"{+5}", b"{ 5}", b"{5x}", b"{}", b"{99999999999}"):
            transport.clear()
            server.dataReceived(b"a LOGIN " + spec + b"\r\nb NOOP\r\n")
            clock.advance(0)
            lines = transport.value().split(b"\r\n")
            self.assertTrue(lines[0].startswith(b"a BAD"), (spec, lines))
            self.assertEqual(lines[1], b"b OK NOOP completed", spec)

    def test_literal_caps(self):
        """
        A string literal over the cap, or an APPEND literal over
        --max-message-size, is refused before any byte is sent (no '+').
        """
        clock = Clock()
        limits = AccessLimits(max_string_literal=100)
        server, transport, portal = imap_session(clock, limits, max_message_size=1000)
        server.dataReceived(b"a LOGIN {101}\r\n")
        self.assertTrue(transport.value().startswith(b"a BAD [TOOBIG]"), transport.value())
        transport.clear()
        server.dataReceived(b"b LOGIN {100}\r\n")
        self.assertTrue(transport.value().startswith(b"+ "), transport.value())
        server.dataReceived(b"u" * 100 + b" pw\r\n")
        self.assertEqual(len(portal.pending), 1)
        portal.pending[0].callback((None, None, None))  # whatever: the login is answered
        server.state = "auth"
        transport.clear()
        server.dataReceived(b"c APPEND INBOX {1001}\r\n")
        self.assertTrue(transport.value().startswith(b"c BAD [TOOBIG]"), transport.value())
        self.flushLoggedErrors()


class TimeoutTests(SynchronousTestCase):
    def test_imap_preauth_and_postauth(self):
        """
        60 s idle before login (Dovecot's pre-login default), 30 minutes
        after (RFC 3501 5.4); any line resets the timer.
        """
        clock = Clock()
        server, transport, portal = imap_session(clock)
        clock.advance(59)
        server.dataReceived(b"a NOOP\r\n")
        clock.advance(59)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertIn(b"* BYE Autologout", transport.value())
        self.assertTrue(transport.disconnecting)

        server, transport, portal = imap_session(clock)
        server.dataReceived(b"a LOGIN alice right\r\n")
        portal.pending[0].callback((IAccount, object(), lambda: None))
        self.assertIn(b"a OK", transport.value())
        clock.advance(29 * 60)
        self.assertFalse(transport.disconnecting)
        clock.advance(60)
        self.assertTrue(transport.disconnecting)
        clock.advance(10)
        self.assertTrue(getattr(transport, "aborted", False))  # BYE not read: cut

    def test_imap_literal_trickle(self):
        """
        Literal bytes do not reset the timer: a literal sent one byte a
        while must arrive within the timeout of its command line.
        """
        clock = Clock()
        server, transport, _ = imap_session(clock)
        server.dataReceived(b"a LOGIN {50}\r\n")
        for _ in range(7):
            clock.advance(11)
            server.dataReceived(b"z")
        self.assertTrue(transport.disconnecting)
        self.assertIn(b"* BYE Autologout", transport.value())

    def test_imap_partial_line(self):
        """
        Bytes without a line end do not reset the timer either.
        """
        clock = Clock()
        server, transport, _ = imap_session(clock)
        for _ in range(6):
            clock.advance(10)
            server.dataReceived(b"a")
        self.assertTrue(transport.disconnecting)

    def test_pop3_ten_minutes(self):
        """
        POP3: 10 minutes idle (RFC 1939 3), then -ERR and close.
        """
        clock = Clock()
        server, transport, _ = pop3_session(clock)
        clock.advance(599)
        self.assertFalse(transport.disconnecting)
        clock.advance(1)
        self.assertIn(b"-ERR Autologout", transport.value())
        self.assertTrue(transport.disconnecting)

    def test_pop3_timer_runs_during_long_operation(self):
        """
        The idle timer keeps running while a command is pending (Twisted
        stops it), so a stuck command cannot hold the session forever.
        """
        clock = Clock()
        server, transport, portal = pop3_session(clock)
        server.dataReceived(b"USER alice\r\nPASS pw\r\n")
        clock.advance(600)
        self.assertTrue(transport.disconnecting)


class FloodTests(TestCase):
    """
    Three clients send a wrong LOGIN and, in the same write, a thousand
    64 KiB lines, over real TLS: the server reads little of it, closes
    them, and serves a fourth client meanwhile.
    """

    @inlineCallbacks
    def test_login_flood(self):
        server = yield start_server(self, smtp=LISTEN, imaps=LISTEN)
        add_user(server, "alice@localhost", "alice-pw")
        context = client_context(server)
        port = server.ports["imaps"]
        factory = server.getServiceNamed("imaps").factory
        while not isinstance(factory, IMAPFactory):  # inside the connection limits and TLS
            factory = factory.wrappedFactory
        # Closed sessions are cut 1 s after their BYE (default 10 s).
        factory.limits = AccessLimits(close_grace=1.0)
        sessions = []
        closed = []
        def observer(event):
            if "invalid commands in a row" in (event.get("log_format") or ""):
                closed.append(event)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: sessions.append(build(addr)) or sessions[-1]
        total = 1000 * (len(LINE) + 2)

        def attack():
            raw = socket.create_connection(("127.0.0.1", port), 30)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.recv(1000)
            replies = []

            def read():
                try:
                    while True:
                        data = tls.recv(65536)
                        if not data:
                            break
                        replies.append(data)
                except (OSError, ssl.SSLError):
                    pass  # cut by the server

            reader = threading.Thread(target=read)
            reader.start()
            payload = b"a LOGIN alice@localhost wrong\r\n" + (LINE + b"\r\n") * 1000
            sent = 0
            try:
                view = memoryview(payload)
                while sent < len(payload):
                    sent += tls.send(view[sent:sent + 65536])
            except (OSError, ssl.SSLError):
                pass  # the server closed
            reader.join(30)
            tls.close()
            return sent, b"".join(replies)

        def well_behaved():
            raw = socket.create_connection(("127.0.0.1", port), 30)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            reader = tls.makefile("rb")
            reader.readline()
            tls.sendall(b"n NOOP\r\n")
            answer = reader.readline()
            tls.sendall(b"o LOGOUT\r\n")
            reader.read()
            tls.close()
            return answer

        attacks = [in_thread(attack) for _ in range(3)]
        answer = yield in_thread(well_behaved)
        self.assertEqual(answer, b"n OK NOOP completed\r\n")
        for d in attacks:
            sent, reply = yield d
            self.assertLess(sent, total / 4)  # most of it was never read
            self.assertIn(b"a NO", reply)
            # At most 20 invalid lines answered, then BYE; on a loaded machine
            # the cut may beat the client's reading (the RST discards what
            # it had not read yet), so the server's log line is the proof.
            self.assertLessEqual(reply.count(b"* BAD"), 20)
        for _ in range(200):
            if all(s._lost for s in sessions):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(all(s._lost for s in sessions))
        self.assertEqual(len(closed), 3)  # each attacker closed by the server


# -- malformed commands in every state -------------------------------------------------

MALFORMED_IMAP = [
    b"t", b"t FOO", b"t NOOP extra", b"t LOGIN", b"t LOGIN onlyuser", b"t LOGIN {-1}",
    b"t LOGIN {abc}", b"t LOGIN {99999999999}", b"t LOGIN {5", b't LOGIN "unterminated',
    b"t AUTHENTICATE", b"t AUTHENTICATE BOGUS", b"t SELECT", b"t SELECT &AGE-",
    b"t SELECT &", b"t SELECT {-1}", b"t EXAMINE", b"t CREATE", b"t CREATE a..b",
    b"t CREATE " + b"a" * 300, b"t CREATE &Jj-", b"t DELETE", b"t RENAME onlyone",
    b"t RENAME", b"t SUBSCRIBE", b"t UNSUBSCRIBE", b"t LIST", b"t LIST onlyref",
    b't LIST "" &Jj-', b"t LSUB", b"t STATUS", b"t STATUS INBOX",
    b"t STATUS INBOX BOGUS", b"t STATUS INBOX (BOGUS)", b"t STATUS INBOX (MESSAGES",
    b"t STATUS & (MESSAGES)", b"t APPEND", b"t APPEND INBOX", b"t APPEND INBOX {-1}",
    b"t APPEND INBOX (\\Seen) {abc}", b"t APPEND INBOX (\\Seen {5}", b"t APPEND &AGE-",
    b"t FETCH", b"t FETCH 1", b"t FETCH abc FLAGS", b"t FETCH 1 (FLAGS", b"t FETCH 1 BOGUS",
    b"t FETCH 1 BODY[", b"t FETCH 1 (BODY[]<-1.5>)", b"t FETCH 1 BODY[HEADER.FIELDS (]",
    b"t FETCH 1:* ((((((((((", b"t FETCH 0 FLAGS", b"t FETCH 1:2:3 FLAGS",
    b"t FETCH -1 FLAGS", b"t FETCH 1 (BODY[\xff])",
    b"t STORE", b"t STORE 1", b"t STORE 1 FLAGS", b"t STORE 1 BOGUS (\\Seen)",
    b"t STORE 1 +FLAGS (\\Seen", b"t STORE x +FLAGS (\\Seen)", b"t SEARCH",
    b"t SEARCH BOGUS", b"t SEARCH (ALL", b"t SEARCH ALL)", b"t SEARCH SINCE notadate",
    b"t SEARCH LARGER x", b"t SEARCH UID abc", b"t SEARCH HEADER", b"t SEARCH CHARSET",
    b"t SEARCH {-1}",
    b"t COPY", b"t COPY 1", b"t COPY x INBOX", b"t COPY 1 &Jj-",
    b"t MOVE 1", b"t UID", b"t UID FETCH", b"t UID BOGUS 1", b"t UID FETCH x FLAGS",
    b"t UID EXPUNGE", b"t UID EXPUNGE x", b"t EXPUNGE extra", b"t CLOSE extra",
    b"t UNSELECT extra", b"t IDLE extra", b"t STARTTLS extra", b"t CAPABILITY extra",
    b"t NAMESPACE extra", b"t CHECK extra", b"t LOGOUT extra", b"t \xff\xfe",
    b"t\x01 NOOP", b"+ NOOP", b"* NOOP", b't SELECT "INBOX', b"t ENABLE x",
    b"t GETQUOTAROOT INBOX", b"t.x\x7f FETCH 1 FLAGS",
]

MALFORMED_POP3 = [
    b"", b"USER", b"USER a b", b"PASS", b"CAPA x", b"STAT x", b"LIST a", b"LIST 0",
    b"LIST -1", b"LIST 1 2", b"RETR", b"RETR x", b"RETR 0", b"RETR 99", b"TOP", b"TOP 1",
    b"TOP 1 x", b"TOP 1 -1", b"DELE", b"DELE x", b"DELE 99", b"UIDL x", b"UIDL 1 2",
    b"NOOP x", b"RSET x", b"QUIT x", b"APOP", b"APOP a", b"AUTH X", b"STLS x", b"FOO",
    b"\xff", b"RETR 1.5", b"LIST 99999999999999999999", b"TOP 99999999999999999999 1",
    b"UIDL 0", b"\x00",
]

_PATH = re.compile(rb"/(tmp|work|root|home|usr|var|etc)/")


class MalformedTests(TestCase):
    """
    Every malformed command gets BAD/NO (IMAP) or -ERR (POP3), never
    exception text or a path, and the session answers the next command.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, imaps=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

        def deliver(client):
            client.sendmail("bob@remote.test", ["alice@localhost"], b"Subject: x\r\n\r\nhi\r\n")
        yield in_thread(smtp_session, self.server.ports["smtp"], deliver)

    def check_reply(self, state, line, lines):
        text = b"".join(lines)
        for bad in (b"Error", b"Traceback", b"SERVERBUG", self.server.data_dir.encode()):
            self.assertNotIn(bad, text, (state, line, lines))
        self.assertIsNone(_PATH.search(text), (state, line, lines))

    def imap_probe(self, state):
        def run():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["imaps"]), 30)
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
            reader = tls.makefile("rb")
            reader.readline()
            if state != "unauth":
                tls.sendall(b"l LOGIN alice@localhost alice-pw\r\n")
                assert reader.readline().startswith(b"l OK")
            if state == "select":
                tls.sendall(b"s SELECT INBOX\r\n")
                while not reader.readline().startswith(b"s "):
                    pass
            results = []
            for n, line in enumerate(MALFORMED_IMAP):
                probe = b"n%d NOOP\r\n" % n
                tls.sendall(line + b"\r\n" + probe)
                lines = []
                while True:
                    got = reader.readline()
                    lines.append(got)
                    if not got or got.startswith(probe[:-6]):
                        break
                results.append((line, lines))
            tls.close()
            return results
        return in_thread(run)

    @inlineCallbacks
    def test_imap_deep_search(self):
        """
        SEARCH keys nested thousands deep (NOT NOT ..., OR ALL OR ALL ...,
        parentheses and NOT mixed) in a selected folder get BAD (they got
        NO [SERVERBUG], a recursion error in the server); real nesting
        still answers, and the session goes on.
        """
        deep = [b"NOT " * 5000 + b"ALL", b"OR ALL " * 3000 + b"ALL",
                b"OR (NOT " * 300 + b"ALL" + b") ALL" * 300]

        def run():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["imaps"]), 30)
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
            reader = tls.makefile("rb")
            reader.readline()
            replies = []
            for n, line in enumerate([b"LOGIN alice@localhost alice-pw", b"SELECT INBOX"]
                                     + [b"SEARCH " + q for q in deep]
                                     + [b"SEARCH OR OR SUBJECT x FROM bob NOT (SEEN) ALL"]):
                tls.sendall(b"t%d " % n + line + b"\r\n")
                lines = []
                while not lines or not lines[-1].startswith(b"t%d " % n):
                    lines.append(reader.readline())
                replies.append(lines)
            tls.close()
            return replies

        replies = yield in_thread(run)
        for lines in replies[2:5]:
            self.check_reply("select", b"SEARCH", lines)
            self.assertEqual(lines[-1].split(b" ")[1], b"BAD", lines)
        self.assertEqual(replies[5], [b"* SEARCH 1\r\n", b"t5 OK SEARCH completed\r\n"])

    @inlineCallbacks
    def test_imap_every_state(self):
        for state in ("unauth", "auth", "select"):
            results = yield self.imap_probe(state)
            self.assertGreaterEqual(len(results), 70)
            for line, lines in results:
                self.check_reply(state, line, lines)
                self.assertTrue(lines[-1].startswith(b"n") and b" OK " in lines[-1],
                                (state, line, lines))
                answers = [x for x in lines[:-1] if x[:1] != b"+"]
                self.assertTrue(answers, (state, line, lines))
                first = answers[-1].split(b" ")
                if line.split(b" ")[1:2] in ([b"LIST"], [b"LSUB"]) and first[1] == b"OK":
                    # A pattern that is not modified UTF-7 matches no folder:
                    # an empty listing (imaptest's mutf7 group), never an error.
                    self.assertEqual(len(answers), 1, (state, line, lines))
                    continue
                self.assertIn(first[1], (b"BAD", b"NO"), (state, line, lines))

    def pop_probe(self, login):
        def run():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["pop3"]), 30)
            reader = raw.makefile("rb")
            reader.readline()
            raw.sendall(b"STLS\r\n")
            reader.readline()
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
            reader = tls.makefile("rb")
            if login:
                tls.sendall(b"USER alice@localhost\r\nPASS alice-pw\r\n")
                reader.readline()
                assert reader.readline().startswith(b"+OK")
            results = []
            for line in MALFORMED_POP3:
                tls.sendall(line + b"\r\n")
                reply = reader.readline()
                tls.sendall(b"NOOP\r\n" if login else b"CAPA\r\n")
                after = reader.readline()
                if not login:
                    while reader.readline() not in (b".\r\n", b""):
                        pass
                results.append((line, reply, after))
            tls.close()
            return results
        return in_thread(run)

    @inlineCallbacks
    def test_pop3_every_state(self):
        for login in (False, True):
            results = yield self.pop_probe(login)
            for line, reply, after in results:
                self.check_reply(login, line, [reply, after])
                self.assertTrue(reply.startswith(b"-ERR"), (login, line, reply))
                self.assertTrue(after.startswith(b"+OK"), (login, line, after))
