# -*- test-case-name: tests.test_imap_store,tests.test_crafted_mail,tests.test_access_fuzz -*-
"""
What IMAP FETCH shows of a message: its sections byte for byte,
BODYSTRUCTURE, ENVELOPE, and IMAP strings.

The message is split by hand on its boundaries, so C{BODY[1.2]} is the
exact bytes of that part (the C{email} package re-serialises, which can
change bytes); the C{email} package only parses header fields.  Header
values keep their raw bytes (8-bit headers go out as literals).

A crafted message cannot make the parse unbounded (Dovecot's limits since
CVE-2020-12100, see L{mailstack.access.limits}): nesting stops at 100
levels and a message has at most 10,000 parts; beyond them the rest is one
opaque C{application/octet-stream} part.  ENVELOPE address lists are
bounded too.  Parsing and rendering are meant for a worker thread:
L{Part.parse_all} builds the whole (bounded) tree at once.
"""

from __future__ import annotations

import email.utils
import re
import urllib.parse
from email.message import Message
from typing import Iterator
from email.parser import BytesHeaderParser
from email.policy import compat32

from mailstack.access.addresses import parse_addresses
from mailstack.access.headers import HeaderFields, bounded_header
from mailstack.access.limits import (
    MAX_ADDRESS_FIELD, MAX_ENVELOPE_ADDRESSES, MAX_MIME_DEPTH, MAX_MIME_PARTS,
)

_parser = BytesHeaderParser(policy=compat32)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def crlf(data: bytes) -> bytes:
    """
    Stored (LF) content as served (CRLF).
    """
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def lf(data: bytes) -> bytes:
    """
    Client (CRLF) content as stored (LF).
    """
    return data.replace(b"\r\n", b"\n")


def literal(value: bytes) -> bytes:
    return b"{%d}\r\n" % len(value) + value


_UNQUOTABLE = re.compile(rb"[\x00\r\n\x80-\xff]")


