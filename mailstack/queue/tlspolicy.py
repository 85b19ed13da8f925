# -*- test-case-name: tests.test_tlspolicy -*-
"""
The TLS policy of outbound delivery: MTA-STS (RFC 8461) applied to the
courier's MX hosts and sessions, and TLS reporting (RFC 8460) of what each
session's TLS did.

For each delivery to a domain reached by MX (not by C{--route}), the
courier asks L{TLSPolicy.check} for a L{DomainTLS}:

  - C{enforce}: only MX hosts matching the policy's C{mx} patterns are
    tried; STARTTLS with a certificate valid for the MX name (trusted by
    C{--tls-ca-file} or the system's roots) is required; otherwise the
    recipients are deferred with a 4.7.x status naming the policy, and
    bounce as usual once C{--max-queue-lifetime} has passed;
  - C{testing}: delivery is as without a policy (opportunistic TLS), but
    the session's certificate is checked as C{enforce} would check it
    (trust and host name, in the handshake, without refusing it) and
    whatever C{enforce} would have refused is logged and reported;
  - C{none}, no policy, or C{--mta-sts off}: opportunistic TLS as before.

Every session's outcome (C{success} or an RFC 8460 result type) goes to
the L{TLSReportLog} when there is one.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, TypeVar

from OpenSSL import SSL
from zope.interface import implementer
from service_identity import VerificationError
from service_identity.hazmat import DNS_ID, verify_service_identity
from service_identity.pyopenssl import extract_patterns
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger

from mailstack.logsafe import safe
from mailstack.mailauth.mtasts import MTASTSClient, STSPolicy, mx_allowed
from mailstack.mailauth.tlsrpt import TLSReportLog
from mailstack.smtp.client import STARTTLSInjection, TLSRequired
from mailstack.smtp.reply import Reply

log = Logger()

T = TypeVar("T")

# X509_V_ERR_* codes (openssl/x509_vfy.h) that mean "not trusted" and "expired".
_NOT_TRUSTED = {2, 4, 7, 18, 19, 20, 21, 27}
_EXPIRED = {10}
_REASONS = {2: "unable to get issuer certificate", 9: "certificate is not yet valid",
            10: "certificate has expired", 18: "self-signed certificate",
            19: "self-signed certificate in certificate chain",
            20: "unable to get local issuer certificate",
            21: "unable to verify the first certificate", 27: "certificate not trusted",
            4: "unable to decrypt the certificate's signature",
            7: "certificate signature failure"}


class TLSHandshakeFailed(Exception):
    """
    An opportunistic STARTTLS handshake failed (the courier retries in
    clear text); for TLS reporting, a C{validation-failure}.
    """


def load_trust_root(path: str) -> Any:
    """
    The CA certificates of a PEM file as a trust root for verified TLS
    (C{--tls-ca-file}).

    @raise ValueError: the file holds no certificate.
    """
    with open(path, "rb") as f:
        data = f.read()
    end = b"-----END CERTIFICATE-----"
    certificates = [ssl.Certificate.loadPEM(block + end) for block in data.split(end)
                    if b"-----BEGIN CERTIFICATE-----" in block]
    if not certificates:
        raise ValueError(f"{path}: no PEM certificate")
    return ssl.trustRootFromCertificates(certificates)


def classify(error: BaseException) -> str | None:
    """
    The RFC 8460 result type of a failed session, or None when the failure
    had nothing to do with TLS (a refused connection, an SMTP error).
    """
    if isinstance(error, TLSRequired) and error.stage in ("STARTTLS", "EHLO"):
        return "starttls-not-supported"
    if isinstance(error, VerificationError):
        return "certificate-host-mismatch"
    if isinstance(error, SSL.Error):
        text = str(error).lower()
        if "expired" in text:
            return "certificate-expired"
        if "verify failed" in text:
            return "certificate-not-trusted"
        return "validation-failure"
    if isinstance(error, (TLSHandshakeFailed, STARTTLSInjection)):
        return "validation-failure"
    return None


@implementer(IOpenSSLContextFactory)
class CheckingTLS:
    """
    A client TLS context factory for C{testing} mode: opportunistic (any
    certificate is accepted) but it verifies the chain against the trust
    root as the handshake goes and keeps what it found, so that the
    certificate can be judged afterwards (L{problem}).

    @param host: the MX name (sent as SNI, checked against the certificate).
    """

    def __init__(self, host: str, trust_root: Any = None) -> None:
        self.host = host
        self.trust_root = trust_root
        self.errors: list[int] = []
        self.leaf: Any = None

    def getContext(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_CLIENT_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        (self.trust_root or ssl.platformTrust())._addCACertsToContext(context)
        context.set_verify(SSL.VERIFY_PEER, self._verify)
        name = self.host.encode("idna")

        def sni(connection: SSL.Connection, where: int, ret: int) -> None:
            if where & SSL.SSL_CB_HANDSHAKE_START:
                connection.set_tlsext_host_name(name)

        context.set_info_callback(sni)
        return context

    def _verify(self, connection: Any, certificate: Any, errno: int, depth: int,
                ok: int) -> bool:
        if depth == 0:
            self.leaf = certificate
        if not ok:
            self.errors.append(errno)
        return True  # judged later, never refused here

    def problem(self) -> tuple[str, str] | None:
        """
        What C{enforce} would have refused in the handshake that happened:
        C{(result type, description)}, or None.
        """
        if self.leaf is None:
            return ("validation-failure", "no certificate")
        if self.errors:
            errno = self.errors[0]
            reason = _REASONS.get(errno, f"certificate verify error {errno}")
            if errno in _EXPIRED:
                return ("certificate-expired", reason)
            if errno in _NOT_TRUSTED:
                return ("certificate-not-trusted", reason)
            return ("validation-failure", reason)
        try:
            verify_service_identity(extract_patterns(self.leaf), [DNS_ID(self.host)], [])
        except VerificationError as e:
            return ("certificate-host-mismatch", f"certificate not valid for {self.host}: "
                                                 f"{str(e)[:200]}")
        return None


class DomainTLS:
    """
    The TLS policy for one delivery to C{domain}: its MTA-STS policy (or
    None) and what each session did.
    """

    def __init__(self, owner: TLSPolicy, domain: str, policy: STSPolicy | None) -> None:
        self.owner = owner
        self.domain = domain
        self.policy = policy if policy is not None and policy.mode != "none" else None
        #: The last TLS failure of this delivery: (result type, text).
        self.failure: tuple[str, str] | None = None

    @property
    def mode(self) -> str:
        return self.policy.mode if self.policy is not None else "none"

    @property
    def enforce(self) -> bool:
        return self.mode == "enforce"

    def allowed(self, host: str) -> bool:
        """
        Whether to try MX C{host}: in C{enforce} mode only if the policy
        names it; C{testing} mode logs a host it does not name and goes on.
        """
        if self.policy is None or mx_allowed(self.policy, host):
            return True
        self._record("validation-failure", host)
        if self.enforce:
            log.warn("mta-sts {domain}: MX host {host} is not in the policy (mx: {mx}); "
                     "not delivering to it", domain=self.domain, host=safe(host),
                     mx=", ".join(self.policy.mx))
            return False
        log.warn("mta-sts {domain} (testing): MX host {host} is not in the policy (mx: "
                 "{mx}); enforce would not deliver to it", domain=self.domain,
                 host=safe(host), mx=", ".join(self.policy.mx))
        return True

    def refusal(self, host: str) -> Reply:
        """
        The deferral for an MX host the C{enforce} policy does not name.
        """
        mx = ", ".join(self.policy.mx) if self.policy is not None else ""
        return Reply(451, "4.7.0", f"MX host {host} is not allowed by the MTA-STS policy of "
                                   f"{self.domain} (mx: {mx})")

    def context(self, host: str, use_tls: bool, verified: bool) -> CheckingTLS | None:
        """
        The TLS context factory for an opportunistic session in C{testing}
        mode, which checks the certificate without refusing it; None for
        the courier's own.
        """
        if self.mode != "testing" or not use_tls or verified:
            return None
        return CheckingTLS(host, self.owner.trust_root)

    async def observe(self, host: str, ip: str, use_tls: bool, attempt: Awaitable[T],
                      checking: CheckingTLS | None = None) -> T:
        """
        Await the session C{attempt} and record its TLS outcome.
        """
        try:
            result = await attempt
        except BaseException as e:
            kind = classify(e)
            self.failure = None  # the last attempt's failure is the one to explain
            if kind is not None:
                self.failure = (kind, str(e).strip()[:200] or type(e).__name__)
                self._record(kind, host, ip)
                if self.mode == "testing":
                    self._would_refuse(host, ip, kind, self.failure[1])
            raise
        tls = getattr(result, "tls", False)
        if not use_tls or getattr(result, "reused", False):
            # Clear text on purpose (after a failed handshake), or a session
            # already counted when it was opened.
            return result
        if not tls:
            self._record("starttls-not-supported", host, ip)
            if self.mode == "testing":
                self._would_refuse(host, ip, "starttls-not-supported",
                                   "STARTTLS was not offered")
            return result
        problem = checking.problem() if checking is not None else None
        if problem is not None and checking is not None and checking.leaf is not None:
            self._record(problem[0], host, ip)
            self._would_refuse(host, ip, *problem)
        else:
            self._record("success", host, ip)
        return result

    def explain(self, reply: Reply) -> Reply:
        """
        A deferral of an C{enforce} delivery says that the MTA-STS policy
        required what failed, with a 4.7.x status when TLS failed.
        """
        if not self.enforce or reply.code < 400 or reply.code >= 500 or "MTA-STS" in reply.text:
            return reply
        text = f"{reply.text} (required by the MTA-STS policy of {self.domain})"
        if not reply.enhanced.startswith("4.7") and self.failure is not None:
            return Reply(reply.code, "4.7.5", f"{reply.text} ({self.failure[0]}; TLS with a "
                                              "verified certificate is required by the "
                                              f"MTA-STS policy of {self.domain})")
        if not reply.enhanced.startswith("4.7"):
            return reply
        return reply._replace(text=text)

    def _would_refuse(self, host: str, ip: str, kind: str, text: str) -> None:
        log.warn("mta-sts {domain} (testing): {host}[{ip}]: {kind}: {text}; enforce would "
                 "not deliver", domain=self.domain, host=safe(host), ip=ip, kind=kind,
                 text=safe(text))

    def _record(self, result: str, host: str, ip: str = "") -> None:
        reports = self.owner.reports
        if reports is None:
            return
        policy = self.policy
        if policy is None:
            reports.record(self.domain, result, receiving_mx=host, receiving_ip=ip)
            return
        lines = (("version: STSv1", f"mode: {policy.mode}")
                 + tuple(f"mx: {m}" for m in policy.mx) + (f"max_age: {policy.max_age}",))
        pattern = next((m for m in policy.mx
                        if mx_allowed(STSPolicy(policy.mode, (m,), 0), host)), "")
        reports.record(self.domain, result, "sts", policy.id, lines, pattern, host, ip)


class TLSPolicy:
    """
    MTA-STS and TLS reporting for the courier.

    @param sts: the L{MTASTSClient}, or None when MTA-STS is off.
    @param reports: where session outcomes are counted, or None.
    @param trust_root: the CAs verified TLS trusts (None: the system's).
    """

    def __init__(self, sts: MTASTSClient | None, reports: TLSReportLog | None = None,
                 trust_root: Any = None) -> None:
        self.sts = sts
        self.reports = reports
        self.trust_root = trust_root
        if sts is not None and reports is not None:
            sts.on_error = self.fetch_failed

    def fetch_failed(self, domain: str, kind: str, text: str) -> None:
        if self.reports is not None:
            self.reports.record(domain, kind, "sts")

    async def check(self, domain: str) -> DomainTLS:
        """
        The policy for one delivery to C{domain}; never raises.
        """
        policy = None
        if self.sts is not None:
            try:
                policy = await self.sts.policy(domain)
            except Exception:  # noqa: BLE001 - a bug here must not stop delivery
                log.failure("mta-sts {domain}: policy lookup failed", domain=safe(domain))
        return DomainTLS(self, domain, policy)


def build_tls_policy(config: Any, reactor: Any, resolver: Any, data_dir: str, pool: Any,
                     parent: Any) -> TLSPolicy:
    """
    The L{TLSPolicy} of a L{mailstack.service.MailStack}: C{--mta-sts},
    C{--tls-ca-file}, policies cached in C{DATA/mta-sts}, outcomes counted
    in C{DATA/tlsrpt} by a L{TLSReportLog} that runs under C{parent}.
    """
    from twisted.web.client import BrowserLikePolicyForHTTPS

    from mailstack.mailauth.lookup import DNSCache
    from mailstack.privileges import StartupError

    trust_root = None
    if config.tls_ca_file:
        try:
            trust_root = load_trust_root(config.tls_ca_file)
        except (OSError, ValueError) as e:
            raise StartupError(f"--tls-ca-file: {e}") from None
    reports = TLSReportLog(os.path.join(data_dir, "tlsrpt"), reactor, pool)
    reports.setServiceParent(parent)
    sts = None
    if config.mta_sts:
        https = BrowserLikePolicyForHTTPS(trustRoot=trust_root) if trust_root else None
        sts = MTASTSClient(reactor, DNSCache(resolver, reactor),
                           os.path.join(data_dir, "mta-sts"), tls=https)
    return TLSPolicy(sts, reports, trust_root)
