"""
The pieces under IMAP, without a network: the uid list and flags of a
Maildir folder, MIME sections and structure, sequence sets and SEARCH.
"""

import os

from twisted.trial.unittest import TestCase

from mailstack.access.folder import UIDLIST, Folder, ensure_folder
from mailstack.access.mailbox import MailboxException, folder_dirname, wildcard_match
from mailstack.access.mime import Part, crlf, string
from mailstack.access.search import (
    Candidate, SearchError, check_depth, in_set, matches, needs, parse_set,
)


class FolderTests(TestCase):
    def setUp(self):
        self.path = self.mktemp()
        ensure_folder(self.path, subfolder=False)
        self.folder = Folder(self.path, "mx.test")
        self.counter = 0

    def deliver(self, content=b"Subject: x\n\nbody\n"):
        self.counter += 1
        name = f"{1000 + self.counter}.M1P1Q{self.counter}.mx.test,S={len(content)}"
        with open(os.path.join(self.path, "new", name), "wb") as f:
            f.write(content)
        return name

    def test_uids_in_arrival_order_and_stable(self):
        """
        New messages get increasing UIDs in arrival order; claiming them
        moves them to cur/ as recent; a second scan (another session, or a
        restart) sees the same UIDs, not recent.
        """
        names = [self.deliver() for _ in range(3)]
        first = self.folder.scan(claim_new=True)
        self.assertEqual([e.uid for e in first.entries], [1, 2, 3])
        self.assertEqual([e.base for e in first.entries], names)
        self.assertTrue(all(e.recent and e.sub == "cur" for e in first.entries))
        self.assertEqual(os.listdir(os.path.join(self.path, "new")), [])
        again = Folder(self.path).scan(claim_new=True)
        self.assertEqual([e.uid for e in again.entries], [1, 2, 3])
        self.assertEqual(again.validity, first.validity)
        self.assertFalse(any(e.recent for e in again.entries))
        self.assertEqual(again.uid_next, 4)

    def test_flags_in_file_name(self):
        self.deliver()
        entry = self.folder.scan(claim_new=True).entries[0]
        self.assertTrue(self.folder.set_flags(entry, {"\\Seen", "\\Flagged", "\\Deleted"}))
        self.assertTrue(entry.name.endswith(":2,FST"))
        self.assertEqual(self.folder.scan().entries[0].flags,
                         {"\\Seen", "\\Flagged", "\\Deleted"})

    def test_flag_change_after_another_session_renamed(self):
        """
        A session whose entry is stale (another renamed the file) finds it.
        """
        self.deliver()
        mine = self.folder.scan().entries[0]  # still in new/
        theirs = Folder(self.path).scan(claim_new=True).entries[0]
        Folder(self.path).set_flags(theirs, {"\\Answered"})
        self.assertTrue(self.folder.set_flags(mine, mine.flags | {"\\Seen"}))
        self.assertEqual(self.folder.scan().entries[0].flags, {"\\Seen"})

    def test_uid_never_reused(self):
        """
        The highest UID's message expunged, the next message gets a new UID,
        even after the uid list is compacted.
        """
        for _ in range(3):
            self.deliver()
        entries = self.folder.scan(claim_new=True).entries
        self.folder.remove(entries[2])
        self.deliver()
        self.assertEqual([e.uid for e in self.folder.scan().entries], [1, 2, 4])
        # Compaction happens once most lines are stale.
        for _ in range(1200):
            self.deliver()
        for entry in self.folder.scan(claim_new=True).entries:
            self.folder.remove(entry)
        self.deliver()
        snapshot = self.folder.scan()
        with open(os.path.join(self.path, UIDLIST), "rb") as f:
            lines = f.read().splitlines()
        self.assertLess(len(lines), 10)
        self.assertEqual([e.uid for e in snapshot.entries], [1205])
        self.assertEqual(Folder(self.path).scan().entries[0].uid, 1205)

    def test_torn_and_lost_uidlist(self):
        """
        A torn last line is dropped and the file rewritten; a lost file is
        rebuilt with a greater UIDVALIDITY.
        """
        self.deliver()
        first = self.folder.scan()
        with open(os.path.join(self.path, UIDLIST), "ab") as f:
            f.write(b"2 half")
        self.assertEqual([e.uid for e in self.folder.scan().entries], [1])
        with open(os.path.join(self.path, UIDLIST), "rb") as f:
            self.assertTrue(f.read().endswith(b"\n"))
        os.unlink(os.path.join(self.path, UIDLIST))
        rebuilt = self.folder.scan()
        self.assertGreater(rebuilt.validity, first.validity)
        self.assertEqual([e.uid for e in rebuilt.entries], [1])

    def test_append_stores_lf_and_flags(self):
        uid = self.folder.add(b"Subject: a\n\nb\n", {"\\Seen"}, 1_000_000_000.0)
        entry = self.folder.scan().entries[0]
        self.assertEqual((uid, entry.uid), (1, 1))
        self.assertEqual(entry.flags, {"\\Seen"})
        self.assertEqual(entry.size, len(b"Subject: a\r\n\r\nb\r\n"))
        self.assertEqual(os.stat(entry.path(self.path)).st_mtime, 1_000_000_000.0)


