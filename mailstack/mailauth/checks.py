# -*- test-case-name: tests.test_mailauth_wiring -*-
"""
SPF, DKIM and DMARC of received mail, as the built-in message filter
C{auth-checks} (L{mailstack.interfaces.IMessageFilter}) of the receiving
MTA, on by default (C{--auth-checks yes}).

At the end of DATA, for mail from the internet (the C{smtp} service, no
AUTH, a client outside C{--relay-networks}), it runs
L{mailstack.mailauth.verify.Authenticator} and answers with a
L{mailstack.plugin.Verdict}: the C{Authentication-Results} fields that
carry our authserv-id (C{--hostname}) removed (RFC 8601 5), one of ours
added, and what the policy (L{mailstack.mailauth.verify.policy_verdict})
makes of the results: C{550 5.7.1} for a DMARC C{p=reject} failure, the
C{Junk} folder for C{p=quarantine}, C{550 5.7.23} for an SPF C{fail} when
asked.  Forged fields with our authserv-id are removed from every message
of the receiving MTA, checked or not.

DNS goes through the server's resolver (C{--dns-server} or the system's),
asynchronously, each lookup within L{LOOKUP_TIMEOUT} and all checks of a
message within L{DEADLINE}; what did not answer in time is C{temperror},
which never refuses mail.  An unexpected error in the checks is logged
and the message delivered with C{temperror} results (fail open, as
postscreen and OpenDMARC do), never refused or deferred over it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import IMessageFilter
from mailstack.logsafe import safe
from mailstack.mailauth.dkim import DKIMResult
from mailstack.mailauth.dmarc import DMARCResult, organizational_domain
from mailstack.mailauth.results import authentication_results, authserv_id, remove_ours
from mailstack.mailauth.spf import SPFResult
from mailstack.mailauth.verify import AuthResults, Authenticator, PolicyOptions, policy_verdict
from mailstack.message import Envelope, MessageSpool
from mailstack.plugin import Verdict
from mailstack.smtp.reply import Reply

log = Logger()

#: Seconds one DNS lookup may take.
LOOKUP_TIMEOUT = 10.0
#: Seconds all the checks of one message may take together.
DEADLINE = 30.0


def policy_options(config: Any) -> PolicyOptions:
    """
    The policy options of a L{mailstack.config.Config}.
    """
    return PolicyOptions(dmarc_reject=config.dmarc_reject,
                         dmarc_quarantine=config.dmarc_quarantine,
                         spf_fail_reject=config.spf_fail_reject)


def _ours(fields: list[bytes], our_id: str) -> tuple[int, ...]:
    found = []
    for index, field in enumerate(fields):
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"authentication-results" and authserv_id(value) == our_id:
            found.append(index)
    return tuple(found)


@implementer(IMessageFilter)
class AuthChecksFilter:
    """
    The C{auth-checks} filter.

    @param config: returns the running L{mailstack.config.Config}: its
        host name (the authserv-id), relay networks and policy options.
    @param resolver: a C{twisted.names} resolver.
    @param reactor: the reactor (time limits; the thread pool where DKIM
        hashing and the reading of spilled messages run).
    """

    name = "auth-checks"
    #: Whether clients on a loopback address are checked: no, they are this
    #: host's own programs (the tests that stand in for the internet from
    #: 127.0.0.1 turn it on).
    check_loopback = False
    timeout = DEADLINE + 30.0  # beyond our own deadline: reading the message

    def __init__(self, config: Callable[[], Any], resolver: Any, reactor: Any,
                 threadpool: Any = None, deadline: float = DEADLINE) -> None:
        self.config = config
        self.reactor = reactor
        self.threadpool = threadpool
        self.deadline = deadline
        self.authserv_id = config().hostname.lower()
        self.authenticator = Authenticator(self.authserv_id, resolver, reactor, threadpool,
                                           timeout=LOOKUP_TIMEOUT)
        organizational_domain("example.org")  # loads the Public Suffix List now, not in DATA

    def connect(self, session: Any) -> None:
        return None

    def mail(self, session: Any, sender: Any) -> None:
        return None

    def rcpt(self, session: Any, sender: Any, rcpt: Any) -> None:
        return None

    def checked(self, session: Any) -> bool:
        """
        Whether mail of this session is checked: from the internet, that is
        the receiving MTA, no AUTH, a client outside the relay networks and
        not on a loopback address (this host's own programs: nothing to
        authenticate, and with no DNS each message would wait for its
        lookups to time out).
        """
        if session.service != "smtp" or session.user is not None:
            return False
        try:
            ip = ipaddress.ip_address(session.peer_host)
        except ValueError:
            return True
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_loopback and not self.check_loopback:
            return False
        return not any(ip in network for network in self.config().relay_networks)

    async def data(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Any:
        if session.service != "smtp":
            return None
        forged = _ours(spool.header_fields(), self.authserv_id)
        if not self.checked(session):
            return Verdict(remove=forged) if forged else None
        threadpool = self.threadpool or self.reactor.getThreadPool()
        message = await deferToThreadPool(self.reactor, threadpool, self._read, spool)
        sender = str(envelope.sender) if envelope.sender is not None else ""
        d = Deferred.fromCoroutine(self.authenticator.authenticate(
            message, session.peer_host, session.helo or "", sender))
        deadline = self.reactor.callLater(self.deadline, d.cancel)
        results: AuthResults | None = None
        try:
            results = await d
        except Exception:  # noqa: BLE001 - fail open: a bug must not refuse or defer mail
            if deadline.active():
                log.failure("{qid}: auth-checks failed; temperror", qid=envelope.queue_id)
            else:
                log.warn("{qid}: auth-checks: no result within {deadline}s; temperror",
                         qid=envelope.queue_id, deadline=self.deadline)
        finally:
            if deadline.active():
                deadline.cancel()
        if results is None:
            header = self._temperror(sender, session.helo or "")
            log.info("{qid}: auth: temperror", qid=envelope.queue_id)
            return Verdict(headers=(header.rstrip(b"\n"),), remove=forged)
        verdict = policy_verdict(results, policy_options(self.config()))
        log.info("{qid}: auth: spf={spf} dkim={dkim} dmarc={dmarc} header.from={domain} "
                 "policy={policy} action={action}", qid=envelope.queue_id,
                 spf=results.spf.result if results.spf else "none",
                 dkim=",".join(r.result for r in results.dkim) or "none",
                 dmarc=results.dmarc.result, domain=safe(results.dmarc.from_domain or "-"),
                 policy=results.dmarc.policy, action=verdict.action)
        header = results.header().rstrip(b"\n")
        if verdict.action == "reject":
            return Verdict(reply=Reply(verdict.code, verdict.enhanced, verdict.text))
        return Verdict(headers=(header,), remove=forged,
                       folder=verdict.folder if verdict.action == "quarantine" else None)

    def _read(self, spool: MessageSpool) -> bytes:
        """
        The message as it will be delivered: without the fields claiming
        our authserv-id (in a worker thread: it may be 25 MiB on disk).
        """
        return remove_ours(spool.read(), self.authserv_id)

    def _temperror(self, sender: str, helo: str) -> bytes:
        reason = "the checks did not finish"
        spf = SPFResult("temperror", "mailfrom" if sender else "helo",
                        sender.rpartition("@")[2] or helo, sender or f"postmaster@{helo}",
                        reason)
        return authentication_results(self.authserv_id, [spf],
                                      [DKIMResult("temperror", reason=reason)],
                                      DMARCResult("temperror", reason=reason))


__all__ = ["AuthChecksFilter", "DEADLINE", "LOOKUP_TIMEOUT", "policy_options"]
