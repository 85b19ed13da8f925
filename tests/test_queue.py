"""
Unit tests for the queue scheduler (L{mailstack.queue.runner}) on a fake
clock, with a courier that answers when the test says so.
"""

import io
import os
import threading
import time

from twisted.internet.defer import succeed, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import parse_address
from mailstack.message import Envelope, MessageSpool
from mailstack.queue.courier import Outcome
from mailstack.queue.runner import OutboundQueue
from mailstack.smtp.reply import Reply
from mailstack.delivery.maildir import DirectorySyncer
from mailstack.queue.store import QueueRecord, QueueStore, RecipientState


class HeldCourier:
    """
    Every delivery waits until the test fires it.
    """

    def __init__(self):
        self.pending = []
        self.contents = []

    def deliver(self, domain, sender, recipients, open_content, size):
        self.contents.append(open_content)
        d = Deferred()
        self.pending.append(d)
        return d

    def close_idle(self):
        return succeed(None)


CONTENT = b"Subject: test\n\n" + b"a line of the body\n" * 20


def queue_store(directory):
    """
    A real store holding three messages, each with L{CONTENT}.
    """
    store = QueueStore(directory)
    for n in range(3):
        spool = MessageSpool()
        spool.write(CONTENT)
        store.add(QueueRecord(f"{n:012X}", "s@x.test", 0.0, [RecipientState(f"r{n}@y.test")]),
                  spool)
        spool.close()
    return store


class SchedulerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.courier = HeldCourier()
        store = queue_store(self.mktemp())
        self.queue = OutboundQueue(store, self.courier, None, self.clock, None, (300,),
                                   86400, "mx.test")
        self.queue._blocking = self.blocking
        self.blocked = []
        self.queue.running = True
        for n in range(3):
            queue_id = f"{n:012X}"
            self.queue.records[queue_id] = store.load(queue_id)
            self.queue._push(queue_id, 0.0)

    def blocking(self, f, *args):
        self.blocked.append(f)
        return succeed(f(*args))

    def test_content_read_by_a_worker(self):
        """
        An attempt reads a small message's content through the blocking
        call (a worker thread), and the courier gets it from memory, as
        often as it asks; nothing is opened on the reactor thread.
        """
        self.queue.max_active = 1
        self.queue._run_due()
        self.assertEqual(self.blocked, [self.queue._read_content])
        [open_content] = self.courier.contents
        for _ in range(2):
            content = open_content()
            self.assertIsInstance(content, io.BytesIO)
            self.assertEqual(content.read(), CONTENT)

    def test_large_content_streamed(self):
        """
        Content over L{OutboundQueue.read_whole_below} is streamed from its
        queue file (only its content, to its end), not held in memory.
        """
        self.queue.read_whole_below = 100
        self.queue.max_active = 1
        self.queue._run_due()
        [open_content] = self.courier.contents
        content = open_content()
        self.addCleanup(content.close)
        self.assertNotIsInstance(content, io.BytesIO)
        self.assertEqual(b"".join(iter(lambda: content.read(7), b"")), CONTENT)

    def test_missing_content_quarantined(self):
        """
        A queue file gone missing is found by the worker; the message is
        moved aside and never handed to the courier.
        """
        moved = []
        for n in range(3):
            os.unlink(self.queue.store.path(f"{n:012X}"))
        self.queue.store.quarantine = lambda queue_id, reason: moved.append((queue_id, reason))
        self.queue.max_active = 1
        self.queue._run_due()
        self.assertEqual(self.courier.contents, [])
        self.assertEqual(moved, [(f"{n:012X}", "the content file is missing") for n in range(3)])

    def test_no_spinning_at_capacity(self):
        """
        With every attempt slot busy and messages due, no timer is armed:
        the scheduler waits for a slot instead of spinning.
        """
        self.queue.max_active = 1
        self.queue._run_due()
        self.assertEqual(len(self.courier.pending), 1)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_timer_for_the_earliest(self):
        """
        Messages due later cost one timer, set for the earliest of them.
        """
        for record in self.queue.records.values():
            record.next_attempt = 1000.0 + int(record.queue_id, 16)
            self.queue._push(record.queue_id, record.next_attempt)
        self.queue._heap = [entry for entry in self.queue._heap if entry[0] > 0]
        self.queue._rearm()
        [call] = self.clock.getDelayedCalls()
        self.assertEqual(call.getTime(), 1000.0)
        self.clock.advance(999)
        self.assertEqual(self.courier.pending, [])
        self.clock.advance(1)
        self.assertEqual(len(self.courier.pending), 1)


