# -*- test-case-name: tests.test_ratelimit -*-
"""
State shared by the main process and the C{--receivers} processes: an
SQLite file in the data directory in WAL mode (readers never wait for the
writer; writers queue on a lock with a timeout), used in worker threads.

Each call is one short transaction (C{BEGIN IMMEDIATE}), so a
check-and-count is atomic across processes.  The state is advisory
(greylisting, rate counters): commits are not fsynced one by one
(C{synchronous=NORMAL}); a crash may forget the last moments of it, never
mail.  A failure (a locked or broken file) fails the Deferred: the filter
using it then tempfails the command (C{451 4.7.1}).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool


class SharedDB:
    """
    One SQLite file shared between processes.
    """

    busy_timeout = 5.0

    def __init__(self, path: str, schema: str, reactor: IReactorThreads) -> None:
        self.path = os.path.abspath(path)
        self.schema = schema
        self.reactor = reactor
        self._local = threading.local()

    def _connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            db = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(self.schema)
            self._local.db = db
        return db

    def _transaction(self, f: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        db = self._connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            result = f(db, *args)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    def run(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        C{f(connection, *args)} in one transaction, in a worker thread.
        """
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                 self._transaction, f, args)

    def run_here(self, f: Callable[..., Any], *args: Any) -> Any:
        """
        The same in this thread (tests, tools).
        """
        return self._transaction(f, args)
