# -*- test-case-name: tests.test_relay -*-
"""
Where an accepted message goes: local copies to the delivery agent, remote
recipients to the outbound queue.  The SMTP policies use it for what they
accept; the queue uses it for bounces, and local injection for scripts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from twisted.internet.defer import (
    CancelledError, Deferred, DeferredList, TimeoutError, fail, maybeDeferred,
)
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from mailstack import tally
from mailstack.address import Address
from mailstack.clock import wall_seconds
from mailstack.delivery.cleanup import normalize
from mailstack.delivery.router import AliasLoop, EmptyResolution, Router, UnknownRecipient
from mailstack.interfaces import IDeliveryAgent, IOutboundQueue, IPrepared, ITwoPhaseStore
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool, new_queue_id
from mailstack.queue.dsn import build_report
from mailstack.queue.store import QueueRecord, RecipientState

log = Logger()

# Mail from these origins is outbound even when every recipient is local.
OUTBOUND_ORIGINS = ("submission", "submissions", "local")


async def run_transforms(transforms: Sequence[Any], envelope: Envelope, spool: MessageSpool,
                         clock: IReactorTime) -> None:
    """
    Run the outbound transforms (L{IOutboundTransform}) in order, each
    within its time limit, prepending what each returns; a failure is a
    logged C{451 4.7.1} (L{SMTPError}), never a lost or unsigned message.
    """
    from mailstack.plugin import header_lines
    from mailstack.smtp.filters import DEFAULT_TIMEOUT, _await_coroutine
    from mailstack.smtp.reply import SMTPError

    for t in transforms:
        timeout = getattr(t, "timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT
        try:
            d = maybeDeferred(t.transform, envelope, spool).addCallback(_await_coroutine)
            d.addTimeout(timeout, clock)
            fields = await d
            lines = header_lines(fields or ())
        except (CancelledError, TimeoutError):
            log.error("{qid}: transform {name} gave no answer within {timeout}s",
                      qid=envelope.queue_id, name=t.name, timeout=timeout)
            raise SMTPError(451, "4.7.1", "Error: the message could not be processed, "
                                          "try again later") from None
        except Exception:  # noqa: BLE001 - a plugin's code may raise anything: a 451, logged
            log.failure("{qid}: transform {name} failed", qid=envelope.queue_id, name=t.name)
            raise SMTPError(451, "4.7.1", "Error: the message could not be processed, "
                                          "try again later") from None
        if lines:
            spool.prepend_header(lines)


def _prepare(store: Any, envelope: Envelope, spool: MessageSpool) -> Any:
    """
    Phase 1 on one store; a store without two phases writes at once and
    cannot be undone.
    """
    if ITwoPhaseStore.providedBy(store):
        return store.prepare(envelope, spool)
    deliver = store.deliver if IDeliveryAgent.providedBy(store) else store.enqueue
    return maybeDeferred(deliver, envelope, spool).addCallback(lambda _: _Written(store))


@implementer(IPrepared)
class _Written:
    """
    What a one-phase store wrote: already visible, cannot be removed.
    """

    def __init__(self, store: Any) -> None:
        self.store = store

    def commit(self) -> None:
        return None

    def abort(self) -> None:
        log.warn("{store} cannot undo a stored copy; the client's retry may duplicate it",
                 store=getattr(self.store, "name", type(self.store).__name__))


class Dispatcher:
    """
    Makes a message durable for all its recipients, local and remote.
    """

    def __init__(self, router: Router, local_agent: IDeliveryAgent,
                 queue: IOutboundQueue | None, clock: IReactorTime,
                 spool_dir: str | None = None):
        self.router = router
        self.local_agent = local_agent
        self.queue = queue
        self.clock = clock
        self.spool_dir = spool_dir
        # Plugins (mailstack.service wires them): outbound transforms, the
        # filters' check of locally injected mail, and delivery agents run
        # from the queue (lmtp, pipe) for some local recipients.
        self.transforms: list[Any] = []
        self.inject_check: Any = None
        self.agents: Any = None
        # The reporting host of the bounces for locally injected mail to
        # local recipients that do not exist; None: no such bounces.
        self.hostname: str | None = None

    def dispatch(self, envelope: Envelope, spool: MessageSpool) -> Deferred[None]:
        """
        Fire once every copy is durable; fail, having left none, if any
        could not be.

        Two phases over every store (L{ITwoPhaseStore}): each prepares the
        message (written and fsynced, invisible), and only when all have,
        each commits it: the Maildir copies first, the queue last (once in
        the queue, a message may be on its way).  Any failure aborts every
        store, committed or not, so the 4xx that follows leaves nothing for
        the client's retry to duplicate.  The Deferred fires only after
        every store has finished reading C{spool}: the caller may close it
        then, never while a worker thread still reads it.
        """
        return Deferred.fromCoroutine(self._transform_and_dispatch(envelope, spool))

    async def _transform_and_dispatch(self, envelope: Envelope, spool: MessageSpool) -> None:
        if self.transforms and (envelope.remote or envelope.origin in OUTBOUND_ORIGINS):
            await run_transforms(self.transforms, envelope, spool, self.clock)
        inline: dict[Any, list[Any]] = {None: envelope.local}
        queued: list[Address] = []
        if self.agents is not None:
            inline, queued = self.agents.split(envelope.local)
        stores: list[Any] = []
        for agent, local in inline.items():
            if local:
                stores.append((agent or self.local_agent, replace(envelope, local=local)))
        if envelope.remote or queued:
            if self.queue is None:
                raise RuntimeError("remote recipients but no outbound queue")
            remote = envelope.remote + [r for r in queued if r not in envelope.remote]
            stores.append((self.queue, replace(envelope, remote=remote)))
        await self._dispatch(envelope, spool, stores)

    async def _dispatch(self, envelope: Envelope, spool: MessageSpool,
                        stores: list[Any]) -> None:
        results = await DeferredList(
            [maybeDeferred(_prepare, store, part, spool) for store, part in stores],
            consumeErrors=True)
        prepared = [value for ok, value in results if ok]
        failures = [value for ok, value in results if not ok]
        if failures:
            await self._abort(envelope, prepared)
            failures[0].raiseException()  # the first store's failure
        for staged in prepared:
            try:
                await maybeDeferred(staged.commit)
            except BaseException:
                await self._abort(envelope, prepared)
                raise

    async def _abort(self, envelope: Envelope, prepared: list[Any]) -> None:
        for staged in prepared:
            try:
                await maybeDeferred(staged.abort)
            except Exception as e:  # noqa: BLE001 - a store may be a plugin's; abort the other copies
                log.error("{qid}: could not remove a stored copy after a failure: {error}",
                          qid=envelope.queue_id, error=e)

    async def _to_postmaster(self, envelope: Envelope, rcpt: Address, error: Exception) -> None:
        """
        Address a bounce whose recipient (the original message's local
        sender) does not exist or cannot receive to the postmaster
        (C{--postmaster}, else C{postmaster@} the first domain) instead,
        with a log line; if even that fails, log it and drop the bounce.
        """
        postmaster = self.router.postmaster
        if postmaster is None or self.router.is_local(postmaster):
            # postmaster@ a local domain always resolves: to --postmaster,
            # or to the postmaster's own Maildir when that is nobody.
            domain = postmaster.domain if postmaster is not None else rcpt.domain
            postmaster = Address("postmaster", domain)
        try:
            resolution = await self.router.lookup(postmaster)
        except (UnknownRecipient, AliasLoop, EmptyResolution) as e2:
            log.error("{qid}: to=<{to}> status=bounced (cannot deliver the bounce: {e}; "
                      "nor to <{postmaster}>: {e2}); dropped",
                      qid=envelope.queue_id, to=safe(rcpt), e=safe(error),
                      postmaster=safe(postmaster), e2=safe(e2))
            tally.delivery("bounced", "local")
            return
        log.warn("{qid}: to=<{to}> cannot receive the bounce ({e}); sent to the postmaster "
                 "<{postmaster}> instead", qid=envelope.queue_id, to=safe(rcpt), e=safe(error),
                 postmaster=safe(postmaster))
        if postmaster not in envelope.rcpts:
            envelope.add(postmaster, resolution)

    async def _bounce_unknown(self, envelope: Envelope, spool: MessageSpool,
                              unknown: list[tuple[Address, Exception]]) -> None:
        """
        A local user injected mail (C{mailstack sendmail}) for local
        recipients that do not exist: tell the sender with a DSN, as
        Postfix's bounce daemon does, instead of only logging it.  The rest
        of the message is already delivered: a failure here is logged,
        never raised (the pick-up would deliver everything again).
        """
        if self.hostname is None or envelope.sender is None:
            return
        failed = []
        for rcpt, error in unknown:
            if isinstance(error, AliasLoop):
                status, text = "5.4.6", "alias loop"
            elif isinstance(error, EmptyResolution):
                status, text = "5.3.0", "alias resolves to no recipient"
            else:
                status, text = "5.1.1", "User unknown in local recipient table"
            failed.append(RecipientState(
                str(rcpt), state="failed", dsn=status,
                last_error=f"550 {status} <{rcpt}>: Recipient address rejected: {text}",
                remote_reply=f"x-local; 550 {status} {text}", relay="local"))
        record = QueueRecord(envelope.queue_id, str(envelope.sender), envelope.received_at,
                             failed)
        try:
            report = build_report(self.hostname, record, failed,
                                  b"".join(spool.header_fields()),
                                  wall_seconds(self.clock))
            bounce_id = await self.inject(None, [envelope.sender], report, client="bounce")
        except Exception as e:  # noqa: BLE001 - the message itself is delivered; log it
            log.error("{qid}: cannot send the bounce to <{sender}>: {error}",
                      qid=envelope.queue_id, sender=safe(envelope.sender), error=safe(e))
            return
        log.info("{qid}: sender non-delivery notification: {bounce_id}",
                 qid=envelope.queue_id, bounce_id=bounce_id)

    def inject(self, sender: Address | None, recipients: Sequence[Address], content: bytes,
               client: str = "local", queue_id: str | None = None,
               user: Any = None) -> Deferred[str]:
        """
        Deliver a message made here (a bounce, a local submission) with LF
        line endings; unknown local recipients are logged and skipped, and
        for a local submission the sender gets a bounce about them.
        Fires with the new queue id.  The content is normalised first
        (L{mailstack.delivery.cleanup}): it did not come through SMTP DATA.

        @param user: for mail a local user injected (maildrop pickup), who:
            the message filters then check it (origin C{local}); a refusal
            fails the Deferred with an L{SMTPError}.  Bounces are not
            filtered.
        """
        envelope = Envelope(queue_id or new_queue_id(), sender,
                            received_at=wall_seconds(self.clock), client=client,
                            origin="bounce" if user is None else "local")
        spool = MessageSpool(self.spool_dir)
        spool.write(normalize(content))
        if spool.error is not None:
            spool.close()
            return fail(spool.error)

        unknown: list[tuple[Address, Exception]] = []

        async def checked() -> None:
            for rcpt in recipients:
                try:
                    resolution = await self.router.lookup(rcpt)
                except (UnknownRecipient, AliasLoop, EmptyResolution) as e:
                    if client == "bounce" and sender is None and user is None:
                        # Our own report to a local sender that cannot
                        # receive it: the postmaster gets it (Postfix's
                        # double bounce), never a report about the report.
                        await self._to_postmaster(envelope, rcpt, e)
                        continue
                    log.warn("{qid}: to=<{to}> status=bounced (unknown local recipient: {e})",
                             qid=envelope.queue_id, to=safe(rcpt), e=safe(e))
                    tally.delivery("bounced", "local")
                    unknown.append((rcpt, e))
                    continue
                envelope.add(rcpt, resolution)
            log.info("{qid}: from=<{sender}> size={size} nrcpt={n} ({client})",
                     qid=envelope.queue_id, sender=safe(sender or ""), size=spool.size,
                     n=len(envelope.rcpts), client=safe(client))
            tally.received("bounce" if client == "bounce" else "local", False)
            if user is not None and self.inject_check is not None:
                if not await self.inject_check(envelope, spool, user):
                    return  # discarded, logged
            await self.dispatch(envelope, spool)
            if unknown and user is not None and sender is not None:
                await self._bounce_unknown(envelope, spool, unknown)

        d = Deferred.fromCoroutine(checked())

        def done(result: Any) -> Any:
            spool.close()
            return result

        return d.addBoth(done).addCallback(lambda _: envelope.queue_id)
