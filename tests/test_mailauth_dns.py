"""
Tests for the DNS side of mail authentication: the TTL cache, the test
zone, and C{mailstack dns DOMAIN [--check]} run as a user would, against a
DNS server on loopback.
"""

import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.mailauth import keys
from mailstack.mailauth.dnsrecords import mta_sts_id, mta_sts_policy, records, zone_text
from mailstack.mailauth.lookup import DNSCache, DNSTempError
from mailstack.mailauth.testing import ZoneResolver, serve_zone
from tests.test_mailauth_dkim import key_set

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class CacheTests(SynchronousTestCase):
    def test_ttl(self):
        """
        An answer is reused until its TTL runs out, then asked again; a
        missing name is cached too (for the negative TTL).
        """
        clock = Clock()
        zone = ZoneResolver({"a.example": {"TXT": ["hello"]}}, ttl=60)
        cache = DNSCache(zone, clock)
        self.assertEqual(self.successResultOf(Deferred.fromCoroutine(
            cache.text("a.example"))), [b"hello"])
        clock.advance(59)
        self.successResultOf(cache.lookup("A.Example.", dns.TXT))
        self.assertEqual(zone.queries, [(dns.TXT, "a.example")])
        clock.advance(1)
        self.successResultOf(cache.lookup("a.example", dns.TXT))
        self.assertEqual(len(zone.queries), 2)
        self.assertEqual(self.successResultOf(cache.lookup("b.example", dns.TXT)), [])
        self.successResultOf(cache.lookup("b.example", dns.TXT))
        self.assertEqual(len(zone.queries), 3)

    def test_shared_and_timeout(self):
        """
        Two lookups of one name in flight make one query; a server that does
        not answer fails both with DNSTempError after the time limit, and
        the failure is not cached.
        """
        clock = Clock()
        zone = ZoneResolver({}, silent={"slow.example"})
        cache = DNSCache(zone, clock, timeout=5)
        first = cache.lookup("slow.example", dns.TXT)
        second = cache.lookup("slow.example", dns.TXT)
        self.assertEqual(len(zone.queries), 1)
        clock.advance(5)
        self.failureResultOf(first, DNSTempError)
        self.failureResultOf(second, DNSTempError)
        self.assertNoResult(cache.lookup("slow.example", dns.TXT))
        self.assertEqual(len(zone.queries), 2)

    def test_hostile_names(self):
        """
        A name DNS cannot hold (non-ASCII, a label over 63 characters, an
        empty label, over 253 characters) has no records and is not asked;
        a resolver that fails at once is a DNSTempError: no lookup is left
        without an answer.
        """
        zone = ZoneResolver({})
        cache = DNSCache(zone, Clock())
        for name in ("ex\u00fc.org", "a" * 64 + ".org", "a..b", ".", "x." * 130 + "org",
                     "sp ace.org", "s\ufffd._domainkey.example.org"):
            self.assertEqual(self.successResultOf(cache.lookup(name, dns.TXT)), [], name)
        self.assertEqual(zone.queries, [])

        class Broken(ZoneResolver):
            def query(self, query, timeout=None):
                raise ValueError("broken")

        self.failureResultOf(DNSCache(Broken(), Clock()).lookup("a.example", dns.A),
                             DNSTempError)

    def test_servfail_and_cname(self):
        """
        SERVFAIL is a DNSTempError; a CNAME is followed.
        """
        zone = ZoneResolver({"alias.example": {"CNAME": "real.example"},
                             "real.example": {"A": ["192.0.2.1"]}}, servfail={"bad.example"})
        cache = DNSCache(zone, Clock())
        self.failureResultOf(cache.lookup("bad.example", dns.A), DNSTempError)
        answers = self.successResultOf(cache.lookup("alias.example", dns.A))
        self.assertEqual([rr.type for rr in answers], [dns.CNAME, dns.A])


def full_zone(domain, hostname, made, skip=()):
    """
    A zone publishing every record of L{records}, except those whose
    purpose starts with one of C{skip}.
    """
    zone = {hostname: {"A": ["192.0.2.25"]}}
    for record in records(domain, hostname, made):
        if record.purpose.startswith(tuple(skip)):
            continue
        entry = zone.setdefault(record.name, {})
        if record.rtype == "MX":
            pref, host = record.value.split()
            entry.setdefault("MX", []).append((int(pref), host.rstrip(".")))
        elif record.rtype == "SRV":
            prio, weight, port, target = record.value.split()
            entry.setdefault("SRV", []).append((int(prio), int(weight), int(port),
                                                target.rstrip(".")))
        elif record.rtype == "CNAME":
            entry["CNAME"] = record.value.rstrip(".")
        else:
            entry.setdefault("TXT", []).append(record.value)
    return zone


