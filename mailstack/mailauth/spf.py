# -*- test-case-name: tests.test_mailauth_checks -*-
"""
SPF (RFC 7208) with pyspf, its DNS through L{DNSCache}, on the reactor
thread and without blocking.

pyspf asks DNS through its module function C{spf.DNSLookup}, synchronously.
This module installs, once, a dispatcher there that answers from the
lookups of the check in progress (a context variable; outside a check it
calls pyspf's own resolver, so other users of pyspf are not affected).
A check runs pyspf from the start; when pyspf asks for a name not yet
fetched, the run stops, the name is looked up asynchronously, and pyspf runs
again with one more answer known.  SPF's own limits (10 DNS mechanisms, 2
void lookups, RFC 7208 4.6.4) bound the number of runs; each run is cheap
parsing.  A DNS failure is C{temperror}.
"""

from __future__ import annotations

import contextvars
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import spf as pyspf
from twisted.names import dns

from mailstack.mailauth.lookup import DNSCache, DNSTempError, to_alabel

_TYPES = {"A": dns.A, "AAAA": dns.AAAA, "MX": dns.MX, "TXT": dns.TXT, "PTR": dns.PTR,
          "SPF": dns.SPF}
#: Most pyspf runs (DNS answers fetched) for one check.  RFC 7208 4.6.4
#: allows 10 mechanisms that look up, an "mx" one 10 address lookups more:
#: a compliant record stays well under this.
MAX_RUNS = 250

_current: contextvars.ContextVar[Callable[..., Any] | None] = contextvars.ContextVar(
    "mailstack_spf_lookup", default=None)
_pyspf_lookup = pyspf.DNSLookup


def _dispatch(name: str, qtype: str, strict: Any = True, timeout: Any = 30) -> Any:
    lookup = _current.get()
    if lookup is None:
        return _pyspf_lookup(name, qtype, strict, timeout)
    return lookup(name, qtype)


if pyspf.DNSLookup is not _dispatch:
    pyspf.DNSLookup = _dispatch


class _NeedDNS(Exception):
    def __init__(self, name: str, qtype: str) -> None:
        self.name, self.qtype = name, qtype


@dataclass(frozen=True)
class SPFResult:
    """
    C{result}: C{pass}, C{fail}, C{softfail}, C{neutral}, C{none},
    C{temperror} or C{permerror}; C{identity} is C{mailfrom} or C{helo};
    C{domain} the domain checked and C{sender} the address checked
    (C{postmaster@HELO} for the HELO identity and for a null MAIL FROM).
    """

    result: str
    identity: str
    domain: str
    sender: str
    reason: str = ""


def _convert(name: str, qtype: str, answers: list[dns.RRHeader]) -> list[Any]:
    """
    twisted.names answers in the shape pyspf's resolvers give.
    """
    out: list[Any] = []
    for rr in answers:
        owner = rr.name.name.decode("ascii", "replace").rstrip(".")
        # rr.type says which record class the payload is.  twisted.names
        # types every payload IEncodableRecord | None, and the fields read
        # here as None (class-level defaults of SimpleRecord.name and
        # Record_A.address), so the payload is read untyped.
        data: Any = rr.payload
        if rr.type == dns.CNAME:
            out.append(((owner, "CNAME"), data.name.name.decode("ascii", "replace")))
        elif rr.type != _TYPES[qtype]:
            continue
        elif qtype in ("A", "AAAA"):
            out.append(((owner, qtype), str(ipaddress.ip_address(data.address))))
        elif qtype == "MX":
            out.append(((owner, qtype), (data.preference,
                                         data.name.name.decode("ascii", "replace"))))
        elif qtype == "PTR":
            out.append(((owner, qtype), data.name.name.decode("ascii", "replace")))
        else:
            out.append(((owner, qtype), tuple(data.data)))
    return out


async def check_spf(cache: DNSCache, client_ip: str, mail_from: str, helo: str,
                    receiver: str = "unknown") -> SPFResult:
    """
    The SPF result for C{mail_from} (or for C{helo} when C{mail_from} is
    empty, RFC 7208 2.4) sent from C{client_ip}.
    """
    identity = "mailfrom" if mail_from else "helo"
    if "@" in mail_from:  # internationalised domains as A-labels (RFC 8616)
        local, _, domain = mail_from.rpartition("@")
        mail_from = f"{local}@{to_alabel(domain)}"
    helo = to_alabel(helo) if helo else helo
    known: dict[tuple[str, str], list[Any] | str] = {}

    def lookup(name: str, qtype: str) -> list[Any]:
        key = (name.lower().rstrip("."), qtype)
        if key not in known:
            raise _NeedDNS(*key)
        found = known[key]
        if isinstance(found, str):
            raise pyspf.TempError(found)
        return found

    for _ in range(MAX_RUNS):
        token = _current.set(lookup)
        try:
            query = pyspf.query(i=client_ip, s=mail_from, h=helo, receiver=receiver,
                                strict=True)
            result, _code, explanation = query.check()
        except _NeedDNS as need:
            wanted = (need.name, need.qtype)
        except pyspf.PermError as e:  # raised by query() itself, e.g. a bad address
            return SPFResult("permerror", identity, "", mail_from, str(e))
        else:
            sender = query.s
            domain = sender.rpartition("@")[2]
            return SPFResult(result, identity, domain, sender,
                             "" if result in ("pass", "none") else explanation)
        finally:
            _current.reset(token)
        try:
            answers = await cache.lookup(wanted[0], _TYPES[wanted[1]])
            known[wanted] = _convert(wanted[0], wanted[1], answers)
        except DNSTempError as e:
            known[wanted] = f"DNS {e}"
    return SPFResult("temperror", identity, "", mail_from, "too many DNS lookups")


def helo_checkable(helo: str) -> bool:
    """
    Whether a HELO name can have SPF: a domain name of two labels or more,
    not an address literal (RFC 7208 2.3).
    """
    name = helo.strip().rstrip(".")
    if not name or name.startswith("[") or "." not in name:
        return False
    try:
        ipaddress.ip_address(name)
        return False
    except ValueError:
        return True
