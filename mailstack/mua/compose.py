# -*- test-case-name: tests.test_mua -*-
"""
Composing a message for C{mailstack send}: the stdlib C{email} package
(EmailMessage, default policy) does the MIME work: RFC 2047 for non-ASCII
headers, base64 for attachments.  Bcc never appears in the headers.
"""

from __future__ import annotations

import email.policy
import email.utils
import mimetypes
import os
from email.message import EmailMessage
from typing import Sequence

#: LF line endings, as mailstack stores and its SMTP client sends.
POLICY = email.policy.default.clone(linesep="\n")


class ComposeError(ValueError):
    """
    The message cannot be made as asked (a bad header, a missing file).
    """


def compose(
    sender: str,
    to: Sequence[str] = (),
    cc: Sequence[str] = (),
    subject: str = "",
    body: str = "",
    attachments: Sequence[str] = (),
    headers: Sequence[str] = (),
    domain: str | None = None,
) -> EmailMessage:
    message = EmailMessage(policy=POLICY)
    _set(message, "From", sender)
    if to:
        _set(message, "To", ", ".join(to))
    if cc:
        _set(message, "Cc", ", ".join(cc))
    if subject:
        _set(message, "Subject", subject)
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(
        domain=domain or sender.rpartition("@")[2].strip("> ") or None)
    for header in headers:
        name, sep, value = header.partition(":")
        name = name.strip()
        if not sep or not name or any(c in name for c in " \t\r\n") or "\n" in value:
            raise ComposeError(f"not a header: {header!r} (use 'Name: value')")
        if name.lower() == "bcc":
            raise ComposeError("use --bcc, not a Bcc header")
        del message[name]
        _set(message, name, value.strip())
    message.set_content(body if body.endswith("\n") or not body else body + "\n")
    for path in attachments:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise ComposeError(f"cannot read {path}: {e.strerror}") from None
        kind, encoding = mimetypes.guess_type(path)
        if kind is None or encoding is not None:
            kind = "application/octet-stream"
        maintype, subtype = kind.split("/", 1)
        message.add_attachment(data, maintype=maintype, subtype=subtype,
                               filename=os.path.basename(path))
    return message


def _set(message: EmailMessage, name: str, value: str) -> None:
    """
    Set a header field; a value the email package refuses (a CR or LF
    that would start another field, an address it cannot parse) is a
    L{ComposeError} (exit 65), never a traceback.
    """
    try:
        message[name] = value
    except (ValueError, IndexError, TypeError) as e:
        raise ComposeError(f"bad {name}: {value!r} ({e})") from None


def to_bytes(message: EmailMessage) -> bytes:
    """
    The message as mailstack's SMTP client sends it (LF endings).
    """
    return message.as_bytes(policy=POLICY)
