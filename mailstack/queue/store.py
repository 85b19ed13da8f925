# -*- test-case-name: tests.test_queue,tests.test_queue_file -*-
"""
The queue on disk: one file per message, as Postfix keeps it::

    DATA/queue/msg/<id>     the envelope, the content, then appended state records
    DATA/queue/tmp/         files being written
    DATA/queue/corrupt/     messages set aside, each with a C{.reason}

A queue file is a header line and a sequence of records, each framed by
kind, length and CRC-32 (L{mailstack.queue.records}): the envelope (the
whole L{QueueRecord} as JSON), the content (the message, LF line endings,
its length in the frame), and then, appended after each delivery attempt
that leaves the message queued, a state record (attempts, next attempt,
each recipient's state).  The last state record that is whole wins; a torn
one at the end (a crash in the middle of an append) is ignored at load, so
each recipient is either pending or done as of an append that completed:
at worst delivered twice, never lost.  A file with a torn tail is
rewritten whole before anything more is appended to it, as is one whose
appended records have grown large (L{QueueStore.compact_above}).

Writing a message: the file to C{tmp/}, fsynced; its rename into C{msg/}
is the commit, made durable by an fsync of C{msg/} that is group-committed
(L{DirectorySyncer}: messages committed at the same time share it, and
each caller returns only after an fsync that began after its own rename).
So a 250 costs one file fsync and a share of one directory fsync.  A state
record costs one fsync of the file (no rename, no directory fsync).

Removing a message whose every recipient is done is one C{unlink}, and its
directory is I{not} fsynced for it, as Postfix does not: the unlink is
made durable by the next commit's fsync of C{msg/} or the file system's
own journal commit (seconds).  Only a crash of the whole machine in
between can bring the file back, and then its recipients are delivered
again: a duplicate, never a loss.  A process crash cannot (the unlink is
done in the kernel when it returns).

Queues written by mailstack before this layout (C{content/<id>} and
C{envelope/<id>.json}) are still loaded and delivered from those files,
their state rewritten there as before (L{LEGACY}); nothing is converted,
and new messages use C{msg/}.  All methods block; call them in a thread.
"""

from __future__ import annotations

import io
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any, BinaryIO, Iterator

from mailstack.message import MessageSpool
from mailstack.queue import qfile
from mailstack.safeio import (
    DirectorySyncer, append_file, atomic_write, discard, fsync_directory, rename, unlink,
    write_file,
)

PENDING, SENT, FAILED = "pending", "sent", "failed"


class OrphanContent(Exception):
    """
    Content without an envelope, found and removed at start.
    """
_ID = re.compile(r"[0-9A-Za-z]{6,40}")


@dataclass
class RecipientState:
    """
    One recipient of a queued message.
    """

    address: str
    state: str = PENDING
    last_error: str = ""
    dsn: str = ""  # enhanced status of the last answer, e.g. 4.4.1
    remote_reply: str = ""  # "smtp; 550 5.1.1 ..." for a DSN's Diagnostic-Code
    relay: str = ""
    # A failed recipient whose bounce is stored (or due to nobody); False
    # while the bounce could not be stored yet: the message stays queued.
    notified: bool = True

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2].lower()


