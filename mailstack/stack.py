# -*- test-case-name: tests.test_stack,tests.test_receivers,tests.test_reload -*-
"""
What the main process's L{mailstack.service.MailStack} and a receiver
process's L{mailstack.receivers.ReceiverStack} share: the user database and
router, Maildir delivery with its worker threads, TLS material, filters,
connection limits, DNS and the delivery plugins (L{StackBase}), and the
services they are built from.

Each mode adds its own parts in its own module, so neither carries the
other's branches and neither module imports the other.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.names.client import Resolver as DNSClient
from twisted.names.client import createResolver
from twisted.python.threadpool import ThreadPool

from mailstack.address import parse_address
from mailstack.config import Config
from mailstack.delivery.agents import build_agents
from mailstack.delivery.dispatch import Dispatcher
from mailstack.delivery.maildir import MaildirDeliveryAgent, MaildirStore, MaildirWriter
from mailstack.delivery.router import Router
from mailstack.interfaces import IAliasMap, IOutboundTransform, IUserDatabase
from mailstack.limits import ConnectionLimits, LimitedFactory, default_total, raise_nofile_limit
from mailstack.logs import quiet_dns
from mailstack.mailauth.builtin import builtin_filters, builtin_transforms
from mailstack.plugin import build_plugin
from mailstack.privileges import StartupError, check as check_data_dir, ensure_layout
from mailstack.proxy import ProxyHeaderFactory
from mailstack.reactors import IMailReactor
from mailstack.smtp.filters import FilteredPolicy, checked_injection, load_filters
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.tls import TLSMaterial
from mailstack.users import AliasMap

log = Logger()


class ThreadPoolService(Service):
    """
    Runs a C{ThreadPool} for the life of the service.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        if self.running:
            super().stopService()
            self.pool.stop()


class CannotListen(StartupError):
    """
    A listener could not bind its port at start (the reason, Twisted's
    C{CannotListenError}, is logged before).
    """


class Listener(StreamServerEndpointService):
    """
    A server endpoint that says in the log where it listens, once it does.
    """

    def __init__(self, label: str, endpoint: Any, factory: Any) -> None:
        super().__init__(endpoint, factory)
        self.label = label
        self.setName(label)
        self.port: IListeningPort | None = None
        self.listening: Deferred[IListeningPort] = Deferred()
        #: Called with this listener when its port cannot be bound (Twisted
        #: has logged why); L{StackBase} stops the server then.
        self.on_failure: Callable[[Listener], None] | None = None
        #: True once binding the port has failed.
        self.failed = False

    def privilegedStartService(self) -> None:
        """
        Bind the port.  Twisted's stream endpoints bind at once, so a port
        that cannot be bound is known here, while twistd starts the
        application: raise L{CannotListen} then, and twistd exits with
        status 1 (it has no other way to end with a failure status once
        its reactor runs).

        @raise CannotListen: the port could not be bound.
        """
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)
        if self.failed:
            raise CannotListen(f"{self.label}: cannot listen (the error is logged above)")

    def _listening(self, port: IListeningPort | None) -> IListeningPort | None:
        if port is None:
            # Twisted's own errback logged the failure (CannotListenError)
            # and handed on None: this listener will never listen.
            self.failed = True
            if self.on_failure is not None:
                self.on_failure(self)
            return None
        self.port = port
        address = port.getHost()
        where = (f"{address.host}:{address.port}"
                 if isinstance(address, (IPv4Address, IPv6Address))
                 else getattr(address, "name", address))
        if isinstance(where, bytes):
            where = where.decode("utf-8", "replace")
        log.info("{label} listening on {where}", label=self.label, where=where)
        self.listening.callback(port)
        return port


class UnprivilegedListener(Listener):
    """
    A listener that binds in L{startService}, after twistd's privilege
    drop, so that its socket file belongs to the service user.
    """

    def privilegedStartService(self) -> None:
        Service.privilegedStartService(self)

    def startService(self) -> None:
        Listener.privilegedStartService(self)
        Service.startService(self)