class RecordsTests(SynchronousTestCase):
    def test_zone_text(self):
        """
        The printed zone has MX, SPF, each DKIM key, DMARC with the
        reporting address, MTA-STS TXT and policy, TLS-RPT and the RFC 6186
        SRV records.
        """
        made = key_set()
        text = zone_text("example.org", "mx.example.org", made)
        for line in (
            "example.org. IN MX 10 mx.example.org.",
            'example.org. IN TXT "v=spf1 mx ~all"',
            'mx.example.org. IN TXT "v=spf1 a -all"',
            made[1].zone_line(),
            made[0].zone_line(),
            '_dmarc.example.org. IN TXT "v=DMARC1; p=reject; rua=mailto:postmaster@example.org"',
            '_smtp._tls.example.org. IN TXT "v=TLSRPTv1; rua=mailto:postmaster@example.org"',
            "_submission._tcp.example.org. IN SRV 0 1 587 mx.example.org.",
            "_submissions._tcp.example.org. IN SRV 0 1 465 mx.example.org.",
            "_imap._tcp.example.org. IN SRV 0 1 143 mx.example.org.",
            "_imaps._tcp.example.org. IN SRV 0 1 993 mx.example.org.",
            "_pop3._tcp.example.org. IN SRV 0 1 110 mx.example.org.",
            "_pop3s._tcp.example.org. IN SRV 0 0 0 .",
            "; mode: enforce",
            "; mx: mx.example.org",
        ):
            self.assertIn(line + "\n", text)
        policy = mta_sts_policy("mx.example.org")
        self.assertIn(f'_mta-sts.example.org. IN TXT "v=STSv1; id={mta_sts_id(policy)}"', text)
        self.assertNotEqual(mta_sts_id(policy), mta_sts_id(mta_sts_policy("mx2.example.org")))
        other = zone_text("example.org", "mx.example.org", [], "dmarc@example.net")
        self.assertIn("rua=mailto:dmarc@example.net", other)
        self.assertIn("mailstack dkim keygen example.org", other)


class ServeZoneTests(TestCase):
    async def test_servfail_over_the_wire(self):
        """
        A name the zone SERVFAILs is SERVFAIL over the wire too (Twisted's
        server alone answers NXDOMAIN), so a client sees a temporary
        failure, not a missing name.
        """
        from twisted.names.client import Resolver
        from twisted.names.error import DNSNameError, DNSServerError

        zone = ZoneResolver({"a.example": {"TXT": ["x"]}}, servfail={"bad.example"})
        port, listening = serve_zone(reactor, zone)
        for p in listening:
            self.addCleanup(p.stopListening)
        client = Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        with self.assertRaises(DNSServerError):
            await client.lookupText("bad.example")
        with self.assertRaises(DNSNameError):
            await client.lookupText("missing.example")
        answers, _, _ = await client.lookupText("a.example")
        self.assertEqual(answers[0].payload.data, [b"x"])
        cache = DNSCache(client, reactor, timeout=5)
        with self.assertRaises(DNSTempError):
            await cache.lookup("bad.example", dns.TXT)


