# -*- test-case-name: tests.test_maildir,tests.test_smtp_limits,tests.test_plugins -*-
"""
A received message on its way to its recipients: the envelope, and the
spool that holds the content.

The content is kept with LF line endings, as it will be stored.  Small
messages stay in memory; past L{MessageSpool.memory_limit} the spool moves
to an unlinked file in C{DATA/tmp}, so a hundred sessions each sending 25
MiB do not need 2.5 GB of memory.  Once complete the spool is read-only and
may be read from several threads at once (each reader keeps its own offset).
"""

from __future__ import annotations

import datetime
import email.utils
import os
import re
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from twisted.internet.defer import Deferred, succeed

from mailstack.address import Address

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


class MessageSpool:
    """
    The content of one message, written once, then read any number of times.

    A plugin reads it with L{read} (small messages) or L{chunks}, in a
    worker thread for a large one, and looks at its header with
    L{header_fields} or L{header_names}; it never writes to it (filters
    and transforms add header fields through their answers).

    @ivar size: the content's size in bytes (LF line endings), header
        fields added included.
    @ivar lines: the number of LFs: the size with CRLF line endings is
        C{size + lines}.
    @ivar error: the first failed write to the spill file (a full disk),
        or C{None}.
    @ivar memory_limit: past this many bytes the content moves to a file.
    """

    memory_limit = 1024 * 1024
    backlog_limit = 4 * 1024 * 1024  # bytes waiting for the spill thread
    chunk_size = 256 * 1024
    head_limit = 256 * 1024

    def __init__(self, directory: str | None = None,
                 blocking: Callable[..., Deferred[Any]] | None = None) -> None:
        """
        @param blocking: C{blocking(f, *args)} runs C{f} in a worker thread
            and returns a Deferred: the spill file is then written there,
            in order, never on the reactor thread.  C{None}: written inline.
        """
        self._directory = directory
        self._blocking = blocking
        self._memory: bytearray | None = bytearray()
        self._fd: int | None = None
        self._prefix = b""
        self.size = 0
        self.lines = 0  # LF count: the CRLF size (IMAP, POP3) is size + lines
        self._head = bytearray()
        self._head_done = False
        self._head_cut = False  # the header went on past head_limit
        self._lock = threading.Lock()
        self._closed = False
        self._writes: Deferred[None] | None = None  # the last queued spill write
        self.error: OSError | None = None  # the first failed spill write
        self.backlog = 0  # bytes given to write() and not yet written
        self._drain_waiters: list[Deferred[None]] = []
        self._cuts: list[tuple[int, int]] = []  # removed header fields (content offsets)

    def write(self, data: bytes) -> None:
        """
        Append content (LF line endings).  A failed spill write (a full
        disk) is kept in L{error} for L{finished}; later data is counted
        and dropped.
        """
        if not data:
            return
        if not self._head_done:
            self._collect_head(data)
        self.size += len(data)
        self.lines += data.count(b"\n")
        if self.error is not None:
            return
        if self._memory is not None:
            self._memory += data
            if len(self._memory) > self.memory_limit:
                data, self._memory = bytes(self._memory), None
                self._queue(self._spill, data)
        else:
            self._queue(self._append, data)

    def _queue(self, f: Callable[[bytes], None], data: bytes) -> None:
        blocking = self._blocking
        if blocking is None:
            try:
                f(data)
            except OSError as e:
                self.error = e
            return

        def run(_: Any) -> Any:
            if self.error is not None or self._closed:
                return None
            return blocking(f, data)

        def failed(failure: Any) -> None:
            failure.trap(OSError)
            self.error = self.error or failure.value

        def written(result: Any) -> Any:
            self.backlog -= len(data)
            if self.backlog <= self.backlog_limit // 2:
                waiting, self._drain_waiters = self._drain_waiters, []
                for d in waiting:
                    d.callback(None)
            return result

        self.backlog += len(data)
        previous = self._writes if self._writes is not None else succeed(None)
        self._writes = previous.addCallback(run).addErrback(failed).addBoth(written)

    @property
    def backlog_full(self) -> bool:
        """
        Whether more than L{backlog_limit} bytes wait to be written.
        """
        return self.backlog > self.backlog_limit

    def drained(self) -> Deferred[None]:
        """
        Fire when the bytes waiting to be written are down to half the limit.
        """
        if self.backlog <= self.backlog_limit // 2:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def finished(self) -> Deferred[None]:
        """
        Fire once every spill write is done; fail with the first error.
        """
        writes, self._writes = self._writes, None
        d = writes if writes is not None else succeed(None)

        def check(_: Any) -> None:
            if self.error is not None:
                raise self.error

        return d.addCallback(check)

    def _append(self, data: bytes) -> None:
        with self._lock:
            fd = self._fd
            if fd is None:
                return  # closed meanwhile
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]

    def add_header(self, lines: bytes) -> None:
        """
        Add header lines (trace, fix-ups) in front of the received content;
        later calls go after earlier ones.  L{header_names} does not see them.
        """
        self._prefix += lines
        self.size += len(lines)
        self.lines += lines.count(b"\n")

    def prepend_header(self, lines: bytes) -> None:
        """
        Put header lines at the very top (filters' and transforms' fields).
        """
        self._prefix = lines + self._prefix
        self.size += len(lines)
        self.lines += lines.count(b"\n")

    def _collect_head(self, data: bytes) -> None:
        self._head += data
        end = self._head.find(b"\n\n")
        if self._head.startswith(b"\n"):
            end = 0
        if end >= 0:
            del self._head[end + 1 :]
            self._head_done = True
        elif len(self._head) > self.head_limit:
            del self._head[self.head_limit :]
            self._head_done = True
            self._head_cut = True

    def _spill(self, data: bytes) -> None:
        if self._directory is not None:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
        f = tempfile.TemporaryFile(dir=self._directory)
        with self._lock:
            if self._closed:
                f.close()
                return
            self._fd = os.dup(f.fileno())
        f.close()
        self._append(data)

    def header_names(self) -> list[str]:
        """
        The names of the header fields, lowercased, in order.

        @return: e.g. C{["received", "from", "subject"]}.
        """
        if self._cuts:
            # Every field matches: header_fields keeps only those that do.
            return [_HEADER_NAME.match(f).group(1).decode("ascii").lower()  # type: ignore[union-attr]
                    for f in self.header_fields()]
        return [m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(self._head)]

    def _field_spans(self) -> list[tuple[int, int]]:
        """
        Where each received header field (with its continuation lines) is
        in the content, except those removed.
        """
        spans: list[tuple[int, int]] = []
        starts: list[bool] = []
        pos = 0
        for line in bytes(self._head).splitlines(keepends=True):
            if line[:1] in (b" ", b"\t") and spans:
                spans[-1] = (spans[-1][0], pos + len(line))
            else:
                spans.append((pos, pos + len(line)))
                starts.append(_HEADER_NAME.match(line) is not None)
            pos += len(line)
        # The fields are read once the message is complete (filters at DATA,
        # deliveries): a header without a body ends with the message, so
        # its last field is whole; only a header cut at head_limit may end
        # in a partial field (a forged field as the last line of a message
        # without a body must still be seen, and removed).
        if not self._head.endswith(b"\n") or self._head_cut:
            spans, starts = spans[:-1], starts[:-1]  # maybe cut short
        return [span for span, ok in zip(spans, starts) if ok and span not in self._cuts]

    def header_fields(self) -> list[bytes]:
        """
        The received header fields in order, each with its continuation
        lines and LF (not those added with L{add_header} or
        L{prepend_header}, nor those removed).

        @return: the fields, e.g. C{[b"From: a@example.org\\n", ...]}; a
            field's index here is what L{mailstack.plugin.Verdict} C{remove}
            takes.
        """
        return [bytes(self._head[start:end]) for start, end in self._field_spans()]

    def remove_header_fields(self, indexes: Any) -> None:
        """
        Remove received header fields, by their index in L{header_fields}
        (e.g. a forged C{Authentication-Results}, RFC 8601 5); readers
        started later do not see them.  An index out of range is an
        C{IndexError} and removes nothing.
        """
        spans = self._field_spans()
        chosen = sorted(set(indexes))
        if any(not 0 <= i < len(spans) for i in chosen):
            raise IndexError(f"no header field {chosen} of {len(spans)}")
        for i in chosen:
            start, end = spans[i]
            removed = self._head[start:end]
            self.size -= len(removed)
            self.lines -= removed.count(b"\n")
            with self._lock:
                self._cuts = sorted(self._cuts + [(start, end)])

    def chunks(self) -> Iterator[bytes]:
        """
        Yield the content from its start; safe in any thread once complete
        (after L{finished}).  Each reader holds its own reference to the
        content (a duplicate of the spill file's descriptor), so L{close}
        can never cut a reader short or let it read a reused descriptor.

        @return: an iterator of byte strings, the content in order (LF line
            endings); reading a spilled message blocks, so iterate in a
            worker thread.
        @raise ValueError: the spool is closed.
        """
        with self._lock:
            if self._closed:
                raise ValueError("the message spool is closed")
            prefix, memory, cuts = self._prefix, self._memory, list(self._cuts)
            source = None if self._fd is None else os.fdopen(os.dup(self._fd), "rb", 0)
        if source is None and memory is None:
            raise ValueError("the message spool lost its content")
        if cuts:
            return _without(self._read(prefix, memory, source), len(prefix), cuts)
        return self._read(prefix, memory, source)

    def _read(self, prefix: bytes, memory: bytearray | None, source: Any) -> Iterator[bytes]:
        if prefix:
            yield prefix
        if memory is not None:
            yield bytes(memory)
            return
        with source:
            offset = 0
            while True:
                chunk = os.pread(source.fileno(), self.chunk_size, offset)
                if not chunk:
                    return
                offset += len(chunk)
                yield chunk

    def read(self) -> bytes:
        """
        The whole content (for tests and small messages).

        @return: the message, LF line endings, header fields added by
            filters and transforms included.
        @raise ValueError: the spool is closed.
        """
        return b"".join(self.chunks())

    def close(self) -> None:
        """
        Free the memory or the temporary file (readers already started keep
        their own reference until they finish).
        """
        with self._lock:
            self._closed = True
            self._memory = bytearray()
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _without(chunks: Iterator[bytes], prefix: int,
             cuts: list[tuple[int, int]]) -> Iterator[bytes]:
    """
    The chunks with the byte ranges C{cuts} (content offsets, after the
    C{prefix} bytes of added fields) left out.
    """
    offset = -prefix
    for chunk in chunks:
        end = offset + len(chunk)
        pieces, at = [], offset
        for start, stop in cuts:
            if stop <= at or start >= end:
                continue
            if start > at:
                pieces.append(chunk[at - offset:start - offset])
            at = max(at, stop)
        if at < end:
            pieces.append(chunk[at - offset:])
        offset = end
        joined = b"".join(pieces)
        if joined:
            yield joined


