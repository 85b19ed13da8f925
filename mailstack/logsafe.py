# -*- test-case-name: tests.test_logsafe -*-
"""
Text from clients and remote servers, made safe to put in a log line.

Anything an attacker chooses (a HELO name, an address, a user name, a
remote server's reply, a header, a filter's reason) may hold CR, LF or
other control characters that would start a forged log line, move a
terminal's cursor or hide text.  L{safe} keeps printable text (UTF-8
included) as it is and writes everything else as an escape: C{\\xNN} for
control characters and bytes that are not UTF-8, C{\\uNNNN} for other
non-printable characters (such as U+202E, which reverses the text after
it), and a backslash as C{\\\\}, so an escape in the log always means the
client sent that character.
"""

from __future__ import annotations

__all__ = ["safe"]


def _escape_char(ch: str) -> str:
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(value: object, limit: int | None = None) -> str:
    """
    C{value} (text, bytes or anything with a C{str}) as one line of
    printable text, at most C{limit} characters of it kept (then C{...}).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        text = bytes(value).decode("utf-8", "surrogateescape")
    else:
        text = str(value)
    truncated = limit is not None and len(text) > limit
    if truncated:
        text = text[:limit]
    if not (text.isprintable() and "\\" not in text):
        text = "".join(
            "\\\\" if ch == "\\" else ch if ch.isprintable() else _escape_char(ch)
            for ch in text
        )
    return text + "..." if truncated else text
