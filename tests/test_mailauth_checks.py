"""
Tests for the inbound checks: SPF, DKIM and DMARC against a test DNS, the
Authentication-Results field (checked field by field with an independent
parser, authres), its removal, and the policy verdict.
"""

import authres
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.names.client import Resolver
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.mailauth.dkim import DKIMSigner
from mailstack.mailauth.dmarc import (
    DMARCRecordError,
    aligned,
    organizational_domain,
    parse_record,
)
from mailstack.mailauth.lookup import DNSCache
from mailstack.mailauth.results import authserv_id, remove_ours
from mailstack.mailauth.spf import check_spf
from mailstack.mailauth.testing import ZoneResolver, serve_zone
from mailstack.mailauth.verify import (
    Authenticator,
    AuthResults,
    PolicyOptions,
    policy_verdict,
)
from tests.test_mailauth_dkim import key_set, zone_for

GOOD_IP = "192.0.2.10"    # allowed by example.org's SPF
OTHER_IP = "203.0.113.9"  # allowed by nobody


def zone():
    records = {
        "example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all", "google-site-verification=x"]},
        "_dmarc.example.org": {"TXT": ["v=DMARC1; p=reject; sp=quarantine; "
                                       "rua=mailto:dmarc@example.org"]},
        "bounces.example.org": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "softfail.example": {"TXT": ["v=spf1 ~all"]},
        "neutral.example": {"TXT": ["v=spf1 ?all"]},
        "permerror.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 bogus:x -all"]},
        "twice.example": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},
        "quarantine.example": {"TXT": ["v=spf1 -all"]},
        "_dmarc.quarantine.example": {"TXT": ["v=DMARC1; p=quarantine"]},
        "sampled.example": {"TXT": ["v=spf1 -all"]},
        "_dmarc.sampled.example": {"TXT": ["v=DMARC1; p=reject; pct=0"]},
        "strict.example": {"TXT": ["v=spf1 -all"]},
        "_dmarc.strict.example": {"TXT": ["v=DMARC1; p=reject; adkim=s; aspf=s"]},
        "mail.strict.example": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
        "nodmarc.example": {"TXT": ["v=spf1 -all"]},
        "relay.example.net": {"TXT": ["v=spf1 ip4:203.0.113.0/24 -all"],
                              "A": ["203.0.113.9"]},
    }
    records.update(zone_for(key_set()))
    return records


def message(sender="Alice <alice@example.org>", extra=b""):
    return (b"From: " + sender.encode() + b"\nTo: bob@example.net\nSubject: hi\n"
            b"Date: Sun, 29 Nov 2026 18:00:00 +0000\nMessage-ID: <m1@example.org>\n" + extra +
            b"\nbody\n")


def parse(header):
    """
    The field parsed by authres: (authserv-id, [(method, result,
    {property: value})]).
    """
    text = header.decode("ascii")
    self_check = text.endswith("\n") and text.count("Authentication-Results:") == 1
    assert self_check, text
    parsed = authres.AuthenticationResultsHeader.parse(text.replace("\n\t", " ").strip())
    return parsed.authserv_id, [
        (r.method, r.result, {f"{p.type}.{p.name}": p.value for p in r.properties})
        for r in parsed.results]


