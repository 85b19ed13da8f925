"""
IMAP you can trust (issue 13): concurrent sessions never lose a flag
change, UIDs and UIDVALIDITY never name two messages, arrival order,
first logins in parallel, LOGOUT closing, keywords, and the conformance
cases an outside suite found.  Sessions are real imaplib (or raw TLS)
clients on 127.0.0.1.
"""

import imaplib
import os
import poplib
import re
import socket
import ssl
import threading
import time

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack.access.addresses import search_text
from mailstack.access.folder import KEYWORDS, MAX_KEYWORDS, Folder, ensure_folder
from mailstack.access.mime import Part
from mailstack.delivery.maildir import arrival_key, unique_name
from mailstack.safeio import atomic_write
from tests.support import add_user, client_context, in_thread, start_server
from tests.test_imap import LISTEN, PLAIN, IMAPTestMixin, deliver, ok

ENVELOPE_MESSAGE = (
    b"From: bob@remote.test (Bob Smith)\r\n"
    b"To: undisclosed-recipients:;\r\n"
    b"Cc: Friends: carol@remote.test, Dave (the boss) <dave@remote.test>;\r\n"
    b"Subject: grouped\r\n"
    b"X-Tag: first\r\n"
    b"X-Tag: second occurrence\r\n\r\nbody\r\n"
)


def session(test):
    """
    A second logged-in client over implicit TLS, as a phone beside a desktop.
    """
    client = imaplib.IMAP4_SSL("localhost", test.server.ports["imaps"],
                               ssl_context=test.context, timeout=30)
    client.login("alice@localhost", "alice-pw")
    return client


def flags_of(data):
    return set(re.search(rb"FLAGS \(([^)]*)\)", data[0]).group(1).decode().split())


class ConcurrentFlagTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN)

    @inlineCallbacks
    def test_two_sessions_keep_each_others_flags(self):
        """
        Item 1: A adds \\Answered, then B (whose view is older) removes
        \\Seen: both changes stay, and B's answer shows \\Answered.  The
        same for keywords added by each.
        """
        def work(a):
            ok(a.select("INBOX"))
            ok(a.store("1", "+FLAGS", "(\\Seen)"))
            b = session(self)
            try:
                ok(b.select("INBOX"))
                ok(a.store("1", "+FLAGS", "(\\Answered)"))
                answer = ok(b.store("1", "-FLAGS", "(\\Seen)"))
                ok(a.store("1", "+FLAGS", "($Label1)"))
                ok(b.store("1", "+FLAGS", "($Junk)"))
                a.noop()
                b.noop()
                return answer, ok(a.fetch("1", "(FLAGS)")), ok(b.fetch("1", "(FLAGS)"))
            finally:
                b.logout()

        answer, seen_a, seen_b = yield self.imap(work, implicit=True)
        self.assertIn("\\Answered", flags_of(answer))
        self.assertNotIn("\\Seen", flags_of(answer))
        expected = {"\\Answered", "$Label1", "$Junk"}
        self.assertEqual(flags_of(seen_a) - {"\\Recent"}, expected)
        self.assertEqual(flags_of(seen_b) - {"\\Recent"}, expected)


