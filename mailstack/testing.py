"""
Test doubles for mailstack and for code built on it: an in-memory DNS
resolver, a scripted remote SMTP server built on mailstack's own, and a
real server in a child process.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import subprocess
import sys
import threading
import time
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError

from mailstack.delivery.router import Resolution
from mailstack.smtp.reply import Reply, SMTPError


class FakeResolver(ResolverBase):
    """
    Answers MX, A and AAAA queries from dictionaries.  Being an
    C{IResolver}, it can also back a real DNS server on loopback
    (C{twisted.names.server.DNSServerFactory(clients=[resolver])}).

    @param mx: C{{domain: [(preference, host), ...]}}; C{[(0, "")]} is a null MX.
    @param a: C{{host: ["127.0.0.1", "::1", ...]}}.
    @param missing: domains that do not exist (NXDOMAIN).
    @param servfail: names whose MX lookup fails with SERVFAIL (their A
        and AAAA lookups still answer).
    @param ptr: C{{ip: [name, ...]}}, reverse DNS.
    @param ttl: the TTL of every record (0: not to be cached).
    """

    def __init__(self, mx: dict[str, list[tuple[int, str]]] | None = None,
                 a: dict[str, list[str]] | None = None, missing: set[str] | None = None,
                 servfail: set[str] | None = None,
                 ptr: dict[str, list[str]] | None = None, ttl: int = 0):
        super().__init__()
        self.ttl = ttl
        self.mx = mx or {}
        self.a = a or {}
        self.missing = missing or set()
        self.servfail = servfail or set()
        self.ptr = {ipaddress.ip_address(ip).reverse_pointer: names
                    for ip, names in (ptr or {}).items()}
        self.queries: list[tuple[int, str]] = []

    def _lookup(self, name: bytes | str, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        name = name.decode("ascii") if isinstance(name, bytes) else name
        name = name.lower().rstrip(".")
        self.queries.append((type, name))
        if name in self.missing:
            return fail(DNSNameError(name))
        if name in self.servfail and type == dns.MX:
            return fail(DNSServerError(name))
        answers = []
        if type == dns.MX:
            answers = [dns.RRHeader(name, dns.MX, payload=dns.Record_MX(preference, host),
                                    ttl=self.ttl)
                       for preference, host in self.mx.get(name, [])]
        elif type == dns.PTR:
            answers = [dns.RRHeader(name, dns.PTR, payload=dns.Record_PTR(target))
                       for target in self.ptr.get(name, [])]
        elif type in (dns.A, dns.AAAA):
            for text in self.a.get(name, []):
                ip = ipaddress.ip_address(text)
                if ip.version == 4 and type == dns.A:
                    answers.append(dns.RRHeader(name, dns.A, payload=dns.Record_A(text),
                                                ttl=self.ttl))
                elif ip.version == 6 and type == dns.AAAA:
                    answers.append(dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(text),
                                                ttl=self.ttl))
        return succeed((answers, [], []))


class SinkPolicy:
    """
    A policy for mailstack's SMTP server that plays a remote MTA: it
    accepts everything unless told otherwise, and records what it got.

    @ivar rcpt_replies: C{{address: (code, enhanced, text)}} refusals, or a
        callable C{(address, attempt) -> refusal or None}.
    @ivar data_reply: a refusal for the end of DATA, or C{None}.
    """

    def __init__(self) -> None:
        self.rcpt_replies: dict[str, tuple[int, str, str]] | Callable[..., Any] = {}
        self.data_reply: tuple[int, str, str] | None = None
        self.received: list[tuple[str, list[str], bytes]] = []
        self.attempts = 0  # transactions (MAIL commands)
        self.connections = 0

    def connect(self, session: Any) -> None:
        self.connections += 1

    def extensions(self, session: Any) -> list[str]:
        return []

    def auth(self, protocol: Any, arg: str) -> Reply:
        return Reply(503, "5.5.1", "no AUTH here")

    def mail(self, session: Any, sender: Any) -> None:
        self.attempts += 1

    def rcpt(self, session: Any, envelope: Any, rcpt: Any) -> Resolution:
        if callable(self.rcpt_replies):
            refusal = self.rcpt_replies(str(rcpt), self.attempts)
        else:
            refusal = self.rcpt_replies.get(str(rcpt))
        if refusal is not None:
            raise SMTPError(*refusal)
        return Resolution(remote=(rcpt,))

    def deliver(self, session: Any, envelope: Any, spool: Any) -> Any:
        if self.data_reply is not None:
            raise SMTPError(*self.data_reply)
        self.received.append((str(envelope.sender or ""), [str(r) for r in envelope.rcpts],
                              spool.read()))
        return None


def start_server_process(data_dir: str, extra: list[str] | None = None,
                         pythonpath: str | None = None, timeout: float = 60,
                         listener: str = "smtp") -> Any:
    """
    Start C{twist mailstack} on 127.0.0.1 port 0 in a child process (SMTP
    only unless C{extra} enables more, for crash tests and benchmarks);
    return the process and the port of C{listener}.
    """
    argv = [sys.executable, "-m", "twisted", "--log-format=text", "mailstack",
            "--data-dir", data_dir, "--hostname", "mx.test",
            "--smtp", "tcp:0:interface=127.0.0.1"]
    argv += [f"--{name}=none" for name in
             ("submission", "submissions", "imap", "imaps", "pop3")] + (extra or [])
    env = dict(os.environ, PYTHONPATH=pythonpath) if pythonpath else None
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=env, cwd=data_dir)
    lines: queue.Queue[str | None] = queue.Queue()

    def read_log():
        # Reads the whole log, so the pipe never fills up and blocks the server.
        for line in process.stdout:
            lines.put(line.decode("utf-8", "replace"))
        lines.put(None)

    threading.Thread(target=read_log, daemon=True).start()
    deadline = time.monotonic() + timeout
    output = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        output.append(line)
        match = re.search(listener + r" listening on 127\.0\.0\.1:(\d+)", line)
        if match:
            return process, int(match.group(1))
    process.kill()
    raise AssertionError("server did not start:\n" + "".join(output))
