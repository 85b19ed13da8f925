# -*- test-case-name: tests.test_receiving,tests.test_reload,tests.test_tap -*-
"""
A L{Config} becomes a running mail system: one L{MailStack} MultiService
holding the listeners and the worker pools.  The reactor is passed in, so
tests can run the whole thing in-process on port 0.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.threadpool import ThreadPool

from mailstack.access.imap import IMAPFactory
from mailstack.access.pop3 import POP3Factory
from mailstack.access.realm import make_portal
from mailstack.address import parse_address
from mailstack.auth import PasswordChecker
from mailstack.config import Config
from mailstack.delivery.dispatch import Dispatcher
from mailstack.delivery.pickup import Pickup, PokeFactory
from mailstack.delivery.maildrop import pickup_path
from mailstack.queue.control import ControlFactory, control_path
from mailstack.queue.courier import Courier
from mailstack.queue.runner import OutboundQueue
from mailstack.queue.store import QueueStore
from mailstack.queue.tlspolicy import build_tls_policy
from mailstack.smtp.client import Timeouts
from mailstack.reactors import IMailReactor
from mailstack.receivers import ReceiverPool
from mailstack.delivery.agents import AgentCourier
from mailstack.smtp.policy import ReceivingPolicy
from mailstack.smtp.submission import SubmissionPolicy
from mailstack.stack import StackBase, ThreadPoolService, UnprivilegedListener
from mailstack.throttle import LoginThrottle
from mailstack.tls import ReloadingContextFactory
from mailstack.wellknown import listener_ports, make_site

log = Logger()


class MailStack(StackBase):
    """
    The whole mail system for one L{Config}, in the main process: the
    queue, the maildrop pickup, every listener and, with C{--receivers N},
    the receiver processes (L{mailstack.receivers}).
    """

    def __init__(
        self,
        config: Config,
        reactor: IMailReactor,
        resolver: Any = None,
        relay_endpoint: Any = None,
        relay_port: int = 25,
        relay_timeouts: Timeouts = Timeouts(),
        clock: IReactorTime | None = None,
    ) -> None:
        """
        @param resolver: DNS for MX/A/AAAA lookups; by default from
            C{--dns-server} or the system's configuration.
        @param relay_endpoint: C{(ip, port) -> endpoint}, for tests.
        @param relay_port: the SMTP port of remote hosts (25; tests change it).
        @param clock: the queue's clock (the reactor; tests pass a Clock).
        """
        super().__init__(config, reactor, resolver)
        data = self.data_dir
        resolver = self.resolver
        self.receiver_pool: ReceiverPool | None = None

        # MTA-STS and TLS reporting for the courier (mailstack.queue.tlspolicy).
        self.tls_policy = build_tls_policy(config, reactor, resolver, data, self.io_pool, self)
        self.courier = Courier(reactor, resolver, config.hostname, config.route,
                               port=relay_port, timeouts=relay_timeouts,
                               endpoint=relay_endpoint, require_tls=config.require_tls,
                               relay_auth=config.relay_auth,
                               bind_addresses=config.smtp_bind_address,
                               trust_root=self.tls_policy.trust_root,
                               tls_policy=self.tls_policy)
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
                self.receiver_pool = ReceiverPool(self, config.receivers - 1)
                self.receiver_pool.setServiceParent(self)
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
        # --http, --https: the MTA-STS policy and client autoconfiguration.
        if config.http is not None or config.https is not None:
            site = make_site(lambda: self.config.domain, config.hostname,
                             lambda: listener_ports(self), reactor)
            if config.http is not None:
                self.listen("http", config.http, self.limited(site, "http", "http"))
            if config.https is not None:
                self.listen("https", config.https, TLSMemoryBIOFactory(
                    ReloadingContextFactory(self.tls), False,
                    self.limited(site, "http", "https")))

    def bounce(self, sender: str, report: bytes) -> Deferred[str]:
        """
        Send a delivery status notification from the null sender.
        """
        return self.dispatcher.inject(None, [parse_address(sender)], report, client="bounce")

    def startService(self) -> None:
        log.info("mailstack starting; configuration from {source}:",
                 source=self.config.source)
        for line in self.config.describe():
            log.info("  {line}", line=line)
        super().startService()
