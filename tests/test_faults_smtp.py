"""
Issue 12 in the SMTP session: recipient limits and error counting as
Postfix does them, and the reply to an 8-bit address.
"""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.smtp.server import ServerSettings, SMTPServerFactory

from tests.test_smtp_server import ScriptedPolicy, TLSStringTransport


class LimitTests(SynchronousTestCase):
    """
    A session over a StringTransport with a scripted policy.
    """

    def setUp(self):
        self.clock = Clock()
        self.policy = ScriptedPolicy()
        self.settings = ServerSettings(hostname="mx.test", max_message_size=10000, timeout=300)
        self.factory = SMTPServerFactory(self.policy, self.settings, self.clock)
        self.transport = TLSStringTransport()
        self.proto = self.factory.buildProtocol(None)
        self.proto.makeConnection(self.transport)
        self.transport.clear()

    def send(self, data):
        self.proto.dataReceived(data)
        lines = self.transport.value().split(b"\r\n")
        self.transport.clear()
        return [line for line in lines if line]

    def codes(self, data):
        return [line[:3] for line in self.send(data) if line[3:4] == b" "]


class RecipientLimitTests(LimitTests):

    def test_recipients_over_the_limit_are_no_errors(self):
        """
        150 recipients: 100 are taken, the other 50 get 452 4.5.3 without
        the session being closed, and the message is delivered to the 100
        (a client such as Postfix sends the rest in the next transaction).
        """
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
        codes = self.codes(b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(150)))
        self.assertEqual(codes, [b"250"] * 100 + [b"452"] * 50)
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(self.codes(b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n"), [b"354", b"250"])
        self.assertEqual(len(self.policy.delivered[0][0].rcpts), 100)

    def test_overshoot_limit(self):
        """
        Past the overshoot limit each refused recipient counts as an error.
        """
        self.settings.max_recipients = 2
        self.settings.recipient_overshoot = 5
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
        replies = self.send(b"".join(b"RCPT TO:<u%d@mx.test>\r\n" % i for i in range(40)))
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Error: too many errors")
        # 2 accepted, 5 refused for free, then 20 counted errors.
        self.assertEqual(len(replies), 2 + 5 + 20 + 1)

    def test_errors_reset_by_a_delivery(self):
        """
        Errors count toward the hard limit only while nothing is delivered:
        three messages, each with one good and seven unknown recipients,
        are all delivered.
        """
        self.send(b"EHLO c.test\r\n")
        for _ in range(3):
            rcpts = b"RCPT TO:<u@mx.test>\r\n" + b"RCPT TO:<unknown@mx.test>\r\n" * 7
            codes = self.codes(b"MAIL FROM:<a@b.test>\r\n" + rcpts
                               + b"DATA\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
            self.assertEqual(codes, [b"250", b"250"] + [b"550"] * 7 + [b"354", b"250"])
        self.assertEqual(len(self.policy.delivered), 3)
        self.assertFalse(self.transport.disconnecting)

    def test_errors_without_delivery_still_close(self):
        """
        A session that delivers nothing is still closed at the 20th error.
        """
        self.send(b"EHLO c.test\r\n")
        replies = self.send(b"MAIL FROM:<a@b.test>\r\n" + b"RCPT TO:<unknown@mx.test>\r\n" * 30)
        self.assertEqual(replies[-1], b"421 4.7.0 mx.test Error: too many errors")
        self.assertTrue(self.transport.disconnecting)


class EightBitAddressTests(LimitTests):

    def test_8bit_address(self):
        """
        An 8-bit address, at MAIL or RCPT, gets 553 5.6.7 (RFC 6531: we do
        not offer SMTPUTF8), as the README says.
        """
        self.send(b"EHLO c.test\r\n")
        self.assertEqual(self.send("MAIL FROM:<jöhn@c.test>\r\n".encode()),
                         [b"553 5.6.7 Error: 8-bit characters in an address need SMTPUTF8, "
                          b"which is not offered"])
        self.send(b"MAIL FROM:<a@b.test>\r\n")
        self.assertEqual(self.codes("RCPT TO:<jöhn@mx.test>\r\n".encode("latin-1")), [b"553"])
        self.assertEqual(self.codes("NOOP é\r\n".encode()), [b"500"])

    def test_8bit_address_is_no_protocol_error(self):
        """
        8-bit addresses do not count toward the error limit.
        """
        self.send(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\n")
        replies = self.send("RCPT TO:<jöhn@mx.test>\r\n".encode() * 30)
        self.assertEqual(len(replies), 30)
        self.assertFalse(self.transport.disconnecting)


del LimitTests
