# -*- test-case-name: tests.test_filters -*-
"""
Message filters in front of an SMTP policy.

Filters are plugins (L{IMessageFilterFactory} in C{mailstack.plugins}),
enabled by name with C{--filter}; the built-in ones use the same API.  At
connect, MAIL and RCPT the policy decides first (so no filter spends work
on a client or recipient mailstack refuses anyway) and the filters after,
in the order given; at DATA the filters run before the message is made
durable.  The first refusal wins and is logged with the filter's name.
"""

from __future__ import annotations

from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Sequence

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface import implementer

from mailstack import plugins
from mailstack.address import Address
from mailstack.interfaces import IMessageFilter, IMessageFilterFactory
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool
from mailstack.plugin import Verdict, check_folder, header_lines
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply, SMTPError

log = Logger()


def available_filters() -> dict[str, Any]:
    """
    Every filter plugin installed, by name.
    """
    return {factory.name: factory for factory in getPlugins(IMessageFilterFactory, plugins)}


def load_filters(config: Any, reactor: IMailReactor) -> list[Any]:
    """
    The filters C{--filter} names, built; an unknown name is an error.

    @param config: the running configuration, handed as it is to each
        filter's factory (the filters need no more of it than C{filter}).
    """
    if not config.filter:
        return []
    from mailstack.plugin import build_plugin
    return [build_plugin("filter", name, config, reactor, IMessageFilter)
            for name in config.filter]