class StagingStore:
    """
    Stages and commits in memory; the content "on disk" is a file of its
    own, so a test can tell which copy an attempt delivered.
    """

    def __init__(self, path):
        self.path = path
        self.staged = []
        self.removed = []

    def read_content(self, queue_id, limit):
        with open(self.path, "rb") as f:
            data = f.read(limit + 1)
        return data if len(data) <= limit else None

    def open_content(self, queue_id):
        return open(self.path, "rb")

    def stage(self, record, spool):
        record.size = spool.size
        self.staged.append(record.queue_id)

    def commit(self, queue_id):
        pass

    def abort(self, queue_id):
        pass

    def remove(self, queue_id):
        self.removed.append(queue_id)
        return True

    def save(self, record):
        pass


class ReadAheadTests(SynchronousTestCase):
    """
    A small message just queued is delivered from the content kept at its
    enqueue: no thread hand-off and no read of its file at its first
    attempt; later attempts read the file.
    """

    def setUp(self):
        self.clock = Clock()
        self.courier = HeldCourier()
        disk = self.mktemp()
        with open(disk, "wb") as f:
            f.write(b"Subject: from the file\n\nx\n")
        self.store = StagingStore(disk)
        self.queue = OutboundQueue(self.store, self.courier, None, self.clock, None, (300,),
                                   86400, "mx.test")
        self.blocked = []
        self.queue._blocking = self.blocking
        self.queue.running = True

    def blocking(self, f, *args):
        self.blocked.append(getattr(f, "__name__", f))
        return succeed(f(*args))

    def enqueue(self, queue_id, body):
        envelope = Envelope(queue_id, parse_address("s@x.test"))
        envelope.remote = [parse_address("r@y.test")]
        spool = MessageSpool()
        spool.write(body)
        self.successResultOf(self.queue.enqueue(envelope, spool))
        spool.close()  # the SMTP session is over: the queue holds its own copy

    def test_first_attempt_from_memory(self):
        """
        The first attempt gets the enqueued content without a read; after a
        deferral, the next attempt reads the file.
        """
        self.enqueue("AAAAAAAAAAAA", b"Subject: from memory\n\nx\n")
        self.clock.advance(0)
        [open_content] = self.courier.contents
        self.assertEqual(open_content().read(), b"Subject: from memory\n\nx\n")
        self.assertEqual(self.blocked, ["stage", "commit"])
        self.assertEqual(self.queue._ahead, {})
        self.assertEqual(self.queue._ahead_bytes, 0)
        self.courier.pending.pop().callback(
            {"r@y.test": Outcome(Reply(451, "4.3.0", "later"), "relay")})
        self.clock.advance(400)
        self.assertEqual(len(self.courier.contents), 2)
        self.assertIn("_read_content", self.blocked)
        self.assertEqual(self.courier.contents[1]().read(), b"Subject: from the file\n\nx\n")

    def test_limit_in_all(self):
        """
        Past L{OutboundQueue.ahead_limit} bytes kept in all, a message's
        first attempt reads its file like any other.
        """
        self.queue.max_active = 0  # nothing starts: both stay queued
        body = b"Subject: big\n\n" + b"x" * 80 + b"\n"
        self.queue.ahead_limit = len(body) + 10
        self.enqueue("AAAAAAAAAAAA", body)
        self.enqueue("BBBBBBBBBBBB", body)
        self.assertEqual(list(self.queue._ahead), ["AAAAAAAAAAAA"])
        self.assertEqual(self.queue._ahead_bytes, len(body))

    def test_large_message_not_kept(self):
        """
        Content over L{OutboundQueue.read_whole_below} is never kept.
        """
        self.queue.max_active = 0
        self.queue.read_whole_below = 10
        self.enqueue("AAAAAAAAAAAA", b"Subject: big\n\n" + b"x" * 80 + b"\n")
        self.assertEqual(self.queue._ahead, {})

    def test_deleted_message_forgotten(self):
        """
        A message deleted before its first attempt leaves nothing kept.
        """
        self.queue.max_active = 0
        self.enqueue("AAAAAAAAAAAA", b"Subject: x\n\nx\n")
        self.successResultOf(self.queue.delete("AAAAAAAAAAAA"))
        self.assertEqual((self.queue._ahead, self.queue._ahead_bytes), ({}, 0))

    def test_courier_crash_defers(self):
        """
        A courier that raises (a bug) defers each recipient of that domain
        with a 4.3.0 and a logged traceback, with one domain or several.
        """
        for n, rcpts in enumerate([["r@y.test"], ["r@y.test", "q@z.test"]]):
            queue_id = f"{n:012X}"
            self.queue.records[queue_id] = record = QueueRecord(
                queue_id, "s@x.test", 0.0, [RecipientState(r) for r in rcpts])
            self.queue._push(queue_id, 0.0)
            self.queue._run_due()
            for d in self.courier.pending:
                d.errback(RuntimeError("bug"))
            self.courier.pending = []
            self.assertEqual([r.dsn for r in record.recipients], ["4.3.0"] * len(rcpts))
            self.assertTrue(all("internal error" in r.last_error for r in record.recipients))
            self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), len(rcpts))

    def test_slot_freed_while_the_outcome_is_stored(self):
        """
        An attempt that has delivered gives its slot to the next due
        message while its removal (an unlink and an fsync) is still
        running; the message itself is not attempted again meanwhile, and
        the queue stops only once the removal is done.
        """
        removals = []
        blocking = self.queue._blocking

        def held(f, *args):
            if getattr(f, "__name__", "") == "remove":
                removals.append(Deferred())
                return removals[-1].addCallback(lambda _: f(*args))
            return blocking(f, *args)

        self.queue._blocking = held
        self.queue.max_active = 1
        sent = {"r@y.test": Outcome(Reply(250, "2.0.0", "ok"), "relay")}
        self.enqueue("AAAAAAAAAAAA", b"Subject: one\n\nx\n")
        self.enqueue("BBBBBBBBBBBB", b"Subject: two\n\nx\n")
        self.clock.advance(0)
        self.assertEqual(len(self.courier.pending), 1)
        self.courier.pending.pop().callback(sent)
        self.assertEqual(len(removals), 1)
        self.assertEqual(len(self.courier.pending), 1)  # the next one started
        self.assertEqual(sorted(self.queue.active), ["AAAAAAAAAAAA", "BBBBBBBBBBBB"])
        self.queue.flush()
        self.clock.advance(0)
        self.assertEqual(len(self.courier.contents), 2)  # A is not attempted again
        stopped = self.queue.stopService()
        self.courier.pending.pop().callback(sent)
        self.assertNoResult(stopped)
        for d in removals:
            d.callback(None)
        self.successResultOf(stopped)
        self.assertEqual(self.store.removed, ["AAAAAAAAAAAA", "BBBBBBBBBBBB"])
        self.assertEqual((self.queue.active, self.queue._settling), ({}, set()))

    def test_one_timer_for_a_burst(self):
        """
        Many messages queued in one reactor turn arm one timer, not one
        each (each armed and cancelled in turn).
        """
        self.queue.max_active = 20
        armed = []
        call_later = self.clock.callLater
        self.clock.callLater = lambda *a, **k: armed.append(a) or call_later(*a, **k)
        for n in range(5):
            self.enqueue(f"{n:012X}", b"Subject: x\n\nx\n")
        self.assertEqual(len(armed), 1)
        self.clock.advance(0)
        self.assertEqual(len(self.courier.pending), 5)


