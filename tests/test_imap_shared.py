"""
One folder state shared by the sessions of a process (issue 18, sessions
kept open): SELECT of an unchanged folder scans nothing, and sessions on
the same folder still see each other's flags, expunges and appends, mail
delivered over SMTP and files renamed by another program, at the moments
RFC 3501/9051 allow.  Real servers, real imaplib sessions.
"""

import os
import re

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SkipTest, TestCase

from mailstack.access import watch as watchmodule
from mailstack.access.folder import Folder, FolderState
from tests.test_imap import PLAIN, IMAPTestMixin, deliver, ok
from tests.test_imap_trust import session


def _select(client, name="INBOX"):
    """
    SELECT, and what it said: EXISTS, RECENT, UIDVALIDITY, UIDNEXT.
    """
    exists = int(ok(client.select(name))[0])
    said = {key: client.untagged_responses.pop(key, [None])[-1]
            for key in ("RECENT", "UIDVALIDITY", "UIDNEXT")}
    return exists, said


def _flags(client, which="1:*"):
    data = ok(client.fetch(which, "(UID FLAGS)"))
    return {int(re.search(rb"UID (\d+)", d).group(1)):
            set(re.search(rb"FLAGS \(([^)]*)\)", d).group(1).decode().split())
            for d in data if isinstance(d, bytes)}


