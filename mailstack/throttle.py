# -*- test-case-name: tests.test_throttle -*-
"""
Brute-force protection for password logins: one L{LoginThrottle}, shared
by SMTP AUTH, IMAP and POP3, consulted before any password hash is
computed.

What is counted: failed logins over a sliding window (L{window}, 15
minutes), each one recorded against

  - the client's network: its address (IPv4 /32, IPv6 /64: one IPv6
    client usually has a whole /64) and, for IPv4, its /24;
  - the user name as L{user_key} normalises it (domain in IDNA A-labels,
    local part casefolded, so C{Alice@Example.ORG.} is C{alice@example.org}),
    with the network it failed from.

The decision is taken when the attempt arrives, before its hash:

  1. A client address with L{limit} failures, or an IPv4 /24 with
     L{subnet_limit}, is refused (L{NetworkBlocked}) until the failures
     age out; its sessions are closed.
  2. A user with L{user_limit} failures is refused (L{UserBlocked}), but
     only from networks (the /24 or /64) where that user's login has
     failed.  A user's failures never slow or refuse that user from a
     network without such failures: an attacker elsewhere cannot lock
     the real user out.
  3. Attempts in flight count: a network may have at most
     C{min(parallel, limit - failures)} logins being checked at once, so
     opening 40 connections first and then sending a password on each
     gets no more guesses than sending them one by one.  The others wait
     their turn (and are decided again then), up to L{network_waiting}
     attempts per network (the /24 or /64) and L{max_waiting} in all;
     beyond that the answer is L{Busy}.
  4. Password checks are shared: attempts from a network or for a user
     with recent failures, or from a network that found the hash queue
     full in the last L{busy_memory} seconds, may hold at most
     L{dirty_checks} of the checks in progress (the rest are L{Busy}), so
     the places left in the bounded hash queue
     (L{mailstack.auth.PasswordChecker}) are kept for clients without
     failures, even in an attack from many networks.
  5. From the L{free}-th failure of the address (L{subnet_free} of the
     /24, L{user_free} of a user on a network where it failed), the
     attempt waits 1, 2, 4, ... up to L{max_delay} seconds before its
     password is checked, right or wrong.

A successful login forgives only that user's own failures from that
network (a user who mistyped a password); another account's success never
resets anything.  A login that repeats one of the last L{repeats}
failed user and password pairs of the same address (within the window)
fails again without a hash and is not counted again (Dovecot does not
count it either): a mail client with a stale password, retrying, does not
lock its whole NAT out, and repeating a wrong password guesses nothing.
The pairs are kept only as keyed digests.  Memory is bounded: at most
L{max_keys} keys, the least failed forgotten first.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections import deque
from contextvars import ContextVar
from typing import Any, Awaitable, Callable, TypeVar

from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mailstack.address import AddressError, normalize_domain
from mailstack.logsafe import safe

log = Logger()

T = TypeVar("T")

MAX_KEY = 320  # longer than any address (RFC 5321: 64 + 1 + 255)

#: True while the throttle starts the password check of a client with
#: recent failures: L{mailstack.auth.PasswordChecker} queues it behind the
#: others.  (Portal.login reaches the checker synchronously, in this context.)
SUSPECT: ContextVar[bool] = ContextVar("mailstack_login_suspect", default=False)


class LoginUnavailable(Exception):
    """
    A login that cannot be tried now: the answer is a temporary error
    (C{454 4.7.0}, C{NO [UNAVAILABLE]}, C{-ERR [SYS/TEMP]}).
    """

    disconnect = False


class NetworkBlocked(LoginUnavailable):
    """
    The client's address or network has failed too often: refused, and the
    session is closed.
    """

    disconnect = True


class UserBlocked(LoginUnavailable):
    """
    This user has failed too often, and has failed from this network.
    """


class Busy(LoginUnavailable):
    """
    Too many password checks are queued already (an Argon2 flood).
    """


def user_key(name: str) -> str:
    """
    The user name as the throttle counts it: surrounding white space
    removed, the domain normalised (IDNA, lowercase, no trailing dot), the
    local part casefolded.  Names that are not addresses are casefolded;
    names longer than any address are kept as a digest (bounded memory).
    """
    name = name.strip()
    local, at, domain = name.rpartition("@")
    key = name.casefold()
    if at and local and len(name) <= MAX_KEY:
        try:
            key = f"{local.casefold()}@{normalize_domain(domain)}"
        except AddressError:
            pass
    if len(key) > MAX_KEY:
        key = "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    return key


def network_keys(host: str) -> tuple[str, ...]:
    """
    The networks a client address is counted in, narrowest first: IPv4
    C{a.b.c.d/32} and C{a.b.c.0/24}; IPv6 its C{/64} (an IPv4-mapped IPv6
    address counts as IPv4).  Anything else (a UNIX socket) is one key.
    """
    try:
        ip: Any = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return (f"other:{host}",)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return (f"{ip}/32", str(ipaddress.ip_network(f"{ip}/24", strict=False)))
    return (str(ipaddress.ip_network(f"{ip}/64", strict=False)),)


class _Repeated(Exception):
    """
    A login repeating a recent failure: answered without a hash.
    """


class _Counter:
    """
    Recent failures (time, and the user or network they involved) and the
    attempts in flight for one key.
    """

    __slots__ = ("failures", "inflight", "waiting", "tried", "busy_at")

    def __init__(self, size: int) -> None:
        self.failures: deque[tuple[float, str]] = deque(maxlen=size)
        self.inflight = 0
        self.waiting = 0
        self.tried: deque[tuple[float, bytes]] = deque(maxlen=LoginThrottle.repeats)
        self.busy_at = float("-inf")

    @property
    def busy(self) -> bool:
        return bool(self.inflight or self.waiting)


class LoginThrottle:
    """
    Counts failed logins by network and by user, on an injected clock; see
    the module docstring.  L{attempt} runs one password check under it.
    """

    window = 900.0
    max_delay = 16.0
    # One client address (IPv4 /32, IPv6 /64).
    free = 3
    limit = 10
    parallel = 4
    # An IPv4 /24: a NAT or a small provider's pool, so more lenient.
    subnet_free = 10
    subnet_limit = 30
    subnet_parallel = 8
    # One user, from the networks where that user has failed.
    user_free = 3
    user_limit = 10
    network_waiting = 100
    max_waiting = 1000
    max_keys = 100_000
    repeats = 10
    dirty_checks = 8  # of PasswordChecker.max_pending (16)
    busy_memory = 60.0

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._secret = os.urandom(32)
        self._counters: dict[str, _Counter] = {}
        self._waiting: list[Deferred[None]] = []
        self._checking = 0

    # -- counting -------------------------------------------------------------------

    def _counter(self, key: str) -> _Counter:
        counter = self._counters.get(key)
        if counter is None:
            if len(self._counters) >= self.max_keys:
                self._forget()
            size = 256 if key.startswith("user:") else 4 * max(self.limit, self.subnet_limit)
            counter = self._counters[key] = _Counter(size)
        return counter

    def _recent(self, key: str) -> tuple[int, _Counter | None]:
        counter = self._counters.get(key)
        if counter is None:
            return 0, None
        cutoff = self.clock.seconds() - self.window
        failures = counter.failures
        while failures and failures[0][0] < cutoff:
            failures.popleft()
        return len(failures), counter

    def _tidy(self, key: str) -> None:
        counter = self._counters.get(key)
        if (counter is not None and not counter.busy and not self._recent(key)[0]
                and not self._was_busy(counter)):
            del self._counters[key]

    def _forget(self) -> None:
        """
        Too many keys (an attack from very many addresses or names): drop
        those with no recent failures, then the least failed half.
        """
        for key in list(self._counters):
            self._tidy(key)
        if len(self._counters) >= self.max_keys:
            idle = [(len(c.failures), k) for k, c in self._counters.items() if not c.busy]
            idle.sort()
            for _, key in idle[: len(self._counters) // 2]:
                del self._counters[key]

    def _limits(self, nets: tuple[str, ...]) -> list[tuple[str, int, int, int]]:
        """
        Each network key with its (free, limit, parallel).
        """
        out = [("net:" + nets[0], self.free, self.limit, self.parallel)]
        for net in nets[1:]:
            out.append(("net:" + net, self.subnet_free, self.subnet_limit, self.subnet_parallel))
        return out

    def _delay(self, failures: int, free: int) -> float:
        if failures < free:
            return 0.0
        return min(2.0 ** (failures - free), self.max_delay)

    # -- questions --------------------------------------------------------------------

    def blocked(self, host: str) -> bool:
        """
        Whether this client address (or its /24) has failed too often to
        try again now.
        """
        return any(self._recent(key)[0] >= limit
                   for key, _, limit, _ in self._limits(network_keys(host)))

    def _penalised(self, user: str, net: str) -> tuple[int, _Counter | None, bool]:
        """
        The user's recent failures, and whether any came from C{net}.
        """
        count, counter = self._recent("user:" + user)
        return count, counter, counter is not None and any(
            where == net for _, where in counter.failures)

    def _was_busy(self, counter: _Counter | None) -> bool:
        return counter is not None and counter.busy_at > self.clock.seconds() - self.busy_memory

    def _dirty(self, nets: tuple[str, ...], user: str) -> bool:
        """
        Whether this network, or this user from this network, has recent
        failures, or the network found the checks busy lately.
        """
        return (any(self._recent(key)[0] for key, *_ in self._limits(nets))
                or self._was_busy(self._counters.get("net:" + nets[-1]))
                or self._penalised(user, nets[-1])[2])

    def _decide(self, nets: tuple[str, ...], user: str) -> float | None:
        """
        The delay before this attempt may be checked; C{None} to wait for
        attempts in flight; L{LoginUnavailable} if refused.
        """
        delay = 0.0
        must_wait = False
        for key, free, limit, parallel in self._limits(nets):
            failures, counter = self._recent(key)
            if failures >= limit:
                raise NetworkBlocked("too many failed logins from this network")
            if counter is not None and counter.inflight >= min(parallel, limit - failures):
                must_wait = True
            delay = max(delay, self._delay(failures, free))
        failures, counter, penalised = self._penalised(user, nets[-1])
        if penalised:
            if failures >= self.user_limit:
                raise UserBlocked("too many failed logins for this user")
            assert counter is not None
            if counter.inflight >= min(self.parallel, self.user_limit - failures):
                must_wait = True
            delay = max(delay, self._delay(failures, self.user_free))
        return None if must_wait else delay

    # -- one attempt --------------------------------------------------------------------

    async def attempt(self, host: str, username: str | bytes,
                      check: Callable[[], Awaitable[T]],
                      password: str | bytes | None = None) -> T:
        """
        Run C{check} (which hashes the password) for a login by
        C{username} from C{host}, if and when the throttle allows it.
        With C{password}, a login repeating a recent failure from this
        address fails again at once, without C{check}, and is not counted.

        @return: what C{check} returns.
        @raise UnauthorizedLogin: from C{check}; counted as a failure.
        @raise LoginUnavailable: refused before any hash is computed.
        """
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        user = user_key(username)
        nets = network_keys(host)
        while True:
            delay = self._decide(nets, user)
            if delay is not None:
                break
            network = self._counter("net:" + nets[-1])
            if len(self._waiting) >= self.max_waiting or network.waiting >= self.network_waiting:
                self._tidy("net:" + nets[-1])
                raise Busy("too many logins waiting")
            waiter: Deferred[None] = Deferred()
            self._waiting.append(waiter)
            network.waiting += 1
            try:
                await waiter
            finally:
                network.waiting -= 1
        keys = [key for key, *_ in self._limits(nets)] + ["user:" + user]
        for key in keys:
            self._counter(key).inflight += 1
        fingerprint = self._fingerprint(user, password)
        try:
            if delay:
                await deferLater(self.clock, delay)
            if self._repeated(nets, fingerprint):
                raise _Repeated("the same wrong password again")
            dirty = self._dirty(nets, user)
            if self._checking >= self.dirty_checks and dirty:
                self._counter("net:" + nets[-1]).busy_at = self.clock.seconds()
                raise Busy("password checks are busy with failing clients")
            self._checking += 1
            try:
                token = SUSPECT.set(dirty)
                try:
                    checking = check()
                finally:
                    SUSPECT.reset(token)
                result = await checking
            except Busy:
                self._counter("net:" + nets[-1]).busy_at = self.clock.seconds()
                raise
            finally:
                self._checking -= 1
        except _Repeated:
            raise UnauthorizedLogin("bad username or password") from None
        except UnauthorizedLogin:
            self._failed(nets, user, fingerprint)
            raise
        else:
            self._succeeded(nets, user)
            return result
        finally:
            for key in keys:
                counter = self._counters.get(key)
                if counter is not None:
                    counter.inflight -= 1
                self._tidy(key)
            self._wake()

    def _wake(self) -> None:
        """
        Let every waiting attempt decide again (in the order they came).
        """
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            waiter.callback(None)

    def _fingerprint(self, user: str, password: str | bytes | None) -> bytes | None:
        if password is None:
            return None
        if isinstance(password, str):
            password = password.encode("utf-8", "surrogatepass")
        return hashlib.blake2b(user.encode("utf-8", "surrogatepass") + b"\0" + password,
                               key=self._secret, digest_size=16).digest()

    def _repeated(self, nets: tuple[str, ...], fingerprint: bytes | None) -> bool:
        """
        Whether this user and password failed from this address recently.
        """
        counter = self._counters.get("net:" + nets[0])
        if fingerprint is None or counter is None:
            return False
        cutoff = self.clock.seconds() - self.window
        return any(when >= cutoff and seen == fingerprint for when, seen in counter.tried)

    def _failed(self, nets: tuple[str, ...], user: str, fingerprint: bytes | None) -> None:
        now = self.clock.seconds()
        if fingerprint is not None:
            if self._repeated(nets, fingerprint):
                return  # checked in parallel with its twin: nothing new guessed
            self._counter("net:" + nets[0]).tried.append((now, fingerprint))
        for key, _, limit, _ in self._limits(nets):
            self._counter(key).failures.append((now, user))
            if self._recent(key)[0] == limit:
                log.warn("login throttle: {net} blocked after {n} failed logins",
                         net=safe(key[4:]), n=limit)
        counter = self._counter("user:" + user)
        counter.failures.append((now, nets[-1]))
        if self._recent("user:" + user)[0] == self.user_limit:
            log.warn("login throttle: user <{user}> limited after {n} failed logins "
                     "(from the networks it failed from)", user=safe(user, 100),
                     n=self.user_limit)

    def _succeeded(self, nets: tuple[str, ...], user: str) -> None:
        """
        Forgive this user's own failures from this network, nothing else.
        """
        for key, *_ in self._limits(nets):
            counter = self._counters.get(key)
            if counter is not None:
                kept = [f for f in counter.failures if f[1] != user]
                counter.failures.clear()
                counter.failures.extend(kept)
        counter = self._counters.get("user:" + user)
        if counter is not None:
            kept = [f for f in counter.failures if f[1] != nets[-1]]
            counter.failures.clear()
            counter.failures.extend(kept)
