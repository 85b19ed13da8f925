# -*- test-case-name: tests.test_turnlog -*-
"""
The log's lines of one reactor turn written together.

Twisted's C{FileLogObserver} writes and flushes every line at once: a
C{write} system call per line, seven per received message, each waking
whoever reads the log (the journal, a pipe), and about a fifth of the
reactor thread's time on the inbound path.  L{TurnWriter} stands in for
the observer's file: lines written on the reactor thread while the reactor
runs are kept until the end of the turn (a C{callLater(0)}), then written
in as few C{write} calls as fit L{PIPE_BUF} (so that lines of several
processes sharing one pipe, as receivers do, never interleave within a
line).  Nothing changes in the text, and nothing waits longer than the
reactor turn that logged it, except:

  - a line written from another thread, or while the reactor is not
    running (before it starts, after it stopped), is written at once,
    after whatever is pending, so the order of the lines stays that of
    the events;
  - at shutdown the pending lines are written by a trigger after the
    reactor's own (C{after shutdown}: from then on the reactor does not
    run, so later lines go straight out), and by C{atexit} as a last
    resort; L{TurnWriter.close} does the same for a test.

A process killed by SIGKILL loses the lines of the turn it was in, which
it could also have lost with an unflushed line of its own.
"""

from __future__ import annotations

import atexit
import threading
from typing import IO, Any

# Writes to a pipe up to this size are atomic (POSIX: at least 512; Linux 4096).
PIPE_BUF = 4096


class TurnWriter:
    """
    A file for a C{FileLogObserver}: see the module docstring.

    @ivar writes: how many times the underlying file was written (for the
        tests and benchmarks).
    """

    def __init__(self, out: IO[Any], reactor: Any) -> None:
        """
        @param out: the log's file (text or bytes, as the observer writes).
        @param reactor: the reactor whose turns group the lines; the
            writer must be made on its thread.
        """
        self.out = out
        self.reactor = reactor
        self.writes = 0
        self._thread = threading.get_ident()
        # Reentrant: Twisted logs "Received SIGTERM" from the signal handler,
        # which runs on the reactor thread between any two bytecodes, also
        # while this writer holds the lock.
        self._lock = threading.RLock()
        self._pending: list[Any] = []
        self._scheduled = False
        reactor.addSystemEventTrigger("after", "shutdown", self.flush)
        atexit.register(self.flush)

    def write(self, text: Any) -> None:
        """
        Keep C{text} until the end of the reactor turn, or write it now (see
        the module docstring).
        """
        if threading.get_ident() == self._thread and self.reactor.running:
            with self._lock:
                self._pending.append(text)
            if not self._scheduled:
                self._scheduled = True
                self.reactor.callLater(0, self._turn_ended)
            return
        with self._lock:
            self._pending.append(text)
            self._write_pending()

    def flush(self) -> None:
        """
        Write what is pending if the reactor is not running (the observer
        calls it after every line: while the reactor runs, the turn's end
        writes); L{close} writes it in any case.
        """
        if not self.reactor.running or threading.get_ident() != self._thread:
            with self._lock:
                self._write_pending()

    def close(self) -> None:
        """
        Write whatever is pending now.
        """
        with self._lock:
            self._write_pending()

    def _turn_ended(self) -> None:
        self._scheduled = False
        with self._lock:
            self._write_pending()

    def _write_pending(self) -> None:
        # Called with the lock held.
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        chunk, size = pending[0], _size(pending[0])
        for text in pending[1:]:
            n = _size(text)
            if size + n > PIPE_BUF:
                self._write(chunk)
                chunk, size = text, n
            else:
                chunk += text
                size += n
        self._write(chunk)

    def _write(self, chunk: Any) -> None:
        # One chunk, one write: flushed before the next can join it.
        self.writes += 1
        try:
            self.out.write(chunk)
            self.out.flush()
        except OSError:
            pass  # a closed log (EPIPE): the lines are lost, as Twisted's would be


def _size(text: Any) -> int:
    """
    The octets C{text} takes in the log (UTF-8 for text).
    """
    if isinstance(text, bytes) or text.isascii():
        return len(text)
    return len(text.encode("utf-8"))


__all__ = ["PIPE_BUF", "TurnWriter"]
