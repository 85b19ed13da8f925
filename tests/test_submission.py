"""
The submission service: real smtplib clients over real TLS on 127.0.0.1
port 0, and the login throttle on a fake clock.
"""

import base64
import smtplib
import ssl

from twisted.internet.defer import inlineCallbacks, succeed, fail
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import local_address
from mailstack.delivery.dispatch import Dispatcher
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.smtp.submission import SubmissionPolicy
from mailstack.throttle import LoginThrottle
from tests.support import (
    add_user, client_context, in_thread, read_messages, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"


def b64(data):
    return base64.b64encode(data).decode("ascii")


class SubmissionTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, submission=LISTEN, submissions=LISTEN)
        self.port = self.server.ports["submission"]
        add_user(self.server, "alice@localhost", "alice-pw")
        add_user(self.server, "bob@example.test", "bob-pw")
        self.server.aliases.add(local_address("sales@localhost"),
                                (local_address("alice@localhost"),))
        self.context = client_context(self.server)

    def session(self, actions, tls=True, login=("alice@localhost", "alice-pw")):
        def run(client):
            client.ehlo("client.test")
            if tls:
                client.starttls(context=self.context)
                client.ehlo("client.test")
            if login:
                client.login(*login)
            return actions(client)
        return in_thread(smtp_session, self.port, run, host="localhost")

    @inlineCallbacks
    def test_nothing_before_tls(self):
        """
        Before STARTTLS there is no AUTH offered, and AUTH and MAIL get
        530 5.7.0: no password ever crosses in clear text (RCPT, with no
        MAIL before it, is out of sequence: 503).
        """
        def probe(client):
            return (client.has_extn("auth"), client.has_extn("starttls"),
                    client.docmd("AUTH", "PLAIN " + b64(b"\0alice@localhost\0alice-pw")),
                    client.docmd("MAIL", "FROM:<alice@localhost>"),
                    client.docmd("RCPT", "TO:<bob@example.test>"))

        auth, starttls, *replies = yield self.session(probe, tls=False, login=None)
        self.assertEqual((auth, starttls), (False, True))
        self.assertEqual([(c, m.split()[0]) for c, m in replies],
                         [(530, b"5.7.0"), (530, b"5.7.0"), (503, b"5.5.1")])

    @inlineCallbacks
    def test_plain_and_login(self):
        """
        AUTH PLAIN (with and without initial response) and AUTH LOGIN work
        after STARTTLS; the mail is delivered, marked ESMTPSA with its TLS.
        """
        def plain_no_initial(client):
            client.user, client.password = "alice@localhost", "alice-pw"
            code, _ = client.auth("PLAIN", client.auth_plain, initial_response_ok=False)
            return code

        def login(client):
            client.user, client.password = "bob@example.test", "bob-pw"
            code, _ = client.auth("LOGIN", client.auth_login, initial_response_ok=False)
            client.sendmail("bob@example.test", ["alice@localhost"], b"Subject: s\r\n\r\nhi\r\n")
            return code

        def plain(client):
            code, _ = client.docmd("AUTH", "PLAIN " + b64(b"\0alice@localhost\0alice-pw"))
            return code

        self.assertEqual((yield self.session(plain, login=None)), 235)
        self.assertEqual((yield self.session(plain_no_initial, login=None)), 235)
        self.assertEqual((yield self.session(login, login=None)), 235)
        [message] = read_messages(self.server, "alice@localhost")
        self.assertIn(b"(authenticated as bob@example.test)", message)
        self.assertIn(b"with ESMTPSA id", message)
        self.assertIn(b"(using TLSv1.", message)

    @inlineCallbacks
    def test_bad_credentials(self):
        """
        A wrong password, an unknown user and a foreign authzid get 535 5.7.8;
        a cancelled exchange 501; garbage 501; AUTH after AUTH 503.
        """
        def probe(client):
            return [
                client.docmd("AUTH", "PLAIN " + b64(b"\0alice@localhost\0wrong")),
                client.docmd("AUTH", "PLAIN " + b64(b"\0nobody@localhost\0alice-pw")),
                client.docmd("AUTH",
                             "PLAIN " + b64(b"bob@example.test\0alice@localhost\0alice-pw")),
                (client.docmd("AUTH", "LOGIN"), client.docmd("*"))[1],
                client.docmd("AUTH", "PLAIN !!notbase64!!"),
                client.docmd("AUTH", "CRAM-MD5"),
                client.docmd("AUTH", "PLAIN " + b64(b"\0alice@localhost\0alice-pw")),
                client.docmd("AUTH", "PLAIN " + b64(b"\0alice@localhost\0alice-pw")),
            ]

        replies = yield self.session(probe, login=None)
        self.assertEqual([(c, m.split()[0]) for c, m in replies], [
            (535, b"5.7.8"), (535, b"5.7.8"), (535, b"5.7.8"), (501, b"5.0.0"),
            (501, b"5.5.2"), (504, b"5.5.4"), (235, b"2.7.0"), (503, b"5.5.1"),
        ])

    @inlineCallbacks
    def test_sender_authorization(self):
        """
        MAIL needs AUTH; the sender must be the user's own address, a
        plus-address of it, or an alias that reaches the user.
        """
        def unauthenticated(client):
            return client.docmd("MAIL", "FROM:<alice@localhost>")

        def senders(client):
            codes = []
            for sender in ("bob@example.test", "alice@localhost", "Alice+lists@LOCALHOST",
                           "sales@localhost", "<>", "alice@elsewhere.test"):
                path = "<>" if sender == "<>" else f"<{sender}>"
                codes.append(client.docmd("MAIL", f"FROM:{path}")[0])
                client.rset()
            return codes

        code, message = yield self.session(unauthenticated, login=None)
        self.assertEqual((code, message.split()[0]), (530, b"5.7.0"))
        self.assertEqual((yield self.session(senders)), [553, 250, 250, 250, 553, 553])

    @inlineCallbacks
    def test_header_from_authorization(self):
        """
        Every From: address in a local domain must be the user's, as the
        envelope sender must (else one user could send as another, with
        the domain's DKIM signature): 550 5.7.1 after DATA, nothing
        delivered.  However the field is written (case, trailing dot,
        folded, encoded name, a list, a second From field).  From: of a
        foreign domain passes (never signed here).
        """
        cases = [
            (b"From: Alice <alice@localhost>", 250),
            (b"From: sales@localhost", 250),
            (b"From: alice+news@LOCALHOST", 250),
            (b"From: someone@elsewhere.test", 250),
            (b"From: Bob <bob@example.test>", 550),
            (b"From: bob@EXAMPLE.TEST.", 550),
            (b"From: =?utf-8?q?Alice?= <bob@example.test>", 550),
            (b"From: Alice\r\n <bob@example.test>", 550),
            (b"From: alice@localhost, bob@example.test", 550),
            (b"From: alice@localhost\r\nFrom: bob@example.test", 550),
            (b"From: \"bob\"@example.test", 550),
            # Hidden from a view of the first 256 KiB of the header only:
            (b"X-Pad: " + b"p" * 900 + b"\r\n" + (b"X-Pad: " + b"p" * 900 + b"\r\n") * 300
             + b"From: bob@example.test", 550),
        ]

        def send(client):
            replies = []
            for number, (field, _) in enumerate(cases):
                client.mail("alice@localhost")
                client.rcpt("bob@example.test")
                replies.append(client.data(field + f"\r\nSubject: {number}\r\n\r\nx\r\n"
                                           .encode()))
            # A message that is all header, From: its last line.
            client.mail("alice@localhost")
            client.rcpt("bob@example.test")
            replies.append(client.data(b"Subject: 99\r\nFrom: bob@example.test\r\n"))
            return replies

        replies = yield self.session(send)
        self.assertEqual([code for code, _ in replies], [code for _, code in cases] + [550])
        for code, text in replies:
            if code == 550:
                self.assertTrue(text.startswith(b"5.7.1 <"), text)
                self.assertIn(b"not owned by user alice@localhost", text)
        delivered = read_messages(self.server, "bob@example.test")
        self.assertEqual(sorted(int(m.split(b"Subject: ")[1].split(b"\n")[0])
                                for m in delivered),
                         [n for n, (_, code) in enumerate(cases) if code == 250])

    @inlineCallbacks
    def test_fixups(self):
        """
        A missing Message-ID and Date are added; present ones are kept.
        """
        def send(client):
            client.sendmail("alice@localhost", ["bob@example.test"], b"Subject: bare\r\n\r\nx\r\n")
            client.sendmail("alice@localhost", ["bob@example.test"],
                            b"Subject: full\r\nMessage-ID: <mine@client.test>\r\n"
                            b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nx\r\n")

        yield self.session(send)
        bare, full = sorted(read_messages(self.server, "bob@example.test"),
                            key=lambda m: b"Subject: full" in m)
        self.assertRegex(bare, rb"\nMessage-ID: <[0-9A-F]+\.[0-9a-f]+@mx\.test>\n")
        self.assertRegex(bare, rb"\nDate: \w{3}, \d+ \w{3} \d{4} [\d:]{8} \+0000\n")
        self.assertEqual(full.count(b"Message-ID:"), 1)
        self.assertEqual(full.count(b"\nDate:"), 1)
        self.assertIn(b"Message-ID: <mine@client.test>", full)

    @inlineCallbacks
    def test_implicit_tls(self):
        """
        The submissions port speaks TLS from the first byte, verifiable
        against the generated certificate, and offers AUTH at once.
        """
        def run():
            client = smtplib.SMTP_SSL("localhost", self.server.ports["submissions"],
                                      context=self.context, timeout=30)
            try:
                client.ehlo("c.test")
                starttls = client.has_extn("starttls")
                client.login("alice@localhost", "alice-pw")
                client.sendmail("alice@localhost", ["bob@example.test"], b"Subject: 465\r\n\r\n")
                return starttls
            finally:
                client.quit()

        self.assertFalse((yield in_thread(run)))
        [message] = read_messages(self.server, "bob@example.test")
        self.assertIn(b"with ESMTPSA", message)

    @inlineCallbacks
    def test_certificate_does_not_verify_for_other_names(self):
        """
        The generated certificate names this host only.
        """
        port = self.server.ports["submissions"]
        context = self.context

        def wrong_name():
            import socket
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                with context.wrap_socket(raw, server_hostname="other.test"):
                    pass

        yield self.assertFailure(in_thread(wrong_name), ssl.SSLCertVerificationError)


class FakeChecker:
    """
    Accepts one password; answers synchronously.  Credentials are bytes,
    as Twisted's L{UsernamePassword} says; the avatar id is the address.
    """

    def requestAvatarId(self, credentials):
        if credentials.password == b"right":
            return succeed(credentials.username.decode("utf-8"))
        return fail(UnauthorizedLogin())


class ThrottleTests(SynchronousTestCase):
    """
    Brute force is slowed, then refused; other clients are not affected.
    """

    def setUp(self):
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock)
        dispatcher = Dispatcher(None, None, None, self.clock)
        policy = SubmissionPolicy(dispatcher, FakeChecker(), self.throttle, self.clock, "mx.test")
        settings = ServerSettings(hostname="mx.test", max_message_size=10000,
                                  implicit_tls=True, name="submissions")
        self.factory = SMTPServerFactory(policy, settings, self.clock)

    def connect(self, host="192.0.2.1"):
        from twisted.internet.address import IPv4Address
        transport = StringTransport(peerAddress=IPv4Address("TCP", host, 1234))
        proto = self.factory.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO c.test\r\n")
        transport.clear()
        return proto, transport

    def auth(self, proto, transport, password, user=b"u@x.test"):
        proto.dataReceived(b"AUTH PLAIN " + base64.b64encode(b"\0" + user + b"\0" + password) +
                           b"\r\n")
        value = transport.value()
        transport.clear()
        return value[:3]

    def test_slowed_then_refused(self):
        """
        The first failures answer at once; from the third on, answers wait
        1, 2, 4, 8 s...; the tenth failure disconnects, and the address is
        refused at connect until its failures age out.
        """
        proto, transport = self.connect()
        waits = []
        for attempt in range(10):
            code = self.auth(proto, transport, b"wrong%d" % attempt)
            waited = 0
            while not code and waited < 100:
                self.clock.advance(1)
                waited += 1
                code = transport.value()[:3]
                transport.clear() if code else None
            waits.append(waited)
            if code == b"421":
                break
            self.assertEqual(code, b"535")
        self.assertEqual(waits, [0, 0, 0, 1, 2, 4, 8, 16, 16, 16])
        self.assertTrue(transport.disconnecting)
        # The same user from a network where it never failed: not slowed.
        other, t = self.connect("198.51.100.9")
        self.assertEqual(self.auth(other, t, b"right"), b"235")

        from twisted.internet.address import IPv4Address
        again = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1))
        self.factory.buildProtocol(None).makeConnection(again)
        self.assertTrue(again.value().startswith(b"421 4.7.0"))
        self.clock.advance(LoginThrottle.window + 1)
        proto, transport = self.connect()
        self.assertEqual(self.auth(proto, transport, b"right"), b"235")

    def test_good_clients_elsewhere_unaffected(self):
        """
        Failures from one address do not slow another address's other user.
        """
        proto, transport = self.connect("192.0.2.1")
        for attempt in range(5):
            self.auth(proto, transport, b"wrong%d" % attempt)
            self.clock.advance(100)
        other, t = self.connect("192.0.2.2")
        self.assertEqual(self.auth(other, t, b"right", user=b"v@x.test"), b"235")


class TwistedCheckerTests(SynchronousTestCase):
    """
    SMTP AUTH gives the checker credentials as Twisted's
    L{UsernamePassword} says (bytes), so a checker written to that contract
    works: here Twisted's own in-memory one, whose avatar id is bytes too.
    """

    def test_twisted_checker(self):
        from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse

        clock = Clock()
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(b"u@x.test", "pässword".encode())
        policy = SubmissionPolicy(Dispatcher(None, None, None, clock), checker,
                                  LoginThrottle(clock), clock, "mx.test")
        settings = ServerSettings(hostname="mx.test", max_message_size=10000,
                                  implicit_tls=True, name="submissions")
        factory = SMTPServerFactory(policy, settings, clock)
        results = []
        for password in ("wrong", "pässword"):
            proto = factory.buildProtocol(None)
            transport = StringTransport()
            proto.makeConnection(transport)
            proto.dataReceived(b"EHLO c.test\r\n")
            transport.clear()
            response = base64.b64encode("\0u@x.test\0{}".format(password).encode())
            proto.dataReceived(b"AUTH PLAIN " + response + b"\r\n")
            results.append(transport.value()[:3])
        self.assertEqual(results, [b"535", b"235"])
        self.assertEqual(str(proto.session.user), "u@x.test")
