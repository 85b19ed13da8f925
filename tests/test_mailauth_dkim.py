"""
Tests for DKIM keys, signing and verification (L{mailstack.mailauth.keys},
L{mailstack.mailauth.dkim}).
"""

import os
import stat

import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.names.client import Resolver
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from mailstack.mailauth import keys
from mailstack.mailauth.dkim import DKIMSigner, sign_message, signed_fields, verify_dkim
from mailstack.mailauth.lookup import DNSCache
from mailstack.mailauth.testing import ZoneResolver, serve_zone

MESSAGE = (b"From: Alice <alice@example.org>\n"
           b"To: bob@example.net\n"
           b"Subject: the plan\n"
           b"Date: Sun, 29 Nov 2026 18:00:00 +0000\n"
           b"Message-ID: <1@example.org>\n"
           b"Received: from somewhere\n"
           b"\n"
           b"Hello,\n\nthe plan is   unchanged.\n")

_KEYS = {}


def key_set(data_dir=None, domain="example.org", selector="s1"):
    """
    Keys made once per test run (RSA generation is slow), copied into
    C{data_dir} when given.
    """
    if (domain, selector) not in _KEYS:
        import tempfile
        where = tempfile.mkdtemp(prefix="dkim-")
        _KEYS[domain, selector] = keys.generate(where, domain, selector)[0]
    made = _KEYS[domain, selector]
    if data_dir is not None:
        directory = keys.domain_dir(data_dir, domain)
        os.makedirs(directory, exist_ok=True)
        for key in made:
            with open(os.path.join(directory, key.selector + ".key"), "wb") as f:
                f.write(key.pem)
        keys.activate(data_dir, domain, selector)
    return made


def zone_for(made):
    return {key.record_name(): {"TXT": [key.public_record()]} for key in made}


def dnsfunc(made):
    records = {key.record_name().encode() + b".": key.public_record().encode() for key in made}
    return lambda name, timeout=5: records.get(name)


