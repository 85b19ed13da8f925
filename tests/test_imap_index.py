"""
The per-folder index of L{mailstack.access.index} (issue 18): used, never
trusted beyond what it was made from, rebuilt when lost, and giving the
same answers as reading the messages.
"""

import json
import os
import struct
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.mail import imap4
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.access import mailbox
from mailstack.access.folder import Folder, ensure_folder
from mailstack.access.imap import render
from mailstack.access.index import (
    INDEX, VERSION, CachedPart, FolderIndex, decode_records, encode_records, fetch_cacheable,
    indexes, make_record, search_cacheable,
)
from mailstack.access.mailbox import HEADER, Loaded
from mailstack.access.mime import Part
from mailstack.access.search import Candidate, SearchError, evaluate, matches
from tests.test_imap import IMAPTestMixin, deliver, ok

MESSAGES = [
    b"From: Bob <bob@remote.test>\r\nTo: alice@localhost\r\nSubject: invoice 1\r\n"
    b"Date: Mon, 2 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@remote.test>\r\n\r\nbody one\r\n",
    b"From: =?utf-8?q?J=C3=BCrgen?= <j@remote.test>\r\nTo: Friends: a@x.test, b@y.test;\r\n"
    b"Cc: carol@remote.test (Carol)\r\nSubject: =?utf-8?b?w6l0w6k=?=\r\n"
    b"References: <a@x>\r\n <b@y>\r\nIn-Reply-To: <b@y>\r\n\r\nbody two\r\n",
    b"From: dave@remote.test\r\nSubject: folded\r\n  subject line\r\nX-Other: not cached\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nbody three\r\n",
]


def parse_fetch(text):
    return imap4.IMAP4Server().arg_fetchatt(text)[0]


QUERIES = [
    b"ENVELOPE",
    b"(FLAGS UID ENVELOPE)",
    b"(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
    b"(BODY.PEEK[HEADER.FIELDS (To Cc Message-ID References In-Reply-To Content-Type)])",
    b"(UID RFC822.SIZE BODY.PEEK[HEADER.FIELDS (X-PRIORITY LIST-ID)] ENVELOPE)",
]


class CacheableTests(SynchronousTestCase):
    def test_fetch(self):
        for query in QUERIES:
            self.assertTrue(fetch_cacheable(parse_fetch(query)), query)
        for query in [b"BODY.PEEK[HEADER]", b"BODY.PEEK[HEADER.FIELDS (X-OTHER)]",
                      b"BODY.PEEK[HEADER.FIELDS.NOT (FROM)]", b"BODYSTRUCTURE",
                      b"RFC822.HEADER", b"BODY.PEEK[1]", b"BODY.PEEK[TEXT]"]:
            self.assertFalse(fetch_cacheable(parse_fetch(query)), query)

    def test_search(self):
        self.assertTrue(search_cacheable([b"SUBJECT", b"invoice", b"FROM", b"bob"]))
        self.assertTrue(search_cacheable([b"OR", b"TO", b"x", [b"HEADER", b"message-id", b"1"]]))
        self.assertFalse(search_cacheable([b"HEADER", b"X-Other", b"x"]))
        self.assertFalse(search_cacheable([b"NOT", [b"BODY", b"x"]]))
        self.assertFalse(search_cacheable([b"TEXT", b"x"]))


header_lines = st.lists(st.sampled_from([
    b"From: Bob <bob@remote.test>", b"From: =?utf-8?q?J=C3=BCrgen?= <j@x.test>",
    b"From: group: a@b.test, c@d.test;", b"To: alice@localhost", b"To:", b"Cc: x@y.test (X)",
    b"Bcc: secret@y.test", b"Subject: hello", b"Subject: =?utf-8?b?w6l0w6k=?=",
    b"Subject: folded\r\n  twice", b"Subject: \xc3\xa9t\xc3\xa9 8-bit",
    b"Date: Mon, 2 Nov 2026 10:00:00 +0000", b"Date: garbage", b"Message-ID: <a@b>",
    b"In-Reply-To: <x@y>", b"References: <a@x>\r\n <b@y>", b"Sender: s@x.test",
    b"Reply-To: r@x.test", b"X-Other: uncached", b"Received: from x by y",
    b"Content-Type: text/plain; charset=utf-8", b"X-Priority: 1", b"List-ID: <l.x.test>",
]), max_size=12)


