# -*- test-case-name: tests.test_mailauth_dkim -*-
"""
A message's header section read in linear time, as dkimpy reads it (its
own parser is quadratic): for DKIM (L{mailstack.mailauth.dkim}) and DMARC's
From domain (L{mailstack.mailauth.dmarc}) alike.
"""

from __future__ import annotations

import re

import dkim

_FIELD_NAME = re.compile(rb"([\x21-\x7e]+?):")


def header_end(message: bytes) -> int:
    """
    Where the header section of C{message} (LF or CRLF) ends: the offset
    of the line end before the empty line, or C{len(message)}.
    """
    if message.startswith((b"\n", b"\r\n")):
        return 0
    ends = [i for i in (message.find(b"\n\n"), message.find(b"\n\r\n")) if i >= 0]
    end = min(ends) if ends else len(message)
    return end - 1 if end and message[end - 1:end] == b"\r" else end


def parse_header(message: bytes) -> list[tuple[bytes, bytes]]:
    """
    The header fields of C{message} as C{dkim.rfc822_parse} gives them
    (name, value with CRLF line ends), in linear time and without reading
    the body.  Raises C{dkim.MessageFormatError} as it does.
    """
    head = message[:header_end(message)]
    fields: list[tuple[bytes, list[bytes]]] = []
    for line in re.split(rb"\r?\n", head) if head else []:
        if line[:1] in (b" ", b"\t"):
            if not fields:
                raise dkim.MessageFormatError("a header starts with a continuation line")
            fields[-1][1].append(line + b"\r\n")
            continue
        match = _FIELD_NAME.match(line)
        if match is not None:
            fields.append((match.group(1), [line[match.end(0):] + b"\r\n"]))
        elif not line.startswith(b"From "):
            raise dkim.MessageFormatError(f"Unexpected characters in RFC822 header: {line!r}")
    return [(name, b"".join(parts)) for name, parts in fields]
