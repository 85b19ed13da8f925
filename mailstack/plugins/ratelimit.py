# -*- test-case-name: tests.test_ratelimit -*-
"""
The built-in C{rate-limit} filter (C{--filter rate-limit}): messages and
recipients per hour per authenticated user, per sender domain and per
client network, like Postfix's anvil limits
(C{smtpd_client_message_rate_limit}, C{smtpd_client_recipient_rate_limit}):
a message is counted at MAIL and a recipient at RCPT, whether or not the
rest of the transaction succeeds; over a limit the command gets
C{450 4.7.1} and is not counted.

The counters live in C{DATA/ratelimit.sqlite} (L{mailstack.shared}),
shared by the main process and the C{--receivers} processes.  The window
slides: the count is the current hour's plus the previous hour's weighted
by how much of it is still inside the last hour.

Options (C{[plugins.rate-limit]}; a limit of 0, the default, is off):
C{user-messages}, C{user-recipients}, C{domain-messages},
C{domain-recipients}, C{network-messages}, C{network-recipients},
C{window} (default C{1h}), C{ipv4-prefix} (24), C{ipv6-prefix} (64),
C{exempt-networks} (a list of CIDR networks never limited; default none).
The null sender has no domain and is counted by its user and network only.
"""

from __future__ import annotations

import ipaddress
import math
import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import Address
from mailstack.clock import wall_seconds
from mailstack.config import parse_duration, parse_networks
from mailstack.interfaces import IMessageFilterFactory
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor
from mailstack.shared import SharedDB
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply

SCHEMA = """
CREATE TABLE IF NOT EXISTS rates (
    key TEXT NOT NULL, bucket INTEGER NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (key, bucket));
"""

WHAT = {"user": "from user", "domain": "from sender domain", "network": "from"}


def _limit(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number, 0 for no limit: {value!r}")
    return value


def _prefix(maximum: int) -> Any:
    def parse(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
            raise ValueError(f"must be between 1 and {maximum}: {value!r}")
        return value
    return parse


SPEC = {
    "user-messages": (_limit, 0), "user-recipients": (_limit, 0),
    "domain-messages": (_limit, 0), "domain-recipients": (_limit, 0),
    "network-messages": (_limit, 0), "network-recipients": (_limit, 0),
    "window": (parse_duration, 3600.0),
    "ipv4-prefix": (_prefix(32), 24), "ipv6-prefix": (_prefix(128), 64),
    "exempt-networks": (parse_networks, ()),
}


class RateLimit(MessageFilter):
    name = "rate-limit"
    prune_every = 1000

    def __init__(self, clock: IReactorTime, db: SharedDB, options: dict[str, Any]) -> None:
        self.clock = clock
        self.db = db
        self.options = options
        self._checks = 0

    def network(self, host: str) -> str | None:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return None
        if any(ip in n for n in self.options["exempt-networks"]):
            return "exempt"
        prefix = self.options["ipv4-prefix" if ip.version == 4 else "ipv6-prefix"]
        return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))

    def limits(self, session: Any, sender: Address | None,
               kind: str) -> list[tuple[str, str, int]]:
        """
        The (key, what, limit) triples that apply to this command.
        """
        network = self.network(session.peer_host)
        if network == "exempt":
            return []
        found = []
        if session.user is not None and self.options[f"user-{kind}"]:
            found.append((f"user:{session.user}", f"user {session.user}",
                          self.options[f"user-{kind}"]))
        if sender is not None and self.options[f"domain-{kind}"]:
            domain = sender.domain.lower()
            found.append((f"domain:{domain}", f"sender domain {domain}",
                          self.options[f"domain-{kind}"]))
        if network is not None and self.options[f"network-{kind}"]:
            found.append((f"network:{network}", network, self.options[f"network-{kind}"]))
        return [(f"{kind}:{key}", what, limit) for key, what, limit in found]

    def _count(self, session: Any, sender: Address | None, kind: str) -> Any:
        limits = self.limits(session, sender, kind)
        if not limits:
            return None
        self._checks += 1
        prune = self._checks % self.prune_every == 1
        d = self.db.run(self._take, limits, wall_seconds(self.clock), prune)

        def answer(over: str | None) -> Reply | None:
            if over is None:
                return None
            return Reply(450, "4.7.1", f"Error: too many {kind} from {over}, "
                                       "try again later")

        return d.addCallback(answer)

    def _take(self, db: Any, limits: list[tuple[str, str, int]], now: float,
              prune: bool) -> str | None:
        """
        In one transaction: the first limit this command would exceed, or
        C{None} having counted it under every key.
        """
        window = self.options["window"]
        bucket = math.floor(now / window)
        inside = 1.0 - (now / window - bucket)  # the share of the previous bucket
        if prune:
            db.execute("DELETE FROM rates WHERE bucket < ?", (bucket - 1,))
        for key, what, limit in limits:
            rows = dict(db.execute("SELECT bucket, count FROM rates WHERE key = ? AND "
                                   "bucket >= ?", (key, bucket - 1)).fetchall())
            estimate = rows.get(bucket, 0) + rows.get(bucket - 1, 0) * inside
            if estimate + 1 > limit:
                return what
        for key, _, _ in limits:
            db.execute("INSERT INTO rates VALUES (?, ?, 1) ON CONFLICT (key, bucket) "
                       "DO UPDATE SET count = count + 1", (key, bucket))
        return None

    def mail(self, session: Any, sender: Address | None) -> Any:
        return self._count(session, sender, "messages")

    def rcpt(self, session: Any, sender: Address | None, rcpt: Address) -> Any:
        return self._count(session, sender, "recipients")


@implementer(IPlugin, IMessageFilterFactory)
class RateLimitFactory:
    name = "rate-limit"
    description = "450 4.7.1 over messages/recipients per hour per user, domain, network"

    def __init__(self) -> None:
        self.options = check_options(self.name, {}, SPEC)

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, SPEC)

    def build(self, config: Any, reactor: IMailReactor) -> RateLimit:
        path = os.path.join(os.path.abspath(config.data_dir), "ratelimit.sqlite")
        return RateLimit(reactor, SharedDB(path, SCHEMA, reactor), dict(self.options))


rate_limit = RateLimitFactory()
