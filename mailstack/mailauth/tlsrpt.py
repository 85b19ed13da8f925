# -*- test-case-name: tests.test_tlspolicy -*-
"""
SMTP TLS reporting (RFC 8460), the sending side: what happened to the TLS
of each outbound SMTP session, per recipient domain and day, kept so that
a report can be made later (C{mailstack tlsrpt DAY}).

The courier tells L{TLSReportLog.record} the outcome of every session it
opens: C{success}, or one of RFC 8460's result types (4.3):
C{starttls-not-supported}, C{certificate-host-mismatch},
C{certificate-expired}, C{certificate-not-trusted}, C{validation-failure},
C{sts-policy-fetch-error}, C{sts-policy-invalid}, C{sts-webpki-invalid}.
Outcomes are counted in memory and appended, once a minute and when the
server stops, to C{DATA/tlsrpt/YYYY-MM-DD.jsonl} (UTC days), one JSON
object per distinct outcome and a count, from a worker thread.  A crash
loses at most the last minute of counts: these are statistics, not mail.
Files older than L{RETENTION_DAYS} days are removed.

L{make_reports} adds a day's lines up into one RFC 8460 report per policy
domain.
"""

from __future__ import annotations

import datetime
import json
import os
import re
from collections import Counter
from typing import Any, Iterable

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailstack.clock import wall_seconds

log = Logger()

#: RFC 8460 4.3 result types, and C{success}.
RESULT_TYPES = frozenset({
    "success", "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
    "certificate-not-trusted", "validation-failure", "sts-policy-fetch-error",
    "sts-policy-invalid", "sts-webpki-invalid",
})
#: Seconds between writes of the counts.
FLUSH_INTERVAL = 60.0
RETENTION_DAYS = 30
_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# (day, domain, policy type, policy id, policy lines, mx host, result, receiving mx, ip)
_Key = tuple[str, str, str, str, tuple[str, ...], str, str, str, str]


def day_of(seconds: float) -> str:
    """
    The UTC day C{YYYY-MM-DD} of a time in seconds since the epoch.
    """
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%d")


class TLSReportLog(Service):
    """
    Counts TLS outcomes and appends them to C{DIRECTORY/DAY.jsonl}.

    @param directory: C{DATA/tlsrpt}.
    @param reactor: for the timer and the wall clock.
    @param pool: the thread pool that writes.
    """

    def __init__(self, directory: str, reactor: Any, pool: Any) -> None:
        self.directory = directory
        self.reactor = reactor
        self.pool = pool
        self.counts: Counter[_Key] = Counter()
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor
        self._pruned = ""

    def record(self, domain: str, result: str, policy_type: str = "no-policy-found",
               policy_id: str = "", policy_lines: tuple[str, ...] = (), mx_host: str = "",
               receiving_mx: str = "", receiving_ip: str = "") -> None:
        """
        Count one session's outcome for mail to C{domain}.
        """
        if result not in RESULT_TYPES:
            raise ValueError(f"not an RFC 8460 result type: {result}")
        key = (day_of(wall_seconds(self.reactor)), domain.lower(), policy_type, policy_id,
               tuple(policy_lines), mx_host, result, receiving_mx.lower(), receiving_ip)
        self.counts[key] += 1

    def flush(self) -> Deferred[None]:
        """
        Append the counts so far (in a worker thread) and start again.
        """
        counts, self.counts = self.counts, Counter()
        today = day_of(wall_seconds(self.reactor))
        prune = today if today != self._pruned else ""
        self._pruned = today
        if not counts and not prune:
            return succeed(None)
        d = deferToThreadPool(self.reactor, self.pool, _append, self.directory, counts, prune)
        d.addErrback(lambda f: log.failure("cannot write TLS report counts", f))
        return d

    def startService(self) -> None:
        super().startService()
        self._loop.start(FLUSH_INTERVAL, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self.flush()


def _append(directory: str, counts: Counter[_Key], prune: str) -> None:
    os.makedirs(directory, mode=0o700, exist_ok=True)
    by_day: dict[str, list[str]] = {}
    for key, count in counts.items():
        day, domain, ptype, pid, lines, mx, result, rmx, ip = key
        by_day.setdefault(day, []).append(json.dumps({
            "domain": domain, "policy-type": ptype, "policy-id": pid,
            "policy-string": list(lines), "mx-host": mx, "result": result,
            "receiving-mx-hostname": rmx, "receiving-ip": ip, "count": count},
            sort_keys=True) + "\n")
    for day, text in by_day.items():
        fd = os.open(os.path.join(directory, day + ".jsonl"),
                     os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, "".join(text).encode("utf-8"))
        finally:
            os.close(fd)
    if prune:
        oldest = (datetime.date.fromisoformat(prune)
                  - datetime.timedelta(days=RETENTION_DAYS)).isoformat()
        for name in os.listdir(directory):
            if name.endswith(".jsonl") and _DAY.match(name[:-6]) and name[:-6] < oldest:
                os.unlink(os.path.join(directory, name))


def read_day(directory: str, day: str) -> list[dict[str, Any]]:
    """
    The lines written for C{day}; a line that is not a JSON object (a
    write cut short by a crash) is skipped.
    """
    if not _DAY.match(day):
        raise ValueError(f"not a day (YYYY-MM-DD): {day!r}")
    try:
        with open(os.path.join(directory, day + ".jsonl"), encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict) and isinstance(item.get("count"), int):
            out.append(item)
    return out


def make_reports(lines: Iterable[dict[str, Any]], day: str, organization: str,
                 contact: str) -> list[dict[str, Any]]:
    """
    One RFC 8460 report (section 4) per policy domain from a day's lines:
    per policy, the successful and failed session counts and the failure
    details grouped by result type, MX and address.
    """
    domains: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    for line in lines:
        domain = str(line.get("domain", ""))
        policy_key = (line.get("policy-type", "no-policy-found"),
                      tuple(line.get("policy-string") or ()))
        policies = domains.setdefault(domain, {})
        policy = policies.setdefault(policy_key, {"success": 0, "failures": Counter(),
                                                  "mx": set()})
        if line.get("mx-host"):
            policy["mx"].add(line["mx-host"])
        count = int(line["count"])
        if line.get("result") == "success":
            policy["success"] += count
        else:
            policy["failures"][(line.get("result", ""), line.get("receiving-mx-hostname", ""),
                                line.get("receiving-ip", ""))] += count
    reports = []
    for domain in sorted(domains):
        entries = []
        for (ptype, lines_), policy in sorted(domains[domain].items()):
            described: dict[str, Any] = {"policy-type": ptype, "policy-domain": domain}
            if lines_:
                described["policy-string"] = list(lines_)
            if ptype == "sts":
                described["mx-host"] = sorted(policy["mx"])
            failures = policy["failures"]
            entry: dict[str, Any] = {
                "policy": described,
                "summary": {"total-successful-session-count": policy["success"],
                            "total-failure-session-count": sum(failures.values())},
            }
            if failures:
                details = []
                for (result, mx, ip), count in sorted(failures.items()):
                    detail = {"result-type": result, "failed-session-count": count}
                    if mx:
                        detail["receiving-mx-hostname"] = mx
                    if ip:
                        detail["receiving-ip"] = ip
                    details.append(detail)
                entry["failure-details"] = details
            entries.append(entry)
        reports.append({
            "organization-name": organization,
            "date-range": {"start-datetime": f"{day}T00:00:00Z",
                           "end-datetime": f"{day}T23:59:59Z"},
            "contact-info": contact,
            "report-id": f"{day}.{domain}@{organization}",
            "policies": entries,
        })
    return reports

