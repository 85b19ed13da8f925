"""
The login throttle: unit tests on a fake clock with a fake hasher, one for
each way the old throttle was bypassed, and the bounded password-check
queue.  (Real clients over TLS against all three protocols are in
L{tests.test_throttle_integration}.)
"""

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailstack.access.pop3 import POP3Factory
from mailstack.auth import PasswordChecker
from mailstack.throttle import (
    SUSPECT, Busy, LoginThrottle, NetworkBlocked, UserBlocked, network_keys, user_key,
)

RIGHT = "right"


class FakeHasher:
    """
    Stands for the Argon2 check: counts the checks it is asked for, and each
    answer waits until the test calls L{finish} (as a slow hash would).
    """

    def __init__(self):
        self.checks = []  # (user, password) in the order asked
        self.pending = []  # (password, Deferred)
        self.most_at_once = 0

    def check(self, user, password):
        def run():
            self.checks.append((user, password))
            d = Deferred()
            self.pending.append((password, d))
            self.most_at_once = max(self.most_at_once, len(self.pending))
            return d
        return run

    def finish(self):
        """
        Answer every check asked so far: the right password logs in.
        """
        while self.pending:
            password, d = self.pending.pop(0)
            if password == RIGHT:
                d.callback("avatar")
            else:
                d.errback(UnauthorizedLogin())


class Attempt:
    """
    One login through the throttle; C{result} is C{None} while it runs,
    then the avatar or the exception's class.
    """

    def __init__(self, throttle, hasher, host, user, password):
        self.result = None
        d = Deferred.fromCoroutine(throttle.attempt(host, user, hasher.check(user, password)))
        d.addCallbacks(self._done, self._failed)

    def _done(self, value):
        self.result = value

    def _failed(self, failure):
        self.result = failure.type


