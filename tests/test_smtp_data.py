"""
Tests for L{mailstack.smtp.data}: where a message ends, and what is stored.
"""

from twisted.trial.unittest import SynchronousTestCase

from mailstack.smtp.data import DataReader


def feed_all(data, chunks, max_size=10**6):
    """
    Feed C{data} cut into pieces at C{chunks} (a list of sizes, repeated);
    return (stored content, leftover after the terminator or None, reader).
    """
    stored = []
    reader = DataReader(stored.append, max_size)
    rest = None
    i = 0
    step = 0
    while i < len(data):
        size = chunks[step % len(chunks)]
        step += 1
        rest = reader.feed(data[i : i + size])
        i += size
        if rest is not None:
            rest += data[i:]
            break
    return b"".join(stored), rest, reader


class DataReaderTests(SynchronousTestCase):
    """
    The reader gives the same answer however the bytes are cut into packets.
    """

    def assertSame(self, data, expected_content, expected_rest):
        for chunks in ([len(data)], [1], [2], [3], [7], [1000], [1, 5, 2]):
            content, rest, reader = feed_all(data, chunks)
            self.assertEqual(rest, expected_rest, f"chunks {chunks}")
            if expected_rest is not None and reader.rejection is None:
                self.assertEqual(content, expected_content, f"chunks {chunks}")
        return reader

    def test_simple(self):
        """
        Lines are stored with LF endings; CRLF.CRLF ends the message and
        what follows is returned for the command parser.
        """
        self.assertSame(b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n",
                        b"Subject: x\n\nbody\n", b"QUIT\r\n")

    def test_empty_message(self):
        """
        A terminator right away is an empty message.
        """
        self.assertSame(b".\r\nNOOP\r\n", b"", b"NOOP\r\n")

    def test_dot_unstuffing(self):
        """
        A leading dot is removed from each line that has one (RFC 5321 4.5.2).
        """
        self.assertSame(b"..\r\n..x\r\n.y\r\nz.\r\n...\r\n.\r\n",
                        b".\n.x\ny\nz.\n..\n", b"")

    def test_8bit(self):
        """
        8-bit bytes are kept as they are.
        """
        body = "Grüße, 日本\r\n".encode("utf-8")
        self.assertSame(body + b".\r\n", body.replace(b"\r\n", b"\n"), b"")

    def test_lone_lf_dot_does_not_end(self):
        """
        C{LF . LF}, C{CRLF . LF} and C{LF . CRLF} never end DATA, and the
        message is refused for its bare LF (no SMTP smuggling).
        """
        for smuggle in (b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n", b"\r\n.\r"):
            data = (b"Subject: x\r\n\r\nhello" + smuggle +
                    b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<victim@localhost>\r\n"
                    b"DATA\r\nsmuggled\r\n.\r\nNOOP\r\n")
            reader = self.assertSame(data, None, b"NOOP\r\n")
            self.assertEqual(reader.rejection[:2], (550, "5.6.0"), smuggle)

    def test_incomplete(self):
        """
        Without the terminator the message goes on.
        """
        content, rest, reader = feed_all(b"a\r\nb\r\n.", [1])
        self.assertIsNone(rest)

    def test_long_line_rejected_and_bounded(self):
        """
        A text line over 1000 octets marks the message bad, the reader keeps
        no more than a line of it, and the dot at the real end still ends it.
        """
        data = b"a" * 998 + b"\r\n" + b"b" * 999 + b"\r\n.\r\nNOOP\r\n"
        reader = self.assertSame(data, None, b"NOOP\r\n")
        self.assertEqual(reader.rejection[:2], (500, "5.5.2"))
        reader = DataReader(lambda _: None, 10**9)
        for _ in range(1000):
            self.assertIsNone(reader.feed(b"x" * 1000))
        self.assertLess(len(reader._buffer), 1001)
        self.assertEqual(reader.feed(b"\r\n.\r\n"), b"")

    def test_long_line_tail_is_not_a_terminator(self):
        """
        When an over-long line is dropped as it arrives, its tail is not the
        start of a line, so a tail of C{.CRLF} does not end the message.
        """
        reader = DataReader(lambda _: None, 10**9)
        self.assertIsNone(reader.feed(b"x" * 2000))
        self.assertIsNone(reader.feed(b".\r\nMAIL FROM:<evil@example.com>\r\n"))
        self.assertEqual(reader.feed(b".\r\nQUIT\r\n"), b"QUIT\r\n")

    def test_dropped_long_line_still_judged(self):
        """
        A NUL or a bare CR inside the part of an over-long line that is
        dropped as it arrives gets the same verdict as when the whole line
        arrives in one read (found by the chunking fuzz test).
        """
        for middle in (b"\0", b"\rz"):
            data = b"a" * 500 + middle + b"a" * 700 + b"\r\n.\r\n"
            whole = DataReader(lambda _: None, 10**9)
            self.assertEqual(whole.feed(data), b"")
            cut = DataReader(lambda _: None, 10**9)
            self.assertIsNone(cut.feed(data[:1100]))
            self.assertEqual(cut.feed(data[1100:]), b"")
            self.assertEqual(whole.rejection[:2], (550, "5.6.0"))
            self.assertEqual(cut.rejection, whole.rejection)

    def test_exactly_1000_octets(self):
        """
        998 characters and CRLF is the longest allowed line.
        """
        reader = self.assertSame(b"a" * 998 + b"\r\n.\r\n", b"a" * 998 + b"\n", b"")
        self.assertIsNone(reader.rejection)

    def test_too_big(self):
        """
        Past C{max_size} the message is refused with 552 5.3.4, but read to
        its end so the session stays in step.
        """
        content, rest, reader = feed_all(b"x" * 100 + b"\r\n" + b"y" * 100 + b"\r\n.\r\n",
                                         [7], max_size=150)
        self.assertEqual(rest, b"")
        self.assertEqual(reader.rejection[:2], (552, "5.3.4"))

    def test_nul(self):
        """
        A NUL byte makes the message refused.
        """
        content, rest, reader = feed_all(b"a\0b\r\n.\r\n", [100])
        self.assertEqual(reader.rejection[:2], (550, "5.6.0"))
