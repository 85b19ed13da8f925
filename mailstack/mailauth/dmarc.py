# -*- test-case-name: tests.test_mailauth_checks -*-
"""
DMARC (RFC 7489): the policy record, the organisational domain, identifier
alignment, and the result for one message.

The organisational domain comes from the Public Suffix List shipped inside
the C{publicsuffixlist} package (its ICANN and private sections, as
OpenDMARC uses them); nothing is downloaded at run time, and a newer list
comes with a newer package.  Records are parsed with dkimpy's tag=value
parser.  Failure reports (C{ruf}) and aggregate reports (C{rua}) are not
sent.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from email.utils import getaddresses

import dkim
from dkim.util import InvalidTagValueList, parse_tag_value
from publicsuffixlist import PublicSuffixList

from mailstack.mailauth.lookup import DNSCache, DNSTempError, to_alabel

_PSL: PublicSuffixList | None = None
POLICIES = ("none", "quarantine", "reject")


def organizational_domain(domain: str) -> str:
    """
    The registered domain under a public suffix (RFC 7489 3.2):
    C{mail.example.co.uk} -> C{example.co.uk}; a public suffix or a name
    under no known suffix is its own organisational domain.
    """
    global _PSL
    if _PSL is None:
        _PSL = PublicSuffixList()
    name = domain.lower().rstrip(".")
    return _PSL.privatesuffix(name) or name


def aligned(a: str, b: str, mode: str) -> bool:
    """
    Identifier alignment (RFC 7489 3.1): C{s}trict wants the same name,
    C{r}elaxed the same organisational domain.
    """
    a, b = a.lower().rstrip("."), b.lower().rstrip(".")
    if mode == "s":
        return a == b
    return bool(a) and bool(b) and organizational_domain(a) == organizational_domain(b)


@dataclass(frozen=True)
class DMARCRecord:
    """
    A parsed C{_dmarc} TXT record (RFC 7489 6.3), defaults filled in.
    """

    policy: str
    subdomain_policy: str
    adkim: str = "r"
    aspf: str = "r"
    pct: int = 100
    rua: tuple[str, ...] = ()


class DMARCRecordError(ValueError):
    pass


def parse_record(text: bytes) -> DMARCRecord:
    """
    Parse a record that starts with C{v=DMARC1}.  A missing or unknown C{p}
    is C{none} when C{rua} is given (RFC 7489 6.6.3) and an error otherwise;
    bad values of other tags fall back to their defaults; unknown tags are
    ignored.
    """
    try:
        tags = parse_tag_value(text)
    except InvalidTagValueList as e:
        raise DMARCRecordError(f"bad record: {e}") from None
    if not text.lstrip().startswith(b"v=DMARC1") or tags.get(b"v") != b"DMARC1":
        raise DMARCRecordError("not v=DMARC1")

    def get(tag: bytes) -> str:
        return tags.get(tag, b"").decode("ascii", "replace").strip().lower()

    rua = tuple(u.strip() for u in get(b"rua").split(",") if u.strip())
    policy = get(b"p")
    if policy not in POLICIES:
        if not rua:
            raise DMARCRecordError(f"bad p={policy!r}")
        policy = "none"
    subdomain_policy = get(b"sp")
    if subdomain_policy not in POLICIES:
        subdomain_policy = policy
    try:
        pct = int(get(b"pct") or "100")
    except ValueError:
        pct = 100
    return DMARCRecord(policy, subdomain_policy,
                       get(b"adkim") if get(b"adkim") in ("r", "s") else "r",
                       get(b"aspf") if get(b"aspf") in ("r", "s") else "r",
                       pct if 0 <= pct <= 100 else 100, rua)


@dataclass(frozen=True)
class DMARCResult:
    """
    C{result}: C{pass}, C{fail}, C{none} (no policy), C{temperror} or
    C{permerror}.  C{policy} is the policy that applies to the From domain
    (C{p} or C{sp}), C{disposition} what the record asks for this message
    after C{pct} sampling: C{none}, C{quarantine} or C{reject}.
    """

    result: str
    from_domain: str = ""
    policy: str = "none"
    disposition: str = "none"
    reason: str = ""


def from_domains(message: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> list[str]:
    """
    The domains of the addresses in the message's From fields (RFC 5322);
    DMARC needs exactly one (RFC 7489 6.6.1).  C{headers}: the parsed
    header of C{message} (L{mailstack.mailauth.header.parse_header}), when the
    caller has it.
    """
    from mailstack.mailauth.header import parse_header

    if headers is None:
        headers = parse_header(message)
    values = [value.decode("utf-8", "replace").replace("\r\n", "").replace("\n", "")
              for name, value in headers if name.lower() == b"from"]
    domains = []
    for _name, address in getaddresses(values):
        domain = to_alabel(address.rpartition("@")[2])
        if address and domain:
            domains.append(domain)
    return domains


async def lookup_record(cache: DNSCache, domain: str
                        ) -> tuple[DMARCRecord | None, str]:
    """
    Policy discovery (RFC 7489 6.6.3): C{_dmarc.DOMAIN}, else
    C{_dmarc.ORGDOMAIN}.  Returns the record and where it was found.
    Raises L{DNSTempError}.
    """
    names = [domain]
    org = organizational_domain(domain)
    if org != domain:
        names.append(org)
    for name in names:
        records = [r for r in await cache.text(f"_dmarc.{name}")
                   if r.lstrip().lower().startswith(b"v=dmarc1")]
        if len(records) != 1:
            continue  # none, or several: no policy here
        try:
            return parse_record(records[0]), name
        except DMARCRecordError:
            continue
    return None, ""


async def check_dmarc(cache: DNSCache, message: bytes, spf_domain: str, spf_result: str,
                      dkim_results: Iterable[object],
                      sample: Callable[[], float] = random.random,
                      headers: list[tuple[bytes, bytes]] | None = None) -> DMARCResult:
    """
    The DMARC result of C{message}: its From domain, the SPF result of the
    MAIL FROM domain (or HELO domain for a null sender) and the DKIM results.
    C{sample()} returns a number in [0, 1) for C{pct}.
    """
    try:
        domains = from_domains(message, headers)
    except dkim.MessageFormatError:
        return DMARCResult("permerror", reason="unparsable header")
    if not domains:
        return DMARCResult("none", reason="no From domain")
    if len(set(domains)) != 1:
        return DMARCResult("permerror", reason="several From domains")
    from_domain = domains[0]
    try:
        record, where = await lookup_record(cache, from_domain)
    except DNSTempError as e:
        return DMARCResult("temperror", from_domain, reason=f"DNS {e}")
    if record is None:
        return DMARCResult("none", from_domain)
    policy = record.policy if where == from_domain else record.subdomain_policy
    dkim_ok = any(getattr(r, "result", "") == "pass" and
                  aligned(getattr(r, "domain", ""), from_domain, record.adkim)
                  for r in dkim_results)
    spf_ok = spf_result == "pass" and aligned(spf_domain, from_domain, record.aspf)
    if dkim_ok or spf_ok:
        return DMARCResult("pass", from_domain, policy, "none")
    disposition = policy
    if record.pct < 100 and sample() * 100 >= record.pct:
        # Not sampled: the next policy down applies (RFC 7489 6.6.4).
        disposition = POLICIES[max(POLICIES.index(policy) - 1, 0)]
    return DMARCResult("fail", from_domain, policy, disposition,
                       reason="no aligned DKIM or SPF pass")
