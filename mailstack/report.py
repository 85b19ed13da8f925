# -*- test-case-name: tests.test_report -*-
"""
C{mailstack report [LOGFILE...]}: the postmaster's daily summary of a
mailstack log, as pflogsumm is for Postfix.

It reads the log lines mailstack writes (one event a line, with the queue
id), whatever is in front of them: twistd's log file
(C{2026-11-29T06:25:01+0000 [mailstack...#info] 4F2A...: to=<...> ...}),
C{journalctl -u mailstack} (with or without its own prefix), or a
rotated file compressed with gzip.  Lines it does not know are skipped.
"""

from __future__ import annotations

import gzip
import re
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import IO

_QID = r"(?P<qid>[0-9A-F]{12}): "
_RECEIVED = re.compile(_QID + r"from=<(?P<sender>[^>]*)> size=(?P<size>\d+) nrcpt=(?P<n>\d+)"
                       r"(?: \((?P<how>[^)]*)\))?$")
_DELIVERY = re.compile(_QID + r"to=<(?P<to>[^>]*)>(?: relay=(?P<relay>\S+))?"
                       r"(?: delay=(?P<delay>[\d.]+))?(?: dsn=(?P<dsn>[\d.]+))?"
                       r" status=(?P<status>\w+) \((?P<reason>.*)\)$")
_REJECT = re.compile(r"(?:" + _QID + r")?reject: (?P<stage>[A-Z]+) from (?P<client>\S+): "
                     r"(?P<reason>.*?)(?:; from=<[^>]*> to=<[^>]*>)?$")
_FILTER = re.compile(r"(?P<client>\S+): filter (?P<name>\S+) refused at (?P<stage>\S+): "
                     r"(?P<reason>.*)$")
_CLIENT = re.compile(_QID + r"client=(?P<client>\S+)")
_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}|[A-Z][a-z]{2} [ \d]\d "
                   r"\d\d:\d\d:\d\d)")
_ADDRESS_IN_REASON = re.compile(r"<[^>]*>:? ?")


@dataclass
class Report:
    """
    What a log says, counted.
    """

    first: str | None = None
    last: str | None = None
    received: int = 0
    received_bytes: int = 0
    received_local: int = 0  # sendmail, bounces: injected here
    delivered: int = 0
    delivered_local: int = 0
    deferred: int = 0
    deferred_messages: set[str] = field(default_factory=set)
    bounced: int = 0
    expired: int = 0
    rejected: int = 0
    reject_reasons: Counter[str] = field(default_factory=Counter)
    defer_reasons: Counter[str] = field(default_factory=Counter)
    bounce_reasons: Counter[str] = field(default_factory=Counter)
    senders: Counter[str] = field(default_factory=Counter)
    sender_domains: Counter[str] = field(default_factory=Counter)
    recipients: Counter[str] = field(default_factory=Counter)
    recipient_domains: Counter[str] = field(default_factory=Counter)
    deferred_domains: Counter[str] = field(default_factory=Counter)
    clients: Counter[str] = field(default_factory=Counter)
    delays: list[float] = field(default_factory=list)


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower() if "@" in address else "(none)"


def _reason(text: str) -> str:
    """
    A reason without the addresses in it, so that equal reasons count together.
    """
    return _ADDRESS_IN_REASON.sub("", text).strip()[:160]


def _events(line: str) -> str:
    # The event starts at the queue id or at "reject:"; the prefix is the logger's.
    match = re.search(r"[0-9A-F]{12}: |reject: |\S+: filter ", line)
    return line[match.start():].rstrip("\n") if match else ""


