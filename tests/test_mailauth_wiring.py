"""
Mail authentication wired into the server (issue 17), through real
servers on 127.0.0.1 port 0 and real clients (smtplib):

 - the receiving MTA's built-in C{auth-checks} filter: SPF, DKIM and DMARC
   against a test DNS server on loopback (the server uses it through
   C{--dns-server}), the C{Authentication-Results} field of the delivered
   Maildir file checked field by field, the DMARC and SPF policy options;
 - the built-in C{dkim-sign} transform: mail of a local domain with a key
   set, submitted, injected with C{mailstack sendmail} or bounced, arrives
   at the remote MTA signed with both algorithms, verified by dkimpy with
   the keys the test DNS serves; mail that is not ours is not signed.
"""

import os
import smtplib
import threading
from types import SimpleNamespace

import authres
import dkim
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.names.client import Resolver
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import parse_address
from mailstack.config import ConfigError, build_config
from mailstack.mailauth import keys, signing
from mailstack.mailauth.checks import AuthChecksFilter
from mailstack.mailauth.dkim import DKIMSigner
from mailstack.mailauth.testing import ZoneResolver, serve_zone
from mailstack.message import Envelope, MessageSpool
from mailstack.plugin import listing
from mailstack.smtp.client import Timeouts
from mailstack.testing import FakeResolver
from tests.support import (
    add_user, client_context, in_thread, read_messages, smtp_session,
    start_server,
)
from tests.test_mailauth_dkim import key_set, zone_for
from tests.test_relay import Sink
from tests.test_sendmail import sendmail

LISTEN = "tcp:0:interface=127.0.0.1"

# The client is 127.0.0.1: domains whose SPF allows it, and others.
ZONE = {
    "pass.test": {"TXT": ["v=spf1 ip4:127.0.0.0/8 -all"]},
    "_dmarc.pass.test": {"TXT": ["v=DMARC1; p=reject"]},
    "fail.test": {"TXT": ["v=spf1 ip4:192.0.2.0/24 -all"]},
    "softfail.test": {"TXT": ["v=spf1 ~all"]},
    "neutral.test": {"TXT": ["v=spf1 ?all"]},
    "permerror.test": {"TXT": ["v=spf1 -all", "v=spf1 +all"]},  # two records
    "client.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},      # the HELO name
    "reject.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.reject.test": {"TXT": ["v=DMARC1; p=reject"]},
    "quarantine.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.quarantine.test": {"TXT": ["v=DMARC1; p=quarantine"]},
    "nopolicy.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.nopolicy.test": {"TXT": ["v=DMARC1; p=none"]},
    "signed.test": {"TXT": ["v=spf1 -all"]},
    "_dmarc.signed.test": {"TXT": ["v=DMARC1; p=reject"]},
    "dmarcfail.test": {"TXT": ["v=spf1 ip4:127.0.0.1 -all"]},
}
SERVFAIL = {"temperror.test", "_dmarc.dnsfail.test", "dnsfail.test"}


def message(sender, subject="hello", body=b"body line\n"):
    return (f"From: {sender}\r\nTo: alice@localhost\r\nSubject: {subject}\r\n"
            f"Date: Sun, 29 Nov 2026 18:00:00 +0000\r\nMessage-ID: <m1@x.test>\r\n\r\n"
            ).encode() + body.replace(b"\n", b"\r\n")


def parse(header):
    """
    An Authentication-Results field parsed by authres (an independent
    parser): (authserv-id, {method or method.identity: (result, props)}).
    """
    text = header.decode("ascii").replace("\n\t", " ").replace("\n", "").strip()
    parsed = authres.AuthenticationResultsHeader.parse(text)
    results = {}
    for r in parsed.results:
        props = {f"{p.type}.{p.name}": p.value for p in r.properties}
        key = r.method
        if r.method == "spf":
            key = "spf.helo" if "smtp.helo" in props else "spf.mailfrom"
        results.setdefault(key, []).append((r.result, props))
    return parsed.authserv_id, results


def header_fields(stored, name):
    """
    The fields called C{name} of a stored message (LF endings), unfolded
    lines kept.
    """
    head = stored.split(b"\n\n", 1)[0]
    fields, current = [], None
    for line in head.split(b"\n"):
        if line[:1] in (b" ", b"\t") and current is not None:
            fields[current] += b"\n" + line
            continue
        current = None
        if line.lower().startswith(name.lower().encode() + b":"):
            fields.append(line)
            current = len(fields) - 1
    return fields


