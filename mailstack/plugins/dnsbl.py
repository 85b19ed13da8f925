# -*- test-case-name: tests.test_dnsbl -*-
"""
The built-in C{dnsbl} filter (C{--filter dnsbl}): refuses clients listed on
DNS block lists, with weights and a threshold in the style of Postfix's
C{postscreen_dnsbl_sites} (a single list with weight 1 and threshold 1 is
Postfix's C{reject_rbl_client}).

Options (C{[plugins.dnsbl]}):

  - C{sites}: a list of C{ZONE[=PATTERN][*WEIGHT]}, e.g.
    C{"zen.spamhaus.org*3"}, C{"b.barracudacentral.org=127.0.0.2*2"},
    C{"list.dnswl.org=127.0.[0..255].[1..3]*-2"} (an allow list lowers the
    score).  PATTERN is the reply address, each octet a number, C{[n..m]}
    or C{[a;b;c]}; without one any 127.0.0.0/8 reply lists.  WEIGHT
    defaults to 1.
  - C{threshold}: the score at which a client is refused (default 1).
  - C{stage}: C{connect} (the greeting is a C{554 5.7.1}) or C{rcpt} (the
    default: every recipient is refused with C{554 5.7.1}, so the client
    sees why in its bounce, as C{reject_rbl_client} does).
  - C{timeout}: seconds for the lookups (default 10).

Lookups go through twisted.names to C{--dns-server} (or the system's
resolvers), every list at once; a result is kept per client address for
five minutes.  A list that does not answer in time or fails counts as
not listing the client (fail open, as postscreen does), with a log line.
Only anonymous clients of the receiving MTA are checked.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.client import Resolver, createResolver
from twisted.names.error import DNSNameError
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import Address
from mailstack.config import ConfigError
from mailstack.interfaces import IMessageFilterFactory
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply

log = Logger()

_OCTET = r"(?:\d{1,3}|\[\d{1,3}\.\.\d{1,3}\]|\[\d{1,3}(?:;\d{1,3})*\])"
_PATTERN = re.compile(_OCTET + r"(?:\." + _OCTET + r"){3}")
_ZONE = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)+\.?")


@dataclass(frozen=True)
class Site:
    zone: str
    pattern: tuple[frozenset[int], ...] | None
    weight: int

    def matches(self, address: str) -> bool:
        try:
            octets = [int(o) for o in address.split(".")]
        except ValueError:
            return False
        if self.pattern is None:
            return len(octets) == 4 and octets[0] == 127
        return len(octets) == 4 and all(o in allowed for o, allowed in zip(octets, self.pattern))


def _octet(text: str) -> frozenset[int]:
    if text.startswith("[") and ".." in text:
        low, high = (int(x) for x in text[1:-1].split(".."))
        values = frozenset(range(low, high + 1))
    elif text.startswith("["):
        values = frozenset(int(x) for x in text[1:-1].split(";"))
    else:
        values = frozenset([int(text)])
    if not values or max(values) > 255:
        raise ValueError(f"not an octet pattern: {text}")
    return values


def parse_site(text: Any) -> Site:
    """
    Parse C{ZONE[=PATTERN][*WEIGHT]} (postscreen_dnsbl_sites syntax).
    """
    rest, weight = str(text).strip(), 1
    match = re.fullmatch(r"(.*)\*(-?\d+)", rest)
    if match is not None:
        rest, weight = match.group(1), int(match.group(2))
    zone, eq, pattern = rest.partition("=")
    if not _ZONE.fullmatch(zone):
        raise ValueError(f"not ZONE[=PATTERN][*WEIGHT]: {text!r}")
    octets = None
    if eq:
        if not _PATTERN.fullmatch(pattern):
            raise ValueError(f"not a reply pattern such as 127.0.0.[2..11]: {pattern!r}")
        octets = tuple(_octet(o) for o in re.findall(_OCTET, pattern))
    return Site(zone.lower().rstrip("."), octets, weight)


def _sites(value: Any) -> tuple[Site, ...]:
    if not isinstance(value, list) or not value:
        raise ValueError("a non-empty list of ZONE[=PATTERN][*WEIGHT]")
    return tuple(parse_site(v) for v in value)


def _stage(value: Any) -> str:
    if value not in ("connect", "rcpt"):
        raise ValueError(f"connect or rcpt, not {value!r}")
    return str(value)


def _positive(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be positive: {value!r}")
    return number


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"not a whole number: {value!r}")
    return value


SPEC = {"sites": (_sites, None), "threshold": (_int, 1), "stage": (_stage, "rcpt"),
        "timeout": (_positive, 10.0)}


def query_name(host: str, zone: str) -> str | None:
    """
    C{4.3.2.1.zone} for 1.2.3.4; nibbles reversed for IPv6.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version == 4:
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + zone


