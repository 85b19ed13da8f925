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
from zope.interface import implementer

from mailstack.interfaces import IOutboundQueue
from mailstack.message import Envelope, MessageSpool
from mailstack.queue.control import send_command
from mailstack.queue.runner import log_queued, new_record
from mailstack.queue.store import QueueStore

log = Logger()


@implementer(IOutboundQueue)
class QueueHandoff:
    def __init__(self, store: QueueStore, data_dir: str, reactor: Any, pool: Any) -> None:
        self.store = store
        self.data_dir = data_dir
        self.reactor = reactor
        self.pool = pool

    def _store_and_announce(self, record: Any, spool: MessageSpool) -> str | None:
        self.store.add(record, spool)
        try:
            return send_command(self.data_dir, f"adopt {record.queue_id}", timeout=10)
        except OSError as e:
            return f"error {e}"

    def enqueue(self, envelope: Envelope, spool: MessageSpool) -> Deferred[None]:
        record = new_record(envelope, self.reactor.seconds())
        d = deferToThreadPool(self.reactor, self.pool, self._store_and_announce, record, spool)

        def stored(answer: str | None) -> None:
            log_queued(record)
            if answer != "ok":
                log.warn("{qid}: the queue manager did not take it up ({answer}); "
                         "its sweep will", qid=record.queue_id, answer=answer)

        return d.addCallback(stored)
