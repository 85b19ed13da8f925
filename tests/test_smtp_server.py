"""
Tests for L{mailstack.smtp.server}: the session state machine, byte-exact,
over a StringTransport with a scripted policy and a fake clock.
"""

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address
from mailstack.delivery.router import Resolution
from mailstack.message import LocalRecipient
from mailstack.smtp.reply import SMTPError
from mailstack.smtp.server import ServerSettings, SMTPServerFactory


class TLSStringTransport(StringTransport):
    """
    A StringTransport that records C{startTLS}.
    """

    tls_context = None

    def startTLS(self, context):
        self.tls_context = context


class ScriptedPolicy:
    """
    A policy whose answers a test controls; it records deliveries.
    """

    def __init__(self):
        self.mail_result = None
        self.rcpt_results = {}
        self.deliver_result = None
        self.delivered = []

    def connect(self, session):
        return None

    def extensions(self, session):
        return []

    def auth(self, protocol, arg):
        from mailstack.smtp.reply import Reply
        return Reply(503, "5.5.1", "Error: authentication not enabled")

    def mail(self, session, sender):
        return self.mail_result

    def rcpt(self, session, envelope, rcpt):
        result = self.rcpt_results.get(str(rcpt))
        if result is not None:
            return result
        if rcpt.local == "unknown":
            raise SMTPError(550, "5.1.1", "User unknown")
        return Resolution(local=(LocalRecipient(rcpt, rcpt),))

    def deliver(self, session, envelope, spool):
        self.delivered.append((envelope, spool.read()))
        return self.deliver_result


