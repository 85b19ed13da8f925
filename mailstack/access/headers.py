# -*- test-case-name: tests.test_imap_headers -*-
"""
The fields of a header block as IMAP shows them, read straight from the
bytes in one pass, without the C{email} package.

The answers are those the C{email} package gave before (policy
C{compat32}, as L{mailstack.access.mime} used it), down to its quirks,
so that a message answers the same with or without the folder's index and
before and after this parser (C{tests/test_imap_headers.py} compares the
two over generated and hostile header blocks):

  - only the first L{MAX_HEADER_PARSE} bytes of a header block count (cut
    at a line end), and folded lines are joined (the line break before a
    space or tab removed);
  - lines end at CRLF, a bare LF or a bare CR;
  - the fields end at the first line that is neither C{name:} (printable
    ASCII without spaces before the colon), a continuation (space or
    tab) nor C{From }: everything after it is not a field;
  - a C{From } line is not a field (the first one, or a misplaced one); a
    line starting with a colon is skipped, and so is a continuation line
    without a field to continue;
  - a value is what follows the colon, leading spaces and tabs removed,
    continuation lines appended, trailing CR and LF removed; a value with
    8-bit octets shows each of them as U+FFFD (UTF-8 C{EF BF BD}), as the
    C{email} package's C{unknown-8bit} charset did;
  - values are stripped of ASCII white space at both ends.

Everything is linear in the header block's size.
"""

from __future__ import annotations

import re

from mailstack.access.limits import MAX_HEADER_PARSE

_FOLD = re.compile(rb"\r?\n(?=[ \t])")
# The email package's headerRE: a field, a continuation, or a "From " line.
_LINE = re.compile(rb"From |[\041-\071\073-\176]*:|[\t ]")
_EIGHT_BIT = re.compile(rb"[\x80-\xff]")


def bounded_header(header: bytes) -> bytes:
    """
    The part of a header block whose fields count (at a line end):
    fields past L{MAX_HEADER_PARSE} are invisible.
    """
    if len(header) <= MAX_HEADER_PARSE:
        return header
    cut = header.rfind(b"\r\n", 0, MAX_HEADER_PARSE)
    return header[:cut + 2 if cut > 0 else MAX_HEADER_PARSE] + b"\r\n"


def _value(name: bytes, lines: list[bytes]) -> bytes:
    first = lines[0][len(name) + 1:].lstrip(b" \t")
    if len(lines) > 1:
        first += b"".join(lines[1:])
    return first.rstrip(b"\r\n")


# The common case: every line "name:value" ended by CRLF, nothing else.
_SIMPLE_BLOCK = re.compile(rb"(?:[\041-\071\073-\176]+:[^\r\n]*\r\n)*")
_SIMPLE_FIELD = re.compile(rb"([\041-\071\073-\176]+):[ \t]*([^\r\n]*)\r\n")


def raw_fields(header: bytes) -> list[tuple[bytes, bytes]]:
    """
    The fields of a header block in order, as (name as written, raw value);
    see the module's description for what counts.
    """
    data = _FOLD.sub(b"", bounded_header(header))
    end = _SIMPLE_BLOCK.match(data).end()  # type: ignore[union-attr]  # matches b""
    if end == len(data) or data.startswith(b"\r\n", end):
        # Only simple fields, then the end or a blank line: the same as
        # below, in two regular expression scans.
        return _SIMPLE_FIELD.findall(data, 0, end)
    return _general_fields(data)


def _general_fields(data: bytes) -> list[tuple[bytes, bytes]]:
    lines = data.splitlines(True)
    count = 0
    match = _LINE.match
    for line in lines:
        if not match(line):
            break
        count += 1
    fields: list[tuple[bytes, bytes]] = []
    name: bytes | None = None
    value: list[bytes] = []
    for line in lines[:count]:
        if line[0] in (32, 9):  # a continuation
            if name is not None:
                value.append(line)
            continue
        if name is not None:
            fields.append((name, _value(name, value)))
            name = None
        if line.startswith(b"From "):
            continue  # an mbox separator (or a body's first line), not a field
        colon = line.find(b":")
        if colon <= 0:
            continue  # no field name
        name, value = line[:colon], [line]
    if name is not None:
        fields.append((name, _value(name, value)))
    return fields


def shown(value: bytes) -> bytes:
    """
    A raw value as IMAP shows it (8-bit octets as U+FFFD, stripped).
    """
    if _EIGHT_BIT.search(value) is not None:
        value = _EIGHT_BIT.sub(b"\xef\xbf\xbd", value)
    return value.strip()


class HeaderFields:
    """
    The parsed fields of one header block: every value of a field by its
    lowercased name, as IMAP shows it.
    """

    __slots__ = ("values", "raw_type")

    def __init__(self, values: dict[bytes, list[bytes]], raw_type: bytes | None = None
                 ) -> None:
        self.values = values
        self.raw_type = raw_type  # the first Content-Type's raw value

    @classmethod
    def parse(cls, header: bytes) -> HeaderFields:
        """
        The fields of a header block (its blank line optional).
        """
        values: dict[bytes, list[bytes]] = {}
        raw_type = None
        eight_bit = _EIGHT_BIT.search(header) is not None
        for name, value in raw_fields(header):
            lowered = name.lower()
            if lowered == b"content-type" and raw_type is None:
                raw_type = value
            value = shown(value) if eight_bit else value.strip()
            found = values.get(lowered)
            if found is None:
                values[lowered] = [value]
            else:
                found.append(value)
        return cls(values, raw_type)

    def content_type(self, default: str) -> str:
        """
        The content type, lowercased, as C{email}'s C{get_content_type}
        gives it: C{default} without the field, C{text/plain} when it is
        not one C{type/subtype}.
        """
        if self.raw_type is None:
            return default
        # 8-bit octets as U+FFFD, as the email package showed them.
        kind = self.raw_type.decode("ascii", "replace").partition(";")[0].strip().lower()
        return kind if kind.count("/") == 1 else "text/plain"

    @staticmethod
    def key(name: str) -> bytes | None:
        """
        A field name as looked up (None: it can name no field).
        """
        lowered = name.lower()
        return lowered.encode("ascii") if lowered.isascii() else None

    def value(self, name: str) -> bytes | None:
        """
        The first value of a field, or None.
        """
        key = self.key(name)
        found = self.values.get(key) if key is not None else None
        return found[0] if found else None

    def all(self, name: str) -> list[bytes]:
        """
        Every value of a field, in order.
        """
        key = self.key(name)
        return list(self.values.get(key, ())) if key is not None else []
