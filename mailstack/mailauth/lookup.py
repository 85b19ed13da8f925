# -*- test-case-name: tests.test_mailauth_dns -*-
"""
DNS for mail authentication: asynchronous lookups through a Twisted
resolver (C{twisted.names}), with a time limit on each lookup and answers
cached for their TTL.

Nothing here blocks: SPF, DKIM and DMARC fetch what they need through
L{DNSCache.lookup}, on the reactor thread.  A lookup that times out or
fails with SERVFAIL raises L{DNSTempError}, which every caller turns into
a C{temperror} result, never into a rejection.  A name that does not
exist (NXDOMAIN) or has no record of the type asked is an empty answer.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, TypeVar

import idna
from twisted.internet.defer import Deferred, succeed
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError, ResolverError

#: Longest time an answer is kept, whatever its TTL (seconds).
MAX_TTL = 6 * 3600
#: How long "no such record" is kept when the answer carries no SOA.
NEGATIVE_TTL = 300
#: Entries kept at most; expired entries are dropped first, then the oldest.
MAX_ENTRIES = 10000


_R = TypeVar("_R")


def payload(rr: dns.RRHeader, kind: type[_R]) -> _R | None:
    """
    The payload of C{rr} if it is a C{kind} (C{dns.Record_TXT}...), else
    None.  C{twisted.names} types every payload C{IEncodableRecord | None},
    so a record's fields are read through this check.
    """
    data = rr.payload
    return data if isinstance(data, kind) else None


def payloads(answers: Iterable[dns.RRHeader], rtype: int, kind: type[_R]) -> list[_R]:
    """
    The payloads of the records of type C{rtype} in C{answers}, each a
    C{kind} (see L{payload}).
    """
    return [data for rr in answers
            if rr.type == rtype and (data := payload(rr, kind)) is not None]


_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")


def valid_name(name: str) -> bool:
    """
    Whether C{name} (lower case, no final dot) can be asked of DNS: labels
    of letters, digits, C{-} and C{_}, 1 to 63 characters, 253 in all.
    """
    return (0 < len(name) <= 253 and name.isascii() and
            all(_LABEL.match(label) for label in name.split(".")))


def to_alabel(domain: str) -> str:
    """
    C{domain} as DNS holds it: lower case, internationalised labels as
    A-labels (IDNA 2008 with UTS 46 mapping; RFC 8616 for SPF, DKIM and
    DMARC); unchanged but lower-cased when it cannot be converted.
    """
    name = domain.strip().rstrip(".")
    if name.isascii():
        return name.lower()
    try:
        return idna.encode(name, uts46=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        return name.lower()


class DNSTempError(Exception):
    """
    A lookup that may succeed later: a timeout, SERVFAIL, a refused or
    malformed answer.  Mail authentication reports it as C{temperror}.
    """


class DNSCache:
    """
    Looks records up through C{resolver} and keeps each answer until its
    TTL runs out.  Identical lookups in flight share one query.

    @param resolver: a C{twisted.names} C{IResolver} (the one built from
        C{--dns-server}, or the system's).
    @param clock: an C{IReactorTime}, for TTLs and the time limit.
    @param timeout: seconds one lookup may take before it is a
        L{DNSTempError}.
    """

    def __init__(self, resolver: Any, clock: IReactorTime, timeout: float = 10.0) -> None:
        self.resolver = resolver
        self.clock = clock
        self.timeout = timeout
        self._cache: dict[tuple[str, int], tuple[float, list[dns.RRHeader]]] = {}
        self._pending: dict[tuple[str, int], list[Deferred[list[dns.RRHeader]]]] = {}

    def lookup(self, name: str, rtype: int) -> Deferred[list[dns.RRHeader]]:
        """
        The answer section for C{name} (records of type C{rtype}, and any
        CNAME records leading to them); C{[]} when the name or the record
        does not exist.  Fails with L{DNSTempError}.
        """
        key = (name.lower().rstrip("."), rtype)
        if not valid_name(key[0]):
            # Names come from hostile input (MAIL FROM, d= and s= tags): one
            # that DNS cannot hold has no records.
            return succeed([])
        now = self.clock.seconds()
        cached = self._cache.get(key)
        if cached is not None:
            if cached[0] > now:
                return Deferred.fromCoroutine(_value(cached[1]))
            del self._cache[key]
        waiting: Deferred[list[dns.RRHeader]] = Deferred()
        if key in self._pending:
            self._pending[key].append(waiting)
            return waiting
        self._pending[key] = [waiting]
        Deferred.fromCoroutine(self._query(key))
        return waiting

    async def text(self, name: str) -> list[bytes]:
        """
        The TXT records at C{name}, each one's strings joined (RFC 7208
        3.3, RFC 6376 3.6.2.2).
        """
        answers = await self.lookup(name, dns.TXT)
        return [b"".join(txt.data) for txt in payloads(answers, dns.TXT, dns.Record_TXT)]

    async def _query(self, key: tuple[str, int]) -> None:
        name, rtype = key
        try:
            try:
                query = self.resolver.query(dns.Query(name, rtype, dns.IN))
            except Exception as e:  # noqa: BLE001 (a resolver that fails at once)
                raise DNSTempError(f"{name}: {type(e).__name__}") from None
            query.addTimeout(self.timeout, self.clock)
            try:
                answers, authority, _ = await query
                ttl = min((rr.ttl for rr in answers), default=None)
                if ttl is None:
                    ttl = _negative_ttl(authority)
            except DNSNameError as e:
                answers, ttl = [], _negative_ttl(getattr(e.args[0], "authority", []) if e.args
                                                  else [])
            except (DomainError, ResolverError, DeferredTimeout, OSError) as e:
                # SERVFAIL, REFUSED, a timeout, a socket error: all may pass.
                raise DNSTempError(f"{name}: {type(e).__name__}") from None
        except DNSTempError as e:
            for waiting in self._pending.pop(key):
                waiting.errback(e)
            return
        self._store(key, ttl, list(answers))
        for waiting in self._pending.pop(key):
            waiting.callback(list(answers))

    def _store(self, key: tuple[str, int], ttl: float, answers: list[dns.RRHeader]) -> None:
        if ttl <= 0:
            return
        now = self.clock.seconds()
        if len(self._cache) >= MAX_ENTRIES:
            for old in [k for k, (expiry, _) in self._cache.items() if expiry <= now]:
                del self._cache[old]
            while len(self._cache) >= MAX_ENTRIES:
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (now + min(ttl, MAX_TTL), answers)


async def _value(answers: list[dns.RRHeader]) -> list[dns.RRHeader]:
    return list(answers)


def _negative_ttl(authority: list[Any]) -> float:
    """
    How long a negative answer is kept: the SOA's minimum field bounded by
    its TTL (RFC 2308 5), else L{NEGATIVE_TTL}.
    """
    for rr in authority or []:
        if getattr(rr, "type", None) == dns.SOA:
            return min(rr.ttl, rr.payload.minimum, NEGATIVE_TTL * 12)
    return NEGATIVE_TTL
