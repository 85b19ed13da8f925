"""
State shared between processes (mailstack.shared): the rate-limit filter
and the greylist over SQLite files in DATA, with the time faked by a Clock
and the filters run through the plugin API; a real server answers 450
4.7.1 over a limit; a greylist entry written by another OS process counts.
"""

import os
import subprocess
import sys
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailstack.address import parse_address
from mailstack.config import ConfigError
from mailstack.plugin import check_options
from mailstack.plugins.greylist import SCHEMA as GREYLIST_SCHEMA
from mailstack.plugins.greylist import SharedGreylist
from mailstack.plugins.ratelimit import SCHEMA, SPEC, RateLimit
from mailstack.shared import SharedDB
from mailstack.smtp.server import Session
from tests.support import add_user, in_thread, short_tempdir, smtp_session, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "tcp:0:interface=127.0.0.1"
HOUR = 3600.0


def session(host="192.0.2.10", user=None, service="smtp"):
    return Session(host, 25, service=service, user=user and parse_address(user))


class RateLimitTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000 * HOUR)  # the start of an hour bucket
        self.path = os.path.join(short_tempdir(self), "ratelimit.sqlite")

    def limiter(self, **options):
        """
        One process's filter: its own connections to the shared file.
        """
        parsed = check_options("rate-limit", options, SPEC)
        return RateLimit(self.clock, SharedDB(self.path, SCHEMA, reactor), parsed)

    @inlineCallbacks
    def test_network_limit_shared_and_sliding(self):
        """
        Two processes share the counters of a /24; the window slides: an
        hour after three messages it still counts them all, half an hour
        later only half.
        """
        a = self.limiter(**{"network-messages": 3})
        b = self.limiter(**{"network-messages": 3})
        sender = parse_address("x@remote.test")
        self.assertIsNone((yield a.mail(session("192.0.2.1"), sender)))
        self.assertIsNone((yield b.mail(session("192.0.2.2"), sender)))
        self.assertIsNone((yield a.mail(session("192.0.2.3"), sender)))
        over = yield b.mail(session("192.0.2.4"), sender)
        self.assertEqual((over.code, over.enhanced), (450, "4.7.1"))
        self.assertIn("too many messages from 192.0.2.0/24", over.text)
        self.assertIsNone((yield a.mail(session("198.51.100.1"), sender)))  # another /24
        self.clock.advance(HOUR)
        self.assertEqual((yield a.mail(session("192.0.2.1"), sender)).code, 450)
        self.clock.advance(HOUR / 2)
        self.assertIsNone((yield b.mail(session("192.0.2.1"), sender)))

    @inlineCallbacks
    def test_user_and_domain_recipients(self):
        limiter = self.limiter(**{"user-recipients": 2, "domain-recipients": 3})
        alice = session(user="alice@localhost", service="submission")
        bob = session(user="bob@localhost", service="submission")
        sender = parse_address("alice@localhost")
        rcpt = parse_address("r@remote.test")
        self.assertIsNone((yield limiter.rcpt(alice, sender, rcpt)))
        self.assertIsNone((yield limiter.rcpt(alice, sender, rcpt)))
        over = yield limiter.rcpt(alice, sender, rcpt)
        self.assertIn("too many recipients from user alice@localhost", over.text)
        self.assertIsNone((yield limiter.rcpt(bob, parse_address("bob@localhost"), rcpt)))
        # The domain localhost has had three recipients counted (refusals are not).
        over = yield limiter.rcpt(bob, parse_address("bob@localhost"), rcpt)
        self.assertIn("too many recipients from sender domain localhost", over.text)
        # The null sender has no domain.
        self.assertIsNone((yield limiter.rcpt(session(), None, rcpt)))

    @inlineCallbacks
    def test_exempt_networks(self):
        limiter = self.limiter(**{"network-messages": 1, "exempt-networks": ["127.0.0.0/8"]})
        for _ in range(3):
            self.assertIsNone((yield limiter.mail(session("127.0.0.1"), None)))

    def test_options_checked(self):
        self.assertRaises(ConfigError, check_options, "rate-limit",
                          {"network-messages": -1}, SPEC)
        error = self.assertRaises(ConfigError, check_options, "rate-limit",
                                  {"networks-messages": 1}, SPEC)
        self.assertIn("networks-messages", str(error))

    @inlineCallbacks
    def test_server_answers_450(self):
        server = yield start_server(self, smtp=LISTEN, filter=["rate-limit"],
                                    plugins={"rate-limit": {"network-messages": 2}})
        add_user(server, "alice@localhost")

        def talk(client):
            client.ehlo("client.test")
            replies = []
            for _ in range(3):
                replies.append(client.mail("x@remote.test"))
                client.rset()
            return replies

        replies = yield in_thread(smtp_session, server.ports["smtp"], talk)
        self.assertEqual([r[0] for r in replies], [250, 250, 450])
        self.assertTrue(replies[2][1].startswith(b"4.7.1 Error: too many messages from "
                                                 b"127.0.0.0/24"))