@implementer(IMessageFilter)
class MessageFilter:
    """
    A base for filters (L{mailstack.interfaces.IMessageFilter}): no
    objection anywhere; override what you check.

    @ivar name: the filter's name, for log lines.
    """

    name = "unnamed"

    def connect(self, session: Any) -> Any:
        return None

    def mail(self, session: Any, sender: Address | None) -> Any:
        return None

    def rcpt(self, session: Any, sender: Address | None, rcpt: Address) -> Any:
        return None

    def data(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Any:
        return None


TEMPFAIL = Reply(451, "4.7.1", "Error: the message could not be checked, try again later")
CONNECT_TEMPFAIL = Reply(421, "4.7.1", "Error: the connection could not be checked, "
                                       "try again later")
DEFAULT_TIMEOUT = 30.0


class _Discarded(Exception):
    """
    A filter asked for the message to be discarded.
    """


class FilteredPolicy:
    """
    An SMTP policy with filters; everything else is the policy's own.
    """

    def __init__(self, policy: Any, filters: Sequence[Any], clock: IReactorTime | None = None
                 ) -> None:
        self.policy = policy
        self.filters = tuple(filters)
        if clock is None:
            from twisted.internet import reactor
            clock = reactor
        self.clock: IReactorTime = clock

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    async def _ask(self, f: Any, stage: str, session: Any, *args: Any) -> Any:
        """
        One filter's answer, within its time limit; a filter that raises
        or runs out of time is a logged tempfail.
        """
        timeout = getattr(f, "timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT
        qid = args[0].queue_id if stage == "data" else "-"
        try:
            d = maybeDeferred(getattr(f, stage), session, *args).addCallback(_await_coroutine)
            d.addTimeout(timeout, self.clock)
            verdict = await d
        except SMTPError as e:
            return e.reply
        except (CancelledError, TimeoutError):
            log.error("{qid}: {client}: filter {name} gave no answer at {stage} within "
                      "{timeout}s; {reply}", qid=qid, client=session.client, name=f.name,
                      stage=stage.upper(), timeout=timeout, reply=TEMPFAIL)
            return TEMPFAIL
        except Exception:  # noqa: BLE001 - any failure of a plugin tempfails
            log.failure("{qid}: {client}: filter {name} failed at {stage}; {reply}",
                        qid=qid, client=session.client, name=f.name, stage=stage.upper(),
                        reply=TEMPFAIL)
            return TEMPFAIL
        if verdict is None:
            return None
        if isinstance(verdict, Reply):
            verdict = Verdict(reply=verdict)
        if not isinstance(verdict, Verdict):
            log.error("{client}: filter {name} answered {verdict!r} at {stage}; {reply}",
                      client=session.client, name=f.name, verdict=verdict,
                      stage=stage.upper(), reply=TEMPFAIL)
            return TEMPFAIL
        if verdict.reply is not None and verdict.reply.code < 400:
            log.error("{client}: filter {name} answered {code} at {stage}, not a refusal; "
                      "{reply}", client=session.client, name=f.name, code=verdict.reply.code,
                      stage=stage.upper(), reply=TEMPFAIL)
            return TEMPFAIL
        if stage != "data" and (verdict.headers or verdict.folder or verdict.discard
                                or verdict.remove):
            log.error("{client}: filter {name}: header fields, folder and discard are for "
                      "DATA, not {stage}; {reply}", client=session.client, name=f.name,
                      stage=stage.upper(), reply=TEMPFAIL)
            return TEMPFAIL
        if stage != "data":
            return verdict.reply
        return verdict

    async def _verdict(self, stage: str, session: Any, *args: Any) -> Reply | None:
        for f in self.filters:
            verdict = await self._ask(f, stage, session, *args)
            if verdict is TEMPFAIL and stage == "connect":
                verdict = CONNECT_TEMPFAIL  # a greeting's 4xx is 421 (RFC 5321 3.1)
            if verdict is not None:
                log.info("{client}: filter {name} refused at {stage}: {code} {enhanced} {text}",
                         client=session.client, name=f.name, stage=stage.upper(),
                         code=verdict.code, enhanced=safe(verdict.enhanced),
                         text=safe(verdict.text))
                return verdict
        return None

    async def check_data(self, session: Any, envelope: Envelope,
                         spool: MessageSpool) -> Reply | None:
        """
        Run every filter on a whole message and apply the verdicts: header
        fields prepended, a folder recorded on the envelope.  Returns a
        refusal, or raises L{_Discarded}; C{None} to deliver.
        """
        headers: list[bytes] = []
        for f in self.filters:
            verdict = await self._ask(f, "data", session, envelope, spool)
            if verdict is None:
                continue
            if isinstance(verdict, Reply):  # a tempfail of ours
                return verdict
            try:
                headers.append(header_lines(verdict.headers))
                folder = check_folder(verdict.folder) if verdict.folder else None
                if verdict.remove and verdict.reply is None:
                    spool.remove_header_fields(verdict.remove)
            except (ValueError, IndexError, TypeError) as e:
                log.error("{qid}: filter {name}: {error}; {reply}", qid=envelope.queue_id,
                          name=f.name, error=e, reply=TEMPFAIL)
                return TEMPFAIL
            if verdict.reply is not None:
                reply = verdict.reply
                log.info("{qid}: filter {name} refused at DATA from {client}: {code} "
                         "{enhanced} {text}", qid=envelope.queue_id, client=session.client,
                         name=f.name, code=reply.code, enhanced=reply.enhanced,
                         text=reply.text)
                return reply
            if verdict.discard:
                log.info("{qid}: discard: filter {name}: {reason}; from=<{sender}> "
                         "nrcpt={n}", qid=envelope.queue_id, name=f.name,
                         reason=verdict.reason or "no reason given",
                         sender=envelope.sender or "", n=len(envelope.rcpts))
                raise _Discarded()
            if folder and envelope.folder is None:
                envelope.folder = folder
                log.info("{qid}: filter {name}: into folder {folder}", qid=envelope.queue_id,
                         name=f.name, folder=folder)
        if headers:
            spool.prepend_header(b"".join(headers))
        return None

    def connect(self, session: Any) -> Deferred[Reply | None]:
        async def run() -> Reply | None:
            refusal = await maybeDeferred(self.policy.connect, session)
            return refusal or await self._verdict("connect", session)
        return Deferred.fromCoroutine(run())

    def mail(self, session: Any, sender: Address | None) -> Deferred[Reply | None]:
        async def run() -> Reply | None:
            refusal = await maybeDeferred(self.policy.mail, session, sender)
            if refusal is not None and refusal.is_error:
                return refusal
            return await self._verdict("mail", session, sender) or refusal
        return Deferred.fromCoroutine(run())

    def rcpt(self, session: Any, envelope: Envelope, rcpt: Address) -> Deferred[Any]:
        async def run() -> Any:
            resolution = await maybeDeferred(self.policy.rcpt, session, envelope, rcpt)
            refusal = await self._verdict("rcpt", session, envelope.sender, rcpt)
            if refusal is not None:
                raise SMTPError(refusal.code, refusal.enhanced, refusal.text)
            return resolution
        return Deferred.fromCoroutine(run())

    def deliver(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Deferred[Any]:
        async def run() -> Any:
            try:
                refusal = await self.check_data(session, envelope, spool)
            except _Discarded:
                return None
            if refusal is not None:
                raise SMTPError(refusal.code, refusal.enhanced, refusal.text)
            return await maybeDeferred(self.policy.deliver, session, envelope, spool)
        return Deferred.fromCoroutine(run())


def _await_coroutine(result: Any) -> Any:
    """
    A filter method that is an C{async def} returns a coroutine: run it.
    """
    if isinstance(result, Coroutine):
        return Deferred.fromCoroutine(result)
    return result


@dataclass
class LocalSession:
    """
    What filters see for locally injected mail (C{mailstack sendmail}),
    in place of a L{mailstack.smtp.server.Session}.

    @ivar user: who injected it, C{uid=N user=NAME}.
    @ivar service: always C{local}.
    """

    user: Any
    service: str = "local"
    peer_host: str = "127.0.0.1"
    peer_port: int = 0
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_info: str = ""

    @property
    def client(self) -> str:
        return f"local[{self.user}]"


def checked_injection(filtered: FilteredPolicy) -> Any:
    """
    The dispatcher's hook for locally injected mail: the filters' verdict,
    as an L{SMTPError} for a refusal, C{False} for a discard.
    """
    async def check(envelope: Envelope, spool: MessageSpool, user: Any) -> bool:
        try:
            refusal = await filtered.check_data(LocalSession(user), envelope, spool)
        except _Discarded:
            return False
        if refusal is not None:
            raise SMTPError(refusal.code, refusal.enhanced, refusal.text)
        return True
    return check