class UidTests(IMAPTestMixin, TestCase):
    def setUp(self):
        return self.start()

    @inlineCallbacks
    def test_uidvalidity_unique_after_delete_and_create(self):
        """
        Item 2: a folder deleted and created again at once (the same
        second) gets a new UIDVALIDITY, so its UID 1 cannot be confused
        with the old folder's UID 1.
        """
        def work(client):
            seen = []
            for _ in range(3):
                ok(client.create("Box"))
                ok(client.append("Box", None, None, PLAIN))
                status = ok(client.status("Box", "(UIDVALIDITY UIDNEXT)"))[0]
                seen.append(int(re.search(rb"UIDVALIDITY (\d+)", status).group(1)))
                ok(client.delete("Box"))
            return seen

        seen = yield self.imap(work)
        self.assertEqual(len(set(seen)), 3, seen)
        self.assertEqual(seen, sorted(seen))

    @inlineCallbacks
    def test_uid_not_reused_after_compaction(self):
        """
        Item 2: 1,200 messages expunged (the uid list is compacted), the
        next APPEND gets UID 1201 and UIDNEXT never goes down.
        """
        root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        os.makedirs(root)
        ensure_folder(root, subfolder=False)
        for _ in range(1200):  # delivered (unsynced: speed is all this needs)
            with open(os.path.join(root, "new", unique_name("mx.test", 16)), "wb") as f:
                f.write(b"Subject: bulk\n\nx\n")

        def work(client):
            ok(client.select("INBOX"))
            ok(client.store("1:*", "+FLAGS.SILENT", "(\\Deleted)"))
            ok(client.expunge())
            ok(client.close())
            before = ok(client.status("INBOX", "(UIDNEXT)"))[0]
            typ, data = client.append("INBOX", None, None, PLAIN)
            after = ok(client.status("INBOX", "(UIDNEXT)"))[0]
            return before, client.untagged_responses, data, after

        before, _, data, after = yield self.imap(work)
        self.assertIn(b"[APPENDUID", data[0])
        self.assertEqual(int(data[0].split()[2].rstrip(b"]")), 1201)
        self.assertIn(b"UIDNEXT 1201", before)
        self.assertIn(b"UIDNEXT 1202", after)
        with open(os.path.join(root, "mailstack-uidlist"), "rb") as f:
            self.assertLess(len(f.read().splitlines()), 10)  # it was compacted


class ArrivalOrderTests(TestCase):
    def test_names_padded(self):
        """
        Item 3: microseconds are six digits, so names sort by arrival.
        """
        early = unique_name("mx.test", 1, now=1000.0625)
        late = unique_name("mx.test", 1, now=1000.5)
        self.assertIn(".M062500P", early)
        self.assertLess(early, late)

    def test_old_names_ordered_by_number(self):
        """
        Unpadded names already on disk (and other writers') sort by the
        microseconds' value, not as text.
        """
        names = ["1000.M123456P9Q1.h", "1000.M98765P9Q2.h", "999.M5P1.h", "1000.M98765P9Q1.h"]
        self.assertEqual(sorted(names, key=arrival_key),
                         ["999.M5P1.h", "1000.M98765P9Q1.h", "1000.M98765P9Q2.h",
                          "1000.M123456P9Q1.h"])

    def test_uids_in_arrival_order(self):
        path = self.mktemp()
        ensure_folder(path, subfolder=False)
        for name in ("1000.M123456P9Q3.h,S=5", "1000.M98765P9Q2.h,S=5", "1000.M5P9Q1.h,S=5"):
            with open(os.path.join(path, "new", name), "wb") as f:
                f.write(b"x\n\nb\n")
        entries = Folder(path).scan().entries
        self.assertEqual([e.base.split("P")[0] for e in entries],
                         ["1000.M5", "1000.M98765", "1000.M123456"])
        self.assertEqual([e.uid for e in entries], [1, 2, 3])


class POP3OrderTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

    @inlineCallbacks
    def test_pop3_numbers_in_arrival_order(self):
        """
        Item 3: POP3 message numbers follow arrival within one second too.
        """
        root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        os.makedirs(root)
        ensure_folder(root, subfolder=False)
        for n, micros in enumerate((5, 98765, 123456), 1):
            name = f"1000.M{micros}P9Q{n}.h,S=9"
            with open(os.path.join(root, "new", name), "wb") as f:
                f.write(b"Subject: %d\n\nx\n" % n)

        def run():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=30)
            client.stls(context=self.context)
            client.user("alice@localhost")
            client.pass_("alice-pw")
            subjects = [client.top(i, 0)[1][0] for i in (1, 2, 3)]
            client.quit()
            return subjects

        subjects = yield in_thread(run)
        self.assertEqual(subjects, [b"Subject: 1", b"Subject: 2", b"Subject: 3"])


class TemporaryNameTests(TestCase):
    def test_concurrent_atomic_writes(self):
        """
        Item 4: two threads of one process rewriting the same file never
        share a temporary name (it was per process).
        """
        path = os.path.join(self.mktemp() + "-dir", "subscriptions")
        os.makedirs(os.path.dirname(path))
        errors = []

        def writer(tag):
            try:
                for i in range(300):
                    atomic_write(path, b"%s %d\n" % (tag, i))
            except OSError as e:
                errors.append(e)

        threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(errors, [])
        self.assertEqual(os.listdir(os.path.dirname(path)), ["subscriptions"])


