"""
MTA-STS in the courier and TLS reporting (L{mailstack.queue.tlspolicy},
L{mailstack.mailauth.tlsrpt}), end to end: a real MailStack whose queue
delivers to remote MTAs on 127.0.0.1 (mailstack's own SMTP server, with
certificates from a test CA made here), found through a test DNS zone
whose MTA-STS policy host is a local HTTPS server with a certificate from
the same CA (trusted with --tls-ca-file).
"""

import io
import json
import os

from twisted.internet import reactor, ssl
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.server import Site

from mailstack.address import parse_address
from mailstack.mailauth.mtasts import STSPolicy
from mailstack.mailauth.testing import ZoneResolver
from mailstack.mailauth.tlsrpt import TLSReportLog, day_of, make_reports, read_day
from mailstack.queue.tlspolicy import DomainTLS, TLSPolicy, classify
from mailstack.smtp.client import Timeouts, TLSRequired
from mailstack.smtp.reply import Reply
from mailstack.tls import TLSMaterial
from tests.support import add_user, short_tempdir, start_server
from tests.test_mailauth_mtasts import PolicyResource, make_ca, make_leaf, pem
from tests.test_relay import Sink

LISTEN = "tcp:0:interface=127.0.0.1"
MESSAGE = b"Subject: sts\nMessage-ID: <sts@localhost>\n\nhello\n"
POLICY = b"version: STSv1\r\nmode: %s\r\nmx: mx1.remote.test\r\nmax_age: 86400\r\n"


class Events:
    """
    The log events formatted while a test runs.
    """

    def __init__(self, testcase):
        self.lines = []
        globalLogPublisher.addObserver(self)
        testcase.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event):
        self.lines.append(formatEvent(event))

    def matching(self, *words):
        return [line for line in self.lines if all(w in line for w in words)]


class MTASTSDeliveryTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.directory = short_tempdir(self)
        self.ca_key, self.ca_cert = make_ca()
        self.ca_file = self.write("ca.pem", pem(self.ca_cert))
        # The policy host, mta-sts.remote.test, on HTTPS.
        self.resource = PolicyResource()
        self.resource.body = POLICY % b"enforce"
        key, cert = make_leaf(self.ca_key, self.ca_cert, "mta-sts.remote.test")
        https = reactor.listenSSL(0, Site(self.resource),
                                  ssl.PrivateCertificate.loadPEM(pem(cert) + pem(key)).options(),
                                  interface="127.0.0.1")
        self.addCleanup(https.stopListening)
        self.https_port = https.getHost().port
        # Two remote MTAs: mx1.remote.test is in the policy, mx.other.test is not.
        self.good = yield Sink().start(self)
        self.other = yield Sink().start(self)
        self.ports = {"127.0.0.10": self.good.number, "127.0.0.11": self.other.number}
        self.zone = ZoneResolver({
            "remote.test": {"MX": [(10, "mx1.remote.test")]},
            "_mta-sts.remote.test": {"TXT": ["v=STSv1; id=pol1"]},
            "mta-sts.remote.test": {"A": ["127.0.0.1"]},
            "mx1.remote.test": {"A": ["127.0.0.10"]},
            "mx.other.test": {"A": ["127.0.0.11"]},
        })
        self.clock = Clock()
        self.events = Events(self)

    def write(self, name, data):
        path = os.path.join(self.directory, name)
        with open(path, "wb") as f:
            f.write(data)
        return path

    def certify(self, sink, hostname, ca=None):
        """
        Give C{sink} STARTTLS with a certificate for C{hostname} from the
        test CA (or from C{ca}: (key, certificate)).
        """
        ca_key, ca_cert = ca or (self.ca_key, self.ca_cert)
        key, cert = make_leaf(ca_key, ca_cert, hostname)
        material = TLSMaterial(self.write(hostname + ".crt", pem(cert)),
                               self.write(hostname + ".key", pem(key)))
        sink.port.factory.tls = material.context_factory

    def endpoint(self, ip, port):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports[ip], timeout=5)

    @inlineCallbacks
    def server(self, data_dir=None, resolver=None, **options):
        server = yield start_server(
            self, resolver=self.zone if resolver is None else resolver,
            relay_endpoint=self.endpoint, clock=self.clock,
            relay_timeouts=Timeouts(5, 5, 5, 5, 5), data_dir=data_dir,
            tls_ca_file=self.ca_file, **options)
        if server.tls_policy.sts is not None:
            server.tls_policy.sts.port = self.https_port
        yield server.queue.loaded
        if not server.users.exists(parse_address("alice@localhost")):
            add_user(server, "alice@localhost")
        return server

    @inlineCallbacks
    def send(self, server, rcpt="bob@remote.test"):
        yield server.dispatcher.inject(parse_address("alice@localhost"),
                                       [parse_address(rcpt)], MESSAGE)
        self.clock.advance(0)
        yield DeferredList(list(server.queue.active.values()))

    def pending(self, server):
        [record] = server.queue.records.values()
        [rcpt] = record.recipients
        return rcpt

    @inlineCallbacks
    def outcomes(self, server):
        yield server.tls_policy.reports.flush()
        lines = read_day(os.path.join(server.data_dir, "tlsrpt"),
                         day_of(reactor.seconds()))
        return {(line["result"], line["receiving-mx-hostname"]): line for line in lines}

    @inlineCallbacks
    def test_enforce_mx_outside_policy_defers(self):
        """
        In enforce mode an MX host that the policy does not name gets
        nothing: the recipient is deferred with a 4.7.0 status naming the
        policy (recorded in the queue and logged), and the mail stays
        queued; the refusal is reported as a validation failure.
        """
        self.zone.zone["remote.test"]["MX"] = [(10, "mx.other.test")]
        self.certify(self.other, "mx.other.test")
        server = yield self.server()
        yield self.send(server)
        self.assertEqual(self.other.policy.received, [])
        self.assertEqual(self.other.policy.connections, 0)
        rcpt = self.pending(server)
        self.assertEqual(rcpt.dsn, "4.7.0")
        self.assertIn("not allowed by the MTA-STS policy of remote.test", rcpt.last_error)
        self.assertEqual(rcpt.last_error.count("MTA-STS"), 1)
        self.assertIn("mx1.remote.test", rcpt.last_error)
        self.assertTrue(self.events.matching("status=deferred", "MTA-STS policy of remote.test"))
        self.assertEqual(self.resource.requests,
                         [(b"mta-sts.remote.test", b"/.well-known/mta-sts.txt")])
        outcomes = yield self.outcomes(server)
        line = outcomes[("validation-failure", "mx.other.test")]
        self.assertEqual((line["policy-type"], line["policy-id"], line["count"]),
                         ("sts", "pol1", 1))

    @inlineCallbacks
    def test_enforce_mx_inside_policy_delivers(self):
        """
        An MX host the policy names, with STARTTLS and a certificate for
        its name from a trusted CA, gets the mail; the session is counted
        as a success, once, though a second message went on it.
        """
        self.certify(self.good, "mx1.remote.test")
        server = yield self.server()
        yield self.send(server)
        yield self.send(server, "carol@remote.test")
        [(_, rcpts, data), (_, second, _)] = self.good.policy.received
        self.assertEqual((rcpts, second), (["bob@remote.test"], ["carol@remote.test"]))
        self.assertEqual(self.good.policy.connections, 1)
        self.assertIn(b"with ESMTPS", data)
        self.assertEqual(server.queue.records, {})
        outcomes = yield self.outcomes(server)
        line = outcomes[("success", "mx1.remote.test")]
        self.assertEqual((line["policy-type"], line["mx-host"], line["count"]),
                         ("sts", "mx1.remote.test", 1))
        self.assertIn("mode: enforce", line["policy-string"])

    @inlineCallbacks
    def test_through_a_dns_server(self):
        """
        With --dns-server, the MX, the _mta-sts TXT record and the policy
        host's address come from a real DNS server on 127.0.0.1.
        """
        from twisted.names import dns

        from mailstack.mailauth.testing import serve_zone

        number, ports = serve_zone(reactor, self.zone)
        for port in ports:
            self.addCleanup(port.stopListening)
        self.zone.zone["remote.test"]["MX"] = [(10, "mx.other.test")]
        server = yield self.server(resolver=False, dns_server=f"127.0.0.1:{number}")
        yield self.send(server)
        self.assertEqual(self.other.policy.connections, 0)
        self.assertEqual(self.pending(server).dsn, "4.7.0")
        self.assertIn((dns.TXT, "_mta-sts.remote.test"), self.zone.queries)
        self.assertIn((dns.A, "mta-sts.remote.test"), self.zone.queries)
        self.assertEqual(len(self.resource.requests), 1)

    @inlineCallbacks
    def test_enforce_without_starttls_defers(self):
        """
        An MX in the policy that does not offer STARTTLS: deferred (4.7.4,
        naming the policy), nothing sent in clear text.
        """
        server = yield self.server()
        yield self.send(server)
        self.assertEqual(self.good.policy.received, [])
        rcpt = self.pending(server)
        self.assertEqual(rcpt.dsn, "4.7.4")
        self.assertIn("STARTTLS was not offered", rcpt.last_error)
        self.assertIn("required by the MTA-STS policy of remote.test", rcpt.last_error)
        outcomes = yield self.outcomes(server)
        self.assertEqual(outcomes[("starttls-not-supported", "mx1.remote.test")]["count"], 1)

    @inlineCallbacks
    def test_enforce_untrusted_certificate_defers(self):
        """
        A certificate from a CA nobody trusts, or valid for another name:
        deferred with a 4.7.5 status, nothing sent.
        """
        self.certify(self.good, "mx1.remote.test", ca=make_ca())
        server = yield self.server()
        yield self.send(server)
        self.assertEqual(self.good.policy.received, [])
        rcpt = self.pending(server)
        self.assertEqual(rcpt.dsn, "4.7.5")
        self.assertIn("certificate-not-trusted", rcpt.last_error)
        self.assertIn("MTA-STS policy of remote.test", rcpt.last_error)
        self.certify(self.good, "www.remote.test")
        yield self.send(server, "carol@remote.test")
        self.assertEqual(self.good.policy.received, [])
        record = [r for r in server.queue.records.values()
                  if r.recipients[0].address == "carol@remote.test"][0]
        self.assertEqual(record.recipients[0].dsn, "4.7.5")
        self.assertIn("certificate not valid for mx1.remote.test", record.recipients[0].last_error)
        outcomes = yield self.outcomes(server)
        self.assertIn(("certificate-not-trusted", "mx1.remote.test"), outcomes)
        self.assertIn(("certificate-host-mismatch", "mx1.remote.test"), outcomes)
        self.flushLoggedErrors()

    @inlineCallbacks
    def test_testing_mode_delivers_and_logs(self):
        """
        In testing mode mail goes as without a policy, to an MX outside
        the policy with a certificate nobody trusts, and the log says what
        enforce would have refused (the MX, the certificate); both are
        reported as failures.
        """
        self.resource.body = POLICY % b"testing"
        self.zone.zone["remote.test"]["MX"] = [(10, "mx.other.test")]
        self.certify(self.other, "mx.other.test", ca=make_ca())
        server = yield self.server()
        yield self.send(server)
        [(_, rcpts, data)] = self.other.policy.received
        self.assertIn(b"with ESMTPS", data)
        self.assertEqual(server.queue.records, {})
        self.assertTrue(self.events.matching("mta-sts remote.test (testing)", "mx.other.test",
                                             "not in the policy"))
        self.assertTrue(self.events.matching("mta-sts remote.test (testing)",
                                             "certificate-not-trusted",
                                             "enforce would not deliver"))
        outcomes = yield self.outcomes(server)
        self.assertIn(("validation-failure", "mx.other.test"), outcomes)
        self.assertIn(("certificate-not-trusted", "mx.other.test"), outcomes)
        self.assertNotIn(("success", "mx.other.test"), outcomes)

    @inlineCallbacks
    def test_testing_mode_good_certificate(self):
        """
        In testing mode, a session enforce would accept is a success and
        logs no complaint; a certificate for another name is a host
        mismatch, an MX without STARTTLS starttls-not-supported (both
        still delivered, and logged).
        """
        self.resource.body = POLICY % b"testing"
        self.certify(self.good, "mx1.remote.test")
        server = yield self.server()
        yield self.send(server)
        self.assertEqual(len(self.good.policy.received), 1)
        self.assertEqual(self.events.matching("enforce would"), [])
        self.certify(self.good, "other.remote.test")
        yield self.send(server, "carol@remote.test")
        self.assertEqual(len(self.good.policy.received), 2)
        self.assertTrue(self.events.matching("certificate-host-mismatch",
                                             "enforce would not deliver"))
        self.good.port.factory.tls = None  # STARTTLS no longer offered
        yield self.send(server, "dave@remote.test")
        self.assertEqual(len(self.good.policy.received), 3)
        self.assertTrue(self.events.matching("starttls-not-supported",
                                             "enforce would not deliver"))
        outcomes = yield self.outcomes(server)
        self.assertEqual(outcomes[("success", "mx1.remote.test")]["count"], 1)
        self.assertEqual(outcomes[("certificate-host-mismatch", "mx1.remote.test")]["count"], 1)
        self.assertEqual(outcomes[("starttls-not-supported", "mx1.remote.test")]["count"], 1)

    @inlineCallbacks
    def test_cached_policy_when_fetch_fails(self):
        """
        Once fetched, the policy is kept (on disk too): when the policy
        host fails (HTTP 500) after the TXT id changed, and after a
        restart with the HTTPS server failing, the cached enforce policy
        still keeps mail from an MX outside it; the fetch failure is
        reported.
        """
        data_dir = short_tempdir(self)
        self.certify(self.good, "mx1.remote.test")
        server = yield self.server(data_dir=data_dir)
        yield self.send(server)
        self.assertEqual(len(self.good.policy.received), 1)
        self.resource.code = 500
        self.zone.zone["_mta-sts.remote.test"]["TXT"] = ["v=STSv1; id=pol2"]
        self.zone.zone["remote.test"]["MX"] = [(10, "mx.other.test")]
        server.tls_policy.sts.cache = type(server.tls_policy.sts.cache)(self.zone, reactor)
        server.courier.resolver = self.zone
        yield self.send(server, "carol@remote.test")
        self.assertEqual(self.other.policy.received, [])
        self.assertIn("not allowed by the MTA-STS policy", self.pending(server).last_error)
        self.assertEqual(len(self.resource.requests), 2)
        outcomes = yield self.outcomes(server)
        self.assertEqual(outcomes[("sts-policy-fetch-error", "")]["count"], 1)
        yield server.stopService()
        restarted = yield self.server(data_dir=data_dir)
        yield DeferredList(list(restarted.queue.active.values()))
        self.clock.advance(3600)
        yield DeferredList(list(restarted.queue.active.values()))
        self.assertEqual(self.other.policy.received, [])
        self.assertGreaterEqual(len(self.resource.requests), 3)
        self.assertEqual(self.pending(restarted).dsn, "4.7.0")

    @inlineCallbacks
    def test_no_policy_and_switched_off(self):
        """
        Without a TXT record there is no policy: opportunistic delivery to
        any MX, even without STARTTLS (reported as no-policy-found); with
        --mta-sts off an enforce policy is not even looked up.
        """
        del self.zone.zone["_mta-sts.remote.test"]
        server = yield self.server()
        yield self.send(server)
        self.assertEqual(len(self.good.policy.received), 1)
        outcomes = yield self.outcomes(server)
        line = outcomes[("starttls-not-supported", "mx1.remote.test")]
        self.assertEqual(line["policy-type"], "no-policy-found")
        self.zone.zone["_mta-sts.remote.test"] = {"TXT": ["v=STSv1; id=pol1"]}
        self.zone.zone["remote.test"]["MX"] = [(10, "mx.other.test")]
        off = yield self.server(mta_sts="off")
        self.assertIsNone(off.tls_policy.sts)
        yield self.send(off)
        self.assertEqual(len(self.other.policy.received), 1)
        self.assertEqual(self.resource.requests, [])

    @inlineCallbacks
    def test_static_route_not_subject_to_policy(self):
        """
        A --route replaces the MX records, and with them MTA-STS (which
        is about MX hosts): the route's host gets the mail.
        """
        self.zone.zone["relay.test"] = {"A": ["127.0.0.11"]}
        server = yield self.server(route=["remote.test=relay.test:25"])
        yield self.send(server)
        self.assertEqual(len(self.other.policy.received), 1)
        self.assertEqual(self.resource.requests, [])


