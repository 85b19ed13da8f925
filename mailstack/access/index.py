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

import json
import os
import threading
from collections import OrderedDict
from typing import Any, Iterable

from twisted.logger import Logger

from mailstack.access.limits import MAX_HEADER_PARSE
from mailstack.access.mime import Part, header_fields, select_fields
from mailstack.safeio import discard, private_file, temporary_name

log = Logger()

INDEX = "mailstack-index"
VERSION = 2
MAX_FOLDERS = 64  # parsed indexes kept in memory, least recently used out
CACHED_FIELDS = frozenset({
    b"from", b"to", b"cc", b"bcc", b"subject", b"date", b"message-id", b"references",
    b"in-reply-to", b"content-type", b"sender", b"reply-to", b"x-priority", b"importance",
    b"list-id", b"content-transfer-encoding", b"mime-version", b"priority",
    b"x-mailer", b"user-agent", b"delivered-to", b"return-path",
})
_CACHED_NAMES = frozenset(name.decode("ascii") for name in CACHED_FIELDS)
ENVELOPE_FIELDS = (b"date", b"subject", b"from", b"sender", b"reply-to", b"to", b"cc",
                   b"bcc", b"in-reply-to", b"message-id")


class Record:
    """
    What the cache knows of one message.
    """

    __slots__ = ("size", "inode", "mtime", "header", "values", "envelope", "texts")

    def __init__(self, size: int, inode: int, mtime: float, header: bytes,
                 values: dict[str, list[bytes]], envelope: bytes | None) -> None:
        self.size = size
        self.inode = inode
        self.mtime = mtime
        self.header = header  # the cached fields' lines, then CRLF
        self.values = values  # field name -> its values as the parser gives them
        self.envelope = envelope  # made when first asked for
        self.texts: dict[str, list[str]] = {}  # SEARCH's decoded values, in memory only

    def to_json(self) -> list[Any]:
        return [self.size, self.inode, self.mtime, self.header.decode("latin-1"),
                {k: [v.decode("latin-1") for v in vs] for k, vs in self.values.items()},
                None if self.envelope is None else self.envelope.decode("latin-1")]

    @classmethod
    def from_json(cls, value: Any) -> Record:
        size, inode, mtime, header, values, envelope = value
        if not (isinstance(size, int) and isinstance(inode, int)
                and isinstance(mtime, (int, float)) and isinstance(header, str)
                and isinstance(values, dict)
                and (envelope is None or isinstance(envelope, str))):
            raise ValueError("bad record")
        parsed = {}
        for name, found in values.items():
            if not isinstance(found, list) or not all(isinstance(v, str) for v in found):
                raise ValueError("bad record")
            parsed[str(name)] = [v.encode("latin-1") for v in found]
        return cls(size, inode, float(mtime), header.encode("latin-1"), parsed,
                   None if envelope is None else envelope.encode("latin-1"))


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

    def envelope(self) -> bytes:
        if self.record.envelope is None:
            # Every ENVELOPE field is cached: the same as from the whole header.
            self.record.envelope = Part(self.record.header).envelope()
        return self.record.envelope

    def header_values(self, name: str) -> list[bytes]:
        return list(self.record.values.get(name.lower(), ()))

    def header_value(self, name: str) -> bytes | None:
        found = self.record.values.get(name.lower())
        return found[0] if found else None

    def section(self, numbers: tuple[int, ...], kind: str, names: list[bytes] = (),  # type: ignore[assignment]
                negate: bool = False) -> bytes:
        if numbers or kind != "HEADER.FIELDS" or negate:
            raise ValueError("not answered by the index")  # fetch_cacheable keeps these out
        return select_fields(self.record.header, names, negate)


def reduced_header(header: bytes) -> bytes:
    """
    The lines of the cached fields of a header block (CRLF), in order.
    """
    return b"".join(raw for name, raw in header_fields(header) if name in CACHED_FIELDS) + b"\r\n"


def make_record(part: Part, stat: os.stat_result, size: int, envelope: bool = False
                ) -> Record | None:
    """
    The record of a message whose header was parsed as C{part}, read from
    the file of C{stat}, of C{size} octets as served; its ENVELOPE now if
    C{envelope}.  None for a header block longer than the parser reads
    (L{MAX_HEADER_PARSE}: its fields past the limit must stay invisible,
    as without the cache).
    """
    if len(part.header) > MAX_HEADER_PARSE:
        return None
    values: dict[str, list[bytes]] = {}
    for name, value in part.fields.items():  # one pass: header_values of each name
        if name.lower() in _CACHED_NAMES:
            values.setdefault(name.lower(), []).append(
                str(value).encode("utf-8", "surrogateescape").strip())
    return Record(size, stat.st_ino, stat.st_mtime, reduced_header(part.header), values,
                  part.envelope() if envelope else None)


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
                data = json.loads(f.read())
            if not isinstance(data, dict) or data.get("version") != VERSION:
                raise ValueError("another version")
            for base, value in data["messages"].items():
                records[str(base)] = Record.from_json(value)
        except FileNotFoundError:
            pass  # no index written yet: an empty cache, filled by the next FETCH
        except (OSError, ValueError, KeyError, TypeError, AttributeError,
                UnicodeError) as e:
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
            data = {"version": VERSION,
                    "messages": {b: r.to_json() for b, r in self.records.items()}}
            self._dirty = False
        target = os.path.join(self.path, INDEX)
        tmp = temporary_name(target)
        try:
            # Renamed into place, not fsynced: after a crash the file is
            # whole, missing or unreadable, and then rebuilt.
            # Owner-only, as every file of a mailbox: it holds header fields.
            with open(tmp, "wb", opener=private_file) as f:
                f.write(json.dumps(data, separators=(",", ":")).encode("ascii"))
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
