"""
SMTP replies: a code, an enhanced status code (RFC 3463) and text.
"""

from __future__ import annotations

from typing import NamedTuple


class Reply(NamedTuple):
    """
    One SMTP reply; text with newlines becomes a multi-line reply.
    """

    code: int
    enhanced: str
    text: str

    def encode(self) -> bytes:
        lines = self.text.split("\n") or [""]
        out = []
        for i, line in enumerate(lines):
            sep = "-" if i < len(lines) - 1 else " "
            status = f"{self.enhanced} " if self.enhanced else ""
            out.append(f"{self.code}{sep}{status}{line}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def is_error(self) -> bool:
        return self.code >= 400

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}".replace("  ", " ")


class SMTPError(Exception):
    """
    Raised by a policy or agent to answer with a specific reply.
    """

    def __init__(self, code: int, enhanced: str, text: str) -> None:
        super().__init__(f"{code} {enhanced} {text}")
        self.reply = Reply(code, enhanced, text)
