# -*- test-case-name: tests.test_receivers -*-
"""
How a receiver process (C{--receivers}) tells the queue manager about the
messages it queued: C{adopt ID} lines on one control-socket connection
kept open, many in flight (the control socket answers them in order),
instead of a new connection from a worker thread per message.

An announcement is a hint, not a promise: the message is committed to the
queue directory before it is announced, and the 250 does not wait for the
answer.  If an announcement is lost (no queue manager listening, the
connection lost, an error answered), the queue manager's sweep finds the
message, at start and every minute.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure

from mailstack.queue.control import control_path
from mailstack.transport import IConnection

log = Logger()


class _AnnounceProtocol(LineReceiver):
    transport: IConnection  # once connected: see mailstack.transport

    delimiter = b"\n"
    MAX_LENGTH = 1024

    def __init__(self, announcer: "Announcer") -> None:
        self.announcer = announcer
        self.closed: Deferred[None] = Deferred()

    def lineReceived(self, line: bytes) -> None:
        self.announcer._answered(line.decode("utf-8", "replace").strip())

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.announcer._lost(self)
        self.closed.callback(None)


class Announcer:
    """
    Announces queued messages to the queue manager of C{data_dir}.

    At most L{window} announcements are unanswered at once (the control
    socket holds a bounded amount of pending input); the others wait here,
    in order.
    """

    window = 64

    def __init__(self, reactor: Any, data_dir: str) -> None:
        self.reactor = reactor
        self.data_dir = data_dir
        self._protocol: _AnnounceProtocol | None = None
        self._connecting: Deferred[Any] | None = None
        self._waiting: deque[tuple[str, Deferred[str]]] = deque()
        self._in_flight: deque[tuple[str, Deferred[str]]] = deque()

    def announce(self, queue_id: str) -> Deferred[str]:
        """
        Send C{adopt queue_id}; the Deferred fires with the answer (C{ok}
        when the queue manager took it up), or with C{error ...} when it
        was lost.  It never fails.
        """
        d: Deferred[str] = Deferred()
        self._waiting.append((queue_id, d))
        self._pump()
        return d

    def _pump(self) -> None:
        if self._protocol is None:
            if self._connecting is None and self._waiting:
                self._connect()
            return
        lines = []
        while self._waiting and len(self._in_flight) < self.window:
            item = self._waiting.popleft()
            self._in_flight.append(item)
            lines.append(b"adopt " + item[0].encode("ascii") + b"\n")
        if lines:
            self._protocol.transport.write(b"".join(lines))  # one write for the batch

    def _connect(self) -> None:
        endpoint = UNIXClientEndpoint(self.reactor, control_path(self.data_dir), timeout=10)
        factory = Factory.forProtocol(lambda: _AnnounceProtocol(self))
        factory.noisy = False
        self._connecting = d = endpoint.connect(factory)

        def connected(protocol: _AnnounceProtocol) -> None:
            self._connecting = None
            self._protocol = protocol
            self._pump()

        def failed(failure: Failure) -> None:
            self._connecting = None
            self._fail_all(self._waiting, f"error {failure.getErrorMessage()}")

        d.addCallbacks(connected, failed)

    def _answered(self, answer: str) -> None:
        if self._in_flight:
            _, d = self._in_flight.popleft()
            d.callback(answer)
        self._pump()

    def _lost(self, protocol: _AnnounceProtocol) -> None:
        if protocol is self._protocol:
            self._protocol = None
            self._fail_all(self._in_flight, "error connection to the queue manager lost")
            self._pump()  # what waits goes on a new connection

    @staticmethod
    def _fail_all(items: deque[tuple[str, Deferred[str]]], answer: str) -> None:
        while items:
            _, d = items.popleft()
            d.callback(answer)

    def close(self) -> Deferred[None]:
        """
        Close the connection (at stop); unanswered announcements are left
        to the sweep.
        """
        protocol = self._protocol
        if protocol is None:
            return succeed(None)
        protocol.transport.loseConnection()
        return protocol.closed