class SPFTests(TestCase):
    def setUp(self):
        self.zone = ZoneResolver(zone(), servfail={"tempfail.example"})
        self.cache = DNSCache(self.zone, reactor, timeout=1)

    def spf(self, ip, sender, helo="client.example.net"):
        return Deferred.fromCoroutine(check_spf(self.cache, ip, sender, helo))

    async def test_results(self):
        """
        pass, fail, softfail, neutral, none, permerror (a bad mechanism; two
        records) and temperror (SERVFAIL) for the MAIL FROM identity.
        """
        for ip, sender, expected in (
            (GOOD_IP, "a@example.org", "pass"),
            (OTHER_IP, "a@example.org", "fail"),
            (OTHER_IP, "a@softfail.example", "softfail"),
            (OTHER_IP, "a@neutral.example", "neutral"),
            (OTHER_IP, "a@unknown.example", "none"),
            (OTHER_IP, "a@permerror.example", "permerror"),
            (OTHER_IP, "a@twice.example", "permerror"),
            (OTHER_IP, "a@tempfail.example", "temperror"),
            ("2001:db8::1", "a@example.org", "fail"),
        ):
            result = await self.spf(ip, sender)
            self.assertEqual((result.result, result.identity, result.sender),
                             (expected, "mailfrom", sender), (ip, sender))
            self.assertEqual(result.domain, sender.partition("@")[2])

    async def test_helo_and_cache(self):
        """
        A null sender is checked as postmaster@HELO; each name is asked of
        DNS once, later checks use the cache.
        """
        result = await self.spf(OTHER_IP, "", "relay.example.net")
        self.assertEqual((result.result, result.identity, result.domain),
                         ("pass", "helo", "relay.example.net"))
        await self.spf(GOOD_IP, "a@example.org")
        await self.spf(OTHER_IP, "b@example.org")
        self.assertEqual(self.zone.queries.count((16, "example.org")), 1)

    async def test_many_lookups(self):
        """
        A record within RFC 7208's limits that needs 67 lookups (six "mx"
        mechanisms of ten hosts each) is evaluated to the end; an eleventh
        lookup mechanism is permerror.
        """
        names = "abcdef"
        record = "v=spf1 " + " ".join(f"mx:{n}.example" for n in names) + " -all"
        self.zone.zone["many.example"] = {"TXT": [record]}
        for n in names:
            self.zone.zone[f"{n}.example"] = {"MX": [(i, f"mx{i}.{n}.example")
                                                     for i in range(10)]}
            for i in range(10):
                address = f"198.51.100.{i + 10 * names.index(n)}"
                self.zone.zone[f"mx{i}.{n}.example"] = {"A": [address]}
        result = await self.spf("198.51.100.59", "a@many.example")
        self.assertEqual(result.result, "pass")
        self.assertEqual((await self.spf("198.51.100.99", "a@many.example")).result, "fail")
        self.zone.zone["toomany.example"] = {"TXT": ["v=spf1 " + " ".join(
            f"a:{n}{i}.example" for n in "ab" for i in range(6)) + " -all"]}
        for n in "ab":
            for i in range(6):
                self.zone.zone[f"{n}{i}.example"] = {"A": ["192.0.2.99"]}
        self.assertEqual((await self.spf("198.51.100.99", "a@toomany.example")).result,
                         "permerror")

    def test_timeout(self):
        """
        A DNS server that never answers gives temperror after the time limit.
        """
        from twisted.internet.task import Clock
        clock = Clock()
        self.zone.silent.add("slow.example")
        cache = DNSCache(self.zone, clock, timeout=10)
        pending = Deferred.fromCoroutine(check_spf(cache, OTHER_IP, "a@slow.example", "x.example"))
        clock.advance(9)
        self.assertNoResult(pending)
        clock.advance(1)
        result = self.successResultOf(pending)
        self.assertEqual((result.result, result.identity), ("temperror", "mailfrom"))


