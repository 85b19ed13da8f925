# -*- test-case-name: tests.test_mailauth_dns -*-
"""
The DNS records a mail domain publishes (C{mailstack dns DOMAIN}), as zone
file lines, and their check against what DNS says (C{--check}).

Records, for domain D served by host H:

 - C{D MX 10 H}, and the HELO name's own SPF (C{H TXT "v=spf1 a -all"});
 - SPF C{D TXT "v=spf1 mx ~all"}: the MX host sends D's mail; C{~all}
   rather than C{-all} so that forwarded mail is judged by DKIM and DMARC,
   not refused on SPF alone (M3AAWG's advice with DMARC);
 - DKIM: each key under C{DATA/dkim/D/};
 - DMARC C{_dmarc.D TXT "v=DMARC1; p=reject; rua=mailto:ADDR"}, ADDR
   C{postmaster@D} unless given; mailstack signs all of D's mail from the
   start, so D can ask for C{p=reject} at once, as mox does;
 - MTA-STS: C{_mta-sts.D TXT "v=STSv1; id=..."} (the id is a digest of the
   policy, so it changes when the policy does), C{mta-sts.D CNAME H}, and the
   policy file to serve at C{https://mta-sts.D/.well-known/mta-sts.txt}
   (mode C{enforce}, C{max_age} one week);
 - TLS-RPT C{_smtp._tls.D TXT "v=TLSRPTv1; rua=mailto:ADDR"};
 - RFC 6186 SRV records for submission (587), submissions (465), IMAP
   (143), IMAPS (993) and POP3 (110) on H, and C{_pop3s._tcp} with the
   target C{.} (not offered), all on the standard ports whatever ports a
   test configuration listens on.

The host's own A/AAAA records are shown as a comment: only the operator
knows the public addresses; C{--check} verifies that H has some.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.names import dns

from mailstack.mailauth.keys import DKIMKey
from mailstack.mailauth.lookup import DNSCache, DNSTempError, payloads
from mailstack.mailauth.spf import check_spf

SRV_SERVICES = (("_submission._tcp", 587), ("_submissions._tcp", 465), ("_imap._tcp", 143),
                ("_imaps._tcp", 993), ("_pop3._tcp", 110))
#: Services mailstack does not offer, published as "not here" (RFC 6186 3.4).
SRV_ABSENT = ("_pop3s._tcp",)
MTA_STS_MAX_AGE = 604800


def mta_sts_policy(hostname: str, mode: str = "enforce", max_age: int = MTA_STS_MAX_AGE) -> str:
    """
    The policy file's text (RFC 8461 3.2), CRLF line endings.
    """
    return (f"version: STSv1\r\nmode: {mode}\r\nmx: {hostname}\r\n"
            f"max_age: {max_age}\r\n")


def mta_sts_id(policy: str) -> str:
    return hashlib.sha256(policy.encode("ascii")).hexdigest()[:20]


def _quoted(text: str) -> str:
    return " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))


@dataclass(frozen=True)
class Record:
    """
    One record: what it is for, its name, type and value as a zone file
    has them.
    """

    purpose: str
    name: str
    rtype: str
    value: str

    def zone_line(self) -> str:
        value = _quoted(self.value) if self.rtype == "TXT" else self.value
        return f"{self.name}. IN {self.rtype} {value}"


def records(domain: str, hostname: str, keys: list[DKIMKey], report: str | None = None
            ) -> list[Record]:
    """
    Every record C{domain} needs when C{hostname} serves it.
    """
    report = report or f"postmaster@{domain}"
    policy = mta_sts_policy(hostname)
    out = [
        Record("MX", domain, "MX", f"10 {hostname}."),
        Record("SPF", domain, "TXT", "v=spf1 mx ~all"),
        Record("SPF (HELO name)", hostname, "TXT", "v=spf1 a -all"),
    ]
    out += [Record(f"DKIM {key.algorithm}", key.record_name(), "TXT", key.public_record())
            for key in keys]
    out += [
        Record("DMARC", f"_dmarc.{domain}", "TXT", f"v=DMARC1; p=reject; rua=mailto:{report}"),
        Record("MTA-STS", f"_mta-sts.{domain}", "TXT", f"v=STSv1; id={mta_sts_id(policy)}"),
        Record("MTA-STS policy host", f"mta-sts.{domain}", "CNAME", f"{hostname}."),
        Record("TLS-RPT", f"_smtp._tls.{domain}", "TXT", f"v=TLSRPTv1; rua=mailto:{report}"),
    ]
    out += [Record(f"SRV {service.split('.')[0][1:]}", f"{service}.{domain}", "SRV",
                   f"0 1 {port} {hostname}.") for service, port in SRV_SERVICES]
    out += [Record(f"SRV {service.split('.')[0][1:]}", f"{service}.{domain}", "SRV", "0 0 0 .")
            for service in SRV_ABSENT]
    return out


def zone_text(domain: str, hostname: str, keys: list[DKIMKey], report: str | None = None
              ) -> str:
    """
    What C{mailstack dns DOMAIN} prints.
    """
    lines = [f"; DNS records for {domain}, served by {hostname}",
             f"; {hostname}. IN A / AAAA <the public addresses of this host>"]
    for record in records(domain, hostname, keys, report):
        lines.append(f"; {record.purpose}")
        lines.append(record.zone_line())
    if not keys:
        lines.append(f"; DKIM: no keys yet; make them with: mailstack dkim keygen {domain}")
    lines.append("")
    lines.append(f"; MTA-STS policy, served as https://mta-sts.{domain}/.well-known/mta-sts.txt")
    lines.append("; (with a certificate valid for mta-sts." + domain + "):")
    lines.extend("; " + line for line in mta_sts_policy(hostname).splitlines())
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Finding:
    """
    C{status}: C{ok}, C{missing}, C{wrong} or C{error} (DNS did not
    answer); C{detail} says what was found.
    """

    record: Record
    status: str
    detail: str = ""


def _name(rr: Any) -> str:
    return rr.payload.name.name.decode("ascii", "replace").lower().rstrip(".")


async def check_record(cache: DNSCache, record: Record, hostname: str) -> Finding:
    """
    Compare one record with DNS.  TXT policy records need the same kind of
    record (one C{v=spf1}, C{v=DMARC1}, ...) rather than the same text,
    except DKIM keys, which must carry the same key; SPF must let the host's
    addresses send.
    """
    host = hostname.lower().rstrip(".")
    if record.rtype == "MX":
        answers = [rr for rr in await cache.lookup(record.name, dns.MX) if rr.type == dns.MX]
        names = [_name(rr) for rr in answers]
        if not names:
            return Finding(record, "missing")
        if host not in names:
            return Finding(record, "wrong", f"MX points to {', '.join(names)}, not {host}")
        return Finding(record, "ok")
    if record.rtype == "CNAME":
        answers = await cache.lookup(record.name, dns.A)
        answers += await cache.lookup(record.name, dns.AAAA)
        if not answers:
            return Finding(record, "missing")
        return Finding(record, "ok")
    if record.rtype == "SRV":
        services = payloads(await cache.lookup(record.name, dns.SRV), dns.SRV, dns.Record_SRV)
        if not services:
            return Finding(record, "missing")
        _, _, port, target = record.value.split()
        found = [(srv.port, srv.target.name.decode("ascii", "replace")
                  .lower().rstrip(".")) for srv in services]
        if (int(port), target.rstrip(".")) not in found and not (
                target == "." and all(t == "" for _, t in found)):
            shown = ", ".join(f"{t or '.'}:{p}" for p, t in found)
            return Finding(record, "wrong", f"found {shown}")
        return Finding(record, "ok")
    texts = await cache.text(record.name)
    prefix = record.value.split(";")[0].split()[0].encode().lower()
    if record.purpose.startswith("DKIM"):
        wanted = parse_tag_value(record.value.encode()).get(b"p")
        for text in texts:
            try:
                if parse_tag_value(text).get(b"p") == wanted:
                    return Finding(record, "ok")
            except InvalidTagValueList:
                continue
        return Finding(record, "wrong" if texts else "missing",
                       "a different key is published" if texts else "")
    matching = [t for t in texts if t.lower().split(b";")[0].split(b" ")[0] == prefix]
    if not matching:
        return Finding(record, "missing")
    if len(matching) > 1:
        return Finding(record, "wrong", f"{len(matching)} records start with {prefix.decode()}")
    if prefix == b"v=dmarc1":
        try:
            tags = parse_tag_value(matching[0])
        except InvalidTagValueList as e:
            return Finding(record, "wrong", str(e))
        if tags.get(b"p", b"").lower() not in (b"none", b"quarantine", b"reject"):
            return Finding(record, "wrong", "no valid p= policy")
    if prefix == b"v=spf1":
        addresses = [a.dottedQuad() for a in
                     payloads(await cache.lookup(host, dns.A), dns.A, dns.Record_A)]
        addresses += [_v6(rr) for rr in await cache.lookup(host, dns.AAAA)
                      if rr.type == dns.AAAA]
        if not addresses:
            return Finding(record, "wrong", f"{host} has no A or AAAA record to check it with")
        for address in addresses:
            sender = f"postmaster@{record.name}"
            result = await check_spf(cache, address, sender, host)
            if result.result != "pass":
                return Finding(record, "wrong",
                               f"SPF gives {result.result} for {host} ({address})")
    return Finding(record, "ok")


def _v6(rr: Any) -> str:
    import socket
    return socket.inet_ntop(socket.AF_INET6, rr.payload.address)


async def check_all(cache: DNSCache, domain: str, hostname: str, keys: list[DKIMKey],
                    report: str | None = None) -> list[Finding]:
    """
    Every record of L{records} checked; a DNS failure is an C{error}
    finding for that record.
    """
    findings = []
    wanted = records(domain, hostname, keys, report)
    if not keys:
        wanted.insert(3, Record("DKIM", f"*._domainkey.{domain}", "TXT", "v=DKIM1"))
    for record in wanted:
        if record.purpose == "DKIM":
            findings.append(Finding(record, "missing",
                                    f"no DKIM keys under the data directory; run "
                                    f"mailstack dkim keygen {domain}"))
            continue
        try:
            findings.append(await check_record(cache, record, hostname))
        except DNSTempError as e:
            findings.append(Finding(record, "error", f"DNS: {e}"))
    return findings