class ClassifyTests(SynchronousTestCase):
    def test_classify(self):
        """
        TLS failures map to RFC 8460 result types; other failures to none.
        """
        from OpenSSL.SSL import Error as SSLError
        from service_identity import VerificationError

        from mailstack.smtp.client import SMTPClientError
        self.assertEqual(classify(TLSRequired(Reply(530, "5.7.10", "x"), "EHLO")),
                         "starttls-not-supported")
        self.assertEqual(classify(VerificationError([])), "certificate-host-mismatch")
        self.assertEqual(classify(SSLError([("SSL routines", "", "certificate verify failed")])),
                         "certificate-not-trusted")
        self.assertEqual(classify(SSLError([("SSL routines", "", "certificate has expired")])),
                         "certificate-expired")
        self.assertEqual(classify(SSLError([("SSL routines", "", "wrong version number")])),
                         "validation-failure")
        self.assertIsNone(classify(SMTPClientError(Reply(451, "4.3.0", "later"), "MAIL")))
        self.assertIsNone(classify(ConnectionRefusedError()))

    def test_explain_only_for_enforce(self):
        """
        A deferral names the policy only in enforce mode; a TLS failure
        shown with another status becomes 4.7.5.
        """
        owner = TLSPolicy(None)
        enforce = DomainTLS(owner, "d.test", STSPolicy("enforce", ("mx.d.test",), 60, "1"))
        testing = DomainTLS(owner, "d.test", STSPolicy("testing", ("mx.d.test",), 60, "1"))
        none = DomainTLS(owner, "d.test", STSPolicy("none", (), 60, "1"))
        reply = Reply(451, "4.4.1", "connect to mx: refused")
        self.assertEqual(testing.explain(reply), reply)
        self.assertEqual(enforce.explain(reply), reply)
        self.assertEqual(none.mode, "none")
        enforce.failure = ("certificate-not-trusted", "verify failed")
        explained = enforce.explain(reply)
        self.assertEqual((explained.code, explained.enhanced), (451, "4.7.5"))
        self.assertIn("certificate-not-trusted", explained.text)
        self.assertEqual(enforce.explain(Reply(250, "2.0.0", "ok")).code, 250)
        # A later host's network failure is not explained as the TLS failure.
        from twisted.internet.defer import Deferred, fail
        failed = Deferred.fromCoroutine(enforce.observe(
            "mx2.d.test", "192.0.2.2", True, fail(ConnectionRefusedError())))
        self.failureResultOf(failed, ConnectionRefusedError)
        self.assertEqual(enforce.explain(reply), reply)


