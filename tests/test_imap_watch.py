"""
NOOP, CHECK and IDLE without rescans (issue 18): the folder watches of
L{mailstack.access.watch} (inotify, and the C{stat} fallback), and real
sessions seeing deliveries and other sessions' changes through them.
"""

import errno
import os
import re
import shutil

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, TestCase

from mailstack.access import watch as watchmodule
from mailstack.access.folder import Folder, ensure_folder
from mailstack.access.watch import SETTLE, Watches, fingerprint
from tests.support import in_thread, smtp_session
from tests.test_imap import PLAIN, IMAPTestMixin, RawSession, deliver, ok
from tests.test_imap_trust import session


def _folder(test):
    root = test.mktemp()
    os.makedirs(root)
    ensure_folder(root, subfolder=False)
    folder = Folder(root)
    folder.add(b"Subject: one\n\nbody\n", set())
    return folder


def _flag(folder, flag="\\Seen"):
    """
    Change a flag as another session would (a rename in cur/).
    """
    entry = folder.scan().entries[0]
    folder.change_flags([entry], add={flag})


class FakeTimeWatches(Watches):
    now = 0.0

    def clock(self):
        return self.now


class PolledWatchTests(TestCase):
    """
    The fallback: the directories' stat, with a settle window.
    """

    def setUp(self):
        self.clock = Clock()
        self.watches = FakeTimeWatches(self.clock)  # a Clock has no file descriptors
        self.folder = _folder(self)
        self.watches.now = max(m for _, _, m in fingerprint(self.folder.path)) / 1e9 + 10

    def test_polled_without_inotify(self):
        watch = self.watches.acquire(self.folder.path)
        self.assertFalse(watch.notified)
        self.watches.release(watch)

    def test_unchanged_is_quiet(self):
        """
        Nothing changed and the directories are old: the generation stays.
        """
        watch = self.watches.acquire(self.folder.path)
        seen = watch.poll()
        self.assertFalse(watch.changed_since(seen))
        self.assertFalse(watch.changed_since(seen))
        self.watches.release(watch)

    def test_flag_change_seen(self):
        watch = self.watches.acquire(self.folder.path)
        seen = watch.poll()
        _flag(self.folder)
        self.assertTrue(watch.changed_since(seen))
        self.watches.release(watch)

    def test_change_within_one_tick(self):
        """
        A change that leaves the directory's mtime as it was (two changes
        in one tick of the file system's clock) is still reported while
        the mtime is recent, and no longer once it settled.
        """
        cur = os.path.join(self.folder.path, "cur")
        self.watches.now = os.stat(cur).st_mtime_ns / 1e9 + SETTLE / 4
        watch = self.watches.acquire(self.folder.path)
        before = os.stat(cur).st_mtime_ns
        seen = watch.poll()
        _flag(self.folder)
        os.utime(cur, ns=(before, before))  # as if in the same tick
        self.assertTrue(watch.changed_since(seen))
        self.watches.now += 2 * SETTLE
        seen = watch.poll()
        self.assertFalse(watch.changed_since(seen))
        self.watches.release(watch)

    def test_one_timer_tells_idlers(self):
        """
        Idling sessions are told by one timer for the process, and the
        timer stops when nobody idles.
        """
        watch = self.watches.acquire(self.folder.path)
        told = []
        watch.add_listener(lambda: told.append(1))
        watch.poll()
        self.clock.advance(watchmodule.POLL_INTERVAL)
        self.assertEqual(told, [])
        _flag(self.folder)
        self.clock.advance(watchmodule.POLL_INTERVAL)
        self.clock.advance(0)
        self.assertEqual(told, [1])
        self.watches.release(watch)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shared(self):
        first = self.watches.acquire(self.folder.path)
        second = self.watches.acquire(self.folder.path)
        self.assertIs(first, second)
        self.watches.release(first)
        self.watches.release(second)


