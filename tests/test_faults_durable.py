"""
Issue 12 items 4, 5, 6 and 9: every durable write goes through
L{mailstack.safeio}, in the order write, fsync(file), rename,
fsync(directory), then the 250; a failure anywhere in the middle of a
delivery (Maildir copies, the queue, both) leaves nothing behind, so the
retry after the 4xx duplicates nothing; no copy is ever cut short.
Faults come from L{RecordingDisk}, never from a full disk.
"""

import errno
import os

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from mailstack import safeio
from mailstack.address import Address, local_address
from mailstack.delivery.dispatch import Dispatcher
from mailstack.interfaces import IDeliveryAgent, IPrepared, ITwoPhaseStore
from mailstack.message import Envelope, LocalRecipient, MessageSpool
from mailstack.safeio import RecordingDisk, use_disk
from mailstack.smtp.server import SMTPServer
from tests.support import add_user, in_thread, maildir_files, smtp_session, start_server

SMTP = "tcp:0:interface=127.0.0.1"


def in_order(testcase, events, expected):
    """
    Assert that C{expected} (C{(operation, path fragment)} pairs) occur in
    C{events} in that order.
    """
    position = 0
    for operation, fragment in expected:
        for i in range(position, len(events)):
            if events[i][0] == operation and fragment in events[i][1]:
                position = i + 1
                break
        else:
            testcase.fail(f"no {operation} {fragment!r} after event {position} in {events}")


def queue_files(server):
    found = []
    for sub in ("msg", "content", "envelope", "tmp"):
        d = os.path.join(server.data_dir, "queue", sub)
        found += [f"{sub}/{n}" for n in os.listdir(d)] if os.path.isdir(d) else []
    return found