class KeygenTests(SynchronousTestCase):
    def setUp(self):
        self.data = self.mktemp()
        os.makedirs(self.data)

    def test_layout(self):
        """
        keygen makes an RSA-2048 and an Ed25519 key, mode 0600, named after
        their selectors; the domain's first set is active, a later one is
        not until activated.
        """
        made, active = keys.generate(self.data, "Example.ORG", "202611")
        self.assertTrue(active)
        self.assertEqual([(k.selector, k.algorithm) for k in made],
                         [("202611-rsa", "rsa"), ("202611-ed25519", "ed25519")])
        directory = os.path.join(self.data, "dkim", "example.org")
        self.assertEqual(sorted(os.listdir(directory)),
                         ["202611-ed25519.key", "202611-rsa.key", "active"])
        for name in ("202611-ed25519.key", "202611-rsa.key"):
            mode = stat.S_IMODE(os.stat(os.path.join(directory, name)).st_mode)
            self.assertEqual(mode, 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(directory).st_mode), 0o700)
        from cryptography.hazmat.primitives import serialization
        rsa_key = serialization.load_pem_private_key(made[0].pem, None)
        self.assertEqual(rsa_key.key_size, 2048)
        self.assertEqual(keys.signing_keys(self.data, "example.org"), made)

        later, active = keys.generate(self.data, "example.org", "202612")
        self.assertFalse(active)
        self.assertEqual(keys.active_selector(self.data, "example.org"), "202611")
        keys.activate(self.data, "example.org", "202612")
        self.assertEqual(keys.signing_keys(self.data, "example.org"), later)
        self.assertEqual(sorted(keys.key_sets(self.data, "example.org")), ["202611", "202612"])

    def test_owner(self):
        """
        Run as root for a data directory owned by another user, the keys and
        their directories belong to that user.
        """
        if os.geteuid() != 0:
            raise SkipTest("needs root")
        os.chown(self.data, 65534, 65534)
        keys.generate(self.data, "example.org", "o1")
        for path in ("dkim", "dkim/example.org", "dkim/example.org/o1-rsa.key",
                     "dkim/example.org/o1-ed25519.key", "dkim/example.org/active"):
            st = os.stat(os.path.join(self.data, path))
            self.assertEqual((st.st_uid, st.st_gid), (65534, 65534), path)

    def test_refusals(self):
        """
        An existing key set is never overwritten; bad domains and selectors
        (a path, a dot, an empty name) are refused; activating a set that
        does not exist fails.
        """
        keys.generate(self.data, "example.org", "a1")
        with open(os.path.join(self.data, "dkim", "example.org", "a1-rsa.key"), "rb") as f:
            before = f.read()
        self.assertRaises(keys.DKIMKeyError, keys.generate, self.data, "example.org", "a1")
        with open(os.path.join(self.data, "dkim", "example.org", "a1-rsa.key"), "rb") as f:
            self.assertEqual(f.read(), before)
        for domain in ("../etc", "a/b", "", "-x.org", "x..org"):
            self.assertRaises(keys.DKIMKeyError, keys.generate, self.data, domain, "b1")
        for selector in ("../x", "a.b", "", "-a", "A B"):
            self.assertRaises(keys.DKIMKeyError, keys.generate, self.data, "example.org",
                              selector)
        self.assertRaises(keys.DKIMKeyError, keys.activate, self.data, "example.org", "zz")
        self.assertFalse(os.path.exists(os.path.join(self.data, "etc")))

    def test_records(self):
        """
        The TXT records parse as DKIM keys of the right type (dkimpy), and
        the zone line splits the RSA record into strings of at most 255
        characters that join back to the record.
        """
        made = key_set()
        for key, ktag in zip(made, (b"rsa", b"ed25519")):
            _, _, found, _ = dkim.evaluate_pk(key.record_name(), key.public_record())
            self.assertEqual(found, ktag)
        line = made[0].zone_line()
        self.assertTrue(line.startswith("s1-rsa._domainkey.example.org. IN TXT \""))
        strings = line.split(" IN TXT ")[1].split('" "')
        self.assertGreater(len(strings), 1)
        self.assertTrue(all(len(s.strip('"')) <= 255 for s in strings))
        self.assertEqual("".join(s.strip('"') for s in strings), made[0].public_record())