class NotifiedWatchTests(TestCase):
    """
    inotify, on the real reactor.
    """

    def setUp(self):
        if watchmodule._inotify is None:
            raise SkipTest("no inotify here")
        self.watches = Watches(reactor)
        self.folder = _folder(self)

    def test_change_seen_at_once(self):
        """
        A change is seen by the next poll without a reactor turn between
        (the queued events are read first), and an unchanged folder stays
        quiet, even with directories modified just now.
        """
        watch = self.watches.acquire(self.folder.path)
        self.addCleanup(self.watches.release, watch)
        self.assertTrue(watch.notified)
        seen = watch.poll()
        self.assertFalse(watch.changed_since(seen))
        _flag(self.folder)
        self.assertTrue(watch.changed_since(seen))
        seen = watch.poll()
        self.assertFalse(watch.changed_since(seen))

    @inlineCallbacks
    def test_listener_told(self):
        watch = self.watches.acquire(self.folder.path)
        self.addCleanup(self.watches.release, watch)
        told = []
        watch.add_listener(lambda: told.append(watch.generation))
        self.folder.add(b"Subject: two\n\nbody\n", set())
        for _ in range(50):
            if told:
                break
            yield _turn()
        self.assertTrue(told)

    def test_watch_limit(self):
        """
        When inotify refuses a watch (the limit reached), the folder is
        polled and changes are still seen.
        """
        def refuse(*args, **kwargs):
            raise watchmodule._inotify.INotifyError(errno.ENOSPC)

        self.patch(watchmodule._Notifier, "watch", refuse)
        watch = self.watches.acquire(self.folder.path)
        self.addCleanup(self.watches.release, watch)
        self.assertFalse(watch.notified)
        seen = watch.poll()
        _flag(self.folder)
        self.assertTrue(watch.changed_since(seen))

    @inlineCallbacks
    def test_deleted_folder(self):
        """
        Deleting one watched folder (Twisted then closes its inotify
        descriptor) leaves the other folders watched again.
        """
        other = _folder(self)
        kept = self.watches.acquire(self.folder.path)
        doomed = self.watches.acquire(other.path)
        self.addCleanup(self.watches.release, kept)
        self.addCleanup(self.watches.release, doomed)
        shutil.rmtree(other.path)
        for _ in range(50):
            yield _turn()
            if kept.notified and self.watches._notifier is not None and not doomed.notified:
                break
        self.assertTrue(kept.notified)
        seen = kept.poll()
        _flag(self.folder)
        self.assertTrue(kept.changed_since(seen))


def _turn():
    from twisted.internet.task import deferLater
    return deferLater(reactor, 0.01, lambda: None)


class SessionTests(IMAPTestMixin):
    """
    Real sessions: NOOP and IDLE see deliveries and another session's flag
    changes, and NOOP does not rescan an unchanged folder.
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN)
        self.scans = []
        real_scan = Folder.scan

        def scan(folder, *args, **kwargs):
            self.scans.append(folder.path)
            return real_scan(folder, *args, **kwargs)

        self.patch(Folder, "scan", scan)

    @inlineCallbacks
    def test_noop(self):
        def work(first):
            ok(first.select("INBOX"))
            # An INBOX untouched for a while (SELECT just moved new/ to cur/,
            # which the polled fallback trusts only after SETTLE seconds),
            # and one NOOP for the change the SELECT itself made.
            root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
            for sub in ("new", "cur"):
                os.utime(os.path.join(root, sub), (1e9, 1e9))
            ok(first.noop())
            scans = len(self.scans)
            for _ in range(3):
                ok(first.noop())
            quiet = len(self.scans) - scans
            second = session(self)
            try:
                ok(second.select("INBOX"))
                ok(second.store("1", "+FLAGS", "(\\Flagged)"))
            finally:
                second.logout()
            ok(first.noop())
            fetches = first.untagged_responses.pop("FETCH", None)
            smtp_session(self.server.ports["smtp"], lambda c: c.sendmail(
                "bob@remote.test", ["alice@localhost"], b"Subject: later\r\n\r\nx\r\n"))
            ok(first.noop())
            exists = first.untagged_responses.pop("EXISTS", None)
            return quiet, fetches, exists

        quiet, fetches, exists = yield self.imap(work, implicit=True)
        self.assertEqual(quiet, 0)
        self.assertIn(b"\\Flagged", fetches[0])
        self.assertEqual(exists[-1], b"2")

    @inlineCallbacks
    def test_idle(self):
        def idle():
            raw = RawSession(self.server, self.context)
            raw.send(b"c IDLE\r\n")
            self.assertTrue(raw.reader.readline().startswith(b"+"))
            second = session(self)
            try:
                ok(second.select("INBOX"))
                ok(second.store("1", "+FLAGS", "(\\Flagged)"))
            finally:
                second.logout()
            flagged = raw.reader.readline()
            smtp_session(self.server.ports["smtp"], lambda c: c.sendmail(
                "bob@remote.test", ["alice@localhost"], b"Subject: idle\r\n\r\nx\r\n"))
            lines = [raw.reader.readline()]
            while not re.match(rb"\* \d+ EXISTS", lines[-1]):
                lines.append(raw.reader.readline())
            raw.send(b"DONE\r\n")
            done = raw.until(b"c ")[-1]
            raw.close()
            return flagged, lines, done

        flagged, lines, done = yield in_thread(idle)
        self.assertRegex(flagged, rb"^\* 1 FETCH \(FLAGS \(.*\\Flagged")
        self.assertEqual(lines[-1], b"* 2 EXISTS\r\n")
        self.assertTrue(done.startswith(b"c OK"))


class NotifiedSessionTests(SessionTests, TestCase):
    def setUp(self):
        if watchmodule._inotify is None:
            raise SkipTest("no inotify here")
        return super().setUp()


class PolledSessionTests(SessionTests, TestCase):
    """
    The same with the stat fallback (as without inotify).
    """

    def setUp(self):
        self.patch(watchmodule, "_inotify", None)
        return super().setUp()

