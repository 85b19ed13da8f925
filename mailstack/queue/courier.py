# -*- test-case-name: tests.test_relay -*-
"""
Delivery of queued mail to other hosts: where to (routes, MX, A/AAAA),
and one SMTP attempt per destination with per-recipient outcomes.

Routing (RFC 5321 5.1, RFC 7505):
  - a C{--route} for the domain (or C{*}) wins;
  - else the MX records, by preference, equal ones in random order;
  - a null MX (a single C{MX 0 .}) fails permanently at once;
  - no MX at all: the domain's own A/AAAA;
  - a domain that does not exist fails permanently.
Each MX host is tried in turn (all its addresses) until one answers;
a connection failure, a 4xx greeting or a session-level 4xx moves on to
the next.  Opportunistic STARTTLS: used when offered, not verified, and
when the TLS handshake fails the same host is retried once in clear text.
A next hop with C{--relay-auth} credentials (a smarthost) needs STARTTLS,
and AUTH PLAIN or LOGIN is done inside it; a refused login bounces.
For a domain in C{--require-tls}, STARTTLS is required and the
certificate is verified against the host name (service-identity, the
system's CAs): no TLS means a deferral, never clear text.
At most L{max_per_domain} sessions run to one domain at once.
MX and address answers are kept for their TTL (at most
L{dns_ttl_limit}), so a backlog to one domain costs one lookup per TTL,
not one per message; failed lookups are never kept.
MTA-STS (RFC 8461) and TLS reporting: with a C{tls_policy}
(L{mailstack.queue.tlspolicy}), a domain reached by MX whose policy is
C{enforce} gets only its policy's MX hosts and verified TLS, as with
C{--require-tls}; each session's TLS outcome is recorded.
"""

from __future__ import annotations

import functools
import ipaddress
import random
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from OpenSSL.SSL import Error as SSLError
from service_identity import VerificationError
from twisted.internet import ssl
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed, TimeoutError
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator, IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.names import dns
from twisted.names.error import DNSNameError, DomainError

from mailstack.logsafe import safe
from mailstack.queue.routes import Route
from mailstack.reactors import IMailReactor
from mailstack.queue.tlspolicy import TLSHandshakeFailed
from mailstack.smtp.client import (
    Session, SMTPClientError, SMTPClientProtocol, STARTTLSInjection, Timeouts, TLSRequired,
    Transaction,
    close_session,
    open_session, run_transaction,
)
from mailstack.smtp.reply import Reply

log = Logger()


