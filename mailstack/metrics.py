# -*- test-case-name: tests.test_metrics -*-
"""
C{--metrics ENDPOINT}: Prometheus metrics over HTTP at C{/metrics}, in the
text format of C{prometheus-client}.  Off by default; an endpoint without
an interface listens on loopback only (C{--metrics 9125} is
C{tcp:9125:interface=127.0.0.1}).

The counters of the events on every message's path (a message received,
a delivery's outcome, an SMTP session) are told directly by the code where
they happen (L{mailstack.tally}); the rarer ones (a refusal, a login
failure, TLS, IMAP and POP3 sessions) are counted by a log observer from
the fields of the events mailstack logs.  Gauges (queue
size and age, open SMTP sessions) are read when scraped.

The metrics and their labels::

    =========================================  =====================================
    metric                                     labels
    =========================================  =====================================
    mailstack_messages_received_total          service (smtp, submission, ...,
                                               local, bounce), tls (yes, no)
    mailstack_deliveries_total                 status (sent, deferred, bounced,
                                               expired), relay (local, remote)
    mailstack_delivery_delay_seconds           relay; histogram of arrival to
                                               delivery, delivered mail only
    mailstack_rejections_total                 stage (CONNECT, MAIL, RCPT, DATA),
                                               code (e.g. ``550 5.1.1``)
    mailstack_auth_failures_total              service (submission, imap, pop3)
    mailstack_sessions_total                   listener
    mailstack_sessions_open                    listener
    mailstack_tls_sessions_total               listener (STARTTLS/STLS, implicit TLS;
                                               ``outbound`` for deliveries)
    mailstack_queue_messages                   (none)
    mailstack_queue_oldest_message_seconds     (none)
    =========================================  =====================================
"""

from __future__ import annotations

import re
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, globalLogPublisher
from twisted.web.http import Request
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from mailstack import tally
from mailstack.clock import wall_seconds
from mailstack.reactors import IMailReactor

DELAY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600,
                 86400, float("inf"))
_CODE = re.compile(r"^(\d{3})(?: (\d\.\d{1,3}\.\d{1,3}))?")