class GroupCommitTests(SynchronousTestCase):
    def test_concurrent_commits_share_directory_fsyncs(self):
        """
        Messages committed at the same time share the fsync of C{msg/};
        each commit returns only after an fsync that began after its
        rename.
        """
        store = QueueStore(self.mktemp())
        store.ensure()
        for n in range(10):
            with open(store.staged_path(f"{n:012X}"), "wb") as f:
                f.write(b"{}")
        gate, started, calls = threading.Event(), threading.Event(), []

        def slow_fsync(path):
            calls.append(path)
            started.set()
            gate.wait(5)

        store.syncer = DirectorySyncer(slow_fsync)
        first = threading.Thread(target=store.commit, args=("000000000000",))
        first.start()
        started.wait(5)
        others = [threading.Thread(target=store.commit, args=(f"{n:012X}",))
                  for n in range(1, 10)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 10
        while store.syncer._state[store.msg_dir][0] < 10 and time.monotonic() < deadline:
            time.sleep(0.001)  # until every commit has renamed and holds a ticket
        self.assertEqual(len(calls), 1)
        gate.set()
        for t in [first] + others:
            t.join(5)
        self.assertEqual(calls, [store.msg_dir] * 2)
        self.assertEqual(sorted(store.committed_ids()), [f"{n:012X}" for n in range(10)])
