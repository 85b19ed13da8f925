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

from mailstack.queue.runner import OutboundQueue
from mailstack.delivery.maildir import DirectorySyncer
from mailstack.message import MessageSpool
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
