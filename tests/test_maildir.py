"""
Tests for L{mailstack.delivery.maildir}: staging, commit, cleanup and the
group-committed directory fsync.
"""

import os
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address
from mailstack.delivery.maildir import Copy, DirectorySyncer, MaildirStore, MaildirWriter
from mailstack.message import MessageSpool


class MaildirWriterTests(SynchronousTestCase):
    def setUp(self):
        self.root = os.path.abspath(self.mktemp())
        self.store = MaildirStore(self.root)
        self.writer = MaildirWriter(self.store, "mx.test")
        self.spool = MessageSpool()
        self.spool.write(b"Subject: x\n\nbody\n")

    def test_copies(self):
        """
        Each copy is its own file in new/, with its own prefix, mode 0600,
        and tmp/ is left empty.
        """
        a = self.store.path_for(Address("a", "x.test"))
        b = self.store.path_for(Address("b", "y.test"))
        paths = self.writer.write([Copy(a, b"Delivered-To: a\n"), Copy(b, b"Delivered-To: b\n")],
                                  self.spool)
        self.assertEqual([os.path.dirname(p) for p in paths], [a + "/new", b + "/new"])
        with open(paths[1], "rb") as f:
            self.assertEqual(f.read(), b"Delivered-To: b\nSubject: x\n\nbody\n")
        self.assertEqual(os.stat(paths[0]).st_mode & 0o777, 0o600)
        self.assertEqual(os.listdir(os.path.join(a, "tmp")), [])
        self.assertEqual(sorted(os.listdir(a)), ["cur", "new", "tmp"])

    def test_spilled_spool(self):
        """
        A spool that moved to disk is written whole.
        """
        spool = MessageSpool(os.path.join(self.root, "spool"))
        data = os.urandom(3 * MessageSpool.memory_limit)
        spool.write(data[:10])
        spool.write(data[10:])
        [path] = self.writer.write([Copy(self.store.path_for(Address("a", "x.test")), b"")],
                                   spool)
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        spool.close()

    def test_failure_removes_every_copy(self):
        """
        If the second copy fails, the first is removed from tmp/ and new/.
        """
        a = self.store.path_for(Address("a", "x.test"))
        bad = self.store.path_for(Address("b", "x.test"))
        os.makedirs(os.path.dirname(bad), exist_ok=True)
        open(bad, "w").close()
        self.assertRaises(OSError, self.writer.write, [Copy(a, b""), Copy(bad, b"")],
                          self.spool)
        self.assertEqual(os.listdir(os.path.join(a, "new")), [])
        self.assertEqual(os.listdir(os.path.join(a, "tmp")), [])

    def test_path_for_is_confined(self):
        from mailstack.address import AddressError
        for local, domain in (("..", "x.test"), ("a", ".."), ("a/b", "x.test"), ("a", "x/y")):
            self.assertRaises(AddressError, self.store.path_for, Address(local, domain))


class DirectorySyncerTests(SynchronousTestCase):
    def test_group_commit(self):
        """
        Callers that arrive while an fsync of the same directory runs share
        the next fsync: 20 callers need far fewer than 20 fsyncs, and each
        caller returns only after an fsync that started after its call.
        """
        gate = threading.Event()
        started = threading.Event()
        calls = []

        def slow_fsync(path):
            calls.append(path)
            started.set()
            gate.wait(5)

        syncer = DirectorySyncer(slow_fsync)
        done = []
        first = threading.Thread(target=lambda: (syncer.sync("/d"), done.append(0)))
        first.start()
        started.wait(5)
        others = [threading.Thread(target=lambda i=i: (syncer.sync("/d"), done.append(i)))
                  for i in range(1, 20)]
        for t in others:
            t.start()
        deadline = time.monotonic() + 10
        while syncer._state["/d"][0] < 20 and time.monotonic() < deadline:
            pass  # until all 20 hold a ticket
        self.assertEqual(done, [])
        gate.set()
        for t in [first] + others:
            t.join(5)
        self.assertEqual(sorted(done), list(range(20)))
        self.assertEqual(len(calls), 2)
        self.assertEqual(syncer._state, {})

    def test_error_propagates(self):
        """
        An fsync that fails raises in the caller, and the next caller tries again.
        """
        results = [OSError(5, "EIO"), None]

        def flaky(path):
            r = results.pop(0)
            if r:
                raise r

        syncer = DirectorySyncer(flaky)
        self.assertRaises(OSError, syncer.sync, "/d")
        syncer.sync("/d")
        self.assertEqual(results, [])