class ReportTests(TestCase):
    def test_counts_written_and_reported(self):
        """
        Outcomes are counted in memory, appended per day as JSON lines, and
        a day's lines make one RFC 8460 report per policy domain, with
        summary counts and failure details.
        """
        directory = os.path.join(short_tempdir(self), "tlsrpt")
        clock = Clock()
        clock.advance(86400 * 20000 + 3600)  # 2024-10-04
        day = day_of(clock.seconds())
        self.assertEqual(day, "2024-10-04")
        written = []

        class Pool:
            def callInThreadWithCallback(self, onResult, f, *args, **kwargs):
                written.append(1)
                onResult(True, f(*args, **kwargs))

        clock.callFromThread = lambda f, *a: f(*a)
        log = TLSReportLog(directory, clock, Pool())
        lines = ("version: STSv1", "mode: enforce", "mx: mx.a.test", "max_age: 60")
        for _ in range(3):
            log.record("a.test", "success", "sts", "x", lines, "mx.a.test", "mx.a.test",
                       "192.0.2.1")
        log.record("a.test", "certificate-expired", "sts", "x", lines, "mx.a.test", "mx.a.test",
                   "192.0.2.1")
        log.record("b.test", "starttls-not-supported", receiving_mx="mx.b.test")
        self.assertRaises(ValueError, log.record, "b.test", "made-up")
        log.flush()
        log.record("a.test", "success", "sts", "x", lines, "mx.a.test", "mx.a.test", "192.0.2.1")
        log.flush()
        with open(os.path.join(directory, day + ".jsonl"), "ab") as f:
            f.write(b'{"cut short')  # a crash in the middle of a write
        read = read_day(directory, day)
        self.assertEqual(sum(line["count"] for line in read), 6)
        self.assertRaises(ValueError, read_day, directory, "../x")
        self.assertEqual(read_day(directory, "2000-01-01"), [])
        [a, b] = make_reports(read, day, "mx.example", "postmaster@example")
        self.assertEqual(a["date-range"], {"start-datetime": "2024-10-04T00:00:00Z",
                                           "end-datetime": "2024-10-04T23:59:59Z"})
        self.assertEqual((a["organization-name"], a["contact-info"]),
                         ("mx.example", "postmaster@example"))
        [policy] = a["policies"]
        self.assertEqual(policy["policy"], {"policy-type": "sts", "policy-domain": "a.test",
                                            "policy-string": list(lines),
                                            "mx-host": ["mx.a.test"]})
        self.assertEqual(policy["summary"], {"total-successful-session-count": 4,
                                             "total-failure-session-count": 1})
        self.assertEqual(policy["failure-details"], [{
            "result-type": "certificate-expired", "failed-session-count": 1,
            "receiving-mx-hostname": "mx.a.test", "receiving-ip": "192.0.2.1"}])
        [policy] = b["policies"]
        self.assertEqual(policy["policy"], {"policy-type": "no-policy-found",
                                            "policy-domain": "b.test"})
        self.assertEqual(policy["summary"]["total-failure-session-count"], 1)
        json.dumps([a, b])

    def test_old_days_removed(self):
        """
        Files older than the retention are removed when a new day's counts
        are written.
        """
        from mailstack.mailauth import tlsrpt

        directory = short_tempdir(self)
        for name in ("2024-01-01.jsonl", "2024-03-01.jsonl", "notes.txt"):
            with open(os.path.join(directory, name), "w") as f:
                f.write("")
        tlsrpt._append(directory, {}, "2024-03-15")
        self.assertEqual(sorted(os.listdir(directory)), ["2024-03-01.jsonl", "notes.txt"])


