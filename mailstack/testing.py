"""
Test doubles for mailstack and for code built on it: an in-memory DNS
resolver, and a scripted remote SMTP server built on mailstack's own.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Callable

from twisted.internet.defer import Deferred, fail, succeed
from twisted.names import dns
from twisted.names.error import DNSNameError

from mailstack.delivery.router import Resolution
from mailstack.smtp.reply import Reply, SMTPError


class FakeResolver:
    """
    Answers MX, A and AAAA lookups from dictionaries.

    @param mx: C{{domain: [(preference, host), ...]}}; C{[(0, "")]} is a null MX.
    @param a: C{{host: ["127.0.0.1", ...]}} (IPv4 and IPv6 mixed).
    @param missing: domains that do not exist (NXDOMAIN).
    """

    def __init__(self, mx: dict[str, list[tuple[int, str]]] | None = None,
                 a: dict[str, list[str]] | None = None, missing: set[str] | None = None):
        self.mx = mx or {}
        self.a = a or {}
        self.missing = missing or set()
        self.queries: list[tuple[str, str]] = []

    def _exists(self, name: str) -> bool:
        return name not in self.missing

    def lookupMailExchange(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("MX", name))
        if not self._exists(name):
            return fail(DNSNameError(name))
        answers = [dns.RRHeader(name, dns.MX, payload=dns.Record_MX(preference, host))
                   for preference, host in self.mx.get(name, [])]
        return succeed((answers, [], []))

    def _addresses(self, name: str, version: int) -> Deferred[Any]:
        if not self._exists(name):
            return fail(DNSNameError(name))
        answers = []
        for text in self.a.get(name, []):
            ip = ipaddress.ip_address(text)
            if ip.version != version:
                continue
            if version == 4:
                answers.append(dns.RRHeader(name, dns.A, payload=dns.Record_A(text)))
            else:
                answers.append(dns.RRHeader(name, dns.AAAA, payload=dns.Record_AAAA(text)))
        return succeed((answers, [], []))

    def lookupAddress(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("A", name))
        return self._addresses(name, 4)

    def lookupIPV6Address(self, name: str, timeout: Any = None) -> Deferred[Any]:
        self.queries.append(("AAAA", name))
        return self._addresses(name, 6)


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
        self.attempts = 0

    def connect(self, session: Any) -> None:
        self.attempts += 1

    def extensions(self, session: Any) -> list[str]:
        return []

    def auth(self, protocol: Any, arg: str) -> Reply:
        return Reply(503, "5.5.1", "no AUTH here")

    def mail(self, session: Any, sender: Any) -> None:
        return None

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
