"""
Property tests (hypothesis) for the parsers a client reaches on IMAP and
the MIME splitter a sender reaches through any mail: whatever comes in,
no exception escapes but the protocol's own answers, the session stays in
step (it answers the next NOOP), and the work stays bounded.
"""

import os
import re

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import maybeDeferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailstack.access import mime
from mailstack.access.imap import IMAPFactory
from mailstack.access.limits import AccessLimits
from mailstack.access.mailbox import MaildirAccount
from mailstack.access.mime import Part
from mailstack.throttle import LoginThrottle
from tests.support import short_tempdir

FUZZ = settings(max_examples=60, deadline=None,
                suppress_health_check=[HealthCheck.too_slow,
                                       HealthCheck.function_scoped_fixture])

COMMANDS = [b"NOOP", b"CAPABILITY", b"LOGIN", b"AUTHENTICATE", b"SELECT", b"EXAMINE",
            b"CREATE", b"DELETE", b"RENAME", b"SUBSCRIBE", b"LIST", b"LSUB", b"STATUS",
            b"APPEND", b"FETCH", b"STORE", b"SEARCH", b"COPY", b"MOVE", b"UID", b"EXPUNGE",
            b"CLOSE", b"UNSELECT", b"CHECK", b"NAMESPACE", b"ID", b"STARTTLS", b"FROB"]

atom = st.sampled_from([b"INBOX", b"1", b"1:*", b"*", b"2,4:7", b"0", b"-1", b"FLAGS",
                        b"BODY[]", b"BODY.PEEK[1.2.MIME]", b"BODY[HEADER.FIELDS (TO)]",
                        b"BODY[]<0.10>", b"ALL", b"UID", b"\\Seen", b"+FLAGS", b"Sent",
                        b"&AGE-", b"&Jjo-", b"a.b", b"%", b"NIL", b"OR", b"NOT", b"SINCE",
                        b"1-Jan-2020", b"CHARSET", b"UTF-8", b"(", b")", b"[", b"]"])
literal = st.builds(lambda n: b"{%s}" % n, st.sampled_from(
    [b"0", b"3", b"-1", b"+2", b"99999999999", b"x", b"", b" 4"]))
quoted = st.binary(max_size=12).map(lambda b: b'"' + b.replace(b"\r", b"").replace(
    b"\n", b"") + b'"')
junk = st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
token = st.one_of(atom, literal, quoted, junk)


@st.composite
def nested(draw, depth=0):
    """
    A parenthesised list, nested a few levels, possibly unbalanced.
    """
    items = draw(st.lists(token if depth > 2 else st.one_of(token, nested(depth + 1)),
                          max_size=4))
    close = b")" if draw(st.booleans()) or depth else b""
    return b"(" + b" ".join(items) + close


@st.composite
def command_lines(draw):
    tag = draw(st.sampled_from([b"a1", b"*", b"+", b"x" * 70, b"t.2", b""]))
    command = draw(st.sampled_from(COMMANDS))
    args = draw(st.lists(st.one_of(token, nested()), max_size=5))
    line = b" ".join([tag, command] + args)
    if draw(st.booleans()):  # data behind a literal, as a client would send it
        line += b"\r\n" + draw(junk)
    return line


class SyncAccount(MaildirAccount):
    """
    The real account, its file work run at once (no threads in a fuzz run).
    """

    def run(self, f, *args):
        return maybeDeferred(f, *args)


class RefusingPortal:
    def login(self, credentials, mind, *interfaces):
        from twisted.cred.error import UnauthorizedLogin
        return maybeDeferred(lambda: (_ for _ in ()).throw(UnauthorizedLogin()))


