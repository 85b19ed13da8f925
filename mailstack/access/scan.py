# -*- test-case-name: tests.test_pop3 -*-
"""
Reading a Maildir: the messages of one folder, their sizes as served
(CRLF), stable unique ids, and deletion.  Used by the POP3 service.

Sizes come from the file name when it carries Dovecot's C{W=} (mailstack's
writer always adds it), so listing a mailbox reads no message bodies; a
file from elsewhere is measured once by reading it.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from mailstack.delivery.maildir import arrival_key
from twisted.logger import Logger

from mailstack.nofollow import check_tree, open_file

log = Logger()

_W = re.compile(r",W=(\d+)")


@dataclass
class MaildirMessage:
    path: str
    uid: str  # the base name, without the :2,flags info
    size: int  # with CRLF line endings
    deleted: bool = False


def served_size(path: str) -> int:
    """
    The size of a stored message with CRLF line endings.
    """
    match = _W.search(os.path.basename(path).split(":")[0])
    if match:
        return int(match.group(1))
    size = lines = 0
    with open_file(path) as f:
        for chunk in iter(lambda: f.read(65536), b""):
            size += len(chunk)
            lines += chunk.count(b"\n")
    return size + lines


def scan(maildir: str, base: str | None = None) -> list[MaildirMessage]:
    """
    The messages in C{new/} and C{cur/}, in the order of the delivery time
    their names record (L{mailstack.delivery.maildir.arrival_key}: seconds,
    microseconds, then the writer's pid and counter, so two messages of the
    same microsecond from different processes are in pid order, not
    necessarily the order they arrived), names without a leading time first, by
    text; symbolic links are left out (and logged), and no directory below
    C{base} may be one.
    Blocking: call it in a thread.
    """
    check_tree(base or os.path.dirname(maildir), maildir, ("cur", "new"))
    found = []
    for sub in ("cur", "new"):
        directory = os.path.join(maildir, sub)
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            if entry.is_symlink():
                log.warn("pop3: refusing the symbolic link {path}", path=entry.path)
                continue
            path = os.path.join(directory, name)
            try:
                size = served_size(path)
            except FileNotFoundError:
                continue  # removed meanwhile by another session
            found.append(MaildirMessage(path, name.split(":")[0], size))
    found.sort(key=lambda m: arrival_key(m.uid))
    return found


def find_renamed(root: str, base: str) -> tuple[str, str] | None:
    """
    Find a message of the Maildir at C{root} by its unique base name,
    whatever info another session gave it since (C{new/X} became
    C{cur/X:2,S} when an IMAP client set a flag).  Lists C{cur/} and
    C{new/}, so only for a file found missing.

    @return: its subdirectory and file name now, or C{None} if it is gone.
    """
    for sub in ("cur", "new"):
        try:
            names = os.listdir(os.path.join(root, sub))
        except FileNotFoundError:
            continue
        for name in names:
            if name.partition(":")[0] == base:
                return sub, name
    return None