class ThrottleTestCase(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.throttle = LoginThrottle(self.clock)
        self.hasher = FakeHasher()

    def attempt(self, host, user="alice@example.org", password="wrong"):
        return Attempt(self.throttle, self.hasher, host, user, password)

    def settle(self, attempts, limit=2000):
        """
        Answer checks and let delays pass until every attempt has its result.
        """
        for _ in range(limit):
            if all(a.result is not None for a in attempts):
                return
            self.hasher.finish()
            self.clock.advance(1)
        self.fail("attempts never finished")

    def fail_logins(self, host, n, user="alice@example.org"):
        for _ in range(n):
            a = self.attempt(host, user)
            self.settle([a])
            self.assertIs(a.result, UnauthorizedLogin)


class KeyTests(SynchronousTestCase):
    def test_user_key(self):
        """
        If user names differ only in case, white space, a trailing dot or
        the IDNA form of the domain, then they are one user to the throttle.
        """
        expected = "alice@xn--bcher-kva.example"
        for name in ("alice@xn--bcher-kva.example", "Alice@Bücher.example",
                     " ALICE@XN--BCHER-KVA.EXAMPLE. ", "alice@BÜCHER.example"):
            self.assertEqual(user_key(name), expected, name)
        self.assertEqual(user_key("Not An Address"), "not an address")
        self.assertNotEqual(user_key("alice+x@example.org"), user_key("alice@example.org"))
        long = user_key("A" * 70000)
        self.assertLess(len(long), 100)
        self.assertEqual(long, user_key("a" * 70000))
        self.assertNotEqual(long, user_key("a" * 69999))

    def test_network_keys(self):
        """
        If the client is IPv4, then it is counted by /32 and /24; IPv6 by
        /64; an IPv4-mapped IPv6 address as IPv4.
        """
        self.assertEqual(network_keys("192.0.2.77"), ("192.0.2.77/32", "192.0.2.0/24"))
        self.assertEqual(network_keys("::ffff:192.0.2.77"), ("192.0.2.77/32", "192.0.2.0/24"))
        self.assertEqual(network_keys("2001:db8:1:2:aaaa::1"), ("2001:db8:1:2::/64",))
        self.assertEqual(network_keys("2001:db8:1:2::ffff"), ("2001:db8:1:2::/64",))
        self.assertEqual(len(network_keys("/run/x.sock")), 1)


class BypassTests(ThrottleTestCase):
    """
    The five ways the old throttle was bypassed, one test each.
    """

    def test_a_parallel_attempts_get_no_more_guesses(self):
        """
        If 40 attempts arrive at once (40 connections opened first, then one
        AUTH each), then no more passwords are checked than one by one
        would allow, never more than C{parallel} at a time, and the rest are
        refused without a hash; the right password among them is refused too.
        """
        attempts = [self.attempt("192.0.2.1") for _ in range(39)]
        attempts.append(self.attempt("192.0.2.1", password=RIGHT))
        self.assertEqual(len(self.hasher.checks), self.throttle.parallel)
        self.settle(attempts)
        self.assertEqual(len(self.hasher.checks), self.throttle.limit)
        self.assertEqual(self.hasher.most_at_once, self.throttle.parallel)
        results = [a.result for a in attempts]
        self.assertEqual(results.count(UnauthorizedLogin), self.throttle.limit)
        self.assertEqual(results.count(NetworkBlocked), 40 - self.throttle.limit)
        self.assertIs(results[-1], NetworkBlocked)
        self.assertNotIn(("alice@example.org", RIGHT), self.hasher.checks)

    def test_b_own_account_does_not_reset(self):
        """
        If the attacker logs in to an account of its own between guesses,
        then the failures of its address are kept: the block still comes
        after C{limit} wrong passwords in all.
        """
        for _ in range(3):
            self.fail_logins("192.0.2.1", 3)
            mine = self.attempt("192.0.2.1", "mallory@example.org", RIGHT)
            self.settle([mine])
            self.assertEqual(mine.result, "avatar")
        self.fail_logins("192.0.2.1", 1)
        self.assertTrue(self.throttle.blocked("192.0.2.1"))
        checked = len(self.hasher.checks)
        refused = self.attempt("192.0.2.1", "mallory@example.org", RIGHT)
        self.assertIs(refused.result, NetworkBlocked)
        self.assertEqual(len(self.hasher.checks), checked)

    def test_b_success_forgives_own_typos_only(self):
        """
        If a user mistypes twice and then logs in, then those two failures
        are forgiven (from that network), but not another user's.
        """
        self.fail_logins("192.0.2.1", 2, "bob@example.org")
        self.fail_logins("192.0.2.1", 2, "alice@example.org")
        ok = self.attempt("192.0.2.1", "Alice@Example.org", RIGHT)
        self.settle([ok])
        self.assertEqual(ok.result, "avatar")
        self.assertEqual(self.throttle._recent("net:192.0.2.1/32")[0], 2)

    def test_c_case_variants_are_one_user(self):
        """
        If a user is attacked under spellings differing in case and IDNA
        form, from many networks, then they add up: from a network where
        the user failed, the next attempt is refused before its hash.
        """
        spellings = ["alice@bücher.example", "Alice@BÜCHER.example",
                     "ALICE@xn--bcher-kva.example", "alice@xn--bcher-kva.example."]
        for i in range(self.throttle.user_limit):
            self.fail_logins(f"198.51.{i}.1", 1, spellings[i % len(spellings)])
        checked = len(self.hasher.checks)
        refused = self.attempt("198.51.0.1", "aLiCe@Bücher.Example", RIGHT)
        self.assertIs(refused.result, UserBlocked)
        self.assertEqual(len(self.hasher.checks), checked)

    def test_d_ipv6_counted_by_64(self):
        """
        If every guess comes from another address of the same IPv6 /64, then
        the /64 is blocked after C{limit} of them; another /64 is not.
        """
        for i in range(self.throttle.limit):
            self.fail_logins(f"2001:db8:1:2::{i + 1:x}", 1, f"user{i}@example.org")
        refused = self.attempt("2001:db8:1:2:ffff::9", "other@example.org", RIGHT)
        self.assertIs(refused.result, NetworkBlocked)
        self.assertTrue(self.throttle.blocked("2001:db8:1:2::abcd"))
        self.assertFalse(self.throttle.blocked("2001:db8:1:3::1"))

    def test_d_ipv4_counted_by_24(self):
        """
        If every guess comes from another address of one IPv4 /24, then the
        /24 is blocked after C{subnet_limit} of them; its neighbour is not.
        """
        for i in range(self.throttle.subnet_limit):
            self.fail_logins(f"203.0.113.{i + 1}", 1, f"user{i}@example.org")
        self.assertTrue(self.throttle.blocked("203.0.113.200"))
        self.assertIs(self.attempt("203.0.113.200", "x@example.org", RIGHT).result,
                      NetworkBlocked)
        self.assertFalse(self.throttle.blocked("203.0.114.1"))

    def test_delays_before_the_hash(self):
        """
        If an address keeps failing, then from the C{free}-th failure its
        next attempt waits 1, 2, 4... seconds before its password is checked.
        """
        waits = []
        for _ in range(self.throttle.limit):
            a = self.attempt("192.0.2.1")
            waited = 0
            while not self.hasher.pending:
                self.clock.advance(1)
                waited += 1
            waits.append(waited)
            self.settle([a])
        self.assertEqual(waits, [0, 0, 0, 1, 2, 4, 8, 16, 16, 16])

    def test_failures_age_out(self):
        """
        If a blocked address waits out the window, then it may try again.
        """
        self.fail_logins("192.0.2.1", self.throttle.limit)
        self.assertTrue(self.throttle.blocked("192.0.2.1"))
        self.clock.advance(self.throttle.window + 1)
        self.assertFalse(self.throttle.blocked("192.0.2.1"))
        ok = self.attempt("192.0.2.1", password=RIGHT)
        self.assertEqual(len(self.hasher.pending), 1)  # no delay
        self.settle([ok])
        self.assertEqual(ok.result, "avatar")


class RepeatTests(ThrottleTestCase):
    def login(self, host, password, user="alice@example.org"):
        d = Deferred.fromCoroutine(self.throttle.attempt(
            host, user, self.hasher.check(user, password), password))
        results = []
        d.addBoth(results.append)
        for _ in range(100):
            if results:
                break
            self.hasher.finish()
            self.clock.advance(1)
        [result] = results
        return result if not hasattr(result, "type") else result.type

    def test_repeated_failure_not_counted(self):
        """
        If a client retries the same wrong password, then it is checked
        once, counted once, and the retries fail at once without a hash;
        the address is never blocked by them.
        """
        for _ in range(3 * self.throttle.limit):
            self.assertIs(self.login("192.0.2.1", "stale"), UnauthorizedLogin)
        self.assertEqual(self.hasher.checks, [("alice@example.org", "stale")])
        self.assertEqual(self.throttle._recent("net:192.0.2.1/32")[0], 1)
        self.assertEqual(self.login("192.0.2.1", RIGHT), "avatar")

    def test_new_passwords_still_counted(self):
        """
        If the wrong passwords differ, then each counts: the block comes
        after C{limit}, whatever repeats come between them.
        """
        for i in range(self.throttle.limit):
            self.assertIs(self.login("192.0.2.1", f"guess{i}"), UnauthorizedLogin)
            if i < self.throttle.limit - 1:
                self.assertIs(self.login("192.0.2.1", "guess0"), UnauthorizedLogin)
        self.assertIs(self.login("192.0.2.1", RIGHT), NetworkBlocked)
        self.assertEqual(len(self.hasher.checks), self.throttle.limit)

    def test_repeat_from_another_address_is_checked(self):
        """
        If the same pair comes from another address, then it is checked
        and counted there.
        """
        self.login("192.0.2.1", "stale")
        self.login("198.51.100.1", "stale")
        self.assertEqual(len(self.hasher.checks), 2)


class LegitimateUserTests(ThrottleTestCase):
    def test_not_slowed_by_attack_elsewhere(self):
        """
        If alice is attacked from other networks until her user limit is
        reached, then the real alice, from a network with no failures, is
        checked at once (no delay, no refusal) and logs in.
        """
        for net in range(self.throttle.user_limit + 2):
            self.fail_logins(f"203.0.{net}.9", 1)
        self.assertGreaterEqual(self.throttle._recent("user:alice@example.org")[0],
                                self.throttle.user_limit)
        self.assertIs(self.attempt("203.0.0.9").result, UserBlocked)
        alice = self.attempt("198.51.100.7", "Alice@example.org", RIGHT)
        self.assertEqual(len(self.hasher.pending), 1)  # checked at once, no delay
        self.hasher.finish()
        self.assertEqual(alice.result, "avatar")

    def test_parallel_logins_of_one_client(self):
        """
        If a mail client opens several connections and logs in on each at
        once, then all are checked, the ones over C{parallel} after the
        first ones finish, none refused or delayed.
        """
        logins = [self.attempt("198.51.100.7", password=RIGHT) for _ in range(10)]
        self.assertEqual(len(self.hasher.pending), self.throttle.parallel)
        for _ in range(3):
            self.hasher.finish()
        self.assertEqual([a.result for a in logins], ["avatar"] * 10)
        self.assertEqual(self.clock.seconds(), 0)


class WaitingTests(ThrottleTestCase):
    def test_too_many_waiting(self):
        """
        If more attempts wait for their turn than C{max_waiting}, then the
        next one is L{Busy} at once.
        """
        self.throttle.max_waiting = 5
        parallel = self.throttle.parallel
        attempts = [self.attempt("192.0.2.1") for _ in range(parallel + 3)]
        attempts += [self.attempt("203.0.113.1") for _ in range(parallel + 2)]
        self.assertEqual(len(self.hasher.pending), 2 * parallel)
        self.assertIs(self.attempt("203.0.113.1").result, Busy)
        extra = self.attempt("198.51.100.1")  # nothing in flight there: checked at once
        self.assertEqual(len(self.hasher.pending), 2 * parallel + 1)
        self.assertEqual([a.result for a in attempts], [None] * len(attempts))
        self.settle(attempts + [extra])

    def test_one_network_cannot_fill_the_waiting_room(self):
        """
        If one network has C{network_waiting} attempts waiting, then its
        next one is L{Busy}, while another network's attempts still wait
        their turn normally.
        """
        self.throttle.network_waiting = 5
        attempts = [self.attempt("192.0.2.1") for _ in range(self.throttle.parallel + 5)]
        self.assertIs(self.attempt("192.0.2.1").result, Busy)
        others = [self.attempt("198.51.100.1", "bob@example.org")
                  for _ in range(self.throttle.parallel + 1)]
        self.assertEqual([a.result for a in attempts + others],
                         [None] * (len(attempts) + len(others)))
        self.settle(attempts + others)
        self.assertEqual(len(self.hasher.checks), len(attempts) + len(others))

    def test_checks_kept_for_clean_clients(self):
        """
        If clients with failures already hold C{dirty_checks} password
        checks, then their next attempt is L{Busy} at once, while a client
        without failures (from a clean network) is still checked.
        """
        self.throttle.dirty_checks = 2
        for net in ("192.0.2.1", "203.0.113.1", "198.18.0.1"):
            self.fail_logins(net, 1, "mallory@example.org")
        dirty = [self.attempt("192.0.2.1", "x@example.org"),
                 self.attempt("203.0.113.1", "y@example.org")]
        self.assertEqual(len(self.hasher.pending), 2)
        self.assertIs(self.attempt("198.18.0.1", "z@example.org").result, Busy)
        clean = self.attempt("198.51.100.7", "alice@example.org", RIGHT)
        self.assertEqual(len(self.hasher.pending), 3)
        self.settle(dirty + [clean])
        self.assertEqual(clean.result, "avatar")
        # Once the checks are done, the client with failures is checked again.
        self.assertIs(self.settle_one(self.attempt("198.18.0.1", "z@example.org")),
                      UnauthorizedLogin)

    def settle_one(self, attempt):
        self.settle([attempt])
        return attempt.result

    def test_other_errors_not_counted(self):
        """
        If the check fails for another reason than a wrong password (the
        queue is full), then no failure is recorded; the network is
        remembered as one that found the queue full, for C{busy_memory}.
        """
        d = Deferred.fromCoroutine(self.throttle.attempt(
            "192.0.2.1", "alice@example.org", lambda: Deferred.fromCoroutine(_raise(Busy()))))
        self.failureResultOf(d, Busy)
        self.assertFalse(self.throttle.blocked("192.0.2.1"))
        for key, counter in self.throttle._counters.items():
            self.assertEqual(len(counter.failures), 0, key)
        # The network that found the checks busy shares the places kept for
        # clients with failures for a while: a distributed flood of fresh
        # networks cannot keep taking the places of clean clients.
        nets = network_keys("192.0.2.1")
        self.assertTrue(self.throttle._dirty(nets, "alice@example.org"))
        self.clock.advance(self.throttle.busy_memory + 1)
        self.assertFalse(self.throttle._dirty(nets, "alice@example.org"))
        self.throttle._tidy("net:192.0.2.0/24")
        self.assertEqual(self.throttle._counters, {})


async def _raise(exception):
    raise exception


class FakePool:
    """
    A thread pool of C{max} threads that runs each job when the test says so.
    """

    max = 2

    def __init__(self):
        self.jobs = []

    def callInThreadWithCallback(self, on_result, f, *args, **kwargs):
        self.jobs.append((on_result, f, args, kwargs))

    def run_one(self):
        on_result, f, args, kwargs = self.jobs.pop(0)
        on_result(True, f(*args, **kwargs))


class FakeReactor:
    def callFromThread(self, f, *args, **kwargs):
        f(*args, **kwargs)


class FakeUsers:
    def password_hash(self, address):
        return "hash-of-alice" if str(address) == "alice@example.org" else None


class HashQueueTests(SynchronousTestCase):
    def setUp(self):
        self.verified = []

        def verify(stored, password):
            self.verified.append((stored, password))
            return stored == "hash-of-alice" and password == RIGHT

        self.pool = FakePool()
        self.checker = PasswordChecker(FakeUsers(), FakeReactor(), self.pool, max_pending=3,
                                       verify=verify)

    def login(self, user, password):
        return self.checker.requestAvatarId(UsernamePassword(user, password))

    def test_full_queue_answers_at_once(self):
        """
        If C{max_pending} checks are running or queued, then the next login
        fails at once with L{Busy}, without a check; once one finishes, a
        new one is taken.
        """
        waiting = [self.login("alice@example.org", "wrong") for _ in range(3)]
        self.failureResultOf(self.login("alice@example.org", RIGHT), Busy)
        self.assertEqual(len(self.pool.jobs), FakePool.max)  # the third waits its turn
        self.assertEqual(self.checker.pending, 3)
        self.pool.run_one()
        self.failureResultOf(waiting[0], UnauthorizedLogin)
        d = self.login("alice@example.org", RIGHT)
        self.assertEqual(self.checker.pending, 3)
        while self.pool.jobs:
            self.pool.run_one()
        self.assertEqual(self.successResultOf(d), "alice@example.org")
        for other in waiting[1:]:
            self.failureResultOf(other, UnauthorizedLogin)
        self.assertEqual(self.checker.pending, 0)

    def test_suspects_wait_behind_others(self):
        """
        If checks wait for a thread, then those started for suspect clients
        (recent failures) run after the others, each class in its order.
        """
        self.checker.max_pending = 10
        order = []
        for name, suspect in [("a", False), ("b", False), ("s1", True), ("s2", True),
                              ("c", False), ("s3", True), ("d", False)]:
            token = SUSPECT.set(suspect)
            try:
                d = self.login(f"{name}@example.org", "wrong")
            finally:
                SUSPECT.reset(token)
            d.addErrback(lambda f, name=name: order.append(name))
        while self.pool.jobs:
            self.pool.run_one()
        self.assertEqual(order, ["a", "b", "c", "d", "s1", "s2", "s3"])

    def test_throttle_marks_suspects(self):
        """
        If a client has recent failures, then the throttle starts its check
        as suspect; a clean client's check is not.
        """
        clock = Clock()
        throttle = LoginThrottle(clock)
        seen = []

        def check():
            seen.append(SUSPECT.get())
            return Deferred.fromCoroutine(_raise(UnauthorizedLogin()))

        for _ in range(2):
            d = Deferred.fromCoroutine(throttle.attempt("192.0.2.1", "a@example.org", check))
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual(seen, [False, True])
        self.assertFalse(SUSPECT.get())

    def test_unknown_user_costs_a_check(self):
        """
        If the user does not exist or the name is not an address, then a
        password check still runs (against a dummy hash), as for a wrong
        password, so timing does not tell users apart.
        """
        for user in ("nobody@example.org", "not an address", "alice@example.org"):
            d = self.login(user, "wrong")
            self.pool.run_one()
            self.failureResultOf(d, UnauthorizedLogin)
        self.assertEqual([p for _, p in self.verified], ["wrong"] * 3)

    def test_busy_through_the_throttle(self):
        """
        If the queue is full, then the throttle passes L{Busy} on and counts
        no failure for the address.
        """
        clock = Clock()
        throttle = LoginThrottle(clock)
        for _ in range(3):
            self.login("alice@example.org", "wrong")
        d = Deferred.fromCoroutine(throttle.attempt(
            "192.0.2.1", "alice@example.org", lambda: self.login("alice@example.org", RIGHT)))
        self.failureResultOf(d, Busy)
        self.assertFalse(throttle._recent("net:192.0.2.1/32")[0])


class FakePortal:
    """
    A portal whose logins wait for the test, counting them.
    """

    def __init__(self):
        self.logins = []

    def login(self, credentials, mind, *interfaces):
        d = Deferred()
        self.logins.append((credentials.password, d))
        return d


class POP3DelayTests(SynchronousTestCase):
    def test_pop3_delays(self):
        """
        If a POP3 client keeps failing, then its answers are delayed like
        SMTP AUTH's (there were no delays at all on POP3), and at the limit
        it is refused with C{-ERR [SYS/TEMP]} and disconnected.
        """
        clock = Clock()
        throttle = LoginThrottle(clock)
        portal = FakePortal()
        factory = POP3Factory(portal, clock, None, throttle, implicit_tls=True)
        transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.1", 1234))
        proto = factory.buildProtocol(None)
        proto.makeConnection(transport)
        transport.clear()
        waits = []
        for i in range(throttle.limit):
            proto.dataReceived(b"USER alice@example.org\r\nPASS wrong%d\r\n" % i)
            waited = 0
            while not portal.logins:
                clock.advance(1)
                waited += 1
            waits.append(waited)
            portal.logins.pop()[1].errback(Failure(UnauthorizedLogin()))
        self.assertEqual(waits, [0, 0, 0, 1, 2, 4, 8, 16, 16, 16])
        self.assertEqual(transport.value().count(b"-ERR [AUTH]"), throttle.limit)
        transport.clear()
        proto.dataReceived(b"USER alice@example.org\r\nPASS right\r\n")
        self.assertEqual(portal.logins, [])
        self.assertIn(b"-ERR [SYS/TEMP]", transport.value())
        self.assertTrue(transport.disconnecting)
