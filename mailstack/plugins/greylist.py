# -*- test-case-name: tests.test_filters -*-
"""
The built-in greylisting filter (C{--filter greylist}), written against
the same plugin API a third party uses.

A first delivery attempt from an unknown (client network, sender,
recipient) triple gets C{451 4.7.1} at RCPT; a retry after five minutes
passes, and the triple is then let through for 35 days.  Real MTAs retry,
most spam engines do not.  Only the receiving MTA's anonymous clients are
greylisted (never an authenticated submission); clients are grouped by
/24 (IPv4) or /64 (IPv6) because big senders retry from another address
of the same pool.  The table lives in memory (a restart forgets it, so
known senders wait once more) and holds at most 100,000 triples.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import Address
from mailstack.interfaces import IMessageFilterFactory
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply


def client_network(host: str) -> str:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    prefix = 24 if ip.version == 4 else 64
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class Greylist(MessageFilter):
    name = "greylist"
    delay = 300.0  # a retry sooner than this is greylisted again
    retry_window = 2 * 86400.0  # a first attempt not retried by then is forgotten
    pass_lifetime = 35 * 86400.0  # a triple that passed is let through this long
    max_entries = 100_000

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self._first_seen: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._passed: OrderedDict[tuple[str, str, str], float] = OrderedDict()

    def rcpt(self, session: Any, sender: Address | None, rcpt: Address) -> Reply | None:
        if session.user is not None or session.service != "smtp":
            return None
        now = self.clock.seconds()
        key = (client_network(session.peer_host), str(sender or "").lower(), str(rcpt).lower())
        passed = self._passed.get(key)
        if passed is not None and now - passed < self.pass_lifetime:
            self._passed.move_to_end(key)
            self._passed[key] = now
            return None
        first = self._first_seen.get(key)
        if first is not None and now - first > self.retry_window:
            first = None
        if first is None:
            self._remember(self._first_seen, key, now)
            return self._refusal(self.delay)
        if now - first < self.delay:
            return self._refusal(self.delay - (now - first))
        del self._first_seen[key]
        self._remember(self._passed, key, now)
        return None

    def _remember(self, table: OrderedDict[tuple[str, str, str], float],
                  key: tuple[str, str, str], now: float) -> None:
        table[key] = now
        table.move_to_end(key)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    @staticmethod
    def _refusal(wait: float) -> Reply:
        return Reply(451, "4.7.1", f"Greylisted, please try again in {int(wait) + 1} seconds")


@implementer(IPlugin, IMessageFilterFactory)
class GreylistFactory:
    name = "greylist"
    description = "451 to a first attempt from an unknown client/sender/recipient; 5 min"

    def build(self, config: Any, reactor: Any) -> Greylist:
        return Greylist(reactor)


greylist = GreylistFactory()
