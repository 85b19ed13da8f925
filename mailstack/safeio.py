# -*- test-case-name: tests.test_maildir -*-
"""
Durable file writes, the only way mailstack puts data on disk that it has
promised to keep: the data fsynced before a rename makes it visible, the
directory fsynced after.
"""

from __future__ import annotations

import itertools
import os
import secrets
from typing import Iterable

_writes = itertools.count(1)


def write_file(path: str, chunks: Iterable[bytes], mode: int = 0o600) -> None:
    """
    Create C{path} (it must not exist) with C{chunks}, and fsync it.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(directory: str) -> None:
    """
    Make a rename or a new file in C{directory} durable.
    """
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass  # the original error is the one to report
        raise
    fsync_directory(directory)
