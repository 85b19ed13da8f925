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

L{fast_text} makes the text log cheap: Twisted formats every line with
C{string.Formatter} (a parser written in Python) and a C{strftime}, about
0.1 ms a line, several lines per message; L{FastClassicText} gives the
same text with C{str.format_map} and one time stamp per second.
"""

from __future__ import annotations

import re
from typing import IO, Any, Callable, cast

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogPublisher,
    formatTime,
    globalLogPublisher,
)
from twisted.names import client, dns
from zope.interface import implementer

from mailstack.turnlog import TurnWriter

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


class FastClassicText:
    """
    What Twisted's C{textFileLogObserver} writes for an event (its
    C{formatEventAsClassicLogText} with RFC 3339 times), made fast for the
    plain events that are nearly all of a mail server's log: a C{str}
    format without C{()} calls, no failure attached.  Every other event,
    and any event the fast path cannot format, goes to the original
    formatter, so the text is the same either way (L{fast_text} checks that
    before it installs one).
    """

    def __init__(self, original: Callable[[dict[str, Any]], str | None]) -> None:
        self.original = original
        self._second: int | None = None
        self._stamp = "-"

    def stamp(self, when: float) -> str:
        """
        The time stamp of C{when}, computed once per second.
        """
        second = int(when // 1)
        if second != self._second:
            self._stamp = formatTime(second)
            self._second = second
        return self._stamp

    def __call__(self, event: dict[str, Any]) -> str | None:
        fmt = event.get("log_format")
        when = event.get("log_time")
        if (type(fmt) is not str or "()" in fmt or "log_failure" in event
                or "log_flattened" in event or not isinstance(when, (int, float))):
            return self.original(event)
        try:
            text = fmt.format_map(event)
            system = event.get("log_system")
            if system is None:
                level = event.get("log_level")
                system = "{}#{}".format(event.get("log_namespace", "-"),
                                        level.name if level is not None else "-")
            else:
                system = str(system)
        except Exception:  # noqa: BLE001 - Twisted's formatter says what was wrong
            return self.original(event)
        if not text:
            return None
        return f"{self.stamp(when)} [{system}] {text}".replace("\n", "\n\t") + "\n"


# Events the fast formatter must render exactly as the original does
# before it replaces it (a fractional time, a field with a format spec, a
# multi-line text, no log_system).
_PROBES: list[dict[str, Any]] = [
    {"log_format": "{qid}: to=<{to}> delay={delay:.1f} ({reply!r})", "qid": "4F2A",
     "to": "a@b.test", "delay": 1.25, "reply": "250 ok", "log_time": 1700000000.75,
     "log_system": "-", "log_level": LogLevel.info, "log_namespace": "probe"},
    {"log_format": "two\nlines {n}", "n": 2, "log_time": 1700003600.0,
     "log_level": LogLevel.warn, "log_namespace": "mailstack.probe"},
]


def _file_observer(observer: Any) -> FileLogObserver | None:
    if isinstance(observer, NoiseFilter):
        observer = observer.observer
    if isinstance(observer, FilteringLogObserver):
        observer = getattr(observer, "_observer", None)
    return observer if isinstance(observer, FileLogObserver) else None


def fast_text(observer: Any) -> bool:
    """
    Give a text file observer (twistd's and twist's, perhaps behind a level
    filter) the L{FastClassicText} formatter, if it writes the same text
    with it as without; C{True} if it was installed.
    """
    target = _file_observer(observer)
    if target is None or isinstance(target.formatEvent, FastClassicText):
        return False
    fast = FastClassicText(target.formatEvent)
    try:
        if any(fast(dict(probe)) != target.formatEvent(dict(probe)) for probe in _PROBES):
            return False  # another format (JSON, other times): left as it is
    except Exception:  # noqa: BLE001 - an observer we do not understand is left alone
        return False
    target.formatEvent = fast
    return True


def turn_writes(observer: Any, reactor: Any) -> bool:
    """
    Give a file observer a L{mailstack.turnlog.TurnWriter}: the lines of a
    reactor turn written together; C{True} if it was installed.  Call on
    the reactor's thread.
    """
    target = _file_observer(observer)
    out = getattr(target, "_outFile", None)
    if target is None or out is None or isinstance(out, TurnWriter):
        return False
    target._outFile = cast(IO[Any], TurnWriter(out, reactor))  # a file as far as it writes
    return True


def filter_noise(publisher: LogPublisher = globalLogPublisher, reactor: Any = None) -> None:
    """
    Put L{NoiseFilter} in front of the observers the log has now (twistd's
    file or standard output), and give text file observers the fast
    formatter (L{fast_text}); call after logging has begun.

    @param reactor: if given, file observers write each reactor turn's
        lines together (L{turn_writes}); call on its thread.
    """
    observers = getattr(publisher, "_observers", None)
    if observers is None:
        return  # a future Twisted without that list: noise, but nothing lost
    for observer in list(observers):
        fast_text(observer)
        if reactor is not None:
            turn_writes(observer, reactor)
        if not isinstance(observer, NoiseFilter):
            publisher.removeObserver(observer)
            publisher.addObserver(NoiseFilter(observer))


__all__ = ["FastClassicText", "NoiseFilter", "fast_text", "filter_noise", "is_noise", "quiet_dns",
           "turn_writes"]