class FirstLoginTests(IMAPTestMixin, TestCase):
    def setUp(self):
        return self.start()

    @inlineCallbacks
    def test_parallel_first_logins(self):
        """
        Item 4: two TLS connections of each of ten new users log in at the
        same moment; every login and LIST succeeds.
        """
        users = [f"new{i}@localhost" for i in range(10)]
        for user in users:
            add_user(self.server, user, "pw")

        def one(user, barrier, results):
            try:
                client = imaplib.IMAP4_SSL("localhost", self.server.ports["imaps"],
                                           ssl_context=self.context, timeout=30)
                barrier.wait(30)
                client.login(user, "pw")
                results.append(ok(client.list()))
                client.logout()
            except Exception as e:  # noqa: BLE001 - any failure is reported below with the user
                results.append(f"{user}: {e!r}")

        def run():
            results = []
            for user in users:
                barrier = threading.Barrier(2)
                threads = [threading.Thread(target=one, args=(user, barrier, results))
                           for _ in range(2)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            return results

        results = yield in_thread(run)
        failures = [r for r in results if isinstance(r, str)]
        self.assertEqual(failures, [])
        self.assertEqual(len(results), 20)


class LogoutTests(IMAPTestMixin, TestCase):
    def setUp(self):
        return self.start()

    @inlineCallbacks
    def test_logout_closes_without_client_close_notify(self):
        """
        Item 5: after BYE and the tagged OK the server closes the TCP
        connection even though this client never sends its TLS
        close_notify (the TLS is driven through memory buffers, so the
        socket sees exactly what the server does).
        """
        def run():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["imaps"]), 30)
            self.addCleanup(raw.close)
            incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
            tls = self.context.wrap_bio(incoming, outgoing, server_hostname="localhost")

            def pump():
                data = outgoing.read()
                if data:
                    raw.sendall(data)

            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    pump()
                    incoming.write(raw.recv(65536))
            pump()
            tls.write(b"a LOGIN alice@localhost alice-pw\r\nb LOGOUT\r\n")
            pump()
            text = b""
            raw.settimeout(15)
            started = time.monotonic()
            while True:
                try:
                    chunk = raw.recv(65536)
                except socket.timeout:
                    return text, None
                except ConnectionResetError:
                    chunk = b""  # closed hard after the deadline: closed all the same
                if not chunk:
                    raw.close()
                    return text, time.monotonic() - started
                incoming.write(chunk)
                try:
                    while True:
                        piece = tls.read(65536)
                        if not piece:
                            break
                        text += piece
                except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                    pass

        text, closed_after = yield in_thread(run)
        self.assertIn(b"* BYE", text)
        self.assertIn(b"b OK", text)
        self.assertIsNotNone(closed_after, "the server kept the connection open")
        self.assertLess(closed_after, 10)


class ConformanceTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, ENVELOPE_MESSAGE)

    @inlineCallbacks
    def test_envelope_groups_and_comments(self):
        def work(client):
            ok(client.select("INBOX"))
            return ok(client.fetch("1", "(ENVELOPE)"))[0]

        envelope = yield self.imap(work)
        self.assertIn(b'(("Bob Smith" NIL "bob" "remote.test"))', envelope)
        self.assertIn(b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL))', envelope)
        self.assertIn(b'((NIL NIL "Friends" NIL)(NIL NIL "carol" "remote.test")'
                      b'("Dave" NIL "dave" "remote.test")(NIL NIL NIL NIL))', envelope)

    @inlineCallbacks
    def test_search_addresses_headers_nil(self):
        def work(client):
            ok(client.select("INBOX"))
            return [ok(client.search(None, *keys))[0] for keys in (
                ("FROM", "bob@remote.test"),
                ("FROM", '"Bob Smith"'),
                ("CC", "friends"),
                ("HEADER", "X-Tag", '"second occurrence"'),
                ("SUBJECT", "NIL"),
                ("NOT", "SUBJECT", "NIL"),
            )]

        found = yield self.imap(work)
        self.assertEqual(found, [b"1", b"1", b"1", b"1", b"", b"1"])

    @inlineCallbacks
    def test_lsub_noselect_parent(self):
        def work(client):
            ok(client.create("Work.Projects"))
            ok(client.subscribe("Work.Projects"))  # "Work" itself is no folder
            return ok(client.lsub('""', "%")), ok(client.lsub('""', "Work.*"))

        top, below = yield self.imap(work)
        self.assertIn(b'(\\Noselect) "." "Work"', b"\n".join(top))
        self.assertIn(b'"Work.Projects"', b"\n".join(below))

    @inlineCallbacks
    def test_recent_for_append_and_copy(self):
        """
        Messages added by APPEND or COPY are \\Recent for the next session
        that selects the folder (STATUS RECENT, SEARCH RECENT and NEW).
        """
        def work(client):
            ok(client.create("Box"))
            ok(client.append("Box", None, None, PLAIN))
            ok(client.select("INBOX"))
            ok(client.copy("1", "Box"))
            status = ok(client.status("Box", "(RECENT)"))[0]
            ok(client.select("Box"))
            recent = ok(client.search(None, "RECENT"))[0]
            new = ok(client.search(None, "NEW"))[0]
            flags = ok(client.fetch("1:2", "(FLAGS)"))
            ok(client.close())
            later = ok(client.status("Box", "(RECENT)"))[0]
            return status, recent, new, flags, later

        status, recent, new, flags, later = yield self.imap(work)
        self.assertIn(b"RECENT 2", status)
        self.assertEqual((recent, new), (b"1 2", b"1 2"))
        self.assertTrue(all(b"\\Recent" in f for f in flags))
        self.assertIn(b"RECENT 0", later)


class KeywordTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN, PLAIN)

    @inlineCallbacks
    def test_keywords_kept_and_announced(self):
        """
        Item 7: PERMANENTFLAGS offers \\*; $Junk and $Label1 are stored as
        Maildir letters a-z named in mailstack-keywords, announced in FLAGS,
        searchable, and still there in a new session.
        """
        def work(client):
            typ, data = client.select("INBOX")
            permanent = client.untagged_responses.get("OK", [])
            ok(client.store("1", "+FLAGS", "($Junk $Label1)"))
            flags_update = client.untagged_responses.get("FLAGS", [])
            found = ok(client.search(None, "KEYWORD", "$junk"))[0]
            unfound = ok(client.search(None, "UNKEYWORD", "$Junk"))[0]
            client.logout()
            again = session(self)
            ok(again.select("INBOX"))
            fetched = ok(again.fetch("1", "(FLAGS)"))[0]
            again.logout()
            return permanent, flags_update, found, unfound, fetched

        permanent, flags_update, found, unfound, fetched = yield self.imap(work)
        self.assertTrue(any(b"PERMANENTFLAGS" in p and b"\\*" in p for p in permanent))
        self.assertTrue(any(b"$Junk" in f and b"$Label1" in f for f in flags_update))
        self.assertEqual((found, unfound), (b"1", b"2"))
        self.assertIn(b"$Junk", fetched)
        self.assertIn(b"$Label1", fetched)
        root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        with open(os.path.join(root, KEYWORDS), "rb") as f:
            self.assertEqual(f.read(), b"0 $Junk\n1 $Label1\n")
        self.assertTrue(any(name.endswith(":2,ab") or name.endswith("ab")
                            for name in os.listdir(os.path.join(root, "cur"))))

    @inlineCallbacks
    def test_keyword_limit(self):
        """
        The 27th keyword of a folder is refused with NO [LIMIT] and
        nothing changes; PERMANENTFLAGS then no longer offers \\*.
        """
        def work(client):
            ok(client.select("INBOX"))
            words = " ".join(f"$K{i}" for i in range(MAX_KEYWORDS))
            ok(client.store("1", "+FLAGS", f"({words})"))
            refused = client.store("2", "+FLAGS", "($OneTooMany \\Flagged)")
            flags = ok(client.fetch("2", "(FLAGS)"))[0]
            ok(client.select("INBOX"))
            return refused, flags, client.untagged_responses.get("OK", [])

        refused, flags, codes = yield self.imap(work)
        self.assertEqual(refused[0], "NO")
        self.assertIn(b"[LIMIT]", refused[1][0])
        self.assertNotIn(b"\\Flagged", flags)
        permanent = [c for c in codes if b"PERMANENTFLAGS" in c]
        self.assertTrue(permanent)
        self.assertNotIn(b"\\*", permanent[-1])

    @inlineCallbacks
    def test_bad_flags(self):
        """
        \\Recent, unknown system flags and non-atoms cannot be stored (BAD).
        """
        def work(client):
            ok(client.select("INBOX"))
            out = []
            for flags in ("(\\Recent)", "(\\Bogus)", "(a]b)"):
                try:
                    out.append(client.store("1", "+FLAGS", flags)[0])
                except imaplib.IMAP4.error as e:
                    out.append("BAD" if "BAD" in str(e) else str(e))
            out.append(flags_of(ok(client.fetch("1", "(FLAGS)"))))
            return out

        answers = yield self.imap(work)
        self.assertEqual(answers[:3], ["BAD", "BAD", "BAD"])
        self.assertEqual(answers[3] - {"\\Recent"}, set())


