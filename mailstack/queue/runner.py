# -*- test-case-name: tests.test_queue -*-
"""
The outbound queue at run time: what is due when, and what each attempt did.

The queue is loaded from disk once, at start, into a heap ordered by next
attempt time, with one timer for the earliest.  Nothing is rescanned: a
message that is not due costs nothing until it is.  Each attempt delivers
every pending recipient (grouped by domain, one SMTP transaction per
domain), records each outcome durably, then:

  - 2xx: the recipient is done;
  - 5xx: the recipient failed; the sender gets a bounce (RFC 3464);
  - 4xx or no connection: retried after the next delay of the schedule
    (the last delay repeats), with a little jitter so that a restart does
    not retry everything at once; past the queue lifetime it fails.

A bounce is injected before the failure is recorded, so a crash in between
repeats the bounce rather than losing it.  A message from the null sender
(a bounce) never bounces.  Time comes from the injected clock.
"""

from __future__ import annotations

import heapq
import io
import itertools
import random
from typing import Any, Callable, Sequence

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack import tally
from mailstack.clock import wall_seconds
from mailstack.interfaces import IOutboundQueue, IPrepared, ITwoPhaseStore
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool
from mailstack.queue.courier import Courier, Outcome
from mailstack.queue.dsn import build_report
from mailstack.queue.qfile import CorruptFile
from mailstack.queue.records import log_queued, new_record
from mailstack.smtp.reply import Reply
from mailstack.queue.store import (
    FAILED, SENT, OrphanContent, QueueRecord, QueueStore, RecipientState,
)

log = Logger()


