"""
Issue 12 item 10: timers do not depend on the wall clock going forward.
A reactor measures C{callLater} with the wall clock unless
L{mailstack.clock.use_monotonic_time} gives it a monotonic one; the queue
schedules by the reactor's clock and writes wall time only to disk.
"""

from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.runner import OutboundQueue
from mailstack.queue.courier import Outcome
from mailstack.queue.store import QueueRecord, RecipientState
from mailstack.smtp.reply import Reply

try:
    from mailstack.clock import use_monotonic_time
except ImportError:  # what the code did before: the reactor keeps the wall clock
    def use_monotonic_time(reactor, monotonic=None, wall=None):
        pass


class SteppingReactor(Clock):
    """
    A reactor as Twisted makes it: its C{seconds()} is the wall clock,
    which an administrator or NTP may step (L{step}).
    """

    step = 0.0

    def seconds(self):
        return self.rightNow + self.step

    def make_monotonic(self):
        use_monotonic_time(self, monotonic=lambda: self.rightNow,
                           wall=lambda: self.rightNow + self.step)


class ReactorTests(SynchronousTestCase):

    def test_timer_survives_a_step_back(self):
        """
        A 3-second timer fires after 3 seconds although the wall clock was
        stepped back by an hour meanwhile, and a timer set before the
        reactor became monotonic keeps its delay.
        """
        reactor = SteppingReactor()
        reactor.rightNow = 1_800_000_000.0
        fired = []
        reactor.callLater(5, fired.append, "before")
        reactor.make_monotonic()
        reactor.callLater(3, fired.append, "after")
        reactor.step = -3600
        reactor.advance(3)
        self.assertEqual(fired, ["after"])
        reactor.advance(2)
        self.assertEqual(fired, ["after", "before"])

    def test_make_service_uses_it(self):
        """
        The twistd plugin makes the reactor monotonic before it builds the
        service.
        """
        from mailstack import clock, tap
        from mailstack import service

        calls = []
        self.patch(clock, "use_monotonic_time", lambda reactor: calls.append(reactor))
        from mailstack import metrics, reload
        self.patch(service, "MailStack", lambda config, reactor: "service")
        self.patch(metrics, "install", lambda service, reactor: None)
        self.patch(reload, "install", lambda service, reactor, read: None)
        # Not on trial's running reactor: it would wrap trial's log observer
        # for every later test in the process (each error then counts twice).
        from mailstack import logs
        self.patch(logs, "filter_noise", lambda publisher=None, reactor=None: None)
        options = tap.Options()
        options.parseOptions(["--data-dir", self.mktemp()])
        from twisted.internet import reactor
        self.assertEqual(tap.makeService(options), "service")
        self.assertEqual(calls, [reactor])


class DeferringCourier:
    def __init__(self):
        self.attempts = []

    def deliver(self, domain, sender, recipients, open_content, size):
        self.attempts.append(recipients)
        return succeed({r: Outcome(Reply(451, "4.3.0", "later"), "mx") for r in recipients})

    def close_idle(self):
        return succeed(None)


class MemoryStore:
    def __init__(self):
        self.saved = []

    def read_content(self, queue_id, limit):
        return b"Subject: test\n\n"

    def save(self, record):
        self.saved.append(record.next_attempt)


class QueueScheduleTests(SynchronousTestCase):

    def test_retry_after_a_step_back(self):
        """
        A deferred message with a 3-second retry is retried 3 seconds later
        even when the wall clock is stepped back an hour in between; what is
        written to disk is wall time.
        """
        reactor = SteppingReactor()
        reactor.rightNow = 1_800_000_000.0
        reactor.make_monotonic()
        courier = DeferringCourier()
        store = MemoryStore()
        queue = OutboundQueue(store, courier, reactor, reactor, None, (3,), 86400, "mx.test",
                              jitter=lambda: 0)
        queue._blocking = lambda f, *args: succeed(f(*args))
        queue.running = True
        record = QueueRecord("AAAAAAAAAAAA", "s@x.test", 1_800_000_000.0,
                             [RecipientState("r@y.test")], next_attempt=1_800_000_000.0)
        queue._schedule(record)
        reactor.advance(0)
        self.assertEqual(len(courier.attempts), 1)
        self.assertEqual(store.saved, [1_800_000_003.0])
        reactor.step = -3600
        reactor.advance(3)
        self.assertEqual(len(courier.attempts), 2)
        self.assertEqual(store.saved[-1], 1_800_000_006.0 - 3600)