class DurableTests(TestCase):
    """
    A real server, real clients, a recording disk.
    """

    @inlineCallbacks
    def setUp(self):
        self.disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(self.disk))
        original = SMTPServer._send

        def send(protocol, reply):
            self.disk.record("reply", str(reply.code))
            original(protocol, reply)

        self.patch(SMTPServer, "_send", send)
        # The queue's clock does not run: queued mail stays in the queue.
        self.server = yield start_server(self, smtp=SMTP, relay_networks="127.0.0.0/8",
                                         clock=Clock())
        yield self.server.queue.loaded
        add_user(self.server, "alice@localhost")
        add_user(self.server, "bob@localhost")
        self.port = self.server.ports["smtp"]

    def send(self, rcpts, body=b"Subject: s\r\n\r\nhi\r\n"):
        def actions(client):
            client.ehlo("c.test")
            client.mail("x@far.test")
            for rcpt in rcpts:
                client.rcpt(rcpt)
            return client.data(body)

        return in_thread(smtp_session, self.port, actions)

    @inlineCallbacks
    def test_maildir_order(self):
        """
        A local copy: written in tmp/, fsynced, renamed into new/, new/
        fsynced, and only then the 250.
        """
        self.disk.events.clear()
        code, _ = yield self.send(["alice@localhost"])
        self.assertEqual(code, 250)
        alice = "/localhost/alice/"
        in_order(self, self.disk.events, [
            ("create", alice + "tmp/"), ("write", alice + "tmp/"), ("fsync", alice + "tmp/"),
            ("rename", alice + "new/"), ("fsync_directory", alice + "new"), ("reply", "250")])
        # And nothing of it after the 250.
        reply = len(self.disk.events) - self.disk.events[::-1].index(("reply", "250"))
        self.assertEqual([e for e in self.disk.events[reply:] if alice in e[1]], [])

    @inlineCallbacks
    def test_queue_order(self):
        """
        A queued message: one queue file (envelope and content) written in
        tmp/ and fsynced, renamed into msg/ (the commit), msg/ fsynced;
        then the 250.  Nothing else is fsynced for it before the 250.
        """
        self.disk.events.clear()
        code, _ = yield self.send(["bob@remote.test"])
        self.assertEqual(code, 250)
        in_order(self, self.disk.events, [
            ("create", "/queue/tmp/"), ("write", "/queue/tmp/"), ("fsync", "/queue/tmp/"),
            ("rename", "/queue/msg/"), ("fsync_directory", "/queue/msg"),
            ("reply", "250")])
        reply = len(self.disk.events) - self.disk.events[::-1].index(("reply", "250"))
        fsyncs = [e for e in self.disk.events[:reply] if e[0].startswith("fsync")]
        self.assertEqual(len(fsyncs), 2, fsyncs)
        self.assertEqual(fsyncs[0][0], "fsync")
        self.assertIn("/queue/tmp/", fsyncs[0][1])
        self.assertEqual(fsyncs[1], ("fsync_directory", self.server.queue.store.msg_dir))

    @inlineCallbacks
    def test_commit_failure_leaves_no_copy(self):
        """
        Two local copies; the second rename into new/ fails after the first
        succeeded: 451, no file in any new/ or tmp/, and the retry delivers
        exactly one copy each.
        """
        self.disk.fail("rename", "/new/", after=1)
        code, _ = yield self.send(["alice@localhost", "bob@localhost"])
        self.assertEqual(code, 451)
        for user in ("alice@localhost", "bob@localhost"):
            self.assertEqual(maildir_files(self.server, user, "new"), [])
            self.assertEqual(maildir_files(self.server, user, "tmp"), [])
        code, _ = yield self.send(["alice@localhost", "bob@localhost"])
        self.assertEqual(code, 250)
        for user in ("alice@localhost", "bob@localhost"):
            self.assertEqual(len(maildir_files(self.server, user, "new")), 1)

    @inlineCallbacks
    def test_queue_commit_fails_after_maildir(self):
        """
        Local and remote recipients; the queue's commit (the envelope's
        rename into msg/) fails after the Maildir copy was committed: 451,
        the copy is removed again, the queue is empty; the retry makes one
        of each.
        """
        self.disk.fail("rename", "/queue/msg/")
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"])
        self.assertEqual(code, 451)
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])
        self.assertEqual(queue_files(self.server), [])
        self.assertEqual(self.server.queue.records, {})
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"])
        self.assertEqual(code, 250)
        self.assertEqual(len(maildir_files(self.server, "alice@localhost", "new")), 1)
        self.assertEqual(len(self.server.queue.records), 1)

    @inlineCallbacks
    def test_maildir_fails_after_queue_staged(self):
        """
        The reverse: the Maildir write fails (ENOSPC) while the queue has
        the message staged: 451 and the queue holds nothing.
        """
        self.disk.fail("write", "/localhost/alice/tmp/")
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"])
        self.assertEqual(code, 451)
        self.assertEqual(queue_files(self.server), [])
        self.assertEqual(self.server.queue.records, {})
        self.assertEqual(maildir_files(self.server, "alice@localhost", "tmp"), [])

    @inlineCallbacks
    def test_queue_write_failure_leaves_no_partial_file(self):
        """
        A queue write that fails (ENOSPC at the fsync of the content) leaves
        nothing in queue/tmp, content or envelope; 451.
        """
        self.disk.fail("fsync", "/queue/tmp/")
        code, _ = yield self.send(["bob@remote.test"])
        self.assertEqual(code, 451)
        self.assertEqual(queue_files(self.server), [])

    @inlineCallbacks
    def test_queue_directory_fsync_eio(self):
        """
        EIO at the fsync of C{msg/} after the queue file's rename (the
        commit): 451, logged, and the file is removed again, so nothing is
        delivered that the client was told to send again; the retry is
        queued once.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.disk.fail("fsync_directory", "/queue/msg", error=errno.EIO)
        code, _ = yield self.send(["bob@remote.test"])
        self.assertEqual(code, 451)
        self.assertEqual(queue_files(self.server), [])
        self.assertEqual(self.server.queue.records, {})
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("Input/output error" in t for t in texts), texts)
        code, _ = yield self.send(["bob@remote.test"])
        self.assertEqual(code, 250)
        self.assertEqual(len(queue_files(self.server)), 1)
        self.assertEqual(len(self.server.queue.records), 1)

    @inlineCallbacks
    def test_queue_stage_fails_with_maildir_staged(self):
        """
        Local and remote recipients; the queue's write fails while the
        Maildir copy is staged: 451, nothing in new/ nor tmp/.
        """
        self.disk.fail("fsync", "/queue/tmp/")
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"])
        self.assertEqual(code, 451)
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])
        self.assertEqual(maildir_files(self.server, "alice@localhost", "tmp"), [])
        self.assertEqual(queue_files(self.server), [])

    @inlineCallbacks
    def test_one_log_line_per_failed_store(self):
        """
        A failed store is one error line, without a traceback.
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.disk.fail("write", "/localhost/alice/tmp/")
        code, _ = yield self.send(["alice@localhost"])
        self.assertEqual(code, 451)
        self.assertEqual([e for e in events if e.get("log_failure") is not None], [])
        texts = [formatEvent(e) for e in events]
        self.assertTrue(any("could not store the message" in t and "No space left" in t
                            for t in texts), texts)

    @inlineCallbacks
    def test_big_mixed_message_whole_or_nothing(self):
        """
        A 1.5 MiB message (spilled to a file) for a local and a remote
        recipient: when the local store fails, neither keeps anything; the
        retry stores both copies whole.
        """
        body = b"Subject: big\r\n\r\n" + (b"x" * 900 + b"\r\n") * 1800
        self.disk.fail("rename", "/localhost/alice/new/")
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"], body)
        self.assertEqual(code, 451)
        self.assertEqual(queue_files(self.server), [])
        code, _ = yield self.send(["alice@localhost", "bob@remote.test"], body)
        self.assertEqual(code, 250)
        [path] = maildir_files(self.server, "alice@localhost", "new")
        with open(path, "rb") as f:
            self.assertTrue(f.read().endswith(b"x" * 900 + b"\n" + b"x" * 900 + b"\n"))
        [record] = self.server.queue.records.values()
        with self.server.queue.store.open_content(record.queue_id) as f:
            content = f.read()
        self.assertGreater(len(content), 1500 * 901)
        self.assertTrue(content.endswith(b"x" * 900 + b"\n" + b"x" * 900 + b"\n"))

    @inlineCallbacks
    def test_spill_on_full_disk(self):
        """
        A message over 1 MiB whose spill file cannot be written (ENOSPC)
        gets 451 4.3.0 after its end, and the session goes on.
        """
        def no_space(data):
            raise OSError(28, "No space left on device")

        self.patch(MessageSpool, "_spill", lambda self, data: no_space(data))
        body = b"Subject: big\r\n\r\n" + (b"y" * 900 + b"\r\n") * 1500

        def actions(client):
            client.ehlo("c.test")
            client.mail("x@far.test")
            client.rcpt("alice@localhost")
            first = client.data(body)
            return first, client.noop()

        (code, text), (noop, _) = yield in_thread(smtp_session, self.port, actions)
        self.assertEqual((code, text.split()[0]), (451, b"4.3.0"))
        self.assertEqual(noop, 250)
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])