class NameTests(TestCase):
    def test_folder_names(self):
        self.assertEqual(folder_dirname("INBOX"), "")
        self.assertEqual(folder_dirname("inbox"), "")
        self.assertEqual(folder_dirname("Sent"), ".Sent")
        self.assertEqual(folder_dirname("A.B"), ".A.B")
        self.assertEqual(folder_dirname("Entwürfe"), ".Entw&APw-rfe")
        for bad in ("", "a..b", ".a", "a.", "../x", "a/b", "x\0", "INBOX.x", "a\nb"):
            self.assertRaises(MailboxException, folder_dirname, bad)

    def test_wildcards(self):
        self.assertTrue(wildcard_match("*", "A.B"))
        self.assertTrue(wildcard_match("%", "A"))
        self.assertFalse(wildcard_match("%", "A.B"))
        self.assertTrue(wildcard_match("A.%", "A.B"))
        self.assertTrue(wildcard_match("inbox", "INBOX"))
        self.assertFalse(wildcard_match("sent", "Sent"))


NESTED = crlf(
    b"Subject: outer\nContent-Type: multipart/mixed; boundary=b1\n\n"
    b"--b1\nContent-Type: text/plain\n\nhello\n"
    b"--b1\nContent-Type: message/rfc822\n\n"
    b"Subject: inner\nFrom: A <a@x.test>\nContent-Type: multipart/alternative; boundary=b2\n\n"
    b"--b2\nContent-Type: text/plain\n\ninner text\n"
    b"--b2\nContent-Type: text/html\n\n<p>x</p>\n--b2--\n"
    b"--b1--\n")