OTHER_PROCESS = """
import sys
from twisted.internet.task import Clock
from mailstack.address import parse_address
from mailstack.plugins.greylist import SCHEMA, SharedGreylist
from mailstack.shared import SharedDB
from mailstack.smtp.server import Session

clock = Clock()
clock.advance(float(sys.argv[2]))
greylist = SharedGreylist(clock, SharedDB(sys.argv[1], SCHEMA, None))
key = greylist.db.run_here(greylist._check, __import__("json").dumps(
    ["192.0.2.0/24", "a@remote.test", "alice@localhost"]), clock.seconds(), False)
print(key)
"""


class SharedGreylistTests(TestCase):
    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.path = os.path.join(short_tempdir(self), "greylist.sqlite")

    def greylist(self):
        return SharedGreylist(self.clock, SharedDB(self.path, GREYLIST_SCHEMA, reactor))

    def rcpt(self, greylist, host="192.0.2.10"):
        return greylist.rcpt(session(host), parse_address("a@remote.test"),
                             parse_address("alice@localhost"))

    @inlineCallbacks
    def test_retry_on_another_process_passes(self):
        """
        The first attempt is seen by one process, the retry by another
        (its own connection): it passes; a restart forgets nothing.
        """
        first = yield self.rcpt(self.greylist())
        self.assertEqual((first.code, first.enhanced), (451, "4.7.1"))
        self.clock.advance(100)
        early = yield self.rcpt(self.greylist())
        self.assertIn("201 seconds", early.text)
        self.clock.advance(201)
        self.assertIsNone((yield self.rcpt(self.greylist(), host="192.0.2.99")))
        self.clock.advance(30 * 86400)
        self.assertIsNone((yield self.rcpt(self.greylist())))

    @inlineCallbacks
    def test_first_attempt_in_another_os_process(self):
        script = os.path.join(short_tempdir(self), "other.py")
        with open(script, "w") as f:
            f.write(textwrap.dedent(OTHER_PROCESS))
        result = subprocess.run(
            [sys.executable, script, self.path, str(self.clock.seconds())],
            capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT), timeout=60,
            check=False)
        self.assertEqual(result.stdout.strip(), b"300.0", result.stderr)
        self.clock.advance(301)
        self.assertIsNone((yield self.rcpt(self.greylist(), host="192.0.2.1")))

    @inlineCallbacks
    def test_not_for_authenticated_or_submission(self):
        greylist = self.greylist()
        sender, rcpt = parse_address("a@remote.test"), parse_address("alice@localhost")
        self.assertIsNone(greylist.rcpt(session(user="alice@localhost"), sender, rcpt))
        self.assertIsNone(greylist.rcpt(session(service="submission"), sender, rcpt))
        yield None

    @inlineCallbacks
    def test_pruned_and_bounded(self):
        greylist = self.greylist()
        greylist.max_entries = 10
        greylist.prune_every = 5
        for i in range(25):
            yield greylist.rcpt(session(), parse_address(f"s{i}@remote.test"),
                                parse_address("alice@localhost"))
        count = greylist.db.run_here(
            lambda db: db.execute("SELECT count(*) FROM greylist").fetchone()[0])
        self.assertLessEqual(count, 10 + greylist.prune_every)