def summarise(lines: Iterable[str]) -> Report:
    report = Report()
    for line in lines:
        text = _events(line)
        if not text:
            continue
        stamp = _TIME.match(line)
        if stamp:
            report.first = report.first or stamp.group(1)
            report.last = stamp.group(1)
        if m := _RECEIVED.match(text):
            report.received += 1
            report.received_bytes += int(m["size"])
            if m["how"]:
                report.received_local += 1
            sender = m["sender"] or "<>"
            report.senders[sender] += 1
            report.sender_domains[_domain(m["sender"])] += 1
        elif m := _DELIVERY.match(text):
            status, to = m["status"], m["to"].lower()
            if status == "sent":
                report.delivered += 1
                if m["relay"] == "local":
                    report.delivered_local += 1
                report.recipients[to] += 1
                report.recipient_domains[_domain(to)] += 1
                if m["delay"]:
                    report.delays.append(float(m["delay"]))
            elif status == "deferred":
                report.deferred += 1
                report.deferred_messages.add(m["qid"])
                report.defer_reasons[_reason(m["reason"])] += 1
                report.deferred_domains[_domain(to)] += 1
            elif status in ("bounced", "failed"):
                report.bounced += 1
                report.bounce_reasons[_reason(m["reason"])] += 1
            elif status == "expired":
                report.expired += 1
                report.bounce_reasons["expired: " + _reason(m["reason"])] += 1
        elif m := _REJECT.match(text):
            report.rejected += 1
            report.reject_reasons[f"{m['stage']}: {_reason(m['reason'])}"] += 1
        elif m := _FILTER.match(text):
            report.rejected += 1
            report.reject_reasons[f"{m['stage'].upper()}: filter {m['name']}: "
                                  f"{_reason(m['reason'])}"] += 1
        elif m := _CLIENT.match(text):
            report.clients[m["client"].rpartition(":")[0]] += 1
    return report


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(title: str, counter: Counter[str], top: int) -> list[str]:
    if not counter:
        return []
    lines = ["", title, "-" * len(title)]
    lines += [f"{count:>8}  {key}" for key, count in counter.most_common(top)]
    if len(counter) > top:
        lines.append(f"{'':>8}  ... and {len(counter) - top} more")
    return lines


def format_report(report: Report, top: int = 10) -> str:
    period = (f"{report.first} to {report.last}" if report.first else "no timestamps")
    rejected_share = (100 * report.rejected / (report.received + report.rejected)
                      if report.received + report.rejected else 0)
    lines = [
        f"mailstack report: {period}",
        "",
        "Grand totals",
        "------------",
        (f"{report.received:>8}  received ({_size(report.received_bytes)}; "
        f"{report.received_local} injected locally: sendmail, bounces)"),
        (f"{report.delivered:>8}  delivered ({report.delivered_local} to local mailboxes, "
        f"{report.delivered - report.delivered_local} relayed)"),
        f"{report.deferred:>8}  deferred ({len(report.deferred_messages)} messages)",
        f"{report.bounced:>8}  bounced",
        f"{report.expired:>8}  expired in the queue",
        f"{report.rejected:>8}  rejected ({rejected_share:.0f}% of attempts)",
    ]
    if report.delays:
        delays = sorted(report.delays)
        p95 = delays[min(len(delays) - 1, int(len(delays) * 0.95))]
        lines += ["", "Delivery delays", "---------------",
                  (f"average {statistics.fmean(delays):.2f}s, median "
                  f"{statistics.median(delays):.2f}s, 95th percentile {p95:.2f}s, "
                  f"maximum {delays[-1]:.2f}s")]
        buckets = [(1, "< 1s"), (10, "< 10s"), (60, "< 1m"), (600, "< 10m"), (3600, "< 1h"),
                   (float("inf"), ">= 1h")]
        low = 0.0
        for bound, label in buckets:
            n = sum(1 for d in delays if low <= d < bound)
            if n:
                lines.append(f"{n:>8}  {label}")
            low = bound
    lines += _table("Rejections by reason", report.reject_reasons, top)
    lines += _table("Deferrals by reason", report.defer_reasons, top)
    lines += _table("Bounces by reason", report.bounce_reasons, top)
    lines += _table("Top senders", report.senders, top)
    lines += _table("Top sender domains", report.sender_domains, top)
    lines += _table("Top recipients (delivered)", report.recipients, top)
    lines += _table("Top recipient domains (delivered)", report.recipient_domains, top)
    lines += _table("Top recipient domains (deferred)", report.deferred_domains, top)
    lines += _table("Top SMTP clients", report.clients, top)
    return "\n".join(lines) + "\n"


def read_lines(paths: list[str], stdin: IO[str]) -> Iterator[str]:
    """
    The lines of each file (gzip-compressed ones too), or of standard input.
    """
    if not paths or paths == ["-"]:
        yield from stdin
        return
    for path in paths:
        if path.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
                yield from f
        else:
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from f
