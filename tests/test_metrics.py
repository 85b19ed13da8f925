"""
C{--metrics}: a real server's Prometheus endpoint, scraped with a real
HTTP client after real SMTP traffic.
"""

import os
import smtplib
import ssl
import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from twisted.trial.unittest import SynchronousTestCase

from mailstack import tally
from mailstack.config import ConfigError, build_config
from mailstack.config import metrics_endpoint
from tests.processes import Twistd
from tests.support import fast_hash, short_tempdir
from tests.test_relay import closed_port


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        content_type = response.headers["Content-Type"]
        text = response.read().decode("utf-8")
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            samples[key] = sample.value
    return content_type, samples


class MetricsTests(SynchronousTestCase):
    def test_scrape_after_traffic(self):
        """
        Received, delivered, deferred, rejected, failed logins, sessions,
        TLS, the delay histogram and the queue gauges count what happened.
        """
        data = short_tempdir(self)
        from mailstack.address import local_address
        from mailstack.users import UserDatabase
        UserDatabase(data).add(local_address("alice@localhost"), fast_hash("secret"))
        server = Twistd(["--data-dir", data, "--hostname", "mx.test",
                         "--smtp", "tcp:0:interface=127.0.0.1",
                         "--submission", "tcp:0:interface=127.0.0.1",
                         "--metrics", "tcp:0", "--relay-networks", "127.0.0.0/8",
                         "--route", f"remote.test=127.0.0.1:{closed_port()}",
                         "--submissions", "none", "--imap", "none", "--imaps", "none",
                         "--pop3", "none"])
        self.addCleanup(server.stop)
        ports = server.ports("smtp", "submission", "metrics")
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
            client.sendmail("x@example.org", ["alice@localhost"], b"Subject: a\r\n\r\nx\r\n")
            with self.assertRaises(smtplib.SMTPRecipientsRefused):
                client.sendmail("x@example.org", ["nobody@localhost"], b"Subject: b\r\n\r\nx\r\n")
            client.sendmail("x@example.org", ["bob@remote.test"], b"Subject: c\r\n\r\nx\r\n")
        context = ssl.create_default_context(cafile=os.path.join(data, "tls", "cert.pem"))
        with smtplib.SMTP("localhost", ports["submission"], timeout=30) as client:
            client.starttls(context=context)
            with self.assertRaises(smtplib.SMTPAuthenticationError):
                client.login("alice@localhost", "wrong")
        server.wait_for(r"to=<bob@remote\.test> .*status=deferred")
        server.wait_for("SASL LOGIN authentication failed")

        content_type, samples = scrape(ports["metrics"])
        self.assertTrue(content_type.startswith("text/plain; version="), content_type)

        def value(name, **labels):
            return samples.get((name, tuple(sorted(labels.items()))))

        self.assertEqual(value("mailstack_messages_received_total", service="smtp", tls="no"),
                         2)
        self.assertEqual(value("mailstack_deliveries_total", status="sent", relay="local"), 1)
        self.assertEqual(value("mailstack_deliveries_total", status="deferred",
                               relay="remote"), 1)
        self.assertEqual(value("mailstack_delivery_delay_seconds_count", relay="local"), 1)
        self.assertEqual(value("mailstack_rejections_total", stage="RCPT", code="550 5.1.1"), 1)
        # smtplib tries PLAIN, then LOGIN: two failed logins.
        self.assertEqual(value("mailstack_auth_failures_total", service="submission"), 2)
        self.assertEqual(value("mailstack_sessions_total", listener="smtp"), 1)
        self.assertEqual(value("mailstack_tls_sessions_total", listener="submission"), 1)
        self.assertEqual(value("mailstack_queue_messages"), 1)
        self.assertGreater(value("mailstack_queue_oldest_message_seconds"), 0)
        self.assertIn(("mailstack_sessions_open", (("listener", "smtp"),)), samples)
        server.wait_for(r"metrics listening on 127\.0\.0\.1:")


