# -*- test-case-name: tests.test_receivers -*-
"""
The outbound queue as a receiver process sees it (C{--receivers}): the
message is stored in the shared queue directory exactly as the queue
manager would store it, durably, and then announced to the queue manager
(the main process) over the control socket.  If the announcement is lost,
nothing is: the main process sweeps the directory for committed messages
it does not know, every minute and at start.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.clock import wall_seconds
from mailstack.interfaces import IOutboundQueue, IPrepared, ITwoPhaseStore
from mailstack.message import Envelope, MessageSpool
from mailstack.queue.control import send_command
from mailstack.queue.records import log_queued, new_record
from mailstack.queue.store import QueueStore
from mailstack.reactors import IMailReactor

log = Logger()


@implementer(IOutboundQueue, ITwoPhaseStore)
class QueueHandoff:
    def __init__(self, store: QueueStore, data_dir: str, reactor: IMailReactor,
                 pool: ThreadPool) -> None:
        self.store = store
        self.data_dir = data_dir
        self.reactor = reactor
        self.pool = pool

    def _commit_and_announce(self, queue_id: str) -> str | None:
        self.store.commit(queue_id)
        try:
            return send_command(self.data_dir, f"adopt {queue_id}", timeout=10)
        except OSError as e:
            return f"error {e}"

    def enqueue(self, envelope: Envelope, spool: MessageSpool) -> Deferred[None]:
        return self.prepare(envelope, spool).addCallback(lambda staged: staged.commit())

    def prepare(self, envelope: Envelope, spool: MessageSpool) -> Deferred[Any]:
        record = new_record(envelope, wall_seconds(self.reactor))
        d = deferToThreadPool(self.reactor, self.pool, self.store.stage, record, spool)
        return d.addCallback(lambda _: _Staged(self, record))


@implementer(IPrepared)
class _Staged:
    def __init__(self, handoff: QueueHandoff, record: Any) -> None:
        self.handoff = handoff
        self.record = record

    def commit(self) -> Deferred[None]:
        h, record = self.handoff, self.record
        d = deferToThreadPool(h.reactor, h.pool, h._commit_and_announce, record.queue_id)

        def stored(answer: str | None) -> None:
            log_queued(record)
            if answer != "ok":
                log.warn("{qid}: the queue manager did not take it up ({answer}); "
                         "its sweep will", qid=record.queue_id, answer=answer)

        return d.addCallback(stored)

    def abort(self) -> Deferred[None]:
        h = self.handoff
        return deferToThreadPool(h.reactor, h.pool, h.store.abort, self.record.queue_id)
