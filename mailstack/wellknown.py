# -*- test-case-name: tests.test_wellknown -*-
"""
C{--http} and C{--https}: the two documents a mail domain serves over the
web, and nothing else.

  - C{/.well-known/mta-sts.txt} (RFC 8461 3.3) for the host
    C{mta-sts.DOMAIN} of a local domain: the policy C{mailstack dns DOMAIN}
    prints (L{mailstack.mailauth.dnsrecords.mta_sts_policy}), as
    C{text/plain}; any other host gets 404.  Senders fetch it only over
    HTTPS with a certificate valid for C{mta-sts.DOMAIN}: serve it with
    C{--https} (the certificate of C{--tls-cert}, which must name
    C{mta-sts.DOMAIN}), or with C{--http} behind a TLS-terminating proxy.
  - C{/mail/config-v1.1.xml} and C{/.well-known/autoconfig/mail/config-v1.1.xml}:
    Thunderbird's autoconfiguration for a local domain (the one of the
    C{emailaddress} query argument, else of the Host name C{autoconfig.D}
    or C{D}, else the first local domain): IMAP and POP3 servers and
    submission with their ports and TLS, the user name being the whole
    address, password authentication.

Only C{GET} and C{HEAD}; a request with a body is refused (413); headers
are limited by twisted.web (16 KiB); an idle connection is closed after
L{IDLE_TIMEOUT} seconds, any connection after L{CONNECTION_TIME}; no
directory is listed and no file is read.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence
from urllib.parse import parse_qs, urlsplit
from xml.sax.saxutils import escape

from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mailstack.logsafe import safe
from mailstack.mailauth.dnsrecords import mta_sts_policy

log = Logger()

IDLE_TIMEOUT = 30
#: Seconds a connection may stay open at all.
CONNECTION_TIME = 60
AUTOCONFIG_PATHS = (b"/mail/config-v1.1.xml", b"/.well-known/autoconfig/mail/config-v1.1.xml")

# (listener label, incoming type or "smtp", socketType)
_SERVICES = (("imaps", "imap", "SSL"), ("imap", "imap", "STARTTLS"),
             ("pop3", "pop3", "STARTTLS"), ("submissions", "smtp", "SSL"),
             ("submission", "smtp", "STARTTLS"))
# The standard ports, used when a listener's endpoint gives none (a unix socket).
_STANDARD = {"imaps": 993, "imap": 143, "pop3": 110, "submissions": 465, "submission": 587}


def autoconfig_xml(domain: str, hostname: str, ports: dict[str, int]) -> bytes:
    """
    Thunderbird's C{clientConfig} document for C{domain}, served by
    C{hostname} on C{ports} (listener label: port; absent, not offered).
    """
    host = escape(hostname)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>', '<clientConfig version="1.1">',
             f'  <emailProvider id="{escape(domain)}">',
             f"    <domain>{escape(domain)}</domain>",
             f"    <displayName>{escape(domain)}</displayName>",
             f"    <displayShortName>{escape(domain)}</displayShortName>"]
    for label, kind, socket_type in _SERVICES:
        if label not in ports:
            continue
        tag = "outgoingServer" if kind == "smtp" else "incomingServer"
        lines += [f'    <{tag} type="{kind}">',
                  f"      <hostname>{host}</hostname>",
                  f"      <port>{ports[label]}</port>",
                  f"      <socketType>{socket_type}</socketType>",
                  "      <authentication>password-cleartext</authentication>",
                  "      <username>%EMAILADDRESS%</username>",
                  f"    </{tag}>"]
    lines += ["  </emailProvider>", "</clientConfig>", ""]
    return "\n".join(lines).encode("utf-8")


class WellKnown(Resource):
    """
    The only resource: answers the known paths, 404 for everything else.

    @param domains: the local domains, or a callable returning them (read
        at each request, so that a reload's new domains are served).
    @param ports: returns the listeners' ports (label: port) when asked.
    """

    isLeaf = True
    allowedMethods = (b"GET", b"HEAD")  # anything else: 405 with Allow

    def __init__(self, domains: Sequence[str] | Callable[[], Sequence[str]], hostname: str,
                 ports: Callable[[], dict[str, int]]) -> None:
        super().__init__()
        self._domains = domains
        self.hostname = hostname
        self.ports = ports

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)

    @property
    def domains(self) -> tuple[str, ...]:
        domains = self._domains() if callable(self._domains) else self._domains
        return tuple(d.lower() for d in domains)

    def render_GET(self, request: Request) -> bytes:
        host = (request.getRequestHostname() or b"").decode("ascii", "replace").lower()
        host = host.rstrip(".")
        path = urlsplit(request.uri).path
        if path == b"/.well-known/mta-sts.txt":
            domain = host[len("mta-sts."):] if host.startswith("mta-sts.") else ""
            if domain in self.domains:
                request.setHeader(b"content-type", b"text/plain; charset=utf-8")
                request.setHeader(b"cache-control", b"max-age=600")
                return mta_sts_policy(self.hostname).encode("ascii")
            return self._not_found(request)
        if path in AUTOCONFIG_PATHS:
            domain = self._autoconfig_domain(request, host)
            request.setHeader(b"content-type", b"application/xml; charset=utf-8")
            return autoconfig_xml(domain, self.hostname, self.ports())
        return self._not_found(request)

    def _autoconfig_domain(self, request: Request, host: str) -> str:
        args = parse_qs(urlsplit(request.uri).query.decode("utf-8", "replace"))
        address = (args.get("emailaddress") or [""])[0].strip().lower()
        candidates = [address.rpartition("@")[2]] if "@" in address else []
        candidates += [host[len("autoconfig."):] if host.startswith("autoconfig.") else host]
        domains = self.domains
        for candidate in candidates:
            if candidate in domains:
                return candidate
        return domains[0]

    def _not_found(self, request: Request) -> bytes:
        request.setResponseCode(404)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"Not found\n"


class _Request(Request):
    """
    A request that may not carry a body (C{GET} and C{HEAD} need none):
    one announcing or sending a body gets 413 and the connection is
    closed, before any of the body is kept.
    """

    _refused = False

    def gotLength(self, length: int | None) -> None:
        super().gotLength(None if length else length)  # never a temporary file
        if length:
            self._refuse()

    def handleContentChunk(self, data: bytes) -> None:
        if data and not self._refused:
            self._refuse()  # a chunked body

    def process(self) -> None:
        if not self._refused:
            super().process()

    def _refuse(self) -> None:
        self._refused = True
        transport = self.channel.transport if self.channel is not None else None
        if transport is not None:
            log.info("http: refused a request with a body from {client}",
                     client=getattr(self.getClientAddress(), "host", "?"))
            transport.write(b"HTTP/1.1 413 Content Too Large\r\nConnection: close\r\n"
                            b"Content-Length: 0\r\n\r\n")
            transport.loseConnection()


def _access_log(request: Request) -> None:
    """
    One line per request, what the client chose escaped (L{safe}).
    """
    log.info("http: {client} {method} {host}{path} {code} {size}",
             client=getattr(request.getClientAddress(), "host", "?"),
             method=safe(request.method.decode("latin-1")[:20]),
             host=safe((request.getRequestHostname() or b"").decode("latin-1")[:100]),
             path=safe(request.uri.decode("latin-1")[:200]), code=request.code,
             size=request.sentLength)


class _Deadline(ProtocolWrapper):
    """
    Closes the connection L{CONNECTION_TIME} seconds after it opened,
    whatever it is doing: a client sending its headers a byte at a time
    resets the idle timeout but not this.
    """

    _timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        clock = self.factory.clock
        self._timer = clock.callLater(CONNECTION_TIME, self._expire)
        super().makeConnection(transport)

    def _expire(self) -> None:
        self._timer = None
        log.info("http: connection from {client} open too long; closed",
                 client=getattr(self.getPeer(), "host", "?"))
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        super().connectionLost(reason)


def make_site(domains: Sequence[str] | Callable[[], Sequence[str]], hostname: str,
              ports: Callable[[], dict[str, int]], reactor: Any = None) -> WrappingFactory:
    """
    The C{--http}/C{--https} site: L{WellKnown} and nothing else, with an
    idle timeout and a deadline per connection.

    @param reactor: the clock of both (the global reactor by default).
    """
    if reactor is None:
        from twisted.internet import reactor as global_reactor
        reactor = global_reactor
    site = Site(WellKnown(domains, hostname, ports), requestFactory=_Request,
                timeout=IDLE_TIMEOUT, reactor=reactor)
    site.noisy = False
    site.displayTracebacks = False
    # Our own access log line: twisted.web's dates its lines with the
    # reactor's clock, which is monotonic here (mailstack.clock).
    site.log = _access_log  # type: ignore[assignment]
    factory = WrappingFactory(site)
    factory.protocol = _Deadline
    factory.clock = reactor  # type: ignore[attr-defined]
    factory.noisy = False
    return factory


def listener_ports(stack: Any) -> dict[str, int]:
    """
    The port each of C{stack}'s mail listeners is bound to (for a
    listener not bound to a TCP port, the standard one).
    """
    ports = {}
    for label in _STANDARD:
        if getattr(stack.config, label, None) is None:
            continue
        listener = next((s for s in stack if getattr(s, "label", None) == label), None)
        port = getattr(getattr(listener, "port", None), "getHost", None)
        number = getattr(port(), "port", None) if port is not None else None
        ports[label] = number if isinstance(number, int) else _STANDARD[label]
    return ports