class AuthenticateTests(TestCase):
    def setUp(self):
        self.zone = ZoneResolver(zone(), servfail={"_dmarc.tempfail.example",
                                                   "tempfail.example"})
        self.auth = Authenticator("mx.test", self.zone, reactor, timeout=1)

    def check(self, data, ip, mail_from, helo="client.example.net"):
        return Deferred.fromCoroutine(self.auth.authenticate(data, ip, helo, mail_from))

    def signed(self, data):
        return DKIMSigner(key_set()).sign(data) + data

    async def test_dkim_pass_spf_fail_dmarc_pass(self):
        """
        Mail signed by example.org from a host its SPF does not list (a
        forwarder): DKIM passes twice, SPF fails, DMARC passes through the
        aligned signatures; the field says so property by property, and the
        verdict is accept.
        """
        results = await self.check(self.signed(message()), OTHER_IP, "alice@example.org")
        ident, entries = parse(results.header())
        self.assertEqual(ident, "mx.test")
        dkim = [e for e in entries if e[0] == "dkim"]
        self.assertEqual([e[1] for e in dkim], ["pass", "pass"])
        self.assertEqual({e[2]["header.s"] for e in dkim}, {"s1-rsa", "s1-ed25519"})
        self.assertEqual({e[2]["header.a"] for e in dkim}, {"rsa-sha256", "ed25519-sha256"})
        self.assertEqual({e[2]["header.d"] for e in dkim}, {"example.org"})
        self.assertTrue(all(len(e[2]["header.b"]) == 8 for e in dkim))
        self.assertIn(("spf", "fail", {"smtp.mailfrom": "alice@example.org"}), entries)
        self.assertIn(("spf", "none", {"smtp.helo": "client.example.net"}), entries)
        self.assertIn(("dmarc", "pass", {"header.from": "example.org"}), entries)
        self.assertIn(b"dmarc=pass (p=reject dis=none)", results.header())
        self.assertEqual(policy_verdict(results).action, "accept")

    async def test_spf_alignment(self):
        """
        Unsigned mail passes DMARC through SPF when the MAIL FROM domain is
        in the From domain's organisation (relaxed), not under aspf=s.
        """
        results = await self.check(message(), GOOD_IP, "b@bounces.example.org")
        self.assertEqual((results.spf.result, results.dmarc.result), ("pass", "pass"))
        _, entries = parse(results.header())
        self.assertIn(("dkim", "none", {}), entries)
        results = await self.check(message("a@strict.example"), GOOD_IP,
                                   "b@mail.strict.example")
        self.assertEqual((results.spf.result, results.dmarc.result), ("pass", "fail"))

    async def test_dmarc_reject(self):
        """
        Unsigned mail with a From of example.org (p=reject) from a host SPF
        does not allow: DMARC fails, the verdict is 550 5.7.1.
        """
        results = await self.check(message(), OTHER_IP, "alice@example.org")
        _, entries = parse(results.header())
        self.assertIn(("dmarc", "fail", {"header.from": "example.org"}), entries)
        self.assertIn(b"(p=reject dis=reject", results.header())
        verdict = policy_verdict(results)
        self.assertEqual((verdict.action, verdict.code, verdict.enhanced),
                         ("reject", 550, "5.7.1"))
        self.assertIn("example.org", verdict.text)
        self.assertEqual(policy_verdict(results, PolicyOptions(dmarc_reject=False)).folder,
                         "Junk")
        self.assertEqual(policy_verdict(results, PolicyOptions(
            dmarc_reject=False, dmarc_quarantine=False)).action, "accept")

    async def test_dmarc_quarantine(self):
        """
        p=quarantine files into Junk; a subdomain gets the sp= policy of the
        organisational domain's record; pct=0 lowers reject to quarantine.
        """
        results = await self.check(message("x@quarantine.example"), OTHER_IP,
                                   "x@quarantine.example")
        self.assertEqual((results.dmarc.result, results.dmarc.policy), ("fail", "quarantine"))
        verdict = policy_verdict(results)
        self.assertEqual((verdict.action, verdict.folder), ("quarantine", "Junk"))
        results = await self.check(message("x@news.example.org"), OTHER_IP, "")
        self.assertEqual((results.dmarc.result, results.dmarc.policy), ("fail", "quarantine"))
        self.assertEqual(policy_verdict(results).action, "quarantine")
        results = await self.check(message("x@sampled.example"), OTHER_IP, "x@sampled.example")
        self.assertEqual((results.dmarc.policy, results.dmarc.disposition),
                         ("reject", "quarantine"))
        self.assertEqual(policy_verdict(results).action, "quarantine")

    async def test_dkim_strict_and_tampered(self):
        """
        adkim=s: a signature of the parent domain does not align.  A changed
        body fails DKIM and so DMARC.
        """
        results = await self.check(self.signed(message("a@strict.example")), OTHER_IP, "")
        self.assertEqual(results.dmarc.result, "fail")
        tampered = self.signed(message()).replace(b"body", b"evil")
        results = await self.check(tampered, OTHER_IP, "alice@example.org")
        self.assertEqual([r.result for r in results.dkim], ["fail", "fail"])
        self.assertEqual(results.dmarc.result, "fail")

    async def test_errors_never_reject(self):
        """
        SERVFAIL for SPF and the DMARC record gives temperror, and the
        verdict is accept; no DMARC record is dmarc=none; two From domains
        are permerror.
        """
        results = await self.check(message("a@tempfail.example"), OTHER_IP,
                                   "a@tempfail.example")
        _, entries = parse(results.header())
        self.assertIn(("spf", "temperror", {"smtp.mailfrom": "a@tempfail.example"}), entries)
        self.assertIn(("dmarc", "temperror", {"header.from": "tempfail.example"}), entries)
        self.assertEqual(policy_verdict(results, PolicyOptions(spf_fail_reject=True)).action,
                         "accept")
        results = await self.check(message("a@nodmarc.example"), OTHER_IP, "a@nodmarc.example")
        self.assertEqual(results.dmarc.result, "none")
        self.assertEqual(policy_verdict(results).action, "accept")
        verdict = policy_verdict(results, PolicyOptions(spf_fail_reject=True))
        self.assertEqual((verdict.action, verdict.code, verdict.enhanced),
                         ("reject", 550, "5.7.23"))
        results = await self.check(message("a@example.org, b@evil.example"), GOOD_IP,
                                   "a@example.org")
        self.assertEqual(results.dmarc.result, "permerror")

    async def test_internationalised_domains(self):
        """
        A From and a MAIL FROM in an internationalised domain are looked up
        as A-labels (RFC 8616): SPF passes, DMARC aligns them and applies
        the domain's policy.
        """
        self.zone.zone["xn--bcher-kva.example"] = {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]}
        self.zone.zone["_dmarc.xn--bcher-kva.example"] = {"TXT": ["v=DMARC1; p=reject"]}
        data = message("Bücher <info@Bücher.example>")  # UTF-8 header (RFC 6532)
        results = await self.check(data, GOOD_IP, "info@bücher.example")
        self.assertEqual((results.spf.result, results.dmarc.result), ("pass", "pass"))
        self.assertEqual(results.dmarc.from_domain, "xn--bcher-kva.example")
        self.assertIn(b"smtp.mailfrom=info@xn--bcher-kva.example", results.header())
        results = await self.check(data, OTHER_IP, "info@bücher.example")
        self.assertEqual(policy_verdict(results).code, 550)

    async def test_hostile_input(self):
        """
        Non-ASCII and oversized names in DKIM tags, From and MAIL FROM give
        results (none or permerror), never a hang; values that are not
        printable ASCII show as "?" in a quoted value, kilobyte-long ones are
        cut.
        """
        data = (b"DKIM-Signature: v=1; a=rsa-sha256; d=ex\xc3\xbc.org; s=s\xff; h=from;"
                b" bh=abc; b=abc\n"
                b"DKIM-Signature: v=1; a=rsa-sha256; d=" + b"a" * 3000 + b".org; s=s1; h=from;"
                b" bh=abc; b=" + b"!" * 5000 + b"\n" + message("a@" + "b" * 70 + ".org"))
        results = await self.check(data, OTHER_IP, "x@b\u00fc.org", "h" * 70 + ".example")
        self.assertEqual(self.zone.queries.count((16, "xn--b-eha.org")), 1)
        self.assertEqual([r.result for r in results.dkim], ["permerror", "permerror"])
        self.assertEqual((results.spf.result, results.dmarc.result), ("none", "none"))
        header = results.header()
        self.assertTrue(all(len(line) <= 300 for line in header.splitlines()), header)
        self.assertIn(b'header.d="ex??.org"', header)
        self.assertIn(b"smtp.mailfrom=x@xn--b-eha.org", header)  # an A-label
        parse(header)

    async def test_through_dns_server(self):
        """
        The same checks through a real DNS server on loopback and the
        twisted.names client.
        """
        port, listening = serve_zone(reactor, self.zone)
        for p in listening:
            self.addCleanup(p.stopListening)
        auth = Authenticator("mx.test", Resolver(servers=[("127.0.0.1", port)],
                                                 reactor=reactor), reactor, timeout=5)
        results = await Deferred.fromCoroutine(auth.authenticate(
            self.signed(message()), OTHER_IP, "client.example.net", "alice@example.org"))
        self.assertEqual([r.result for r in results.dkim], ["pass", "pass"])
        self.assertEqual((results.spf.result, results.dmarc.result), ("fail", "pass"))
        results = await Deferred.fromCoroutine(auth.authenticate(
            message(), OTHER_IP, "client.example.net", "alice@example.org"))
        self.assertEqual(policy_verdict(results).code, 550)