class MimeConformanceTests(TestCase):
    def test_part_of_top_level_message_rfc822(self):
        """
        BODY[1.1] of a message whose body is a message/rfc822 is the first
        part of the inner message, not the whole of it.
        """
        inner = (b'Content-Type: multipart/alternative; boundary="B"\r\n\r\n'
                 b"--B\r\nContent-Type: text/plain\r\n\r\none\r\n"
                 b"--B\r\nContent-Type: text/html\r\n\r\n<b>two</b>\r\n--B--\r\n")
        part = Part(b"Content-Type: message/rfc822\r\n\r\n" + inner)
        self.assertEqual(part.section((1,), ""), inner)
        self.assertEqual(part.section((1, 1), ""), b"one")
        self.assertEqual(part.section((1, 2), ""), b"<b>two</b>")
        self.assertEqual(part.section((1,), "HEADER"),
                         b'Content-Type: multipart/alternative; boundary="B"\r\n\r\n')

    def test_folded_and_missing_boundary(self):
        folded = Part(b'Content-Type: multipart/mixed; boundary="foo\r\n bar"\r\n\r\n'
                      b"--foo bar\r\nContent-Type: text/x-myown; charset=us-ascii\r\n\r\n"
                      b"hello\r\n\r\n--foo bar--\r\n")
        self.assertEqual(folded.bodystructure(False),
                         b'(("TEXT" "X-MYOWN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 7 1) "MIXED")')
        self.assertEqual(folded.section((1,), ""), b"hello\r\n")
        missing = Part(b'Content-Type: multipart/mixed; boundary="YY"\r\n\r\n'
                       b"text\r\n--XX\r\n\r\nhi\r\n")
        self.assertEqual(missing.bodystructure(False),
                         b'(("TEXT" "PLAIN" NIL NIL NIL "7BIT" 18 4) "MIXED")')
        self.assertEqual(missing.section((1,), ""), b"text\r\n--XX\r\n\r\nhi\r\n")
        no_parameter = Part(b"Content-Type: multipart/mixed\r\n\r\ntext\r\n")
        self.assertTrue(no_parameter.bodystructure(False).startswith(b'("TEXT" "PLAIN"'))

    def test_envelope_addresses(self):
        part = Part(b"From: user@domain (Real Name)\r\n"
                    b"To: group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;\r\n"
                    b"Cc: group:;, group2: (foo) ;\r\nSender: \r\n"
                    b"Reply-To: <@route:user@domain>\r\n\r\n")
        envelope = part.envelope()
        self.assertIn(b'(("Real Name" NIL "user" "domain")) (("Real Name" NIL "user" "domain"))',
                      envelope)
        self.assertIn(b'((NIL "@route" "user" "domain"))', envelope)
        self.assertIn(b'((NIL NIL "group" NIL)(NIL NIL "g1" "d1.org")(NIL NIL "g2" "d2.org")'
                      b'(NIL NIL NIL NIL)(NIL NIL "group2" NIL)(NIL NIL "g3" "d3.org")'
                      b'(NIL NIL NIL NIL))', envelope)
        self.assertIn(b'((NIL NIL "group" NIL)(NIL NIL NIL NIL)(NIL NIL "group2" NIL)'
                      b'(NIL NIL NIL NIL))', envelope)
        self.assertEqual(search_text('<user-from (comment)@ (comment) domain.org>'),
                         "<user-from@domain.org>")
