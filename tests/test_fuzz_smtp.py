"""
Property-based tests (hypothesis) for the SMTP parsers an attacker reaches:
paths and ESMTP parameters, the DATA reader, the session as a whole, and
the SMTP client's reply parser.  Each property: no exception but the
protocol's own errors, no desync whatever the chunking, bounded buffers.
Example counts are moderate so the module runs in a few seconds.
"""

import io

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import AddressError, parse_path
from mailstack.smtp.client import (
    MAX_REPLY_LINE,
    DotStuffer,
    SMTPClientError,
    SMTPClientProtocol,
    Timeouts,
    Transaction,
    send_transaction,
)
from mailstack.smtp.data import MAX_TEXT_LINE, DataReader
from mailstack.smtp.reply import SMTPError
from mailstack.smtp.server import (
    MAX_AUTH_LINE,
    ServerSettings,
    SMTPServerFactory,
    parse_params,
    split_path,
)
from tests import test_smtp_server as base

FUZZ = settings(max_examples=100, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# Pieces that matter to these parsers, mixed with arbitrary text.
_ADDRESS_PIECES = st.sampled_from(
    ["<", ">", "@", '"', "\\", " ", ":", ",", ".", "[", "]", "%", "!", "=", "a", "xn--",
     "IPv6:", "::1", "127.0.0.1", "é", "\x00", "\r", "\n", "\t", "SIZE=", "BODY=8BITMIME"])
ADDRESSY = st.lists(_ADDRESS_PIECES | st.text(max_size=8), max_size=30).map("".join)
_DATA_PIECES = st.sampled_from(
    [b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b"\r\n.", b".\r\n", b"\n.\n", b"\0", b"x",
     b"Subject: s", b"y" * 600, b"\xff"])
DATA = st.lists(_DATA_PIECES | st.binary(max_size=20), max_size=40).map(b"".join)


def chunked(data, cuts):
    """
    C{data} cut at the (sorted, deduplicated) positions in C{cuts}.
    """
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points + [len(data)]:
        pieces.append(data[start:point])
        start = point
    return pieces


class PathAndParameterTests(SynchronousTestCase):
    @FUZZ
    @given(ADDRESSY)
    def test_parse_path(self, text):
        """
        A path parses to an address or the null path, or raises
        AddressError; a parsed address holds no space, control character
        or angle bracket, and prints back to something that parses the
        same.
        """
        try:
            address = parse_path(text)
        except AddressError:
            return
        if address is None:
            return
        printed = str(address)
        self.assertFalse(any(ord(c) < 32 or c == "\x7f" for c in printed), printed)
        self.assertEqual(parse_path(f"<{printed}>"), address)

    @FUZZ
    @given(ADDRESSY)
    def test_split_path_and_params(self, text):
        """
        C{MAIL FROM:} arguments split into a path and parameters, or raise
        the protocol's errors; parameter keys are uppercased tokens.
        """
        try:
            path, rest = split_path(text)
            params = parse_params(rest)
        except (AddressError, SMTPError):
            return
        self.assertTrue(path.startswith("<") and path.endswith(">"))
        for key in params:
            self.assertEqual(key, key.upper())
            self.assertNotIn(" ", key)


class DataReaderTests(SynchronousTestCase):
    def read(self, pieces, max_size=10**6):
        stored = []
        reader = DataReader(stored.append, max_size)
        rest = None
        for i, piece in enumerate(pieces):
            rest = reader.feed(piece)
            self.assertLessEqual(len(reader._buffer), MAX_TEXT_LINE + 1)
            if rest is not None:
                rest += b"".join(pieces[i + 1:])
                break
        if rest is None:
            return None  # not ended: what is held back depends on the cuts
        # What was stored of a rejected message is thrown away: not compared.
        content = b"".join(stored) if reader.rejection is None else None
        return content, rest, reader.rejection, reader.size

    @FUZZ
    @given(DATA, st.lists(st.integers(min_value=0, max_value=10**4), max_size=8))
    def test_chunking_never_matters(self, data, cuts):
        """
        However the stream is cut into reads, whether and where DATA ends,
        what follows it, the stored content and the verdict are the same;
        the reader never holds more than one line.
        """
        self.assertEqual(self.read(chunked(data, cuts)), self.read([data]))

    @FUZZ
    @given(DATA, st.binary(max_size=50))
    def test_only_crlf_dot_crlf_ends(self, content, tail):
        """
        Content stuffed by our client then ended with CRLF.CRLF: the reader
        ends exactly there, hands back the tail untouched, and (the content
        being normalised by the stuffer) accepts it unless a line is too
        long, it has a NUL, or it is too big.
        """
        stuffer = DotStuffer()
        wire = stuffer(content) + stuffer.finish()
        stored, rest, rejection, _ = self.read([wire + tail])
        self.assertEqual(rest, tail)
        if rejection is None:
            self.assertEqual(stored, content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
                             + (b"" if not content or content.endswith((b"\n", b"\r")) else b"\n"))
        if rejection is not None:
            self.assertNotIn("bare CR", rejection[2])

    @FUZZ
    @given(DATA)
    def test_bare_terminators_do_not_end(self, data):
        """
        Without a CRLF.CRLF in the stream (and not starting with .CRLF),
        DATA never ends, whatever bare CR/LF dots it holds.
        """
        if b"\r\n.\r\n" in data or data.startswith(b".\r\n"):
            return
        self.assertIsNone(self.read([data]))


class SessionFuzzTests(SynchronousTestCase):
    """
    Arbitrary bytes at a session: no internal error, every reply a proper
    reply line, bounded buffer.
    """

    @FUZZ
    @given(st.lists(st.sampled_from([
        b"EHLO c.test\r\n", b"HELO x\r\n", b"MAIL FROM:", b"RCPT TO:", b"<a@mx.test>",
        b"<>", b" SIZE=10", b" BODY=8BITMIME", b" X=", b"DATA\r\n", b"RSET\r\n",
        b"NOOP\r\n", b"\r\n", b"\n", b"\r", b".\r\n", b"\r\n.\r\n", b"\0", b"AUTH PLAIN\r\n",
        b"STARTTLS\r\n", b"BDAT 1\r\n", b"\xff", b"z" * 700, b"QUIT\r\n"]) | st.binary(max_size=30),
        max_size=30), st.lists(st.integers(min_value=0, max_value=10**4), max_size=5))
    def test_no_internal_error(self, pieces, cuts):
        clock = Clock()
        policy = base.ScriptedPolicy()
        factory = SMTPServerFactory(policy, ServerSettings("mx.test", 10**5), clock,
                                    tls=lambda: "TLS-CONTEXT")
        transport = base.TLSStringTransport()
        proto = factory.buildProtocol(None)
        proto.makeConnection(transport)
        for piece in chunked(b"".join(pieces), cuts):
            proto.dataReceived(piece)
            self.assertLessEqual(len(proto._buffer), max(MAX_AUTH_LINE, len(piece)) + 1)
        out = transport.value()
        self.assertNotIn(b"internal error", out)
        for line in out.split(b"\r\n")[:-1]:
            self.assertRegex(line, rb"^[2-5][0-9][0-9][ -]")
        self.assertTrue(out.endswith(b"\r\n"))


class ReplyParserTests(SynchronousTestCase):
    def replies(self, pieces):
        """
        Feed a client protocol; return the replies it made of the input
        and whether it gave up (only ever with SMTPClientError).
        """
        proto = SMTPClientProtocol(Clock())
        transport = StringTransport()
        proto.makeConnection(transport)
        for piece in pieces:
            if transport.disconnecting:
                break
            proto.dataReceived(piece)
            self.assertLessEqual(len(proto._buffer), MAX_REPLY_LINE + len(piece))
        failed = proto._lost is not None
        if failed:
            self.assertIsInstance(proto._lost.value, SMTPClientError)
        return [tuple(r) for r in proto._replies], failed

    @FUZZ
    @given(st.lists(st.sampled_from([
        b"220 ", b"250-", b"250 ", b"354 ", b"421 4.7.0 ", b"5.1.1 ", b"\r\n", b"\n", b"\r",
        b"ok", b"\x00", b"\xff", b"9999", b"x" * 3000]) | st.binary(max_size=20), max_size=40),
        st.lists(st.integers(min_value=0, max_value=10**4), max_size=6))
    def test_chunking_never_matters(self, pieces, cuts):
        """
        Arbitrary server output gives the same replies however it is cut,
        or the same failure; never another exception.
        """
        data = b"".join(pieces)
        self.assertEqual(self.replies(chunked(data, cuts)), self.replies([data]))

    @FUZZ
    @given(st.binary(max_size=300))
    def test_dialog_never_raises_else(self, garbage):
        """
        A whole transaction against a server that answers garbage ends in a
        result or SMTPClientError, nothing else.
        """
        proto = SMTPClientProtocol(Clock())
        transport = StringTransport()
        proto.makeConnection(transport)
        content = b"Subject: x\n\nhi\n"
        d = ensureDeferred(send_transaction(
            proto, "me.test", Transaction("a@b.test", ["c@d.test"], io.BytesIO(content),
                                          len(content)), timeouts=Timeouts()))
        proto.dataReceived(garbage)
        proto.connectionLost()
        failures = []
        d.addErrback(failures.append)
        self.assertEqual(len(failures), 1)  # the server never said enough to succeed
        self.assertIsNotNone(failures[0].check(SMTPClientError, ConnectionDone), failures[0])