class ReceivingChecksTests(TestCase):
    """
    The receiving MTA checks mail from the internet against the test DNS.
    """

    @inlineCallbacks
    def setUp(self):
        # The test clients stand in for the internet from 127.0.0.1.
        self.patch(AuthChecksFilter, "check_loopback", True)
        self.made = key_set(domain="signed.test", selector="s1")
        zone = dict(ZONE)
        zone.update(zone_for(self.made))
        self.zone = ZoneResolver(zone, servfail=SERVFAIL)
        port, listening = serve_zone(reactor, self.zone)
        for p in listening:
            self.addCleanup(p.stopListening)
        self.dns_port = port
        self.server = yield self.start()

    @inlineCallbacks
    def start(self, **options):
        server = yield start_server(self, resolver=False, smtp=LISTEN,
                                    dns_server=f"127.0.0.1:{self.dns_port}", **options)
        add_user(server, "alice@localhost")
        return server

    def send(self, mail_from, content, helo="client.test", server=None):
        """
        Send with smtplib; returns (code, text) of the reply to DATA.
        """
        port = (server or self.server).ports["smtp"]

        def talk(client):
            client.ehlo(helo)
            try:
                client.sendmail(mail_from, ["alice@localhost"], content)
            except smtplib.SMTPDataError as e:
                return e.smtp_code, e.smtp_error
            return 250, b""
        return in_thread(smtp_session, port, talk)

    def delivered(self, folder=None, server=None):
        server = server or self.server
        if folder is None:
            return read_messages(server, "alice@localhost")
        path = os.path.join(server.data_dir, "mail", "localhost", "alice", f".{folder}", "new")
        if not os.path.isdir(path):
            return []
        out = []
        for name in sorted(os.listdir(path)):
            with open(os.path.join(path, name), "rb") as f:
                out.append(f.read())
        return out

    def results(self, stored):
        [field] = header_fields(stored, "Authentication-Results")
        authserv, results = parse(field)
        self.assertEqual(authserv, "mx.test")
        return results

    @inlineCallbacks
    def test_spf_results(self):
        """
        SPF of MAIL FROM gives pass, fail, softfail, neutral, temperror
        (SERVFAIL) and permerror (two records); the HELO identity is
        checked too; each delivered message carries one field, with our
        authserv-id, smtp.mailfrom and the DMARC result.  No SPF result
        refuses mail by default.
        """
        cases = [("pass", "pass"), ("fail", "fail"), ("softfail", "softfail"),
                 ("neutral", "neutral"), ("temperror", "temperror"),
                 ("permerror", "permerror")]
        for domain, _ in cases:
            code, text = yield self.send(f"bob@{domain}.test",
                                         message(f"bob@{domain}.test", subject=domain))
            self.assertEqual(code, 250, text)
        stored = self.delivered()
        self.assertEqual(len(stored), len(cases))
        by_subject = {}
        for item in stored:
            [subject] = header_fields(item, "Subject")
            by_subject[subject.split(b": ", 1)[1].decode()] = item
        for domain, expected in cases:
            results = self.results(by_subject[domain])
            [(result, props)] = results["spf.mailfrom"]
            self.assertEqual((result, props), (expected, {
                "smtp.mailfrom": f"bob@{domain}.test"}), domain)
            self.assertEqual(results["spf.helo"], [("pass", {"smtp.helo": "client.test"})])
            self.assertEqual(results["dkim"], [("none", {})])
            [(dmarc, dprops)] = results["dmarc"]
            self.assertEqual(dprops, {"header.from": f"{domain}.test"})
            # pass.test publishes p=reject and passes by aligned SPF; the
            # others have no DMARC record.
            self.assertEqual(dmarc, "pass" if domain == "pass" else "none", domain)

    @inlineCallbacks
    def test_null_sender_and_bad_helo(self):
        """
        A null sender is checked by its HELO name (smtp.helo only); a HELO
        that is an address literal has no SPF identity at all.
        """
        code, _ = yield self.send("", message("MAILER-DAEMON@client.test"))
        self.assertEqual(code, 250)
        code, _ = yield self.send("bob@pass.test", message("bob@pass.test"), helo="[127.0.0.1]")
        self.assertEqual(code, 250)
        first, second = self.delivered()
        results = self.results(first)
        self.assertNotIn("spf.mailfrom", results)
        self.assertEqual(results["spf.helo"], [("pass", {"smtp.helo": "client.test"})])
        self.assertEqual(results["dmarc"][0][0], "none")
        results = self.results(second)
        self.assertNotIn("spf.helo", results)
        self.assertEqual(results["spf.mailfrom"][0][0], "pass")

    @inlineCallbacks
    def test_dmarc_reject(self):
        """
        A From domain with p=reject and no aligned pass (SPF fails, no
        signature): 550 5.7.1 at the end of DATA, nothing delivered.
        """
        code, text = yield self.send("bob@fail.test", message("bob@reject.test"))
        self.assertEqual(code, 550)
        self.assertIn(b"5.7.1", text)
        self.assertIn(b"reject.test", text)
        self.assertEqual(self.delivered(), [])
        self.assertEqual(self.delivered("Junk"), [])

    @inlineCallbacks
    def test_dmarc_quarantine(self):
        """
        p=quarantine and no aligned pass: delivered into Junk, with the
        DMARC result and policy in the field.
        """
        code, _ = yield self.send("bob@quarantine.test", message("bob@quarantine.test"))
        self.assertEqual(code, 250)
        self.assertEqual(self.delivered(), [])
        [stored] = self.delivered("Junk")
        results = self.results(stored)
        self.assertEqual(results["spf.mailfrom"][0][0], "fail")
        [(dmarc, props)] = results["dmarc"]
        self.assertEqual((dmarc, props), ("fail", {"header.from": "quarantine.test"}))
        [field] = header_fields(stored, "Authentication-Results")
        self.assertIn(b"(p=quarantine dis=quarantine", field)

    @inlineCallbacks
    def test_dmarc_pass_and_fail_without_policy(self):
        """
        DMARC pass through aligned SPF (the record asks p=reject: the mail
        is delivered); DMARC fail where the record asks p=none (MAIL FROM
        of another domain): delivered into the inbox.
        """
        code, _ = yield self.send("bob@pass.test", message("Bob <bob@pass.test>"))
        self.assertEqual(code, 250)
        code, _ = yield self.send("bob@dmarcfail.test", message("bob@nopolicy.test"))
        self.assertEqual(code, 250)
        passed, failed = self.delivered()
        self.assertEqual(self.results(passed)["dmarc"],
                         [("pass", {"header.from": "pass.test"})])
        results = self.results(failed)
        self.assertEqual(results["spf.mailfrom"][0][0], "pass")  # but not aligned
        self.assertEqual(results["dmarc"], [("fail", {"header.from": "nopolicy.test"})])

    @inlineCallbacks
    def test_dkim_pass_and_fail(self):
        """
        A message signed with both algorithms by signed.test verifies
        (dkim=pass twice, DMARC pass through aligned DKIM though SPF
        fails); the same message with its body changed fails both
        signatures, and DMARC (p=reject) refuses it.
        """
        content = message("Carol <carol@signed.test>").replace(b"\r\n", b"\n")
        signed = DKIMSigner(self.made).sign(content) + content
        code, _ = yield self.send("carol@signed.test", signed.replace(b"\n", b"\r\n"))
        self.assertEqual(code, 250)
        [stored] = self.delivered()
        results = self.results(stored)
        self.assertEqual(results["spf.mailfrom"][0][0], "fail")
        self.assertEqual(sorted((r, p["header.s"], p["header.a"], p["header.d"])
                                for r, p in results["dkim"]),
                         [("pass", "s1-ed25519", "ed25519-sha256", "signed.test"),
                          ("pass", "s1-rsa", "rsa-sha256", "signed.test")])
        self.assertEqual(results["dmarc"], [("pass", {"header.from": "signed.test"})])

        tampered = signed.replace(b"body line", b"body lime")
        code, text = yield self.send("carol@signed.test", tampered.replace(b"\n", b"\r\n"))
        self.assertEqual((code, b"5.7.1" in text), (550, True))
        self.assertEqual(len(self.delivered()), 1)

    @inlineCallbacks
    def test_dkim_fail_delivered_without_policy(self):
        """
        With DMARC rejection off, a tampered signature is delivered, its
        field saying dkim=fail for both signatures and dmarc=fail; into
        Junk, since a reject policy falls back to quarantine.
        """
        server = yield self.start(dmarc_reject="no")
        content = message("carol@signed.test").replace(b"\r\n", b"\n")
        tampered = (DKIMSigner(self.made).sign(content) + content).replace(b"body", b"bodx")
        code, _ = yield self.send("carol@signed.test", tampered.replace(b"\n", b"\r\n"),
                                  server=server)
        self.assertEqual(code, 250)
        [stored] = self.delivered("Junk", server=server)
        results = self.results(stored)
        self.assertEqual([r for r, _ in results["dkim"]], ["fail", "fail"])
        self.assertEqual(results["dmarc"][0][0], "fail")

    @inlineCallbacks
    def test_policy_options(self):
        """
        --dmarc-quarantine no delivers p=quarantine failures into the inbox;
        --spf-fail-reject yes refuses an SPF fail with 550 5.7.23 (not a
        softfail).
        """
        server = yield self.start(dmarc_quarantine="no", spf_fail_reject="yes")
        code, _ = yield self.send("bob@softfail.test", message("bob@quarantine.test"),
                                  server=server)
        self.assertEqual(code, 250)
        [stored] = self.delivered(server=server)
        self.assertEqual(self.results(stored)["dmarc"][0][0], "fail")
        code, text = yield self.send("bob@fail.test", message("bob@fail.test"), server=server)
        self.assertEqual(code, 550)
        self.assertIn(b"5.7.23", text)
        self.assertEqual(len(self.delivered(server=server)), 1)

    @inlineCallbacks
    def test_policy_reloaded(self):
        """
        The policy options apply on SIGHUP (reload) to the next message:
        after --dmarc-reject becomes no, a p=reject failure goes to Junk.
        """
        import dataclasses

        from mailstack.reload import apply

        applied, restart = apply(self.server, dataclasses.replace(self.server.config,
                                                                  dmarc_reject=False))
        self.assertEqual((applied, restart), (["dmarc-reject"], []))
        code, _ = yield self.send("bob@fail.test", message("bob@reject.test"))
        self.assertEqual(code, 250)
        [stored] = self.delivered("Junk")
        self.assertEqual(self.results(stored)["dmarc"][0][0], "fail")

    @inlineCallbacks
    def test_dns_failure_never_rejects(self):
        """
        DNS that fails (SERVFAIL) for SPF and DMARC gives temperror and the
        message is delivered, even from a domain whose parent asks p=reject.
        """
        code, _ = yield self.send("bob@dnsfail.test", message("bob@dnsfail.test"))
        self.assertEqual(code, 250)
        [stored] = self.delivered()
        results = self.results(stored)
        self.assertEqual(results["spf.mailfrom"][0][0], "temperror")
        self.assertEqual(results["dmarc"][0][0], "temperror")

    @inlineCallbacks
    def test_forged_results_removed(self):
        """
        Fields with our authserv-id (any case, folded) are removed before
        ours is added; another server's field stays.
        """
        content = (b"Authentication-Results: MX.test; dmarc=pass\r\n\t(forged)\r\n"
                   b"Authentication-Results: other.test; spf=pass\r\n") + message("bob@pass.test")
        code, _ = yield self.send("bob@pass.test", content)
        self.assertEqual(code, 250)
        [stored] = self.delivered()
        self.assertNotIn(b"forged", stored)
        fields = header_fields(stored, "Authentication-Results")
        self.assertEqual(len(fields), 2)
        self.assertTrue(fields[0].startswith(b"Authentication-Results: mx.test;"))
        self.assertEqual(fields[1], b"Authentication-Results: other.test; spf=pass")

    @inlineCallbacks
    def test_forged_results_removed_without_body(self):
        """
        A forged field as the last line of a message that has no body (no
        empty line after the header) is removed too.
        """
        content = (message("bob@pass.test").split(b"\r\n\r\n")[0]
                   + b"\r\nAuthentication-Results: mx.test; dmarc=pass (forged)\r\n")
        code, _ = yield self.send("bob@pass.test", content)
        self.assertEqual(code, 250)
        [stored] = self.delivered()
        self.assertNotIn(b"forged", stored)
        [ours] = header_fields(stored, "Authentication-Results")
        self.assertTrue(ours.startswith(b"Authentication-Results: mx.test;"))

    @inlineCallbacks
    def test_loopback_not_checked(self):
        """
        Mail from a loopback client (this host's own programs) is not
        checked: no DNS lookup to wait for, no field added; a forged field
        with our id is still removed.
        """
        self.patch(AuthChecksFilter, "check_loopback", False)
        server = yield self.start()
        content = b"Authentication-Results: mx.test; dmarc=pass\r\n" + message("bob@reject.test")
        code, _ = yield self.send("bob@fail.test", content, server=server)
        self.assertEqual(code, 250)
        [stored] = self.delivered(server=server)
        self.assertEqual(header_fields(stored, "Authentication-Results"), [])
        self.assertEqual(self.zone.queries, [])

    @inlineCallbacks
    def test_relay_networks_not_checked(self):
        """
        Mail from a client in --relay-networks is not checked (no field, no
        DMARC refusal), but a forged field with our id is still removed.
        """
        server = yield self.start(relay_networks="127.0.0.0/8")
        content = b"Authentication-Results: mx.test; dmarc=pass\r\n" + message("bob@reject.test")
        code, _ = yield self.send("bob@fail.test", content, server=server)
        self.assertEqual(code, 250)
        [stored] = self.delivered(server=server)
        self.assertEqual(header_fields(stored, "Authentication-Results"), [])
        self.assertEqual([q for q in self.zone.queries if "reject.test" in q[1]], [])

    @inlineCallbacks
    def test_submission_not_checked(self):
        """
        Mail from an authenticated user (submission) is not checked.
        """
        server = yield self.start(submission=LISTEN)
        add_user(server, "bob@example.test")
        context = client_context(server)

        def submit(client):
            client.starttls(context=context)
            client.login("bob@example.test", "secret")
            client.sendmail("bob@example.test", ["alice@localhost"], message("bob@example.test"))

        yield in_thread(smtp_session, server.ports["submission"], submit, host="localhost")
        [stored] = self.delivered(server=server)
        self.assertEqual(header_fields(stored, "Authentication-Results"), [])

    @inlineCallbacks
    def test_turned_off(self):
        """
        --auth-checks no: nothing is checked or added, p=reject is not
        honoured.
        """
        server = yield self.start(auth_checks="no")
        code, _ = yield self.send("bob@fail.test", message("bob@reject.test"), server=server)
        self.assertEqual(code, 250)
        [stored] = self.delivered(server=server)
        self.assertEqual(header_fields(stored, "Authentication-Results"), [])