@dataclass(frozen=True)
class LocalRecipient:
    """
    A copy for a local mailbox: the user who owns it, and the address it was
    sent to (recorded in C{Delivered-To:}; keeps a plus-address tag).

    @ivar user: the mailbox's owner, a local user.
    @ivar delivered_to: the address that led to it (an alias, the user's
        own address, or a plus-address of it).
    """

    user: Address
    delivered_to: Address


def new_queue_id() -> str:
    """
    A short random id for log lines and Received headers, Postfix-like.
    """
    return secrets.token_hex(6).upper()


@dataclass
class Envelope:
    """
    Who a message is from and for, and where it came from: C{rcpts} as the
    client gave them, C{local} and C{remote} as they resolved.

    @ivar queue_id: the message's id, in every log line about it and in
        the queue.
    @ivar sender: the envelope sender (MAIL FROM), or C{None} for the null
        sender.
    @ivar rcpts: the accepted recipients as the client gave them, in order.
    @ivar local: the local mailboxes they resolved to (aliases expanded),
        one L{LocalRecipient} per mailbox.
    @ivar remote: the remote addresses, for the queue.
    @ivar received_at: when it arrived, wall-clock seconds since the epoch.
    @ivar client: the client as the log shows it (C{name[ip]:port}).
    @ivar origin: where it came from: C{smtp}, C{submission},
        C{submissions}, C{local} (maildrop pickup) or C{bounce}.
    @ivar folder: the Maildir folder a filter asked for
        (L{mailstack.plugin.Verdict}), or C{None} for the inbox.
    """

    queue_id: str
    sender: Address | None
    rcpts: list[Address] = field(default_factory=list)
    local: list[LocalRecipient] = field(default_factory=list)
    remote: list[Address] = field(default_factory=list)
    received_at: float = 0.0
    client: str = ""
    # Where it came from: smtp, submission, submissions, local (maildrop
    # pickup), bounce; and the Maildir folder a filter asked for.
    origin: str = ""
    folder: str | None = None

    def add(self, rcpt: Address, resolution: Any) -> None:
        """
        Record an accepted recipient and where it resolved: one copy per
        mailbox, however many recipients lead to it.
        """
        self.rcpts.append(rcpt)
        mailboxes = {local.user for local in self.local}
        for local in resolution.local:
            if local.user not in mailboxes:
                self.local.append(local)
                mailboxes.add(local.user)
        for remote in resolution.remote:
            if remote not in self.remote:
                self.remote.append(remote)

    @property
    def return_path(self) -> str:
        """
        The sender as a C{Return-Path:} shows it: C{<address>}, or C{<>}.
        """
        return f"<{self.sender}>" if self.sender is not None else "<>"


def rfc5322_date(timestamp: float) -> str:
    """
    A date for a header (Date, Received, DSN), in UTC.
    """
    return email.utils.format_datetime(
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))
