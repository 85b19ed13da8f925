# -*- test-case-name: tests.test_sendmail -*-
"""
The maildrop: where C{mailstack sendmail} (L{mailstack.mua.sendmail.drop})
leaves mail for the server and how the server reads it back
(L{mailstack.delivery.pickup}).

A maildrop file is one line of JSON (sender, recipients) followed by the
message with LF line endings, in C{DATA/maildrop/}; the submitting user is
the file's owner, as the kernel says, never its content.
"""

from __future__ import annotations

import json
import os
import stat


def maildrop_dir(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "maildrop")


def pickup_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "pickup.sock")


def read_drop(path: str, max_size: int | None = None) -> tuple[str, list[str], int, bytes]:
    """
    Parse a maildrop file: (sender, recipients, uid of its owner, content).
    Symbolic links, devices, FIFOs and files with other links are refused
    (C{ValueError}); the owner comes from the kernel, never the content.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ValueError("not a plain file with one link")
        if max_size is not None and st.st_size > max_size:
            raise ValueError(f"too big ({st.st_size} bytes)")
        data = f.read()
    header, _, content = data.partition(b"\n")
    meta = json.loads(header)
    return str(meta["sender"]), [str(r) for r in meta["recipients"]], st.st_uid, content
