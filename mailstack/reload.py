# -*- test-case-name: tests.test_reload -*-
"""
Signals, as a postmaster uses them: SIGHUP re-reads the configuration,
SIGTERM (and SIGINT) drain.

SIGHUP reads the configuration file again (the command line still wins
over it) and applies what can change under running sessions: local
domains, routes, relay credentials, C{--require-tls}, relay networks, the
retry schedule and queue lifetime, the message size limit, the SMTP
timeout, the TLS certificate files, and the DMARC and SPF policy options
(C{--dmarc-reject}, C{--dmarc-quarantine}, C{--spf-fail-reject}).  New
sessions see the new values; running ones keep what they started with.  A change that needs new
sockets, processes or threads (listeners, the data directory, the host
name, DNS server, filters, receivers) is logged as needing a restart and
not applied.  A file that does not parse, or TLS files that do not load,
leave the running configuration untouched, with a log line saying why.

On SIGTERM, L{Drain} stops the SMTP listeners at once (with everything
else), tells idle SMTP sessions C{421 4.3.2} and waits up to
C{--shutdown-grace} seconds for sessions in a transaction (between MAIL
and the reply to the final dot) to finish theirs; then the rest are cut.
"""

from __future__ import annotations

import dataclasses
import signal
from collections.abc import Callable, Iterator
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mailstack.config import OPTIONS, Config, ConfigError
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply
from mailstack.smtp.server import SMTPServerFactory
from mailstack.tls import TLSMaterial

log = Logger()

RELOADABLE = frozenset({
    "domain", "route", "relay-auth", "require-tls", "retry-schedule", "max-queue-lifetime",
    "max-message-size", "relay-networks", "smtp-timeout", "tls-cert", "tls-key",
    "smtp-bind-address", "dmarc-reject", "dmarc-quarantine", "spf-fail-reject",
})
# What a receiver process (--receivers) was started with: on a change they
# are restarted, each finishing its sessions first, while the main process
# keeps accepting.
RECEIVER_SETTINGS = frozenset({"domain", "relay-networks", "max-message-size", "smtp-timeout",
                               "tls-cert", "tls-key", "dmarc-reject", "dmarc-quarantine",
                               "spf-fail-reject"})


def smtp_factories(stack: Any) -> Iterator[SMTPServerFactory]:
    """
    The SMTP server factories of a L{MailStack}'s listeners (inside TLS
    wrappers too).
    """
    for service in stack:
        factory = getattr(service, "factory", None)
        while factory is not None and not isinstance(factory, SMTPServerFactory):
            factory = getattr(factory, "wrappedFactory", None)
        if factory is not None:
            yield factory


def _differences(old: Config, new: Config) -> list[str]:
    return [o.name for o in OPTIONS if getattr(old, o.attribute) != getattr(new, o.attribute)]


def apply(stack: Any, new: Config) -> tuple[list[str], list[str]]:
    """
    Apply C{new} to a running L{MailStack}: returns (applied option names,
    names that need a restart).  Raises L{ConfigError} and changes nothing
    if a new value cannot be used (TLS files that do not load).
    """
    old: Config = stack.config
    changed = _differences(old, new)
    applied = [name for name in changed if name in RELOADABLE]
    restart = [name for name in changed if name not in RELOADABLE]
    if not applied:
        return applied, restart
    material = None
    if "tls-cert" in applied or "tls-key" in applied:
        try:
            material = TLSMaterial.from_config(stack.data_dir, old.hostname, new.tls_cert,
                                               new.tls_key)
        except Exception as e:  # noqa: BLE001 - OSError, PEM or key errors alike
            raise ConfigError(f"the new TLS files do not load: {e}") from None
    credentials = None
    if "relay-auth" in applied:
        try:
            credentials = {a.host: (a.user, a.password()) for a in new.relay_auth}
        except OSError as e:
            raise ConfigError(f"cannot read a relay password file: {e}") from None

    # Nothing below can fail.
    stack.router.domains = new.domains
    courier = getattr(stack, "courier", None)
    if courier is not None:
        courier.routes = {r.domain: r for r in new.route}
        courier.require_tls = frozenset(new.require_tls)
        courier.bind_addresses = tuple(new.smtp_bind_address)
        if credentials is not None:
            courier.credentials = credentials
    queue = stack.queue
    if hasattr(queue, "schedule"):
        queue.schedule = tuple(new.retry_schedule)
        queue.lifetime = new.max_queue_lifetime
    for factory in smtp_factories(stack):
        factory.settings = dataclasses.replace(
            factory.settings, max_message_size=new.max_message_size, timeout=new.smtp_timeout)
        policy = getattr(factory.policy, "policy", factory.policy)  # inside FilteredPolicy
        if hasattr(policy, "relay_networks"):
            policy.relay_networks = tuple(new.relay_networks)
    for service in stack:
        listening = getattr(service, "factory", None)
        while listening is not None and not hasattr(listening, "max_message_size"):
            listening = getattr(listening, "wrappedFactory", None)  # inside TLS (imaps)
        if listening is not None:
            listening.max_message_size = new.max_message_size  # IMAP APPEND
    if material is not None:
        stack.tls.cert_path, stack.tls.key_path = material.cert_path, material.key_path
        stack.tls.load()
    stack.config = dataclasses.replace(
        old, source=new.source,
        **{o.attribute: getattr(new, o.attribute) for o in OPTIONS if o.name in applied})
    receivers = [name for name in applied if name in RECEIVER_SETTINGS]
    if receivers and old.receivers > 1:
        pool = getattr(stack, "receiver_pool", None)
        if pool is not None:
            log.info("reload: restarting the receiver processes for {names}; their "
                     "sessions finish first", names=", ".join(receivers))
            pool.restart()
    return applied, restart


