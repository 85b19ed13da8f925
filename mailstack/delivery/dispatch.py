# -*- test-case-name: tests.test_relay -*-
"""
Where an accepted message goes: local copies to the delivery agent, remote
recipients to the outbound queue.  The SMTP policies use it for what they
accept; the queue uses it for bounces, and local injection for scripts.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger

from mailstack.address import Address
from mailstack.delivery.router import AliasLoop, Router, UnknownRecipient
from mailstack.interfaces import IDeliveryAgent, IOutboundQueue
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool

log = Logger()


class Dispatcher:
    """
    Makes a message durable for all its recipients, local and remote.
    """

    def __init__(self, router: Router, local_agent: IDeliveryAgent,
                 queue: IOutboundQueue | None, clock: Any, spool_dir: str | None = None):
        self.router = router
        self.local_agent = local_agent
        self.queue = queue
        self.clock = clock
        self.spool_dir = spool_dir

    def dispatch(self, envelope: Envelope, spool: MessageSpool) -> Deferred[None]:
        """
        Fire once every copy is durable; fail (having possibly stored some)
        if any could not be.
        """
        parts = []
        if envelope.remote:
            if self.queue is None:
                raise RuntimeError("remote recipients but no outbound queue")
            parts.append(self.queue.enqueue(envelope, spool))
        if envelope.local:
            parts.append(self.local_agent.deliver(envelope, spool))
        d = gatherResults(parts, consumeErrors=True)
        d.addErrback(lambda failure: failure.value.subFailure)  # the first real cause
        return d.addCallback(lambda _: None)

    def inject(self, sender: Address | None, recipients: Sequence[Address], content: bytes,
               client: str = "local") -> Deferred[str]:
        """
        Deliver a message made here (a bounce, a local submission) with LF
        line endings; unknown local recipients are logged and skipped.
        Fires with the new queue id.
        """
        from mailstack.smtp.server import new_queue_id

        envelope = Envelope(new_queue_id(), sender, received_at=self.clock.seconds(),
                            client=client)
        for rcpt in recipients:
            try:
                resolution = self.router.resolve(rcpt)
            except (UnknownRecipient, AliasLoop) as e:
                log.warn("{qid}: to=<{to}> status=bounced (unknown local recipient: {e})",
                         qid=envelope.queue_id, to=safe(rcpt), e=safe(e))
                continue
            envelope.add(rcpt, resolution)
        spool = MessageSpool(self.spool_dir)
        spool.write(content)
        log.info("{qid}: from=<{sender}> size={size} nrcpt={n} ({client})",
                 qid=envelope.queue_id, sender=safe(sender or ""), size=spool.size,
                 n=len(envelope.rcpts), client=safe(client))
        d = self.dispatch(envelope, spool)

        def done(result: Any) -> Any:
            spool.close()
            return result

        return d.addBoth(done).addCallback(lambda _: envelope.queue_id)
