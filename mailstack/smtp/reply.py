"""
SMTP replies: a code, an enhanced status code (RFC 3463) and text.
"""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    """
    One SMTP reply; text with newlines becomes a multi-line reply.  A
    plugin refuses with one (a 4xx code defers, 5xx refuses for good), e.g.
    C{Reply(554, "5.7.1", "message refused as spam")}, and a delivery
    agent answers each recipient with one.

    @ivar code: the three-digit reply code (RFC 5321 4.2).
    @ivar enhanced: the enhanced status code (RFC 3463), e.g. C{"5.7.1"},
        or C{""} for none.
    @ivar text: the human-readable text; never put an exception's text
        or a server path in it.
    """

    code: int
    enhanced: str
    text: str

    def encode(self) -> bytes:
        """
        The reply as sent: one CRLF line per line of C{text}, all but the
        last with C{-} after the code.
        """
        lines = self.text.split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            status = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{status}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def is_error(self) -> bool:
        """
        Whether it is a 4xx or 5xx reply.
        """
        return self.code >= 400

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class SMTPError(Exception):
    """
    Raised by a policy or filter to answer with a specific reply.

    @ivar reply: the L{Reply} to answer with.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        """
        @param code: the reply code.
        @param enhanced: the enhanced status code, or C{""}.
        @param text: the reply text.
        """
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, enhanced, text)