def string(value: bytes | str | None) -> bytes:
    """
    An IMAP nstring: NIL, a quoted string, or a literal when it must be.
    """
    if value is None:
        return b"NIL"
    if isinstance(value, str):
        value = value.encode("utf-8", "surrogateescape")
    if len(value) > 1000 or _UNQUOTABLE.search(value):
        return literal(value)
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def header_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """
    The fields of a header block as (lowercased name, raw bytes with CRLF).
    """
    fields: list[tuple[bytes, bytes]] = []
    for line in header.split(b"\r\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line + b"\r\n")
        else:
            fields.append((line.split(b":", 1)[0].strip().lower(), line + b"\r\n"))
    return fields


def select_fields(header: bytes, names: list[bytes], negate: bool) -> bytes:
    wanted = {n.lower() for n in names}
    kept = [raw for name, raw in header_fields(header) if (name in wanted) != negate]
    return b"".join(kept) + b"\r\n"


def _delimiters(buffer: bytes, marker: bytes, start: int, end: int
                ) -> Iterator[tuple[tuple[int, int], bool]]:
    """
    The boundary delimiter lines in C{buffer[start:end]}: for each, the span
    it takes (its leading CRLF included) and whether it is the closing one.
    A line is a delimiter when it begins with C{marker} (C{--boundary}),
    optionally C{--}, then only spaces or tabs (RFC 2046 5.1.1).  Uses
    C{bytes.find}, so a long body is scanned at memory speed.
    """
    pos = start
    while True:
        at = buffer.find(marker, pos, end)
        if at < 0:
            return
        pos = at + len(marker)
        if at != start and not (at - 2 >= start and buffer[at - 2:at] == b"\r\n"):
            continue
        after = pos
        closing = buffer.startswith(b"--", after, end)
        if closing:
            after += 2
        while after < end and buffer[after] in (32, 9):
            after += 1
        if after == end:
            line_end = end
        elif buffer.startswith(b"\r\n", after, end):
            line_end = after + 2
        else:
            continue
        yield (at - 2 if at != start else at, line_end), closing
        pos = line_end


class _Budget:
    """
    The parts one message may still have (shared by its whole tree).
    """

    def __init__(self) -> None:
        self.parts = 0


# The part of a header block the C{email} parser sees (at a line end):
# fields past MAX_HEADER_PARSE do not count for the structure.
_bounded_header = bounded_header


def _bounded_addresses(value: bytes) -> str:
    """
    An address header's value cut to what ENVELOPE parses (at a comma).
    """
    if len(value) > MAX_ADDRESS_FIELD:
        cut = value.rfind(b",", 0, MAX_ADDRESS_FIELD)
        value = value[:cut if cut > 0 else MAX_ADDRESS_FIELD]
    return value.decode("utf-8", "surrogateescape")


class Part:
    """
    A message or a MIME entity: its header block (blank line included) and
    its body, both with CRLF line endings.

    Every part of a message shares the message's bytes (C{raw} and C{body}
    are sliced on demand), so deep nesting costs no copies.

    @ivar opaque: past the nesting or part limit: one leaf of type
        C{application/octet-stream}, whatever its header says.
    """

    def __init__(self, raw: bytes, default_type: str = "text/plain", depth: int = 0,
                 budget: _Budget | None = None, opaque: bool = False,
                 span: tuple[int, int] | None = None) -> None:
        self.depth = depth
        self.budget = budget or _Budget()
        self.budget.parts += 1
        self.opaque = opaque or depth > MAX_MIME_DEPTH
        self._buffer = raw
        start, end = span if span is not None else (0, len(raw))
        self._start, self._end = start, end
        if raw.startswith(b"\r\n", start, end):
            self.header, self._body_start = b"\r\n", start + 2
        else:
            blank = raw.find(b"\r\n\r\n", start, end)
            if blank < 0:
                header = raw[start:end]
                self.header = header + (b"" if header.endswith(b"\r\n") else b"\r\n")
                self._body_start = end
            else:
                self.header, self._body_start = raw[start:blank + 4], blank + 4
        self._default_type = default_type
        # Parsed when first needed: a header listing or an ENVELOPE needs
        # only the field values (HeaderFields), not the email package.
        self._fields: Message | None = None
        self._type: str | None = None
        self._values: HeaderFields | None = None
        self._children: list[Part] | None = None

    @property
    def fields(self) -> Message:
        """
        The header fields as the C{email} package parses them (for the
        content type and its parameters).
        """
        if self._fields is None:
            # Values unfolded (a folded boundary= or subject is one line).
            self._fields = _parser.parsebytes(_FOLD.sub(b"", _bounded_header(self.header)))
            self._fields.set_default_type(self._default_type)
        return self._fields

    @property
    def type(self) -> str:
        if self._type is None:
            kind = self.values.content_type(self._default_type)
            if self.opaque:
                kind = "application/octet-stream"
            elif kind.startswith("multipart/") and not self.fields.get_param("boundary"):
                kind = "text/plain"  # a multipart without a boundary is one text part
            self._type = kind
        return self._type

    @type.setter
    def type(self, value: str) -> None:
        self._type = value

    @property
    def values(self) -> HeaderFields:
        """
        The field values as IMAP shows them (L{mailstack.access.headers}).
        """
        if self._values is None:
            self._values = HeaderFields.parse(self.header)
        return self._values

    @property
    def raw(self) -> bytes:
        if self._start == 0 and self._end == len(self._buffer):
            return self._buffer
        return self._buffer[self._start:self._end]

    @property
    def body(self) -> bytes:
        return self._buffer[self._body_start:self._end]

    @property
    def body_size(self) -> int:
        return self._end - self._body_start

    @property
    def multipart(self) -> bool:
        return self.type.startswith("multipart/") and bool(self.fields.get_param("boundary"))

    @property
    def encapsulates(self) -> bool:
        return self.type == "message/rfc822"

    def parse_all(self) -> "Part":
        """
        Split the whole tree now (bounded by the limits), so rendering
        later does no parsing.  Blocking: for a worker thread.
        """
        stack = [self]
        while stack:
            stack.extend(stack.pop().children())
        return self

    def children(self) -> list[Part]:
        if self._children is None:
            if (self.multipart or self.encapsulates) and self.budget.parts >= MAX_MIME_PARTS:
                # No part left for what is inside: this one becomes opaque.
                self.opaque, self.type = True, "application/octet-stream"
            if self.multipart:
                self._children = self._split()
            elif self.encapsulates:
                self._children = [Part(self._buffer, depth=self.depth + 1, budget=self.budget,
                                       span=(self._body_start, self._end))]
            else:
                self._children = []
        return self._children

    def _split(self) -> list[Part]:
        boundary = str(self.fields.get_param("boundary")).encode("utf-8", "surrogateescape")
        default = "message/rfc822" if self.type == "multipart/digest" else "text/plain"
        parts: list[Part] = []
        start = None
        closed = False
        found = _delimiters(self._buffer, b"--" + boundary, self._body_start, self._end)
        for (first, last), closing in found:
            if start is not None:
                if self.budget.parts >= MAX_MIME_PARTS:
                    # Over the limit: the rest of this body, up to the closing
                    # delimiter, is one opaque part.
                    rest_end = self._end
                    if closing:
                        rest_end = first
                    else:
                        for (first, _), closing in found:
                            if closing:
                                rest_end = first
                                break
                    parts.append(Part(self._buffer, default, self.depth + 1, self.budget,
                                      opaque=True, span=(start, rest_end)))
                    return parts
                parts.append(Part(self._buffer, default, self.depth + 1, self.budget,
                                  span=(start, first)))
            if closing:
                closed = True
                break
            start = last
        if start is not None and not closed:
            # No closing delimiter: the last part runs to the end.
            parts.append(Part(self._buffer, default, self.depth + 1, self.budget,
                              opaque=self.budget.parts >= MAX_MIME_PARTS,
                              span=(start, self._end)))
        if not parts:
            # The boundary never occurs: the body is one text part, as Dovecot shows it.
            parts.append(Part(b"\r\n" + self.body, "text/plain", self.depth + 1, self.budget))
        return parts

    def header_value(self, name: str) -> bytes | None:
        return self.values.value(name)

    def header_values(self, name: str) -> list[bytes]:
        """
        Every occurrence of a field, unfolded only as far as the raw bytes go.
        """
        return self.values.all(name)

    # -- sections --------------------------------------------------------------

    def subpart(self, numbers: tuple[int, ...]) -> Part | None:
        """
        The entity named by part numbers (RFC 3501 6.4.5).
        """
        node = self
        reached = False  # node was named by a number (else: a message's top)
        for n in numbers:
            if reached and node.encapsulates:
                node, reached = node.children()[0], False  # into the inner message
            if node.multipart:
                children = node.children()
                if not 1 <= n <= len(children):
                    return None
                node, reached = children[n - 1], True
            elif not reached and n == 1:
                reached = True  # part 1 of a single-part message is its body
            else:
                return None
        return node

    # An immutable () default for a list that is only read.
    def section(self, numbers: tuple[int, ...], kind: str, names: list[bytes] = (),  # type: ignore[assignment]
                negate: bool = False) -> bytes:
        """
        The bytes of C{BODY[numbers.kind]}; kind is "", HEADER, HEADER.FIELDS,
        TEXT or MIME.
        """
        node = self.subpart(numbers)
        if node is None:
            return b""
        if kind == "":
            return node.body if numbers else node.raw
        if kind == "MIME":
            return node.header
        if numbers and node.encapsulates:
            node = node.children()[0]
        if kind == "TEXT":
            return node.body
        if kind == "HEADER":
            return node.header
        return select_fields(node.header, names, negate)

    # -- structure -------------------------------------------------------------

    def _params(self, header: str) -> bytes:
        params = self.fields.get_params(header=header) or []
        pairs = [(k, v) for k, v in params[1:] if k]
        if not pairs:
            return b"NIL"
        flat = []
        for key, value in pairs:
            if isinstance(value, tuple):  # RFC 2231: leave it encoded
                try:
                    value = email.utils.encode_rfc2231(value[2], value[0], value[1])
                except (LookupError, ValueError):  # a charset name Python cannot look up
                    value = "%s'%s'%s" % (value[0] or "", value[1] or "", urllib.parse.quote(
                        value[2], safe="", encoding="utf-8", errors="surrogateescape"))
            flat.append(string(key.upper()) + b" " + string(str(value)))
        return b"(" + b" ".join(flat) + b")"

    def _disposition(self) -> bytes:
        value = self.fields.get("content-disposition")
        if value is None:
            return b"NIL"
        kind = str(value).split(";", 1)[0].strip()
        return b"(" + string(kind.upper()) + b" " + self._params("content-disposition") + b")"

    def bodystructure(self, extended: bool = True) -> bytes:
        if self.multipart:
            children = b"".join(c.bodystructure(extended) for c in self.children())
            out = children + b" " + string(self.type.split("/", 1)[1].upper())
            if extended:
                out += (b" " + self._params("content-type") + b" " + self._disposition()
                        + b" NIL NIL")
            return b"(" + out + b")"
        maintype, subtype = self.type.split("/", 1)
        encoding = self.header_value("content-transfer-encoding") or b"7BIT"
        out = b" ".join([
            string(maintype.upper()), string(subtype.upper()), self._params("content-type"),
            string(self.header_value("content-id")),
            string(self.header_value("content-description")),
            string(encoding.upper()), b"%d" % len(self.body),
        ])
        lines = self.body.count(b"\r\n") + (0 if not self.body or self.body.endswith(b"\r\n")
                                            else 1)
        if maintype == "text":
            out += b" %d" % lines
        elif self.encapsulates:
            inner = self.children()[0]
            out += b" " + inner.envelope() + b" " + inner.bodystructure(extended) + b" %d" % lines
        if extended:
            out += b" NIL " + self._disposition() + b" NIL NIL"
        return b"(" + out + b")"

    def envelope(self) -> bytes:
        return envelope(self.values)


def envelope(fields: HeaderFields) -> bytes:
    """
    The ENVELOPE of a header block's fields.
    """
    rendered: dict[str, bytes] = {}

    def addresses(name: str, fallback: str | None = None) -> bytes:
        if name in rendered:
            return rendered[name]
        value = fields.value(name)
        found = (parse_addresses(_bounded_addresses(value))[:MAX_ENVELOPE_ADDRESSES]
                 if value else [])
        if not found and fallback is not None:
            return addresses(fallback)
        items = [b"(" + b" ".join([string(a.name), string(a.route), string(a.mailbox),
                                   string(a.host)]) + b")" for a in found]
        out = rendered[name] = b"(" + b"".join(items) + b")" if items else b"NIL"
        return out

    return b"(" + b" ".join([
        string(fields.value("date")),
        string(fields.value("subject")),
        addresses("from"),
        addresses("sender", "from"),
        addresses("reply-to", "from"),
        addresses("to"),
        addresses("cc"),
        addresses("bcc"),
        string(fields.value("in-reply-to")),
        string(fields.value("message-id")),
    ]) + b")"
