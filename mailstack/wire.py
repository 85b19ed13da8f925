# -*- test-case-name: tests.test_smtp_client,tests.test_pop3 -*-
"""
The wire format SMTP and POP3 share for a message: LF-terminated stored
content goes out with CRLF line ends and every line-initial dot doubled,
ended by C{.} on a line of its own (RFC 5321 4.5.2, RFC 1939 3).

The SMTP client (L{mailstack.smtp.client}) and the POP3 server
(L{mailstack.access.pop3}) both send content through L{DotStuffer}, so
the rules live in one place.
"""

from __future__ import annotations


class DotStuffer:
    """
    Turns LF-terminated content into DATA: CRLF line endings, a dot doubled
    at the start of every line, however the content is cut into chunks.

    Whatever is in the queue, no bare CR or LF ever goes out: a CRLF or a
    lone CR in the content ends a line like an LF does (so a C{\\r.\\r}
    cannot end DATA early at a receiver that takes a bare CR as a line
    end: outbound smuggling).
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._cr = False  # the last chunk ended with a CR: maybe half a CRLF

    def __call__(self, chunk: bytes) -> bytes:
        if self._cr:
            chunk = b"\r" + chunk
            self._cr = False
        if chunk.endswith(b"\r"):
            chunk = chunk[:-1]
            self._cr = True
        if b"\r" in chunk:
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if not chunk:
            return b""
        out = chunk.replace(b"\n.", b"\n..")
        if self.at_line_start and out.startswith(b"."):
            out = b"." + out
        self.at_line_start = chunk.endswith(b"\n")
        return out.replace(b"\n", b"\r\n")

    def finish(self) -> bytes:
        """
        The end of DATA, with the CRLF the last line may lack.
        """
        out = b""
        if self._cr:
            self._cr = False
            out = self(b"\n")
        return out + (b"" if self.at_line_start else b"\r\n") + b".\r\n"
