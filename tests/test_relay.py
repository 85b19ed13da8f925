"""
The relaying MTA end to end: a real MailStack whose queue delivers to fake
remote MTAs on 127.0.0.1 (mailstack's own server with a scripted policy),
found through a fake DNS; retries driven by a fake clock.
"""

import email
import email.policy
import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailstack.address import parse_address
from mailstack.smtp.client import Timeouts
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.testing import FakeResolver, SinkPolicy
from tests.support import (
    add_user, client_context, in_thread, read_messages, short_tempdir, smtp_session,
    start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"
MESSAGE = b"Subject: outbound\nMessage-ID: <m1@localhost>\n\nline one\n.dot line\n"


def closed_port():
    """
    A port on 127.0.0.1 where nothing listens.
    """
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Sink:
    """
    A remote MTA on 127.0.0.1 that records what it receives.
    """

    def __init__(self):
        self.policy = SinkPolicy()
        self.waiters = []
        original = self.policy.deliver

        def deliver(session, envelope, spool):
            result = original(session, envelope, spool)
            waiters, self.waiters = self.waiters, []
            for d in waiters:
                d.callback(None)
            return result

        self.policy.deliver = deliver

    @inlineCallbacks
    def start(self, testcase):
        factory = SMTPServerFactory(self.policy, ServerSettings("sink.test", 10**7), reactor)
        self.port = yield serverFromString(reactor, LISTEN).listen(factory)
        testcase.addCleanup(self.port.stopListening)
        return self

    @property
    def number(self):
        return self.port.getHost().port

    def next_message(self):
        d = Deferred()
        self.waiters.append(d)
        return d


def parse(message):
    return email.message_from_bytes(message, policy=email.policy.default)


class RelayTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.sink = yield Sink().start(self)
        self.backup = yield Sink().start(self)
        self.dead = closed_port()
        # Fake DNS addresses in 127.0.0.0/8 stand for remote hosts; every
        # connection goes to 127.0.0.1, to the port that host stands for.
        self.ports = {"127.0.0.10": self.sink.number, "127.0.0.11": self.backup.number,
                      "127.0.0.12": self.dead}
        self.resolver = FakeResolver(
            mx={"remote.test": [(10, "mx1.remote.test"), (20, "mx2.remote.test")],
                "failover.test": [(10, "dead.failover.test"), (20, "mx2.remote.test")],
                "nullmx.test": [(0, "")]},
            a={"mx1.remote.test": ["127.0.0.10"], "mx2.remote.test": ["127.0.0.11"],
               "dead.failover.test": ["127.0.0.12"], "nomx.test": ["127.0.0.10"]},
            missing={"nxdomain.test"},
        )
        self.clock = Clock()

    def endpoint(self, ip, port):
        return TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports[ip], timeout=5)

    @inlineCallbacks
    def server(self, data_dir=None, resolver=None, **options):
        options.setdefault("submission", LISTEN)
        server = yield start_server(
            self, resolver=self.resolver if resolver is None else resolver,
            relay_endpoint=self.endpoint, clock=self.clock,
            relay_timeouts=Timeouts(5, 5, 5, 5, 5), data_dir=data_dir, **options)
        yield server.queue.loaded
        if not server.users.exists(parse_address("alice@localhost")):
            add_user(server, "alice@localhost")
        return server

    @inlineCallbacks
    def run_queue(self, server, advance=0):
        """
        Advance the fake clock, then wait for the attempts it started.
        """
        self.clock.advance(advance)
        yield DeferredList(list(server.queue.active.values()))

    def inject(self, server, rcpts, sender="alice@localhost", content=MESSAGE):
        return server.dispatcher.inject(parse_address(sender) if sender else None,
                                        [parse_address(r) for r in rcpts], content)

    @inlineCallbacks
    def test_submission_to_preferred_mx(self):
        """
        A message submitted by an authenticated user reaches the preferred
        MX, dot-stuffing intact, and leaves the queue.
        """
        server = yield self.server()
        context = client_context(server)

        def submit(client):
            client.starttls(context=context)
            client.login("alice@localhost", "secret")
            return client.sendmail("alice@localhost", ["bob@remote.test", "carol@remote.test"],
                                   MESSAGE.replace(b"\n", b"\r\n"))

        arrived = self.sink.next_message()
        yield in_thread(smtp_session, server.ports["submission"], submit, host="localhost")
        yield self.run_queue(server)
        yield arrived
        [(sender, rcpts, content)] = self.sink.policy.received
        self.assertEqual((sender, rcpts), ("alice@localhost", ["bob@remote.test",
                                                               "carol@remote.test"]))
        self.assertTrue(content.endswith(b"\nline one\n.dot line\n"))
        self.assertIn(b"with ESMTPSA", content)
        self.assertEqual(self.backup.policy.received, [])
        self.assertEqual(server.queue.records, {})
        self.assertEqual(os.listdir(server.queue.store.msg_dir), [])

    @inlineCallbacks
    def test_session_reused_for_next_message(self):
        """
        A second message to the same MX within the cache time goes over the
        session the first one opened: one connection, two transactions; a
        session the remote closed meanwhile is replaced without a failure.
        """
        server = yield self.server()
        for number in range(2):
            yield self.inject(server, [f"r{number}@remote.test"])
            yield self.run_queue(server)
        self.assertEqual(len(self.sink.policy.received), 2)
        self.assertEqual(self.sink.policy.connections, 1)
        # The remote drops the idle session: the next message still goes.
        [[(session, _)]] = server.courier._idle.values()
        session.proto.transport.loseConnection()
        yield self.inject(server, ["r2@remote.test"])
        yield self.run_queue(server)
        self.assertEqual(len(self.sink.policy.received), 3)
        self.assertEqual(os.listdir(server.queue.store.msg_dir), [])

    @inlineCallbacks
    def test_messages_back_to_back_keep_their_content(self):
        """
        Messages queued one after the other go out back to back on one
        cached session, each with its own content (kept in memory from its
        enqueue), dot-stuffing intact; a deferred one goes out at its retry
        with the content read from its queue file.
        """
        server = yield self.server()
        for number in range(3):
            yield self.inject(server, [f"r{number}@remote.test"],
                              content=MESSAGE.replace(b"outbound", b"number %d" % number))
            yield self.run_queue(server)
        self.assertEqual(self.sink.policy.connections, 1)
        for number, (_, rcpts, content) in enumerate(self.sink.policy.received):
            self.assertEqual(rcpts, [f"r{number}@remote.test"])
            self.assertIn(b"Subject: number %d\n" % number, content)
            self.assertTrue(content.endswith(b"\nline one\n.dot line\n"))
        self.resolver.mx["down.test"] = [(10, "dead.failover.test")]
        yield self.inject(server, ["later@down.test"],
                          content=MESSAGE.replace(b"outbound", b"retried"))
        yield self.run_queue(server)
        self.assertEqual(len(self.sink.policy.received), 3)
        self.assertEqual(server.queue._ahead, {})
        self.ports["127.0.0.12"] = self.sink.number  # the host is back
        yield self.run_queue(server, advance=3600)
        [_, rcpts, content] = self.sink.policy.received[3]
        self.assertEqual(rcpts, ["later@down.test"])
        self.assertIn(b"Subject: retried\n", content)
        self.assertEqual(os.listdir(server.queue.store.msg_dir), [])

    @inlineCallbacks
    def test_failover_and_a_fallback(self):
        """
        A dead MX is skipped for the next one; a domain without MX gets its
        A record.
        """
        server = yield self.server()
        yield self.inject(server, ["x@failover.test", "y@nomx.test"])
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.backup.policy.received], [["x@failover.test"]])
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["y@nomx.test"]])
        self.assertEqual(server.queue.records, {})

    @inlineCallbacks
    def test_permanent_failures_bounce(self):
        """
        A 550 from the remote, a null MX and a domain that does not exist
        give one RFC 3464 bounce in the sender's Maildir, listing each
        recipient with its status and the remote's diagnostic.
        """
        server = yield self.server()
        self.sink.policy.rcpt_replies = {"nobody@remote.test": (550, "5.1.1", "No such user")}
        yield self.inject(server, ["nobody@remote.test", "ok@remote.test", "a@nullmx.test",
                                   "b@nxdomain.test"])
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["ok@remote.test"]])
        [bounce] = read_messages(server, "alice@localhost")
        self.assertIn(b"Return-Path: <>\n", bounce)
        report = parse(bounce)
        self.assertEqual(report.get_content_type(), "multipart/report")
        self.assertEqual(report.get_param("report-type"), "delivery-status")
        human, status, headers = report.iter_parts()
        self.assertEqual(status.get_content_type(), "message/delivery-status")
        blocks = {}
        for block in status.get_payload()[1:]:
            blocks[block["Final-Recipient"]] = block
        self.assertEqual(set(blocks), {"rfc822; nobody@remote.test", "rfc822; a@nullmx.test",
                                       "rfc822; b@nxdomain.test"})
        nobody = blocks["rfc822; nobody@remote.test"]
        self.assertEqual((nobody["Action"], nobody["Status"]), ("failed", "5.1.1"))
        self.assertIn("550 5.1.1 No such user", nobody["Diagnostic-Code"])
        self.assertEqual(blocks["rfc822; a@nullmx.test"]["Status"], "5.1.10")
        self.assertEqual(blocks["rfc822; b@nxdomain.test"]["Status"], "5.1.2")
        self.assertEqual(status.get_payload()[0]["Reporting-MTA"], "dns; mx.test")
        self.assertEqual(headers.get_content_type(), "text/rfc822-headers")
        self.assertIn("Message-ID: <m1@localhost>", headers.get_content())
        self.assertNotIn("line one", bounce.decode())
        self.assertEqual(server.queue.records, {})

    @inlineCallbacks
    def test_retry_then_success(self):
        """
        A 451 defers the recipient; nothing happens before the first delay
        of the schedule (5 minutes, plus up to 10% jitter), and the retry
        then delivers.
        """
        server = yield self.server()
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = (
            lambda rcpt, attempt: (451, "4.3.0", "try later") if attempt == 1 else None)
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        [record] = server.queue.records.values()
        self.assertEqual(record.attempts, 1)
        self.assertEqual(record.recipients[0].state, "pending")
        self.assertIn("451 4.3.0 try later", record.recipients[0].last_error)
        self.assertEqual(record.next_attempt, self.clock.seconds() + 300)
        on_disk = server.queue.store.load(record.queue_id)
        self.assertEqual((on_disk.attempts, on_disk.next_attempt), (1, record.next_attempt))
        yield self.run_queue(server, 299)
        self.assertEqual(self.sink.policy.attempts, 1)
        yield self.run_queue(server, 1)
        self.assertEqual(self.sink.policy.attempts, 2)
        self.assertEqual(len(self.sink.policy.received), 1)
        self.assertEqual(server.queue.records, {})

    @inlineCallbacks
    def test_lifetime_expiry_bounces(self):
        """
        A recipient still deferred when the queue lifetime runs out bounces
        with status 5.4.7 (delivery time expired) and the last remote reply.
        """
        server = yield self.server(max_queue_lifetime="1h", retry_schedule="10m")
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = {"bob@remote.test": (452, "4.2.2", "Mailbox full")}
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        for _ in range(6):
            self.assertEqual(read_messages(server, "alice@localhost"), [])
            yield self.run_queue(server, 600)
        self.assertEqual(self.sink.policy.attempts, 7)
        [bounce] = read_messages(server, "alice@localhost")
        status = list(parse(bounce).iter_parts())[1].get_payload()[1]
        self.assertEqual(status["Status"], "5.4.7")
        self.assertIn("Mailbox full", status["Diagnostic-Code"])
        self.assertEqual(server.queue.records, {})

    @inlineCallbacks
    def test_bounce_never_bounces(self):
        """
        A message from the null sender that fails is dropped, not bounced.
        """
        server = yield self.server()
        self.sink.policy.rcpt_replies = {"x@remote.test": (550, "5.1.1", "no")}
        yield self.inject(server, ["x@remote.test"], sender=None)
        yield self.run_queue(server)
        self.assertEqual(server.queue.records, {})
        self.assertEqual(self.sink.policy.received, [])
        self.assertEqual(read_messages(server, "alice@localhost"), [])
        self.assertEqual(os.listdir(server.queue.store.msg_dir), [])

    @inlineCallbacks
    def test_bounce_to_missing_local_sender_goes_to_postmaster(self):
        """
        A failed message from a local sender that does not exist (a script's
        C{sendmail -f ghost@localhost}) bounces to the postmaster instead of
        nowhere (Postfix's double bounce), with a log line naming both; the
        report is from the null sender, so its own failure would never
        bounce again.
        """
        server = yield self.server()
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.sink.policy.rcpt_replies = {"x@remote.test": (550, "5.1.1", "No such user")}
        yield self.inject(server, ["x@remote.test"], sender="ghost@localhost")
        yield self.run_queue(server)
        [bounce] = read_messages(server, "postmaster@localhost")
        self.assertIn(b"Return-Path: <>\n", bounce)
        self.assertIn(b"Delivered-To: postmaster@localhost\n", bounce)
        status = list(parse(bounce).iter_parts())[1].get_payload()[1]
        self.assertEqual(status["Final-Recipient"], "rfc822; x@remote.test")
        self.assertEqual(server.queue.records, {})
        lines = [formatEvent(e) for e in events]
        self.assertTrue(any("to=<ghost@localhost> cannot receive the bounce" in line
                            and "postmaster <postmaster@localhost>" in line for line in lines),
                        lines)

    @inlineCallbacks
    def test_bounce_to_missing_local_sender_follows_postmaster_option(self):
        """
        With C{--postmaster} naming a user, that user gets such a bounce; a
        sender whose alias resolves to nobody (a broken table) counts as
        unable to receive too.
        """
        server = yield self.server(postmaster="alice@localhost")
        with open(os.path.join(server.data_dir, "aliases"), "a") as f:
            f.write("broken@localhost: not an address\n")
        self.sink.policy.rcpt_replies = {"x@remote.test": (550, "5.1.1", "No such user")}
        yield self.inject(server, ["x@remote.test"], sender="broken@localhost")
        yield self.run_queue(server)
        [bounce] = read_messages(server, "alice@localhost")
        self.assertIn(b"Return-Path: <>\n", bounce)
        self.assertEqual(read_messages(server, "postmaster@localhost"), [])

    @inlineCallbacks
    def test_state_survives_restart(self):
        """
        A deferred message is still queued, with its attempts and schedule,
        after the service is stopped and started again on the same data,
        and is delivered when due.
        """
        data_dir = short_tempdir(self)
        server = yield self.server(data_dir=data_dir)
        self.sink.policy.rcpt_replies = {"bob@remote.test": (421, "4.3.2", "shutting down")}
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        [before] = server.queue.records.values()
        yield server.stopService()
        self.sink.policy.rcpt_replies = {}
        again = yield self.server(data_dir=data_dir)
        [after] = again.queue.records.values()
        self.assertEqual((after.queue_id, after.attempts, after.next_attempt),
                         (before.queue_id, 1, before.next_attempt))
        yield self.run_queue(again, after.next_attempt - self.clock.seconds())
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["bob@remote.test"]])

    @inlineCallbacks
    def test_crash_after_remote_accepted(self):
        """
        If the process dies between the remote 250 and the state update, the
        message is delivered again after the restart: a duplicate, never a
        loss.
        """
        data_dir = short_tempdir(self)
        server = yield self.server(data_dir=data_dir)

        def crash(*args):
            raise SystemExit("simulated crash before the state update")

        server.queue.store.remove = crash
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        self.flushLoggedErrors(SystemExit)
        self.assertEqual(len(self.sink.policy.received), 1)
        yield server.stopService()
        again = yield self.server(data_dir=data_dir)
        self.assertEqual(len(again.queue.records), 1)
        yield self.run_queue(again)
        self.assertEqual(len(self.sink.policy.received), 2)
        self.assertEqual(again.queue.records, {})

    @inlineCallbacks
    def test_queue_commands(self):
        """
        C{mailstack queue list/show/flush/delete} work while the server runs.
        """
        from io import StringIO

        from mailstack.cli import run

        server = yield self.server()
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "greylisted")}
        yield self.inject(server, ["bob@remote.test"])
        yield self.inject(server, ["carol@remote.test"], content=b"Subject: two\n\nx\n")
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "greylisted"),
                                         "carol@remote.test": (451, "4.3.0", "greylisted")}
        yield self.run_queue(server)
        first = sorted(server.queue.records.values(), key=lambda r: r.recipients[0].address)[0]

        def cli(*argv):
            out = StringIO()
            run(["--data-dir", server.data_dir, *argv], None, out)
            return out.getvalue()

        listing = yield in_thread(cli, "queue", "list")
        self.assertIn(first.queue_id, listing)
        self.assertIn("pending  <bob@remote.test>  (451 4.3.0 greylisted)", listing)
        self.assertIn("-- 2 messages", listing)
        shown = yield in_thread(cli, "queue", "show", first.queue_id)
        self.assertIn('"address": "bob@remote.test"', shown)
        self.assertEqual((yield in_thread(cli, "queue", "delete", first.queue_id)),
                         f"deleted {first.queue_id}\n")
        self.assertNotIn(first.queue_id, server.queue.records)
        self.sink.policy.rcpt_replies = {}
        self.assertEqual((yield in_thread(cli, "queue", "flush")), "flushed 1 messages\n")
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["carol@remote.test"]])
        self.assertEqual((yield in_thread(cli, "queue", "list")), "Mail queue is empty\n")

    @inlineCallbacks
    def test_inbound_relay_networks(self):
        """
        A client in --relay-networks may relay through port 25; the mail goes
        through the queue.
        """
        server = yield self.server(smtp=LISTEN, relay_networks="127.0.0.0/8")

        def send(client):
            return client.sendmail("app@localhost", ["x@remote.test"], b"Subject: r\r\n\r\n")

        yield in_thread(smtp_session, server.ports["smtp"], send)
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["x@remote.test"]])

    @inlineCallbacks
    def test_remote_alias_target(self):
        """
        An alias with a remote target forwards through the queue.
        """
        server = yield self.server(smtp=LISTEN)
        server.aliases.add(parse_address("fwd@localhost"), (parse_address("out@remote.test"),
                                                            parse_address("alice@localhost")))

        def send(client):
            return client.sendmail("x@else.test", ["fwd@localhost"], b"Subject: f\r\n\r\n")

        yield in_thread(smtp_session, server.ports["smtp"], send)
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["out@remote.test"]])
        self.assertEqual(len(read_messages(server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_mx_through_a_dns_server(self):
        """
        With --dns-server, MX and A records come from a real DNS server
        (UDP on 127.0.0.1), and the mail reaches the MX it names.
        """
        from twisted.names.dns import DNSDatagramProtocol
        from twisted.names.server import DNSServerFactory

        factory = DNSServerFactory(clients=[self.resolver])
        udp = reactor.listenUDP(0, DNSDatagramProtocol(factory), interface="127.0.0.1")
        self.addCleanup(udp.stopListening)
        server = yield self.server(resolver=False,
                                   dns_server=f"127.0.0.1:{udp.getHost().port}")
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["bob@remote.test"]])
        self.assertIn((15, "remote.test"), self.resolver.queries)  # 15: MX

    @inlineCallbacks
    def test_static_route(self):
        """
        A --route for a domain skips its MX records; * routes everything else.
        """
        server = yield self.server(route=["remote.test=mx2.remote.test:25",
                                          "*=127.0.0.10:25"])
        yield self.inject(server, ["bob@remote.test", "x@anywhere.test"])
        yield self.run_queue(server)
        self.assertEqual([r for _, r, _ in self.backup.policy.received], [["bob@remote.test"]])
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["x@anywhere.test"]])
        self.assertNotIn((15, "remote.test"), self.resolver.queries)

    @inlineCallbacks
    def test_delay_warning(self):
        """
        After four hours of deferral the sender gets one "delayed" report,
        and the message stays queued.
        """
        server = yield self.server(retry_schedule="1h")
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "later")}
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        for _ in range(5):
            yield self.run_queue(server, 3600)
        [warning] = read_messages(server, "alice@localhost")
        report = parse(warning)
        self.assertEqual(report["Subject"], "Delayed Mail (still being retried)")
        block = list(report.iter_parts())[1].get_payload()[1]
        self.assertEqual((block["Action"], block["Status"]), ("delayed", "4.3.0"))
        self.assertIn("Will-Retry-Until", block)
        self.assertEqual(len(server.queue.records), 1)


    @inlineCallbacks
    def test_smarthost_with_auth(self):
        """
        With --route '*=HOST' and --relay-auth, mail goes to the smarthost
        over STARTTLS with AUTH (here another mailstack's submission port).
        """
        smarthost = yield start_server(self, submission=LISTEN, domain=["far.test"],
                                       hostname="smarthost.test")
        add_user(smarthost, "relay@far.test", "relay-pw")
        add_user(smarthost, "bob@far.test")
        password_file = os.path.join(short_tempdir(self), "pw")
        with open(password_file, "w") as f:
            f.write("relay-pw\n")
        self.ports["127.0.0.20"] = smarthost.ports["submission"]
        self.resolver.a["smarthost.test"] = ["127.0.0.20"]
        server = yield self.server(route=["*=smarthost.test:587"],
                                   relay_auth=[f"smarthost.test=relay@far.test:{password_file}"])
        yield self.inject(server, ["bob@far.test"], sender="relay@far.test")
        yield self.run_queue(server)
        [message] = read_messages(smarthost, "bob@far.test")
        self.assertIn(b"(authenticated as relay@far.test)", message)
        self.assertIn(b"with ESMTPSA", message)
        self.assertEqual(server.queue.records, {})


