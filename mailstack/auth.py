# -*- test-case-name: tests.test_auth -*-
"""
Passwords: Argon2id hashes (argon2-cffi), verified in a thread pool, and the
twisted.cred checker that the submission, IMAP and POP3 services log in with.
"""

from __future__ import annotations

from typing import Any

import argon2
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.interfaces import IUserDatabase

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
    Argon2 work runs in C{pool}.  The avatar id is the normalised address.
    """

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, users: IUserDatabase, reactor: Any, pool: ThreadPool) -> None:
        self.users = users
        self.reactor = reactor
        self.pool = pool

    def requestAvatarId(self, credentials: Any) -> Deferred[str]:
        username = credentials.username
        password = credentials.password
        if isinstance(username, bytes):
            username = username.decode("utf-8", "replace")
        if isinstance(password, bytes):
            password = password.decode("utf-8", "replace")
        return Deferred.fromCoroutine(self._check(username, password))

    async def _check(self, username: str, password: str) -> str:
        try:
            address = parse_address(username.strip()).lower()
        except AddressError:
            address = None
        # The database may answer later (SQLite in worker threads).
        stored = None if address is None else await maybeDeferred(
            self.users.password_hash, address)
        ok = await deferToThreadPool(self.reactor, self.pool, verify_password, stored, password)
        if not ok or address is None:
            raise UnauthorizedLogin("bad username or password")
        return str(address)