def published(domain, made, port):
    """
    Fetch the keys' TXT records from the test DNS server on C{port}: a
    dkimpy C{dnsfunc} answering from them.
    """
    resolver = Resolver(servers=[("127.0.0.1", port)], reactor=reactor)

    @inlineCallbacks
    def fetch():
        found = {}
        for key in made:
            name = key.record_name() + "."
            answers, _, _ = yield resolver.query(dns.Query(name, dns.TXT))
            found[name.encode()] = b"".join(
                b"".join(rr.payload.data) for rr in answers if rr.type == dns.TXT)
        return lambda name, timeout=5: found.get(name, b"")
    return fetch()


def verify_both(testcase, content, dnsfunc):
    """
    dkimpy verifies both signatures of C{content}; returns their tags.
    """
    headers, _ = dkim.rfc822_parse(content)
    sigs = [dkim.util.parse_tag_value(v) for n, v in headers if n.lower() == b"dkim-signature"]
    testcase.assertEqual(len(sigs), 2, content)
    for idx in range(2):
        testcase.assertTrue(dkim.DKIM(content).verify(idx, dnsfunc=dnsfunc), content)
    return sigs


class SigningTests(TestCase):
    """
    Mail of a local domain with a key set leaves signed.
    """

    @inlineCallbacks
    def setUp(self):
        self.sink = yield Sink().start(self)
        self.clock = Clock()
        self.resolver = FakeResolver(mx={"remote.test": [(10, "mx.remote.test")]},
                                     a={"mx.remote.test": ["127.0.0.10"]})
        self.data = None

    def endpoint(self, ip, port):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.sink.number, timeout=5)

    @inlineCallbacks
    def server(self, **options):
        from tests.support import short_tempdir

        data = short_tempdir(self)
        made, active = keys.generate(data, "example.test", "s1")
        self.assertTrue(active)
        self.made = made
        zone = ZoneResolver(zone_for(made))
        port, listening = serve_zone(reactor, zone)
        for p in listening:
            self.addCleanup(p.stopListening)
        self.dnsfunc = yield published("example.test", made, port)
        options.setdefault("submission", LISTEN)
        server = yield start_server(self, resolver=self.resolver, relay_endpoint=self.endpoint,
                                    clock=self.clock, relay_timeouts=Timeouts(5, 5, 5, 5, 5),
                                    data_dir=data, **options)
        yield server.queue.loaded
        add_user(server, "alice@example.test")
        add_user(server, "dave@localhost")
        return server

    @inlineCallbacks
    def run_queue(self, server, advance=0):
        self.clock.advance(advance)
        yield DeferredList(list(server.queue.active.values()))

    def submit(self, server, content, sender="alice@example.test", rcpts=("bob@remote.test",)):
        context = client_context(server)

        def talk(client):
            client.starttls(context=context)
            client.login(sender, "secret")
            client.sendmail(sender, list(rcpts), content)
        return in_thread(smtp_session, server.ports["submission"], talk, host="localhost")

    @inlineCallbacks
    def test_submission_signed_both_algorithms(self):
        """
        Submitted mail from alice@example.test reaches the remote MTA with
        an rsa-sha256 and an ed25519-sha256 signature, relaxed/relaxed,
        d=example.test, From/Subject/To over-signed; dkimpy verifies both
        with the keys the test DNS serves.  Mail for a local recipient from
        the same submission is signed too (it left a user's client).
        """
        server = yield self.server()
        arrived = self.sink.next_message()
        yield self.submit(server, message("Alice <alice@example.test>"),
                          rcpts=("bob@remote.test", "dave@localhost"))
        yield self.run_queue(server)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        sigs = verify_both(self, content, self.dnsfunc)
        self.assertEqual(sorted(s[b"a"] for s in sigs), [b"ed25519-sha256", b"rsa-sha256"])
        self.assertEqual(sorted(s[b"s"] for s in sigs), [b"s1-ed25519", b"s1-rsa"])
        for sig in sigs:
            self.assertEqual((sig[b"d"], sig[b"c"]), (b"example.test", b"relaxed/relaxed"))
            signed = [h.strip().lower() for h in sig[b"h"].split(b":")]
            for name, times in ((b"from", 2), (b"subject", 2), (b"to", 2), (b"cc", 1),
                                (b"date", 2), (b"message-id", 2)):
                self.assertEqual(signed.count(name), times, (name, signed))
        # The signatures are above our Received field (the sink adds its own).
        self.assertLess(content.index(b"DKIM-Signature"), content.index(b"by mx.test"))
        [local] = read_messages(server, "dave@localhost")
        verify_both(self, local, self.dnsfunc)

    @inlineCallbacks
    def test_signed_once(self):
        """
        The message is signed when it is queued, not per attempt: the
        remote MTA defers the first attempt; the second carries the same
        two signatures.
        """
        server = yield self.server()
        self.sink.policy.data_reply = (451, "4.3.0", "try later")
        yield self.submit(server, message("alice@example.test"))
        yield self.run_queue(server)
        self.assertEqual(self.sink.policy.received, [])
        self.sink.policy.data_reply = None
        arrived = self.sink.next_message()
        yield self.run_queue(server, 10 * 60)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        self.assertEqual(content.count(b"DKIM-Signature:"), 2)
        verify_both(self, content, self.dnsfunc)

    @inlineCallbacks
    def test_unsigned(self):
        """
        Not signed: mail whose From domain has no key (localhost), and mail
        with --dkim-sign no.
        """
        server = yield self.server()
        add_user(server, "carol@localhost")
        arrived = self.sink.next_message()
        yield self.submit(server, message("carol@localhost"), sender="carol@localhost")
        yield self.run_queue(server)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        self.assertNotIn(b"DKIM-Signature", content)

        self.sink.policy.received.clear()
        server = yield self.server(dkim_sign="no")
        arrived = self.sink.next_message()
        yield self.submit(server, message("alice@example.test"))
        yield self.run_queue(server)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        self.assertNotIn(b"DKIM-Signature", content)

    @inlineCallbacks
    def test_forwarded_mail_not_signed(self):
        """
        Mail from the internet claiming From: example.test, forwarded by an
        alias to a remote address, is not signed (that would vouch for a
        stranger); the same mail from a client in --relay-networks is.
        """
        server = yield self.server(smtp=LISTEN, auth_checks="no")
        server.aliases.add(parse_address("fwd@example.test"), (parse_address("bob@remote.test"),))

        def send(client):
            client.ehlo("client.test")
            client.sendmail("eve@elsewhere.test", ["fwd@example.test"],
                            message("alice@example.test"))

        arrived = self.sink.next_message()
        yield in_thread(smtp_session, server.ports["smtp"], send)
        yield self.run_queue(server)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        self.assertNotIn(b"DKIM-Signature", content)

        self.sink.policy.received.clear()
        server = yield self.server(smtp=LISTEN, relay_networks="127.0.0.0/8")

        def relay(client):
            client.ehlo("client.test")
            client.sendmail("alice@example.test", ["bob@remote.test"],
                            message("alice@example.test"))

        arrived = self.sink.next_message()
        yield in_thread(smtp_session, server.ports["smtp"], relay)
        yield self.run_queue(server)
        yield arrived
        [(_, _, content)] = self.sink.policy.received
        verify_both(self, content, self.dnsfunc)

    @inlineCallbacks
    def test_sendmail_and_bounce_signed(self):
        """
        Mail injected with the real `mailstack sendmail` command (the
        maildrop pickup, origin local) is signed; so is a bounce whose From
        is in a domain with a key.
        """
        server = yield self.server()
        arrived = self.sink.next_message()
        result = yield in_thread(sendmail, ["-i", "-f", "alice@example.test", "bob@remote.test"],
                                 message("alice@example.test").replace(b"\r\n", b"\n"),
                                 server.data_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        yield server.pickup.poke()
        yield self.run_queue(server)
        yield arrived
        content = self.sink.policy.received[-1][2]
        self.assertIn(b"(mailstack, from userid", content)
        verify_both(self, content, self.dnsfunc)

        arrived = self.sink.next_message()
        report = (b"From: MAILER-DAEMON@example.test\nTo: bob@remote.test\n"
                  b"Subject: Undelivered Mail\n\nsorry\n")
        yield server.dispatcher.inject(None, [parse_address("bob@remote.test")], report,
                                       client="bounce")
        yield self.run_queue(server)
        yield arrived
        verify_both(self, self.sink.policy.received[-1][2], self.dnsfunc)

    @inlineCallbacks
    def test_sendmail_to_local_recipient_signed(self):
        """
        Mail injected with the real C{mailstack sendmail} for a LOCAL
        recipient only is signed exactly as the same mail submitted over
        587 is (both are our own users' mail, origin C{local} and
        C{submission}): two signatures that verify, in the Maildir copy.
        """
        server = yield self.server()
        content = message("alice@example.test", subject="local").replace(b"\r\n", b"\n")
        result = yield in_thread(sendmail, ["-i", "-f", "alice@example.test", "dave@localhost"],
                                 content, server.data_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        yield server.pickup.poke()
        yield self.submit(server, message("alice@example.test", subject="submitted"),
                          rcpts=("dave@localhost",))
        delivered = read_messages(server, "dave@localhost")
        self.assertEqual(len(delivered), 2)
        for copy in delivered:
            verify_both(self, copy, self.dnsfunc)
        self.assertEqual(self.sink.policy.received, [])

    @inlineCallbacks
    def test_rotation(self):
        """
        A second key set stays inactive (mail is signed with s1) until it
        is activated; then mail is signed with s2, no restart needed.
        """
        server = yield self.server()
        made2, active = keys.generate(server.data_dir, "example.test", "s2")
        self.assertFalse(active)
        for selector, expected in (("s1", b"s1-rsa"), ("s2", b"s2-rsa")):
            if selector == "s2":
                keys.activate(server.data_dir, "example.test", "s2")
            arrived = self.sink.next_message()
            yield self.submit(server, message("alice@example.test"))
            yield self.run_queue(server)
            yield arrived
            content = self.sink.policy.received[-1][2]
            headers, _ = dkim.rfc822_parse(content)
            selectors = sorted(dkim.util.parse_tag_value(v)[b"s"] for n, v in headers
                               if n.lower() == b"dkim-signature")
            self.assertEqual(selectors[1], expected)

    def test_signing_off_the_reactor_thread(self):
        """
        The signer runs in a worker thread, never on the reactor's.
        """
        threads = []
        real = signing.sign_message

        def recording(*args):
            threads.append(threading.current_thread())
            return real(*args)

        self.patch(signing, "sign_message", recording)
        data = self.mktemp()
        key_set(data, domain="example.test")
        config = build_config({"data-dir": data, "domain": ["example.test"]})
        transform = signing.DKIMSigningTransform(lambda: config, reactor)
        spool = MessageSpool()
        spool.write(message("alice@example.test").replace(b"\r\n", b"\n"))
        envelope = Envelope("q1", parse_address("alice@example.test"), origin="submission")
        d = Deferred.fromCoroutine(transform.transform(envelope, spool))

        def check(fields):
            self.assertEqual(len(fields), 2)
            self.assertEqual(len(threads), 1)
            self.assertIsNot(threads[0], threading.main_thread())
        return d.addCallback(check)


class _InlineReactor(Clock):
    """
    A Clock whose "threads" run inline: the filter's deadline and DNS
    time limits follow C{advance}.
    """

    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class _InlinePool:
    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        try:
            result = f(*args, **kwargs)
        except Exception:  # noqa: BLE001 - as a thread pool does: any failure is the result
            on_result(False, Failure())
        else:
            on_result(True, result)


class DeadlineTests(SynchronousTestCase):
    def test_deadline(self):
        """
        DNS that never answers (each lookup within its own limit, but
        more of them than the deadline allows): at the deadline the message
        gets temperror results and is accepted, never refused or deferred.
        """
        from mailstack.mailauth.checks import AuthChecksFilter

        clock = _InlineReactor()
        zone = ZoneResolver({}, silent={"slow.test", "_dmarc.slow.test", "client.test"})
        config = build_config({"hostname": "mx.test"})
        f = AuthChecksFilter(lambda: config, zone, clock, _InlinePool(), deadline=5)
        spool = MessageSpool()
        spool.write(message("bob@slow.test").replace(b"\r\n", b"\n"))
        session = SimpleNamespace(service="smtp", user=None, peer_host="192.0.2.1",
                                  helo="client.test")
        d = Deferred.fromCoroutine(f.data(session, Envelope("q1", parse_address(
            "bob@slow.test")), spool))
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.1)
        verdict = self.successResultOf(d)
        self.assertIsNone(verdict.reply)
        self.assertIsNone(verdict.folder)
        [field] = verdict.headers
        authserv, results = parse(field)
        self.assertEqual(authserv, "mx.test")
        self.assertEqual(results["spf.mailfrom"],
                         [("temperror", {"smtp.mailfrom": "bob@slow.test"})])
        self.assertEqual(results["dkim"][0][0], "temperror")
        self.assertEqual(results["dmarc"][0][0], "temperror")


class OptionsTests(SynchronousTestCase):
    def test_defaults_and_values(self):
        """
        Checks and signing are on by default, SPF fail does not reject;
        yes/no, true/false and TOML booleans are understood; anything else
        is an error naming the option.
        """
        config = build_config({})
        self.assertEqual((config.auth_checks, config.dmarc_reject, config.dmarc_quarantine,
                          config.spf_fail_reject, config.dkim_sign),
                         (True, True, True, False, True))
        config = build_config({"dmarc-reject": "no", "spf-fail-reject": "true",
                               "dkim-sign": False})
        self.assertEqual((config.dmarc_reject, config.spf_fail_reject, config.dkim_sign),
                         (False, True, False))
        with self.assertRaises(ConfigError) as e:
            build_config({"auth-checks": "maybe"})
        self.assertIn("--auth-checks", str(e.exception))

    def test_listing(self):
        """
        `mailstack plugins` lists both as enabled by default, disabled when
        turned off.
        """
        lines = listing(build_config({}))
        self.assertTrue(any(line.split()[:3] == ["filter", "auth-checks", "enabled"]
                            for line in lines), lines)
        self.assertTrue(any(line.split()[:3] == ["transform", "dkim-sign", "enabled"]
                            for line in lines), lines)
        lines = listing(build_config({"auth-checks": "no", "dkim-sign": "no"}))
        self.assertTrue(any(line.split()[:3] == ["filter", "auth-checks", "disabled"]
                            for line in lines), lines)

    def test_receivers_get_them(self):
        """
        --receivers processes rebuild their configuration from what the main
        process sends: the mail authentication options and --dns-server (the
        checks' resolver) are in it, an IPv6 server too.
        """
        import json

        from mailstack.receivers import receiver_settings

        for server, expected in (("127.0.0.1:5353", ("127.0.0.1", 5353)),
                                 ("[::1]:53", ("::1", 53))):
            config = build_config({"dns-server": server, "dmarc-reject": "no",
                                   "spf-fail-reject": "yes", "dkim-sign": "no"})
            sent = json.loads(json.dumps(receiver_settings(config, 2, 1)))
            again = build_config(sent["options"])
            self.assertEqual(again.dns_server, expected)
            for name in ("auth_checks", "dmarc_reject", "dmarc_quarantine", "spf_fail_reject",
                         "dkim_sign"):
                self.assertEqual(getattr(again, name), getattr(config, name), name)
        self.assertIsNone(build_config(receiver_settings(build_config({}), 2, 1)["options"])
                          .dns_server)

    def test_client_ip(self):
        self.assertEqual(signing.client_ip("mx.example[192.0.2.1]:2525"), "192.0.2.1")
        self.assertEqual(signing.client_ip("unknown[::1]:25"), "::1")
        self.assertIsNone(signing.client_ip("local[alice]"))
