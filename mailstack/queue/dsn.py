# -*- test-case-name: tests.test_queue -*-
"""
Delivery status notifications (RFC 3464): the bounce a sender gets back.

One report per message, listing every recipient it is about, with the
original headers (C{text/rfc822-headers}), never the whole original: a
bounce must not carry a payload back to a forged sender.
"""

from __future__ import annotations

import re
import secrets
import textwrap

from mailstack.message import rfc5322_date as _date
from mailstack.queue.store import QueueRecord, RecipientState


def build_report(
    hostname: str,
    record: QueueRecord,
    recipients: list[RecipientState],
    original_headers: bytes,
    now: float,
    delayed: bool = False,
    retry_until: float | None = None,
) -> bytes:
    """
    A multipart/report bounce (or delay warning) with LF line endings.
    """
    boundary = f"{record.queue_id}.{secrets.token_hex(8)}/{hostname}"
    action = "delayed" if delayed else "failed"
    if delayed:
        subject = "Delayed Mail (still being retried)"
        intro = (
            f"This is the mail system at host {hostname}.\n\n"
            "Your message could not be delivered yet to the recipients below.\n"
            "It will be retried until it is too old; you need not send it again.\n"
        )
    else:
        subject = "Undelivered Mail Returned to Sender"
        intro = (
            f"This is the mail system at host {hostname}.\n\n"
            "I'm sorry to have to inform you that your message could not\n"
            "be delivered to one or more recipients.\n"
        )
    lines = [textwrap.fill(f"<{r.address}>: {_printable(r.last_error) or 'delivery failed'}",
                           76, subsequent_indent="    ", break_on_hyphens=False)
             for r in recipients]
    human = intro + "\n" + "\n".join(lines) + "\n"
    status_blocks = [
        f"Reporting-MTA: dns; {hostname}\n"
        f"X-Mailstack-Queue-ID: {record.queue_id}\n"
        + (f"X-Original-Sender: rfc822; {record.sender}\n" if record.sender else "")
        + f"Arrival-Date: {_date(record.arrival)}\n"
    ]
    for r in recipients:
        status = r.dsn if _STATUS.fullmatch(r.dsn or "") else ("4.0.0" if delayed else "5.0.0")
        if not delayed and status.startswith("4"):
            status = "5" + status[1:]  # a deferral that ran out of time: 5.4.7 style
        block = (
            f"Final-Recipient: rfc822; {r.address}\n"
            f"Action: {action}\n"
            f"Status: {status}\n"
        )
        if r.relay:
            block += f"Remote-MTA: dns; {_printable(r.relay.split('[')[0])}\n"
        if r.remote_reply:
            block += f"Diagnostic-Code: {_fold(_printable(r.remote_reply))}\n"
        if delayed and retry_until is not None:
            block += f"Will-Retry-Until: {_date(retry_until)}\n"
        status_blocks.append(block)
    headers = original_headers.decode("utf-8", "replace")
    if headers and not headers.endswith("\n"):
        headers += "\n"
    message = (
        f"From: MAILER-DAEMON@{hostname} (Mail Delivery System)\n"
        f"To: <{record.sender}>\n"
        f"Subject: {subject}\n"
        f"Date: {_date(now)}\n"
        f"Message-ID: <{record.queue_id}.{secrets.token_hex(6)}.dsn@{hostname}>\n"
        "Auto-Submitted: auto-replied\n"
        "MIME-Version: 1.0\n"
        f'Content-Type: multipart/report; report-type=delivery-status;\n\tboundary="{boundary}"\n'
        "\n"
        "This is a MIME-encapsulated message.\n"
        "\n"
        f"--{boundary}\n"
        "Content-Description: Notification\n"
        "Content-Type: text/plain; charset=utf-8\n"
        "\n"
        f"{human}\n"
        f"--{boundary}\n"
        "Content-Description: Delivery report\n"
        "Content-Type: message/delivery-status\n"
        "\n"
        + "\n".join(status_blocks)
        + "\n"
        f"--{boundary}\n"
        "Content-Description: Undelivered Message Headers\n"
        "Content-Type: text/rfc822-headers\n"
        "\n"
        f"{headers}"
        "\n"
        f"--{boundary}--\n"
    )
    return message.encode("utf-8")


def _fold(text: str) -> str:
    """
    One header value on continuation lines, with no bare newlines in it.
    """
    parts = [part.strip() for part in text.replace("\r", "").split("\n") if part.strip()]
    # Long lines wrapped too, so no line of the report is over 998 octets.
    return "\n ".join(line for part in parts
                      for line in textwrap.wrap(part, 76, break_on_hyphens=False))


_STATUS = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_DIAGNOSTIC = 2000


def _printable(text: str) -> str:
    """
    A remote server's words made safe to show: CR, LF and TAB become
    spaces, other control characters C{\\xNN}, and it is cut at
    L{MAX_DIAGNOSTIC} characters.  A hostile next hop's reply cannot add
    lines, headers or MIME boundaries to the bounce.
    """
    text = re.sub(r"[\r\n\t]+", " ", text)
    text = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(text) > MAX_DIAGNOSTIC:
        text = text[:MAX_DIAGNOSTIC] + "..."
    return text
