# -*- test-case-name: tests.test_imap_index -*-
"""
A per-folder cache of what FETCH and SEARCH read from message headers
(the role of Dovecot's C{dovecot.index.cache}), so that an ENVELOPE, a
header listing or a SEARCH FROM/TO/SUBJECT on a large folder opens no
message file once the folder was read.

For each message the file C{mailstack-index} in the folder keeps, by base
name: its size (as served) and the file's inode, its mtime (the
INTERNALDATE), the header fields clients commonly ask for (L{CACHED_FIELDS}, as raw lines in
their order) and the rendered ENVELOPE.  It is never a source of truth:

  - a record is used only for a message of the same base name, file size
    and inode as when it was made (a message file replaced, even under the
    same name, has another inode), else the file is read and the record
    made again;
  - only requests that the cached fields answer use it (C{HEADER.FIELDS}
    of cached names, ENVELOPE, SEARCH keys on cached fields); the whole
    header, C{HEADER.FIELDS.NOT}, bodies and BODYSTRUCTURE read the file;
  - a missing, truncated, corrupt or other-version file is an empty cache,
    rebuilt as messages are read; records of messages gone are dropped
    when it is written.

It is written atomically (a temporary file renamed over it) in a worker
thread once a FETCH or SEARCH that added records was answered.  The parsed indexes are
shared by every session of the process (L{indexes}), bounded by
L{MAX_FOLDERS} folders.
"""

from __future__ import annotations

import os
import re
import struct
import threading
import zlib
from collections import OrderedDict
from typing import Any, Iterable

from twisted.logger import Logger

from mailstack.access.limits import MAX_HEADER_PARSE
from mailstack.access.headers import HeaderFields, shown
from mailstack.access.mime import envelope as render_envelope
from mailstack.access.mime import header_fields, select_fields
from mailstack.safeio import discard, private_file, temporary_name

log = Logger()

INDEX = "mailstack-index"
VERSION = 3  # 3: a binary format (2 was JSON); another version is rebuilt
MAX_FOLDERS = 64  # parsed indexes kept in memory, least recently used out
CACHED_FIELDS = frozenset({
    b"from", b"to", b"cc", b"bcc", b"subject", b"date", b"message-id", b"references",
    b"in-reply-to", b"content-type", b"sender", b"reply-to", b"x-priority", b"importance",
    b"list-id", b"content-transfer-encoding", b"mime-version", b"priority",
    b"x-mailer", b"user-agent", b"delivered-to", b"return-path",
})
ENVELOPE_FIELDS = (b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc",
                   b"bcc", b"in-reply-to", b"message-id")


class Record:
    """
    What the cache knows of one message.
    """

    __slots__ = ("size", "inode", "mtime", "header", "_values", "_parsed", "envelope", "texts")

    def __init__(self, size: int, inode: int, mtime: float, header: bytes,
                 values: dict[bytes, list[bytes]] | None, envelope: bytes | None) -> None:
        self.size = size
        self.inode = inode
        self.mtime = mtime
        self.header = header  # the cached fields' lines, then CRLF
        # Lowercased field name -> its values as IMAP shows them; None when
        # they are those of the cached lines themselves (a header block of
        # one-line fields only), parsed from them when first asked for.
        self._values = values
        self._parsed: dict[bytes, list[bytes]] | None = None  # of the lines, in memory only
        self.envelope = envelope  # made when first asked for
        self.texts: dict[str, list[str]] = {}  # SEARCH's decoded values, in memory only

    @property
    def values(self) -> dict[bytes, list[bytes]]:
        if self._values is not None:
            return self._values
        if self._parsed is None:
            self._parsed = HeaderFields.parse(self.header).values
        return self._parsed

    def field_values(self, key: bytes) -> list[bytes]:
        """
        Every value of the field named C{key} (lowercased), as L{values}
        has them, without parsing the other cached lines when they were
        not parsed yet (a SEARCH of one field over a folder's records).
        """
        if self._values is not None:
            return list(self._values.get(key, ()))
        if self._parsed is not None:
            return list(self._parsed.get(key, ()))
        # One-line "name:value" fields only, within MAX_HEADER_PARSE, no
        # fold: the values HeaderFields.parse finds for this name.
        pattern = re.compile(rb"^" + re.escape(key) + rb":[ \t]*([^\r\n]*)\r\n",
                             re.IGNORECASE | re.MULTILINE)
        return [shown(value) for value in pattern.findall(self.header)]

    def encode(self, base: bytes) -> bytes:
        """
        The record in the file's format (see L{decode_records}).
        """
        items = [base, self.header]
        if self.envelope is not None:
            items.append(self.envelope)
        if self._values is not None:
            for name, found in self._values.items():
                for value in found:
                    items += (name, value)
        flags = (self.envelope is not None) | (self._values is not None) << 1
        return (_FIXED.pack(self.size, self.inode, self.mtime, len(items), flags)
                + struct.pack("<%dI" % len(items), *map(len, items)) + b"".join(items))


