"""
Tests for the MTA-STS client (L{mailstack.mailauth.mtasts}): a policy
served by a local HTTPS server whose certificate comes from a test CA made
here, found through a test DNS zone.
"""

import datetime
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site

from mailstack.mailauth.lookup import DNSCache
from mailstack.mailauth.mtasts import (
    MTASTSClient,
    PolicyError,
    STSPolicy,
    mx_allowed,
    parse_policy,
    parse_txt,
)
from mailstack.mailauth.testing import ZoneResolver

POLICY = (b"version: STSv1\r\nmode: enforce\r\nmx: mx1.example.org\r\nmx: *.mx.example.org\r\n"
          b"max_age: 86400\r\n")


def _name(text):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def make_ca():
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name("mailstack test CA"))
            .issuer_name(_name("mailstack test CA")).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_leaf(ca_key, ca_cert, hostname):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(hostname))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(hostname)]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def pem(obj):
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class PolicyResource(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.body = POLICY
        self.code = 200
        self.content_type = b"text/plain; charset=utf-8"
        self.requests = []

    def render_GET(self, request):
        self.requests.append((request.getHeader(b"host"), request.path))
        request.setResponseCode(self.code)
        if self.code in (301, 302):
            request.setHeader(b"location", b"https://elsewhere.example/policy")
        request.setHeader(b"content-type", self.content_type)
        return self.body if request.path == b"/.well-known/mta-sts.txt" else b"no"


class FetchTests(TestCase):
    def setUp(self):
        self.ca_key, self.ca_cert = make_ca()
        self.resource = PolicyResource()
        self.port = self.serve("mta-sts.example.org")
        self.zone = ZoneResolver({"_mta-sts.example.org": {"TXT": ["v=STSv1; id=abc1"]}})
        self.cache = DNSCache(self.zone, reactor, timeout=5)
        self.directory = os.path.abspath(self.mktemp())

    def serve(self, hostname):
        key, cert = make_leaf(self.ca_key, self.ca_cert, hostname)
        options = ssl.PrivateCertificate.loadPEM(pem(cert) + pem(key)).options()
        port = reactor.listenSSL(0, Site(self.resource), options, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def client(self, trust=None, port=None, clock=None, directory=True):
        trust_root = ssl.Certificate.loadPEM(pem(trust or self.ca_cert))
        return MTASTSClient(reactor, self.cache, self.directory if directory else None,
                            tls=BrowserLikePolicyForHTTPS(trustRoot=trust_root),
                            connect_to={"mta-sts.example.org": ("127.0.0.1",
                                                                port or self.port)},
                            clock=clock, timeout=10)

    def policy(self, client, domain="example.org"):
        return Deferred.fromCoroutine(client.policy(domain))

    async def test_fetch_and_cache(self):
        """
        The policy is fetched over verified HTTPS from mta-sts.DOMAIN, then
        kept: the same TXT id needs no new fetch, and a new client (a
        restart) finds it on disk; a new id makes it fetched again.
        """
        client = self.client()
        policy = await self.policy(client)
        self.assertEqual((policy.mode, policy.mx, policy.max_age, policy.id),
                         ("enforce", ("mx1.example.org", "*.mx.example.org"), 86400, "abc1"))
        self.assertEqual(self.resource.requests,
                         [(b"mta-sts.example.org", b"/.well-known/mta-sts.txt")])
        self.assertEqual(await self.policy(client), policy)
        self.assertEqual(len(self.resource.requests), 1)
        restarted = self.client()
        self.assertEqual(await self.policy(restarted), policy)
        self.assertEqual(len(self.resource.requests), 1)
        self.assertTrue(os.path.exists(os.path.join(self.directory, "example.org.json")))
        self.zone.zone["_mta-sts.example.org"]["TXT"] = ["v=STSv1; id=abc2"]
        self.resource.body = POLICY.replace(b"enforce", b"testing")
        fresh = self.client(directory=False)
        fresh.cache = DNSCache(self.zone, reactor)
        policy = await self.policy(fresh)
        self.assertEqual((policy.mode, policy.id), ("testing", "abc2"))
        self.assertEqual(len(self.resource.requests), 2)

    async def test_untrusted(self):
        """
        A certificate from another CA, or for another name, means no
        policy.
        """
        _, other_ca = make_ca()
        self.assertIsNone(await self.policy(self.client(trust=other_ca)))
        wrong = self.serve("www.example.org")
        self.assertIsNone(await self.policy(self.client(port=wrong, directory=False)))
        self.assertEqual(self.resource.requests, [])  # refused before any HTTP
        self.assertIsNotNone(await self.policy(self.client(directory=False)))

    async def test_bad_answers(self):
        """
        A 404, a redirect, a wrong content type, a too-large or malformed
        policy: no policy.
        """
        for change in ({"code": 404}, {"code": 302}, {"content_type": b"text/html"},
                       {"body": POLICY + b"x: " + b"y" * 70000 + b"\r\n"},
                       {"body": b"version: STSv1\r\nmode: strict\r\n"}):
            self.resource.code, self.resource.content_type = 200, b"text/plain"
            self.resource.body = POLICY
            for key, value in change.items():
                setattr(self.resource, key, value)
            self.assertIsNone(await self.policy(self.client(directory=False)), change)

    async def test_no_record_and_dns_failure(self):
        """
        Without a TXT record there is no policy and nothing is fetched; a
        DNS failure keeps using a fresh cached policy; an expired one is
        not used.
        """
        self.assertIsNone(await self.policy(self.client(), "other.example"))
        self.assertEqual(self.resource.requests, [])
        clock = Clock()
        clock.advance(1000)
        client = self.client(clock=clock)
        policy = await self.policy(client)
        self.assertEqual(policy.fetched, 1000)
        self.zone.servfail.add("_mta-sts.example.org")
        client.cache = DNSCache(self.zone, reactor)
        self.assertEqual(await self.policy(client), policy)
        clock.advance(86400)
        self.assertIsNone(await self.policy(client))


class PureTests(SynchronousTestCase):
    def test_mx_allowed(self):
        """
        Exact names and one-label wildcards match, case and a final dot
        aside; a wildcard matches neither its parent nor two labels.
        """
        policy = parse_policy(POLICY)
        for host, allowed in (("mx1.example.org", True), ("MX1.Example.Org.", True),
                              ("a.mx.example.org", True), ("mx.example.org", False),
                              ("a.b.mx.example.org", False), ("mx2.example.org", False),
                              ("evilmx1.example.org", False), ("mx1.example.org.evil", False)):
            self.assertEqual(mx_allowed(policy, host), allowed, host)

    def test_parse(self):
        """
        LF or CRLF; version, mode and max_age required; mx required unless
        mode is none; max_age capped at one year; unknown keys ignored.
        """
        policy = parse_policy(b"version: STSv1\nmode: none\nmax_age: 9999999999\nfoo: bar\n")
        self.assertEqual((policy.mode, policy.mx, policy.max_age), ("none", (), 31557600))
        for bad in (b"mode: enforce\nmx: a.b\nmax_age: 1\n",
                    b"version: STSv1\nmode: enforce\nmax_age: 1\n",
                    b"version: STSv1\nmode: Enforce\nmx: a.b\nmax_age: 1\n",
                    b"version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
                    b"version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 1\n",
                    b"version: STSv1\nmode: enforce\nmode: none\nmx: a.b\nmax_age: 1\n",
                    b"version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
                    b"\xff\xfe"):
            self.assertRaises(PolicyError, parse_policy, bad)

    def test_txt(self):
        """
        Exactly one v=STSv1 record with an alphanumeric id of 1-32.
        """
        self.assertEqual(parse_txt([b"v=STSv1; id=2026a", b"other"]), "2026a")
        self.assertIsNone(parse_txt([]))
        self.assertIsNone(parse_txt([b"v=STSv1; id=a", b"v=STSv1; id=b"]))
        self.assertIsNone(parse_txt([b"v=STSv1; id=bad-id"]))
        self.assertIsNone(parse_txt([b"v=STSv1"]))

    def test_fresh(self):
        policy = STSPolicy("enforce", ("a.b",), 10, "x", 100.0)
        self.assertTrue(policy.fresh(109.9))
        self.assertFalse(policy.fresh(110))