class PureTests(SynchronousTestCase):
    def test_organizational_domain(self):
        """
        The Public Suffix List shipped with publicsuffixlist decides.
        """
        self.assertEqual(organizational_domain("a.b.example.co.uk"), "example.co.uk")
        self.assertEqual(organizational_domain("Mail.Example.ORG."), "example.org")
        self.assertEqual(organizational_domain("co.uk"), "co.uk")
        self.assertTrue(aligned("mail.example.org", "example.org", "r"))
        self.assertFalse(aligned("mail.example.org", "example.org", "s"))
        self.assertFalse(aligned("example.co.uk", "other.co.uk", "r"))

    def test_record(self):
        """
        Defaults are filled in; a bad p is none when rua is given and an
        error otherwise; v=DMARC1 must come first.
        """
        record = parse_record(b"v=DMARC1; p=quarantine; pct=50; adkim=s")
        self.assertEqual((record.policy, record.subdomain_policy, record.pct, record.adkim,
                          record.aspf), ("quarantine", "quarantine", 50, "s", "r"))
        self.assertEqual(parse_record(b"v=DMARC1; p=bogus; rua=mailto:x@y").policy, "none")
        self.assertRaises(DMARCRecordError, parse_record, b"v=DMARC1; p=bogus")
        self.assertRaises(DMARCRecordError, parse_record, b"p=reject; v=DMARC1")
        self.assertRaises(DMARCRecordError, parse_record, b"v=DMARC1; p=reject; p=none")

    def test_remove_ours(self):
        """
        Fields carrying our authserv-id go, however written (case, comments,
        folding, CRLF); others' fields, the rest of the header and the body
        stay byte for byte.
        """
        head = (b"Received: from x\n"
                b"Authentication-Results: MX.test; spf=pass smtp.mailfrom=a@b\n"
                b"Authentication-Results: (forged) mx.test\n\t(really); dkim=pass\n"
                b"Authentication-Results: other.example; spf=fail smtp.mailfrom=a@b\n"
                b"Authentication-Results: mx.test.evil; none\n"
                b"Authentication-Results: mx.test\n"
                b"Subject: x\n"
                b"\n"
                b"Authentication-Results: mx.test; body text stays\n")
        out = remove_ours(head, "mx.test")
        self.assertEqual(out, b"Received: from x\n"
                              b"Authentication-Results: other.example; spf=fail "
                              b"smtp.mailfrom=a@b\n"
                              b"Authentication-Results: mx.test.evil; none\n"
                              b"Subject: x\n"
                              b"\n"
                              b"Authentication-Results: mx.test; body text stays\n")
        self.assertEqual(remove_ours(head.replace(b"\n", b"\r\n"), "mx.test"),
                         out.replace(b"\n", b"\r\n"))
        self.assertEqual(authserv_id(b' "MX.test" ; none'), "mx.test")

    def test_header_quoting(self):
        """
        Values that are not tokens are quoted, comments escaped, controls
        dropped: the field stays one parsable field.
        """
        from mailstack.mailauth.dmarc import DMARCResult
        from mailstack.mailauth.spf import SPFResult
        results = AuthResults("mx.test", SPFResult("fail", "mailfrom", "example.org",
                                                   'we"ird\r\nX-Injected: 1@example.org',
                                                   "bad (host)"),
                              None, (), DMARCResult("none"))
        header = results.header()
        self.assertNotIn(b"\nX-Injected", header)
        _, entries = parse(header)
        self.assertEqual(entries[1][0:2], ("spf", "fail"))
