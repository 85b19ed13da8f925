# -*- test-case-name: tests.test_message -*-
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
import tempfile
from dataclasses import dataclass, field
from typing import Any, Iterator

from mailstack.address import Address

_HEADER_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


class MessageSpool:
    """
    The content of one message, written once, then read any number of times.
    """

    memory_limit = 1024 * 1024
    chunk_size = 256 * 1024
    head_limit = 256 * 1024

    def __init__(self, directory: str | None = None) -> None:
        self._directory = directory
        self._memory: bytearray | None = bytearray()
        self._fd: int | None = None
        self._prefix = b""
        self.size = 0
        self.lines = 0  # LF count: the CRLF size (IMAP, POP3) is size + lines
        self._head = bytearray()
        self._head_done = False

    def write(self, data: bytes) -> None:
        """
        Append content (LF line endings).
        """
        if not data:
            return
        if not self._head_done:
            self._collect_head(data)
        self.size += len(data)
        self.lines += data.count(b"\n")
        if self._memory is not None:
            self._memory += data
            if len(self._memory) > self.memory_limit:
                self._spill()
        else:
            assert self._fd is not None
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]

    def add_header(self, lines: bytes) -> None:
        """
        Add header lines (trace, fix-ups) in front of the received content;
        later calls go after earlier ones.  L{header_names} does not see them.
        """
        self._prefix += lines
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

    def _spill(self) -> None:
        if self._directory is not None:
            os.makedirs(self._directory, mode=0o700, exist_ok=True)
        f = tempfile.TemporaryFile(dir=self._directory)
        self._fd = os.dup(f.fileno())
        f.close()
        assert self._memory is not None
        data, self._memory = self._memory, None
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]

    def header_names(self) -> list[str]:
        """
        The names of the header fields, lowercased, in order.
        """
        return [m.group(1).decode("ascii").lower() for m in _HEADER_NAME.finditer(self._head)]

    def chunks(self) -> Iterator[bytes]:
        """
        Yield the content from its start; safe in any thread once complete.
        """
        if self._prefix:
            yield self._prefix
        if self._memory is not None:
            yield bytes(self._memory)
            return
        assert self._fd is not None
        offset = 0
        while True:
            chunk = os.pread(self._fd, self.chunk_size, offset)
            if not chunk:
                return
            offset += len(chunk)
            yield chunk

    def read(self) -> bytes:
        """
        The whole content (for tests and small messages).
        """
        return b"".join(self.chunks())

    def close(self) -> None:
        """
        Free the memory or the temporary file.
        """
        self._memory = bytearray()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass(frozen=True)
class LocalRecipient:
    """
    A copy for a local mailbox: the user who owns it, and the address it was
    sent to (recorded in C{Delivered-To:}; keeps a plus-address tag).
    """

    user: Address
    delivered_to: Address


@dataclass
class Envelope:
    """
    Who a message is from and for, and where it came from: C{rcpts} as the
    client gave them, C{local} and C{remote} as they resolved.
    """

    queue_id: str
    sender: Address | None
    rcpts: list[Address] = field(default_factory=list)
    local: list[LocalRecipient] = field(default_factory=list)
    remote: list[Address] = field(default_factory=list)
    received_at: float = 0.0
    client: str = ""

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
        return f"<{self.sender}>" if self.sender is not None else "<>"


def rfc5322_date(timestamp: float) -> str:
    """
    A date for a header (Date, Received, DSN), in UTC.
    """
    return email.utils.format_datetime(
        datetime.datetime.fromtimestamp(timestamp, datetime.timezone.utc))