class RequireTLSTests(TestCase):
    """
    --require-tls: STARTTLS with a verified certificate, or no delivery.
    """

    @inlineCallbacks
    def setUp(self):
        from twisted.internet import ssl

        from mailstack.tls import TLSMaterial, generate_self_signed

        directory = short_tempdir(self)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        generate_self_signed("mx1.remote.test", cert, key)
        self.material = TLSMaterial(cert, key)
        with open(cert, "rb") as f:
            self.trust = ssl.Certificate.loadPEM(f.read())
        self.sink = Sink()
        yield self.sink.start(self)
        self.resolver = FakeResolver(mx={"remote.test": [(10, "mx1.remote.test")],
                                         "wrong.test": [(10, "mx.wrong.test")]},
                                     a={"mx1.remote.test": ["127.0.0.10"],
                                        "mx.wrong.test": ["127.0.0.10"]})

    def courier(self):
        from mailstack.queue.courier import Courier

        courier = Courier(reactor, self.resolver, "me.test", port=25,
                       timeouts=Timeouts(5, 5, 5, 5, 5),
                       endpoint=lambda ip, port: TCP4ClientEndpoint(
                           reactor, "127.0.0.1", self.sink.number, timeout=5),
                       require_tls=["remote.test", "wrong.test"], trust_root=self.trust)
        self.addCleanup(courier.close_idle)
        return courier

    def deliver(self, domain):
        import io

        from twisted.internet.defer import ensureDeferred

        return ensureDeferred(self.courier().deliver(
            domain, "a@me.test", [f"x@{domain}"], lambda: io.BytesIO(b"S: x\n\nhi\n"), 10))

    @inlineCallbacks
    def test_no_starttls_defers(self):
        outcomes = yield self.deliver("remote.test")
        outcome = outcomes["x@remote.test"]
        self.assertEqual(outcome.status, "deferred")
        self.assertIn("STARTTLS", outcome.reply.text)
        self.assertEqual(self.sink.policy.received, [])

    @inlineCallbacks
    def test_verified(self):
        """
        With STARTTLS and a certificate valid for the MX name, it is sent.
        """
        self.sink.port.factory.tls = self.material.context_factory
        outcomes = yield self.deliver("remote.test")
        self.assertEqual(outcomes["x@remote.test"].status, "sent")
        self.assertIn(b"with ESMTPS", self.sink.policy.received[0][2])

    @inlineCallbacks
    def test_wrong_name_defers(self):
        """
        A certificate for another name is refused: deferred, not sent in clear.
        """
        self.sink.port.factory.tls = self.material.context_factory
        outcomes = yield self.deliver("wrong.test")
        self.assertEqual(outcomes["x@wrong.test"].status, "deferred")
        self.assertEqual(self.sink.policy.received, [])
        self.flushLoggedErrors()