class SharedStateTests(IMAPTestMixin):
    """
    Two sessions of alice on her INBOX, the MTA and another program
    beside them.
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN, PLAIN, PLAIN)
        self.root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        self.scans = []
        real_scan = Folder._scan

        def scan(folder, *args, **kwargs):
            self.scans.append(folder.path)
            return real_scan(folder, *args, **kwargs)

        self.patch(Folder, "_scan", scan)

    def settle(self):
        """
        Make the INBOX's directories look old, as the polled fallback
        trusts only a directory unchanged for SETTLE seconds.
        """
        for sub in ("new", "cur"):
            os.utime(os.path.join(self.root, sub), (1e9, 1e9))

    @inlineCallbacks
    def test_changes_reach_both_sessions(self):
        """
        Flags, an APPEND and an EXPUNGE by one session, a delivery and a
        rename by another program: the other session sees each at its next
        NOOP or SELECT, as untagged FETCH, EXISTS and EXPUNGE, never earlier.
        """
        def work(first):
            second = session(self)
            try:
                self.assertEqual(_select(first)[0], 3)
                self.assertEqual(_select(second)[0], 3)
                uids = sorted(_flags(second))
                ok(first.store("1", "+FLAGS", "(\\Flagged)"))
                ok(second.noop())
                seen_flag = second.untagged_responses.pop("FETCH", [])
                # APPEND by the first, EXPUNGE of message 2 by the first.
                ok(first.append("INBOX", None, None, b"Subject: appended\r\n\r\nx\r\n"))
                ok(first.store("2", "+FLAGS", "(\\Deleted)"))
                # Before its next command the second still numbers message 2.
                before = _flags(second, "2")
                ok(first.expunge())
                ok(second.noop())
                expunged = second.untagged_responses.pop("EXPUNGE", [])
                exists = second.untagged_responses.pop("EXISTS", [])
                after = _flags(second)
                # Another program marks the last message seen (a rename).
                cur = os.path.join(self.root, "cur")
                name = sorted(os.listdir(cur))[0]
                base = name.split(":")[0]
                os.rename(os.path.join(cur, name), os.path.join(cur, base + ":2,S"))
                renamed = _select(first)
                seen_by_first = _flags(first)
                return (uids, seen_flag, before, expunged, exists, after, renamed,
                        seen_by_first, base)
            finally:
                second.logout()

        (uids, seen_flag, before, expunged, exists, after, renamed, seen_by_first,
         base) = yield self.imap(work, implicit=True)
        self.assertEqual(len(seen_flag), 1)
        self.assertIn(b"\\Flagged", seen_flag[0])
        self.assertEqual(list(before), [uids[1]])
        self.assertEqual(expunged, [b"2"])
        self.assertEqual(exists[-1], b"3")
        self.assertNotIn(uids[1], after)
        self.assertEqual(len(after), 3)
        self.assertEqual(renamed[0], 3)
        self.assertIn("\\Seen", [f for flags in seen_by_first.values() for f in flags])

    @inlineCallbacks
    def test_delivery_seen_by_select_again(self):
        """
        Mail the MTA delivers after a SELECT is in the next SELECT (the
        shared snapshot is not reused for a changed folder), recent there.
        """
        def first_look(client):
            return _select(client)

        first = yield self.imap(first_look, implicit=True)
        yield deliver(self.server, PLAIN)

        def again(client):
            return _select(client), _select(client)

        second, third = yield self.imap(again, implicit=True)
        self.assertEqual(first[0], 3)
        self.assertEqual(second[0], 4)
        self.assertEqual(second[1]["RECENT"], b"1")
        self.assertEqual(third[1]["RECENT"], b"0")
        self.assertEqual(int(second[1]["UIDNEXT"]), int(first[1]["UIDNEXT"]) + 1)

    @inlineCallbacks
    def test_other_process_append(self):
        """
        A message added by another process (its own Folder, appending to
        the uid list) is in the next SELECT with the UID it was given.
        """
        def work(client):
            before = _select(client)
            uid = Folder(self.root).add(b"Subject: elsewhere\n\nx\n", {"\\Seen"})
            after = _select(client)
            return before, uid, after, _flags(client)

        before, uid, after, flags = yield self.imap(work, implicit=True)
        self.assertEqual(after[0], before[0] + 1)
        self.assertEqual(flags[uid], {"\\Seen", "\\Recent"})


class NotifiedSharedStateTests(SharedStateTests, TestCase):
    def setUp(self):
        if watchmodule._inotify is None:
            raise SkipTest("no inotify here")
        return super().setUp()

    @inlineCallbacks
    def test_select_again_scans_nothing(self):
        """
        SELECT of a folder nothing changed since the last scan, by this
        session or another, answers from the shared state: no scan, the
        same answer.
        """
        def work(first):
            second = session(self)
            try:
                _select(first)  # claims new/: a change, seen at the next look
                _select(first)
                scans = len(self.scans)
                again = [_select(first), _select(second), _select(first)]
                quiet = len(self.scans) - scans
                ok(second.store("1", "+FLAGS", "(\\Answered)"))
                changed = _select(first)
                return again, quiet, len(self.scans) - scans, changed, _flags(first)
            finally:
                second.logout()

        again, quiet, scans, changed, flags = yield self.imap(work, implicit=True)
        self.assertEqual(quiet, 0)
        self.assertEqual(scans, 1)  # the STORE changed the folder
        self.assertEqual(again[0], again[1])
        self.assertEqual(again[0], again[2])
        self.assertEqual(again[0][0], 3)
        self.assertEqual(again[0][1]["RECENT"], b"0")
        self.assertEqual(changed[0], 3)
        self.assertIn("\\Answered", flags[min(flags)])


class PolledSharedStateTests(SharedStateTests, TestCase):
    """
    The same with the stat fallback (as without inotify).
    """

    def setUp(self):
        self.patch(watchmodule, "_inotify", None)
        return super().setUp()

    @inlineCallbacks
    def test_select_again_scans_nothing(self):
        """
        Polled, an unchanged folder whose directories are older than the
        settle window is selected again without a scan.
        """
        def work(client):
            _select(client)
            self.settle()
            _select(client)
            scans = len(self.scans)
            again = _select(client)
            return again, len(self.scans) - scans

        again, scans = yield self.imap(work, implicit=True)
        self.assertEqual(scans, 0)
        self.assertEqual(again[0], 3)


class UidListTailTests(TestCase):
    """
    The shared state reads only what was appended to the uid list.
    """

    def test_tail(self):
        root = self.mktemp()
        os.makedirs(root)
        from mailstack.access.folder import ensure_folder
        ensure_folder(root, subfolder=False)
        folder = Folder(root)
        folder.add(b"Subject: one\n\nx\n", set())
        state = FolderState()
        first = folder.scan(state=state, generation=1)
        parsed = state.uidlist
        other = Folder(root).add(b"Subject: two\n\nx\n", set())
        second = folder.scan(state=state, generation=2)
        self.assertIs(state.uidlist, parsed)  # not read again: its tail only
        self.assertEqual([e.uid for e in second.entries],
                         [e.uid for e in first.entries] + [other])
        self.assertEqual(state.generation, 2)
        # A uid list rewritten (a new inode) is read whole again.
        os.unlink(os.path.join(root, "mailstack-uidlist"))
        third = folder.scan(state=state, generation=3)
        self.assertIsNot(state.uidlist, parsed)
        self.assertNotEqual(third.validity, first.validity)


class KnownRenderTests(TestCase):
    """
    FETCH of what the view knows is written without a worker thread by
    L{render_known}, byte for byte as L{render} writes it.
    """

    def test_same_bytes(self):
        from twisted.mail import imap4

        from mailstack.access.folder import Entry, shared_flags
        from mailstack.access.imap import render, render_known
        from mailstack.access.mailbox import Loaded

        parser = imap4.IMAP4Server()
        entries = [(1, Entry(7, "a", "cur", "a:2,S", 120, False, shared_flags("S", []))),
                   (2, Entry(9, "b", "cur", "b:2,", 99, True, shared_flags("", []))),
                   (3, Entry(12, "c", "cur", "c:2,FT", 5, False, {"\\Flagged", "$Work"}))]
        for text in (b"(FLAGS UID RFC822.SIZE)", b"(UID FLAGS)", b"FLAGS", b"RFC822.SIZE",
                     b"(RFC822.SIZE FLAGS)"):
            query, _ = parser.arg_fetchatt(text)
            for uid in (False, True):
                expected = b"".join(render(Loaded(seq, entry, None, 0.0), query, uid)
                                    for seq, entry in entries)
                self.assertEqual(render_known(entries, query, uid), expected, (text, uid))
                # Twice: the second time from the cache of flag texts.
                self.assertEqual(render_known(entries, query, uid), expected, (text, uid))
