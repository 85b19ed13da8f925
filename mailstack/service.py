# -*- test-case-name: tests.test_receiving,tests.test_reload,tests.test_tap -*-
"""
A L{Config} becomes a running mail system: one L{MailStack} MultiService
holding the listeners and the worker pools.  The reactor is passed in, so
tests can run the whole thing in-process on port 0.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.threads import deferToThreadPool
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger
from twisted.names.client import Resolver as DNSClient
from twisted.names.client import createResolver
from twisted.protocols.policies import WrappingFactory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailstack.access.imap import IMAPFactory
from mailstack.access.pop3 import POP3Factory
from mailstack.access.realm import make_portal
from mailstack.address import parse_address
from mailstack.auth import PasswordChecker
from mailstack.config import Config
from mailstack.delivery.maildir import MaildirDeliveryAgent, MaildirStore, MaildirWriter
from mailstack.delivery.dispatch import Dispatcher
from mailstack.delivery.pickup import Pickup, PokeFactory
from mailstack.limits import ConnectionLimits, LimitedFactory, default_total, raise_nofile_limit
from mailstack.proxy import ProxyHeaderFactory
from mailstack.delivery.router import Router
from mailstack.logs import quiet_dns
from mailstack.mua.sendmail import pickup_path
from mailstack.privileges import StartupError, check as check_data_dir, ensure_layout
from mailstack.queue.control import ControlFactory, control_path
from mailstack.queue.courier import Courier
from mailstack.queue.handoff import QueueHandoff
from mailstack.queue.runner import OutboundQueue
from mailstack.queue.store import QueueStore
from mailstack.smtp.client import Timeouts
from mailstack.receivers import AdoptedPort, ReceiverPool
from mailstack.delivery.agents import AgentCourier, build_agents
from mailstack.interfaces import IAliasMap, IOutboundTransform, IUserDatabase
from mailstack.plugin import build_plugin
from mailstack.plugins.mailauth import builtin_filters, builtin_transforms
from mailstack.smtp.filters import FilteredPolicy, checked_injection, load_filters
from mailstack.smtp.policy import ReceivingPolicy
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.smtp.submission import SubmissionPolicy
from mailstack.throttle import LoginThrottle
from mailstack.tls import ReloadingContextFactory, TLSMaterial
from mailstack.users import AliasMap

log = Logger()


class ThreadPoolService(Service):
    """
    Runs a L{ThreadPool} for the life of the service.
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

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._waitingForPort.addCallback(self._listening)

    def _listening(self, port: IListeningPort) -> IListeningPort:
        self.port = port
        address = port.getHost()
        where = (f"{address.host}:{address.port}" if hasattr(address, "port")
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


class MailStack(MultiService):
    """
    The whole mail system for one L{Config}.
    """

    backlog = 1024

    def __init__(
        self,
        config: Config,
        reactor: Any,
        resolver: Any = None,
        relay_endpoint: Any = None,
        relay_port: int = 25,
        relay_timeouts: Timeouts = Timeouts(),
        clock: Any = None,
        receiver: tuple[int, int] | None = None,
    ) -> None:
        """
        @param receiver: C{(fd, address family)} of an inherited listening
            socket: this is a receiver process (C{--receivers}), serving
            only the receiving MTA on that socket and handing remote mail
            to the main process's queue.
        @param resolver: DNS for MX/A/AAAA lookups; by default from
            C{--dns-server} or the system's configuration.
        @param relay_endpoint: C{(ip, port) -> endpoint}, for tests.
        @param relay_port: the SMTP port of remote hosts (25; tests change it).
        @param clock: the queue's clock (the reactor; tests pass a Clock).
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

        if receiver is not None:
            self.queue: OutboundQueue | QueueHandoff = QueueHandoff(
                QueueStore(os.path.join(data, "queue")), data, reactor, self.io_pool)
            self.dispatcher = Dispatcher(self.router, self.maildir, self.queue, reactor,
                                         self.spool_dir)
            self.plug_in(self.dispatcher)
            policy = self.filtered(ReceivingPolicy(self.dispatcher, config.relay_networks),
                                   self.smtp_filters)
            factory: WrappingFactory = self.limited(self.smtp_factory(policy, "smtp"), "smtp",
                                                    "smtp")
            if (config.smtp or "").lower().startswith("haproxy:"):
                factory = ProxyHeaderFactory(factory, reactor, "smtp")
            AdoptedPort(reactor, *receiver, factory).setServiceParent(self)
            return

        self.courier = Courier(reactor, resolver, config.hostname, config.route,
                               port=relay_port, timeouts=relay_timeouts,
                               endpoint=relay_endpoint, require_tls=config.require_tls,
                               relay_auth=config.relay_auth,
                               bind_addresses=config.smtp_bind_address)
        courier: Any = self.courier
        if self.agents is not None:  # lmtp, pipe: run from the queue
            courier = AgentCourier(self.courier, self.agents, config.domains)
        self.queue = queue = OutboundQueue(
            QueueStore(os.path.join(data, "queue")), courier, reactor, clock or reactor,
            self.io_pool,
            config.retry_schedule, config.max_queue_lifetime, config.hostname)
        queue.setServiceParent(self)
        self.dispatcher = Dispatcher(self.router, self.maildir, self.queue, reactor,
                                     self.spool_dir)
        self.plug_in(self.dispatcher)
        queue.bounce_to = self.bounce
        self.pickup = Pickup(data, self.dispatcher, reactor, self.io_pool, config.hostname,
                             config.max_message_size)
        self.pickup.setServiceParent(self)
        # Endpoint syntax: a ':' or '\' in the data directory's path is escaped.
        escaped = control_path(data).replace("\\", "\\\\").replace(":", "\\:")
        self.listen("control", f"unix:{escaped}:mode=600:lockfile=1",
                    self.limited(ControlFactory(self.queue, self.pickup), "control", "control"),
                    UnprivilegedListener)
        escaped = pickup_path(data).replace("\\", "\\\\").replace(":", "\\:")
        self.listen("pickup", f"unix:{escaped}:mode=666:lockfile=1",
                    self.limited(PokeFactory(self.pickup), "pickup", "control"),
                    UnprivilegedListener)

        # Argon2 takes 64 MiB and tens of milliseconds per check: few threads.
        self.auth_pool = ThreadPool(minthreads=0, maxthreads=2, name="mailstack-auth")
        ThreadPoolService(self.auth_pool).setServiceParent(self)
        self.checker = PasswordChecker(self.users, reactor, self.auth_pool)
        self.throttle = LoginThrottle(reactor)

        if config.smtp is not None:
            policy = self.filtered(ReceivingPolicy(self.dispatcher, config.relay_networks),
                                   self.smtp_filters)
            self.listen("smtp", config.smtp,
                        self.limited(self.smtp_factory(policy, "smtp"), "smtp", "smtp"))
            if config.receivers > 1:
                ReceiverPool(self, config.receivers - 1).setServiceParent(self)
                queue.sweep_interval = 60.0
        submission = self.filtered(SubmissionPolicy(self.dispatcher, self.checker, self.throttle,
                                               reactor, config.hostname))
        if config.submission is not None:
            self.listen("submission", config.submission, self.limited(
                self.smtp_factory(submission, "submission"), "smtp", "submission"))
        if config.submissions is not None:
            factory = self.limited(self.smtp_factory(submission, "submissions", implicit_tls=True),
                                   "smtp", "submissions")
            self.listen("submissions", config.submissions, TLSMemoryBIOFactory(
                ReloadingContextFactory(self.tls), False, factory))
        # Reading mail: one portal for IMAP and POP3, with its own worker
        # threads, so deliveries (io_pool) never queue behind folder reads.
        self.access_pool = ThreadPool(minthreads=0, maxthreads=8, name="mailstack-access")
        ThreadPoolService(self.access_pool).setServiceParent(self)
        portal = make_portal(self.store, config.hostname, self.checker, reactor,
                             self.access_pool)
        if config.pop3 is not None:
            self.listen("pop3", config.pop3, self.limited(POP3Factory(
                portal, reactor, self.access_pool, self.throttle, tls=self.tls.context_factory),
                "pop3", "pop3"))
        if config.imap is not None:
            self.listen("imap", config.imap, self.limited(IMAPFactory(
                portal, reactor, self.throttle, self.tls.context_factory,
                config.max_message_size), "imap", "imap"))
        if config.imaps is not None:
            factory = self.limited(IMAPFactory(portal, reactor, self.throttle, None,
                                               config.max_message_size, implicit_tls=True),
                                   "imap", "imaps")
            self.listen("imaps", config.imaps, TLSMemoryBIOFactory(
                ReloadingContextFactory(self.tls), False, factory))

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
        if self.filters:
            dispatcher.inject_check = checked_injection(
                FilteredPolicy(None, self.filters, self.reactor))

    def bounce(self, sender: str, report: bytes) -> Deferred[str]:
        """
        Send a delivery status notification from the null sender.
        """
        return self.dispatcher.inject(None, [parse_address(sender)], report, client="bounce")

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
        listener.setServiceParent(self)
        return listener

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
        if not isinstance(self.queue, QueueHandoff):  # a receiver's settings are the main's
            log.info("mailstack starting; configuration from {source}:",
                     source=self.config.source)
            for line in self.config.describe():
                log.info("  {line}", line=line)
        try:
            check_data_dir(self.data_dir, (self.tls.cert_path, self.tls.key_path))
        except StartupError as e:
            log.critical("cannot start: {error}", error=e)
            raise
        super().startService()