class ObserverTests(SynchronousTestCase):
    def test_outbound_tls_and_local_delivery(self):
        """
        The observer counts what mailstack's own log calls say: an outbound
        TLS session, a refused filter; a delivery's log line is not counted
        (the delivery is, by L{tally}: never twice).
        """
        from twisted.logger import Logger

        from mailstack.metrics import Metrics

        stack = type("Stack", (), {"queue": None, "__iter__": lambda self: iter(())})()
        metrics = Metrics(stack, None)
        log = Logger(observer=metrics)
        log.info("{kind} TLS connection established to {ip}:{port}", kind="Untrusted",
                 ip="192.0.2.1", port=25)
        log.info("{qid}: to=<{to}> relay=local delay={delay:.2f} dsn=2.0.0 "
                 "status=sent (delivered to maildir)", qid="A" * 12, to="a@b.test", delay=0.3)
        log.info("{client}: filter {name} refused at {stage}: {code} {enhanced} {text}",
                 client="x", name="greylist", stage="rcpt", code=451, enhanced="4.7.1",
                 text="later")
        text = metrics.render().decode()
        self.assertIn('mailstack_tls_sessions_total{listener="outbound"} 1.0', text)
        self.assertNotIn('mailstack_deliveries_total{', text)
        self.assertIn('mailstack_rejections_total{code="451 4.7.1",stage="RCPT"} 1.0', text)
        self.assertIn("mailstack_queue_messages 0.0", text)


class TallyTests(SynchronousTestCase):
    def test_direct_counters(self):
        """
        The events on every message's path are counted by direct calls
        while the metrics service runs, whatever the log says; not before
        or after.
        """
        from mailstack.metrics import Metrics, MetricsObserver

        stack = type("Stack", (), {"queue": None, "__iter__": lambda self: iter(())})()
        metrics = Metrics(stack, None)
        service = MetricsObserver(metrics)
        tally.received("smtp", False)
        service.startService()
        try:
            tally.received("smtp", False)
            tally.received("submissions", True)
            tally.delivery("sent", "local", 0.3)
            tally.delivery("deferred", "remote")
            tally.session("smtp")
            tally.session("submissions")
        finally:
            service.stopService()
        tally.delivery("sent", "local", 0.3)
        text = metrics.render().decode()
        for line in ('mailstack_messages_received_total{service="smtp",tls="no"} 1.0',
                     'mailstack_messages_received_total{service="submissions",tls="yes"} 1.0',
                     'mailstack_deliveries_total{relay="local",status="sent"} 1.0',
                     'mailstack_deliveries_total{relay="remote",status="deferred"} 1.0',
                     'mailstack_delivery_delay_seconds_bucket{le="0.5",relay="local"} 1.0',
                     'mailstack_sessions_total{listener="smtp"} 1.0',
                     'mailstack_tls_sessions_total{listener="submissions"} 1.0'):
            self.assertIn(line, text)
        self.assertNotIn('mailstack_tls_sessions_total{listener="smtp"}', text)
        self.assertNotIn('mailstack_delivery_delay_seconds_count{relay="remote"}', text)


class EndpointTests(SynchronousTestCase):
    def test_off_by_default_and_loopback(self):
        """
        No metrics unless asked; a port or an endpoint without an interface
        listens on loopback; an explicit interface is kept.
        """
        self.assertIsNone(build_config({}).metrics)
        self.assertEqual(metrics_endpoint("9125"), "tcp:9125:interface=127.0.0.1")
        self.assertEqual(metrics_endpoint("tcp:9125"), "tcp:9125:interface=127.0.0.1")
        self.assertEqual(metrics_endpoint("tcp:9125:interface=192.0.2.1"),
                         "tcp:9125:interface=192.0.2.1")
        self.assertIsNone(metrics_endpoint("none"))
        with self.assertRaises(ConfigError):
            build_config({"metrics": "http://x"})