class StackBase(MultiService):
    """
    The parts of a mail system both kinds of process have, for one
    L{Config}; a subclass adds its queue, dispatcher and listeners.

    @ivar queue: where mail for remote recipients goes (set by the subclass).
    @ivar dispatcher: the L{Dispatcher} its policies deliver through (set by
        the subclass).
    """

    backlog = 1024
    queue: Any
    dispatcher: Dispatcher

    def __init__(self, config: Config, reactor: IMailReactor, resolver: Any = None) -> None:
        """
        @param config: the configuration.
        @param reactor: the reactor everything runs on.
        @param resolver: DNS for MX/A/AAAA lookups; by default from
            C{--dns-server} or the system's configuration.
        """
        super().__init__()
        self.config = config
        self.reactor = reactor
        data = os.path.abspath(config.data_dir)
        self.data_dir = data
        ensure_layout(data)

        # The user database is a plugin (--user-db: file, sqlite); one that
        # does not provide IAliasMap too has DATA/aliases beside it.
        self.users = build_plugin("user-db", config.user_db, config, reactor, IUserDatabase)
        self.aliases = self.users if IAliasMap.providedBy(self.users) else AliasMap(data)
        self.router = Router(config.domains, self.users, self.aliases,
                             parse_address(config.postmaster or
                                           f"postmaster@{config.domain[0]}"))

        # Durable writes: enough threads that fsyncs from concurrent sessions
        # overlap (the disk batches them); see mailstack.delivery.maildir.
        self.io_pool = ThreadPool(minthreads=2, maxthreads=8, name="mailstack-io")
        ThreadPoolService(self.io_pool).setServiceParent(self)
        self.store = MaildirStore(os.path.join(data, "mail"))
        self.maildir = MaildirDeliveryAgent(
            MaildirWriter(self.store, config.hostname), reactor, self.io_pool
        )
        self.tls = TLSMaterial.from_config(data, config.hostname, config.tls_cert,
                                           config.tls_key)
        self.spool_dir = os.path.join(data, "tmp")
        # Message filter plugins (--filter) stand in front of the SMTP policies.
        self.filters = load_filters(config, reactor)
        # Connection limits shared by every listener (mailstack.limits).
        nofile = raise_nofile_limit()
        total = (default_total(nofile) if config.max_connections is None
                 else config.max_connections)
        self.limits = ConnectionLimits(config.max_client_connections, total,
                                       config.connection_limit_exempt + config.relay_networks)
        log.info("open files limit {nofile}: at most {total} connections, {per} per client",
                 nofile=nofile, total=total or "unlimited",
                 per=config.max_client_connections or "unlimited")

        if resolver is None:
            if config.dns_server:
                resolver = DNSClient(servers=[config.dns_server], reactor=reactor)
            else:
                resolver = createResolver()
        self.resolver = resolver
        quiet_dns()

        self.transforms = [build_plugin("transform", name, config, reactor, IOutboundTransform)
                           for name in config.transform]
        # Mail authentication, built in: DKIM signing last among the
        # transforms; SPF/DKIM/DMARC first among the receiving MTA's filters.
        self.transforms += builtin_transforms(config, reactor, lambda: self.config)
        self.smtp_filters = builtin_filters(config, reactor, resolver,
                                            lambda: self.config) + self.filters
        self.agents = build_agents(config, reactor)

    def filtered(self, policy: Any, filters: Any = None) -> Any:
        filters = self.filters if filters is None else filters
        return FilteredPolicy(policy, filters, self.reactor) if filters else policy

    def plug_in(self, dispatcher: Dispatcher) -> None:
        """
        The plugins that act on every message: outbound transforms, the
        filters' check of locally injected mail, delivery agents.
        """
        dispatcher.transforms = self.transforms
        dispatcher.agents = self.agents
        dispatcher.hostname = self.config.hostname  # for reports on injected mail
        if self.filters:
            dispatcher.inject_check = checked_injection(
                FilteredPolicy(None, self.filters, self.reactor))

    def limited(self, factory: Any, kind: str, label: str) -> LimitedFactory:
        """
        C{factory} under the shared connection limits; C{kind} says which
        protocol's words refuse a connection over them.
        """
        return LimitedFactory(factory, self.limits, kind, label, self.reactor,
                              self.config.hostname)

    def smtp_factory(self, policy: Any, name: str, implicit_tls: bool = False
                     ) -> SMTPServerFactory:
        settings = ServerSettings(
            hostname=self.config.hostname,
            max_message_size=self.config.max_message_size,
            timeout=self.config.smtp_timeout,
            min_data_rate=self.config.smtp_min_data_rate,
            implicit_tls=implicit_tls,
            name=name,
            postmaster_domain=self.config.domain[0],
        )
        factory = SMTPServerFactory(policy, settings, self.reactor, self.spool_dir,
                                    tls=None if implicit_tls else self.tls.context_factory,
                                    blocking=self.blocking)
        factory.resolver = self.resolver  # the client's confirmed name, for the logs
        return factory

    def blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        """
        Run C{f(*args)} in the I/O thread pool.
        """
        return deferToThreadPool(self.reactor, self.io_pool, f, *args)

    def listen(self, label: str, description: str, factory: Any,
               kind_of_listener: type[Listener] = Listener) -> Listener:
        if description.lower().startswith("haproxy:"):
            # Our own PROXY reader: the session starts once the header gave
            # the client's address (mailstack.proxy), not before.
            description = description[len("haproxy:"):]
            factory = ProxyHeaderFactory(factory, self.reactor, label)
        kind = description.split(":", 1)[0].lower()
        if kind in ("tcp", "tcp6", "unix") and "backlog=" not in description:
            # Twisted's default backlog (50) overflows when many clients
            # connect at once; the clients then wait out SYN retries.
            description += f":backlog={self.backlog}"
        endpoint = serverFromString(self.reactor, description)
        listener = kind_of_listener(label, endpoint, factory)
        listener.on_failure = lambda _: self.cannot_listen(label, description)
        listener.setServiceParent(self)
        return listener

    def cannot_listen(self, label: str, description: str) -> None:
        """
        A listener could not bind its port (in use, not permitted): stop
        the server, as Postfix's master does, rather than run without it.
        """
        log.critical("{label}: cannot listen on {description} (the error is logged above); "
                     "stopping", label=label, description=description)
        self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self) -> Deferred[None]:
        """
        Stop listening and let running deliveries finish before the thread
        pools they need go away.
        """
        if not self.running:
            return succeed(None)
        Service.stopService(self)
        services = list(self)
        pools = [s for s in services if isinstance(s, ThreadPoolService)]
        others = [maybeDeferred(s.stopService) for s in reversed(services) if s not in pools]
        d = DeferredList(others)

        def stop_pools(_: Any) -> None:
            for pool in pools:
                pool.stopService()

        return d.addCallback(stop_pools)

    def startService(self) -> None:
        try:
            check_data_dir(self.data_dir, (self.tls.cert_path, self.tls.key_path))
        except StartupError as e:
            log.critical("cannot start: {error}", error=e)
            raise
        super().startService()
