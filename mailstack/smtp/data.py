# -*- test-case-name: tests.test_smtp_data -*-
"""
The DATA reader: turns the bytes after C{354} into stored content.

It works on whole blocks of complete lines, not line by line, for speed,
and it is the single place that decides where a message ends:

  - only C{CRLF . CRLF} ends DATA.  A C{.} line after a bare LF, a C{.}
    followed by a bare LF, or the tail of an over-long line that happens to
    be C{.} never does (no SMTP smuggling);
  - lines are dot-unstuffed and stored with LF endings;
  - bare CR, bare LF and NUL mark the message bad (rejected after the end,
    so client and server stay in step); so do text lines over 1000 octets
    and more than C{max_size} octets.  Memory stays bounded whatever the
    client sends: an over-long line is dropped as it arrives.
"""

from __future__ import annotations

from typing import Callable

MAX_TEXT_LINE = 1000  # octets, with CRLF (RFC 5321 4.5.3.1.6)


class DataReader:
    """
    Feed it bytes; it writes content to C{sink} and tells when DATA ended.
    """

    def __init__(self, sink: Callable[[bytes], None], max_size: int) -> None:
        self._sink = sink
        self._max_size = max_size
        self._buffer = b""
        # Whether the next byte starts a line that follows a CRLF: only such
        # a line can be the terminating dot.
        self._after_crlf = True
        self._at_line_start = True
        self.size = 0
        self.too_big = False
        self.line_too_long = False
        self.bare_newline = False
        self.nul = False

    def feed(self, data: bytes) -> bytes | None:
        """
        Consume C{data}.  Return C{None} while the message goes on, or the
        bytes that followed the terminating dot (the next commands).
        """
        buffer = self._buffer + data if self._buffer else data
        end = buffer.rfind(b"\n")
        if end < 0:
            self._buffer = self._hold(buffer)
            return None
        block, rest = buffer[: end + 1], buffer[end + 1 :]
        found = self._find_terminator(block)
        if found is None:
            self._consume(block)
            self._buffer = self._hold(rest)
            return None
        start, after = found
        self._consume(block[:start])
        self._buffer = b""
        return block[after:] + rest

    def _hold(self, partial: bytes) -> bytes:
        """
        Keep an incomplete line, unless it is already too long: then drop it
        (keeping its last byte, which may be the CR of a CRLF).
        """
        if len(partial) >= MAX_TEXT_LINE:
            self.line_too_long = True
            # What is dropped is still judged, so the verdict does not
            # depend on how the client's bytes were cut into reads.
            if b"\0" in partial:
                self.nul = True
            if b"\r" in partial[:-1]:  # a CR not followed by LF: bare
                self.bare_newline = True
            self._at_line_start = False
            self._after_crlf = False
            self._count(len(partial) - 1)
            return partial[-1:]
        return partial

    def _find_terminator(self, block: bytes) -> tuple[int, int] | None:
        """
        Where C{.CRLF} starts and ends in C{block}, if it follows a CRLF.
        """
        if self._after_crlf and self._at_line_start and block.startswith(b".\r\n"):
            return 0, 3
        index = block.find(b"\r\n.\r\n")
        if index < 0:
            return None
        return index + 2, index + 5

    def _count(self, n: int) -> None:
        self.size += n
        if self.size > self._max_size:
            self.too_big = True

    def _consume(self, block: bytes) -> None:
        """
        Check and store a block of complete lines (each ends with LF).
        """
        if not block:
            return
        self._count(len(block))
        crlf = block.count(b"\r\n")
        if block.count(b"\n") != crlf or block.count(b"\r") != crlf:
            self.bare_newline = True
        if b"\0" in block:
            self.nul = True
        # Each line of the split keeps its CR, so text + CR may be 999 octets.
        if len(block) >= MAX_TEXT_LINE and not self.line_too_long:
            if max(map(len, block.split(b"\n"))) > MAX_TEXT_LINE - 1:
                self.line_too_long = True
        self._after_crlf = block.endswith(b"\r\n")
        self._at_line_start = True
        if self.too_big or self.bare_newline or self.nul or self.line_too_long:
            return  # rejected anyway: don't store it
        if block.startswith(b"."):
            block = block[1:]
        block = block.replace(b"\r\n.", b"\r\n").replace(b"\r\n", b"\n")
        self._sink(block)

    @property
    def rejection(self) -> tuple[int, str, str] | None:
        """
        The reply for a bad message, or C{None} if it may be delivered.
        """
        if self.too_big:
            return 552, "5.3.4", "Message size exceeds fixed maximum message size"
        if self.nul:
            return 550, "5.6.0", "Message contains NUL characters"
        if self.bare_newline:
            return 550, "5.6.0", "Message contains bare CR or LF characters (RFC 5321 2.3.8)"
        if self.line_too_long:
            return 500, "5.5.2", "Message contains a line longer than 1000 octets"
        return None