COLUMN_QUERIES = [
    [b"SUBJECT", b"invoice"], [b"SUBJECT", b"\xc3\xa9t\xc3\xa9"], [b"FROM", b"bob"],
    [b"TO", b"alice"], [b"CC", b"x@y"], [b"BCC", b"secret"], [b"HEADER", b"Message-ID", b"a@b"],
    [b"HEADER", b"references", b"b@y"], [b"HEADER", b"subject", b""], [b"SUBJECT", None],
    [b"NOT", b"SUBJECT", b"invoice"], [b"OR", b"FROM", b"bob", b"TO", b"alice"],
    [b"SUBJECT", b"e", b"FROM", b"x"], [b"2:4", b"NOT", [b"SEEN", b"FROM", b"bob"]],
    [b"UID", b"20:40", b"OR", b"SUBJECT", b"twice", b"NOT", b"CC", b"x"],
    [b"ALL", b"SENTSINCE", b"1-Nov-2026", b"SUBJECT", b"hello"], [b"OR", b"ALL", b"SEEN"],
]


class SameAnswersTests(SynchronousTestCase):
    """
    A message served from its record answers as when read from its file.
    """

    def check(self, message):
        stat = os.stat(__file__)
        record = make_record(Part(message).header, stat, len(message))
        self.assertIsNotNone(record)
        full, cached = Part(message), CachedPart(record)
        entry = mailbox.Entry(7, "base", "cur", "base:2,", len(message), flags={"\\Seen"})
        for query in QUERIES:
            items = parse_fetch(query)
            self.assertEqual(render(Loaded(1, entry, cached, 0.0), items, False),
                             render(Loaded(1, entry, full, 0.0), items, False), query)
        for query in ([b"SUBJECT", b"invoice"], [b"SUBJECT", b"\xc3\xa9t\xc3\xa9"],
                      [b"FROM", b"bob"], [b"FROM", b"j\xc3\xbcrgen"], [b"TO", b"alice"],
                      [b"CC", b"x@y"], [b"BCC", b"secret"], [b"SENTSINCE", b"1-Nov-2026"],
                      [b"SENTBEFORE", b"1-Nov-2026"], [b"HEADER", b"message-id", b"a@b"],
                      [b"HEADER", b"references", b"b@y"], [b"SUBJECT", b"twice"]):
            expected = matches(query, Candidate(1, 7, set(), 10, 0.0, full), 1, 7)
            for _ in range(2):  # decoding, then the decoded texts kept
                self.assertEqual(
                    matches(query, Candidate(1, 7, set(), 10, 0.0, cached), 1, 7), expected,
                    query)

        fresh = make_record(Part(message).header, stat, len(message))  # nothing decoded yet
        self.check_columns(full, CachedPart(fresh))

    def check_columns(self, full, cached):
        """
        The column-wise evaluator (L{evaluate}) answers as L{matches} does
        message by message, for single keys and NOT/OR/AND combinations,
        over messages read from file, from their records and without a
        part, its columns made and then reused.
        """
        other = Part(b"Subject: Invoice 7\r\nFrom: bob@x.test\r\n\r\nbody\r\n")
        parts = [full, cached, None, other, cached]
        flags = [set(), {"\\Seen"}, set(), {"\\Seen"}, set()]
        candidates = [Candidate(n, 10 * n, flags[n - 1], 10, 0.0, part)
                      for n, part in enumerate(parts, 1)]
        columns = {}
        for query in COLUMN_QUERIES:
            # The columns made (from the record's own lines), then reused.
            got = [evaluate(query, candidates, len(parts), 10 * len(parts), columns)
                   for _ in range(2)]
            expected = [matches(query, c, len(parts), 10 * len(parts)) for c in candidates]
            self.assertEqual(got, [expected, expected], query)

    def test_table(self):
        for message in MESSAGES:
            self.check(message)

    def test_columns_follow_records(self):
        """
        Kept columns serve only the records they were made of: a message
        whose record was replaced (its file changed) is searched anew.
        """
        def cached(message):
            return CachedPart(make_record(Part(message).header, os.stat(__file__), len(message)))

        columns = {}
        first = [Candidate(1, 1, set(), 10, 0.0, cached(b"Subject: invoice\r\n\r\nx\r\n"))]
        self.assertEqual(evaluate([b"SUBJECT", b"invoice"], first, 1, 1, columns), [True])
        second = [Candidate(1, 1, set(), 10, 0.0, cached(b"Subject: other\r\n\r\nx\r\n"))]
        self.assertEqual(evaluate([b"SUBJECT", b"invoice"], second, 1, 1, columns), [False])
        self.assertEqual(evaluate([b"SUBJECT", b"invoice"], first, 1, 1, columns), [True])

    def test_needle_with_separator(self):
        """
        A needle holding the character that joins a field's values in a
        column matches no pair of values across their boundary.
        """
        message = b"To: a@x.test\r\nTo: b@y.test\r\n\r\nbody\r\n"
        record = make_record(Part(message).header, os.stat(__file__), len(message))
        candidates = [Candidate(1, 1, set(), 10, 0.0, CachedPart(record))]
        self.assertEqual(evaluate([b"TO", b"b@y.test"], candidates, 1, 1, {}), [True])
        self.assertEqual(evaluate([b"TO", b"x.test\x00b"], candidates, 1, 1, {}), [False])

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(header_lines)
    def test_varied(self, lines):
        self.check(b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n")

    def test_huge_header_not_cached(self):
        """
        A header longer than the parser reads is not cached (fields past
        the limit must stay invisible, as without the cache).
        """
        message = b"X-Pad: " + b"x" * 300000 + b"\r\nSubject: late\r\n\r\nbody\r\n"
        self.assertIsNone(make_record(Part(message).header, os.stat(__file__), len(message)))


def _folder(test, messages=MESSAGES):
    root = test.mktemp()
    os.makedirs(root)
    ensure_folder(root, subfolder=False)
    folder = Folder(root)
    for message in messages:
        folder.add(message.replace(b"\r\n", b"\n"), set())
    test.addCleanup(indexes.forget, root)
    return folder


class SearchFolderTests(SynchronousTestCase):
    """
    L{mailbox.search_folder} (what a session's SEARCH runs) answers as
    L{matches} does over every message read from its file, whichever
    messages the index knows, with its columns kept between searches.
    """

    def expected(self, folder, items, query, uid):
        found = []
        for seq, entry in items:
            with open(entry.path(folder.path), "rb") as f:
                part = Part(f.read().replace(b"\n", b"\r\n"))
            flags = set(entry.flags) | ({"\\Recent"} if entry.recent else set())
            candidate = Candidate(seq, entry.uid, flags, entry.size, 0.0, part)
            if matches(query, candidate, len(items), items[-1][1].uid):
                found.append(entry.uid if uid else seq)
        return found

    def check(self, messages, known, uid):
        folder = _folder(self, messages)
        items = list(enumerate(folder.scan().entries, 1))
        # The index knows the messages of `known` only; the others are read.
        mailbox.load(folder, [i for n, i in enumerate(items) if n in known], HEADER,
                     cached=True)
        columns = {}
        for query in COLUMN_QUERIES:
            expected = self.expected(folder, items, query, uid)
            for _ in range(2):  # the columns made (records made too), then reused
                self.assertEqual(mailbox.search_folder(folder, items, query, uid, columns),
                                 expected, query)

    def test_table(self):
        self.check(MESSAGES, {0, 2}, False)
        self.check(MESSAGES, set(range(len(MESSAGES))), True)

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(header_lines, min_size=1, max_size=5), st.sets(st.integers(0, 4)),
           st.booleans())
    def test_varied(self, headers, known, uid):
        self.check([b"".join(line + b"\r\n" for line in lines) + b"\r\nbody\r\n"
                    for lines in headers], known, uid)

    def test_malformed_before_reading(self):
        """
        A key lacking its argument is answered BAD even in an empty folder.
        """
        folder = _folder(self, [])
        for query in ([b"SUBJECT"], [b"HEADER", b"subject"], [b"NOT"], [b"OR", b"ALL"],
                      [b"SUBJECT", [b"x"]], [b"UID"]):
            self.assertRaises(SearchError, mailbox.search_folder, folder, [], query, False)


