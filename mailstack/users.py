# -*- test-case-name: tests.test_router,tests.test_cli,tests.test_catchall -*-
"""
The user database and the alias map: two small text files under DATA.

C{DATA/users} holds one user a line, C{address:hash}, the hash an Argon2id
PHC string (the form of Dovecot's passwd-file)::

    alice@example.org:$argon2id$v=19$m=65536,t=3,p=4$...

C{DATA/aliases} holds one alias a line, its targets separated by commas::

    postmaster@example.org: alice@example.org
    team@example.org: alice@example.org, bob@elsewhere.net
    @example.org: alice@example.org

The last is a catch-all: mail for any address of example.org that is
neither a user nor an alias (Postfix's C{@domain} in virtual_alias_maps).

Both are rewritten whole by the C{mailstack} command: under an exclusive
lock, into a new file that is fsynced and renamed over the old one, so a
running server never reads half a file.  The server re-reads a file when
its identity (inode, size, mtime) changes, which is how it sees new users
without a restart.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from typing import Callable, Iterator

from twisted.logger import Logger
from zope.interface import implementer

from mailstack.address import (
    Address, AddressError, local_address, normalize_domain, parse_address,
)
from mailstack.interfaces import IAliasMap, IUserDatabase
from mailstack.safeio import atomic_write

log = Logger()


class _TextTable:
    """
    A file of C{key<sep>value} lines, cached until the file changes.
    """

    joiner = ":"

    def __init__(self, path: str) -> None:
        self.path = path
        self._signature: tuple[int, int, int] | None = None
        self._entries: dict[str, str] = {}

    def _parse(self, data: str) -> dict[str, str]:
        entries = {}
        for number, line in enumerate(data.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            # An address never holds ':', so the first one separates.
            key, sep, value = line.partition(":")
            problem = self._check(key.strip(), value.strip()) if sep else "no ':'"
            if problem:
                log.warn("{path}: line {n} ignored in part or whole: {problem}",
                         path=self.path, n=number, problem=problem)
            if sep:
                entries[key.strip().lower()] = value.strip()
        return entries

    def _check(self, key: str, value: str) -> str | None:
        """
        What is wrong with one entry, for the log; C{None} if nothing.
        """
        try:
            parse_address(key)
        except AddressError as e:
            return f"bad address {key!r}: {e}"
        return None if value else "nothing after ':'"

    def entries(self) -> dict[str, str]:
        """
        The current entries, re-read if the file changed since last time.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._signature, self._entries = None, {}
            return self._entries
        signature = (st.st_ino, st.st_size, st.st_mtime_ns)
        if signature != self._signature:
            with open(self.path, encoding="utf-8") as f:
                self._entries = self._parse(f.read())
            self._signature = signature
        return self._entries

    @contextmanager
    def _locked(self) -> Iterator[None]:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path + ".lock", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _rewrite(self, change: Callable[[dict[str, str]], None]) -> None:
        """
        Apply C{change} to the entries under the lock and write them back.
        """
        with self._locked():
            self._signature = None
            entries = dict(self.entries())
            change(entries)
            text = "".join(
                f"{key}{self.joiner}{value}\n" for key, value in sorted(entries.items())
            )
            atomic_write(self.path, text.encode("utf-8"))
            self._signature = None


@implementer(IUserDatabase)
class UserDatabase(_TextTable):
    """
    Users and their password hashes, in C{DATA/users}.
    """

    def __init__(self, data_dir: str) -> None:
        super().__init__(os.path.join(data_dir, "users"))

    def password_hash(self, address: Address) -> str | None:
        return self.entries().get(str(address.lower()))

    def exists(self, address: Address) -> bool:
        return str(address.lower()) in self.entries()

    def users(self) -> list[Address]:
        return [parse_address(key) for key in sorted(self.entries())]

    def add(self, address: Address, password_hash: str) -> None:
        key = str(local_address(str(address)))

        def change(entries: dict[str, str]) -> None:
            if key in entries:
                raise KeyError(f"{key} already exists")
            entries[key] = password_hash

        self._rewrite(change)

    def set_password(self, address: Address, password_hash: str) -> None:
        key = str(address.lower())

        def change(entries: dict[str, str]) -> None:
            if key not in entries:
                raise KeyError(f"no such user: {key}")
            entries[key] = password_hash

        self._rewrite(change)

    def delete(self, address: Address) -> None:
        key = str(address.lower())

        def change(entries: dict[str, str]) -> None:
            if entries.pop(key, None) is None:
                raise KeyError(f"no such user: {key}")

        self._rewrite(change)


@implementer(IAliasMap)
class AliasMap(_TextTable):
    """
    Aliases and their targets, in C{DATA/aliases}.
    """

    def __init__(self, data_dir: str) -> None:
        super().__init__(os.path.join(data_dir, "aliases"))

    joiner = ": "

    def _check(self, key: str, value: str) -> str | None:
        problem = super()._check(key, value)
        for item in value.split(","):
            try:
                if item.strip():
                    parse_address(item.strip())
            except AddressError as e:
                problem = f"bad target {item.strip()!r}: {e}"
        return problem

    def targets(self, address: Address) -> tuple[Address, ...] | None:
        value = self.entries().get(str(address.lower()))
        if value is None:
            return None
        targets = []
        for item in value.split(","):
            item = item.strip()
            if item:
                try:
                    targets.append(parse_address(item))
                except AddressError:
                    continue
        return tuple(targets)

    def catch_all(self, domain: str) -> tuple[Address, ...] | None:
        """
        The targets of C{@domain}, or C{None} if the domain has no catch-all.
        """
        value = self.entries().get("@" + domain.lower())
        if value is None:
            return None
        targets = []
        for item in value.split(","):
            try:
                targets.append(parse_address(item.strip()))
            except AddressError:
                continue
        return tuple(targets)

    def aliases(self) -> list[tuple[Address | str, tuple[Address, ...]]]:
        result: list[tuple[Address | str, tuple[Address, ...]]] = []
        for key in sorted(self.entries()):
            if key.startswith("@"):
                result.append((key, self.catch_all(key[1:]) or ()))
                continue
            address = parse_address(key)
            result.append((address, self.targets(address) or ()))
        return result

    def add(self, alias: Address | str, targets: tuple[Address, ...]) -> None:
        key = alias_key(str(alias))
        if not targets:
            raise ValueError("an alias needs at least one target")
        value = ", ".join(str(t) for t in targets)

        def change(entries: dict[str, str]) -> None:
            entries[key] = value

        self._rewrite(change)

    def delete(self, alias: Address | str) -> None:
        key = alias_key(str(alias))

        def change(entries: dict[str, str]) -> None:
            if entries.pop(key, None) is None:
                raise KeyError(f"no such alias: {key}")

        self._rewrite(change)


def alias_key(text: str) -> str:
    """
    The key of an alias: a local address, or C{@domain} for a catch-all.
    Raises L{AddressError}.
    """
    text = text.strip()
    if text.startswith("@"):
        return "@" + normalize_domain(text[1:])
    return str(local_address(text))
