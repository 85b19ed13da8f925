"""
State shared between processes (mailstack.shared): the rate-limit filter
and the greylist over SQLite files in DATA, with the time faked by a Clock
and the filters run through the plugin API; a real server answers 450
4.7.1 over a limit; a greylist entry written by another OS process counts.
"""

import os
import signal
import smtplib
import subprocess
import sys
import textwrap
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

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




def serving_process(pids, server_port, client_port):
    """
    Which of C{pids} holds the server side of the connection from
    C{client_port}: its socket's inode in /proc/net/tcp, then in /proc/PID/fd.
    """
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (int(local.split(":")[1], 16) == server_port
                    and int(remote.split(":")[1], 16) == client_port):
                inode = fields[9]
    assert inode is not None, "no such connection"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no process holds the connection")


class ReceiverProcessTests(SynchronousTestCase):
    def test_greylist_and_rate_limit_across_receivers(self):
        """
        twistd with --receivers 3, greylist (delay 1s) and a network rate
        limit: a retry after the delay passes on whichever process accepts
        it, and the limit counts messages over all processes.
        """
        from mailstack.address import local_address
        from mailstack.testing import start_server_process
        from mailstack.users import UserDatabase
        from tests.support import fast_hash
        from tests.test_receivers import receiver_pids, wait_for

        data_dir = short_tempdir(self)
        UserDatabase(data_dir).add(local_address("alice@localhost"), fast_hash("pw"))
        config = os.path.join(data_dir, "mailstack.toml")
        with open(config, "w") as f:
            f.write(textwrap.dedent("""
                filter = ["greylist", "rate-limit"]
                [plugins.greylist]
                delay = "1s"
                [plugins.rate-limit]
                network-messages = 12
            """))
        process, port = start_server_process(data_dir, ["--receivers", "3", "--config", config],
                                             pythonpath=ROOT)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        self.assertTrue(wait_for(lambda: len(receiver_pids(process.pid)) == 2, 30))

        pids = [process.pid] + receiver_pids(process.pid)
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        client.ehlo("client.test")
        client.mail("x@remote.test")
        self.assertEqual(client.rcpt("alice@localhost")[0], 451)
        handler = serving_process(pids, port, client.sock.getsockname()[1])
        client.quit()
        started = time.monotonic()
        self.assertTrue(wait_for(lambda: time.monotonic() - started > 1.2, 5))
        # The process that saw the first attempt is stopped: another one
        # takes the retry, and lets it through.
        os.kill(handler, signal.SIGSTOP)
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            client.ehlo("client.test")
            client.mail("x@remote.test")
            retry = client.rcpt("alice@localhost")[0]
            other = serving_process(pids, port, client.sock.getsockname()[1])
            client.quit()
        finally:
            os.kill(handler, signal.SIGCONT)
        self.assertNotEqual(other, handler)
        self.assertEqual(retry, 250)

        def mail():
            client = smtplib.SMTP("127.0.0.1", port, timeout=30)
            try:
                client.ehlo("client.test")
                return client.mail("x@remote.test")[0]
            finally:
                client.quit()

        # 2 messages so far; the limit of 12 holds across the processes.
        self.assertEqual([mail() for _ in range(11)], [250] * 10 + [450])
