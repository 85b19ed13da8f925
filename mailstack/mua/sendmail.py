# -*- test-case-name: tests.test_mua -*-
"""
C{mailstack sendmail}: the sendmail command line that cron, git send-email,
mailx and scripts call, injecting into C{DATA/maildrop/}.

A maildrop file is one line of JSON (sender, recipients, the calling Unix
user) followed by the message with LF line endings; it is written to a
temporary name, fsynced and renamed, so the server only ever sees whole
files.  The server picks the directory up at start, when told through the
control socket, and once a minute; so mail injected while it is stopped
waits and goes out when it starts.  Like Postfix's postdrop, writing needs
access to the data directory (its owner, or root).
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import getpass
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from mailstack.address import AddressError, parse_address
from mailstack.safeio import atomic_write


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


# Flags that take a value, as separate word or attached; all but -f/-F ignored.
_WITH_VALUE = set("fFBCNRVXLhOpqo")


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
    sender = args.sender if args.sender is not None else f"{login}@{default_domain}"
    if sender in ("<>", ""):
        sender = ""
    else:
        try:
            sender = str(parse_address(sender.strip("<>")))
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
            checked.append(str(parse_address(rcpt.strip().strip("<>"))))
        except AddressError as e:
            raise SendmailError(f"bad recipient {rcpt!r}: {e}", 65) from None
    if not checked:
        raise SendmailError("no recipients", 64)
    return sender, checked, final


def maildrop_dir(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "maildrop")


def drop(data_dir: str, sender: str, recipients: list[str], content: bytes) -> str:
    """
    Write a maildrop file durably; return its name.
    """
    directory = maildrop_dir(data_dir)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    name = f"{int(time.time())}{secrets.token_hex(6).upper()}"
    header = json.dumps({"sender": sender, "recipients": recipients, "uid": os.getuid(),
                         "user": getpass.getuser()})
    atomic_write(os.path.join(directory, name), header.encode("utf-8") + b"\n" + content)
    return name


def read_drop(path: str) -> tuple[str, list[str], str, bytes]:
    """
    Parse a maildrop file: (sender, recipients, who, content).
    """
    with open(path, "rb") as f:
        data = f.read()
    header, _, content = data.partition(b"\n")
    meta = json.loads(header)
    who = f"uid={int(meta.get('uid', -1))} user={str(meta.get('user', '?'))[:64]}"
    return str(meta["sender"]), [str(r) for r in meta["recipients"]], who, content
