# -*- test-case-name: tests.test_mailauth_mtasts -*-
"""
MTA-STS (RFC 8461), the sending side: find a domain's policy, fetch it over
verified HTTPS, keep it for its C{max_age}, and say whether an MX host may
receive the domain's mail.

Discovery: the TXT record C{_mta-sts.DOMAIN} (exactly one starting with
C{v=STSv1}, with an C{id}); when its id differs from the cached policy's,
the policy is fetched from C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}
with twisted.web's C{Agent}: the certificate must be valid for
C{mta-sts.DOMAIN} (the platform's trust roots unless another is given), the
answer must be C{200} with C{text/plain} (redirects are not followed), at
most 64 KiB, within 60 seconds.  A failed lookup or fetch falls back to
the cached policy while it is fresh, else there is no policy (RFC 8461
5.1).  Policies are kept in memory and, when a directory is given, under
C{DATA/mta-sts/<domain>.json}, so a restart keeps them.

Modes (RFC 8461 5): C{enforce}: deliver only to MX hosts that match the
policy (L{mx_allowed}), over TLS with a certificate valid for the MX name,
and defer (4.7.x) otherwise; C{testing}: deliver as without a policy, but
log (and later report, TLS-RPT) what C{enforce} would have refused;
C{none}: as without a policy.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.names import dns
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http_headers import Headers

from mailstack.clock import wall_seconds
from mailstack.mailauth.lookup import DNSCache, DNSTempError, payload
from mailstack.reactors import IMailReactor

log = Logger()

MAX_POLICY_SIZE = 64 * 1024
MAX_AGE_LIMIT = 31557600  # RFC 8461 3.2
FETCH_TIMEOUT = 60.0
_ID = re.compile(r"^[A-Za-z0-9]{1,32}$")
_MX = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]*[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]*[a-z0-9])?$")


class PolicyError(ValueError):
    """
    A policy file or TXT record that does not follow RFC 8461.
    """


class FetchError(PolicyError):
    """
    The policy host did not answer with a policy: an HTTP status other than
    200, another content type, too much.
    """


@dataclass(frozen=True)
class STSPolicy:
    """
    A domain's policy: C{mode} (C{enforce}, C{testing} or C{none}), the
    C{mx} patterns, C{max_age} in seconds; C{id} from the TXT record and
    C{fetched}, when it was fetched (seconds since the epoch).
    """

    mode: str
    mx: tuple[str, ...]
    max_age: int
    id: str = ""
    fetched: float = 0.0

    def fresh(self, now: float) -> bool:
        return now < self.fetched + self.max_age


def parse_policy(text: bytes) -> STSPolicy:
    """
    Parse a policy file (RFC 8461 3.2): C{key: value} lines, LF or CRLF;
    C{version: STSv1}, C{mode} and C{max_age} required, C{mx} required
    (and repeatable) unless the mode is C{none}; unknown keys ignored.
    """
    try:
        lines = text.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise PolicyError("not UTF-8") from None
    fields: dict[str, list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise PolicyError(f"not a key: value line: {line[:60]!r}")
        fields.setdefault(key.strip().lower(), []).append(value.strip())
    if fields.get("version") != ["STSv1"]:
        raise PolicyError("no version: STSv1")
    mode = fields.get("mode", [""])
    if len(mode) != 1 or mode[0] not in ("enforce", "testing", "none"):
        raise PolicyError(f"bad mode {mode}")
    age = fields.get("max_age", [""])
    if len(age) != 1 or not age[0].isdigit() or len(age[0]) > 10:
        raise PolicyError(f"bad max_age {age}")
    mx = tuple(m.lower().rstrip(".") for m in fields.get("mx", []))
    for pattern in mx:
        if not _MX.match(pattern):
            raise PolicyError(f"bad mx {pattern!r}")
    if not mx and mode[0] != "none":
        raise PolicyError("no mx")
    return STSPolicy(mode[0], mx, min(int(age[0]), MAX_AGE_LIMIT))


def parse_txt(records: list[bytes]) -> str | None:
    """
    The policy id of the C{_mta-sts} TXT records, or None when there is not
    exactly one valid C{v=STSv1} record (RFC 8461 3.1).
    """
    found = [r for r in records if r.startswith(b"v=STSv1")]
    if len(found) != 1:
        return None
    tags = {}
    for part in found[0].decode("ascii", "replace").split(";"):
        key, sep, value = part.strip().partition("=")
        if sep:
            tags[key.strip()] = value.strip()
    if tags.get("v") != "STSv1" or not _ID.match(tags.get("id", "")):
        return None
    return tags["id"]


def mx_allowed(policy: STSPolicy, mx_host: str) -> bool:
    """
    Whether C{mx_host} matches one of the policy's C{mx} patterns (RFC 8461
    4.1): the same name, or C{*.} standing for exactly one left-most
    label.  Case and a trailing dot do not matter.
    """
    host = mx_host.lower().rstrip(".")
    for pattern in policy.mx:
        if pattern.startswith("*."):
            label, _, rest = host.partition(".")
            if label and rest == pattern[2:]:
                return True
        elif host == pattern:
            return True
    return False


def fetch_error_type(error: BaseException) -> str:
    """
    The RFC 8460 result type of a failed policy fetch: C{sts-policy-invalid}
    for a policy that does not parse (or a wrong answer),
    C{sts-webpki-invalid} for a certificate that does not verify,
    C{sts-policy-fetch-error} for anything else.
    """
    if isinstance(error, PolicyError) and not isinstance(error, FetchError):
        return "sts-policy-invalid"
    reasons = [error] + [getattr(f, "value", f) for f in getattr(error, "reasons", [])]
    for reason in reasons:
        if isinstance(reason, (SSLError, VerificationError)):
            return "sts-webpki-invalid"
    return "sts-policy-fetch-error"


class _Body(Protocol):
    def __init__(self, done: Deferred[bytes], limit: int) -> None:
        self.done, self.limit, self.data = done, limit, bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit and not self.done.called:
            self.done.errback(FetchError("policy too large"))
            # deliverBody's transport is the response's producer
            IPushProducer(self.transport).stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(bytes(self.data))
        else:
            self.done.errback(reason)


class _FixedAddress:
    """
    An Agent endpoint factory that connects to one address and wraps TLS
    verified for the URI's host name.
    """

    def __init__(self, reactor: IMailReactor, tls: Any, address: str, port: int) -> None:
        self.reactor, self.tls, self.address, self.port = reactor, tls, address, port

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii") if isinstance(uri.host, bytes) else uri.host
        kind = TCP6ClientEndpoint if ":" in self.address else TCP4ClientEndpoint
        return wrapClientTLS(self.tls.creatorForNetloc(host.encode("ascii"), uri.port),
                             kind(self.reactor, self.address, self.port, timeout=30))


class MTASTSClient:
    """
    Finds and caches MTA-STS policies.

    @param reactor: for connections and the thread pool.
    @param cache: the L{DNSCache} for TXT and address lookups.
    @param directory: where policies are kept across restarts
        (C{DATA/mta-sts}), or None for memory only.
    @param tls: an C{IPolicyForHTTPS}; by default the platform's trust roots.
    @param connect_to: C{{host: (address, port)}} overrides, for tests;
        otherwise the policy host's A/AAAA records, port 443.
    @param clock: the time for C{max_age} (the reactor by default).
    @param port: the HTTPS port of policy hosts (443; tests change it).
    @param on_error: called with C{(domain, result type, text)} when a
        policy fetch fails, the result type one of RFC 8460's
        (C{sts-policy-fetch-error}, C{sts-policy-invalid},
        C{sts-webpki-invalid}), for TLS reporting.
    """

    def __init__(self, reactor: IMailReactor, cache: DNSCache, directory: str | None = None,
                 tls: Any = None, connect_to: dict[str, tuple[str, int]] | None = None,
                 clock: IReactorTime | None = None, timeout: float = FETCH_TIMEOUT, port: int = 443,
                 on_error: Any = None) -> None:
        self.reactor = reactor
        self.cache = cache
        self.directory = directory
        self.tls = tls or BrowserLikePolicyForHTTPS()
        self.connect_to = connect_to or {}
        self.clock = clock or reactor
        self.timeout = timeout
        self.port = port
        self.on_error = on_error
        self._policies: dict[str, STSPolicy | None] = {}

    async def policy(self, domain: str) -> STSPolicy | None:
        """
        The policy that applies to mail for C{domain} now, or None.
        """
        domain = domain.lower().rstrip(".")
        now = wall_seconds(self.clock)  # compared with times kept on disk
        cached = await self._cached(domain)
        if cached is not None and not cached.fresh(now):
            cached = None
        try:
            policy_id = parse_txt(await self.cache.text(f"_mta-sts.{domain}"))
        except DNSTempError as e:
            log.info("mta-sts {domain}: TXT lookup failed ({error}); using the cache",
                     domain=domain, error=str(e))
            return cached
        if policy_id is None:
            return cached
        if cached is not None and cached.id == policy_id:
            return cached
        try:
            fetched = await self.fetch(domain)
        except Exception as e:  # noqa: BLE001 - any network, TLS, HTTP or syntax failure (8461 5.1)
            log.info("mta-sts {domain}: policy fetch failed: {error}", domain=domain,
                     error=str(e) or type(e).__name__)
            if self.on_error is not None:
                self.on_error(domain, fetch_error_type(e), str(e) or type(e).__name__)
            return cached
        policy = STSPolicy(fetched.mode, fetched.mx, fetched.max_age, policy_id, now)
        await self._store(domain, policy)
        return policy

    async def fetch(self, domain: str) -> STSPolicy:
        """
        Fetch and parse C{https://mta-sts.DOMAIN/.well-known/mta-sts.txt}.
        """
        host = f"mta-sts.{domain}"
        if host in self.connect_to:
            address, port = self.connect_to[host]
        else:
            address, port = await self._address(host), self.port
        agent = Agent.usingEndpointFactory(self.reactor,
                                           _FixedAddress(self.reactor, self.tls, address, port))
        url = f"https://{host}/.well-known/mta-sts.txt".encode("ascii")
        request = agent.request(b"GET", url, Headers({b"user-agent": [b"mailstack"]}))
        request.addTimeout(self.timeout, self.reactor)
        response = await request
        if response.code != 200:
            response.deliverBody(Protocol())
            raise FetchError(f"HTTP {response.code}")
        types = response.headers.getRawHeaders(b"content-type") or [b""]
        if types[0].split(b";")[0].strip().lower() != b"text/plain":
            response.deliverBody(Protocol())
            raise FetchError(f"content type {types[0].decode('latin-1')!r}")
        body: Deferred[bytes] = Deferred()
        response.deliverBody(_Body(body, MAX_POLICY_SIZE))
        body.addTimeout(self.timeout, self.reactor)
        return parse_policy(await body)

    async def _address(self, host: str) -> str:
        for rtype in (dns.A, dns.AAAA):
            for rr in await self.cache.lookup(host, rtype):
                # Through lookup.payload: mypy-zope takes an isinstance
                # test of an IEncodableRecord for unreachable code.
                a = payload(rr, dns.Record_A)
                if a is not None:
                    return a.dottedQuad()
                aaaa = payload(rr, dns.Record_AAAA)
                if aaaa is not None:
                    import socket
                    return socket.inet_ntop(socket.AF_INET6, aaaa.address)
        raise PolicyError(f"{host} has no address")

    def _path(self, domain: str) -> str | None:
        if self.directory is None or not re.match(r"^[a-z0-9.-]+$", domain) or ".." in domain:
            return None
        return os.path.join(self.directory, domain + ".json")

    async def _cached(self, domain: str) -> STSPolicy | None:
        if domain in self._policies:
            return self._policies[domain]
        path = self._path(domain)
        policy = None
        if path is not None:
            policy = await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                             _load, path)
        self._policies[domain] = policy
        return policy

    async def _store(self, domain: str, policy: STSPolicy) -> None:
        self._policies[domain] = policy
        path = self._path(domain)
        if path is not None:
            await deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                    _save, path, policy)


def _load(path: str) -> STSPolicy | None:
    try:
        with open(path) as f:
            data = json.load(f)
        return STSPolicy(str(data["mode"]), tuple(str(m) for m in data["mx"]),
                         int(data["max_age"]), str(data["id"]), float(data["fetched"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save(path: str, policy: STSPolicy) -> None:
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(asdict(policy), f)
    os.replace(temporary, path)