@dataclass
class QueueRecord:
    """
    A queued message's envelope and delivery state.
    """

    queue_id: str
    sender: str  # "" is the null sender: a bounce, which never bounces
    arrival: float
    recipients: list[RecipientState]
    size: int = 0
    attempts: int = 0
    next_attempt: float = 0.0
    warned: bool = False
    received_from: str = ""

    def pending(self) -> list[RecipientState]:
        return [r for r in self.recipients if r.state == PENDING]

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> "QueueRecord":
        raw = json.loads(data)
        raw["recipients"] = [RecipientState(**r) for r in raw["recipients"]]
        return cls(**raw)

    def to_json_compact(self) -> bytes:
        """
        The record as a queue file's envelope holds it.
        """
        return json.dumps(asdict(self), separators=(",", ":")).encode("utf-8")

    def state_json(self) -> bytes:
        """
        What changes after the envelope is written: a state record's payload.
        """
        return json.dumps(
            {"attempts": self.attempts, "next_attempt": self.next_attempt,
             "warned": self.warned,
             "recipients": [[r.state, r.last_error, r.dsn, r.remote_reply, r.relay, r.notified]
                            for r in self.recipients]},
            separators=(",", ":")).encode("utf-8")

    def apply_state(self, data: bytes) -> None:
        """
        Bring this record to the state of a state record's payload.
        """
        raw = json.loads(data)
        states = raw["recipients"]
        if len(states) != len(self.recipients):
            raise ValueError("a state record does not match the envelope's recipients")
        attempts, next_attempt, warned = (raw["attempts"], float(raw["next_attempt"]),
                                          bool(raw["warned"]))
        for rcpt, (state, last_error, dsn, remote_reply, relay, notified) in zip(
                self.recipients, states):
            if state not in (PENDING, SENT, FAILED):
                raise ValueError(f"unknown recipient state {state!r}")
            rcpt.state, rcpt.last_error, rcpt.dsn = state, last_error, dsn
            rcpt.remote_reply, rcpt.relay, rcpt.notified = remote_reply, relay, bool(notified)
        self.attempts, self.next_attempt, self.warned = int(attempts), next_attempt, warned


def valid_id(queue_id: str) -> bool:
    return bool(_ID.fullmatch(queue_id))


class ContentSection(io.RawIOBase):
    """
    The content of a queue file: C{size} bytes from C{offset} of an open
    file, read like a file of its own (for the courier's C{FileSender}).
    """

    def __init__(self, f: BinaryIO, offset: int, size: int) -> None:
        super().__init__()
        self._file = f
        self._position = offset
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0 or n > self._left:
            n = self._left
        if n == 0:
            return b""
        data = os.pread(self._file.fileno(), n, self._position)
        self._position += len(data)
        self._left -= len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


# The layout a message was loaded from, when not the queue file's.
LEGACY = "legacy"