class MimeTests(TestCase):
    def test_sections(self):
        part = Part(NESTED)
        self.assertEqual(part.section((), ""), NESTED)
        self.assertEqual(part.section((1,), ""), b"hello")
        self.assertEqual(part.section((1,), "MIME"), b"Content-Type: text/plain\r\n\r\n")
        self.assertEqual(part.section((2,), "HEADER.FIELDS", [b"subject"]),
                         b"Subject: inner\r\n\r\n")
        self.assertEqual(part.section((2, 2), ""), b"<p>x</p>")
        self.assertEqual(part.section((2, 1), ""), b"inner text")
        self.assertEqual(part.section((), "HEADER.FIELDS", [b"content-type"], negate=True),
                         b"Subject: outer\r\n\r\n")
        self.assertTrue(part.section((2,), "TEXT").startswith(b"--b2\r\n"))
        self.assertEqual(part.section((7,), ""), b"")

    def test_single_part(self):
        part = Part(crlf(b"Subject: s\n\nline one\nline two\n"))
        self.assertEqual(part.section((1,), ""), b"line one\r\nline two\r\n")
        self.assertEqual(part.section((), "TEXT"), b"line one\r\nline two\r\n")
        self.assertEqual(part.bodystructure(False),
                         b'("TEXT" "PLAIN" NIL NIL NIL "7BIT" 20 2)')

    def test_structure_nested(self):
        structure = Part(NESTED).bodystructure(False)
        self.assertTrue(structure.startswith(b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 5 1)'))
        self.assertIn(b'"MESSAGE" "RFC822"', structure)
        self.assertIn(b'(NIL "inner" (("A" NIL "a" "x.test"))', structure)
        self.assertIn(b'"ALTERNATIVE")', structure)
        self.assertTrue(structure.endswith(b' "MIXED")'))

    def test_strings(self):
        self.assertEqual(string(None), b"NIL")
        self.assertEqual(string('a "b" \\c'), b'"a \\"b\\" \\\\c"')
        self.assertEqual(string("Grüße".encode()), b"{7}\r\nGr\xc3\xbc\xc3\x9fe")

    def test_envelope(self):
        envelope = Part(crlf(b"From: \"Ann B\" <ann@x.test>\nTo: c@y.test, d@z.test\n"
                             b"Subject: hi\nMessage-ID: <1@x>\n\nb\n")).envelope()
        self.assertEqual(envelope, b'(NIL "hi" (("Ann B" NIL "ann" "x.test")) '
                                   b'(("Ann B" NIL "ann" "x.test")) (("Ann B" NIL "ann" "x.test")) '
                                   b'((NIL NIL "c" "y.test")(NIL NIL "d" "z.test")) '
                                   b'NIL NIL NIL "<1@x>")')


def candidate(seq=1, uid=10, flags=(), size=100,
              header=b"Subject: Hello World\r\nFrom: Ann <ann@x.test>\r\n\r\n", body=b""):
    return Candidate(seq, uid, set(flags), size, 1_700_000_000.0, Part(header + body))


class SearchTests(TestCase):
    def test_sets(self):
        self.assertEqual(parse_set(b"1:3,7,9:*"), [(1, 3), (7, 7), (9, None)])
        self.assertTrue(in_set(12, parse_set(b"9:*"), 20))
        self.assertTrue(in_set(20, parse_set(b"*:25"), 20))
        self.assertFalse(in_set(8, parse_set(b"9:*"), 20))
        for bad in (b"", b"0", b"1:2:3", b"a", b"1,,2"):
            self.assertRaises(SearchError, parse_set, bad)

    def test_keys(self):
        c = candidate(flags={"\\Seen"})
        self.assertTrue(matches([b"SUBJECT", b"world"], c, 1, 10))
        self.assertTrue(matches([b"FROM", b"ANN@X"], c, 1, 10))
        self.assertFalse(matches([b"UNSEEN"], c, 1, 10))
        self.assertTrue(matches([b"OR", b"UNSEEN", b"LARGER", b"50"], c, 1, 10))
        self.assertTrue(matches([b"NOT", [b"FLAGGED", b"SEEN"]], c, 1, 10))
        self.assertTrue(matches([b"UID", b"5:*"], c, 1, 10))
        self.assertTrue(matches([b"1"], c, 1, 10))
        self.assertTrue(matches([b"HEADER", b"subject", b"hello"], c, 1, 10))
        self.assertTrue(matches([b"SINCE", b"1-Jan-2020", b"BEFORE", b"1-Jan-2030"], c, 1, 10))
        self.assertTrue(matches([b"BODY", b"needle"], candidate(body=b"a NEEDLE here"), 1, 10))
        self.assertRaises(SearchError, matches, [b"BOGUS"], c, 1, 10)
        self.assertRaises(SearchError, matches, [b"SUBJECT"], c, 1, 10)
        self.assertRaises(SearchError, matches, [b"SINCE", b"31-Foo-2020"], c, 1, 10)

    def test_encoded_words(self):
        c = candidate(header=b"Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=\r\n\r\n")
        self.assertTrue(matches([b"SUBJECT", "grüße".encode()], c, 1, 10))

    def test_needs(self):
        self.assertEqual(needs([b"UNSEEN", b"UID", b"1:*"]), 0)
        self.assertEqual(needs([b"OR", b"FROM", b"x", b"SEEN"]), 1)
        self.assertEqual(needs([[b"TEXT", b"x"]]), 2)


class SearchDepthTests(TestCase):
    def test_depth(self):
        """
        What real clients send passes (Thunderbird's quick filter ORs four
        keys; keys with arguments named NOT or OR are arguments, not
        operators); thousands of NOT or OR levels are a L{SearchError}
        (BAD), measured without recursing, while as many ORs one after the
        other (each closed) are not deep at all.
        """
        check_depth([b"OR", b"OR", b"OR", b"FROM", b"x", b"TO", b"x", b"CC", b"x",
                     b"SUBJECT", b"x", b"UNDELETED"])
        check_depth([b"SUBJECT", b"NOT", b"BODY", b"OR", b"NOT", [b"NOT", b"SEEN"]])
        check_depth([b"OR", b"ALL", b"ALL"] * 5000)
        check_depth([b"NOT"] * 100 + [b"ALL"])
        self.assertRaises(SearchError, check_depth, [b"NOT"] * 101 + [b"ALL"])
        self.assertRaises(SearchError, check_depth, [b"OR", b"ALL"] * 3000 + [b"ALL"])
        nested: list = [b"ALL"]
        for _ in range(150):
            nested = [nested]
        self.assertRaises(SearchError, check_depth, nested)
        self.assertRaises(SearchError, check_depth, [b"OR", [b"NOT"] * 200 + [b"ALL"], b"ALL"])


class InterfaceTests(TestCase):
    def test_twisted_interfaces(self):
        """
        The Maildir classes provide Twisted's IMAP interfaces, so code
        written against Twisted's server can use them.
        """
        from twisted.mail import imap4
        from zope.interface.verify import verifyClass

        from mailstack.access.mailbox import MaildirAccount, MaildirMailbox, MaildirMessage
        self.assertTrue(verifyClass(imap4.IAccount, MaildirAccount))
        self.assertTrue(verifyClass(imap4.IMailbox, MaildirMailbox))
        self.assertTrue(verifyClass(imap4.ISearchableMailbox, MaildirMailbox))
        self.assertTrue(verifyClass(imap4.IMessage, MaildirMessage))
        self.assertTrue(verifyClass(imap4.IMessageFile, MaildirMessage))


class ResolveTests(TestCase):
    def test_sequence_sets(self):
        """
        UID sets are matched by bisection (so 1:4294967295 costs nothing),
        C{n:*} always includes the highest UID, sequence numbers are clamped.
        """
        from mailstack.access.folder import Entry
        from mailstack.access.mailbox import MaildirMailbox

        mbox = MaildirMailbox.__new__(MaildirMailbox)
        mbox.view = [Entry(uid, f"b{uid}", "cur", f"b{uid}:2,", 1) for uid in (3, 5, 9, 20)]

        def uids(ranges, uid):
            return [(seq, entry.uid) for seq, entry in mbox.resolve(ranges, uid)]

        self.assertEqual(uids(parse_set(b"4:*"), True), [(2, 5), (3, 9), (4, 20)])
        self.assertEqual(uids(parse_set(b"21:*"), True), [(4, 20)])
        self.assertEqual(uids(parse_set(b"1:4294967295"), True), [(1, 3), (2, 5), (3, 9), (4, 20)])
        self.assertEqual(uids(parse_set(b"6:8"), True), [])
        self.assertEqual(uids(parse_set(b"1:2,4,*"), False), [(1, 3), (2, 5), (4, 20)])
        self.assertEqual(uids(parse_set(b"3:1"), False), [(1, 3), (2, 5), (3, 9)])
        self.assertEqual(uids(parse_set(b"7:9"), False), [])
