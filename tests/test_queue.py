"""
Unit tests for the queue scheduler (L{mailstack.queue.runner}) on a fake
clock, with a courier that answers when the test says so.
"""

from twisted.internet.defer import succeed, Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.runner import OutboundQueue
from mailstack.queue.store import QueueRecord, RecipientState


class HeldCourier:
    """
    Every delivery waits until the test fires it.
    """

    def __init__(self):
        self.pending = []

    def deliver(self, domain, sender, recipients, open_content, size):
        d = Deferred()
        self.pending.append(d)
        return d

    def close_idle(self):
        return succeed(None)


class PathOnlyStore:
    """
    Attempts only ask the store where the content is before delivering.
    """

    def content_path(self, queue_id):
        return __file__  # a file that exists: the content is there


class SchedulerTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.courier = HeldCourier()
        self.queue = OutboundQueue(PathOnlyStore(), self.courier, None, self.clock, None, (300,),
                                   86400, "mx.test")
        self.queue.running = True
        for n in range(3):
            queue_id = f"{n:012X}"
            self.queue.records[queue_id] = QueueRecord(
                queue_id, "s@x.test", 0.0, [RecipientState(f"r{n}@y.test")])
            self.queue._push(queue_id, 0.0)

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
