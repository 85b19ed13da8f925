# -*- test-case-name: tests.test_logs -*-
"""
The client's name for logs: its reverse DNS (PTR) name, but only when that
name's forward lookup (A/AAAA) gives the client's address back ("forward-
confirmed reverse DNS"), else C{unknown}: Postfix's rule.  The HELO name
is the client's claim and is logged apart from it.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns

log = Logger()

UNKNOWN = "unknown"
MAX_NAMES = 5  # PTR names checked; Postfix checks them all, a zone may list many
DEADLINE = 10.0  # seconds for all the lookups of one client, then "unknown"


async def _confirmed(resolver: Any, ip: str, timeout: tuple[int, ...]) -> str:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return UNKNOWN
    if address.is_loopback:
        # What /etc/hosts says everywhere; Twisted's hosts-file resolver
        # answers no PTR queries, and local clients need no DNS round trip.
        return "localhost"
    answers, _, _ = await resolver.lookupPointer(address.reverse_pointer, timeout)
    names = [str(r.payload.name).rstrip(".").lower() for r in answers if r.type == dns.PTR]
    for name in names[:MAX_NAMES]:
        if not name:
            continue
        if address.version == 4:
            found, _, _ = await resolver.lookupAddress(name, timeout)
            ips = [r.payload.dottedQuad() for r in found if r.type == dns.A]
        else:
            found, _, _ = await resolver.lookupIPV6Address(name, timeout)
            ips = [str(ipaddress.ip_address(r.payload.address)) for r in found
                   if r.type == dns.AAAA]
        if any(ipaddress.ip_address(found_ip) == address for found_ip in ips):
            return name
    return UNKNOWN


def client_name(resolver: Any, ip: str, clock: IReactorTime | None = None,
                timeout: tuple[int, ...] = (2, 3)) -> Deferred[str]:
    """
    The forward-confirmed reverse DNS name of C{ip}, or C{unknown} (also
    when a lookup fails, or they all take more than L{DEADLINE} seconds on
    C{clock}).
    """
    d = ensureDeferred(_confirmed(resolver, ip, timeout))
    if clock is not None:
        d.addTimeout(DEADLINE, clock)

    def failed(failure: Any) -> str:
        log.debug("reverse lookup of {ip} failed: {error}", ip=ip,
                  error=failure.getErrorMessage())
        return UNKNOWN

    return d.addErrback(failed)