def reload(stack: Any, load: Callable[[], Config]) -> bool:
    """
    Re-read the configuration with C{load} and apply it, logging what
    changed and what needs a restart; on any error keep the old one.
    """
    log.info("SIGHUP: reloading the configuration from {source}", source=stack.config.source)
    try:
        new = load()
        applied, restart = apply(stack, new)
    except ConfigError as e:
        log.error("reload failed, keeping the running configuration: {error}", error=e)
        return False
    lines = stack.config.describe()
    for name in applied:
        line = next(x for x in lines if x.startswith(name + " = "))
        log.info("reload: changed {line}", line=line)
    for name in restart:
        # twisted.logger.Logger's method is warn (not logging's warning).
        log.warn("reload: {name} changed; it takes effect after a restart",  # noqa: G010
                 name=name)
    if not applied and not restart:
        log.info("reload: nothing changed")
    # Users, aliases and TLS files are re-read when they change anyway.
    stack.users.entries()
    stack.aliases.entries()
    stack.tls.context_factory()
    return True


class SignalService(Service):
    """
    Installs the SIGHUP handler while running (the reactor's own handlers
    take SIGTERM and SIGINT).
    """

    def __init__(self, stack: Any, reactor: IReactorFromThreads,
                 load: Callable[[], Config]) -> None:
        self.stack = stack
        self.reactor = reactor
        self.load = load
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hup)

    def _hup(self, signum: int, frame: Any) -> None:
        self.reactor.callFromThread(reload, self.stack, self.load)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None


def _in_transaction(session: Any) -> bool:
    return bool(session.envelope is not None or session._data is not None
                or session._busy)


class Drain(Service):
    """
    At stop: idle SMTP sessions get C{421 4.3.2} and are closed; sessions
    in a transaction are given C{grace} seconds to finish it.
    """

    poll = 0.1

    def __init__(self, stack: Any, clock: IReactorTime, grace: float = 30.0) -> None:
        self.stack = stack
        self.clock = clock
        self.grace = grace

    def _sessions(self) -> list[Any]:
        return [s for f in smtp_factories(self.stack) for s in list(getattr(f, "sessions", ()))
                if not s._closed]

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if not self._sessions():
            return succeed(None)
        done: Deferred[None] = Deferred()
        deadline = self.clock.seconds() + self.grace
        waiting = sum(1 for s in self._sessions() if _in_transaction(s))
        log.info("shutting down: {n} SMTP session(s) in a transaction, waiting up to "
                 "{grace:.0f}s", n=waiting, grace=self.grace)

        def check() -> None:
            sessions = self._sessions()
            for session in sessions:
                if not _in_transaction(session):
                    session._send(Reply(421, "4.3.2",
                                        f"{session.settings.hostname} shutting down"))
                    session._close()
            busy = [s for s in sessions if _in_transaction(s)]
            if busy and self.clock.seconds() >= deadline:
                log.warn(  # noqa: G010
                    "shutting down: cutting {n} SMTP session(s) still in a transaction",
                    n=len(busy))
                for session in busy:
                    session.transport.abortConnection()
                busy = []
            if not busy:
                loop.stop()
                done.callback(None)

        loop = LoopingCall(check)
        loop.clock = self.clock
        loop.start(self.poll, now=True)
        return done


def install(stack: Any, reactor: IMailReactor, load: Callable[[], Config]) -> None:
    """
    Give a L{MailStack} its SIGHUP reload and its SIGTERM drain.
    """
    SignalService(stack, reactor, load).setServiceParent(stack)
    Drain(stack, reactor, stack.config.shutdown_grace).setServiceParent(stack)


__all__ = ["Drain", "SignalService", "apply", "install", "reload"]
