# -*- test-case-name: tests.test_proxy -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2) for listeners behind a
load balancer: C{--smtp haproxy:tcp:25}.

Twisted's own C{haproxy:} endpoint starts the protocol as soon as the TCP
connection is made, so the session reads the proxy's address (for logs,
Received, relay networks, greylisting, the throttle, the connection
limits) before the header arrives.  L{ProxyHeaderFactory} instead builds
the real protocol only once the header is read, for the client's address:
nothing in the session ever sees the proxy's.

Every connection to such a listener must start with a header, within
L{HEADER_TIMEOUT} seconds (Postfix's C{smtpd_upstream_proxy_timeout}); a
connection without one, or with a malformed one, is closed and logged.  A
v2 C{LOCAL} connection (the proxy's own health check) or a v1 C{UNKNOWN}
one keeps the real peer address.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy
from mailstack.transport import IConnection

log = Logger()

HEADER_TIMEOUT = 5.0
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # octets, with CRLF
V2_MAX = 16 + 536  # the header and the TLVs we are willing to skip


class ProxyHeaderError(ValueError):
    """
    The connection did not start with a valid PROXY header.
    """


Address = IPv4Address | IPv6Address


def _address(host: str, port: int) -> Address:
    ip = ipaddress.ip_address(host)
    if not 0 <= port < 65536:
        raise ProxyHeaderError("port out of range")
    if isinstance(ip, ipaddress.IPv4Address):
        return IPv4Address("TCP", str(ip), port)
    return IPv6Address("TCP", str(ip), port)


def parse_header(data: bytes) -> tuple[Address | None, Address | None, int] | None:
    """
    Parse a PROXY header at the start of C{data}: C{(source, destination,
    length)}, addresses C{None} when the header gives none (v1 C{UNKNOWN},
    v2 C{LOCAL}), or C{None} when more bytes are needed.

    @raise ProxyHeaderError: it is not a valid header.
    """
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and data[:1] == b"\r":
        if len(data) < 16:
            return None
        version_command, family, length = struct.unpack("!BBH", data[12:16])
        if version_command >> 4 != 2 or version_command & 0xF not in (0, 1):
            raise ProxyHeaderError("bad PROXY v2 version or command")
        if 16 + length > V2_MAX:
            raise ProxyHeaderError("PROXY v2 header too long")
        if len(data) < 16 + length:
            return None
        body = data[16: 16 + length]
        if version_command & 0xF == 0:  # LOCAL
            return None, None, 16 + length
        try:
            if family == 0x11:  # TCP over IPv4
                src, dst, sport, dport = struct.unpack("!4s4sHH", body[:12])
            elif family == 0x21:  # TCP over IPv6
                src, dst, sport, dport = struct.unpack("!16s16sHH", body[:36])
            elif family >> 4 == 0:  # UNSPEC
                return None, None, 16 + length
            else:
                raise ProxyHeaderError("unsupported PROXY v2 address family")
        except struct.error:
            raise ProxyHeaderError("PROXY v2 addresses truncated") from None
        return (_address(str(ipaddress.ip_address(src)), sport),
                _address(str(ipaddress.ip_address(dst)), dport), 16 + length)
    if not b"PROXY "[: len(data)] == data[:6]:
        raise ProxyHeaderError("no PROXY header")
    end = data.find(b"\r\n")
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyHeaderError("PROXY v1 header too long")
        return None
    if end + 2 > V1_MAX:
        raise ProxyHeaderError("PROXY v1 header too long")
    try:
        words = data[:end].decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 header not ASCII") from None
    if len(words) >= 2 and words[1] == "UNKNOWN":
        return None, None, end + 2
    if len(words) != 6 or words[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("malformed PROXY v1 header")
    _, family, src, dst, sport, dport = words
    try:
        ips = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        ports = [int(p) for p in (sport, dport) if p.isdigit() and (p == "0" or p[0] != "0")]
    except ValueError:
        raise ProxyHeaderError("bad address in PROXY v1 header") from None
    if len(ports) != 2 or any(ip.version != (4 if family == "TCP4" else 6) for ip in ips):
        raise ProxyHeaderError("bad address in PROXY v1 header")
    return _address(src, ports[0]), _address(dst, ports[1]), end + 2


class ProxyHeaderProtocol(ProtocolWrapper):
    """
    Reads the header, then becomes a plain wrapper whose C{getPeer} and
    C{getHost} are the header's.
    """

    transport: IConnection  # once connected: see mailstack.transport
    factory: ProxyHeaderFactory
    # ProtocolWrapper types the wrapped protocol as always there; here it
    # is None until the header has arrived, and again once it is gone.
    wrappedProtocol: IProtocol | None  # type: ignore[assignment]

    def __init__(self, factory: "ProxyHeaderFactory") -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]  # (see wrappedProtocol)
        self._buffer = b""
        self._peer: Any = None
        self._host: Any = None
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        self.transport = transport
        self.connected = 1
        self._timer = self.factory.clock.callLater(self.factory.timeout, self._timed_out)

    # ProtocolWrapper's is a plain attribute; a property reads the transport's.
    @property  # type: ignore[override]
    def disconnecting(self) -> bool:
        return bool(getattr(self.transport, "disconnecting", False))

    @disconnecting.setter
    def disconnecting(self, value: bool) -> None:
        pass  # ProtocolWrapper.loseConnection sets it; the transport's is the truth

    def _timed_out(self) -> None:
        self._timer = None
        log.info("{label}: no PROXY header from {peer} in {timeout:g}s",
                 label=self.factory.label, peer=self.transport.getPeer(),
                 timeout=self.factory.timeout)
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        if self._timer is None:
            return  # closing
        self._buffer += data
        try:
            parsed = parse_header(self._buffer)
        except ProxyHeaderError as e:
            log.warn("{label}: {error} from {peer}; closed", label=self.factory.label,
                     error=e, peer=self.transport.getPeer())
            self._stop_timer()
            self.transport.abortConnection()
            return
        if parsed is None:
            return
        self._stop_timer()
        source, destination, used = parsed
        rest, self._buffer = self._buffer[used:], b""
        self._peer = source or self.transport.getPeer()
        self._host = destination or self.transport.getHost()
        wrapped = self.factory.wrappedFactory.buildProtocol(self._peer)
        if wrapped is None:
            self.transport.loseConnection()
            return
        self.wrappedProtocol = wrapped
        wrapped.makeConnection(self)
        if rest:
            wrapped.dataReceived(rest)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def getPeer(self) -> Any:
        return self._peer or self.transport.getPeer()

    def getHost(self) -> Any:
        return self._host or self.transport.getHost()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timer()
        if self.wrappedProtocol is not None:
            self.wrappedProtocol.connectionLost(reason)
            self.wrappedProtocol = None


class ProxyHeaderFactory(WrappingFactory[ProxyHeaderProtocol]):
    """
    Wraps a listener's factory: its protocols are built for the address in
    the PROXY header, once it has arrived.
    """

    protocol = ProxyHeaderProtocol
    noisy = False

    def __init__(self, wrappedFactory: Any, clock: IReactorTime, label: str = "proxy",
                 timeout: float = HEADER_TIMEOUT) -> None:
        super().__init__(wrappedFactory)
        self.clock = clock
        self.label = label
        self.timeout = timeout

    def buildProtocol(self, addr: Any) -> ProxyHeaderProtocol:
        return ProxyHeaderProtocol(self)
