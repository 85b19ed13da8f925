# -*- test-case-name: tests.test_userdb -*-
"""
The built-in user databases (C{--user-db NAME}), written against the same
API (L{IUserDatabaseFactory}) a third party uses.

  - C{file} (the default): C{DATA/users}, managed with C{mailstack user}.
    It provides L{IUserDatabase} only, so the server uses C{DATA/aliases}
    (C{mailstack alias}) for aliases beside it, as for any database that
    does not provide L{IAliasMap} too.
  - C{sqlite}: users, password hashes and aliases in an SQLite file,
    queried with the standard library's C{sqlite3} in worker threads (one
    connection per thread, read-only).  Options (C{[plugins.sqlite]}):
    C{path} (default C{DATA/users.sqlite}) and C{create} (create the file
    and its tables when missing; default true).  The schema::

        CREATE TABLE users (address TEXT PRIMARY KEY, password_hash TEXT NOT NULL);
        CREATE TABLE aliases (address TEXT NOT NULL, target TEXT NOT NULL);

    Addresses are stored lowercased; C{password_hash} is an Argon2id PHC
    string (C{mailstack.auth.hash_password}).  An alias has one row per
    target.  Changes are seen at the next lookup, without a restart.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any

from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import AddressError, parse_address
from mailstack.interfaces import IAliasMap, IUserDatabase, IUserDatabaseFactory
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor

log = Logger()

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (address TEXT PRIMARY KEY, password_hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS aliases (address TEXT NOT NULL, target TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS aliases_address ON aliases (address);
"""


@implementer(IPlugin, IUserDatabaseFactory)
class FileFactory:
    name = "file"
    description = "users and aliases in DATA/users and DATA/aliases (the default)"

    def build(self, config: Any, reactor: IMailReactor) -> Any:
        # It provides IUserDatabase only: the server then uses the file
        # alias map (DATA/aliases) beside it.
        from mailstack.users import UserDatabase
        return UserDatabase(os.path.abspath(config.data_dir))


@implementer(IUserDatabase, IAliasMap)
class SQLiteDatabase:
    """
    Lookups in an SQLite file, each in a worker thread of the reactor's pool.
    """

    def __init__(self, path: str, reactor: IReactorThreads) -> None:
        self.path = path
        self.reactor = reactor
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
            self._local.db = db
        return db

    def _query(self, sql: str, arg: str) -> list[tuple[Any, ...]]:
        try:
            return self._connection().execute(sql, (arg,)).fetchall()
        except sqlite3.Error:
            self._local.db = None  # reopen next time (the file was replaced)
            raise

    def _run(self, sql: str, arg: str) -> Any:
        pool = self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, self._query, sql, arg)

    def password_hash(self, address: Any) -> Any:
        d = self._run("SELECT password_hash FROM users WHERE address = ?", str(address).lower())
        return d.addCallback(lambda rows: rows[0][0] if rows else None)

    def exists(self, address: Any) -> Any:
        d = self._run("SELECT 1 FROM users WHERE address = ?", str(address).lower())
        return d.addCallback(bool)

    def targets(self, address: Any) -> Any:
        d = self._run("SELECT target FROM aliases WHERE address = ? ORDER BY rowid",
                      str(address).lower())

        def parsed(rows: list[tuple[Any, ...]]) -> Any:
            if not rows:
                return None
            out = []
            for (target,) in rows:
                try:
                    out.append(parse_address(str(target)))
                except AddressError as e:
                    log.error("sqlite user db: alias {alias}: bad target {target!r}: {error}",
                              alias=address, target=target, error=e)
            return tuple(out)

        return d.addCallback(parsed)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false: {value!r}")
    return value


@implementer(IPlugin, IUserDatabaseFactory)
class SQLiteFactory:
    name = "sqlite"
    description = "users, password hashes and aliases in an SQLite file"
    spec: dict[str, tuple[Any, Any]] = {"path": (str, None), "create": (_bool, True)}

    def __init__(self) -> None:
        self.options: dict[str, Any] = {"path": None, "create": True}

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, self.spec)

    def build(self, config: Any, reactor: IMailReactor) -> SQLiteDatabase:
        path = self.options["path"] or os.path.join(config.data_dir, "users.sqlite")
        path = os.path.abspath(path)
        if self.options["create"]:
            create(path)
        elif not os.path.exists(path):
            from mailstack.config import ConfigError
            raise ConfigError(f"[plugins.sqlite] path: {path} does not exist")
        return SQLiteDatabase(path, reactor)


def create(path: str) -> None:
    """
    Create the database file and its tables if missing (at start).
    """
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA)
    db.close()


file = FileFactory()
sqlite = SQLiteFactory()
