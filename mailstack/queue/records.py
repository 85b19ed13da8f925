# -*- test-case-name: tests.test_receivers,tests.test_queue -*-
"""
The queue record of a newly accepted message, and its C{queued} log line:
what both the queue manager (L{mailstack.queue.runner}) and a receiver
process's hand-off (L{mailstack.queue.handoff}) write, so neither needs the
other.
"""

from __future__ import annotations

from twisted.logger import Logger

from mailstack.logsafe import safe
from mailstack.message import Envelope
from mailstack.queue.store import QueueRecord, RecipientState

# The queue manager's line, wherever the message was queued.
log = Logger(namespace="mailstack.queue.runner")


def new_record(envelope: Envelope, now: float) -> QueueRecord:
    """
    The queue record of a message just accepted for its remote recipients.
    """
    return QueueRecord(
        queue_id=envelope.queue_id,
        sender=str(envelope.sender) if envelope.sender is not None else "",
        arrival=now,
        recipients=[RecipientState(str(a)) for a in envelope.remote],
        next_attempt=now,
        received_from=envelope.client,
    )


def log_queued(record: QueueRecord) -> None:
    log.info("{qid}: queued from=<{sender}> size={size} nrcpt={n}",
             qid=record.queue_id, sender=safe(record.sender), size=record.size,
             n=len(record.recipients))