class IMAPParserFuzz(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.join(short_tempdir(self), "localhost", "alice")
        os.makedirs(self.root)
        self.account = SyncAccount(self.root, "localhost", None, None)
        self.account.prepare()
        folder = self.account.folder("INBOX")
        folder.add(b"Subject: one\nContent-Type: multipart/mixed; boundary=b\n\n--b\n\nx\n--b--\n",
                   set())
        folder.add(b"Subject: two\n\nbody\n", set())

    def session(self, state):
        clock = Clock()
        factory = IMAPFactory(RefusingPortal(), clock, LoginThrottle(clock), None, 1000,
                              implicit_tls=True, limits=AccessLimits(max_bad_commands=10**6))
        server = factory.buildProtocol(None)
        transport = StringTransport()
        server.makeConnection(transport)
        if state != "unauth":
            server.account = self.account
            server.state = "auth"
            server.setTimeout(server.POSTAUTH_TIMEOUT)
        if state == "select":
            server.dataReceived(b"s SELECT INBOX\r\n")
            assert b"s OK" in transport.value(), transport.value()
        transport.clear()
        return server, transport, clock

    def check(self, state, lines):
        server, transport, clock = self.session(state)
        for line in lines:
            server.dataReceived(line + b"\r\n")
        clock.advance(17)  # throttle delays of refused logins
        if server.parseState == "pending":  # a literal still owed: finish it
            server.dataReceived(b"x" * 70000 + b"\r\n")
        if server.parseState == "idle":
            server.dataReceived(b"DONE\r\n")
        out = transport.value()
        self.assertLess(len(out), 1 << 20)
        for bad in (b"Traceback", b"Error", b"SERVERBUG", self.root.encode()):
            self.assertNotIn(bad, out)
        if not transport.disconnecting:
            transport.clear()
            server.dataReceived(b"zz NOOP\r\n")
            clock.advance(0)
            self.assertIn(b"zz OK", transport.value(), lines)
        self.assertEqual(self.flushLoggedErrors(), [])
        server.connectionLost(None)

    @FUZZ
    @given(st.lists(command_lines(), min_size=1, max_size=4))
    def test_unauthenticated(self, lines):
        self.check("unauth", lines)

    @FUZZ
    @given(st.lists(command_lines(), min_size=1, max_size=4))
    def test_authenticated(self, lines):
        self.check("auth", lines)

    @FUZZ
    @given(st.lists(command_lines(), min_size=1, max_size=4))
    def test_selected(self, lines):
        self.check("select", lines)


# -- the MIME splitter --------------------------------------------------------------

@st.composite
def entities(draw, depth=0):
    kind = draw(st.sampled_from(["leaf", "multipart", "message"] if depth < 6 else ["leaf"]))
    extra = draw(st.sampled_from([b"", b"Content-Transfer-Encoding: base64\r\n",
                                  b"Content-Disposition: attachment; filename*=utf-8''%E2\r\n",
                                  b"To: a@b, \"x, y\" <c@d>, ;;, <>\r\n", b"X: \xff\xfe\r\n"]))
    if kind == "leaf":
        body = draw(st.binary(max_size=40))
        return b"Content-Type: text/plain\r\n" + extra + b"\r\n" + body
    if kind == "message":
        return (b"Content-Type: message/rfc822\r\n" + extra + b"\r\n"
                + draw(entities(depth + 1)))
    boundary = draw(st.sampled_from([b"b", b"b-", b"==x", b"a b", b"--"]))
    children = draw(st.lists(entities(depth + 1), max_size=4))
    body = b"".join(b"--" + boundary + b"\r\n" + child + b"\r\n" for child in children)
    if draw(st.booleans()):
        body += b"--" + boundary + b"--\r\n"
    return (b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n' + extra
            + b"\r\n" + draw(st.binary(max_size=10)) + b"\r\n" + body)


class MIMEFuzz(SynchronousTestCase):
    def setUp(self):
        # Small limits, so the examples reach them.
        self.patch(mime, "MAX_MIME_PARTS", 12)
        self.patch(mime, "MAX_MIME_DEPTH", 3)

    def exercise(self, raw):
        part = Part(raw).parse_all()
        self.assertLessEqual(part.budget.parts, 13)
        depth = 0
        stack = [(part, 0)]
        while stack:
            node, level = stack.pop()
            depth = max(depth, level)
            stack.extend((child, level + 1) for child in node.children())
        self.assertLessEqual(depth, 4)
        structure = part.bodystructure(True)
        self.assertTrue(structure.startswith(b"(") and structure.endswith(b")"))
        part.bodystructure(False)
        part.envelope()
        for numbers in ((), (1,), (2,), (1, 1), (1, 2, 1), (3, 1, 1, 1)):
            for kind in ("", "MIME", "TEXT", "HEADER", "HEADER.FIELDS"):
                if kind == "MIME" and not numbers:
                    continue
                self.assertIsInstance(part.section(numbers, kind, [b"to"]), bytes)

    @settings(max_examples=100, deadline=None)
    @given(entities())
    def test_structured(self, raw):
        self.exercise(raw)

    def test_damaged_rfc2231_charset(self):
        """
        An RFC 2231 parameter whose charset Python cannot use (damaged by a
        control character, or with a NUL) renders in BODYSTRUCTURE, as found
        by test_damaged: the decoded value instead of the encoded one.
        """
        for charset in (b"utf-8\x01", b"utf-8\x00"):
            raw = (b"Content-Type: text/plain\r\nContent-Disposition: attachment; "
                   b"filename*=" + charset + b"''%E2\r\n\r\n")
            self.exercise(raw)
            self.assertIn(b'("FILENAME" ', Part(raw).bodystructure(True))

    @settings(max_examples=100, deadline=None)
    @given(entities(), st.integers(min_value=0, max_value=400), st.binary(max_size=20))
    @example(b"Content-Type: message/rfc822\r\nContent-Disposition: attachment; "
             b"filename*=utf-8''%E2\r\n\r\nContent-Type: text/plain\r\n\r\n", 73, b".")
    @example(b"Content-Type: message/rfc822\r\nContent-Disposition: attachment; "
             b"filename*=utf-8''%E2\r\n\r\nContent-Type: text/plain\r\n\r\n", 73, b"\x00")
    def test_damaged(self, raw, cut, noise):
        self.exercise(raw[:cut] + noise + raw[cut:])

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=300))
    def test_bytes(self, raw):
        self.exercise(re.sub(rb"\r?\n", b"\r\n", raw))