@implementer(ILogObserver)
class Metrics:
    """
    The metrics of one L{MailStack}, in a registry of their own.
    """

    def __init__(self, stack: Any, clock: IReactorTime) -> None:
        self.stack = stack
        self.clock = clock
        self.registry = registry = CollectorRegistry()
        self.received = Counter("mailstack_messages_received", "Messages accepted",
                                ["service", "tls"], registry=registry)
        self.deliveries = Counter("mailstack_deliveries", "Delivery outcomes per recipient",
                                  ["status", "relay"], registry=registry)
        self.delay = Histogram("mailstack_delivery_delay_seconds",
                               "Arrival to delivery, per delivered recipient", ["relay"],
                               buckets=DELAY_BUCKETS, registry=registry)
        self.rejections = Counter("mailstack_rejections", "Refused SMTP commands",
                                  ["stage", "code"], registry=registry)
        self.auth_failures = Counter("mailstack_auth_failures", "Failed logins",
                                     ["service"], registry=registry)
        self.sessions = Counter("mailstack_sessions", "Connections accepted", ["listener"],
                                registry=registry)
        self.tls_sessions = Counter("mailstack_tls_sessions", "Sessions that used TLS",
                                    ["listener"], registry=registry)
        self.open = Gauge("mailstack_sessions_open", "Open sessions", ["listener"],
                          registry=registry)
        Gauge("mailstack_queue_messages", "Messages in the outbound queue",
              registry=registry).set_function(lambda: len(self._records()))
        Gauge("mailstack_queue_oldest_message_seconds",
              "Age of the oldest message in the outbound queue",
              registry=registry).set_function(self._oldest)
        self.implicit_tls = {"submissions", "imaps"}

    def _records(self) -> dict[str, Any]:
        return getattr(self.stack.queue, "records", {}) or {}

    def _oldest(self) -> float:
        records = self._records()
        if not records:
            return 0.0
        return max(0.0, wall_seconds(self.clock) - min(r.arrival for r in records.values()))

    def _smtp_open(self) -> None:
        from mailstack.reload import smtp_factories

        for factory in smtp_factories(self.stack):
            self.open.labels(factory.settings.name).set(
                sum(1 for s in factory.sessions if not s._closed))

    def render(self) -> bytes:
        self._smtp_open()
        return generate_latest(self.registry)

    # The direct counters (L{mailstack.tally})

    def count_received(self, service: str, tls: bool) -> None:
        self.received.labels(service, "yes" if tls else "no").inc()

    def count_delivery(self, status: str, relay: str, delay: float | None) -> None:
        self.deliveries.labels(status, relay).inc()
        if status == "sent" and delay is not None:
            self.delay.labels(relay).observe(delay)

    def count_session(self, listener: str) -> None:
        self.sessions.labels(listener).inc()
        if listener in self.implicit_tls:
            self.tls_sessions.labels(listener).inc()

    # The log observer, for the rarer events

    def __call__(self, event: dict[str, Any]) -> None:
        try:
            self._observe(event)
        except Exception:  # noqa: BLE001, S110 - no logging from inside a log observer
            pass  # a metric must never break logging

    def _observe(self, event: dict[str, Any]) -> None:
        fmt = event.get("log_format")
        if not isinstance(fmt, str):
            return
        if "reject: " in fmt or "refused at {stage}" in fmt:
            stage = str(event.get("stage") or fmt.split("reject: ", 1)[-1].split(" ", 1)[0])
            reply = event.get("reply")
            if reply is not None and hasattr(reply, "code"):
                code = f"{reply.code} {reply.enhanced}".strip()
            elif reply is not None and (logged := _CODE.match(str(reply))):
                # The reply as logged (escaped text): "550 5.1.1 ..."
                code = " ".join(g for g in logged.groups() if g)
            elif "code" in event:
                code = f"{event['code']} {event.get('enhanced', '')}".strip()
            elif "SIZE=" in fmt:
                code = "552 5.3.4"
            elif "not owned by" in fmt:
                code = "553 5.7.1"
            elif "routed address" in fmt:
                code = "553 5.1.3"
            else:
                match = _CODE.match(str(event.get("reason", "")))
                code = " ".join(g for g in match.groups() if g) if match else "other"
            self.rejections.labels(stage.upper(), code).inc()
        elif "authentication failed" in fmt:
            self.auth_failures.labels("submission").inc()
        elif fmt in ("imap: failed login for {user} from {client}",
                     "pop3: failed login for {user} from {client}",
                     "pop3: failed login from {client}"):
            self.auth_failures.labels(fmt[:4]).inc()
        elif fmt in ("imap: connect from {client}", "pop3: connect from {client}"):
            self.sessions.labels(fmt[:4]).inc()
            self.open.labels(fmt[:4]).inc()
        elif fmt in ("imap: disconnect from {client}", "pop3: disconnect from {client}"):
            self.open.labels(fmt[:4]).dec()
        elif fmt in ("STARTTLS from {client} ({service})",):
            self.tls_sessions.labels(str(event["service"])).inc()
        elif fmt in ("imap: STARTTLS from {client}", "pop3: STLS from {client}"):
            self.tls_sessions.labels(fmt[:4]).inc()
        elif fmt == "{kind} TLS connection established to {ip}:{port}":
            self.tls_sessions.labels("outbound").inc()


class MetricsPage(Resource):
    isLeaf = True

    def __init__(self, metrics: Metrics) -> None:
        super().__init__()
        self.metrics = metrics

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode("ascii"))
        return self.metrics.render()


class MetricsObserver(Service):
    """
    Feeds L{Metrics} from the log while the service runs.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def startService(self) -> None:
        super().startService()
        globalLogPublisher.addObserver(self.metrics)
        tally.add(self.metrics)

    def stopService(self) -> None:
        super().stopService()
        globalLogPublisher.removeObserver(self.metrics)
        tally.remove(self.metrics)


class _QuietSite(Site):
    def log(self, request: Request) -> None:
        pass  # scrapes every 15 s are not mail events


def site(metrics: Metrics) -> Site:
    root = Resource()
    root.putChild(b"metrics", MetricsPage(metrics))
    factory = _QuietSite(root)
    factory.noisy = False
    return factory


def install(stack: Any, reactor: IMailReactor) -> Metrics | None:
    """
    With C{--metrics}, give a L{MailStack} its metrics and their listener.
    """
    endpoint = stack.config.metrics
    if endpoint is None:
        return None
    metrics = Metrics(stack, reactor)
    MetricsObserver(metrics).setServiceParent(stack)
    stack.listen("metrics", endpoint, site(metrics))
    return metrics
