# -*- test-case-name: tests.test_mailauth_dns -*-
"""
A DNS zone in memory for tests of mail authentication (and anything else
that needs TXT, SRV, PTR or CNAME records): L{ZoneResolver} answers as a
C{twisted.names} resolver, and L{serve_zone} puts it behind a real DNS
server on 127.0.0.1 (UDP and TCP on one port), for commands run in a child
process with C{--dns-server}.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.names import dns
from twisted.names.common import ResolverBase
from twisted.names.error import DNSNameError, DNSServerError
from twisted.names.server import DNSServerFactory

from mailstack.reactors import IMailReactor

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "SRV": dns.SRV,
          "PTR": dns.PTR, "CNAME": dns.CNAME}


def txt_strings(value: str | bytes | tuple[Any, ...]) -> tuple[bytes, ...]:
    """
    One TXT record's character-strings: a tuple is taken as it is, a longer
    text is cut into strings of 255 bytes (RFC 1035 3.3.14).
    """
    if isinstance(value, tuple):
        return tuple(v.encode() if isinstance(v, str) else v for v in value)
    data = value.encode() if isinstance(value, str) else value
    return tuple(data[i:i + 255] for i in range(0, len(data), 255)) or (b"",)


class ZoneResolver(ResolverBase):
    """
    Answers from C{zone}: C{{name: {"TXT": [...], "MX": [(pref, host)],
    "A": [...], "AAAA": [...], "SRV": [(prio, weight, port, target)],
    "PTR": [name], "CNAME": target}}}.  A name not in the zone does not
    exist (NXDOMAIN); a name without the type asked has an empty answer.

    @param servfail: names answered with SERVFAIL.
    @param silent: names never answered (the caller's timeout fires).
    @param ttl: the TTL of every record.
    @ivar queries: C{(type, name)} of every query, in order.
    """

    def __init__(self, zone: dict[str, dict[str, Any]] | None = None,
                 servfail: set[str] | None = None, silent: set[str] | None = None,
                 ttl: int = 3600) -> None:
        super().__init__()
        self.zone = {name.lower().rstrip("."): records for name, records in (zone or {}).items()}
        self.servfail = servfail or set()
        self.silent = silent or set()
        self.ttl = ttl
        self.queries: list[tuple[int, str]] = []

    def _lookup(self, name: bytes | str, cls: int, type: int, timeout: Any) -> Deferred[Any]:
        name = name.decode("ascii") if isinstance(name, bytes) else name
        name = name.lower().rstrip(".")
        self.queries.append((type, name))
        if name in self.silent:
            return Deferred()
        if name in self.servfail:
            return fail(DNSServerError(name))
        answers: list[dns.RRHeader] = []
        for _ in range(8):  # CNAME chain
            if name not in self.zone:
                if answers:
                    break
                return fail(DNSNameError(name))
            records = self.zone[name]
            target = records.get("CNAME")
            if target and type != dns.CNAME:
                answers.append(dns.RRHeader(name, dns.CNAME, ttl=self.ttl,
                                            payload=dns.Record_CNAME(target, ttl=self.ttl)))
                name = target.lower().rstrip(".")
                continue
            answers.extend(self._records(name, type, records))
            break
        return succeed((answers, [], []))

    def _records(self, name: str, type: int, records: dict[str, Any]) -> list[dns.RRHeader]:
        out = []
        for text, values in records.items():
            if _TYPES.get(text) != type:
                continue
            if text == "CNAME":
                values = [values]
            for value in values:
                if type == dns.TXT:
                    payload: Any = dns.Record_TXT(*txt_strings(value), ttl=self.ttl)
                elif type == dns.MX:
                    payload = dns.Record_MX(value[0], value[1], ttl=self.ttl)
                elif type == dns.SRV:
                    priority, weight, port, target = value
                    payload = dns.Record_SRV(priority, weight, port, target, ttl=self.ttl)
                elif type == dns.A:
                    payload = dns.Record_A(str(ipaddress.IPv4Address(value)), ttl=self.ttl)
                elif type == dns.AAAA:
                    payload = dns.Record_AAAA(str(ipaddress.IPv6Address(value)), ttl=self.ttl)
                elif type == dns.PTR:
                    payload = dns.Record_PTR(value, ttl=self.ttl)
                else:
                    payload = dns.Record_CNAME(value, ttl=self.ttl)
                out.append(dns.RRHeader(name, type, ttl=self.ttl, payload=payload))
        return out


class _ZoneServerFactory(DNSServerFactory):
    """
    Answers a L{ZoneResolver}'s C{servfail} names with SERVFAIL (Twisted's
    server answers NXDOMAIN for every C{DomainError}, C{DNSServerError}
    included).
    """

    def gotResolverError(self, failure: Any, protocol: Any, message: Any,
                         address: Any) -> None:
        if failure.check(DNSServerError):
            response = self._responseFromMessage(message=message, rCode=dns.ESERVER)
            self.sendReply(protocol, response, address)
            return
        super().gotResolverError(failure, protocol, message, address)


def serve_zone(reactor: IMailReactor, resolver: Any, attempts: int = 20
               ) -> tuple[int, list[Any]]:
    """
    Serve C{resolver} as a DNS server on 127.0.0.1, UDP and TCP on one port
    (a long answer is truncated over UDP and asked again over TCP).  Returns
    the port number and the listening ports, to stop with C{stopListening}.
    """
    factory = _ZoneServerFactory(clients=[resolver])
    for _ in range(attempts):
        # A new protocol each try: a stopped port lets go of its protocol
        # only on a later reactor turn.
        protocol = dns.DNSDatagramProtocol(factory)
        udp = reactor.listenUDP(0, protocol, interface="127.0.0.1", maxPacketSize=8192)
        host = udp.getHost()
        assert isinstance(host, IPv4Address)
        number = host.port
        try:
            tcp = reactor.listenTCP(number, factory, interface="127.0.0.1")
        except CannotListenError:
            udp.stopListening()
            continue
        return number, [udp, tcp]
    raise CannotListenError("127.0.0.1", 0, "no port free for both UDP and TCP")
