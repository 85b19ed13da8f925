# -*- test-case-name: tests.test_metrics -*-
"""
Counts of the events on every message's path (a message received, a
recipient's delivery outcome, an SMTP session), told directly by the code
where they happen, for C{--metrics} (L{mailstack.metrics}).

Counting them by matching the log's format strings was fragile (a reworded
line stopped a metric silently) and cost a look at every log event; these
calls cost nothing while nobody counts.  Rarer events (refusals, failed
logins, TLS) are still counted from the log.
"""

from __future__ import annotations

from typing import Protocol


class Counter(Protocol):
    """
    What counts the events (L{mailstack.metrics.Metrics}).
    """

    def count_received(self, service: str, tls: bool) -> None:
        """
        A message was accepted: by a listener (C{smtp}, C{submission}, ...),
        or C{local} (sendmail) or C{bounce}.
        """

    def count_delivery(self, status: str, relay: str, delay: float | None) -> None:
        """
        A recipient's delivery attempt ended: C{status} is C{sent},
        C{deferred}, C{bounced} or C{expired}; C{relay} is C{local} or
        C{remote}; C{delay} (arrival to delivery, seconds) for sent mail.
        """

    def count_session(self, listener: str) -> None:
        """
        A connection was accepted by C{listener}.
        """


_counters: list[Counter] = []


def add(counter: Counter) -> None:
    _counters.append(counter)


def remove(counter: Counter) -> None:
    if counter in _counters:
        _counters.remove(counter)


def received(service: str, tls: bool) -> None:
    for counter in _counters:
        counter.count_received(service, tls)


def delivery(status: str, relay: str, delay: float | None = None) -> None:
    for counter in _counters:
        counter.count_delivery(status, relay, delay)


def session(listener: str) -> None:
    for counter in _counters:
        counter.count_session(listener)
