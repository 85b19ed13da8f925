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

from typing import Any, Sequence

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.plugin import getPlugins
from zope.interface import implementer

from mailstack import plugins
from mailstack.address import Address
from mailstack.config import Config, ConfigError
from mailstack.interfaces import IMessageFilter, IMessageFilterFactory
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool
from mailstack.smtp.reply import Reply, SMTPError

log = Logger()


def available_filters() -> dict[str, Any]:
    """
    Every filter plugin installed, by name.
    """
    return {factory.name: factory for factory in getPlugins(IMessageFilterFactory, plugins)}


def load_filters(config: Config, reactor: Any) -> list[Any]:
    """
    The filters C{--filter} names, built; an unknown name is an error.
    """
    if not config.filter:
        return []
    found = available_filters()
    filters = []
    for name in config.filter:
        if name not in found:
            known = ", ".join(sorted(found)) or "none installed"
            raise ConfigError(f"--filter: no filter plugin named {name!r} (available: {known})")
        built = found[name].build(config, reactor)
        if not IMessageFilter.providedBy(built):
            raise ConfigError(f"--filter {name}: the plugin did not build an IMessageFilter")
        filters.append(built)
        log.info("filter {name} enabled: {description}", name=name,
                 description=found[name].description)
    return filters


@implementer(IMessageFilter)
class MessageFilter:
    """
    A base for filters: no objection anywhere; override what you check.
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


class FilteredPolicy:
    """
    An SMTP policy with filters; everything else is the policy's own.
    """

    def __init__(self, policy: Any, filters: Sequence[Any]) -> None:
        self.policy = policy
        self.filters = tuple(filters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)

    async def _verdict(self, stage: str, session: Any, *args: Any) -> Reply | None:
        for f in self.filters:
            try:
                verdict = await maybeDeferred(getattr(f, stage), session, *args)
            except SMTPError as e:
                verdict = e.reply
            if verdict is not None:
                if not isinstance(verdict, Reply) or verdict.code < 400:
                    raise TypeError(f"filter {f.name} answered {verdict!r} at {stage}")
                log.info("{client}: filter {name} refused at {stage}: {code} {enhanced} {text}",
                         client=session.client, name=f.name, stage=stage.upper(),
                         code=verdict.code, enhanced=safe(verdict.enhanced),
                         text=safe(verdict.text))
                return verdict
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
            refusal = await self._verdict("data", session, envelope, spool)
            if refusal is not None:
                raise SMTPError(refusal.code, refusal.enhanced, refusal.text)
            return await maybeDeferred(self.policy.deliver, session, envelope, spool)
        return Deferred.fromCoroutine(run())