class SessionTests(SynchronousTestCase):
    """
    A session, driven byte by byte.
    """

    def setUp(self):
        self.clock = Clock()
        self.policy = ScriptedPolicy()
        self.settings = ServerSettings(hostname="mx.test", max_message_size=10000, timeout=300)
        self.factory = SMTPServerFactory(self.policy, self.settings, self.clock,
                                         tls=lambda: "TLS-CONTEXT")
        self.connect()

    def connect(self):
        self.transport = TLSStringTransport()
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.assertEqual(self.replies(), [b"220 mx.test ESMTP mailstack"])

    def replies(self):
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def send(self, data):
        self.proto.dataReceived(data)
        return self.replies()

    def codes(self, data):
        return [line[:3] for line in self.send(data) if line[3:4] == b" "]

    def test_ehlo_extensions(self):
        """
        EHLO lists the extensions we implement, STARTTLS before TLS only.
        """
        self.assertEqual(self.send(b"EHLO client.test\r\n"), [
            b"250-mx.test", b"250-PIPELINING", b"250-SIZE 10000", b"250-8BITMIME",
            b"250-ENHANCEDSTATUSCODES", b"250 STARTTLS",
        ])

    def test_transaction(self):
        """
        A whole transaction: the content reaches the policy with a Received
        header, dot-unstuffed and with LF endings.
        """
        replies = self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n"
                            b"DATA\r\n")
        self.assertEqual(replies[-3:], [b"250 2.1.0 Ok", b"250 2.1.5 Ok",
                                        b"354 End data with <CR><LF>.<CR><LF>"])
        replies = self.send(b"Subject: t\r\n\r\n..x\r\n.\r\n")
        self.assertTrue(replies[0].startswith(b"250 2.0.0 Ok: queued as "))
        envelope, content = self.policy.delivered[0]
        self.assertEqual(envelope.sender, Address("a", "b.test"))
        self.assertTrue(content.startswith(b"Received: from c.test ([192.168.1.1])\n\tby mx.test"))
        self.assertTrue(content.endswith(b"\nSubject: t\n\n.x\n"))

    def test_pipelining_with_async_checks(self):
        """
        Commands pipelined behind a pending check wait for it: replies come
        in order, DATA sees the recipient, and input is paused meanwhile.
        """
        pending = Deferred()
        self.policy.mail_result = pending
        replies = self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n"
                            b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        self.assertEqual(len(replies), 6)  # only EHLO's answer so far
        self.assertEqual(self.transport.producerState, "paused")
        pending.callback(None)
        replies = self.replies()
        self.assertEqual([r[:3] for r in replies], [b"250", b"250", b"354", b"250", b"221"])
        self.assertEqual(len(self.policy.delivered), 1)

    def test_no_pause_for_a_client_that_waits(self):
        """
        A pending check pauses the transport only once input arrives behind
        it: a client that waits for each reply costs no pause and resume
        (each two epoll_ctl calls); one that sends on is paused at once.
        """
        pauses = []
        original = self.transport.pauseProducing

        def pause():
            pauses.append(True)
            original()

        self.transport.pauseProducing = pause
        pending = Deferred()
        self.policy.mail_result = pending
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
        self.assertEqual((self.transport.producerState, pauses), ("producing", []))
        self.send(b"RCPT TO:<u@mx.test>\r\n")
        self.assertEqual((self.transport.producerState, len(pauses)), ("paused", 1))
        self.send(b"NOOP\r\n")
        self.assertEqual(len(pauses), 1)
        pending.callback(None)
        self.assertEqual(self.transport.producerState, "producing")
        self.assertEqual([r[:3] for r in self.replies()], [b"250", b"250", b"250"])

    def test_async_delivery_keeps_order(self):
        """
        The next MAIL's reply never overtakes DATA's (twisted#8126).
        """
        pending = Deferred()
        self.policy.deliver_result = pending
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        self.assertEqual(self.codes(b"x\r\n.\r\nMAIL FROM:<b@b.test>\r\n"), [])
        pending.callback(None)
        self.assertEqual(self.codes(b""), [b"250", b"250"])
        self.assertEqual(self.proto.envelope.sender, Address("b", "b.test"))

    def test_delivery_failure_is_temporary(self):
        """
        A failed delivery answers 451 4.3.0, never a permanent 5xx.
        """
        from twisted.internet.defer import fail
        self.policy.deliver_result = fail(OSError(28, "No space left on device"))
        self.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        self.assertEqual(self.send(b"x\r\n.\r\n"),
                         [b"451 4.3.0 Error: could not store the message, try again later"])
        self.flushLoggedErrors(OSError)

    def test_starttls_discards_pipelined_commands(self):
        """
        Commands sent in clear text behind STARTTLS are dropped, and the
        session needs a new EHLO (CVE-2011-0411).
        """
        self.send(b"EHLO c.test\r\n")
        replies = self.send(b"STARTTLS\r\nMAIL FROM:<evil@b.test>\r\nRCPT TO:<u@mx.test>\r\n")
        self.assertEqual(replies, [b"220 2.0.0 Ready to start TLS"])
        self.assertEqual(self.transport.tls_context, "TLS-CONTEXT")
        self.assertIsNone(self.proto.envelope)
        self.assertEqual(self.send(b"MAIL FROM:<a@b.test>\r\n"),
                         [b"503 5.5.1 Error: send HELO/EHLO first"])
        ehlo = self.send(b"EHLO c.test\r\n")
        self.assertNotIn(b"250 STARTTLS", ehlo)
        self.assertEqual(self.send(b"STARTTLS\r\n"), [b"503 5.5.1 Error: TLS already active"])

    def test_command_order(self):
        """
        MAIL needs HELO, RCPT needs MAIL, DATA needs a recipient.
        """
        self.assertEqual(self.codes(b"MAIL FROM:<a@b.test>\r\n"), [b"503"])
        self.send(b"EHLO c.test\r\n")
        self.assertEqual(self.codes(b"RCPT TO:<u@mx.test>\r\nDATA\r\n"), [b"503", b"503"])
        self.assertEqual(self.codes(b"MAIL FROM:<a@b.test>\r\nMAIL FROM:<a@b.test>\r\n"),
                         [b"250", b"503"])
        self.assertEqual(self.codes(b"RCPT TO:<unknown@mx.test>\r\nDATA\r\n"), [b"550", b"554"])
        self.assertEqual(self.codes(b"RSET\r\nRCPT TO:<u@mx.test>\r\n"), [b"250", b"503"])

    def test_hostile_addresses(self):
        """
        Source routes, %-hacks, bang paths, 8-bit and malformed addresses
        get their codes.
        """
        self.send(b"EHLO c.test\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<@a.test,@b.test:x@c.test>\r\n"),
                         [b"553 5.1.3 Error: source routes are not accepted"])
        self.assertEqual(self.codes(b"MAIL FROM:x@c.test\r\n"), [b"501"])
        self.assertEqual(self.codes("MAIL FROM:<jöhn@c.test>\r\n".encode()), [b"553"])
        self.send(b"MAIL FROM:<>\r\n")
        self.assertEqual(self.codes(b"RCPT TO:<u%other.test@mx.test>\r\n"
                                    b"RCPT TO:<other!u@mx.test>\r\n"
                                    b"RCPT TO:<@x.test:u@mx.test>\r\n"
                                    b"RCPT TO:<>\r\n"
                                    b"RCPT TO:<u@-bad-.test>\r\n"),
                         [b"553", b"553", b"553", b"501", b"501"])

    def test_size(self):
        """
        A SIZE over the limit is refused at MAIL, and so is a message that
        lies about its size, after its end.
        """
        self.send(b"EHLO c.test\r\n")
        self.assertEqual(self.send(b"MAIL FROM:<a@b.test> SIZE=10001\r\n"),
                         [b"552 5.3.4 Message size exceeds fixed maximum message size"])
        self.send(b"MAIL FROM:<a@b.test> SIZE=100 BODY=8BITMIME\r\nRCPT TO:<u@mx.test>\r\n"
                  b"DATA\r\n")
        self.assertEqual(self.codes((b"x" * 98 + b"\r\n") * 101 + b".\r\nNOOP\r\n"),
                         [b"552", b"250"])
        self.assertEqual(self.policy.delivered, [])

    def test_unknown_parameters(self):
        """
        Parameters we do not offer get 555 5.5.4.
        """
        self.send(b"EHLO c.test\r\n")
        self.assertEqual(self.codes(b"MAIL FROM:<a@b.test> SMTPUTF8\r\n"
                                    b"MAIL FROM:<a@b.test> RET=FULL\r\n"), [b"555", b"555"])
        self.send(b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(self.codes(b"RCPT TO:<u@mx.test> NOTIFY=NEVER\r\n"), [b"555"])

    def test_long_command_line(self):
        """
        A command line over 512 octets gets 500 5.5.2 and is dropped, with
        or without its CRLF in sight; the session goes on.
        """
        self.assertEqual(self.codes(b"NOOP " + b"x" * 600 + b"\r\nNOOP\r\n"), [b"500", b"250"])
        self.assertEqual(self.codes(b"NOOP " + b"x" * 100000), [b"500"])
        self.assertLess(len(self.proto._buffer), 1024)
        self.assertEqual(self.codes(b"x" * 100000), [])
        self.assertEqual(self.codes(b"xx\r\nNOOP\r\n"), [b"250"])

    def test_recipient_limit(self):
        """
        The 101st recipient gets 452 4.5.3.
        """
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
        codes = self.codes(b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(101)))
        self.assertEqual(codes, [b"250"] * 100 + [b"452"])

    def test_too_many_hops(self):
        """
        More than 50 Received headers (a mail loop) get 554 5.4.6.
        """
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        message = b"Received: from x by y\r\n" * 50 + b"Subject: loop\r\n\r\nbody\r\n.\r\n"
        self.assertEqual(self.send(message), [b"554 5.4.6 Error: too many hops (mail loop?)"])
        self.send(b"MAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n")
        message = b"Received: from x by y\r\n" * 49 + b"\r\nbody\r\n.\r\n"
        self.assertEqual(self.codes(message), [b"250"])

    def test_too_many_errors(self):
        """
        After 20 errors the server says 421 and hangs up.
        """
        replies = self.send(b"BOGUS\r\n" * 25)
        self.assertEqual(len(replies), 21)
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Error: too many errors")
        self.assertTrue(self.transport.disconnecting)

    def test_idle_timeout(self):
        """
        After the idle timeout the server says 421 4.4.2 and hangs up;
        activity restarts the clock.
        """
        self.clock.advance(299)
        self.send(b"NOOP\r\n")
        self.clock.advance(299)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(self.replies(), [b"421 4.4.2 mx.test Error: timeout exceeded"])
        self.assertTrue(self.transport.disconnecting)

    def test_no_timeout_while_delivering(self):
        """
        A slow delivery is not cut off by the idle timer; it restarts after.
        """
        pending = Deferred()
        self.policy.deliver_result = pending
        self.send(b"HELO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\nDATA\r\n"
                  b"x\r\n.\r\n")
        self.clock.advance(1000)
        self.assertFalse(self.transport.disconnecting)
        pending.callback(None)
        self.assertEqual(self.codes(b""), [b"250"])
        self.clock.advance(301)
        self.assertTrue(self.transport.disconnecting)

    def test_bad_helo(self):
        """
        A HELO name with spaces or odd characters is refused: it would go
        into the Received header.
        """
        self.assertEqual(self.codes(b"EHLO\r\nEHLO a b\r\nEHLO a\x01b\r\nHELO ok.test\r\n"),
                         [b"501", b"501", b"501", b"250"])

    def test_nul_in_command(self):
        """
        A NUL byte in a command is refused.
        """
        self.assertEqual(self.codes(b"NOOP\0\r\n"), [b"500"])

    def test_misc_commands(self):
        """
        NOOP, VRFY, HELP, AUTH (not offered here), BDAT and QUIT.
        """
        self.assertEqual(self.codes(b"NOOP\r\nVRFY x\r\nHELP\r\nAUTH PLAIN\r\nBDAT 10\r\nQUIT\r\n"),
                         [b"250", b"252", b"214", b"503", b"502", b"221"])
        self.assertTrue(self.transport.disconnecting)