@implementer(IOutboundQueue, ITwoPhaseStore)
class OutboundQueue(Service):
    """
    Schedules and runs delivery attempts for the messages in a L{QueueStore}.
    """

    max_active = 20
    warn_after = 4 * 3600.0

    def __init__(
        self,
        store: QueueStore,
        courier: Courier,
        reactor: IReactorFromThreads,
        clock: IReactorTime,
        pool: ThreadPool,
        schedule: Sequence[float],
        lifetime: float,
        hostname: str,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.setName("queue")
        self.store = store
        self.courier = courier
        self.reactor = reactor
        self.clock = clock
        self.pool = pool
        self.schedule = tuple(schedule)
        self.lifetime = lifetime
        self.hostname = hostname
        self.jitter = jitter
        self.records: dict[str, QueueRecord] = {}
        self.active: dict[str, Deferred[None]] = {}
        self._settling: set[str] = set()  # in active, only storing their outcome
        self._heap: list[tuple[float, int, str, float]] = []
        self._seq = itertools.count()
        self._timer: Any = None
        self.bounce_to: Callable[[str, bytes], Deferred[Any]] | None = None
        self.loaded: Deferred[int] = Deferred()
        # The content of small messages just queued, kept for their first
        # attempt (see _keep_ahead).
        self._ahead: dict[str, bytes] = {}
        self._ahead_bytes = 0

    def _blocking(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    # Life cycle

    sweep_interval: float | None = None  # set when receiver processes share the queue

    def startService(self) -> None:
        super().startService()
        interval = self.sweep_interval
        if interval:
            self._sweeper = LoopingCall(
                lambda: self.sweep().addErrback(lambda f: log.failure("queue sweep failed", f)))
            self._sweeper.clock = self.clock

            def start_sweeping(count: int) -> int:
                self._sweeper.start(interval, now=False)
                return count

            self.loaded.addCallback(start_sweeping)
        d = self._blocking(lambda: list(self.store.load_all()))
        d.addCallback(self._loaded)
        d.addErrback(lambda f: log.failure("cannot load the queue", f))

    def _loaded(self, items: list[Any]) -> None:
        moved = []
        for item in items:
            if isinstance(item, tuple):
                queue_id, error = item
                if isinstance(error, OrphanContent):
                    log.warn("queue: {qid}: {error}", qid=queue_id, error=error)
                else:
                    moved.append(self._quarantine(queue_id, f"unusable at start: {error}"))
                continue
            self.records[item.queue_id] = item
            self._push(item.queue_id, item.next_attempt)
        log.info("queue: {n} messages loaded", n=len(self.records))
        self._rearm()
        DeferredList(moved).addCallback(lambda _: self.loaded.callback(len(self.records)))

    def _quarantine(self, queue_id: str, reason: str) -> Deferred[Any]:
        """
        Move a message aside into C{queue/corrupt/}, with a warning.
        """
        log.warn("queue: {qid}: {reason}; moved to queue/corrupt/", qid=queue_id, reason=reason)
        self.records.pop(queue_id, None)
        self._take_ahead(queue_id)
        d = self._blocking(self.store.quarantine, queue_id, reason)
        return d.addErrback(lambda f: log.error("queue: {qid}: cannot move it aside: {error}",
                                                qid=queue_id, error=f.value))

    def stopService(self) -> Any:
        super().stopService()
        sweeper = getattr(self, "_sweeper", None)
        if sweeper is not None and sweeper.running:
            sweeper.stop()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        d = DeferredList(list(self.active.values()))
        return d.addCallback(lambda _: self.courier.close_idle())

    # Scheduling

    def _push(self, queue_id: str, due: float) -> None:
        """
        Schedule an attempt at wall-clock time C{due} (what the envelope
        says), converted once to the clock's own time: the wait does not
        move if the wall clock is stepped meanwhile.
        """
        at = self.clock.seconds() + max(0.0, due - wall_seconds(self.clock))
        heapq.heappush(self._heap, (at, next(self._seq), queue_id, due))

    def _rearm(self) -> None:
        if not self.running:
            return
        timer = self._timer
        # At capacity, the next attempt to finish runs _run_due itself; a
        # timer now would only spin (found by benchmarks/relay.py).
        if self._heap and self._busy() < self.max_active:
            at = self._heap[0][0]
            if timer is not None and timer.active() and timer.getTime() <= at:
                return  # already armed in time (many messages queued in one turn)
            if timer is not None and timer.active():
                timer.cancel()
            self._timer = self.clock.callLater(max(0.0, at - self.clock.seconds()),
                                               self._run_due)
            return
        if timer is not None and timer.active():
            timer.cancel()
        self._timer = None

    def _run_due(self) -> None:
        # Also called when an attempt finishes: a timer still armed is
        # superseded by the one _rearm sets below, never left behind.
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now and self._busy() < self.max_active:
            _, _, queue_id, due = heapq.heappop(self._heap)
            record = self.records.get(queue_id)
            if record is None or queue_id in self.active or record.next_attempt != due:
                continue  # deleted, running, or rescheduled since
            d = ensureDeferred(self._attempt(record))
            d.addErrback(lambda f, q: log.failure("{qid}: attempt failed", f, qid=q), queue_id)
            self.active[queue_id] = d
            d.addBoth(lambda _, q: self._finished(q), queue_id)
        self._rearm()

    def _finished(self, queue_id: str) -> None:
        self.active.pop(queue_id, None)
        self._settling.discard(queue_id)
        if self.running:
            self._run_due()

    def _busy(self) -> int:
        """
        The attempts that count against L{max_active}: those still
        delivering, not those only writing down their outcome (up to
        L{max_active} of them: at most twice that many at once in all).
        """
        return len(self.active) - min(len(self._settling), self.max_active)

    def _settle(self, queue_id: str) -> None:
        """
        The attempt for C{queue_id} is done delivering and only writes its
        outcome down (an unlink or a rewrite, each with an fsync): its
        slot goes to the next due message now, while the message itself
        stays in L{active} (never attempted twice at once).
        """
        if queue_id in self.active and queue_id not in self._settling:
            self._settling.add(queue_id)
            if self.running:
                self._run_due()

    def delay_after(self, attempts: int) -> float:
        """
        The wait after the C{attempts}-th failed attempt, with up to 10% jitter.
        """
        base = self.schedule[min(attempts, len(self.schedule)) - 1]
        return base * (1 + 0.1 * self.jitter())

    # IOutboundQueue

    def enqueue(self, envelope: Envelope, spool: MessageSpool) -> Deferred[None]:
        return self.prepare(envelope, spool).addCallback(lambda staged: staged.commit())

    def prepare(self, envelope: Envelope, spool: MessageSpool) -> "Deferred[StagedMessage]":
        """
        Phase 1 (L{ITwoPhaseStore}): content and envelope on disk, not yet
        in C{envelope/}, so neither this queue nor its sweep delivers it.
        """
        record = new_record(envelope, wall_seconds(self.clock))
        d = self._blocking(self.store.stage, record, spool)
        return d.addCallback(lambda _: StagedMessage(self, record, self._copy_small(spool)))

    def _schedule(self, record: QueueRecord, content: bytes | None = None) -> None:
        if content is not None:
            self._keep_ahead(record.queue_id, content)
        self.records[record.queue_id] = record
        self._push(record.queue_id, record.next_attempt)
        self._rearm()

    def adopt(self, queue_id: str) -> Deferred[bool]:
        """
        Take up a message another process (a receiver) stored in the queue
        directory; False if it is not there or already known.
        """
        if queue_id in self.records or not self.loaded.called:
            return succeed(queue_id in self.records)
        d = self._blocking(self.store.load, queue_id)

        def loaded(record: QueueRecord) -> bool:
            if record.queue_id in self.records:
                return True
            self._schedule(record)
            return True

        def missing(failure: Any) -> bool:
            failure.trap(OSError)
            return False

        return d.addCallbacks(loaded, missing)

    def sweep(self) -> Deferred[int]:
        """
        Adopt every committed message on disk the queue does not know (one a
        receiver stored but could not announce); how many.
        """
        if not self.loaded.called:
            return succeed(0)
        d = self._blocking(self.store.committed_ids)

        def adopt_all(ids: list[str]) -> Deferred[int]:
            unknown = [i for i in ids if i not in self.records]
            adoptions = [self.adopt(i) for i in unknown]
            if unknown:
                log.info("queue: sweep found {n} messages to take up", n=len(unknown))
            return DeferredList(adoptions).addCallback(
                lambda results: sum(1 for ok, found in results if ok and found))

        return d.addCallback(adopt_all)

    # Control

    def flush(self) -> int:
        """
        Make every waiting message due now; return how many.
        """
        now = wall_seconds(self.clock)
        count = 0
        for record in self.records.values():
            if record.queue_id not in self.active:
                record.next_attempt = now
                self._push(record.queue_id, now)
                count += 1
        self._rearm()
        log.info("queue: flush of {n} messages", n=count)
        return count

    def delete(self, queue_id: str) -> Deferred[bool]:
        """
        Drop a message without bouncing it.
        """
        record = self.records.pop(queue_id, None)
        self._take_ahead(queue_id)
        d = self._blocking(self.store.remove, queue_id)

        def removed(found: bool) -> bool:
            if found or record is not None:
                log.info("{qid}: deleted by the administrator", qid=queue_id)
            return found or record is not None

        return d.addCallback(removed)

    # One attempt

    # Content up to this size is read into memory by a worker thread for
    # an attempt; larger content is streamed from its file.
    read_whole_below = 256 * 1024

    def _read_content(self, queue_id: str) -> bytes | None:
        """
        In a worker thread: the content of a small message, C{None} for a
        large one; C{FileNotFoundError} if it is missing.
        """
        return self.store.read_content(queue_id, self.read_whole_below)

    # Small content of messages just queued is kept in memory for their
    # first attempt, up to this many bytes in all: a message relayed at
    # once costs no thread hand-off and no read of its file.
    ahead_limit = 8 * 1024 * 1024

    def _copy_small(self, spool: MessageSpool) -> bytes | None:
        """
        The content of a small message from its spool (in memory, so no
        I/O on the reactor thread), the bytes the store just wrote; None
        for a larger one.
        """
        if spool.size > min(self.read_whole_below, spool.memory_limit):
            return None
        try:
            return spool.read()
        except ValueError:  # closed meanwhile: the attempt reads the file
            return None

    def _keep_ahead(self, queue_id: str, content: bytes) -> None:
        if self._ahead_bytes + len(content) <= self.ahead_limit and queue_id not in self._ahead:
            self._ahead[queue_id] = content
            self._ahead_bytes += len(content)

    def _take_ahead(self, queue_id: str) -> bytes | None:
        content = self._ahead.pop(queue_id, None)
        if content is not None:
            self._ahead_bytes -= len(content)
        return content

    async def _attempt(self, record: QueueRecord) -> None:
        queue_id = record.queue_id
        data = self._take_ahead(queue_id)
        try:
            # No stat, open or read on the reactor thread for small mail.
            if data is None:
                data = await self._blocking(self._read_content, queue_id)
        except FileNotFoundError:
            await self._quarantine(record.queue_id, "the content file is missing")
            return
        except CorruptFile as e:
            await self._quarantine(record.queue_id, f"unusable: {e}")
            return
        except OSError as e:
            data = None  # streamed from the file; its attempt says what is wrong
            log.warn("{qid}: cannot read the content ahead: {error}", qid=record.queue_id,
                     error=e)

        def open_content() -> Any:
            return io.BytesIO(data) if data is not None else self.store.open_content(queue_id)

        pending = record.pending()
        by_domain: dict[str, list[RecipientState]] = {}
        for rcpt in pending:
            by_domain.setdefault(rcpt.domain, []).append(rcpt)

        async def one(domain: str, rcpts: list[RecipientState]) -> dict[str, Outcome]:
            return await self.courier.deliver(
                domain, record.sender, [r.address for r in rcpts],
                open_content, record.size)

        results: list[tuple[bool, Any]]
        if len(by_domain) == 1:
            # The common case, one domain: no Deferred per domain to gather.
            [(domain, rcpts)] = by_domain.items()
            try:
                results = [(True, await one(domain, rcpts))]
            except Exception:  # noqa: BLE001 - as DeferredList would: a 451 for each recipient
                results = [(False, Failure())]
        else:
            results = await DeferredList(
                [ensureDeferred(one(d, rs)) for d, rs in by_domain.items()], consumeErrors=True)
        now = wall_seconds(self.clock)
        for (ok, outcomes), rcpts in zip(results, by_domain.values()):
            for rcpt in rcpts:
                if not ok:
                    outcome = Outcome(_internal_error(outcomes))
                else:
                    outcome = outcomes[rcpt.address]
                self._record(record, rcpt, outcome, now)
                if rcpt.state == FAILED:
                    rcpt.notified = False
        record.attempts += 1
        still = record.pending()
        if still and now - record.arrival >= self.lifetime:
            for rcpt in still:
                rcpt.state = FAILED
                rcpt.notified = False
                rcpt.dsn = "4.4.7"
                rcpt.last_error = f"delivery time expired; last error: {rcpt.last_error}"
                log.info("{qid}: to=<{to}> status=expired ({error})", qid=record.queue_id,
                         to=safe(rcpt.address), error=safe(rcpt.last_error))
                tally.delivery("expired", "remote")
            still = []
        # A failed recipient stays failed; until its bounce is stored the
        # message stays queued and the bounce is tried again on the retry
        # schedule (never in a loop).
        unnotified = [r for r in record.recipients if r.state == FAILED and not r.notified]
        if unnotified and await self._bounce(record, unnotified):
            for rcpt in unnotified:
                rcpt.notified = True
            unnotified = []
        if still and not record.warned and now - record.arrival >= self.warn_after:
            record.warned = await self._bounce(record, still, delayed=True)
        if record.queue_id not in self.records:
            return  # deleted meanwhile
        self._settle(record.queue_id)
        if not still and not unnotified:
            try:
                await self._blocking(self.store.remove, record.queue_id)
            except OSError as e:
                log.error("{qid}: cannot remove it from the queue: {error}; retried later",
                          qid=record.queue_id, error=e)
            else:
                del self.records[record.queue_id]
                log.info("{qid}: removed", qid=record.queue_id)
                return
        record.next_attempt = now + self.delay_after(record.attempts)
        if still:
            record.next_attempt = min(record.next_attempt,
                                      max(now, record.arrival + self.lifetime))
        try:
            await self._blocking(self.store.save, record)
        except OSError as e:
            # The schedule in memory goes on (retry, expiry); the state on
            # disk is recorded at the next attempt.  At worst a restart
            # repeats an attempt already made.
            log.error("{qid}: cannot record its state: {error}; next attempt as planned",
                      qid=record.queue_id, error=e)
        self._push(record.queue_id, record.next_attempt)

    def _record(self, record: QueueRecord, rcpt: RecipientState, outcome: Outcome,
                now: float) -> None:
        reply = outcome.reply
        rcpt.relay = outcome.relay or rcpt.relay
        rcpt.dsn = reply.enhanced or f"{reply.code // 100}.0.0"
        text = " ".join(reply.text.split("\n"))
        if outcome.status == "sent":
            rcpt.state = SENT
            rcpt.last_error = ""
        else:
            rcpt.last_error = f"{reply.code} {reply.enhanced} {text}".replace("  ", " ")
            if outcome.relay:
                rcpt.remote_reply = f"smtp; {reply.code} {reply.enhanced} {text}".replace("  ", " ")
            if outcome.status == "bounced":
                rcpt.state = FAILED
        log.info("{qid}: to=<{to}> relay={relay} delay={delay:.1f} dsn={dsn} "
                 "status={status} ({reply})",
                 qid=record.queue_id, to=safe(rcpt.address), relay=safe(outcome.relay or "none"),
                 delay=now - record.arrival, dsn=safe(rcpt.dsn), status=outcome.status,
                 reply=safe(f"{reply.code} {text}"))
        tally.delivery("bounced" if outcome.status == "failed" else outcome.status,
                       "local" if outcome.relay == "local" else "remote",
                       now - record.arrival if outcome.status == "sent" else None)

    async def _bounce(self, record: QueueRecord, rcpts: list[RecipientState],
                      delayed: bool = False) -> bool:
        """
        Send the sender a DSN about C{rcpts}; True once it is stored (or
        when none is due: a bounce never bounces).
        """
        if not record.sender:
            log.info("{qid}: bounce of a bounce not sent (to={to})", qid=record.queue_id,
                     to=safe(",".join(f"<{r.address}>" for r in rcpts)))
            return True
        if self.bounce_to is None:
            return False
        try:
            try:
                headers = await self._blocking(self.store.headers, record.queue_id)
            except OSError:
                headers = b""  # the report goes without the original headers
            report = build_report(self.hostname, record, rcpts, headers, wall_seconds(self.clock),
                                  delayed=delayed, retry_until=record.arrival + self.lifetime)
            bounce_id = await self.bounce_to(record.sender, report)
        except Exception as e:  # noqa: BLE001 - a failed bounce is logged; the queue run goes on
            log.error("{qid}: cannot send the {kind} to <{sender}>: {error}",
                      qid=record.queue_id, kind="delay warning" if delayed else "bounce",
                      sender=safe(record.sender), error=safe(e))
            return False
        log.info("{qid}: sender {kind} notification: {bounce_id}", qid=record.queue_id,
                 kind="delay" if delayed else "non-delivery", bounce_id=bounce_id)
        return True


@implementer(IPrepared)
class StagedMessage:
    """
    A message staged in the queue, waiting for the dispatcher's word.
    """

    def __init__(self, queue: OutboundQueue, record: QueueRecord,
                 content: bytes | None = None) -> None:
        self.queue = queue
        self.record = record
        self.committed = False
        self.content = content  # kept for the first attempt of a small message

    def commit(self) -> Deferred[None]:
        record = self.record
        d = self.queue._blocking(self.queue.store.commit, record.queue_id)

        def stored(_: Any) -> None:
            self.committed = True
            log_queued(record)
            if record.queue_id not in self.queue.records:  # a sweep may have been first
                self.queue._schedule(record, self.content)
            self.content = None

        return d.addCallback(stored)

    def abort(self) -> Deferred[None]:
        if self.committed:
            log.warn("{qid}: removed from the queue again: another store failed",
                     qid=self.record.queue_id)
            self.queue.records.pop(self.record.queue_id, None)
            self.queue._take_ahead(self.record.queue_id)
        self.content = None
        return self.queue._blocking(self.queue.store.abort, self.record.queue_id)


def _internal_error(failure: Any) -> Reply:
    log.failure("delivery attempt crashed", failure)
    return Reply(451, "4.3.0", "internal error during delivery")
