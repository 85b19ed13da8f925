# -*- test-case-name: tests.test_limits -*-
"""
Connection limits for every listener, and the per-command deadline.

One L{ConnectionLimits} is shared by all the listeners of a process; each
listener's factory is wrapped in a L{LimitedFactory}, which counts the
connections it lets in and refuses the others in its protocol's words
(L{REFUSALS}) before the protocol sees them:

  - per client and listener: at most C{per_client} concurrent connections
    from one IPv4 address or one IPv6 /64 to one listener (Postfix's
    C{smtpd_client_connection_count_limit}, 50, is per service too);
    clients in C{exempt} (loopback and the relay networks by default, as
    Postfix exempts C{$mynetworks}) are not counted;
  - in all: at most C{total} connections, derived from the descriptor
    limit so that Maildir, queue and outbound connections always find a
    descriptor (L{raise_nofile_limit}, L{default_total}).

The address a limit counts is the one the factory is asked to build a
protocol for: the client's, or the one from a PROXY header
(L{mailstack.proxy}), which wraps the limit.

L{CommandDeadline} is the timer that replaces "idle time, reset by every
byte": a whole command must arrive within the time, and bulk data (SMTP
DATA) must keep a minimum rate.
"""

from __future__ import annotations

import ipaddress
import resource
from typing import Any, Callable, Iterable

from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from mailstack.transport import IConnection

log = Logger()

#: What each protocol says to a connection over a limit, before closing it.
REFUSALS: dict[str, bytes] = {
    "smtp": b"421 4.7.0 {host}Error: too many connections{detail}; try again later\r\n",
    "imap": b"* BYE [UNAVAILABLE] Too many connections{detail}; try again later\r\n",
    "pop3": b"-ERR [SYS/TEMP] Too many connections{detail}; try again later\r\n",
    "control": b"error too many connections\n",
    "http": b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
}

#: Seconds a refused client gets to read the refusal (and finish a TLS
#: handshake) before the connection is aborted.
REFUSAL_LINGER = 10.0

#: Descriptors kept back from connections (log files, thread pools, DNS...).
RESERVED_DESCRIPTORS = 256


