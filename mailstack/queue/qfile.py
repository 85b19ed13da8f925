# -*- test-case-name: tests.test_queue_file -*-
"""
The framing of a queue file (L{mailstack.queue.store}): a header line, then
records, each C{KIND LENGTH CRC32 LF PAYLOAD}, with the length and the
CRC-32 of the payload in eight hexadecimal digits::

    mailstack-queue 1
    E0000012c1a2b3c4d
    {"queue_id": ...}                     the envelope (JSON), once
    C0000040000000000
    Received: ...                         the content (its CRC is not kept: 00000000)
    S00000061e5f6a7b8
    {"attempts": 1, ...}                  a state record, appended after an attempt
    S...

The envelope and the content are written and fsynced before the file is
renamed into the queue, so they are whole in every committed file (their
frames say where the content ends without reading it).  State records
are appended later; one cut short by a crash is found by its length or its
CRC and ignored with anything after it (L{parse_tail}).
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

MAGIC = b"mailstack-queue 1\n"
ENVELOPE, CONTENT, STATE = b"E", b"C", b"S"
FRAME = 18  # kind, 8 hex digits of length, 8 of CRC, LF
# Most queue files are read whole by one read of this size.
FIRST_READ = 65536


class CorruptFile(ValueError):
    """
    A queue file whose envelope or content frame is unreadable.
    """


def frame(kind: bytes, payload: bytes) -> bytes:
    """
    One record: its frame and C{payload}.
    """
    return b"%s%08x%08x\n" % (kind, len(payload), zlib.crc32(payload)) + payload


def content_frame(size: int) -> bytes:
    """
    The frame of C{size} bytes of content (which follow it).
    """
    return b"%s%08x%08x\n" % (CONTENT, size, 0)


def _frame_at(data: bytes, at: int) -> tuple[bytes, int, int] | None:
    """
    The kind, length and CRC of the frame at C{at}, or C{None} if it is cut
    short or malformed.
    """
    raw = data[at:at + FRAME]
    if len(raw) < FRAME or raw[17:18] != b"\n":
        return None
    try:
        length, crc = int(raw[1:9], 16), int(raw[9:17], 16)
    except ValueError:
        return None
    if raw[1:17].strip(b"0123456789abcdef"):
        return None  # int() accepts signs, spaces and underscores: the frame does not
    return raw[:1], length, crc


class Head(NamedTuple):
    """
    What the start of a queue file says.
    """

    envelope: bytes  # the envelope's JSON (b"" while need > what was read)
    content_offset: int
    content_size: int
    need: int  # bytes of the file needed to parse this far


def parse_head(data: bytes, envelope: bool = True) -> Head:
    """
    Parse the header line, the envelope and the content's frame from the
    first bytes of a queue file.  If C{data} is too short for them,
    C{need} says how many bytes are (read that many and call again).

    @param envelope: whether to check the envelope's CRC (not needed to
        find the content).
    @raise CorruptFile: not a queue file, or a frame is malformed.
    """
    if not data.startswith(MAGIC):
        raise CorruptFile("not a queue file (no header line)")
    at = len(MAGIC)
    first = _frame_at(data, at)
    if first is None or first[0] != ENVELOPE:
        raise CorruptFile("the envelope's frame is unreadable")
    _, length, crc = first
    start = at + FRAME
    end = start + length
    if end + FRAME > len(data):
        return Head(b"", 0, 0, end + FRAME)
    payload = data[start:end]
    if envelope and zlib.crc32(payload) != crc:
        raise CorruptFile("the envelope's checksum does not match")
    second = _frame_at(data, end)
    if second is None or second[0] != CONTENT:
        raise CorruptFile("the content's frame is unreadable")
    return Head(payload, end + FRAME, second[1], end + FRAME)


def parse_tail(data: bytes) -> tuple[list[bytes], bool]:
    """
    The payloads of the whole state records in C{data} (what follows the
    content), and whether anything after them was cut short or unreadable
    (a torn append: ignored, never an error).
    """
    states: list[bytes] = []
    at = 0
    while at < len(data):
        found = _frame_at(data, at)
        if found is None or found[0] != STATE:
            return states, True
        _, length, crc = found
        start = at + FRAME
        payload = data[start:start + length]
        if len(payload) < length or zlib.crc32(payload) != crc:
            return states, True
        states.append(payload)
        at = start + length
    return states, False
