"""
The queue file (L{mailstack.queue.store}, L{mailstack.queue.qfile}): one
file per message, state records appended, a torn tail ignored, the legacy
layout (C{content/} + C{envelope/*.json}) still loaded.
"""

import errno
import json
import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.message import MessageSpool
from mailstack.queue import qfile
from mailstack.queue.store import (
    FAILED, PENDING, SENT, QueueRecord, QueueStore, RecipientState,
)
from mailstack.safeio import Disk, RecordingDisk, use_disk

CONTENT = b"Subject: hello\n\nbody line\n"
LOAD_ERRORS = (OSError, ValueError, TypeError, KeyError, AttributeError)


class ShortWriteDisk(Disk):
    """
    A disk whose next calls fail as listed: C{(operation, errno)}, or
    C{("write", SHORT)} for a write that stores half of its data.
    """

    SHORT = -1

    def __init__(self, faults):
        self.faults = list(faults)

    def _fault(self, operation):
        if self.faults and self.faults[0][0] == operation:
            return self.faults.pop(0)[1]
        return None

    def write(self, fd, data):
        fault = self._fault("write")
        if fault == self.SHORT:
            return os.write(fd, data[:max(1, len(data) // 2)])
        if fault is not None:
            raise OSError(fault, os.strerror(fault))
        return os.write(fd, data)

    def fsync(self, fd):
        fault = self._fault("fsync")
        if fault is not None:
            raise OSError(fault, os.strerror(fault))
        os.fsync(fd)


class NoSyncDisk(Disk):
    """
    For tests of the format only: no fsync (the shared disk is slow).
    """

    def fsync(self, fd):
        pass

    def fsync_directory(self, directory):
        pass


def new_record(queue_id="AAAAAAAAAAAA", rcpts=("a@x.test", "b@y.test")):
    return QueueRecord(queue_id, "s@x.test", 1000.0, [RecipientState(r) for r in rcpts],
                       next_attempt=1000.0, received_from="client.test [192.0.2.1]")


def add(store, record, content=CONTENT):
    spool = MessageSpool()
    spool.write(content)
    try:
        store.add(record, spool)
    finally:
        spool.close()


def state(record):
    return (record.attempts, record.next_attempt, record.warned,
            [(r.address, r.state, r.last_error, r.notified) for r in record.recipients])


class QueueFileTests(SynchronousTestCase):
    def setUp(self):
        self.store = QueueStore(self.mktemp())

    def test_one_file_per_message(self):
        """
        A stored message is one file in C{msg/}, holding the envelope and
        the content; nothing is left in C{tmp/}; it loads back equal.
        """
        record = new_record()
        add(self.store, record)
        self.assertEqual(os.listdir(self.store.msg_dir), [record.queue_id])
        self.assertEqual(os.listdir(self.store.tmp), [])
        self.assertFalse(os.path.exists(self.store.envelope_dir))
        loaded = self.store.load(record.queue_id)
        self.assertEqual(loaded, record)
        self.assertEqual(loaded.size, len(CONTENT))
        self.assertEqual(self.store.read_content(record.queue_id, 1000), CONTENT)
        with self.store.open_content(record.queue_id) as f:
            self.assertEqual(f.read(), CONTENT)
        self.assertEqual(self.store.headers(record.queue_id), b"Subject: hello\n")

    def test_save_appends(self):
        """
        A saved state is a record appended to the same file (same inode,
        the file only grows), and the load gives the last state saved.
        """
        record = new_record()
        add(self.store, record)
        path = self.store.path(record.queue_id)
        inode, size = os.stat(path).st_ino, os.path.getsize(path)
        record.attempts, record.next_attempt = 1, 1300.0
        record.recipients[0].state = SENT
        record.recipients[1].last_error = "451 4.3.0 later"
        self.store.save(record)
        self.assertEqual(os.stat(path).st_ino, inode)
        self.assertGreater(os.path.getsize(path), size)
        with open(path, "rb") as f:
            self.assertEqual(f.read(size), self._first(path, size))
        record.attempts, record.recipients[1].state = 2, FAILED
        record.recipients[1].notified = False
        self.store.save(record)
        self.assertEqual(state(QueueStore(self.store.directory).load(record.queue_id)),
                         state(record))
        self.assertEqual(self.store.read_content(record.queue_id, 1000), CONTENT)

    def _first(self, path, size):
        with open(path, "rb") as f:
            return f.read(size)

    def test_save_is_one_fsync(self):
        """
        Saving a state is one write and one fsync of the file: no rename,
        no directory fsync.
        """
        record = new_record()
        add(self.store, record)
        disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(disk))
        record.attempts = 1
        self.store.save(record)
        self.assertEqual([e[0] for e in disk.events],
                         ["open_append", "write", "fsync", "close"])

    def test_remove_is_one_unlink(self):
        """
        Removing a delivered message is one unlink, its directory not
        fsynced for it (a machine crash may bring it back: delivered again,
        never lost).
        """
        record = new_record()
        add(self.store, record)
        disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(disk))
        self.assertTrue(self.store.remove(record.queue_id))
        self.assertEqual(disk.events, [("unlink", self.store.path(record.queue_id))])
        self.assertFalse(self.store.remove(record.queue_id))
        self.assertEqual(self.store.committed_ids(), [])

    def test_compaction(self):
        """
        When the appended records have grown past L{QueueStore.compact_above}
        the file is rewritten whole with the current state; the content
        is intact and the state is the last one.
        """
        self.store.compact_above = 1000
        record = new_record(rcpts=[f"r{n}@y.test" for n in range(5)])
        add(self.store, record)
        path = self.store.path(record.queue_id)
        self.addCleanup(use_disk, use_disk(NoSyncDisk()))
        first, sizes = os.path.getsize(path), []
        for attempt in range(1, 40):
            record.attempts = attempt
            for rcpt in record.recipients:
                rcpt.last_error = f"451 4.3.0 attempt {attempt} " + "x" * 40
            self.store.save(record)
            sizes.append(os.path.getsize(path))
            self.assertEqual(state(self.store.load(record.queue_id)), state(record))
        # Never more than about eight state records (and the threshold) behind.
        self.assertLess(max(sizes), first + 10 * len(record.state_json()) + 1000)
        self.assertTrue(any(b < a for a, b in zip(sizes, sizes[1:])), sizes)  # rewritten
        self.assertEqual(self.store.read_content(record.queue_id, 1000), CONTENT)
        self.assertEqual(os.listdir(self.store.tmp), [])

    def test_large_envelope_and_content(self):
        """
        An envelope and content larger than the first read are read whole.
        """
        record = new_record(rcpts=[f"recipient-{n}@y.test" for n in range(3000)])
        content = b"Subject: big\n\n" + b"y" * 200_000 + b"\n"
        add(self.store, record, content)
        record.attempts = 1
        record.recipients[1234].state = SENT
        self.store.save(record)
        loaded = QueueStore(self.store.directory).load(record.queue_id)
        self.assertEqual(state(loaded), state(record))
        self.assertIsNone(self.store.read_content(record.queue_id, 1000))
        self.assertEqual(self.store.read_content(record.queue_id, 300_000), content)
        with self.store.open_content(record.queue_id) as f:
            self.assertEqual(b"".join(iter(lambda: f.read(4096), b"")), content)

    def test_torn_tail_rewritten_before_next_append(self):
        """
        A torn state record at the end is ignored at load, and the next
        save rewrites the file instead of appending behind the tear, so
        what it records is found by the next load.
        """
        record = new_record()
        add(self.store, record)
        record.attempts = 1
        self.store.save(record)
        path = self.store.path(record.queue_id)
        with open(path, "ab") as f:
            f.write(qfile.frame(qfile.STATE, b'{"attempts": 9')[:-3])
        store = QueueStore(self.store.directory)
        loaded = store.load(record.queue_id)
        self.assertEqual(loaded.attempts, 1)
        self.assertIn(record.queue_id, store.torn)
        loaded.attempts = 2
        loaded.recipients[0].state = SENT
        store.save(loaded)
        self.assertEqual(state(QueueStore(self.store.directory).load(record.queue_id)),
                         state(loaded))
        self.assertNotIn(record.queue_id, store.torn)

    def test_failed_append_not_followed_by_appends(self):
        """
        A state append that fails after part of its record reached the file
        (ENOSPC after a short write, EIO at the fsync) leaves a tear the
        running store knows of: the next save rewrites the file instead of
        appending behind the tear, where the next load would never look,
        and a restart finds the state saved last.
        """
        for faults in ([("write", ShortWriteDisk.SHORT), ("write", errno.ENOSPC)],
                       [("fsync", errno.EIO)]):
            store = QueueStore(self.mktemp())
            record = new_record()
            add(store, record)
            disk = ShortWriteDisk(faults)
            self.addCleanup(use_disk, use_disk(disk))
            record.attempts = 1
            self.assertRaises(OSError, store.save, record)
            use_disk(Disk())
            record.attempts = 2
            record.recipients[0].state = SENT
            store.save(record)
            self.assertEqual(state(QueueStore(store.directory).load(record.queue_id)),
                             state(record))

    def test_garbage_files(self):
        """
        A file that is not a queue file, or whose envelope is damaged, is
        reported by L{QueueStore.load_all} (to be moved aside), not raised.
        """
        add(self.store, new_record("GOODGOODGOOD"))
        for name, data in [("NOTAQUEUEFILE", b"hello"),
                           ("BADCRCBADCRC", None), ("SHORTCONTENT", None)]:
            with open(self.store.path("GOODGOODGOOD"), "rb") as f:
                good = f.read()
            if data is None and name == "BADCRCBADCRC":
                at = good.index(b"s@x.test")
                data = good[:at] + b"t" + good[at + 1:]
            elif data is None:
                data = good[:-5]
            with open(self.store.path(name), "wb") as f:
                f.write(data)
        found = {}
        for item in QueueStore(self.store.directory).load_all():
            if isinstance(item, tuple):
                found[item[0]] = item[1]
            else:
                found[item.queue_id] = item
        self.assertIsInstance(found.pop("GOODGOODGOOD"), QueueRecord)
        self.assertEqual(sorted(found), ["BADCRCBADCRC", "NOTAQUEUEFILE", "SHORTCONTENT"])
        for error in found.values():
            self.assertIsInstance(error, LOAD_ERRORS)
        self.store.quarantine("BADCRCBADCRC", "bad")
        self.assertEqual(sorted(os.listdir(self.store.corrupt_dir)),
                         ["BADCRCBADCRC", "BADCRCBADCRC.reason"])


class LegacyLayoutTests(SynchronousTestCase):
    """
    A queue written before one file per message.
    """

    def setUp(self):
        self.directory = self.mktemp()
        for sub in ("content", "envelope", "tmp"):
            os.makedirs(os.path.join(self.directory, sub))
        record = new_record("OLDOLDOLDOLD")
        record.size = len(CONTENT)
        record.attempts = 2
        record.recipients[0].state = SENT
        with open(os.path.join(self.directory, "envelope", "OLDOLDOLDOLD.json"), "wb") as f:
            f.write(record.to_json())
        with open(os.path.join(self.directory, "content", "OLDOLDOLDOLD"), "wb") as f:
            f.write(CONTENT)
        self.record = record
        self.store = QueueStore(self.directory)

    def test_loaded_beside_new_messages(self):
        """
        Legacy messages load, with new ones, and their content reads.
        """
        add(self.store, new_record("NEWNEWNEWNEW"))
        loaded = {r.queue_id: r for r in self.store.load_all()}
        self.assertEqual(sorted(loaded), ["NEWNEWNEWNEW", "OLDOLDOLDOLD"])
        self.assertEqual(state(loaded["OLDOLDOLDOLD"]), state(self.record))
        self.assertEqual(self.store.read_content("OLDOLDOLDOLD", 1000), CONTENT)
        self.assertEqual(self.store.headers("OLDOLDOLDOLD"), b"Subject: hello\n")
        self.assertEqual(sorted(self.store.committed_ids()), ["NEWNEWNEWNEW", "OLDOLDOLDOLD"])

    def test_saved_and_removed_in_place(self):
        """
        A legacy message's state is rewritten in its envelope file, and
        its removal takes both of its files.
        """
        [record] = list(self.store.load_all())
        record.attempts = 3
        self.store.save(record)
        with open(self.store.envelope_path("OLDOLDOLDOLD"), "rb") as f:
            self.assertEqual(json.loads(f.read())["attempts"], 3)
        self.assertEqual(os.listdir(self.store.msg_dir), [])
        self.assertTrue(self.store.remove("OLDOLDOLDOLD"))
        self.assertEqual(os.listdir(self.store.envelope_dir), [])
        self.assertEqual(os.listdir(self.store.content_dir), [])


def _states(record, steps):
    """
    Apply C{steps} (recipient index, new state) one by one, yielding the
    record's state after each.
    """
    for attempt, (index, new) in enumerate(steps, 1):
        rcpt = record.recipients[index % len(record.recipients)]
        if rcpt.state == PENDING:
            rcpt.state = new
            rcpt.last_error = "" if new == SENT else f"550 5.1.1 no ({attempt})"
        record.attempts = attempt
        record.next_attempt = 1000.0 + 300 * attempt
        yield state(record)


class TornTailTests(SynchronousTestCase):
    """
    The file cut at every byte offset (a crash in the middle of any
    write): never a crash, never a recipient lost.
    """

    @settings(max_examples=20, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(rcpts=st.integers(min_value=1, max_value=4),
           steps=st.lists(st.tuples(st.integers(0, 3), st.sampled_from([SENT, FAILED])),
                          min_size=1, max_size=4),
           body=st.binary(max_size=60),
           garbage=st.binary(max_size=24))
    def test_truncated_at_every_offset(self, rcpts, steps, body, garbage):
        previous = use_disk(NoSyncDisk())  # what is tested here is the parsing
        try:
            self.truncated_at_every_offset(rcpts, steps, body, garbage)
        finally:
            use_disk(previous)

    def truncated_at_every_offset(self, rcpts, steps, body, garbage):
        directory = self.mktemp()
        store = QueueStore(directory)
        record = new_record(rcpts=[f"r{n}@y.test" for n in range(rcpts)])
        content = b"Subject: t\n\n" + body
        add(store, record, content)
        path = store.path(record.queue_id)
        initial = state(record)
        ends = [os.path.getsize(path)]
        expected = [initial]
        for after in _states(record, steps):
            store.save(record)
            ends.append(os.path.getsize(path))
            expected.append(after)
        with open(path, "rb") as f:
            whole = f.read()
        content_end = ends[0]
        probe = QueueStore(directory)
        for cut in range(len(whole) + 1):
            with open(path, "wb") as f:
                f.write(whole[:cut])
            try:
                loaded = probe.load(record.queue_id)
            except LOAD_ERRORS:
                # Only a file cut inside what was fsynced before its rename
                # (which a crash cannot do) is unreadable: moved aside, kept.
                self.assertLess(cut, content_end)
                continue
            self.assertGreaterEqual(cut, content_end)
            # The state of the last whole record: every recipient pending
            # there is pending here, nothing done that was not recorded.
            whole_records = sum(1 for end in ends if end <= cut)
            self.assertEqual(state(loaded), expected[whole_records - 1])
            self.assertEqual(record.queue_id in probe.torn, cut not in ends)
            probe.torn.clear()
            self.assertEqual(probe.read_content(record.queue_id, 1000), content)
        # Garbage after the last record is a torn tail, ignored.
        with open(path, "wb") as f:
            f.write(whole + garbage)
        loaded = probe.load(record.queue_id)
        self.assertEqual(state(loaded), expected[-1])
        shutil.rmtree(directory)
