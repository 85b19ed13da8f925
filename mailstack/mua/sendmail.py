# -*- test-case-name: tests.test_mua -*-
"""
C{mailstack sendmail}: the sendmail command line that cron, git send-email,
mailx and scripts call, injecting into C{DATA/maildrop/}.

A maildrop file is one line of JSON (sender, recipients, the calling Unix
user) followed by the message with LF line endings; it is written to a
temporary name, fsynced and renamed, so the server only ever sees whole
files.  The server picks the directory up at start, when told through its
sockets, and once a minute; so mail injected while it is stopped waits and
goes out when it starts.

Any local user may submit, with no setuid or setgid program (Python cannot
be one): as in Postfix's world-writable maildrop, C{DATA/maildrop} is mode
1733 (anyone may create a file, nobody but its owner may list it, and the
sticky bit lets only a file's owner, or the directory's, remove or rename
it).  The server takes the submitting user from the file's owner, which
the kernel sets (L{mailstack.delivery.maildrop.read_drop} uses C{fstat}), never from the file's
content; it opens files without following symbolic links and refuses
anything but a plain file with one link, so a user cannot make it read a
file that is not theirs.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import getpass
import json
import os
import secrets
import socket
import stat
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from mailstack.address import AddressError, parse_address
from mailstack.delivery.maildrop import maildrop_dir, pickup_path
from mailstack.privileges import MAILDROP_MODE, ensure_layout
from mailstack import safeio


class SendmailError(Exception):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class SendmailArgs:
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i, -oi
    sender: str | None = None  # -f
    full_name: str | None = None  # -F
    recipients: list[str] = field(default_factory=list)
    mode: str = "m"  # -bm deliver (default), -bp list the queue, -bs SMTP on stdin


# Flags that take a value, as separate word or attached; all but -f/-F/-b ignored
# (-B8BITMIME, -C file, -N dsn, -R ret, -V envid, -X log, -L label, -h hops, -O opt,
# -p proto, -q interval, -o option).
_WITH_VALUE = set("fFBCNRVXLhOpqob")
# -b modes: m deliver, p list the queue (mailq), s SMTP on standard input,
# i rebuild aliases (nothing to do: mailstack reads them live).
MODES = set("mpsi")


def parse_args(argv: Sequence[str]) -> SendmailArgs:
    """
    Parse sendmail's options; legacy ones (-odi, -oem, -bm, -v, ...) are
    accepted and ignored, as sendmail and Postfix do.
    """
    args = SendmailArgs()
    i = 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            args.recipients.extend(argv[i:])
            break
        if not arg.startswith("-") or arg == "-":
            args.recipients.append(arg)
            continue
        flag, rest = arg[1], arg[2:]
        if flag == "t":
            args.extract = True
        elif flag == "i" or arg in ("-oi", "-oI"):
            args.ignore_dots = True
        elif flag in _WITH_VALUE:
            if flag == "o":
                continue  # -odi, -oem, -oXyz: ignored (-oi handled above)
            if not rest:
                if i >= len(argv):
                    raise SendmailError(f"option -{flag} needs a value", 64)
                rest = argv[i]
                i += 1
            if flag == "f":
                args.sender = rest
            elif flag == "F":
                args.full_name = rest
            elif flag == "b":
                if rest[:1] not in MODES or len(rest) != 1:
                    raise SendmailError(f"-b{rest}: unsupported mode (use -bm, -bp, -bs or "
                                        "-bi)", 64)
                args.mode = rest
        # anything else (-bm, -v, -m, -e*, -d*...): ignored
    return args


def read_message(stdin: BinaryIO, ignore_dots: bool) -> bytes:
    """
    The message from standard input, LF line endings; without -i, a line
    holding a single dot ends it.
    """
    lines = []
    for line in stdin:
        line = line.rstrip(b"\r\n")
        if not ignore_dots and line == b".":
            break
        lines.append(line)
    return b"".join(line + b"\n" for line in lines)


def prepare(args: SendmailArgs, content: bytes, default_domain: str,
            login: str | None = None) -> tuple[str, list[str], bytes]:
    """
    The envelope and the final content: recipients from the arguments and,
    with -t, from To/Cc/Bcc; Bcc removed; From, Date and Message-ID added
    when missing.
    """
    login = login or getpass.getuser()
    sender = args.sender if args.sender is not None else login
    if sender in ("<>", ""):
        sender = ""
    else:
        try:
            sender = str(parse_address(qualify(sender.strip("<>"), default_domain)))
        except AddressError as e:
            raise SendmailError(f"bad sender {sender!r}: {e}", 65) from None
    head, sep, body = content.partition(b"\n\n")
    if not sep and not content.startswith(b"\n"):
        head, body = content, b""
    message = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(
        head + b"\n\n")
    recipients = list(args.recipients)
    if args.extract:
        for name in ("To", "Cc", "Bcc"):
            for _, address in email.utils.getaddresses(message.get_all(name, [])):
                if address:
                    recipients.append(address)
    lines = [line for line in head.split(b"\n") if line]
    kept, skipping = [], False
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                kept.append(line)
            continue
        skipping = line.lower().startswith(b"bcc:")
        if not skipping:
            kept.append(line)
    names = {line.split(b":", 1)[0].strip().lower() for line in kept if b":" in line}
    extra = []
    if b"from" not in names:
        shown = email.utils.formataddr((args.full_name or "", sender or "MAILER-DAEMON"))
        extra.append(f"From: {shown}")
    if b"date" not in names:
        extra.append(f"Date: {email.utils.formatdate(localtime=True)}")
    if b"message-id" not in names:
        extra.append(f"Message-ID: {email.utils.make_msgid(domain=default_domain)}")
    header_block = b"\n".join([e.encode("utf-8") for e in extra] + kept)
    final = header_block + b"\n\n" + body if header_block else b"\n" + body
    checked = []
    for rcpt in dict.fromkeys(recipients):
        try:
            checked.append(str(parse_address(qualify(rcpt.strip().strip("<>"),
                                                     default_domain))))
        except AddressError as e:
            raise SendmailError(f"bad recipient {rcpt!r}: {e}", 65) from None
    if not checked:
        raise SendmailError("no recipients", 64)
    return sender, checked, final


def qualify(address: str, domain: str) -> str:
    """
    A bare local name (C{root}) gets C{@domain}, the first local domain,
    as Postfix's C{append_at_myorigin} does.
    """
    return address if "@" in address else f"{address}@{domain}"


def poke(data_dir: str, timeout: float = 10) -> bool:
    """
    Tell a running server to look at the maildrop now; C{False} if none
    answered (it looks at start and every minute anyway).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(pickup_path(data_dir))
            s.sendall(b"pickup\n")
            return s.recv(64).startswith(b"ok")
        except OSError:
            return False


