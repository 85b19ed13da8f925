"""
Issue 12 items 2 and 7: postmaster is always accepted (RFC 5321 4.5.1),
and a recipient that resolves to nothing is refused at RCPT instead of
being acknowledged and lost; bad lines in users/aliases are logged.
"""

import os

from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import Address, local_address
from mailstack.delivery.router import EmptyResolution, Router
from mailstack.message import LocalRecipient
from mailstack.users import AliasMap, UserDatabase
from tests.support import add_user, in_thread, read_messages, smtp_session, start_server

SMTP = "tcp:0:interface=127.0.0.1"


def A(text):
    return local_address(text)


class LogCatcher:
    def __init__(self, testcase):
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        testcase.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def texts(self):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events]


class PostmasterRouterTests(SynchronousTestCase):
    def setUp(self):
        d = self.mktemp()
        os.makedirs(d)
        self.users, self.aliases = UserDatabase(d), AliasMap(d)
        self.users.add(A("alice@one.test"), "h")
        self.domains = frozenset({"one.test", "two.test"})

    def test_default(self):
        """
        With no user or alias of that name, postmaster@ every local domain
        (any case, with a tag too) reaches the default postmaster mailbox.
        """
        router = Router(self.domains, self.users, self.aliases, Address("postmaster", "one.test"))
        for rcpt in (Address("postmaster", "one.test"), Address("PostMaster", "two.test"),
                     Address("postmaster+x", "two.test")):
            self.assertEqual([r.user for r in router.resolve(rcpt).local],
                             [A("postmaster@one.test")])

    def test_configured(self):
        """
        --postmaster may be a local user or a remote address.
        """
        router = Router(self.domains, self.users, self.aliases, A("alice@one.test"))
        r = router.resolve(Address("postmaster", "two.test"))
        self.assertEqual(r.local, (LocalRecipient(A("alice@one.test"), A("alice@one.test")),))
        router = Router(self.domains, self.users, self.aliases, A("admin@far.test"))
        self.assertEqual(router.resolve(Address("postmaster", "one.test")).remote,
                         (A("admin@far.test"),))

    def test_configured_unknown(self):
        """
        A --postmaster nobody created does not make postmaster refused.
        """
        router = Router(self.domains, self.users, self.aliases, A("root@one.test"))
        r = router.resolve(Address("postmaster", "two.test"))
        self.assertEqual(r.local, (LocalRecipient(A("postmaster@two.test"),
                                                  Address("postmaster", "two.test")),))

    def test_alias_wins(self):
        """
        An explicit postmaster alias or user still wins.
        """
        self.aliases.add(A("postmaster@two.test"), (A("alice@one.test"),))
        router = Router(self.domains, self.users, self.aliases, Address("postmaster", "one.test"))
        self.assertEqual(router.resolve(Address("postmaster", "two.test")).local[0].user,
                         A("alice@one.test"))


class EmptyResolutionTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.users, self.aliases = UserDatabase(self.dir), AliasMap(self.dir)
        self.log = LogCatcher(self)

    def test_alias_with_no_valid_target(self):
        """
        An alias whose targets do not parse raises EmptyResolution, and the
        bad line is logged when the file is read.
        """
        with open(os.path.join(self.dir, "aliases"), "w") as f:
            f.write("broken@one.test: not an address, @@\ngood@one.test: x@far.test\n")
        router = Router(frozenset({"one.test"}), self.users, self.aliases)
        self.assertRaises(EmptyResolution, router.resolve, A("broken@one.test"))
        self.assertEqual(router.resolve(A("good@one.test")).remote, (A("x@far.test"),))
        warnings = [t for t in self.log.texts() if "line 1 ignored" in t]
        self.assertEqual(len(warnings), 1, self.log.texts())
        self.assertIn("bad target", warnings[0])

    def test_bad_user_lines_logged(self):
        """
        A users line without ':' or with a bad address is logged.
        """
        with open(os.path.join(self.dir, "users"), "w") as f:
            f.write("alice@one.test:h\ngarbage line\nbad address@x:h\n")
        self.assertTrue(self.users.exists(A("alice@one.test")))
        texts = self.log.texts()
        self.assertTrue(any("line 2 ignored" in t and "no ':'" in t for t in texts), texts)
        self.assertTrue(any("line 3 ignored" in t and "bad address" in t for t in texts), texts)


class PostmasterServerTests(TestCase):
    """
    Through a real server and smtplib.
    """

    @inlineCallbacks
    def test_postmaster_accepted_and_delivered(self):
        """
        RCPT TO:<postmaster> and postmaster@ each local domain get 250 and
        reach the configured postmaster (--postmaster).
        """
        server = yield start_server(self, smtp=SMTP, postmaster="alice@localhost")
        add_user(server, "alice@localhost")

        def send(client):
            client.ehlo("c.test")
            client.mail("x@far.test")
            codes = [client.rcpt(r)[0] for r in
                     ("<postmaster>", "<POSTMASTER>", "postmaster@example.test",
                      "postmaster@localhost")]
            client.data(b"Subject: hi\r\n\r\nhello\r\n")
            return codes

        codes = yield in_thread(smtp_session, server.ports["smtp"], send)
        self.assertEqual(codes, [250, 250, 250, 250])
        messages = read_messages(server, "alice@localhost")
        self.assertEqual(len(messages), 1)
        self.assertIn(b"Delivered-To: alice@localhost\n", messages[0])

    @inlineCallbacks
    def test_default_postmaster(self):
        """
        Without --postmaster, mail for postmaster goes to the Maildir of
        postmaster@ the first local domain.
        """
        server = yield start_server(self, smtp=SMTP)

        def send(client):
            client.ehlo("c.test")
            client.sendmail("x@far.test", ["postmaster@example.test"], b"Subject: a\r\n\r\nb\r\n")

        yield in_thread(smtp_session, server.ports["smtp"], send)
        self.assertEqual(len(read_messages(server, "postmaster@localhost")), 1)

    @inlineCallbacks
    def test_empty_resolution_refused(self):
        """
        A recipient that resolves to nothing gets 451 at RCPT: no 250 for a
        message that would be stored nowhere.
        """
        server = yield start_server(self, smtp=SMTP)
        with open(os.path.join(server.data_dir, "aliases"), "w") as f:
            f.write("broken@localhost: not an address\n")

        def send(client):
            client.ehlo("c.test")
            client.mail("x@far.test")
            return client.rcpt("broken@localhost")

        code, text = yield in_thread(smtp_session, server.ports["smtp"], send)
        self.assertEqual(code, 451)
        self.assertIn(b"4.3.0", text)
