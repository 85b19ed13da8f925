# -*- test-case-name: tests.test_throttle,tests.test_throttle_integration -*-
"""
Passwords: Argon2id hashes (argon2-cffi), verified in a thread pool, and the
twisted.cred checker that the submission, IMAP and POP3 services log in with.

The pool's queue is bounded: at most C{max_pending} checks running or
waiting for a thread.  Beyond that a login fails at once with
L{mailstack.throttle.Busy} (a temporary error to the client) instead of
waiting behind a flood of bogus logins, each costing tens of
milliseconds and 64 MiB of memory.  The waiting checks are taken in two
classes: those of clients the login throttle marks as suspect (recent
failures) only when no other check waits, so a well-behaved client is not
queued behind an attack.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Any, Callable

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, fail, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads
from twisted.python.failure import Failure
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.interfaces import IUserDatabase
from mailstack.throttle import SUSPECT, Busy

log = Logger()

_hasher = argon2.PasswordHasher()

# Verified against when the user does not exist, so that an unknown user
# costs as much time as a wrong password and cannot be told apart by timing.
_DUMMY_HASH = _hasher.hash("not a password of anyone")


def hash_password(password: str) -> str:
    """
    A salted Argon2id hash (PHC string).  Slow on purpose: not on the reactor.
    """
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """
    Whether C{password} matches C{password_hash}; blocking, slow on purpose.
    """
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False


@implementer(ICredentialsChecker)
class PasswordChecker:
    """
    Checks C{IUsernamePassword} credentials against the user database; the
    Argon2 work (C{verify}) runs in C{pool}, at most C{max_pending} checks
    at a time, running or queued.  The avatar id is the normalised address.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: IUserDatabase, reactor: IReactorFromThreads, pool: ThreadPool,
                 max_pending: int = 16,
                 verify: Callable[[str | None, str], bool] = verify_password) -> None:
        self.users = users
        self.reactor = reactor
        self.pool = pool
        self.max_pending = max_pending
        self.verify = verify
        self.pending = 0
        self._full_logged = False
        # Checks not yet given to the pool: (suspect, order, Deferred, hash, password).
        self._queue: list[tuple[bool, int, Deferred[bool], str | None, str]] = []
        self._order = itertools.count()
        self._running = 0

    # The avatar id is the address as a str, which mailstack's realm and
    # SMTP AUTH take; Twisted's Portal hands it on untouched, though
    # ICredentialsChecker is typed for bytes.
    def requestAvatarId(self, credentials: Any) -> Deferred[str]:  # type: ignore[override]
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        if self.pending >= self.max_pending:
            if not self._full_logged:
                log.warn("password checks: {n} queued already; refusing logins until "
                         "the queue drains", n=self.pending)
                self._full_logged = True
            return fail(Busy("too many password checks queued"))
        self.pending += 1

        def done(result: Any) -> Any:
            self.pending -= 1
            if self.pending == 0:
                self._full_logged = False
            return result

        return Deferred.fromCoroutine(self._check(username, password)).addBoth(done)

    async def _check(self, username: str, password: str) -> str:
        try:
            address = parse_address(username.strip()).lower()
        except AddressError:
            address = None
        # The database may answer later (SQLite in worker threads).
        stored = None if address is None else await maybeDeferred(
            self.users.password_hash, address)
        d: Deferred[bool] = Deferred()
        heapq.heappush(self._queue, (SUSPECT.get(), next(self._order), d, stored, password))
        self._feed()
        ok = await d
        if not ok or address is None:
            raise UnauthorizedLogin("bad username or password")
        return str(address)

    def _feed(self) -> None:
        """
        Give the pool the next waiting checks (others' before suspects'),
        as many as it has threads: the rest wait here, in order.
        """
        while self._queue and self._running < max(1, getattr(self.pool, "max", 1)):
            _, _, d, stored, password = heapq.heappop(self._queue)
            self._running += 1
            job = deferToThreadPool(self.reactor, self.pool, self.verify, stored, password)

            def finished(result: Any, d: Deferred[bool] = d) -> None:
                self._running -= 1
                self._feed()
                if isinstance(result, Failure):
                    d.errback(result)
                else:
                    d.callback(result)

            job.addBoth(finished)