def _ensure_maildrop(data_dir: str, directory: str) -> None:
    if os.path.isdir(directory):
        return
    try:
        ensure_layout(data_dir)
    except PermissionError:
        raise SendmailError(f"{directory} does not exist and cannot be created by "
                            "this user; start the server once (it creates it)", 73) from None
    if os.geteuid() == 0:
        # root (cron) before the first start: the maildrop is the data
        # directory owner's, whoever that is.
        owner = os.stat(data_dir)
        os.chown(directory, owner.st_uid, owner.st_gid)
        os.chmod(directory, MAILDROP_MODE)


def drop(data_dir: str, sender: str, recipients: list[str], content: bytes) -> str:
    """
    Write a maildrop file durably; return its name.  The file belongs to
    the caller (which is how the server knows who sent it) and is mode
    0644 so the server can read it; its name has 96 random bits and the
    directory cannot be listed, so other users cannot find it.
    """
    directory = maildrop_dir(data_dir)
    _ensure_maildrop(data_dir, directory)
    name = f"{int(time.time())}{secrets.token_hex(12).upper()}"
    header = json.dumps({"sender": sender, "recipients": recipients})
    data = header.encode("utf-8") + b"\n" + content
    tmp = os.path.join(directory, f".{name}.tmp")
    path = os.path.join(directory, name)
    disk = safeio.current_disk()  # every durable write goes through safeio
    try:
        fd = disk.create(tmp, 0o644)  # O_EXCL: a planted link makes this fail
    except PermissionError:
        raise SendmailError(f"cannot write to {directory} "
                            f"({stat.filemode(os.stat(directory).st_mode)}); "
                            "the server sets it up at start", 73) from None
    try:
        os.fchmod(fd, 0o644)  # whatever the umask took away
        view = memoryview(data)
        while view:
            view = view[disk.write(fd, view):]
        disk.fsync(fd)
        disk.rename(tmp, path)
        # The directory cannot be opened for fsync by other users; on
        # journalling file systems, fsync of the file after the rename
        # commits the rename with it.
        disk.fsync(fd)
    except BaseException:
        safeio.discard(tmp)  # the original error is the one to report
        raise
    finally:
        disk.close(fd)
    try:
        disk.fsync_directory(directory)
    except PermissionError:
        pass  # not the owner: see above
    return name