class SpillThreadTests(SynchronousTestCase):
    """
    The spill is written in a worker thread, never by the caller of write.
    """

    def test_spill_goes_through_blocking(self):
        calls = []
        pending = []

        def blocking(f, *args):
            calls.append(f.__name__)
            d = Deferred()
            pending.append((d, f, args))
            return d

        spool = MessageSpool(self.mktemp(), blocking)
        os.makedirs(spool._directory)
        spool.write(b"a" * (MessageSpool.memory_limit + 1))
        spool.write(b"b" * 10)
        self.assertEqual(calls, ["_spill"])  # the second waits for the first
        finished = spool.finished()
        self.assertNoResult(finished)
        while pending:
            d, f, args = pending.pop(0)
            f(*args)
            d.callback(None)
        self.successResultOf(finished)
        self.assertEqual(calls, ["_spill", "_append"])
        self.assertEqual(spool.read(), b"a" * (MessageSpool.memory_limit + 1) + b"b" * 10)
        spool.close()


class SpoolReaderTests(SynchronousTestCase):
    """
    Closing a spool never cuts a reader short nor lets it read a reused
    descriptor.
    """

    def check(self, size):
        spool = MessageSpool(self.mktemp())
        os.makedirs(spool._directory)
        spool.chunk_size = 4096
        content = bytes(range(256)) * (size // 256)
        spool.write(content)
        reader = spool.chunks()
        first = next(reader)
        spool.close()
        # Another file takes the closed descriptor's number.
        other = os.open(os.devnull, os.O_RDONLY)
        self.addCleanup(os.close, other)
        self.assertEqual(first + b"".join(reader), content)
        self.assertRaises(ValueError, spool.chunks)

    def test_memory(self):
        self.check(64 * 1024)

    def test_file(self):
        self.check(2 * 1024 * 1024)

    def test_reader_created_before_close(self):
        """
        A reader made before close but not yet started still reads it all.
        """
        spool = MessageSpool()
        spool.write(b"whole message\n")
        reader = spool.chunks()
        spool.close()
        self.assertEqual(b"".join(reader), b"whole message\n")


@implementer(IDeliveryAgent, ITwoPhaseStore)
class FakeStore:
    name = "fake"

    def __init__(self, prepared):
        self.prepared = prepared
        self.aborted = 0
        self.committed = 0

    def prepare(self, envelope, spool):
        return self.prepared.addCallback(lambda _: Prepared(self))


@implementer(IPrepared)
class Prepared:
    def __init__(self, store):
        self.store = store

    def commit(self):
        self.store.committed += 1
        return succeed(None)

    def abort(self):
        self.store.aborted += 1
        return succeed(None)


class DispatcherWaitsTests(SynchronousTestCase):
    """
    The dispatcher answers only when every store is done with the message.
    """

    def test_waits_for_every_store(self):
        """
        The local store fails at once while the queue still reads the
        message: no answer (and so no close of the spool) until the queue
        is done; then the queue's copy is aborted and nothing commits.
        """
        from twisted.internet.defer import fail
        local = FakeStore(fail(OSError(28, "No space left on device")))
        queue_prepared = Deferred()
        queue = FakeStore(queue_prepared)
        dispatcher = Dispatcher(None, local, queue, Clock())
        envelope = Envelope("ID", None)
        envelope.local.append(LocalRecipient(Address("a", "x.test"), Address("a", "x.test")))
        envelope.remote.append(Address("b", "far.test"))
        d = dispatcher.dispatch(envelope, MessageSpool())
        self.assertNoResult(d)
        queue_prepared.callback(None)
        self.failureResultOf(d, OSError)
        self.assertEqual((queue.aborted, queue.committed, local.committed), (1, 0, 0))


class SafeioTests(SynchronousTestCase):
    """
    The other durable writes, in order, through the same module.
    """

    def setUp(self):
        self.disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(self.disk))
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)

    def test_users_and_aliases(self):
        from mailstack.users import AliasMap, UserDatabase
        UserDatabase(self.dir).add(local_address("a@x.test"), "hash")
        AliasMap(self.dir).add(local_address("b@x.test"), (local_address("a@x.test"),))
        for name in ("users", "aliases"):
            in_order(self, self.disk.events, [
                ("create", f".{name}."), ("write", f".{name}."), ("fsync", f".{name}."),
                ("rename", f"/{name}"), ("fsync_directory", self.dir)])

    def test_maildrop(self):
        from mailstack.mua.sendmail import drop
        drop(self.dir, "a@x.test", ["b@x.test"], b"Subject: s\n\nhi\n")
        in_order(self, self.disk.events, [
            ("create", "/maildrop/."), ("write", "/maildrop/."), ("fsync", "/maildrop/."),
            ("rename", "/maildrop/"), ("fsync_directory", "/maildrop")])

    def test_uid_list(self):
        from mailstack.access.folder import Folder, ensure_folder
        path = os.path.join(self.dir, "Maildir")
        ensure_folder(path, False)
        folder = Folder(path)
        folder.add(b"Subject: s\n\nhi\n", set())
        folder.add(b"Subject: t\n\nho\n", set())
        in_order(self, self.disk.events, [
            ("create", "/tmp/"), ("write", "/tmp/"), ("fsync", "/tmp/"), ("rename", "/cur/"),
            ("fsync_directory", "/cur"),
            ("open_append", "mailstack-uidlist"), ("write", "mailstack-uidlist"),
            ("fsync", "mailstack-uidlist")])

    def test_failed_write_removes_partial_file(self):
        self.disk.fail("fsync", "partial", times=2)
        path = os.path.join(self.dir, "partial")
        self.assertRaises(OSError, safeio.write_file, path, [b"data"])
        self.assertFalse(os.path.exists(path))
        self.assertRaises(OSError, safeio.atomic_write, path, b"data")
        self.assertEqual(os.listdir(self.dir), [])


