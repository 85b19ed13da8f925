"""
Issue 12 item 8: the queue under faults.  Faults come through seams (a
store whose save raises ENOSPC, a bounce that cannot be stored, a resolver
answering SERVFAIL, damaged files put in the queue directory), never from a
full disk.
"""

import errno
import json
import os
import time
from io import StringIO

from twisted.internet import reactor
from twisted.internet.defer import fail, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import TestCase

from mailstack.cli import run
from mailstack.safeio import RecordingDisk, use_disk
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.testing import FakeResolver
from tests.support import in_thread, read_messages, short_tempdir
from tests import test_relay
from tests.test_relay import LISTEN, Sink


def no_space(*args):
    raise OSError(28, "No space left on device")


class QueueFaultTests(TestCase):
    setUp = test_relay.RelayTests.setUp
    endpoint = test_relay.RelayTests.endpoint
    server = test_relay.RelayTests.server
    run_queue = test_relay.RelayTests.run_queue
    inject = test_relay.RelayTests.inject

    def logged(self):
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        return events

    def cli(self, server, *argv):
        out = StringIO()
        run(["--data-dir", server.data_dir, *argv], None, out)
        return out.getvalue()

    @inlineCallbacks
    def test_deferral_rewrite_fails(self):
        """
        A deferral whose envelope rewrite hits ENOSPC is still retried on
        the schedule, and still expires and bounces at the end of its life.
        """
        server = yield self.server(max_queue_lifetime="30m", retry_schedule="10m")
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "later")}
        yield self.inject(server, ["bob@remote.test"])
        self.patch(server.queue.store, "save", no_space)
        yield self.run_queue(server)
        self.assertEqual(self.sink.policy.attempts, 1)
        yield self.run_queue(server, 600)
        self.assertEqual(self.sink.policy.attempts, 2)
        yield self.run_queue(server, 600)
        yield self.run_queue(server, 600)
        self.assertEqual(server.queue.records, {})  # expired, bounced, removed
        [bounce] = read_messages(server, "alice@localhost")
        self.assertIn(b"Status: 5.4.7", bounce)

    @inlineCallbacks
    def test_unstorable_bounce_no_hot_loop(self):
        """
        When the bounce of an expired recipient cannot be stored, the
        recipient stays failed (it is not delivered again), the message
        stays queued, and the bounce is tried again on the retry schedule,
        not in a loop; once it can be stored the message goes.
        """
        server = yield self.server(max_queue_lifetime="10m", retry_schedule="10m")
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "later")}
        bounces = []

        def bounce_to(sender, report):
            bounces.append(sender)
            return fail(OSError(28, "No space left on device"))

        server.queue.bounce_to = bounce_to
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        yield self.run_queue(server, 600)  # the last attempt: expired, bounce fails
        self.assertEqual((self.sink.policy.attempts, len(bounces)), (2, 1))
        [record] = server.queue.records.values()
        self.assertEqual((record.recipients[0].state, record.recipients[0].notified),
                         ("failed", False))
        for _ in range(10):
            yield self.run_queue(server, 1)
        self.assertEqual((self.sink.policy.attempts, len(bounces)), (2, 1))
        on_disk = server.queue.store.load(record.queue_id)
        self.assertEqual(on_disk.recipients[0].state, "failed")
        server.queue.bounce_to = server.bounce
        yield self.run_queue(server, 600)
        self.assertEqual(server.queue.records, {})
        self.assertEqual(self.sink.policy.attempts, 2)
        self.assertEqual(len(read_messages(server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_mx_servfail_defers(self):
        """
        An MX lookup answered SERVFAIL defers (4.4.3); the A record is not
        used in its place.
        """
        resolver = FakeResolver(a={"flaky.test": ["127.0.0.10"]}, servfail={"flaky.test"})
        server = yield self.server(resolver=resolver)
        yield self.inject(server, ["bob@flaky.test"])
        yield self.run_queue(server)
        [record] = server.queue.records.values()
        self.assertEqual((record.recipients[0].state, record.recipients[0].dsn),
                         ("pending", "4.4.3"))
        self.assertEqual(self.sink.policy.received, [])

    @inlineCallbacks
    def test_corrupt_files_moved_aside(self):
        """
        A truncated envelope and an envelope without content are moved to
        queue/corrupt/ at start with a warning, and shown by queue list; an
        old content file without envelope is removed with a log line.
        """
        data_dir = short_tempdir(self)
        queue = os.path.join(data_dir, "queue")
        for sub in ("envelope", "content", "tmp"):
            os.makedirs(os.path.join(queue, sub))
        with open(os.path.join(queue, "envelope", "AAAAAAAAAAAA.json"), "w") as f:
            f.write('{"queue_id": "AAAAAAAAAAAA", "sender": "a@x.te')
        with open(os.path.join(queue, "content", "AAAAAAAAAAAA"), "w") as f:
            f.write("Subject: one\n\nx\n")
        record = {"queue_id": "BBBBBBBBBBBB", "sender": "alice@localhost", "arrival": 0.0,
                  "recipients": [{"address": "bob@remote.test"}]}
        with open(os.path.join(queue, "envelope", "BBBBBBBBBBBB.json"), "w") as f:
            json.dump(record, f)
        orphan = os.path.join(queue, "content", "CCCCCCCCCCCC")
        with open(orphan, "w") as f:
            f.write("Subject: orphan\n\nx\n")
        old = time.time() - 3600
        os.utime(orphan, (old, old))
        events = self.logged()
        server = yield self.server(data_dir=data_dir)  # loaded: moved aside by then
        self.assertEqual(server.queue.records, {})
        self.assertEqual(sorted(os.listdir(os.path.join(queue, "corrupt"))),
                         ["AAAAAAAAAAAA", "AAAAAAAAAAAA.json", "AAAAAAAAAAAA.reason",
                          "BBBBBBBBBBBB.json", "BBBBBBBBBBBB.reason"])
        self.assertFalse(os.path.exists(orphan))
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("AAAAAAAAAAAA" in t and "corrupt" in t for t in texts), texts)
        self.assertTrue(any("CCCCCCCCCCCC" in t and "without an envelope" in t for t in texts))
        listing = yield in_thread(self.cli, server, "queue", "list")
        self.assertIn("AAAAAAAAAAAA  CORRUPT", listing)
        self.assertIn("BBBBBBBBBBBB  CORRUPT  (unusable at start: the content file is missing",
                      listing)

    @inlineCallbacks
    def test_legacy_layout_delivered_after_upgrade(self):
        """
        A queue directory written by the layout before one file per message
        (C{content/<id>} and C{envelope/<id>.json}: one message due, one
        deferred with a recipient already delivered) loads after the
        upgrade; the due one is delivered and both of its files removed;
        the deferred one's state is kept in its envelope file until it is
        delivered too, to its pending recipient only.  New mail meanwhile
        goes to C{msg/}.
        """
        data_dir = short_tempdir(self)
        queue = os.path.join(data_dir, "queue")
        for sub in ("envelope", "content", "tmp"):
            os.makedirs(os.path.join(queue, sub))
        content = b"Subject: from before the upgrade\n\nold body\n"
        now = self.clock.seconds()
        records = {
            "OLDDUE000001": {"recipients": [{"address": "bob@remote.test"}],
                             "next_attempt": now},
            "OLDLATER0002": {"recipients": [
                {"address": "carol@remote.test", "state": "sent", "relay": "mx1.remote.test"},
                {"address": "dave@remote.test", "last_error": "451 4.3.0 later"}],
                "attempts": 1, "next_attempt": now + 600},
        }
        for queue_id, fields in records.items():
            record = {"queue_id": queue_id, "sender": "alice@localhost", "arrival": now - 60,
                      "size": len(content), **fields}
            with open(os.path.join(queue, "envelope", queue_id + ".json"), "w") as f:
                json.dump(record, f)
            with open(os.path.join(queue, "content", queue_id), "wb") as f:
                f.write(content)
        server = yield self.server(data_dir=data_dir)
        self.assertEqual(sorted(server.queue.records), ["OLDDUE000001", "OLDLATER0002"])
        yield self.run_queue(server)
        [(_, rcpts, received)] = self.sink.policy.received
        self.assertEqual(rcpts, ["bob@remote.test"])
        self.assertTrue(received.endswith(b"\n" + content), received)
        self.assertEqual(sorted(os.listdir(os.path.join(queue, "envelope"))),
                         ["OLDLATER0002.json"])
        self.assertEqual(os.listdir(os.path.join(queue, "content")), ["OLDLATER0002"])
        yield self.inject(server, ["erin@remote.test"])
        yield self.run_queue(server)
        self.assertEqual(os.listdir(os.path.join(queue, "msg")), [])
        self.sink.policy.rcpt_replies = {"dave@remote.test": (451, "4.3.0", "still later")}
        yield self.run_queue(server, 600)
        with open(os.path.join(queue, "envelope", "OLDLATER0002.json")) as f:
            self.assertEqual(json.load(f)["attempts"], 2)
        self.sink.policy.rcpt_replies = {}
        yield self.run_queue(server, 3600)
        self.assertEqual([r for _, r, _ in self.sink.policy.received][-1], ["dave@remote.test"])
        self.assertEqual(server.queue.records, {})
        for sub in ("envelope", "content", "msg"):
            self.assertEqual(os.listdir(os.path.join(queue, sub)), [])

    @inlineCallbacks
    def test_state_append_eio(self):
        """
        EIO at the fsync of a deferral's state record: logged, the retry
        still happens on the schedule, and the next state recorded is the
        one a restart finds.
        """
        data_dir = short_tempdir(self)
        server = yield self.server(data_dir=data_dir, retry_schedule="10m")
        server.queue.jitter = lambda: 0
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "later")}
        queue_id = yield self.inject(server, ["bob@remote.test"])
        disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(disk))
        disk.fail("fsync", "/queue/msg/", error=errno.EIO)
        events = self.logged()
        yield self.run_queue(server)
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any(queue_id in t and "cannot record its state" in t
                            and "Input/output error" in t for t in texts), texts)
        yield self.run_queue(server, 600)
        self.assertEqual(self.sink.policy.attempts, 2)
        yield server.stopService()
        again = yield self.server(data_dir=data_dir)
        self.assertEqual(again.queue.records[queue_id].attempts, 2)

    @inlineCallbacks
    def test_content_lost_while_queued(self):
        """
        Content that disappears while the message waits: moved aside at
        the next attempt, not retried forever with a connect error.
        """
        server = yield self.server()
        self.sink.policy.rcpt_replies = {"bob@remote.test": (451, "4.3.0", "later")}
        queue_id = yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        os.unlink(server.queue.store.path(queue_id))
        server.queue.flush()
        yield self.run_queue(server)
        yield server.queue._blocking(lambda: None)
        self.assertEqual(server.queue.records, {})
        self.assertEqual(self.sink.policy.attempts, 1)
        self.assertTrue(os.path.exists(os.path.join(server.queue.store.corrupt_dir,
                                                    queue_id + ".reason")))

    @inlineCallbacks
    def test_loop_back_to_myself(self):
        """
        A next hop that greets with our own host name is ourselves: the
        recipient bounces at once (5.4.6, "loops back to myself") instead
        of travelling 50 hops.
        """
        mirror = Sink()
        factory = SMTPServerFactory(mirror.policy, ServerSettings("mx.test", 10**7), reactor)
        mirror.port = yield serverFromString(reactor, LISTEN).listen(factory)
        self.addCleanup(mirror.port.stopListening)
        self.ports["127.0.0.10"] = mirror.number
        server = yield self.server()
        yield self.inject(server, ["bob@remote.test"])
        yield self.run_queue(server)
        self.assertEqual(mirror.policy.received, [])
        self.assertEqual(server.queue.records, {})
        [bounce] = read_messages(server, "alice@localhost")
        self.assertIn(b"Status: 5.4.6", bounce)
        self.assertIn(b"loops back to myself", bounce)