class DNSBL(MessageFilter):
    name = "dnsbl"
    cache_time = 300.0
    cache_size = 10_000

    def __init__(self, resolver: Any, clock: IReactorTime, options: dict[str, Any]) -> None:
        self.resolver = resolver
        self.clock = clock
        self.sites = options["sites"]
        self.threshold = options["threshold"]
        self.stage = options["stage"]
        self.timeout = options["timeout"] + 5  # the filter's own limit, above the lookups'
        self.lookup_timeout = options["timeout"]
        self._cache: dict[str, tuple[float, int, tuple[str, ...]]] = {}

    def score(self, host: str) -> Deferred[tuple[int, tuple[str, ...]]]:
        """
        The client's score and the lists that listed it.
        """
        now = self.clock.seconds()
        cached = self._cache.get(host)
        if cached is not None and now - cached[0] < self.cache_time:
            d: Deferred[tuple[int, tuple[str, ...]]] = Deferred()
            d.callback(cached[1:])
            return d
        return Deferred.fromCoroutine(self._score(host, now))

    async def _score(self, host: str, now: float) -> tuple[int, tuple[str, ...]]:
        queries = []
        for site in self.sites:
            name = query_name(host, site.zone)
            if name is None:
                return 0, ()
            queries.append(self.resolver.lookupAddress(name, timeout=(self.lookup_timeout,)))
        results = await DeferredList(queries, consumeErrors=True)
        score, listed = 0, []
        for site, (ok, value) in zip(self.sites, results):
            if not ok:
                if not value.check(DNSNameError):  # NXDOMAIN: not listed
                    log.info("dnsbl: {zone} did not answer for {host}: {error}",
                             zone=site.zone, host=host, error=value.getErrorMessage())
                continue
            answers = [a.payload.dottedQuad() for a in value[0] if a.type == dns.A]
            if any(site.matches(a) for a in answers):
                score += site.weight
                listed.append(site.zone)
        if len(self._cache) >= self.cache_size:
            self._cache.clear()
        self._cache[host] = (now, score, tuple(listed))
        return score, tuple(listed)

    async def _check(self, session: Any) -> Reply | None:
        if session.user is not None or session.service != "smtp":
            return None
        score, listed = await self.score(session.peer_host)
        if score < self.threshold:
            return None
        log.info("dnsbl: {host} scored {score} (threshold {threshold}) on {lists}",
                 host=session.peer_host, score=score, threshold=self.threshold,
                 lists=", ".join(listed))
        return Reply(554, "5.7.1", f"Service unavailable; client host [{session.peer_host}] "
                                   f"blocked using {', '.join(listed)}")

    async def connect(self, session: Any) -> Reply | None:
        if self.stage != "connect":
            return None
        return await self._check(session)

    async def rcpt(self, session: Any, sender: Address | None, rcpt: Address) -> Reply | None:
        if self.stage != "rcpt":
            return None
        return await self._check(session)


@implementer(IPlugin, IMessageFilterFactory)
class DNSBLFactory:
    name = "dnsbl"
    description = "refuses clients on DNS block lists (weights and a threshold)"

    def __init__(self) -> None:
        self.options: dict[str, Any] | None = None

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, SPEC)
        if self.options["sites"] is None:
            raise ConfigError("[plugins.dnsbl]: sites is required")

    def build(self, config: Any, reactor: IMailReactor) -> DNSBL:
        if self.options is None:
            raise ConfigError("[plugins.dnsbl]: sites is required")
        if config.dns_server:
            resolver = Resolver(servers=[config.dns_server], reactor=reactor)
        else:
            resolver = createResolver()
        return DNSBL(resolver, reactor, self.options)


dnsbl = DNSBLFactory()