class CheckCommandTests(TestCase):
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())
        key_set(self.data)

    async def run_check(self, zone, *extra):
        port, listening = serve_zone(reactor, ZoneResolver(zone))
        for p in listening:
            self.addCleanup(p.stopListening)
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailstack", "--data-dir", self.data, "dns", "example.org",
                             "--check", "--hostname", "mx.example.org",
                             "--dns-server", f"127.0.0.1:{port}", *extra],
            env=env, reactor=reactor)
        return out.decode(), err.decode(), code

    async def test_complete_zone(self):
        """
        A zone with every record passes: exit 0, every line ok.
        """
        zone = full_zone("example.org", "mx.example.org", key_set())
        out, err, code = await self.run_check(zone)
        self.assertEqual(code, 0, out + err)
        lines = out.splitlines()
        self.assertEqual(lines[-1], "15 of 15 records are right")
        self.assertTrue(all(line.startswith("ok ") for line in lines[:-1]), out)

    async def test_zone_without_dkim(self):
        """
        A zone that lacks the DKIM keys: exit 1, both keys named as
        missing with the record to publish, the rest ok.
        """
        made = key_set()
        zone = full_zone("example.org", "mx.example.org", made, skip=("DKIM",))
        out, err, code = await self.run_check(zone)
        self.assertEqual(code, 1, out + err)
        missing = [line for line in out.splitlines() if line.startswith("MISSING")]
        self.assertEqual(len(missing), 2, out)
        self.assertIn("DKIM rsa", missing[0])
        self.assertIn("s1-rsa._domainkey.example.org TXT", missing[0])
        self.assertIn("DKIM ed25519", missing[1])
        self.assertIn("publish: " + made[1].zone_line(), out)
        self.assertEqual(out.splitlines()[-1], "13 of 15 records are right")

    async def test_no_keys(self):
        """
        With no DKIM keys in the data directory, --check says so and how to
        make them, and exits 1.
        """
        self.data = os.path.abspath(self.mktemp())
        os.makedirs(self.data)
        zone = full_zone("example.org", "mx.example.org", [])
        out, err, code = await self.run_check(zone)
        self.assertEqual(code, 1, out + err)
        self.assertIn("MISSING  DKIM", out)
        self.assertIn("mailstack dkim keygen example.org", out)

    async def test_wrong_records(self):
        """
        An MX elsewhere, an SPF record that does not allow the host, a
        different DKIM key and a second DMARC record are each named wrong.
        """
        made = key_set()
        zone = full_zone("example.org", "mx.example.org", made)
        zone["example.org"]["MX"] = [(10, "mx.other.example")]
        zone["example.org"]["TXT"] = ["v=spf1 ip4:198.51.100.1 -all"]
        zone[made[0].record_name()]["TXT"] = [key_set(selector="s2")[0].public_record()]
        zone["_dmarc.example.org"]["TXT"].append("v=DMARC1; p=none")
        out, err, code = await self.run_check(zone)
        self.assertEqual(code, 1, out + err)
        wrong = "\n".join(line for line in out.splitlines() if line.startswith("WRONG"))
        self.assertIn("MX", wrong)
        self.assertIn("mx.other.example", wrong)
        self.assertIn("SPF gives fail for mx.example.org (192.0.2.25)", wrong)
        self.assertIn("DKIM rsa", wrong)
        self.assertIn("2 records start with v=dmarc1", wrong)
        self.assertEqual(wrong.count("WRONG"), 4, out)

    async def test_config_file(self):
        """
        With --config, the check asks the configuration's dns-server and
        takes its hostname as the MX host.
        """
        port, listening = serve_zone(reactor, ZoneResolver(
            full_zone("example.org", "mx.example.org", key_set())))
        for p in listening:
            self.addCleanup(p.stopListening)
        config = os.path.abspath(self.mktemp())
        with open(config, "w") as f:
            f.write(f'data-dir = "{self.data}"\nhostname = "mx.example.org"\n'
                    f'dns-server = "127.0.0.1:{port}"\n')
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailstack", "--config", config, "dns", "example.org",
                             "--check"], env=dict(os.environ, PYTHONPATH=ROOT), reactor=reactor)
        self.assertEqual(code, 0, out + err)
        self.assertEqual(out.decode().splitlines()[-1], "15 of 15 records are right")

    def test_resolvers(self):
        """
        --dns-server gives a client of that server alone; without it, the
        system's configuration (no query is made here).
        """
        from twisted.names.client import Resolver
        from twisted.names.resolve import ResolverChain

        from mailstack.mailauth.commands import make_resolver
        one = make_resolver(("127.0.0.1", 5353), reactor)
        self.assertIsInstance(one, Resolver)
        self.assertEqual(one.servers, [("127.0.0.1", 5353)])
        chain = make_resolver(None, reactor)
        for resolver in chain.resolvers:  # it re-reads resolv.conf every minute
            call = getattr(resolver, "_parseCall", None)
            if call is not None and call.active():
                call.cancel()
        self.assertIsInstance(chain, ResolverChain)
        self.assertTrue(any(isinstance(r, Resolver) for r in chain.resolvers))

    async def test_print_and_keygen(self):
        """
        Without --check the records are printed; keygen prints the TXT
        records of the new keys and refuses to overwrite them.
        """
        env = dict(os.environ, PYTHONPATH=ROOT)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailstack", "--data-dir", self.data, "dkim", "keygen",
                             "example.net", "--selector", "k1"], env=env, reactor=reactor)
        self.assertEqual(code, 0, err)
        made = keys.key_sets(self.data, "example.net")["k1"]
        self.assertEqual(out.decode().splitlines()[:2], [k.zone_line() for k in made])
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailstack", "--data-dir", self.data, "dkim", "keygen",
                             "example.net", "--selector", "k1"], env=env, reactor=reactor)
        self.assertEqual(code, 65)
        self.assertIn(b"already has a key set k1", err)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-m", "mailstack", "--data-dir", self.data, "dns", "example.net",
                             "--hostname", "mx.example.net"], env=env, reactor=reactor)
        self.assertEqual(code, 0, err)
        self.assertIn(made[0].zone_line(), out.decode())

        async def command(*args):
            out, err, code = await getProcessOutputAndValue(
                sys.executable, ["-m", "mailstack", "--data-dir", self.data, "dkim", *args],
                env=env, reactor=reactor)
            self.assertEqual(code, 0, err)
            return out.decode()

        self.assertIn("; publish these records, then after their TTL: mailstack dkim activate "
                      "example.net k2", await command("keygen", "example.net", "--selector", "k2"))
        self.assertEqual(keys.active_selector(self.data, "example.net"), "k1")
        self.assertEqual(await command("activate", "example.net", "k2"),
                         "example.net: signing with key set k2\n")
        listed = (await command("list", "example.net")).splitlines()
        self.assertEqual([line for line in listed if line.startswith(";")],
                         ["; example.net key set k1 (inactive)",
                          "; example.net key set k2 (active)"])
        self.assertEqual(len(listed), 6)