def raise_nofile_limit() -> int:
    """
    Raise the soft C{RLIMIT_NOFILE} to the hard limit; return the soft
    limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warn("cannot raise the open files limit from {soft} to {hard}: {e}",
                     soft=soft, hard=hard, e=e)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return soft


def default_total(nofile: int) -> int:
    """
    The global connection cap for a descriptor limit: half of what is
    left after L{RESERVED_DESCRIPTORS}, so every session may also hold a
    file (a spooled message, a mailbox) or an outbound connection.
    """
    return max(16, (nofile - RESERVED_DESCRIPTORS) // 2)


def client_key(address: Any) -> str | None:
    """
    What the per-client limit counts: the IPv4 address, the IPv6 /64, or
    C{None} for a peer without an IP address (a UNIX socket).
    """
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class ConnectionLimits:
    """
    Connection counts shared by the listeners of one process.

    @param per_client: concurrent connections per client (0: no limit).
    @param total: concurrent connections in all (0: no limit).
    @param exempt: networks whose clients the per-client limit skips.
    """

    def __init__(self, per_client: int, total: int,
                 exempt: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network] = ()) -> None:
        self.per_client = per_client
        self.total = total
        self.exempt = tuple(exempt)
        self.active = 0
        self.by_client: dict[tuple[str, str], int] = {}

    def _exempt(self, key: str) -> bool:
        ip = ipaddress.ip_address(key.split("/", 1)[0])
        return any(ip in network for network in self.exempt)

    def acquire(self, listener: str, key: str | None) -> str | None:
        """
        Count a new connection from client C{key} to C{listener}, or return
        why it is refused (C{"client"} or C{"total"}).
        """
        if self.total and self.active >= self.total:
            return "total"
        if key is not None and self.per_client and not self._exempt(key):
            count = self.by_client.get((listener, key), 0)
            if count >= self.per_client:
                return "client"
            self.by_client[(listener, key)] = count + 1
        self.active += 1
        return None

    def release(self, listener: str, key: str | None) -> None:
        self.active -= 1
        count = self.by_client.get((listener, key or ""))
        if key is not None and count is not None:
            if count > 1:
                self.by_client[(listener, key)] = count - 1
            else:
                del self.by_client[(listener, key)]


class _Refused(Protocol):
    """
    Says the refusal, closes, and aborts if the client lingers.
    """

    transport: IConnection  # once connected: see mailstack.transport

    def __init__(self, clock: IReactorTime, message: bytes) -> None:
        self.clock = clock
        self.message = message
        self._timer: Any = None

    def connectionMade(self) -> None:
        self.transport.write(self.message)
        self.transport.loseConnection()
        self._timer = self.clock.callLater(REFUSAL_LINGER, self._abort)

    def _abort(self) -> None:
        self._timer = None
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Any = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()


class _Counted(ProtocolWrapper):
    """
    A connection let in: released when it ends.
    """

    key: str | None = None
    factory: LimitedFactory

    # ProtocolWrapper's is a plain attribute; a property reads the transport's.
    @property  # type: ignore[override]
    def disconnecting(self) -> bool:
        return bool(getattr(self.transport, "disconnecting", False))

    @disconnecting.setter
    def disconnecting(self, value: bool) -> None:
        pass  # ProtocolWrapper.loseConnection sets it; the transport's is the truth

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.limits.release(self.factory.label, self.key)
        super().connectionLost(reason)


class LimitedFactory(WrappingFactory[_Counted]):
    """
    Wraps one listener's factory with the shared L{ConnectionLimits}.

    @param kind: a key of L{REFUSALS}, the protocol's words at the limit.
    """

    protocol = _Counted
    noisy = False

    def __init__(self, wrappedFactory: Any, limits: ConnectionLimits, kind: str,
                 label: str, clock: IReactorTime, hostname: str = "") -> None:
        super().__init__(wrappedFactory)
        self.hostname = hostname
        self.limits = limits
        self.kind = kind
        self.label = label
        self.clock = clock

    def buildProtocol(self, addr: Any) -> Any:
        key = client_key(addr)
        why = self.limits.acquire(self.label, key)
        if why is not None:
            host = getattr(addr, "host", "local")
            if why == "client":
                detail = f" from {key}"
                log.warn("{label}: refused {host}: too many connections from {key} "
                         "(limit {limit})", label=self.label, host=host, key=key,
                         limit=self.limits.per_client)
            else:
                detail = ""
                log.warn("{label}: refused {host}: too many connections in all (limit {limit})",
                         label=self.label, host=host, limit=self.limits.total)
            host_part = f"{self.hostname} " if self.hostname else ""
            message = REFUSALS[self.kind].replace(b"{detail}", detail.encode("ascii")).replace(
                b"{host}", host_part.encode("ascii", "replace"))
            return _Refused(self.clock, message)
        try:
            wrapped = self.wrappedFactory.buildProtocol(addr)
        except BaseException:
            self.limits.release(self.label, key)
            raise
        if wrapped is None:
            self.limits.release(self.label, key)
            return None
        protocol = self.protocol(self, wrapped)
        protocol.key = key
        return protocol


class CommandDeadline:
    """
    The time a client has to send a whole command, replacing an idle timer
    that every byte resets (one byte a minute would hold a session for
    ever).

    L{start} when the server waits for a command; L{stop} while it works on
    one (or is done).  For bulk data, L{start_data} and then L{credit} for
    every C{n} bytes received: as Postfix's C{smtpd_min_data_rate}, each
    read moves the deadline C{n / min_rate} seconds later, but never
    further than C{timeout} from now.
    """

    def __init__(self, clock: IReactorTime, timeout: float, expired: Callable[[], None],
                 min_rate: float = 0) -> None:
        self.clock = clock
        self.timeout = timeout
        self.min_rate = min_rate
        self._expired = expired
        self._call: Any = None
        self._deadline = 0.0
        self.data = False

    def start(self) -> None:
        """
        A whole command must arrive within C{timeout} from now.
        """
        self.data = False
        self._set(self.clock.seconds() + self.timeout)

    def start_data(self) -> None:
        """
        Bulk data starts: C{timeout} for the first bytes, then L{credit}.
        """
        self.data = True
        self._set(self.clock.seconds() + self.timeout)

    def credit(self, n: int) -> None:
        """
        C{n} bytes of data arrived.
        """
        if not self.data or self._call is None:
            return
        now = self.clock.seconds()
        extra = n / self.min_rate if self.min_rate else self.timeout
        self._set(min(now + self.timeout, self._deadline + extra))

    def stop(self) -> None:
        self.data = False
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    @property
    def running(self) -> bool:
        return self._call is not None

    def _set(self, deadline: float) -> None:
        self._deadline = deadline
        delay = max(0.0, deadline - self.clock.seconds())
        if self._call is not None and self._call.active():
            self._call.reset(delay)
        else:
            self._call = self.clock.callLater(delay, self._fire)

    def _fire(self) -> None:
        self._call = None
        self.data = False
        self._expired()