class QueueStore:
    """
    Reads and writes queued messages under C{DATA/queue}.
    """

    # A file whose appended state records pass this many bytes (and eight
    # times the size of one) is rewritten whole at the next save.
    compact_above = 256 * 1024

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.tmp = os.path.join(self.directory, "tmp")
        self.msg_dir = os.path.join(self.directory, "msg")
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        # The layout before one file per message (still loaded and delivered).
        self.content_dir = os.path.join(self.directory, "content")
        self.envelope_dir = os.path.join(self.directory, "envelope")
        # Directory fsyncs of concurrent writes and removals are shared.
        self.syncer = DirectorySyncer()
        # Messages loaded from the legacy layout, and queue files with a
        # torn tail (rewritten whole before the next append).
        self.legacy: set[str] = set()
        self.torn: set[str] = set()

    def ensure(self) -> None:
        for d in (self.directory, self.tmp, self.msg_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def path(self, queue_id: str) -> str:
        """
        The queue file of a message.
        """
        return os.path.join(self.msg_dir, queue_id)

    def staged_path(self, queue_id: str) -> str:
        return os.path.join(self.tmp, queue_id)

    def content_path(self, queue_id: str) -> str:
        """
        A legacy message's content file.
        """
        return os.path.join(self.content_dir, queue_id)

    def envelope_path(self, queue_id: str) -> str:
        """
        A legacy message's envelope file.
        """
        return os.path.join(self.envelope_dir, queue_id + ".json")

    def _is_legacy(self, queue_id: str) -> bool:
        return queue_id in self.legacy

    def add(self, record: QueueRecord, spool: MessageSpool) -> None:
        """
        Store a new message durably.
        """
        self.stage(record, spool)
        self.commit(record.queue_id)

    def stage(self, record: QueueRecord, spool: MessageSpool) -> None:
        """
        Phase 1 of L{add}: the queue file in C{tmp/}, fsynced; nothing in
        C{msg/} yet, so nothing is delivered.  On failure nothing is left.
        """
        self.ensure()
        record.size = spool.size
        staged = self.staged_path(record.queue_id)
        head = qfile.MAGIC + qfile.frame(qfile.ENVELOPE, record.to_json_compact()) \
            + qfile.content_frame(spool.size)
        write_file(staged, _prefixed(head, spool.chunks()))

    def commit(self, queue_id: str) -> None:
        """
        Phase 2 of L{add}: the file's rename into C{msg/}, then that
        directory fsynced (group-committed).  On failure nothing is left.
        """
        try:
            rename(self.staged_path(queue_id), self.path(queue_id))
            self.syncer.sync(self.msg_dir)
        except BaseException:
            self.abort(queue_id)
            raise

    def abort(self, queue_id: str) -> None:
        """
        Remove a message staged or committed, whatever of it exists.
        """
        discard(self.staged_path(queue_id))
        if os.path.exists(self.path(queue_id)):
            discard(self.path(queue_id))
            try:
                fsync_directory(self.msg_dir)
            except OSError:
                pass  # the removal is what matters

    def save(self, record: QueueRecord) -> None:
        """
        Record a message's state durably: a state record appended to its
        file and fsynced (the file rewritten whole when its tail was torn,
        also by an append of this process that failed, or its appended
        records have grown large).
        """
        queue_id = record.queue_id
        if self._is_legacy(queue_id):
            atomic_write(self.envelope_path(queue_id), record.to_json())
            return
        state = record.state_json()
        path = self.path(queue_id)
        if queue_id not in self.torn:
            # What the state records take, about (the envelope as first
            # written was no larger than it is now).
            appended = (os.stat(path).st_size - record.size - len(qfile.MAGIC)
                        - len(record.to_json_compact()) - 2 * qfile.FRAME)
            if appended <= max(self.compact_above, 8 * len(state)):
                try:
                    append_file(path, qfile.frame(qfile.STATE, state))
                except BaseException:
                    # Part of the record may be in the file (a short write
                    # then ENOSPC, or EIO at the fsync): a tear that the
                    # next save must not append behind, where no load looks.
                    self.torn.add(queue_id)
                    raise
                return
        self._rewrite(record)

    def _rewrite(self, record: QueueRecord) -> None:
        """
        Replace a message's file with one holding its envelope as it is now
        and its content, and no state records.
        """
        queue_id = record.queue_id
        path, staged = self.path(queue_id), self.staged_path(queue_id) + ".rewrite"
        head = qfile.MAGIC + qfile.frame(qfile.ENVELOPE, record.to_json_compact()) \
            + qfile.content_frame(record.size)
        with self.open_content(queue_id) as content:
            try:
                write_file(staged, _prefixed(head, iter(lambda: content.read(65536), b"")))
                rename(staged, path)
            except BaseException:
                discard(staged)
                raise
        self.syncer.sync(self.msg_dir)
        self.torn.discard(queue_id)

    def remove(self, queue_id: str) -> bool:
        """
        Remove a message: its file unlinked, the directory not fsynced for
        it (see the module's description); a legacy message as before, its
        envelope first (the commit), then its content.
        """
        try:
            unlink(self.path(queue_id))
        except FileNotFoundError:
            pass  # not in msg/: a legacy message, or one removed already
        else:
            self.torn.discard(queue_id)
            return True
        try:
            unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            return False
        self.syncer.sync(self.envelope_dir)
        try:
            unlink(self.content_path(queue_id))
        except FileNotFoundError:
            pass  # a crash between the two unlinks: the envelope was the commit
        self.legacy.discard(queue_id)
        return True

    def load(self, queue_id: str) -> QueueRecord:
        """
        A committed message's record, from its queue file or (a queue
        written before that layout) its envelope file.
        """
        try:
            f = open(self.path(queue_id), "rb")
        except FileNotFoundError:
            with open(self.envelope_path(queue_id), "rb") as legacy:
                record = QueueRecord.from_json(legacy.read())
            self.legacy.add(queue_id)
            return record
        with f:
            record, torn = self._read(f)
        if torn:
            self.torn.add(queue_id)
        return record

    def _read(self, f: BinaryIO) -> tuple[QueueRecord, bool]:
        """
        Parse an open queue file: its record in its last whole state, and
        whether its tail was torn.
        """
        data = f.read(qfile.FIRST_READ)
        parsed = qfile.parse_head(data)
        if parsed.need > len(data):
            data += f.read(parsed.need - len(data))
            parsed = qfile.parse_head(data)
            if parsed.need > len(data):
                raise qfile.CorruptFile("the file ends inside its envelope")
        record = QueueRecord.from_json(parsed.envelope)
        if record.size != parsed.content_size:
            raise qfile.CorruptFile("the envelope's size does not match the content's")
        tail_at = parsed.content_offset + parsed.content_size
        if len(data) < qfile.FIRST_READ:
            # The whole file was read (a short read of a regular file is its end).
            if len(data) < tail_at:
                raise qfile.CorruptFile("the content is cut short")
            tail = data[tail_at:]
        else:
            if os.fstat(f.fileno()).st_size < tail_at:
                raise qfile.CorruptFile("the content is cut short")
            f.seek(tail_at)
            tail = f.read()
        states, torn = qfile.parse_tail(tail)
        if states:
            record.apply_state(states[-1])
        return record, torn

    def committed_ids(self) -> list[str]:
        """
        The ids of every committed message (a queue file, or a legacy
        envelope).
        """
        ids = []
        for directory, suffix in ((self.msg_dir, ""), (self.envelope_dir, ".json")):
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                continue
            for name in names:
                if name.endswith(suffix) and valid_id(name[:len(name) - len(suffix)]):
                    ids.append(name[:len(name) - len(suffix)])
        return list(dict.fromkeys(ids))

    orphan_age = 600.0  # seconds: younger content may be a receiver's write in progress

    def load_all(self) -> Iterator[QueueRecord | tuple[str, Exception]]:
        """
        Every committed message; interrupted writes are cleaned up.  A record
        that cannot be read, or whose content is missing, is yielded as
        C{(id, error)} (see L{quarantine}); removed orphan content (legacy
        layout) as C{(id, OrphanContent)}.
        """
        self.ensure()
        for name in os.listdir(self.tmp):
            discard(os.path.join(self.tmp, name))
        committed = set()
        for name in os.listdir(self.msg_dir):
            if not valid_id(name):
                continue
            committed.add(name)
            try:
                yield self.load(name)
            except (OSError, ValueError, TypeError, KeyError, AttributeError,
                    qfile.CorruptFile) as e:
                yield name, e
        if os.path.isdir(self.envelope_dir):
            yield from self._load_legacy(committed)

    def _load_legacy(self, committed: set[str]) -> Iterator[QueueRecord | tuple[str, Exception]]:
        for name in os.listdir(self.envelope_dir):
            if not name.endswith(".json"):
                continue
            queue_id = name[:-5]
            if queue_id in committed:
                continue
            committed.add(queue_id)
            try:
                with open(self.envelope_path(queue_id), "rb") as f:
                    record = QueueRecord.from_json(f.read())
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                self.legacy.add(queue_id)
                yield queue_id, e
                continue
            self.legacy.add(queue_id)
            if not os.path.exists(self.content_path(queue_id)):
                yield queue_id, FileNotFoundError("the content file is missing")
                continue
            yield record
        if not os.path.isdir(self.content_dir):
            return
        now = time.time()
        for name in os.listdir(self.content_dir):
            path = os.path.join(self.content_dir, name)
            if name not in committed:
                try:
                    if now - os.stat(path).st_mtime < self.orphan_age:
                        continue
                except FileNotFoundError:
                    continue
                discard(path)
                yield name, OrphanContent("content without an envelope (an interrupted "
                                          "write, never acknowledged) removed")

    def open_content(self, queue_id: str) -> BinaryIO:
        """
        A message's content, opened for reading (C{read}, C{close}).
        """
        if self._is_legacy(queue_id):
            return open(self.content_path(queue_id), "rb")
        f = open(self.path(queue_id), "rb")
        try:
            parsed, _ = self._content_head(f)
        except BaseException:
            f.close()
            raise
        return ContentSection(f, parsed.content_offset, parsed.content_size)  # type: ignore[return-value]  # a file-like object, read and closed

    def _content_head(self, f: BinaryIO) -> tuple[qfile.Head, bytes]:
        """
        Where an open queue file's content is, and the file's first bytes.
        """
        data = f.read(qfile.FIRST_READ)
        parsed = qfile.parse_head(data, envelope=False)
        if parsed.need > len(data):
            data += f.read(parsed.need - len(data))
            parsed = qfile.parse_head(data, envelope=False)
            if parsed.need > len(data):
                raise qfile.CorruptFile("the file ends inside its envelope")
        return parsed, data

    def read_content(self, queue_id: str, limit: int) -> bytes | None:
        """
        A message's content if it is at most C{limit} bytes, else C{None};
        C{FileNotFoundError} if the message is gone.  A small message's
        file is read once.
        """
        if self._is_legacy(queue_id):
            with open(self.content_path(queue_id), "rb") as legacy:
                data = legacy.read(limit + 1)
            return data if len(data) <= limit else None
        with open(self.path(queue_id), "rb") as f:
            parsed, data = self._content_head(f)
            if parsed.content_size > limit:
                return None
            end = parsed.content_offset + parsed.content_size
            if len(data) < end:
                data += f.read(end - len(data))
                if len(data) < end:
                    raise qfile.CorruptFile("the content is cut short")
            return data[parsed.content_offset:end]

    def quarantine(self, queue_id: str, reason: str) -> None:
        """
        Move a message that cannot be used (an unreadable file, missing
        content) to C{corrupt/} with the reason beside it, as Postfix does;
        C{queue list} shows it and an administrator decides.
        """
        os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
        moved = []
        for source, name in ((self.path(queue_id), queue_id),
                             (self.envelope_path(queue_id), queue_id + ".json"),
                             (self.content_path(queue_id), queue_id)):
            try:
                rename(source, os.path.join(self.corrupt_dir, name))
            except FileNotFoundError:
                continue
            moved.append(os.path.dirname(source))
        atomic_write(os.path.join(self.corrupt_dir, queue_id + ".reason"),
                     reason.encode("utf-8", "replace") + b"\n")
        for directory in moved:
            fsync_directory(directory)
        self.legacy.discard(queue_id)
        self.torn.discard(queue_id)

    def corrupt(self) -> list[tuple[str, str]]:
        """
        The messages in C{corrupt/}: C{(id, reason)}.
        """
        try:
            names = os.listdir(self.corrupt_dir)
        except FileNotFoundError:
            return []
        found = []
        for name in sorted(names):
            if name.endswith(".reason"):
                try:
                    with open(os.path.join(self.corrupt_dir, name), encoding="utf-8",
                              errors="replace") as f:
                        reason = f.read().strip()
                except OSError as e:
                    reason = str(e)
                found.append((name[:-7], reason))
        return found

    def headers(self, queue_id: str, limit: int = 65536) -> bytes:
        """
        The header section of a queued message (for a DSN).
        """
        with self.open_content(queue_id) as f:
            data = f.read(limit)
        end = data.find(b"\n\n")
        return data[: end + 1] if end >= 0 else data


def _prefixed(head: bytes, chunks: Any) -> Iterator[bytes]:
    yield head
    yield from chunks
