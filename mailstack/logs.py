# -*- test-case-name: tests.test_logs -*-
"""
Keeping the log to one line per event a postmaster cares about.

Twisted's DNS client opens a UDP port per query (a random source port),
and Twisted logs four lines for it: "Starting protocol", "DNSDatagramProtocol
starting on N", "Stopping protocol", "(UDP Port N Closed)"; a delivery
attempt makes ten or more.  L{quiet_dns} turns off the protocol's own
lines (C{noisy = False}, as mailstack's factories do); the port's two are
logged unconditionally by Twisted, so L{NoiseFilter} drops them on their
way to the log's observers.
"""

from __future__ import annotations

import re
from typing import Any

from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher
from twisted.names import client, dns
from zope.interface import implementer

# The UDP port lines of DNS queries (legacy log.msg events).
_NOISE = re.compile(r"DNSDatagramProtocol starting on \d+|\(UDP Port \d+ Closed\)")


def quiet_dns() -> None:
    """
    No start/stop lines for DNS client protocols (UDP per query, TCP on
    truncation).
    """
    dns.DNSDatagramProtocol.noisy = False
    client.DNSClientFactory.noisy = False


def is_noise(event: dict[str, Any]) -> bool:
    message = event.get("message")
    if not message or len(message) != 1 or not isinstance(message[0], str):
        return False  # only the legacy log.msg("...") lines can be noise
    return bool(_NOISE.fullmatch(message[0]))


@implementer(ILogObserver)
class NoiseFilter:
    """
    An observer that passes every event but the noise to another.
    """

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer

    def __call__(self, event: dict[str, Any]) -> None:
        if not is_noise(event):
            self.observer(event)


def filter_noise(publisher: LogPublisher = globalLogPublisher) -> None:
    """
    Put L{NoiseFilter} in front of the observers the log has now (twistd's
    file or standard output); call after logging has begun.
    """
    observers = getattr(publisher, "_observers", None)
    if observers is None:
        return  # a future Twisted without that list: noise, but nothing lost
    for observer in list(observers):
        if not isinstance(observer, NoiseFilter):
            publisher.removeObserver(observer)
            publisher.addObserver(NoiseFilter(observer))


__all__ = ["NoiseFilter", "filter_noise", "is_noise", "quiet_dns"]
