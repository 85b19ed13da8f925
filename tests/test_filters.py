"""
Message filter plugins: discovery in mailstack.plugins, the built-in
greylist, and a third party's plugin dropped into a mailstack/plugins/
directory of its own, against a real server with smtplib.
"""

import os
import smtplib
import sys
import textwrap

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface.verify import verifyObject

from mailstack import plugins
from mailstack.address import parse_address
from mailstack.interfaces import IMessageFilter, IMessageFilterFactory
from mailstack.plugins.greylist import Greylist
from mailstack.smtp.filters import available_filters
from mailstack.smtp.server import Session
from mailstack.tap import Options
from tests.support import add_user, in_thread, read_messages, smtp_session, start_server

LISTEN = "tcp:0:interface=127.0.0.1"

THIRD_PARTY = '''
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.interfaces import IMessageFilterFactory
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply, SMTPError


class NoSpam(MessageFilter):
    name = "nospam"

    def mail(self, session, sender):
        if sender is not None and sender.local == "spammer":
            return Reply(550, "5.7.1", "go away")

    def data(self, session, envelope, spool):
        if b"BUY NOW" in spool.read():
            raise SMTPError(554, "5.7.1", "looks like spam")


@implementer(IPlugin, IMessageFilterFactory)
class NoSpamFactory:
    name = "nospam"
    description = "a third party's filter, for the tests"

    def build(self, config, reactor):
        return NoSpam()


nospam = NoSpamFactory()
'''


class DiscoveryTests(SynchronousTestCase):
    def test_builtin_greylist(self):
        found = available_filters()
        self.assertIn("greylist", found)
        self.assertTrue(verifyObject(IMessageFilterFactory, found["greylist"]))
        self.assertTrue(verifyObject(IMessageFilter, found["greylist"].build(None, Clock())))

    def test_unknown_filter_is_a_usage_error(self):
        options = Options()
        error = self.assertRaises(usage.UsageError, options.parseOptions,
                                  ["--filter", "no-such-filter"])
        self.assertIn("greylist", str(error))


class GreylistTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.greylist = Greylist(self.clock)

    def rcpt(self, host="192.0.2.10", sender="a@remote.test", rcpt="alice@localhost",
             service="smtp", user=None):
        session = Session(host, 25, service=service, user=user)
        return self.greylist.rcpt(session, parse_address(sender), parse_address(rcpt))

    def test_retry_after_delay_passes(self):
        first = self.rcpt()
        self.assertEqual((first.code, first.enhanced), (451, "4.7.1"))
        self.clock.advance(100)
        early = self.rcpt()
        self.assertEqual(early.code, 451)
        self.assertIn("201 seconds", early.text)
        self.clock.advance(201)
        self.assertIsNone(self.rcpt(host="192.0.2.99"))  # same /24
        self.clock.advance(30 * 86400)
        self.assertIsNone(self.rcpt())  # still passed; refreshed on use

    def test_triples_apart(self):
        self.rcpt()
        self.clock.advance(400)
        self.assertEqual(self.rcpt(rcpt="bob@localhost").code, 451)
        self.assertEqual(self.rcpt(host="198.51.100.1").code, 451)
        self.assertEqual(self.rcpt(host="2001:db8::1").code, 451)
        self.clock.advance(400)
        self.assertIsNone(self.rcpt(host="2001:db8::ffff"))  # same /64

    def test_forgotten_after_retry_window(self):
        self.rcpt()
        self.clock.advance(3 * 86400)
        self.assertEqual(self.rcpt().code, 451)  # a new first attempt

    def test_never_authenticated_or_submission(self):
        self.assertIsNone(self.rcpt(user="alice@localhost"))
        self.assertIsNone(self.rcpt(service="submission"))

    def test_bounded(self):
        self.greylist.max_entries = 10
        for i in range(25):
            self.rcpt(sender=f"s{i}@remote.test")
        self.assertEqual(len(self.greylist._first_seen), 10)


class ServerTests(TestCase):
    def install_third_party(self):
        root = self.mktemp()
        directory = os.path.join(root, "mailstack", "plugins")
        os.makedirs(directory)
        with open(os.path.join(directory, "nospam_plugin.py"), "w") as f:
            f.write(textwrap.dedent(THIRD_PARTY))
        plugins.__path__.append(directory)
        self.addCleanup(plugins.__path__.remove, directory)
        self.addCleanup(sys.modules.pop, "mailstack.plugins.nospam_plugin", None)

    @inlineCallbacks
    def test_third_party_plugin(self):
        """
        A module in another mailstack/plugins/ directory is found and, with
        --filter, refuses at MAIL and at DATA; other mail is delivered.
        """
        self.install_third_party()
        server = yield start_server(self, smtp=LISTEN, filter=["nospam"])
        add_user(server, "alice@localhost")

        def talk(client):
            client.ehlo("client.test")
            refused_mail = client.mail("spammer@remote.test")
            client.rset()
            try:
                client.sendmail("x@remote.test", ["alice@localhost"],
                                b"Subject: hi\r\n\r\nBUY NOW\r\n")
                refused_data = None
            except smtplib.SMTPDataError as e:
                refused_data = (e.smtp_code, e.smtp_error)
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: hi\r\n\r\nhello\r\n")
            return refused_mail, refused_data

        refused_mail, refused_data = yield in_thread(smtp_session, server.ports["smtp"], talk)
        self.assertEqual(refused_mail, (550, b"5.7.1 go away"))
        self.assertEqual(refused_data, (554, b"5.7.1 looks like spam"))
        [delivered] = read_messages(server, "alice@localhost")
        self.assertIn(b"hello", delivered)

    @inlineCallbacks
    def test_greylist_on_the_receiving_mta(self):
        """
        With --filter greylist, a first attempt gets 451 4.7.1 at RCPT, and
        nothing is delivered; an unknown user is still a 550 first.
        """
        server = yield start_server(self, smtp=LISTEN, filter=["greylist"])
        add_user(server, "alice@localhost")

        def talk(client):
            client.ehlo("client.test")
            client.mail("x@remote.test")
            return client.rcpt("nobody@localhost"), client.rcpt("alice@localhost")

        unknown, greylisted = yield in_thread(smtp_session, server.ports["smtp"], talk)
        self.assertEqual(unknown[0], 550)
        self.assertEqual(greylisted[0], 451)
        self.assertIn(b"4.7.1 Greylisted", greylisted[1])
        self.assertEqual(read_messages(server, "alice@localhost"), [])
