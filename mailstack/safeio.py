# -*- test-case-name: tests.test_faults_durable,tests.test_faults_imap -*-
"""
Durable file writes, the only way mailstack puts data on disk that it has
promised to keep: the data fsynced before a rename makes it visible, the
directory fsynced after.

Every durable write in mailstack (Maildir copies, queue content and
envelopes, the users and aliases files, uid lists, the maildrop) goes
through the functions here, and they make their system calls through one
L{Disk}.  Tests swap in L{RecordingDisk} (L{use_disk}) to see the order of
those calls (write, fsync of the file, rename, fsync of the directory) and
to make any one of them fail, e.g. with C{ENOSPC}, without filling a disk.

A write that fails removes what it had written: no partial file is left
behind for a restart to find.
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import threading
from typing import Any, Callable, Iterable


class Disk:
    """
    The system calls of a durable write.
    """

    def create(self, path: str, mode: int) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)

    def open_append(self, path: str) -> int:
        # A planted symbolic link is refused (ELOOP), never written through.
        return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)

    def write(self, fd: int, data: memoryview) -> int:
        return os.write(fd, data)

    def fsync(self, fd: int) -> None:
        os.fsync(fd)

    def close(self, fd: int) -> None:
        os.close(fd)

    def rename(self, source: str, target: str) -> None:
        os.rename(source, target)

    def link(self, source: str, target: str) -> None:
        os.link(source, target)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_directory(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_disk: Disk = Disk()


def use_disk(disk: Disk) -> Disk:
    """
    Make every durable write go through C{disk}; return the one it replaces
    (for tests: C{self.addCleanup(use_disk, use_disk(RecordingDisk()))}).
    """
    global _disk
    previous, _disk = _disk, disk
    return previous


def current_disk() -> Disk:
    """
    The L{Disk} durable writes go through now, for a writer that needs the
    calls one by one (the maildrop, which cannot fsync its directory).
    """
    return _disk

_writes = itertools.count(1)


def write_file(path: str, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """
    Create C{path} (it must not exist) with C{chunks}, and fsync it.  On
    failure the partial file is removed.
    """
    disk = _disk
    fd = disk.create(path, mode)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[disk.write(fd, view):]
        disk.fsync(fd)
    except BaseException:
        disk.close(fd)
        discard(path)
        raise
    disk.close(fd)


def append_file(path: str, data: bytes) -> None:
    """
    Append C{data} to an existing file and fsync it.
    """
    disk = _disk
    fd = disk.open_append(path)
    try:
        view = memoryview(data)
        while view:
            view = view[disk.write(fd, view):]
        disk.fsync(fd)
    finally:
        disk.close(fd)


def fsync_directory(directory: str) -> None:
    """
    Make a rename or a new file in C{directory} durable.
    """
    _disk.fsync_directory(directory)


def rename(source: str, target: str) -> None:
    """
    Rename C{source} over C{target}; follow with L{fsync_directory}.
    """
    _disk.rename(source, target)


def link(source: str, target: str) -> None:
    """
    Hard-link C{source} as C{target}; follow with L{fsync_directory}.
    """
    _disk.link(source, target)


def unlink(path: str) -> None:
    """
    Remove C{path}; follow with L{fsync_directory} where it matters.
    """
    _disk.unlink(path)


def discard(path: str) -> None:
    """
    Remove C{path} if it is there, ignoring errors: clean-up after a failure,
    where the first error is the one to report.
    """
    try:
        _disk.unlink(path)
    except OSError:
        pass


def temporary_name(path: str) -> str:
    """
    A name beside C{path} for one write: unique per write, not per process
    (pid, a counter and random bits), so concurrent writers in any thread
    or process never share a temporary file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    return os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}."
                                   f"{next(_writes)}.{secrets.token_hex(4)}.tmp")


def atomic_write(path: str, data: bytes, mode: int = 0o600) -> None:
    """
    Replace C{path} with C{data} durably: a temporary file beside it,
    fsynced, renamed into place, the directory fsynced.
    """
    directory = os.path.dirname(os.path.abspath(path))
    tmp = temporary_name(path)
    try:
        write_file(tmp, [data], mode)
        _disk.rename(tmp, path)
    except BaseException:
        discard(tmp)
        raise
    fsync_directory(directory)


