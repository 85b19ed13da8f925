# -*- test-case-name: tests.test_queue -*-
"""
The queue on disk: one content file and one envelope record per message::

    DATA/queue/content/<id>        the message (LF line endings), written once
    DATA/queue/envelope/<id>.json  sender, arrival, attempts, each recipient's state
    DATA/queue/tmp/                files being written

Writing a message: content to tmp/, fsync, rename into content/; envelope
to tmp/, fsync, rename into envelope/; fsync both directories.  The
envelope's rename is the commit: on load, content without an envelope is
an interrupted write and is removed.  The directory fsyncs are
group-committed (L{DirectorySyncer}): messages committed or removed at
the same time share them, and each caller still returns only after an
fsync that began after its own rename or unlink.  Every later change to the envelope
(a recipient delivered, an attempt counted) is a new file renamed over the
old one, so a crash leaves each recipient either pending or done: at worst
delivered twice, never lost.  All methods block; call them in a thread.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Iterator

from mailstack.message import MessageSpool
from mailstack.safeio import (
    DirectorySyncer, atomic_write, discard, fsync_directory, rename, unlink, write_file,
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


def valid_id(queue_id: str) -> bool:
    return bool(_ID.fullmatch(queue_id))


class QueueStore:
    """
    Reads and writes queued messages under C{DATA/queue}.
    """

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.tmp = os.path.join(self.directory, "tmp")
        self.content_dir = os.path.join(self.directory, "content")
        self.envelope_dir = os.path.join(self.directory, "envelope")
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        # Directory fsyncs of concurrent writes and removals are shared.
        self.syncer = DirectorySyncer()

    def ensure(self) -> None:
        for d in (self.directory, self.tmp, self.content_dir, self.envelope_dir):
            os.makedirs(d, mode=0o700, exist_ok=True)

    def content_path(self, queue_id: str) -> str:
        return os.path.join(self.content_dir, queue_id)

    def envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.envelope_dir, queue_id + ".json")

    def add(self, record: QueueRecord, spool: MessageSpool) -> None:
        """
        Store a new message durably.
        """
        self.stage(record, spool)
        self.commit(record.queue_id)

    def staged_envelope_path(self, queue_id: str) -> str:
        return os.path.join(self.tmp, queue_id + ".json")

    def stage(self, record: QueueRecord, spool: MessageSpool) -> None:
        """
        Phase 1 of L{add}: the content in C{content/} and the envelope in
        C{tmp/}, both fsynced; no envelope in C{envelope/} yet, so nothing
        is delivered.  On failure nothing is left.
        """
        self.ensure()
        tmp = os.path.join(self.tmp, record.queue_id)
        staged = self.staged_envelope_path(record.queue_id)
        try:
            write_file(tmp, spool.chunks())
            rename(tmp, self.content_path(record.queue_id))
            self.syncer.sync(self.content_dir)
            record.size = spool.size
            write_file(staged, [record.to_json()])
        except BaseException:
            for path in (tmp, self.content_path(record.queue_id), staged):
                discard(path)
            raise

    def commit(self, queue_id: str) -> None:
        """
        Phase 2 of L{add}: the envelope's rename into C{envelope/}, then its
        directory fsynced.  On failure nothing is left.
        """
        try:
            rename(self.staged_envelope_path(queue_id), self.envelope_path(queue_id))
            self.syncer.sync(self.envelope_dir)
        except BaseException:
            self.abort(queue_id)
            raise

    def abort(self, queue_id: str) -> None:
        """
        Remove a message staged or committed, whatever of it exists.
        """
        discard(self.staged_envelope_path(queue_id))
        if os.path.exists(self.envelope_path(queue_id)):
            discard(self.envelope_path(queue_id))
            try:
                fsync_directory(self.envelope_dir)
            except OSError:
                pass  # the removal is what matters
        discard(self.content_path(queue_id))

    def save(self, record: QueueRecord) -> None:
        """
        Replace a message's envelope record durably.
        """
        atomic_write(self.envelope_path(record.queue_id), record.to_json())

    def remove(self, queue_id: str) -> bool:
        """
        Remove a message: the envelope first (the commit), then the content.
        """
        try:
            unlink(self.envelope_path(queue_id))
        except FileNotFoundError:
            return False
        self.syncer.sync(self.envelope_dir)
        try:
            unlink(self.content_path(queue_id))
        except FileNotFoundError:
            pass  # a crash between the two unlinks: the envelope was the commit
        return True

    def load(self, queue_id: str) -> QueueRecord:
        with open(self.envelope_path(queue_id), "rb") as f:
            return QueueRecord.from_json(f.read())

    def committed_ids(self) -> list[str]:
        """
        The ids of every committed message (an envelope on disk).
        """
        self.ensure()
        return [n[:-5] for n in os.listdir(self.envelope_dir) if n.endswith(".json")]

    orphan_age = 600.0  # seconds: younger content may be a receiver's write in progress

    def load_all(self) -> Iterator[QueueRecord | tuple[str, Exception]]:
        """
        Every committed message; interrupted writes are cleaned up.  A record
        that cannot be read, or whose content is missing, is yielded as
        C{(id, error)} (see L{quarantine}); removed orphan content as
        C{(id, OrphanContent)}.
        """
        self.ensure()
        for name in os.listdir(self.tmp):
            discard(os.path.join(self.tmp, name))
        committed = set()
        for name in os.listdir(self.envelope_dir):
            if not name.endswith(".json"):
                continue
            queue_id = name[:-5]
            committed.add(queue_id)
            try:
                record = self.load(queue_id)
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                yield queue_id, e
                continue
            if not os.path.exists(self.content_path(queue_id)):
                yield queue_id, FileNotFoundError("the content file is missing")
                continue
            yield record
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

    def quarantine(self, queue_id: str, reason: str) -> None:
        """
        Move a message that cannot be used (an unreadable envelope, missing
        content) to C{corrupt/} with the reason beside it, as Postfix does;
        C{queue list} shows it and an administrator decides.
        """
        os.makedirs(self.corrupt_dir, mode=0o700, exist_ok=True)
        for source, name in ((self.envelope_path(queue_id), queue_id + ".json"),
                             (self.content_path(queue_id), queue_id)):
            try:
                rename(source, os.path.join(self.corrupt_dir, name))
            except FileNotFoundError:
                pass
        atomic_write(os.path.join(self.corrupt_dir, queue_id + ".reason"),
                     reason.encode("utf-8", "replace") + b"\n")
        for directory in (self.envelope_dir, self.content_dir):
            fsync_directory(directory)

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
        with open(self.content_path(queue_id), "rb") as f:
            data = f.read(limit)
        end = data.find(b"\n\n")
        return data[: end + 1] if end >= 0 else data
