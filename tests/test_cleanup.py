"""
Tests for L{mailstack.delivery.cleanup}: content that did not come through
SMTP DATA is normalised before it is stored or relayed.
"""

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.delivery.cleanup import MAX_LINE, normalize


class NormalizeTests(SynchronousTestCase):
    def test_line_endings(self):
        """
        CRLF and a lone CR end a line like LF does.
        """
        self.assertEqual(normalize(b"a\r\nb\rc\nd\r\r\ne\r"), b"a\nb\nc\nd\n\ne\n")

    def test_nul_removed(self):
        self.assertEqual(normalize(b"a\x00b\n\x00"), b"ab\n")

    def test_long_lines_folded(self):
        """
        A line over 998 octets is folded into continuation lines, none over
        998 octets; nothing is lost but the inserted spaces.
        """
        line = bytes(range(33, 127)) * 40
        out = normalize(b"short\n" + line + b"\nend\n")
        lines = out.split(b"\n")
        self.assertEqual(lines[0], b"short")
        self.assertTrue(all(len(part) <= MAX_LINE for part in lines))
        self.assertTrue(all(part.startswith(b" ") for part in lines[2:-2]))
        self.assertEqual(lines[1] + b"".join(part[1:] for part in lines[2:-2]), line)
        self.assertEqual(lines[-2:], [b"end", b""])

    def test_clean_content_unchanged(self):
        content = b"Subject: x\n\nline\n.dot\n" + b"y" * MAX_LINE + b"\n"
        self.assertIs(normalize(content), content)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=3000) | st.lists(
        st.sampled_from([b"\r", b"\n", b"\r\n", b"\0", b".", b"a", b"x" * 700]),
        max_size=20).map(b"".join))
    def test_property(self, content):
        """
        Whatever the input: no CR, no NUL, no line over 998 octets, and
        normalising again changes nothing.
        """
        out = normalize(content)
        self.assertNotIn(b"\r", out)
        self.assertNotIn(b"\0", out)
        self.assertTrue(all(len(line) <= MAX_LINE for line in out.split(b"\n")))
        self.assertEqual(normalize(out), out)