class HostileMTA(Protocol):
    """
    A next hop that answers every RCPT with a reply full of bare CRs and
    control characters (a MIME boundary and a header it hopes to plant in
    the bounce).
    """

    REFUSAL = (b"550 5.1.1 no such user\r--evil\rContent-Type: text/html\r\r"
               b"<b>\x1b[2Jgotcha\x00</b>\r\n")

    def connectionMade(self):
        self.buffer = b""
        self.transport.write(b"220 evil.test ESMTP\r\n")

    def dataReceived(self, data):
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"RCPT":
                self.transport.write(self.REFUSAL)
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.loseConnection()
            else:
                self.transport.write(b"250 evil.test\r\n")


class OutboundSmugglingTests(TestCase):
    """
    Content that did not come through SMTP DATA, and remote replies put in
    bounces, never reach the next hop or a bounce raw (issue 11, item 7).
    """

    # The same remote MTAs and helpers as RelayTests, without its tests.
    setUp = RelayTests.setUp
    endpoint = RelayTests.endpoint
    server = RelayTests.server
    run_queue = RelayTests.run_queue
    inject = RelayTests.inject

    @inlineCallbacks
    def test_maildrop_content_normalised(self):
        """
        What C{mailstack sendmail} dropped with bare CRs, CRLFs, a NUL and a
        2,500-octet line reaches the next hop as clean lines: the C{\\r.\\r}
        is a dot line inside the message, not an end of DATA followed by a
        smuggled envelope.  (Our sink refuses bare CR outright, so without
        the normalisation the message bounces instead.)
        """
        from mailstack.mua.sendmail import drop
        server = yield self.server()
        long_line = b"x" * 2500
        content = (b"Subject: smuggle\r\n\r\nhello\r.\rMAIL FROM:<a@evil.test>\r"
                   b"RCPT TO:<victim@remote.test>\rnul\x00here\n" + long_line + b"\n")
        drop(server.data_dir, "alice@localhost", ["bob@remote.test"], content)
        yield server.pickup.poke()
        for _ in range(500):  # until delivered, or bounced (the old behaviour)
            yield self.run_queue(server)
            if self.sink.policy.received or read_messages(server, "alice@localhost"):
                break
            yield deferLater(reactor, 0.01, lambda: None)
        [(sender, rcpts, stored)] = self.sink.policy.received
        self.assertEqual((sender, rcpts), ("alice@localhost", ["bob@remote.test"]))
        body = stored.split(b"\n\n", 1)[1]
        self.assertEqual(body.split(b"\n")[:5], [
            b"hello", b".", b"MAIL FROM:<a@evil.test>", b"RCPT TO:<victim@remote.test>",
            b"nulhere"])
        self.assertEqual(body.split(b"\n")[5:8], [b"x" * 998, b" " + b"x" * 997,
                                                 b" " + b"x" * 505])
        self.assertEqual(read_messages(server, "alice@localhost"), [])  # no bounce

    @inlineCallbacks
    def test_hostile_reply_not_copied_into_bounce(self):
        """
        A next hop's refusal with bare CRs, an escape sequence and a NUL
        becomes one printable line in the bounce: no extra MIME part, no
        planted header, no control character.
        """
        factory = Factory.forProtocol(HostileMTA)
        port = yield serverFromString(reactor, LISTEN).listen(factory)
        self.addCleanup(port.stopListening)
        self.ports["127.0.0.13"] = port.getHost().port
        self.resolver.mx["evil.test"] = [(10, "mx.evil.test")]
        self.resolver.a["mx.evil.test"] = ["127.0.0.13"]
        server = yield self.server()
        yield self.inject(server, ["victim@evil.test"])
        yield self.run_queue(server)
        [bounce] = read_messages(server, "alice@localhost")
        for byte in bounce:
            self.assertTrue(byte in (9, 10) or 32 <= byte < 127, bytes([byte]))
        self.assertNotIn(b"\n--evil", bounce)
        self.assertNotIn(b"\nContent-Type: text/html", bounce)
        report = parse(bounce)
        human, status, headers = report.iter_parts()
        self.assertIn("550 5.1.1 no such user --evil Content-Type: text/html <b>\\x1b[2Jgotcha",
                      " ".join(human.get_content().split()))
        block = status.get_payload()[1]
        self.assertEqual(block["Status"], "5.1.1")
        self.assertIn("\\x1b[2Jgotcha", block["Diagnostic-Code"])