class RecordingDisk(Disk):
    """
    A L{Disk} for tests: does the real thing, records each call as
    C{(operation, path)} in L{events}, and fails the calls a test asks for.

    Operations: C{create}, C{write}, C{fsync} (a file), C{close},
    C{rename} (path: the target), C{link}, C{unlink}, C{fsync_directory}.
    """

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []
        self._paths: dict[int, str] = {}
        self._faults: list[list[Any]] = []
        self._lock = threading.Lock()

    def fail(self, operation: str, where: str | Callable[[str], bool] = "", times: int = 1,
             after: int = 0, error: int = errno.ENOSPC) -> None:
        """
        Make the next C{times} calls of C{operation} on a path containing
        C{where} (or for which C{where(path)} is true) raise C{OSError(error)},
        after letting C{after} such calls through.  C{times=-1}: for ever.
        """
        match = where if callable(where) else (lambda path, w=where: w in path)
        self._faults.append([operation, match, times, after, error])

    def heal(self) -> None:
        """
        Forget every fault still to come.
        """
        self._faults = []

    def record(self, operation: str, path: str) -> None:
        """
        Note an event from outside the disk (e.g. the reply a test saw), so
        its order against the disk's calls can be asserted.
        """
        with self._lock:
            self.events.append((operation, path))

    def _call(self, operation: str, path: str) -> None:
        with self._lock:
            for fault in self._faults:
                if fault[0] == operation and fault[2] != 0 and fault[1](path):
                    if fault[3] > 0:
                        fault[3] -= 1
                        continue
                    if fault[2] > 0:
                        fault[2] -= 1
                    self.events.append(("failed " + operation, path))
                    raise OSError(fault[4], os.strerror(fault[4]), path)
            self.events.append((operation, path))

    def create(self, path: str, mode: int) -> int:
        self._call("create", path)
        fd = super().create(path, mode)
        self._paths[fd] = path
        return fd

    def open_append(self, path: str) -> int:
        self._call("open_append", path)
        fd = super().open_append(path)
        self._paths[fd] = path
        return fd

    def write(self, fd: int, data: memoryview) -> int:
        self._call("write", self._paths.get(fd, "?"))
        return super().write(fd, data)

    def fsync(self, fd: int) -> None:
        self._call("fsync", self._paths.get(fd, "?"))
        super().fsync(fd)

    def close(self, fd: int) -> None:
        path = self._paths.pop(fd, "?")
        with self._lock:
            self.events.append(("close", path))
        super().close(fd)

    def rename(self, source: str, target: str) -> None:
        self._call("rename", target)
        super().rename(source, target)

    def link(self, source: str, target: str) -> None:
        self._call("link", target)
        super().link(source, target)

    def unlink(self, path: str) -> None:
        self._call("unlink", path)
        super().unlink(path)

    def fsync_directory(self, directory: str) -> None:
        self._call("fsync_directory", directory)
        super().fsync_directory(directory)


def is_disk_full(error: BaseException) -> bool:
    """
    Whether C{error} means no space (or quota) is left.
    """
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


class DirectorySyncer:
    """
    Group commit for C{fsync(directory)}.

    A caller gets a ticket; a sync that I{starts} after the ticket was taken
    covers it.  While one thread syncs a directory, later callers wait and
    the first of them runs one more sync for all of them.
    """

    def __init__(self, fsync: Any = fsync_directory) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._state: dict[str, list[Any]] = {}
        self.syncs = 0

    def sync(self, directory: str) -> None:
        with self._lock:
            # [requested, synced, syncing, condition]
            state = self._state.get(directory)
            if state is None:
                state = [0, 0, False, threading.Condition(self._lock)]
                self._state[directory] = state
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    state[3].wait()
                    continue
                state[2] = True
                target = state[0]
                self._lock.release()
                try:
                    self._fsync(directory)
                    self.syncs += 1
                finally:
                    self._lock.acquire()
                    state[2] = False
                    state[3].notify_all()
                state[1] = max(state[1], target)
            if not state[2] and state[0] == state[1]:
                # Nobody waits: forget the directory, so the table stays small.
                self._state.pop(directory, None)


def private_file(path: str, flags: int) -> int:
    """
    An C{opener} for C{open()}: a file it creates is the owner's alone
    (0600), and it is never opened through a symbolic link.
    """
    return os.open(path, flags | os.O_NOFOLLOW, 0o600)
