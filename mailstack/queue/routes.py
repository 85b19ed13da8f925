# -*- test-case-name: tests.test_relay -*-
"""
Static next hops for the outbound queue (C{--route}), beside the courier
that follows them; L{mailstack.config} parses the option into these.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Route:
    """
    A static next hop: mail for C{domain} (C{*} for any) goes to host:port.
    """

    domain: str
    host: str
    port: int