class SpillBackpressureTests(SynchronousTestCase):
    """
    When the spill thread falls behind, the session stops reading instead
    of holding the message in memory.
    """

    def test_paused_until_written(self):
        from twisted.internet.task import Clock as _Clock

        from mailstack.smtp.server import ServerSettings, SMTPServerFactory
        from tests.test_smtp_server import ScriptedPolicy, TLSStringTransport

        pending = []

        def blocking(f, *args):
            d = Deferred()
            pending.append((d, f, args))
            return d

        policy = ScriptedPolicy()
        factory = SMTPServerFactory(policy, ServerSettings("mx.test", 10**8), _Clock(),
                                    spool_dir=os.path.abspath(self.mktemp()), blocking=blocking)
        transport = TLSStringTransport()
        proto = factory.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(b"EHLO c.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<u@mx.test>\r\n"
                           b"DATA\r\n")
        line = b"z" * 998 + b"\r\n"
        for _ in range(6000):  # 6 MB, more than the 4 MiB backlog allowed
            proto.dataReceived(line)
            if transport.producerState == "paused":
                break
        self.assertEqual(transport.producerState, "paused")
        while pending:
            d, f, args = pending.pop(0)
            f(*args)
            d.callback(None)
        self.assertEqual(transport.producerState, "producing")
        transport.clear()
        proto.dataReceived(b".\r\n")
        while pending:
            d, f, args = pending.pop(0)
            f(*args)
            d.callback(None)
        self.assertTrue(transport.value().startswith(b"250 "), transport.value())
        self.assertTrue(policy.delivered[0][1].endswith(b"z" * 998 + b"\n"))
