# -*- test-case-name: tests.test_receivers -*-
"""
The outbound queue as a receiver process sees it (C{--receivers}): the
message is stored in the shared queue directory exactly as the queue
manager would store it, durably, and then announced to the queue manager
(the main process) over the control socket (L{mailstack.queue.announce}:
one connection kept open; the 250 does not wait for the answer).  If the
announcement is lost, nothing is: the main process sweeps the directory
for committed messages it does not know, every minute and at start.
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
from mailstack.queue.announce import Announcer
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
        self.announcer = Announcer(reactor, data_dir)


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
        self.announced: Deferred[None] | None = None

    def commit(self) -> Deferred[None]:
        h, record = self.handoff, self.record
        d = deferToThreadPool(h.reactor, h.pool, h.store.commit, record.queue_id)

        def answered(answer: str) -> None:
            if answer != "ok":
                log.warn("{qid}: the queue manager did not take it up ({answer}); "
                         "its sweep will", qid=record.queue_id, answer=answer)

        def stored(_: Any) -> None:
            log_queued(record)
            # Committed: the 250 need not wait for the queue manager's answer.
            self.announced = h.announcer.announce(record.queue_id).addCallback(answered)

        return d.addCallback(stored)

    def abort(self) -> Deferred[None]:
        h = self.handoff
        return deferToThreadPool(h.reactor, h.pool, h.store.abort, self.record.queue_id)