_FIXED = struct.Struct("<QQdIB")  # size, inode, mtime, items, flags (_ENVELOPE, _VALUES)
_ENVELOPE, _VALUES = 1, 2
_MAGIC = b"mailstack-index\n"
_TOP = struct.Struct("<III")  # version, records, CRC-32 of the records
MAX_INDEX_FILE = 1 << 30  # a larger file is not read (an empty cache)


def encode_records(records: dict[str, Record]) -> bytes:
    """
    The index file's bytes: L{_MAGIC}, the version, the number of records
    and a CRC-32 of what follows, then each record: its fixed part
    (L{_FIXED}: size, inode, mtime, number of items, whether an ENVELOPE
    is there), the items' lengths (32 bits each), the items: the base
    name, the cached lines, the ENVELOPE if made, then a field's name and
    one value per pair.  Little-endian; nothing is evaluated on reading.
    """
    body = b"".join(r.encode(base.encode("utf-8", "surrogateescape"))
                    for base, r in records.items())
    return _MAGIC + _TOP.pack(VERSION, len(records), zlib.crc32(body)) + body


def decode_records(data: bytes) -> dict[str, Record]:
    """
    The records of an index file's bytes.

    @raise ValueError: anything wrong with it (then it is an empty cache).
    """
    if not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _TOP.size:
        raise ValueError("not an index")
    version, count, crc = _TOP.unpack_from(data, len(_MAGIC))
    if version != VERSION:
        raise ValueError("another version")
    pos = len(_MAGIC) + _TOP.size
    if zlib.crc32(memoryview(data)[pos:]) != crc:
        raise ValueError("bad checksum")
    records: dict[str, Record] = {}
    end = len(data)
    fixed, fixed_size = _FIXED.unpack_from, _FIXED.size
    for _ in range(count):
        if pos + fixed_size > end:
            raise ValueError("truncated")
        size, inode, mtime, n, flags = fixed(data, pos)
        pos += fixed_size
        has_envelope = flags & _ENVELOPE
        if (n < 2 + has_envelope or (n - 2 - has_envelope) % 2 or flags > 3
                or (n > 2 + has_envelope and not flags & _VALUES)):
            raise ValueError("bad record")
        if pos + 4 * n > end:
            raise ValueError("truncated")
        lengths = struct.unpack_from("<%dI" % n, data, pos)
        pos += 4 * n
        items = []
        for length in lengths:
            if pos + length > end:
                raise ValueError("truncated")
            items.append(data[pos:pos + length])
            pos += length
        values: dict[bytes, list[bytes]] | None = None
        if flags & _VALUES:
            values = {}
            for i in range(2 + has_envelope, n, 2):
                values.setdefault(items[i], []).append(items[i + 1])
        if not -_MTIME_RANGE < mtime < _MTIME_RANGE:  # NaN too: not an INTERNALDATE
            continue  # this record only: the message is read again
        base = items[0].decode("utf-8", "surrogateescape")
        records[base] = Record(size, inode, mtime, items[1], values,
                               items[2] if has_envelope else None)
    if pos != end:
        raise ValueError("trailing bytes")
    return records


_MTIME_RANGE = float(1 << 36)  # seconds either side of 1970 a timestamp may be