class TLSRPTCommandTests(TestCase):
    def test_command(self):
        """
        C{mailstack tlsrpt DAY} prints the day's reports as JSON; with a
        domain, that domain's report alone; a bad day is a usage error.
        """
        from mailstack.cli import CommandError, run
        from mailstack.mailauth import tlsrpt

        data = short_tempdir(self)
        key = ("2026-11-29", "a.test", "no-policy-found", "", (), "", "success", "mx.a.test",
               "192.0.2.1")
        other = ("2026-11-29", "b.test", "no-policy-found", "", (), "", "success", "mx.b.test",
                 "192.0.2.2")
        tlsrpt._append(os.path.join(data, "tlsrpt"), {key: 2, other: 1}, "")
        out = io.StringIO()
        run(["--data-dir", data, "tlsrpt", "2026-11-29"], io.StringIO(), out)
        reports = json.loads(out.getvalue())
        self.assertEqual([r["policies"][0]["policy"]["policy-domain"] for r in reports],
                         ["a.test", "b.test"])
        out = io.StringIO()
        run(["--data-dir", data, "tlsrpt", "2026-11-29", "b.test"], io.StringIO(), out)
        report = json.loads(out.getvalue())
        self.assertEqual(report["policies"][0]["summary"]["total-successful-session-count"], 1)
        self.assertEqual(report["contact-info"], "postmaster@localhost")
        error = self.assertRaises(CommandError, run,
                                  ["--data-dir", data, "tlsrpt", "yesterday"],
                                  io.StringIO(), io.StringIO())
        self.assertIn("YYYY-MM-DD", str(error))
        error = self.assertRaises(CommandError, run,
                                  ["--data-dir", data, "tlsrpt", "2026-11-29", "c.test"],
                                  io.StringIO(), io.StringIO())
        self.assertIn("c.test", str(error))