class RouteError(Exception):
    """
    No way to reach a domain; a 5xx C{reply} bounces, a 4xx retries.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


@dataclass(frozen=True)
class Outcome:
    """
    What one attempt did for one recipient.
    """

    reply: Reply
    relay: str = ""

    def __post_init__(self) -> None:
        # RFC 3463: a status's class is the reply's.  A remote's "451 5.7.1"
        # (or a 5xx turned into a deferral here) is recorded as 4.7.1.
        reply = self.reply
        klass = str(reply.code // 100)
        if reply.enhanced[:1] in ("2", "4", "5") and reply.enhanced[:1] != klass:
            object.__setattr__(self, "reply", reply._replace(
                enhanced=klass + reply.enhanced[1:]))

    @property
    def status(self) -> str:
        if self.reply.code < 300:
            return "sent"
        return "bounced" if self.reply.code >= 500 else "deferred"


@functools.lru_cache(maxsize=4096)  # asked at every attempt for the same few hosts
def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


class Courier:
    """
    Delivers to remote hosts.  The resolver and the way to connect are
    passed in, so tests use a fake DNS and servers on 127.0.0.1.
    """

    max_per_domain = 20  # Postfix default_destination_concurrency_limit
    idle_time = 2.0  # seconds a session waits for the next message (Postfix: 2s)
    reuse_limit = 100  # transactions per session
    dns_ttl_limit = 3600.0  # the longest an MX or address answer is kept
    dns_cache_size = 10000  # answers kept at most (all dropped when full)

    def __init__(
        self,
        reactor: IMailReactor,
        resolver: Any,  # an IResolver (Twisted declares its lookups' timeout required)
        hostname: str,
        routes: Sequence[Route] = (),
        port: int = 25,
        timeouts: Timeouts = Timeouts(),
        endpoint: Callable[[str, int], IStreamClientEndpoint] | None = None,
        shuffle: Callable[[list[Any]], None] = random.shuffle,
        require_tls: Sequence[str] = (),
        trust_root: Any = None,
        relay_auth: Sequence[Any] = (),
        bind_addresses: Sequence[str] = (),
        tls_policy: Any = None,
    ) -> None:
        self.reactor = reactor
        self.resolver = resolver
        self.hostname = hostname
        self.routes = {r.domain: r for r in routes}
        self.port = port
        self.timeouts = timeouts
        self.endpoint = endpoint or self._tcp_endpoint
        self.shuffle = shuffle
        self.tls_context = ssl.CertificateOptions(verify=False,
                                                  raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
        self.require_tls = frozenset(require_tls)
        self.credentials = {a.host: (a.user, a.password()) for a in relay_auth}
        self.trust_root = trust_root
        self._limits: dict[str, DeferredSemaphore] = {}
        self._idle: dict[tuple[Any, ...], list[tuple[Session, Any]]] = {}
        self._closing = False
        # --smtp-bind-address: the source address per family (smtp_bind_address,
        # smtp_bind_address6 in Postfix).
        self.bind_addresses = tuple(bind_addresses)
        # MTA-STS and TLS reporting (mailstack.queue.tlspolicy.TLSPolicy), or None.
        self.tls_policy = tls_policy

    @property
    def resolver(self) -> Any:
        """
        The resolver of MX and address lookups; the answers kept are its
        own: a new resolver starts with none.
        """
        return self._resolver

    @resolver.setter
    def resolver(self, resolver: Any) -> None:
        self._resolver = resolver
        self._answers: dict[tuple[str, str], tuple[float, Any]] = {}

    def _tcp_endpoint(self, ip: str, port: int) -> IStreamClientEndpoint:
        six = ":" in ip
        source = next((a for a in self.bind_addresses if (":" in a) == six), None)
        bind = (source, 0) if source is not None else None
        if six:
            return TCP6ClientEndpoint(self.reactor, ip, port, timeout=30, bindAddress=bind)
        return TCP4ClientEndpoint(self.reactor, ip, port, timeout=30, bindAddress=bind)

    # Where to

    async def hosts_for(self, domain: str) -> list[tuple[str, int]]:
        """
        The hosts to try for C{domain}, in order, with their ports.
        """
        route = self.routes.get(domain) or self.routes.get("*")
        if route is not None:
            return [(route.host, route.port)]
        mx = self._recall("mx", domain.lower())
        if mx is None:
            mx = await self._lookup_mx(domain)
        if len(mx) == 1 and mx[0][1] == "":
            raise RouteError(Reply(556, "5.1.10", f"Domain {domain} does not accept mail "
                                                  "(null MX)"))
        if not mx:
            return [(domain, self.port)]
        hosts: list[tuple[str, int]] = []
        for preference in sorted({p for p, _ in mx}):
            same = [name for p, name in mx if p == preference and name]
            self.shuffle(same)
            hosts.extend((name, self.port) for name in same)
        return hosts

    async def _lookup_mx(self, domain: str) -> list[tuple[int, str]]:
        """
        The MX records of C{domain} as (preference, host), from DNS, kept
        for their TTL.
        """
        try:
            answers, _, _ = await self.resolver.lookupMailExchange(domain)
        except DNSNameError:
            raise RouteError(Reply(550, "5.1.2",
                                   f"Host or domain name not found: {domain}")) from None
        except DomainError as e:
            # SERVFAIL, REFUSED, ...: RFC 5321 5.1 allows the A/AAAA fallback
            # only when the lookup succeeds with no MX; anything else defers.
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup of the MX of {domain} failed: "
                                                 f"{type(e).__name__}")) from e
        except Exception as e:  # any failure of the (replaceable) resolver defers: re-raised
            raise RouteError(Reply(451, "4.4.3", f"DNS lookup of {domain} failed: {e}")) from e
        records = [a for a in answers if a.type == dns.MX]
        mx = [(a.payload.preference, str(a.payload.name).rstrip(".")) for a in records]
        self._remember("mx", domain.lower(), mx, records)
        return mx

    async def addresses(self, host: str) -> list[str]:
        """
        The IPv4 and IPv6 addresses of a host (an IP literal is itself).
        """
        if is_ip(host):
            return [host]
        cached = self._recall("address", host.lower())
        if cached is not None:
            return list(cached)
        found: list[str] = []
        records: list[Any] = []
        complete = True
        for lookup, rtype in ((self.resolver.lookupAddress, dns.A),
                              (self.resolver.lookupIPV6Address, dns.AAAA)):
            try:
                answers, _, _ = await lookup(host)
            except Exception:  # noqa: BLE001 - any failed lookup of one type: try the other
                complete = False
                continue
            records.extend(a for a in answers if a.type == rtype)
            found.extend(a.payload.dottedQuad() if rtype == dns.A else
                         _ipv6(a.payload.address)
                         for a in answers if a.type == rtype)
        if complete and found:
            self._remember("address", host.lower(), tuple(found), records)
        return found

    def _recall(self, kind: str, name: str) -> Any:
        """
        An answer kept by L{_remember} and not expired, or None.
        """
        kept = self._answers.get((kind, name))
        if kept is None:
            return None
        if kept[0] <= self.reactor.seconds():
            del self._answers[(kind, name)]
            return None
        return kept[1]

    def _remember(self, kind: str, name: str, value: Any, records: Sequence[Any]) -> None:
        """
        Keep C{value} for the smallest TTL of C{records} (not at all for
        none, or a TTL of 0), at most L{dns_ttl_limit} seconds.
        """
        ttl = min(min((r.ttl for r in records), default=0), self.dns_ttl_limit)
        if ttl <= 0:
            return
        if len(self._answers) >= self.dns_cache_size:
            self._answers.clear()
        self._answers[(kind, name)] = (self.reactor.seconds() + ttl, value)

    # One attempt

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str],
                      open_content: Callable[[], Any], size: int) -> dict[str, Outcome]:
        """
        Try to deliver to every recipient at C{domain}; never raises.
        """
        limit = self._limits.setdefault(domain, DeferredSemaphore(self.max_per_domain))
        await limit.acquire()
        try:
            return await self._deliver(domain, sender, recipients, open_content, size)
        finally:
            limit.release()
            if limit.tokens == self.max_per_domain and not limit.waiting:
                self._limits.pop(domain, None)

    async def _deliver(self, domain: str, sender: str, recipients: Sequence[str],
                       open_content: Callable[[], Any], size: int) -> dict[str, Outcome]:
        verified = domain in self.require_tls or "*" in self.require_tls
        try:
            hosts = await self.hosts_for(domain)
        except RouteError as e:
            return {r: Outcome(e.reply) for r in recipients}
        sts = None
        if self.tls_policy is not None and not (self.routes.get(domain) or self.routes.get("*")):
            sts = await self.tls_policy.check(domain)
            verified = verified or sts.enforce
        last = Reply(451, "4.4.1", f"no host for {domain} could be reached")
        for host, port in hosts:
            if sts is not None and not sts.allowed(host):
                last = sts.refusal(host)
                continue
            ips = await self.addresses(host)
            if not ips:
                last = Reply(451, "4.4.3", f"Host not found: {host}")
                continue
            for ip in ips:
                relay = f"{host}[{ip}]:{port}"
                credentials = self.credentials.get(host.lower())
                strict = verified or credentials is not None
                tls_failed = None
                for use_tls in ((True,) if strict else (True, False)):
                    try:
                        checking = sts.context(host, use_tls, verified) if sts else None
                        attempt = self._session(ip, port, sender, recipients,
                                                open_content, size, use_tls,
                                                host if verified else None, credentials,
                                                checking)
                        result = await (attempt if sts is None else
                                        sts.observe(host, ip, use_tls, attempt, checking))
                    except TLSRequired as e:
                        # Deferred with a 4.7.x status (RFC 3463: a 4xx reply never
                        # carries 5.x.x), saying who said what.
                        if e.stage == "STARTTLS":
                            text = (f"{relay} said: {e.reply.code} {e.reply.text} "
                                    "(in reply to STARTTLS, and TLS is required)")
                        elif e.stage == "AUTH":
                            text = ("TLS is required to log in, but STARTTLS was not "
                                    f"offered by {relay}")
                        else:
                            text = f"TLS is required, but STARTTLS was not offered by {relay}"
                        last = Reply(451, "4.7.4", text)
                        break
                    except SMTPClientError as e:
                        if e.permanent and e.stage in ("MAIL", "DATA", "SIZE", "AUTH", "loop"):
                            return {r: Outcome(e.reply, relay) for r in recipients}
                        # A deferral keeps the remote's words; Outcome gives its
                        # status the reply's class.
                        last = Reply(e.reply.code if e.reply.code < 500 else 451,
                                     e.reply.enhanced or "4.4.0",
                                     f"{relay} said: {e.reply.code} {e.reply.text}")
                        if e.reply.code >= 500 and e.stage in ("greeting", "HELO"):
                            last = e.reply
                        break
                    except _TLSFailed as e:
                        last = Reply(451, "4.7.5", f"{relay}: TLS failed: {e}")
                        tls_failed = str(e)
                        log.warn("{relay}: STARTTLS handshake failed ({error}); trying the "
                                 "same host again in clear text", relay=relay, error=e)
                        continue  # the same host once more, in clear text
                    except VerificationError as e:
                        last = Reply(451, "4.7.5", f"{relay}: certificate not valid for "
                                                   f"{host}: {_describe(e)}")
                        break
                    except (ConnectError, ConnectionClosed, TimeoutError, SSLError, OSError) as e:
                        last = Reply(451, "4.4.1", f"connect to {relay}: {_describe(e)}")
                        break
                    except Exception as e:  # noqa: BLE001 - a bug defers this message, not the queue
                        log.failure("session with {relay} failed", relay=safe(relay))
                        last = Reply(451, "4.3.0", f"{relay}: {_describe(e)}")
                        break
                    else:
                        if tls_failed is not None:
                            log.warn("{relay}: sent in clear text after a failed TLS "
                                     "handshake ({error}) to {recipients}", relay=relay,
                                     error=tls_failed, recipients=", ".join(
                                         f"<{r}>" for r in recipients))
                        return {r: Outcome(result.reply_for(r), relay) for r in recipients}
        if sts is not None:
            last = sts.explain(last)
        return {r: Outcome(last) for r in recipients}

    async def _session(self, ip: str, port: int, sender: str, recipients: Sequence[str],
                       open_content: Callable[[], Any], size: int, use_tls: bool,
                       verify_host: str | None = None,
                       credentials: tuple[str, str] | None = None,
                       tls_context: Any = None) -> Any:
        """
        One transaction, on a cached session to the same place if there is
        one, else on a new session; with C{verify_host}, TLS is required and
        the certificate must be valid for that name; with C{credentials},
        TLS is required and AUTH is done inside it; C{tls_context}
        replaces the opportunistic one (MTA-STS testing mode).
        """
        key = (ip, port, use_tls, verify_host, credentials, tls_context)
        # No content yet: each try below opens its own (open_content()).
        transaction = Transaction(sender, list(recipients), None, size)  # type: ignore[arg-type]
        cached = self._take_idle(key)
        if cached is not None:
            transaction.content = open_content()
            try:
                result = await run_transaction(cached, transaction, self.timeouts)
            except Exception as e:  # any failure ends the cached session; re-raised past MAIL
                cached.proto.transport.loseConnection()
                if cached.stage != "MAIL":
                    raise
                # Closed by the other side while idle: nothing was sent yet.
                log.debug("cached session to {ip} was stale: {e}", ip=ip, e=safe(_describe(e)))
            else:
                self._park(key, cached)
                result.reused = True
                return result
            finally:
                transaction.content.close()
        context: IOpenSSLClientConnectionCreator | ssl.CertificateOptions | None
        if verify_host is not None:
            context = ssl.optionsForClientTLS(
                verify_host, trustRoot=self.trust_root or ssl.platformTrust())
        else:
            context = (tls_context or self.tls_context) if use_tls else None
        proto = SMTPClientProtocol(self.reactor)
        factory = Factory.forProtocol(lambda: proto)
        factory.noisy = False
        await self.endpoint(ip, port).connect(factory)
        transaction.content = open_content()
        session = None
        try:
            session = await open_session(
                proto, self.hostname, tls_context=context,
                require_tls=verify_host is not None or credentials is not None,
                credentials=credentials, timeouts=self.timeouts)
            if self.hostname.lower() in session.peer_names:
                # Postfix: "mail for X loops back to myself" (bad MX or route).
                raise SMTPClientError(Reply(554, "5.4.6", f"mail for {ip} loops back to "
                                                          "myself"), "loop")
            if session.tls:
                log.info("{kind} TLS connection established to {ip}:{port}",
                         kind="Verified" if verify_host is not None else "Untrusted",
                         ip=ip, port=port)
            result = await run_transaction(session, transaction, self.timeouts)
        except (SSLError, STARTTLSInjection) as e:
            proto.transport.loseConnection()
            if use_tls and verify_host is None:
                # Opportunistic TLS: whoever could inject answers could as
                # well have hidden STARTTLS; clear text is no worse.  A login
                # (credentials) is still never sent without TLS.
                raise _TLSFailed(_describe(e)) from None
            raise
        except BaseException as e:
            proto.transport.loseConnection()
            if (session is None and use_tls and verify_host is None
                    and getattr(proto.transport, "TLS", False)
                    and isinstance(e, ConnectionClosed)):
                # The server hung up during the handshake (it could not agree
                # on a version or cipher): a TLS failure like any other.
                raise _TLSFailed(_describe(e)) from None
            raise
        finally:
            transaction.content.close()
        self._park(key, session)
        return result

    # Sessions kept open between messages to the same place (Postfix's
    # connection cache): a queue backlog to one destination costs one
    # greeting, EHLO and STARTTLS per session, not per message.

    def _take_idle(self, key: tuple[Any, ...]) -> Session | None:
        pool = self._idle.get(key)
        while pool:
            session, timer = pool.pop()
            if timer.active():
                timer.cancel()
            if session.alive:
                if not pool:
                    del self._idle[key]
                return session
        self._idle.pop(key, None)
        return None

    def _park(self, key: tuple[Any, ...], session: Session) -> None:
        if (self._closing or not session.clean or not session.alive
                or session.transactions >= self.reuse_limit):
            self._quit(session)
            return
        timer = self.reactor.callLater(self.idle_time, self._expire, key, session)
        self._idle.setdefault(key, []).append((session, timer))

    def _expire(self, key: tuple[Any, ...], session: Session) -> None:
        pool = self._idle.get(key, [])
        for i, (parked, _) in enumerate(pool):
            if parked is session:
                del pool[i]
                break
        if not pool:
            self._idle.pop(key, None)
        self._quit(session)

    def _quit(self, session: Session) -> Deferred[None]:
        d = Deferred.fromCoroutine(close_session(session))
        return d.addErrback(lambda f: session.proto.transport.abortConnection())

    def close_idle(self) -> Deferred[Any]:
        """
        Say QUIT on every cached session (at shutdown).
        """
        self._closing = True
        quits = []
        for pool in self._idle.values():
            for session, timer in pool:
                if timer.active():
                    timer.cancel()
                quits.append(self._quit(session))
        self._idle.clear()
        return DeferredList(quits)


class _TLSFailed(TLSHandshakeFailed):
    """
    The TLS handshake of an opportunistic STARTTLS failed: retry in clear.
    """


def _describe(e: BaseException) -> str:
    text = str(e).strip() or e.__class__.__name__
    return text.splitlines()[0][:200]


def _ipv6(packed: bytes) -> str:
    return str(ipaddress.IPv6Address(packed))