class CachedPart:
    """
    A message as its record knows it, for what L{fetch_cacheable} and
    L{search_cacheable} let through: header fields of L{CACHED_FIELDS} and
    the ENVELOPE, without parsing anything again.
    """

    def __init__(self, record: Record) -> None:
        self.record = record
        self.header = record.header
        self.texts = record.texts  # see mailstack.access.search
        self._values: HeaderFields | None = None

    @property
    def values(self) -> HeaderFields:
        if self._values is None:
            self._values = HeaderFields(self.record.values)
        return self._values

    def envelope(self) -> bytes:
        if self.record.envelope is None:
            # Every ENVELOPE field is cached: the same as from the whole header.
            self.record.envelope = render_envelope(self.values)
        return self.record.envelope

    def header_values(self, name: str) -> list[bytes]:
        return self.values.all(name)

    def header_value(self, name: str) -> bytes | None:
        return self.values.value(name)

    def section(self, numbers: tuple[int, ...], kind: str, names: list[bytes] = (),  # type: ignore[assignment]
                negate: bool = False) -> bytes:
        if numbers or kind != "HEADER.FIELDS" or negate:
            raise ValueError("not answered by the index")  # fetch_cacheable keeps these out
        return select_fields(self.record.header, names, negate)


_SIMPLE_LINES = re.compile(rb"(?:[\041-\071\073-\176]+:[^\r\n]*\r\n)*")
_SIMPLE_LINE = re.compile(rb"([\041-\071\073-\176]+):[^\r\n]*\r\n")


def reduced_header(header: bytes) -> bytes:
    """
    The lines of the cached fields of a header block (CRLF), in order.
    """
    end = _SIMPLE_LINES.match(header).end()  # type: ignore[union-attr]  # matches b""
    if end == len(header) or header[end:] == b"\r\n":
        # Only one-line fields, then the end or the blank line: what
        # header_fields gives them, read by a regular expression.
        return b"".join(m[0] for m in _SIMPLE_LINE.finditer(header, 0, end)
                        if m[1].lower() in CACHED_FIELDS) + b"\r\n"
    return b"".join(raw for name, raw in header_fields(header) if name in CACHED_FIELDS) + b"\r\n"


def make_record(header: bytes, stat: os.stat_result, size: int, envelope: bool = False
                ) -> Record | None:
    """
    The record of a message whose header block (CRLF) is C{header}, read
    from the file of C{stat}, of C{size} octets as served; its ENVELOPE
    now if C{envelope}.  One pass over the header block
    (L{mailstack.access.headers}).  None for a header block longer than
    the parser reads (L{MAX_HEADER_PARSE}: its fields past the limit must
    stay invisible, as without the cache) or a file time no INTERNALDATE
    can show.
    """
    if len(header) > MAX_HEADER_PARSE or not -_MTIME_RANGE < stat.st_mtime < _MTIME_RANGE:
        return None
    end = _SIMPLE_LINES.match(header).end()  # type: ignore[union-attr]  # matches b""
    if end == len(header) or header[end:] == b"\r\n":
        # One-line fields only: the cached lines parse to the same values
        # as the whole block, so the record keeps the lines alone.
        reduced = b"".join(m[0] for m in _SIMPLE_LINE.finditer(header, 0, end)
                           if m[1].lower() in CACHED_FIELDS) + b"\r\n"
        record = Record(size, stat.st_ino, stat.st_mtime, reduced, None, None)
    else:
        fields = HeaderFields.parse(header)
        values = {name: found for name, found in fields.values.items()
                  if name in CACHED_FIELDS}
        record = Record(size, stat.st_ino, stat.st_mtime, reduced_header(header), values,
                        None)
    if envelope:
        record.envelope = render_envelope(HeaderFields(record.values))
    return record