class SigningTests(SynchronousTestCase):
    def test_both_algorithms_verify(self):
        """
        The signer prepends an rsa-sha256 and an ed25519-sha256 signature,
        relaxed/relaxed, with LF line endings; dkimpy verifies each against
        the published key, with LF or CRLF line endings.
        """
        made = key_set()
        fields = DKIMSigner(made).sign(MESSAGE)
        self.assertNotIn(b"\r", fields)
        signed = fields + MESSAGE
        d = dkim.DKIM(signed)
        algorithms = []
        for idx in range(2):
            self.assertTrue(d.verify(idx, dnsfunc=dnsfunc(made)))
            algorithms.append(d.signature_fields[b"a"])
            self.assertEqual(d.signature_fields[b"c"], b"relaxed/relaxed")
            self.assertTrue(dkim.DKIM(signed.replace(b"\n", b"\r\n")).verify(
                idx, dnsfunc=dnsfunc(made)))
        self.assertEqual(sorted(algorithms), [b"ed25519-sha256", b"rsa-sha256"])

    def test_tampering(self):
        """
        A changed body, a changed Subject, or an added From, Subject or
        Reply-To (over-signed) breaks both signatures; an added Received
        field does not.
        """
        made = key_set()
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        changes = [
            signed.replace(b"unchanged", b"changed"),
            signed.replace(b"Subject: the plan", b"Subject: the new plan"),
            signed.replace(b"From: Alice", b"From: evil@example.com\nFrom: Alice"),
            signed.replace(b"\n\nHello", b"\nSubject: other\n\nHello"),
            signed.replace(b"\n\nHello", b"\nReply-To: evil@example.com\n\nHello"),
        ]
        for changed in changes:
            for idx in range(2):
                try:
                    good = dkim.DKIM(changed).verify(idx, dnsfunc=dnsfunc(made))
                except dkim.ValidationError:
                    good = False
                self.assertFalse(good, changed)
        relayed = b"Received: from relay\n" + signed
        for idx in range(2):
            self.assertTrue(dkim.DKIM(relayed).verify(idx, dnsfunc=dnsfunc(made)))

    def test_sign_message(self):
        """
        sign_message signs with the active set of the From domain when it is
        local, and returns nothing for another domain, a local domain
        without keys, or a From with two domains.
        """
        data = self.mktemp()
        made = key_set(data)
        fields = sign_message(data, MESSAGE, ["example.org", "example.net"])
        self.assertEqual(fields.count(b"DKIM-Signature:"), 2)
        for idx in range(2):
            self.assertTrue(dkim.DKIM(fields + MESSAGE).verify(idx, dnsfunc=dnsfunc(made)))
        self.assertEqual(sign_message(data, MESSAGE, ["example.net"]), b"")
        other = MESSAGE.replace(b"alice@example.org", b"alice@example.net")
        self.assertEqual(sign_message(data, other, ["example.org", "example.net"]), b"")
        two = MESSAGE.replace(b"<alice@example.org>", b"<alice@example.org>, x@example.net")
        self.assertEqual(sign_message(data, two, ["example.org", "example.net"]), b"")

    def test_signed_fields(self):
        """
        From, Reply-To, Subject, To and Cc are over-signed even when absent;
        Date and Message-ID only when present; Received never.
        """
        fields = signed_fields(MESSAGE)
        self.assertEqual(fields.count(b"from"), 2)
        self.assertEqual(fields.count(b"reply-to"), 1)
        self.assertEqual(fields.count(b"cc"), 1)
        self.assertEqual(fields.count(b"date"), 2)
        self.assertEqual(fields.count(b"message-id"), 2)
        self.assertNotIn(b"received", fields)
        bare = b"From: a@example.org\n\nbody\n"
        self.assertEqual(signed_fields(bare).count(b"date"), 0)
        self.assertEqual(signed_fields(bare).count(b"subject"), 1)


