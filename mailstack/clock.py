# -*- test-case-name: tests.test_faults_time -*-
"""
Two kinds of time: a monotonic clock for everything that waits (retry
timers, deadlines, IMAP IDLE, every C{callLater}), and the wall clock only
for what is written down or shown (dates in headers, arrival and next
attempt in a queue envelope, log delays).

Twisted's reactors measure C{callLater} with C{time.time}: stepping the
wall clock back by an hour would stall every timer for an hour.
L{use_monotonic_time} gives a reactor C{time.monotonic} instead, and keeps
the wall clock available as C{reactor.wall()} (read with L{wall_seconds},
which falls back to C{seconds()} for a test's C{Clock}, where the two are
the same).
"""

from __future__ import annotations

import time
from typing import Any, Callable

from twisted.internet.interfaces import IReactorTime


def wall_seconds(clock: IReactorTime) -> float:
    """
    The wall-clock time (seconds since the epoch) as C{clock} knows it.
    """
    wall = getattr(clock, "wall", None)
    return float(wall() if wall is not None else clock.seconds())


# Any: it replaces the reactor's seconds() and adds wall(), which no
# interface types.
def use_monotonic_time(reactor: Any, monotonic: Callable[[], float] = time.monotonic,
                       wall: Callable[[], float] = time.time) -> None:
    """
    Make C{reactor}'s timers monotonic: C{reactor.seconds()} becomes
    C{monotonic()}, calls already scheduled keep their delays, and
    C{reactor.wall()} tells the wall-clock time.  Idempotent.
    """
    if getattr(reactor, "wall", None) is not None:
        return
    before, now = reactor.seconds(), monotonic()
    for call in reactor.getDelayedCalls():
        call.time = call.time - before + now
        call.seconds = monotonic
    reactor.seconds = monotonic
    reactor.wall = wall
