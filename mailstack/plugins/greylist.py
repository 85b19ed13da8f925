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
of the same pool.  The table is an SQLite file, C{DATA/greylist.sqlite}
(L{mailstack.shared}), shared by the main process and the C{--receivers}
processes, so a retry that lands on another process passes, and a
restart forgets nothing; it holds at most 100,000 triples.  Options
(C{[plugins.greylist]}): C{delay} (default C{5m}).  L{Greylist} alone is
the same logic in memory.
"""

from __future__ import annotations

import ipaddress
import json
import os
from collections import OrderedDict
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import Address
from mailstack.clock import wall_seconds
from mailstack.config import parse_duration
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor
from mailstack.shared import SharedDB
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

    def __init__(self, clock: IReactorTime) -> None:
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


SCHEMA = """
CREATE TABLE IF NOT EXISTS greylist (
    key TEXT PRIMARY KEY, first_seen REAL, passed REAL, used REAL NOT NULL);
CREATE INDEX IF NOT EXISTS greylist_used ON greylist (used);
"""


class SharedGreylist(Greylist):
    """
    The same policy over a table shared between processes.
    """

    prune_every = 1000

    def __init__(self, clock: IReactorTime, db: SharedDB) -> None:
        super().__init__(clock)
        self.db = db
        self._checks = 0

    def rcpt(self, session: Any, sender: Address | None, rcpt: Address) -> Any:
        if session.user is not None or session.service != "smtp":
            return None
        key = json.dumps([client_network(session.peer_host), str(sender or "").lower(),
                          str(rcpt).lower()])
        self._checks += 1
        prune = self._checks % self.prune_every == 1
        d = self.db.run(self._check, key, wall_seconds(self.clock), prune)
        return d.addCallback(lambda wait: None if wait is None else self._refusal(wait))

    def _check(self, db: Any, key: str, now: float, prune: bool) -> float | None:
        """
        In one transaction: C{None} to pass, or the seconds left to wait.
        """
        if prune:
            db.execute("DELETE FROM greylist WHERE (passed IS NULL AND first_seen < ?) "
                       "OR passed < ?", (now - self.retry_window, now - self.pass_lifetime))
            db.execute("DELETE FROM greylist WHERE key IN (SELECT key FROM greylist "
                       "ORDER BY used DESC LIMIT -1 OFFSET ?)", (self.max_entries,))
        row = db.execute("SELECT first_seen, passed FROM greylist WHERE key = ?",
                         (key,)).fetchone()
        first, passed = row if row is not None else (None, None)
        if passed is not None and now - passed < self.pass_lifetime:
            db.execute("UPDATE greylist SET passed = ?, used = ? WHERE key = ?",
                       (now, now, key))
            return None
        if first is not None and now - first > self.retry_window:
            first = None
        if first is None:
            db.execute("INSERT OR REPLACE INTO greylist VALUES (?, ?, NULL, ?)",
                       (key, now, now))
            return self.delay
        if now - first < self.delay:
            return self.delay - (now - first)
        db.execute("UPDATE greylist SET first_seen = NULL, passed = ?, used = ? WHERE key = ?",
                   (now, now, key))
        return None


@implementer(IPlugin, IMessageFilterFactory)
class GreylistFactory:
    name = "greylist"
    description = "451 to a first attempt from an unknown client/sender/recipient; 5 min"

    def __init__(self) -> None:
        self.options: dict[str, Any] = {"delay": Greylist.delay}

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, {"delay": (parse_duration, 300.0)})

    def build(self, config: Any, reactor: IMailReactor) -> Greylist:
        if config is None:  # no data directory: the in-memory table
            return Greylist(reactor)
        db = SharedDB(os.path.join(os.path.abspath(config.data_dir), "greylist.sqlite"),
                      SCHEMA, reactor)
        greylist = SharedGreylist(reactor, db)
        greylist.delay = self.options["delay"]
        return greylist


greylist = GreylistFactory()
