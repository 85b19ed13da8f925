"""
The dnsbl filter against a DNS server on loopback (twisted.names serving a
FakeResolver over UDP), with smtplib against a real mailstack: listed
clients are refused at RCPT or at connect by weight and threshold; a reply
outside a site's pattern, an NXDOMAIN and an allow list's negative weight
count as they should.
"""

import smtplib

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.names import dns, server
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.config import ConfigError
from mailstack.plugin import check_options
from mailstack.plugins.dnsbl import SPEC, parse_site, query_name
from mailstack.testing import FakeResolver
from tests.support import add_user, in_thread, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"


def dns_server(testcase, resolver):
    factory = server.DNSServerFactory(clients=[resolver])
    port = reactor.listenUDP(0, dns.DNSDatagramProtocol(factory), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return port.getHost().port


class DNSBLServerTests(TestCase):
    @inlineCallbacks
    def start(self, **options):
        # 127.0.0.1 is on black.test (weight 2) and on grey.test with a
        # reply the pattern ignores; broken.test does not answer properly.
        resolver = FakeResolver(a={"1.0.0.127.black.test": ["127.0.0.2"],
                                   "1.0.0.127.grey.test": ["127.0.0.9"],
                                   "1.0.0.127.white.test": ["127.0.0.2"]},
                           missing={"1.0.0.127.clean.test"})
        port = dns_server(self, resolver)
        self.server = yield start_server(self, smtp=LISTEN, filter=["dnsbl"],
                                         dns_server=f"127.0.0.1:{port}", resolver=False,
                                         plugins={"dnsbl": options})
        add_user(self.server, "alice@localhost")
        self.resolver = resolver

    def rcpt(self):
        def talk(client):
            client.ehlo("client.test")
            client.mail("x@remote.test")
            return client.rcpt("alice@localhost")
        return in_thread(smtp_session, self.server.ports["smtp"], talk)

    @inlineCallbacks
    def test_listed_refused_at_rcpt(self):
        yield self.start(sites=["black.test*2", "grey.test=127.0.0.[2..4]", "clean.test"],
                         threshold=2)
        code, text = yield self.rcpt()
        self.assertEqual(code, 554)
        self.assertEqual(text, b"5.7.1 Service unavailable; client host [127.0.0.1] "
                               b"blocked using black.test")
        queried = {name for _, name in self.resolver.queries}
        self.assertIn("1.0.0.127.clean.test", queried)

    @inlineCallbacks
    def test_below_threshold_and_allow_list(self):
        """
        One weight-2 listing against threshold 3 passes: grey.test's reply
        127.0.0.9 is outside its pattern, so its weight 5 does not count.
        """
        yield self.start(sites=["black.test*2", "grey.test=127.0.0.[2..4]*5"], threshold=3)
        code, _ = yield self.rcpt()
        self.assertEqual(code, 250)

    @inlineCallbacks
    def test_allow_list(self):
        yield self.start(sites=["black.test*2", "white.test*-2"], threshold=1)
        code, _ = yield self.rcpt()
        self.assertEqual(code, 250)

    @inlineCallbacks
    def test_at_connect(self):
        yield self.start(sites=["black.test"], stage="connect")

        def connect():
            try:
                smtplib.SMTP("127.0.0.1", self.server.ports["smtp"], timeout=30)
            except smtplib.SMTPConnectError as e:
                return e.smtp_code, e.smtp_error
            return None

        refused = yield in_thread(connect)
        self.assertEqual(refused[0], 554)
        self.assertIn(b"blocked using black.test", refused[1])


class SiteTests(SynchronousTestCase):
    def test_postscreen_syntax(self):
        site = parse_site("list.dnswl.org=127.0.[0..255].[1..3]*-2")
        self.assertEqual((site.zone, site.weight), ("list.dnswl.org", -2))
        self.assertTrue(site.matches("127.0.9.3"))
        self.assertFalse(site.matches("127.0.9.4"))
        self.assertTrue(parse_site("zen.spamhaus.org").matches("127.0.0.4"))
        self.assertFalse(parse_site("zen.spamhaus.org").matches("10.0.0.4"))
        for bad in ("nodot", "x.test=1.2.3", "x.test*heavy", "x.test=127.0.0.[2..300]"):
            self.assertRaises(ValueError, parse_site, bad)

    def test_query_names(self):
        self.assertEqual(query_name("192.0.2.1", "z.test"), "1.2.0.192.z.test")
        self.assertTrue(query_name("2001:db8::1", "z.test").startswith("1.0.0.0.0.0.0"))
        self.assertTrue(query_name("2001:db8::1", "z.test").endswith("8.b.d.0.1.0.0.2.z.test"))

    def test_sites_required(self):
        from mailstack.plugins.dnsbl import dnsbl
        error = self.assertRaises(ConfigError, dnsbl.configure, {})
        self.assertIn("sites is required", str(error))
        self.assertRaises(ConfigError, check_options, "dnsbl", {"site": ["x.test"]}, SPEC)
