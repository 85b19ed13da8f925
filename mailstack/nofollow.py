# -*- test-case-name: tests.test_symlinks -*-
"""
Maildir files and directories are never reached through a symbolic link.

Anyone who can write into a Maildir (a shell user, a restored backup, an
unpacked archive) could plant a link there to make the server read or
write a file outside the data directory.  Files are opened with
C{O_NOFOLLOW} (and must be regular files); directories are checked with
C{lstat} from a trusted root down.  A refusal raises L{SymlinkRefused}
(an C{OSError}, C{ELOOP}), which the callers log and answer as a refusal.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import IO, Iterable


class SymlinkRefused(OSError):
    """
    A symbolic link (or another non-regular file) where a Maildir file or
    directory was expected.
    """

    def __init__(self, path: str, what: str = "symbolic link") -> None:
        super().__init__(errno.ELOOP, f"refusing a {what}", path)


def open_nofollow(path: str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """
    C{os.open} that refuses a symbolic link as the last component and
    anything but a regular file.
    """
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SymlinkRefused(path) from e
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise SymlinkRefused(path, "file that is not a regular file")
        if flags & os.O_NONBLOCK == 0:
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(path: str) -> IO[bytes]:
    """
    A Maildir file opened for reading, without following a link.
    """
    return os.fdopen(open_nofollow(path), "rb")


def check_tree(base: str, path: str, subdirs: Iterable[str] = ()) -> None:
    """
    Every directory below C{base} (trusted) down to C{path}, and
    C{path/sub} for each of C{subdirs}, is a real directory, not a link.
    A missing one is fine: there is no link to follow yet.
    """
    rel = os.path.relpath(path, base)
    if rel.startswith(os.pardir):
        raise SymlinkRefused(path, "path outside the data directory")
    current = base
    names = [] if rel == os.curdir else rel.split(os.sep)
    for name in names:
        current = os.path.join(current, name)
        if not _real_directory(current):
            return
    for sub in subdirs:
        _real_directory(os.path.join(path, sub))


def _real_directory(path: str) -> bool:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(mode):
        raise SymlinkRefused(path)
    if not stat.S_ISDIR(mode):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", path)
    return True