class FolderIndex:
    """
    The cache of one folder; safe to share between worker threads.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.records: dict[str, Record] = {}
        self._lock = threading.Lock()
        self._dirty = False
        self.load()

    def load(self) -> None:
        """
        Read the file; anything wrong with it is an empty cache.
        """
        records: dict[str, Record] = {}
        try:
            with open(os.path.join(self.path, INDEX), "rb") as f:
                if os.fstat(f.fileno()).st_size > MAX_INDEX_FILE:
                    raise ValueError("too large")
                records = decode_records(f.read())
        except FileNotFoundError:
            pass  # no index written yet: an empty cache, filled by the next FETCH
        except (OSError, ValueError, struct.error, UnicodeError) as e:
            log.info("imap: rebuilding the index of {path} ({error})", path=self.path,
                     error=type(e).__name__)
            records = {}
            self._dirty = True
        with self._lock:
            self.records = records

    def get(self, base: str, size: int, inode: int) -> Record | None:
        """
        The record of a message, if made from this very file.
        """
        record = self.records.get(base)
        if record is None or not inode or record.inode != inode or record.size != size:
            return None
        return record

    def put(self, base: str, record: Record) -> None:
        with self._lock:
            self.records[base] = record
            self._dirty = True

    @property
    def dirty(self) -> bool:
        return self._dirty

    def save(self, live: Iterable[str] | None = None) -> None:
        """
        Write the cache if it changed; records of messages not in C{live}
        are dropped.  Blocking.
        """
        with self._lock:
            if not self._dirty:
                return
            if live is not None:
                keep = set(live)
                self.records = {b: r for b, r in self.records.items() if b in keep}
            records = dict(self.records)
            self._dirty = False
        target = os.path.join(self.path, INDEX)
        tmp = temporary_name(target)
        try:
            # Renamed into place, not fsynced: after a crash the file is
            # whole, missing or unreadable, and then rebuilt.
            # Owner-only, as every file of a mailbox: it holds header fields.
            with open(tmp, "wb", opener=private_file) as f:
                f.write(encode_records(records))
            os.replace(tmp, target)
        except OSError as e:
            discard(tmp)  # a cache: the next write may succeed
            log.warn("imap: cannot write the index of {path}: {error}", path=self.path,
                     error=e)
            self._dirty = True


class Indexes:
    """
    The parsed folder indexes of the process, by folder path.
    """

    def __init__(self, max_folders: int = MAX_FOLDERS) -> None:
        self.max_folders = max_folders
        self._items: OrderedDict[str, FolderIndex] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: str) -> FolderIndex:
        """
        The index of the folder at C{path}, read on first use.  Blocking.
        """
        with self._lock:
            index = self._items.get(path)
            if index is not None:
                self._items.move_to_end(path)
                return index
        index = FolderIndex(path)
        with self._lock:
            index = self._items.setdefault(path, index)
            while len(self._items) > self.max_folders:
                self._items.popitem(last=False)
        return index

    def forget(self, path: str) -> None:
        with self._lock:
            self._items.pop(path, None)


indexes = Indexes()


def fetch_cacheable(query: list[Any]) -> bool:
    """
    Whether the cache answers every item of a FETCH that needs headers.
    """
    for item in query:
        kind = item.type
        if kind in ("uid", "flags", "internaldate", "rfc822size", "envelope"):
            continue
        if kind != "body" or item.part or item.text or item.mime or item.empty:
            return False
        header = item.header
        if not header or not header.fields or header.negate:
            return False
        if any(name.lower() not in CACHED_FIELDS for name in header.fields):
            return False
    return True


_SEARCH_FIELDS = {b"FROM": b"from", b"TO": b"to", b"CC": b"cc", b"BCC": b"bcc",
                  b"SUBJECT": b"subject", b"SENTBEFORE": b"date", b"SENTON": b"date",
                  b"SENTSINCE": b"date"}


def search_cacheable(query: list[Any]) -> bool:
    """
    Whether the cache answers every header key of a SEARCH.
    """
    words = list(query)
    while words:
        word = words.pop(0)
        if isinstance(word, list):
            if not search_cacheable(word):
                return False
            continue
        if not isinstance(word, bytes):
            continue
        key = word.upper()
        if key == b"HEADER":
            name = words[0] if words else None
            if not isinstance(name, bytes) or name.lower() not in CACHED_FIELDS:
                return False
        elif key in (b"BODY", b"TEXT"):
            return False
    return True