class IndexFileTests(SynchronousTestCase):
    def setUp(self):
        self.folder = _folder(self)
        self.opened = []
        real = mailbox.open_file

        def recording(path, *args, **kwargs):
            self.opened.append(path)
            return real(path, *args, **kwargs)

        self.patch(mailbox, "open_file", recording)

    def envelopes(self, cached=True):
        items = list(enumerate(self.folder.scan().entries, 1))
        loaded = mailbox.load(self.folder, items, HEADER, cached=cached, envelope=True)
        return [m.part.envelope() for m in loaded]

    def save(self):
        entries = self.folder.scan().entries
        indexes.get(self.folder.path).save([e.base for e in entries])

    def test_warm_opens_nothing(self):
        cold = self.envelopes()
        self.assertEqual(len(self.opened), len(MESSAGES))
        self.save()
        indexes.forget(self.folder.path)  # as in a new process: read from the file
        del self.opened[:]
        self.assertEqual(self.envelopes(), cold)
        self.assertEqual(self.opened, [])
        self.assertIn(b'"invoice 1"', cold[0])

    def test_owner_only(self):
        """
        The index holds header fields: it is the owner's alone (0600), as
        every other file of a mailbox, whatever the umask.
        """
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        self.envelopes()
        self.save()
        mode = os.stat(os.path.join(self.folder.path, INDEX)).st_mode
        self.assertEqual(mode & 0o777, 0o600)

    def test_not_used_unless_asked(self):
        self.envelopes()
        del self.opened[:]
        self.envelopes(cached=False)
        self.assertEqual(len(self.opened), len(MESSAGES))

    def test_replaced_file(self):
        """
        A message file replaced under the same name (another inode) is
        read again, and its record made anew.
        """
        self.envelopes()
        entry = self.folder.scan().entries[0]
        path = entry.path(self.folder.path)
        with open(path + ".new", "wb") as f:
            f.write(b"Subject: replaced\n\nbody\n")
        os.rename(path + ".new", path)
        del self.opened[:]
        envelopes = self.envelopes()
        self.assertEqual(self.opened, [path])
        self.assertIn(b'"replaced"', envelopes[0])
        del self.opened[:]
        self.assertIn(b'"replaced"', self.envelopes()[0])
        self.assertEqual(self.opened, [])

    def test_unknown_or_forged_record(self):
        """
        A record for another inode or size (a forged or stale file) is
        never used.
        """
        self.envelopes()
        self.save()
        path = os.path.join(self.folder.path, INDEX)
        with open(path, "rb") as f:
            records = decode_records(f.read())
        for record in records.values():
            record.envelope = b'("forged")'
        bases = sorted(records)
        records[bases[0]].inode += 1  # another inode
        records[bases[1]].size += 1  # another size
        with open(path, "wb") as f:
            f.write(encode_records(records))
        indexes.forget(self.folder.path)
        del self.opened[:]
        envelopes = self.envelopes()
        entries = self.folder.scan().entries
        by_base = {e.base: env for e, env in zip(entries, envelopes)}
        self.assertNotEqual(by_base[bases[0]], b'("forged")')
        self.assertNotEqual(by_base[bases[1]], b'("forged")')
        self.assertEqual(len(self.opened), 2)

    def test_rebuilt(self):
        """
        A corrupt, truncated, foreign or old-version index is an empty one:
        answers are read from the files and the index is written anew.
        """
        cold = self.envelopes()
        self.save()
        path = os.path.join(self.folder.path, INDEX)
        with open(path, "rb") as f:
            good = f.read()
        old = json.dumps({"version": 2, "messages": {}}).encode()  # the JSON of version 2
        magic = good[:good.index(b"\n") + 1]
        other_version = magic + struct.pack("<I", VERSION - 1) + good[len(magic) + 4:]
        flipped = good[:-3] + bytes([good[-3] ^ 1]) + good[-2:]  # the checksum fails
        for broken in [good[:len(good) // 2], good[:-1], good + b"x", b"\x00garbage", b"[]",
                       old, other_version, flipped, magic, b""]:
            with open(path, "wb") as f:
                f.write(broken)
            indexes.forget(self.folder.path)
            del self.opened[:]
            self.assertEqual(self.envelopes(), cold)
            self.assertEqual(len(self.opened), len(MESSAGES), broken[:20])
            self.save()
            with open(path, "rb") as f:
                self.assertEqual(decode_records(f.read()).keys(),
                                 {e.base for e in self.folder.scan().entries})

    def test_hostile_records(self):
        """
        Records whose lengths and counts lie (with a valid checksum) make
        the file an empty cache; a record whose time is no date
        (NaN, out of range) is dropped alone.  Never an exception.
        """
        self.envelopes()
        self.save()
        path = os.path.join(self.folder.path, INDEX)
        with open(path, "rb") as f:
            good = f.read()
        magic = good[:good.index(b"\n") + 1]
        head = len(magic) + 12

        def with_body(body, count):
            return magic + struct.pack("<III", VERSION, count, zlib.crc32(body)) + body

        records = decode_records(good)
        body = good[head:]
        fixed = struct.Struct("<QQdIB")
        size, inode, mtime, items, has_env = fixed.unpack_from(body, 0)
        lying = [
            with_body(body, len(records) + 1),  # one record more than there is
            with_body(fixed.pack(size, inode, mtime, 0xFFFFFFFF, has_env) + body[fixed.size:],
                      len(records)),  # items beyond the file
            with_body(fixed.pack(size, inode, mtime, items, 7) + body[fixed.size:],
                      len(records)),  # not a flag
            with_body(fixed.pack(size, inode, mtime, items + 1, has_env) + body[fixed.size:],
                      len(records)),  # an odd number of value items
            with_body(body[:fixed.size] + struct.pack("<I", 0xFFFFFFF0)
                      + body[fixed.size + 4:], len(records)),  # a length past the end
        ]
        for broken in lying:
            with self.assertRaises(ValueError):
                decode_records(broken)
            with open(path, "wb") as f:
                f.write(broken)
            self.assertEqual(FolderIndex(self.folder.path).records, {})
        for bad_time in (float("nan"), float("inf"), 1e300, -1e300):
            forged = dict(records)
            first = sorted(forged)[0]
            old = forged[first]
            forged[first] = type(old)(old.size, old.inode, bad_time, old.header, old.values,
                                      old.envelope)
            kept = decode_records(encode_records(forged))
            self.assertEqual(set(kept), set(records) - {first})

    def test_gone_dropped(self):
        self.envelopes()
        entries = self.folder.scan().entries
        self.folder.remove(entries[0])
        self.save()
        index = FolderIndex(self.folder.path)
        self.assertEqual(set(index.records), {e.base for e in entries[1:]})


class SessionIndexTests(IMAPTestMixin, TestCase):
    """
    Real sessions: the index answers a second session without opening
    files, with the same answers.
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, *MESSAGES)

    @inlineCallbacks
    def test_second_listing(self):
        opened = []
        real = mailbox.open_file

        def recording(path, *args, **kwargs):
            opened.append(path)
            return real(path, *args, **kwargs)

        self.patch(mailbox, "open_file", recording)

        def work(client):
            ok(client.select("INBOX"))
            first = ok(client.fetch("1:*", "(ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])"))
            found = ok(client.search(None, "SUBJECT", "invoice"))
            cold = len(opened)
            second = ok(client.fetch("1:*", "(ENVELOPE BODY.PEEK[HEADER.FIELDS (FROM SUBJECT)])"))
            again = ok(client.search(None, "SUBJECT", "invoice"))
            return first, second, found, again, cold, len(opened) - cold

        first, second, found, again, cold, warm = yield self.imap(work, implicit=True)
        self.assertEqual(first, second)
        self.assertEqual(found, again)
        self.assertEqual(found, [b"1"])
        self.assertEqual(cold, len(MESSAGES))
        self.assertEqual(warm, 0)
        root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        for _ in range(100):  # written in a worker thread once the FETCH was answered
            if os.path.exists(os.path.join(root, INDEX)):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertTrue(os.path.exists(os.path.join(root, INDEX)))
        for _ in range(100):  # the session's end, as the server sees it
            if not any(path.startswith(root) for path in indexes._items):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        # Nobody has the folder selected any more: its index left memory.
        self.assertEqual([p for p in indexes._items if p.startswith(root)], [])
