"""
Logs a postmaster can use: no DNS start/stop noise, a failed STARTTLS
handshake followed by clear text is logged, C{--require-tls} deferrals say
what happened with a 4.7.x status, and C{client=} is the forward-confirmed
reverse DNS name (or C{unknown}), with HELO apart.
"""

import io
import smtplib

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, ensureDeferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import (
    FilteringLogObserver,
    Logger,
    LogLevel,
    LogLevelFilterPredicate,
    LogPublisher,
    formatEvent,
    formatTime,
    globalLogPublisher,
    jsonFileLogObserver,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from twisted.names import client as dns_client
from twisted.names import dns
from twisted.names import server as dns_server
from twisted.trial.unittest import TestCase

from mailstack.logs import FastClassicText, fast_text, filter_noise
from mailstack.queue.courier import Courier
from mailstack.smtp.client import Timeouts
from mailstack.smtp.rdns import client_name
from mailstack.testing import FakeResolver
from tests.support import add_user, in_thread, short_tempdir, start_server
from tests.test_relay import Sink


def capture_log(testcase):
    """
    Every log event's text from now until the test ends.
    """
    lines = []

    def observe(event):
        text = formatEvent(event)
        if text:
            lines.append(text)

    globalLogPublisher.addObserver(observe)
    testcase.addCleanup(globalLogPublisher.removeObserver, observe)
    return lines


class DNSNoiseTests(TestCase):
    @inlineCallbacks
    def test_no_protocol_start_stop_lines(self):
        """
        Once a MailStack exists, DNS queries through Twisted's client log
        no "Starting protocol" / "Stopping protocol" lines.
        """
        dns.DNSDatagramProtocol.noisy = True  # Twisted's default
        yield start_server(self)
        fake = FakeResolver(mx={"remote.test": [(10, "mx.remote.test")]})
        protocol = dns.DNSDatagramProtocol(dns_server.DNSServerFactory(clients=[fake]))
        port = reactor.listenUDP(0, protocol, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        resolver = dns_client.Resolver(servers=[("127.0.0.1", port.getHost().port)],
                                       reactor=reactor)
        lines = capture_log(self)
        # What twistd mailstack does once its log is set up; undone after the
        # test, or trial's own observer stays wrapped (never removed) and every
        # later test in this process counts each logged error twice.
        self.addCleanup(unwrap_noise_filters)
        filter_noise()
        answers, _, _ = yield resolver.lookupMailExchange("remote.test")
        self.assertEqual(str(answers[0].payload.name), "mx.remote.test")
        noise = [line for line in lines if "DNSDatagramProtocol" in line or
                 "protocol" in line.lower() or "UDP Port" in line]
        self.assertEqual(noise, [])


def unwrap_noise_filters():
    """
    Undo L{filter_noise} on the global log publisher.
    """
    from mailstack.logs import NoiseFilter

    for observer in list(getattr(globalLogPublisher, "_observers", [])):
        if isinstance(observer, NoiseFilter):
            globalLogPublisher.removeObserver(observer)
            globalLogPublisher.addObserver(observer.observer)


class TLSLogTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.sink = Sink()
        yield self.sink.start(self)
        self.resolver = FakeResolver(mx={"remote.test": [(10, "mx1.remote.test")]},
                                     a={"mx1.remote.test": ["127.0.0.10"]})

    def deliver(self, require_tls=()):
        courier = Courier(reactor, self.resolver, "me.test", port=25,
                          timeouts=Timeouts(5, 5, 5, 5, 5),
                          endpoint=lambda ip, port: TCP4ClientEndpoint(
                              reactor, "127.0.0.1", self.sink.number, timeout=5),
                          require_tls=require_tls)
        self.addCleanup(courier.close_idle)
        return ensureDeferred(courier.deliver(
            "remote.test", "a@me.test", ["x@remote.test"],
            lambda: io.BytesIO(b"Subject: x\n\nhi\n"), 10))

    @inlineCallbacks
    def test_require_tls_deferral(self):
        """
        A --require-tls domain whose MX offers no STARTTLS is deferred with
        451 4.7.4 and a text saying TLS was not offered; nobody "said 530".
        """
        outcome = (yield self.deliver(["remote.test"]))["x@remote.test"]
        self.assertEqual(outcome.status, "deferred")
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.7.4"))
        self.assertEqual(outcome.reply.text, "TLS is required, but STARTTLS was not offered "
                                             "by mx1.remote.test[127.0.0.10]:25")
        self.assertNotIn("said", outcome.reply.text)

    @inlineCallbacks
    def test_deferral_status_class_follows_the_reply(self):
        """
        A remote's 4xx reply with a 5.x.x status (RFC 3463 forbids it) is
        recorded as a deferral with the 4.x.x status.
        """
        self.sink.policy.rcpt_replies = {"x@remote.test": (451, "5.7.1", "confused")}
        outcome = (yield self.deliver())["x@remote.test"]
        self.assertEqual(outcome.status, "deferred")
        self.assertEqual((outcome.reply.code, outcome.reply.enhanced), (451, "4.7.1"))
        self.assertIn("confused", outcome.reply.text)

    @inlineCallbacks
    def test_tls_delivery_logged(self):
        """
        A delivery over opportunistic TLS logs the TLS session.
        """
        from mailstack.tls import TLSMaterial, generate_self_signed
        directory = short_tempdir(self)
        cert, key = f"{directory}/c.pem", f"{directory}/k.pem"
        generate_self_signed("mx1.remote.test", cert, key)
        self.sink.port.factory.tls = TLSMaterial(cert, key).context_factory
        lines = capture_log(self)
        outcome = (yield self.deliver())["x@remote.test"]
        self.assertEqual(outcome.status, "sent")
        self.assertIn("Untrusted TLS connection established to 127.0.0.10:25", lines)

    @inlineCallbacks
    def test_failed_handshake_then_clear_text_is_logged(self):
        """
        If STARTTLS is offered but the handshake fails, the message goes in
        clear text to the same host, and the log says so twice: the failure
        and the clear-text delivery.
        """
        from mailstack.tls import TLSMaterial, generate_self_signed
        directory = short_tempdir(self)
        cert, key = f"{directory}/c.pem", f"{directory}/k.pem"
        generate_self_signed("mx1.remote.test", cert, key)
        material = TLSMaterial(cert, key)
        # A server that speaks only TLS 1.0: mailstack's client wants 1.2+.
        old = ssl.CertificateOptions(privateKey=material._options.privateKey,
                                     certificate=material._options.certificate,
                                     insecurelyLowerMinimumTo=ssl.TLSVersion.TLSv1_0,
                                     lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_0)
        self.sink.port.factory.tls = lambda: old
        lines = capture_log(self)
        outcome = (yield self.deliver())["x@remote.test"]
        self.assertEqual(outcome.status, "sent", (outcome.reply, lines))
        self.assertEqual(len(self.sink.policy.received), 1)
        failed = [line for line in lines if "STARTTLS handshake failed" in line]
        clear = [line for line in lines if "sent in clear text after a failed TLS" in line]
        self.assertEqual(len(failed), 1, lines)
        self.assertIn("mx1.remote.test[127.0.0.10]:25", failed[0])
        self.assertEqual(len(clear), 1, lines)
        self.assertIn("<x@remote.test>", clear[0])


class ClientNameTests(TestCase):
    @inlineCallbacks
    def session_log(self, resolver):
        # No SPF/DMARC lookups either: this is about the client's name.
        server = yield start_server(self, resolver=resolver,
                                    smtp="tcp:0:interface=127.0.0.1", auth_checks="no")
        add_user(server, "alice@localhost")
        lines = capture_log(self)

        def send(client):
            client.ehlo("i-am-google.test")
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: s\r\n\r\nx\r\n")

        def session():
            with smtplib.SMTP("127.0.0.1", server.ports["smtp"], timeout=30) as client:
                send(client)

        yield in_thread(session)
        return lines

    @inlineCallbacks
    def test_session_log(self):
        """
        A session's log names the client by its confirmed name (loopback
        is C{localhost}, as /etc/hosts says, without a DNS query) and logs
        the HELO name apart.
        """
        resolver = FakeResolver()
        lines = yield self.session_log(resolver)
        [line] = [line for line in lines if ": client=" in line]
        self.assertRegex(line, r": client=localhost\[127\.0\.0\.1\]:\d+ "
                               r"helo=<i-am-google\.test>$")
        self.assertTrue(any(x.startswith("connect from localhost[127.0.0.1]:")
                            for x in lines), lines)
        self.assertEqual(resolver.queries, [])


class ForwardConfirmedTests(TestCase):
    def name(self, resolver, ip):
        return self.successResultOf(client_name(resolver, ip))

    def test_confirmed(self):
        """
        A PTR name whose A (or AAAA) record gives the address back is the name.
        """
        resolver = FakeResolver(ptr={"192.0.2.7": ["Mail.Example.COM."],
                                     "2001:db8::7": ["v6.example.com"]},
                                a={"mail.example.com": ["192.0.2.9", "192.0.2.7"],
                                   "v6.example.com": ["2001:db8::7"]})
        self.assertEqual(self.name(resolver, "192.0.2.7"), "mail.example.com")
        self.assertEqual(self.name(resolver, "2001:db8::7"), "v6.example.com")

    def test_unconfirmed_or_failing_is_unknown(self):
        """
        No PTR, a PTR name that does not point back, a lookup that fails,
        or lookups past the deadline: C{unknown}, whatever the client says.
        """
        resolver = FakeResolver(ptr={"192.0.2.8": ["liar.example.com"]},
                                a={"liar.example.com": ["192.0.2.99"]},
                                missing={"7.2.0.192.in-addr.arpa"})
        self.assertEqual(self.name(resolver, "192.0.2.8"), "unknown")
        self.assertEqual(self.name(resolver, "192.0.2.9"), "unknown")
        self.assertEqual(self.name(resolver, "192.0.2.7"), "unknown")

        class Silent(FakeResolver):
            def _lookup(self, name, cls, type, timeout):
                return Deferred()

        clock = Clock()
        d = client_name(Silent(), "192.0.2.7", clock)
        clock.advance(9.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.assertEqual(self.successResultOf(d), "unknown")


class FastTextTests(TestCase):
    """
    L{fast_text}: the text log written with L{FastClassicText} is the text
    Twisted's own formatter writes, for every kind of event.
    """

    events = [
        {"log_format": "{qid}: from=<{sender}> size={size} nrcpt={n}", "qid": "4F2A9C",
         "sender": "a@b.test", "size": 1024, "n": 1},
        {"log_format": "delay={delay:.1f} {reply!r} {who.real}", "delay": 0.25,
         "reply": "250 ok", "who": 3},
        {"log_format": "two\nlines, ünïcode {x}", "x": "é\u2028", "log_system": "SMTP,1"},
        {"log_format": "a missing {field}"},
        {"log_format": "a call {f()}", "f": lambda: "called"},
        {"log_format": "", "x": 1},
        {"log_format": "bad spec {n:q}", "n": 1},
        {"log_format": "with a failure", "log_failure": Failure(ValueError("boom"))},
        {"log_format": "{x}", "x": "system is no text", "log_system": 42},
        {"message": ("legacy",), "log_format": None},
        {"log_format": "no time {x}", "x": 1, "log_time": None},
    ]

    def formatters(self):
        stream = io.StringIO()
        original = textFileLogObserver(stream)
        return original.formatEvent, FastClassicText(original.formatEvent)

    def test_same_text_as_twisted(self):
        original, fast = self.formatters()
        for i, base in enumerate(self.events):
            for when in (1700000000.0, 1700000000.999, 1700000001.5):
                event = dict(base, log_level=LogLevel.info, log_namespace="mailstack.x")
                event.setdefault("log_time", when)
                self.assertEqual(fast(dict(event)), original(dict(event)), (i, when))

    def test_plain_events_not_through_twisted(self):
        """
        A plain event is formatted without the original formatter; the
        others go to it.
        """
        fast = FastClassicText(lambda event: "original\n")
        plain = {"log_format": "{qid}: removed", "qid": "4F2A9C", "log_time": 1700000000.5}
        self.assertTrue(fast(plain).endswith(" [-#-] 4F2A9C: removed\n"))
        for other in ({"log_format": "{f()}", "f": str, "log_time": 1.0},
                      {"log_format": "{missing}", "log_time": 1.0},
                      {"log_format": "x", "log_time": 1.0, "log_failure": Failure(ValueError())}):
            self.assertEqual(fast(other), "original\n")

    def test_time_stamp_per_second(self):
        """
        The time stamp is cached for one second only.
        """
        original, fast = self.formatters()
        for when in (1700000000.2, 1700000000.9, 1700000001.0, 1700000059.99, 1700000060.0):
            event = {"log_format": "x", "log_time": when, "log_system": "-"}
            self.assertEqual(fast(event), original(event))
            self.assertIn(formatTime(when), fast(event))

    def test_installed_on_text_observers(self):
        """
        twistd's text observer, and twist's behind a level filter, get the
        fast formatter and write what they wrote before.
        """
        for wrap in (lambda o: o,
                     lambda o: FilteringLogObserver(o, [LogLevelFilterPredicate()])):
            stream = io.StringIO()
            file_observer = textFileLogObserver(stream)
            publisher = LogPublisher(wrap(file_observer))
            filter_noise(publisher)
            self.assertIsInstance(file_observer.formatEvent, FastClassicText)
            Logger(observer=publisher, namespace="mailstack.test").info(
                "{qid}: removed", qid="4F2A9C")
            line = stream.getvalue()
            self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                                   r"\[mailstack\.test#info\] 4F2A9C: removed\n$")

    def test_other_formats_left_alone(self):
        """
        A JSON observer, or a text observer with another time format, keeps
        its own formatter.
        """
        for observer in (jsonFileLogObserver(io.StringIO()),
                         textFileLogObserver(io.StringIO(), timeFormat="%H:%M:%S.%f")):
            before = observer.formatEvent
            self.assertFalse(fast_text(observer))
            self.assertIs(observer.formatEvent, before)