class VerifyTests(TestCase):
    def verify(self, message, zone, **resolver):
        cache = DNSCache(ZoneResolver(zone, **resolver), reactor, timeout=1)
        return Deferred.fromCoroutine(verify_dkim(message, cache, reactor))

    async def test_pass_and_fail(self):
        """
        Every signature is verified: both pass on an untouched message, both
        fail on a changed body, with domain, selector, algorithm and the
        start of b= reported.
        """
        made = key_set()
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        results = await self.verify(signed, zone_for(made))
        self.assertEqual([r.result for r in results], ["pass", "pass"])
        self.assertEqual({r.selector for r in results}, {"s1-rsa", "s1-ed25519"})
        self.assertEqual({r.algorithm for r in results}, {"rsa-sha256", "ed25519-sha256"})
        self.assertEqual({r.domain for r in results}, {"example.org"})
        self.assertTrue(all(len(r.b) == 8 for r in results))
        results = await self.verify(signed.replace(b"plan is", b"plan was"), zone_for(made))
        self.assertEqual([r.result for r in results], ["fail", "fail"])
        self.assertEqual(await self.verify(MESSAGE, zone_for(made)), [])

    async def test_key_problems(self):
        """
        No key is permerror, a malformed key is permerror, SERVFAIL or a
        timeout is temperror, a malformed signature is permerror.
        """
        made = key_set()
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        results = await self.verify(signed, {})
        self.assertEqual([(r.result, r.reason) for r in results],
                         [("permerror", "no key")] * 2)
        results = await self.verify(signed, {k.record_name(): {"TXT": ["v=DKIM1; k=rsa; p=@@"]}
                                             for k in made})
        self.assertEqual([r.result for r in results], ["permerror"] * 2)
        results = await self.verify(signed, {}, servfail={k.record_name() for k in made})
        self.assertEqual([r.result for r in results], ["temperror"] * 2)
        clock = Clock()
        cache = DNSCache(ZoneResolver({}, silent={k.record_name() for k in made}), clock, 10)
        pending = Deferred.fromCoroutine(verify_dkim(signed, cache, reactor))
        clock.advance(10)
        results = await pending
        self.assertEqual([r.result for r in results], ["temperror"] * 2)
        broken = b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org\n" + MESSAGE
        results = await self.verify(broken, zone_for(made))
        self.assertEqual([r.result for r in results], ["permerror"])

    async def test_huge_header(self):
        """
        The header is never parsed with dkimpy's parser (quadratic: minutes
        for a hostile header of megabytes) on the reactor thread; a
        signed message whose header section is over MAX_HEADER is not
        verified (policy), the signatures still named.
        """
        import threading

        from mailstack.mailauth import dkim as ours

        made = key_set()
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        padded = (DKIMSigner(made).sign(MESSAGE) + b"X-Padding: a\n" +
                  b" b\n" * (ours.MAX_HEADER // 3) + MESSAGE)
        threads = []
        real = dkim.rfc822_parse

        def recording(message):
            threads.append(threading.current_thread())
            return real(message)

        self.patch(dkim, "rfc822_parse", recording)
        results = await self.verify(signed, zone_for(made))
        self.assertEqual([r.result for r in results], ["pass", "pass"])
        self.assertTrue(threads)
        self.assertNotIn(threading.main_thread(), threads)
        threads.clear()
        self.assertEqual(await self.verify(MESSAGE, zone_for(made)), [])
        self.assertEqual(threads, [])  # nothing to verify: dkimpy's parser not called
        results = await self.verify(padded, zone_for(made))
        self.assertEqual([(r.result, r.domain) for r in results], [("policy", "example.org")] * 2)
        self.assertEqual(threads, [])

    def test_parse_header(self):
        """
        parse_header gives what dkimpy's rfc822_parse gives, LF or CRLF,
        folded fields, an mbox From_ line, an empty header, without the
        body; and raises MessageFormatError for a header line without a
        name.
        """
        from mailstack.mailauth.dkim import parse_header

        for message in (MESSAGE, MESSAGE.replace(b"\n", b"\r\n"), b"\nbody",
                        b"A: b\n\tc\n  d\nE:f", b"From x\nA: b\n\n", b"",
                        b"A: b\r\n c\r\n\r\nD: not a field\r\n", b"A:\n\n\n"):
            self.assertEqual(parse_header(message),
                             [tuple(field) for field in dkim.rfc822_parse(message)[0]],
                             message)
        self.assertRaises(dkim.MessageFormatError, parse_header, b"bad line\n\n")
        self.assertRaises(dkim.MessageFormatError, parse_header, b" x\nA: b\n\n")

    async def test_signature_limit(self):
        """
        Only the first five signatures are checked (each costs a lookup and
        a body hash); the genuine ones on top still pass.
        """
        made = key_set()
        forged = b"".join(b"DKIM-Signature: v=1; a=rsa-sha256; d=x%d.example; s=s; h=from;"
                          b" bh=YWJj; b=YWJj\n" % i for i in range(50))
        signed = DKIMSigner(made).sign(MESSAGE) + forged + MESSAGE
        zone = ZoneResolver(zone_for(made))
        cache = DNSCache(zone, reactor, timeout=1)
        results = await Deferred.fromCoroutine(verify_dkim(signed, cache, reactor))
        self.assertEqual([r.result for r in results], ["pass", "pass"] + ["permerror"] * 3)
        self.assertEqual(len(zone.queries), 5)

    async def test_through_dns_server(self):
        """
        Keys come through a real DNS server on loopback (the RSA record is
        longer than one TXT string) with twisted.names' client.
        """
        made = key_set()
        zone = ZoneResolver(zone_for(made))
        port, listening = serve_zone(reactor, zone)
        for p in listening:
            self.addCleanup(p.stopListening)
        client = Resolver(servers=[("127.0.0.1", port)], reactor=reactor)
        cache = DNSCache(client, reactor, timeout=5)
        signed = DKIMSigner(made).sign(MESSAGE) + MESSAGE
        results = await Deferred.fromCoroutine(verify_dkim(signed, cache, reactor))
        self.assertEqual([r.result for r in results], ["pass", "pass"])
