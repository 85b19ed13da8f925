# -*- test-case-name: tests.test_mailauth_checks -*-
"""
Every inbound check for one message, and what the policy makes of it.

L{Authenticator.authenticate} runs SPF (MAIL FROM and HELO) and DKIM at
once, then DMARC from their results, and returns L{AuthResults}, whose
L{AuthResults.header} is the one C{Authentication-Results} field to
prepend.  L{policy_verdict} is a pure function from those results and the
site's options to what the server should do; DNS failures never lead to a
rejection.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import dkim
from twisted.internet.defer import Deferred, gatherResults
from twisted.python.threadpool import ThreadPool
from twisted.internet.threads import deferToThreadPool

from mailstack.mailauth.dkim import DKIMResult, parse_header, verify_dkim
from mailstack.mailauth.dmarc import DMARCResult, check_dmarc
from mailstack.mailauth.lookup import DNSCache
from mailstack.mailauth.results import authentication_results
from mailstack.mailauth.spf import SPFResult, check_spf, helo_checkable
from mailstack.reactors import IMailReactor


@dataclass(frozen=True)
class AuthResults:
    authserv_id: str
    spf: SPFResult | None
    helo_spf: SPFResult | None
    dkim: tuple[DKIMResult, ...]
    dmarc: DMARCResult

    def header(self) -> bytes:
        """
        The C{Authentication-Results:} field, LF line endings.
        """
        spf = [r for r in (self.spf, self.helo_spf) if r is not None]
        return authentication_results(self.authserv_id, spf, self.dkim, self.dmarc)


class Authenticator:
    """
    Checks inbound mail.  One per server: it keeps the DNS cache.

    @param authserv_id: the name in our C{Authentication-Results} fields
        (the server's C{--hostname}).
    @param resolver: a C{twisted.names} resolver.
    @param threadpool: where DKIM hashing and signature checks run (the
        reactor's by default).
    @param timeout: seconds one DNS lookup may take.
    @param sample: C{() -> [0, 1)}, for DMARC's C{pct}.
    """

    def __init__(self, authserv_id: str, resolver: Any, reactor: IMailReactor,
                 threadpool: ThreadPool | None = None,
                 timeout: float = 10.0, sample: Callable[[], float] = random.random) -> None:
        self.authserv_id = authserv_id
        self.reactor = reactor
        self.threadpool = threadpool
        self.cache = DNSCache(resolver, reactor, timeout)
        self.sample = sample

    async def authenticate(self, message: bytes, client_ip: str, helo: str,
                           mail_from: str) -> AuthResults:
        """
        Check C{message}, received from C{client_ip} after C{HELO helo} and
        C{MAIL FROM:<mail_from>} (empty for a null sender).
        """
        # The header is parsed once, in a worker thread (a hostile one may
        # be megabytes long); a malformed one is for each check to judge.
        threadpool = self.threadpool or self.reactor.getThreadPool()
        try:
            headers = await deferToThreadPool(self.reactor, threadpool, parse_header, message)
        except dkim.MessageFormatError:
            headers = None
        checks: list[Deferred[Any]] = [
            Deferred.fromCoroutine(verify_dkim(message, self.cache, self.reactor,
                                               self.threadpool, headers=headers))]
        helo_ok = helo_checkable(helo)
        if helo_ok:
            checks.append(Deferred.fromCoroutine(
                check_spf(self.cache, client_ip, "", helo, self.authserv_id)))
        if mail_from:
            checks.append(Deferred.fromCoroutine(
                check_spf(self.cache, client_ip, mail_from, helo, self.authserv_id)))
        done = await gatherResults(checks, consumeErrors=True)
        dkim_results = tuple(done[0])
        helo_spf: SPFResult | None = done[1] if helo_ok else None
        spf: SPFResult | None = done[-1] if mail_from else None
        if spf is not None:
            spf_domain, spf_result = spf.domain, spf.result
        elif helo_spf is not None:
            spf_domain, spf_result = helo_spf.domain, helo_spf.result
        else:
            spf_domain, spf_result = "", "none"
        dmarc = await check_dmarc(self.cache, message, spf_domain, spf_result, dkim_results,
                                  self.sample, headers)
        return AuthResults(self.authserv_id, spf if mail_from else None, helo_spf,
                           dkim_results, dmarc)


@dataclass(frozen=True)
class PolicyOptions:
    """
    What the site does with the results.  Defaults: honour DMARC
    C{p=reject} and C{p=quarantine}; do not reject on SPF C{fail} alone
    (forwarded mail fails SPF and may still pass DMARC through DKIM).
    """

    dmarc_reject: bool = True
    dmarc_quarantine: bool = True
    spf_fail_reject: bool = False
    junk_folder: str = "Junk"


@dataclass(frozen=True)
class Verdict:
    """
    C{action}: C{accept}, C{reject} (with C{code}, C{enhanced}, C{text})
    or C{quarantine} (deliver into C{folder}).
    """

    action: str
    code: int = 250
    enhanced: str = ""
    text: str = ""
    folder: str | None = None
    reasons: tuple[str, ...] = field(default=())


def policy_verdict(results: AuthResults, options: PolicyOptions = PolicyOptions()) -> Verdict:
    """
    What to do with a message given its results.  A C{temperror} anywhere
    never rejects; only a DMARC C{fail} whose disposition is C{reject}
    (550 5.7.1) or C{quarantine} (into Junk), or with C{spf_fail_reject} an
    SPF C{fail} of the MAIL FROM (550 5.7.23, RFC 7372), changes the
    outcome.
    """
    dmarc = results.dmarc
    if dmarc.result == "fail" and dmarc.disposition == "reject" and options.dmarc_reject:
        return Verdict("reject", 550, "5.7.1",
                       f"Message rejected by the DMARC policy of {dmarc.from_domain}",
                       reasons=("dmarc=fail p=reject",))
    spf = results.spf
    if options.spf_fail_reject and spf is not None and spf.result == "fail":
        return Verdict("reject", 550, "5.7.23",
                       f"SPF of {spf.domain} does not allow this host to send its mail",
                       reasons=("spf=fail",))
    if (dmarc.result == "fail" and dmarc.disposition in ("quarantine", "reject")
            and options.dmarc_quarantine):
        return Verdict("quarantine", folder=options.junk_folder,
                           reasons=(f"dmarc=fail p={dmarc.disposition}",))
    return Verdict("accept")
