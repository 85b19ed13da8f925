"""
IMAP over the Maildirs, with imaplib (and raw sockets where imaplib cannot
say it) over real TLS on 127.0.0.1 port 0.
"""

import imaplib
import os
import re
import socket
import time

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailstack.access.folder import UIDLIST
from mailstack.access.imap import IMAPFactory
from mailstack.access.limits import AccessLimits
from tests.support import (
    add_user, client_context, in_thread, maildir_files, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"

PLAIN = (b"From: Bob <bob@remote.test>\r\nTo: alice@localhost\r\nSubject: hello\r\n\r\n"
         b"first\r\n.\r\nlast\r\n")
MULTIPART = (
    b"From: Carol <carol@remote.test>\r\nTo: alice@localhost\r\nSubject: parts\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"XX\"\r\n\r\n"
    b"preamble\r\n--XX\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nhi there\r\n"
    b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=\"a.bin\"\r\n\r\nAAEC\r\n--XX--\r\n"
)


def deliver(server, *messages, to="alice@localhost"):
    def send(client):
        for message in messages:
            client.sendmail("bob@remote.test", [to], message)
    return in_thread(smtp_session, server.ports["smtp"], send)


def stored(server, uid_order=True):
    """
    The stored messages of alice's INBOX (new/ and cur/), as IMAP serves them.
    """
    root = os.path.join(server.data_dir, "mail", "localhost", "alice")
    found = []
    for sub in ("new", "cur"):
        for name in os.listdir(os.path.join(root, sub)):
            with open(os.path.join(root, sub, name), "rb") as f:
                found.append((name, f.read().replace(b"\n", b"\r\n")))
    return sorted(found)


class IMAPTestMixin:
    @inlineCallbacks
    def start(self, data_dir=None):
        options = {"smtp": LISTEN, "imap": LISTEN, "imaps": LISTEN}
        if data_dir:
            options["data_dir"] = data_dir
        self.server = yield start_server(self, **options)
        if not data_dir:
            add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

    def imap(self, actions, tls=True, login=True, implicit=False):
        """
        Run C{actions(client)} in a thread with a logged-in imaplib client.
        """
        def run():
            if implicit:
                client = imaplib.IMAP4_SSL("localhost", self.server.ports["imaps"],
                                           ssl_context=self.context, timeout=30)
            else:
                client = imaplib.IMAP4("localhost", self.server.ports["imap"], timeout=30)
                if tls:
                    client.starttls(ssl_context=self.context)
            try:
                if login:
                    client.login("alice@localhost", "alice-pw")
                return actions(client)
            finally:
                try:
                    client.logout()
                except (imaplib.IMAP4.error, OSError):
                    pass
        return in_thread(run)


class RawSession:
    """
    A logged-in IMAPS session on a raw TLS socket, for what imaplib cannot
    say (IDLE, pipelining, malformed commands).
    """

    def __init__(self, server, context, select=True):
        raw = socket.create_connection(("127.0.0.1", server.ports["imaps"]), 30)
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.tls.makefile("rb")
        self.reader.readline()  # greeting
        if select:
            self.send(b"a LOGIN alice@localhost alice-pw\r\nb SELECT INBOX\r\n")
            self.until(b"b ")

    def send(self, data):
        self.tls.sendall(data)

    def until(self, prefix):
        """
        Read lines until one starts with C{prefix}; all of them.
        """
        lines = []
        while not lines or not lines[-1].startswith(prefix):
            line = self.reader.readline()
            if not line:
                break
            lines.append(line)
        return lines

    def close(self):
        self.tls.close()


def ok(result):
    typ, data = result
    if typ != "OK":
        raise AssertionError(f"{typ} {data}")
    return data


def fetch_parts(data):
    """
    imaplib's FETCH answer as {seq: {item: value}} for literal items.
    """
    out = {}
    seq = None
    for item in data:
        if isinstance(item, tuple):
            head, value = item
            if head[:1].isdigit():
                seq = int(head.split()[0])
            name = re.search(rb"([A-Z0-9.]+(?:\[[^\]]*\])?(?:<\d+>)?) \{\d+\}$", head).group(1)
            out.setdefault(seq, {})[name] = value
    return out


class LoginTests(IMAPTestMixin, TestCase):
    def setUp(self):
        return self.start()

    @inlineCallbacks
    def test_login_disabled_before_starttls(self):
        """
        In clear text the server offers STARTTLS and LOGINDISABLED, no AUTH
        mechanism, and refuses LOGIN; after STARTTLS it offers AUTH=PLAIN and
        LOGIN works.
        """
        def probe(client):
            before = client.capabilities
            try:
                client.login("alice@localhost", "alice-pw")
                refused = None
            except imaplib.IMAP4.error as e:
                refused = str(e)
            client.starttls(ssl_context=self.context)
            after = client.capabilities
            ok(client.login("alice@localhost", "alice-pw"))
            return before, refused, after

        before, refused, after = yield self.imap(probe, tls=False, login=False)
        self.assertIn("STARTTLS", before)
        self.assertIn("LOGINDISABLED", before)
        self.assertFalse([c for c in before if c.startswith("AUTH=")])
        self.assertIn("PRIVACYREQUIRED", refused)
        self.assertIn("AUTH=PLAIN", after)
        self.assertNotIn("LOGINDISABLED", after)

    @inlineCallbacks
    def test_implicit_tls_and_wrong_password(self):
        """
        IMAPS logs in with the right password only; AUTHENTICATE PLAIN works.
        """
        def probe(client):
            try:
                client.login("alice@localhost", "wrong")
                wrong = None
            except imaplib.IMAP4.error as e:
                wrong = str(e)
            ok(client.authenticate("PLAIN", lambda _: b"\0alice@localhost\0alice-pw"))
            return wrong, ok(client.select("INBOX"))

        wrong, exists = yield self.imap(probe, login=False, implicit=True)
        self.assertIn("failed", wrong)
        self.assertEqual(exists, [b"0"])

    @inlineCallbacks
    def test_failed_logins_throttled(self):
        """
        Wrong passwords count towards SMTP AUTH's throttle: answers slow
        down, and at its limit the client is refused (even with the right
        password) and disconnected.
        """
        self.server.throttle.max_delay = 0.01  # the schedule, compressed

        def probe(client):
            answers = []
            for i in range(self.server.throttle.limit):
                try:
                    client.login("alice@localhost", f"wrong{i}")
                except imaplib.IMAP4.error as e:
                    answers.append(str(e))
            try:
                client.login("alice@localhost", "alice-pw")
            except (imaplib.IMAP4.error, OSError) as e:
                answers.append(str(e))
            return answers

        answers = yield self.imap(probe, login=False, implicit=True)
        self.assertEqual(len(answers), self.server.throttle.limit + 1)
        self.assertTrue(all("failed" in a for a in answers[:-1]), answers)
        self.assertIn("UNAVAILABLE", answers[-1])

    @inlineCallbacks
    def test_starttls_injection(self):
        """
        A command sent in the same packet as STARTTLS, in clear text, is
        dropped: it never runs inside the TLS session.
        """
        def probe():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["imap"]), 30)
            raw.recv(4096)  # greeting
            raw.sendall(b"a STARTTLS\r\nb LOGIN alice@localhost alice-pw\r\n")
            reply = b""
            while not reply.endswith(b"\r\n"):
                reply += raw.recv(1)
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(b"c CAPABILITY\r\n")
            answer = b""
            while b"c OK" not in answer:
                chunk = tls.recv(4096)
                if not chunk:
                    break
                answer += chunk
            tls.close()
            return reply, answer

        reply, answer = yield in_thread(probe)
        self.assertTrue(reply.startswith(b"a OK"))
        self.assertNotIn(b"b OK", answer)
        self.assertNotIn(b"b NO", answer)
        self.assertIn(b"c OK", answer)

    @inlineCallbacks
    def test_special_folders(self):
        """
        The first login creates Sent, Drafts, Trash and Junk, listed with
        their SPECIAL-USE attributes and subscribed.
        """
        def probe(client):
            return ok(client.list()), ok(client.lsub()), client.capabilities

        listing, subscribed, caps = yield self.imap(probe)
        text = b"\n".join(listing)
        for name, attribute in ((b"Sent", b"\\Sent"), (b"Drafts", b"\\Drafts"),
                                (b"Trash", b"\\Trash"), (b"Junk", b"\\Junk")):
            self.assertRegex(text, rb"\(.*" + re.escape(attribute) + rb'.*\) "\." "?' + name)
        self.assertIn(b"INBOX", text)
        self.assertEqual(len(subscribed), 5)
        self.assertIn("SPECIAL-USE", caps)


class ReadingTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN, MULTIPART)

    @inlineCallbacks
    def test_fetch_byte_exact(self):
        """
        BODY[] is the stored message with CRLF, RFC822.SIZE its length; the
        header fields and parts are the exact bytes; BODY.PEEK leaves \\Seen
        unset and BODY[] sets it.
        """
        def read(client):
            ok(client.select("INBOX"))
            peek = ok(client.fetch("1:2", "(RFC822.SIZE BODY.PEEK[] FLAGS)"))
            fields = ok(client.fetch("2", "(BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])"))
            part = ok(client.fetch("2", "(BODY.PEEK[2] BODY.PEEK[1.MIME])"))
            flags_after_peek = ok(client.fetch("1", "(FLAGS)"))
            ok(client.fetch("1", "(BODY[TEXT])"))
            flags_after_read = ok(client.fetch("1", "(FLAGS)"))
            return peek, fields, part, flags_after_peek, flags_after_read

        peek, fields, part, before, after = yield self.imap(read)
        files = stored(self.server)
        bodies = fetch_parts(peek)
        self.assertEqual(bodies[1][b"BODY[]"], PLAIN_RECEIVED(files, b"hello"))
        self.assertEqual(bodies[2][b"BODY[]"], PLAIN_RECEIVED(files, b"parts"))
        sizes = re.findall(rb"RFC822.SIZE (\d+)", b" ".join(
            x[0] if isinstance(x, tuple) else x for x in peek))
        self.assertEqual([int(s) for s in sizes],
                         [len(bodies[1][b"BODY[]"]), len(bodies[2][b"BODY[]"])])
        self.assertEqual(fetch_parts(fields)[2][b"BODY[HEADER.FIELDS (SUBJECT FROM)]"],
                         b"From: Carol <carol@remote.test>\r\nSubject: parts\r\n\r\n")
        parts = fetch_parts(part)[2]
        self.assertEqual(parts[b"BODY[2]"], b"AAEC")
        self.assertEqual(parts[b"BODY[1.MIME]"],
                         b"Content-Type: text/plain; charset=utf-8\r\n\r\n")
        self.assertNotIn(b"\\Seen", before[0])
        self.assertIn(b"\\Seen", after[0])

    @inlineCallbacks
    def test_structure_and_envelope(self):
        def read(client):
            ok(client.select("INBOX"))
            return ok(client.fetch("2", "(BODYSTRUCTURE ENVELOPE INTERNALDATE)"))

        data = yield self.imap(read)
        line = data[0]
        self.assertIn(b'("TEXT" "PLAIN" ("CHARSET" "utf-8") NIL NIL "7BIT" 8 1', line)
        self.assertIn(b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "BASE64" 4', line)
        self.assertIn(b'("ATTACHMENT" ("FILENAME" "a.bin"))', line)
        self.assertIn(b'"MIXED" ("BOUNDARY" "XX")', line)
        self.assertIn(b'"parts" (("Carol" NIL "carol" "remote.test"))', line)
        self.assertRegex(
            line, rb'INTERNALDATE "[ \d]\d-[A-Z][a-z]{2}-\d{4} \d\d:\d\d:\d\d [+-]\d{4}"')

    @inlineCallbacks
    def test_search(self):
        def search(client):
            ok(client.select("INBOX"))
            ok(client.store("1", "+FLAGS", "(\\Flagged)"))
            return (ok(client.search(None, "FROM", "carol")),
                    ok(client.search(None, "SUBJECT", "HELLO")),
                    ok(client.search(None, "FLAGGED")),
                    ok(client.search(None, "OR", "FLAGGED", "BODY", "there")),
                    ok(client.search(None, "NOT", "FLAGGED", "LARGER", "10")),
                    ok(client.uid("SEARCH", "ALL")),
                    ok(client.search(None, "TEXT", "nowhere")))

        results = yield self.imap(search)
        self.assertEqual([r[0] for r in results[:5]], [b"2", b"1", b"1", b"1 2", b"2"])
        self.assertEqual(len(results[5][0].split()), 2)
        self.assertEqual(results[6], [b""])

    @inlineCallbacks
    def test_flags_uids_survive_restart(self):
        """
        \\Seen stored, the service restarted: flags, UIDs and UIDVALIDITY
        are unchanged.
        """
        def mark(client):
            ok(client.select("INBOX"))
            ok(client.store("2", "+FLAGS", "(\\Seen \\Answered)"))
            return (ok(client.fetch("1:2", "(UID FLAGS)")),
                    client.untagged_responses.get("UIDVALIDITY"),
                    ok(client.status("INBOX", "(UIDVALIDITY UIDNEXT)")))

        def again(client):
            ok(client.select("INBOX"))
            return (ok(client.fetch("1:2", "(UID FLAGS)")),
                    client.untagged_responses.get("UIDVALIDITY"),
                    ok(client.status("INBOX", "(UIDVALIDITY UIDNEXT)")))

        first = yield self.imap(mark)
        data_dir = self.server.data_dir
        yield self.server.stopService()
        yield self.start(data_dir=data_dir)
        second = yield self.imap(again)
        # \\Recent belongs to the first session that saw the messages.
        self.assertEqual(re.sub(rb" ?\\\\Recent", b"", repr(first).encode()),
                         repr(second).encode())
        self.assertIn(b"\\Answered \\Seen", first[0][1])

    @inlineCallbacks
    def test_copy_move_expunge(self):
        """
        COPY to Trash (COPYUID), \\Deleted and EXPUNGE remove the file; UID
        MOVE to Junk reports the EXPUNGE; the copies are in their folders.
        """
        def work(client):
            ok(client.select("INBOX"))
            copied = client.copy("1", "Trash")
            ok(client.store("1", "+FLAGS", "(\\Deleted)"))
            expunged = ok(client.expunge())
            uid = ok(client.fetch("1", "(UID)"))[0]
            uid = re.search(rb"UID (\d+)", uid).group(1).decode()
            moved = client.uid("MOVE", uid, "Junk")
            left = ok(client.select("INBOX"))
            trash = ok(client.select("Trash"))
            body = ok(client.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])"))
            junk = ok(client.select("Junk"))
            return copied, expunged, moved, client._untagged_response, left, trash, body, junk

        copied, expunged, moved, _, left, trash, body, junk = yield self.imap(work)
        self.assertEqual(copied[0], "OK")
        self.assertIn(b"COPYUID", copied[1][0])
        self.assertEqual(expunged, [b"1"])
        self.assertEqual(moved[0], "OK")
        self.assertEqual(left, [b"0"])
        self.assertEqual(trash, [b"1"])
        self.assertEqual(junk, [b"1"])
        self.assertIn(b"Subject: hello", body[0][1])
        self.assertEqual(maildir_files(self.server, "alice@localhost", "cur"), [])

    @inlineCallbacks
    def test_append_to_sent(self):
        """
        APPEND to Sent answers APPENDUID; SELECT Sent finds the message
        byte-exact with its flag; the file is stored with LF endings.
        """
        message = b"From: alice@localhost\r\nSubject: sent\r\n\r\nbody\r\n"

        def work(client):
            appended = client.append("Sent", "(\\Seen)", '"17-Jul-1996 02:44:25 -0700"',
                                     message)
            ok(client.select("Sent"))
            date = ok(client.fetch("1", "(INTERNALDATE)"))
            return appended, ok(client.fetch("1", "(FLAGS BODY.PEEK[])")), date

        appended, fetched, date = yield self.imap(work)
        self.assertEqual(time.mktime(imaplib.Internaldate2tuple(date[0])), 837596665.0)
        self.assertEqual(appended[0], "OK")
        self.assertRegex(appended[1][0], rb"\[APPENDUID \d+ 1\]")
        self.assertEqual(fetched[0][1], message)
        self.assertIn(b"\\Seen", fetched[0][0])
        sent = os.path.join(self.server.data_dir, "mail", "localhost", "alice", ".Sent", "cur")
        names = os.listdir(sent)
        self.assertEqual(len(names), 1)
        self.assertTrue(names[0].endswith(":2,S"))
        with open(os.path.join(sent, names[0]), "rb") as f:
            self.assertEqual(f.read(), message.replace(b"\r\n", b"\n"))

    @inlineCallbacks
    def test_examine_is_read_only(self):
        """
        EXAMINE leaves new/ alone, refuses STORE, EXPUNGE and MOVE, and
        BODY[] does not set \\Seen there.
        """
        def work(client):
            ok(client.select("INBOX", readonly=True))  # EXAMINE
            refused = [client.store("1", "+FLAGS", "(\\Deleted)")[0], client.expunge()[0],
                       client.uid("MOVE", "1:*", "Trash")[0]]
            ok(client.fetch("1", "(BODY[])"))
            return refused, ok(client.fetch("1", "(FLAGS)"))

        refused, flags = yield self.imap(work)
        self.assertEqual(refused, ["NO", "NO", "NO"])
        self.assertNotIn(b"\\Seen", flags[0])
        self.assertEqual(len(maildir_files(self.server, "alice@localhost", "new")), 2)

    @inlineCallbacks
    def test_append_to_missing_folder(self):
        def work(client):
            return client.append("Nowhere", None, None, b"Subject: x\r\n\r\ny\r\n")
        typ, data = yield self.imap(work)
        self.assertEqual(typ, "NO")
        self.assertIn(b"TRYCREATE", data[0])

    @inlineCallbacks
    def test_folders_create_rename_delete(self):
        def work(client):
            ok(client.create("Projects"))
            ok(client.create("Projects.2026"))
            ok(client.rename("Projects", "Work"))
            names = ok(client.list('""', "Work*"))
            bad = client.create("../../etc")
            ok(client.delete("Work.2026"))
            return names, bad, ok(client.list('""', "%"))

        names, bad, top = yield self.imap(work)
        self.assertEqual(len(names), 2)
        self.assertIn(b"\\HasChildren", names[0])
        self.assertEqual(bad[0], "NO")
        self.assertIn(b"Work", b"\n".join(top))
        self.assertNotIn(b"Projects", b"\n".join(top))


    @inlineCallbacks
    def test_rename_under_itself_refused(self):
        """
        RENAME of a folder into its own subtree is NO and changes nothing
        (it moved the children under themselves: A.B.C became A.B.X.C).
        """
        def work(client):
            ok(client.create("A"))
            ok(client.create("A.B"))
            ok(client.create("A.B.C"))
            refused = client.rename("A.B", "A.B.X")
            return refused, ok(client.list('""', "A*"))

        refused, names = yield self.imap(work)
        self.assertEqual(refused[0], "NO")
        self.assertIn(b"under itself", refused[1][0])
        self.assertEqual(sorted(n.rsplit(b" ", 1)[1] for n in names),
                         [b'"A"', b'"A.B"', b'"A.B.C"'])

def PLAIN_RECEIVED(files, subject):
    """
    The stored file (as served) whose Subject is C{subject}.
    """
    for _, content in files:
        if b"\r\nSubject: " + subject + b"\r\n" in content:
            return content
    raise AssertionError(subject)


class ConcurrencyTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN, PLAIN)

    @inlineCallbacks
    def test_idle_reports_delivery(self):
        """
        A delivery made during IDLE is reported as EXISTS while idling.
        """
        def idle():
            session = RawSession(self.server, self.context)
            session.send(b"c IDLE\r\n")
            self.assertTrue(session.reader.readline().startswith(b"+"))
            started = time.monotonic()
            smtp_session(self.server.ports["smtp"], lambda c: c.sendmail(
                "bob@remote.test", ["alice@localhost"], b"Subject: during idle\r\n\r\nx\r\n"))
            line = session.reader.readline()
            waited = time.monotonic() - started
            session.send(b"DONE\r\n")
            done = session.until(b"c ")[-1]
            session.close()
            return line, done, waited

        line, done, waited = yield in_thread(idle)
        self.assertEqual(line, b"* 3 EXISTS\r\n")
        self.assertTrue(done.startswith(b"c OK"))

    @inlineCallbacks
    def test_other_session_changes(self):
        """
        One session expunges and flags; another session, still selected,
        learns it at NOOP as EXPUNGE, EXISTS and FETCH FLAGS, and no command
        fails on the vanished message.
        """
        def work(first):
            ok(first.select("INBOX"))
            second = imaplib.IMAP4_SSL("localhost", self.server.ports["imaps"],
                                       ssl_context=self.context, timeout=30)
            second.login("alice@localhost", "alice-pw")
            ok(second.select("INBOX"))
            ok(second.store("1", "+FLAGS", "(\\Deleted)"))
            ok(second.expunge())
            ok(second.store("1", "+FLAGS", "(\\Flagged)"))
            second.logout()
            stale = first.fetch("1:2", "(BODY.PEEK[])")
            first.noop()
            expunges = first.untagged_responses.pop("EXPUNGE", None)
            fetches = first.untagged_responses.pop("FETCH", None)
            return stale, expunges, fetches, ok(first.fetch("1", "(FLAGS)"))

        stale, expunges, fetches, flags = yield self.imap(work)
        self.assertEqual(stale[0], "NO")
        self.assertEqual(expunges, [b"1"])
        self.assertIn(b"\\Flagged", flags[0])

    @inlineCallbacks
    def test_selected_folder_renamed_or_deleted(self):
        """
        A session whose selected folder another session renames or deletes
        is told so with a BYE and closed (Dovecot's answer), instead of a
        C{NO [SERVERBUG]} storage error at every later command; one idling
        in a folder deleted meanwhile is told at once (it was told nothing,
        and a traceback was logged).
        """
        def work(client):
            answers = []
            for name, change in (("Box", lambda: ok(client.rename("Box", "Moved"))),
                                 ("Gone", lambda: ok(client.delete("Gone")))):
                ok(client.create(name))
                ok(client.append(name, None, None, b"Subject: x\r\n\r\nx\r\n"))
                session = RawSession(self.server, self.context, select=False)
                session.send(b"a LOGIN alice@localhost alice-pw\r\nb SELECT " + name.encode()
                             + b"\r\n")
                session.until(b"b ")
                change()
                session.send(b"c NOOP\r\nd NOOP\r\n")
                answers.append(session.until(b"d "))
                answers[-1].append(session.reader.read())  # the server closes
                session.close()
            # Deleted while the other session idles in it: told at once.
            ok(client.create("Idle"))
            session = RawSession(self.server, self.context, select=False)
            session.send(b"a LOGIN alice@localhost alice-pw\r\nb SELECT Idle\r\n")
            session.until(b"b ")
            session.send(b"c IDLE\r\n")
            self.assertTrue(session.reader.readline().startswith(b"+"))
            ok(client.delete("Idle"))
            answers.append([session.reader.readline(), session.reader.read()])
            session.close()
            return answers

        factory = self.server.getServiceNamed("imaps").factory
        while not isinstance(factory, IMAPFactory):  # inside the limits and TLS
            factory = factory.wrappedFactory
        # Closed sessions are cut soon after their BYE (default 10 s): the
        # server reads nothing more, so it never sees the client's close.
        factory.limits = AccessLimits(close_grace=0.1)
        sessions = []
        build = factory.buildProtocol
        factory.buildProtocol = lambda addr: sessions.append(build(addr)) or sessions[-1]
        answers = yield self.imap(work)
        for _ in range(200):
            if all(session._lost for session in sessions):
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(len(sessions), 3)
        for lines in answers:
            self.assertTrue(lines[0].startswith(b"* BYE"), lines)
            self.assertEqual(lines[1:], [b""], lines)
            self.assertNotIn(b"SERVERBUG", b"".join(lines))

    @inlineCallbacks
    def test_pipelined_commands_answered_in_order(self):
        def probe():
            session = RawSession(self.server, self.context, select=False)
            session.send(b"a LOGIN alice@localhost alice-pw\r\nb SELECT INBOX\r\n"
                         b"c FETCH 1:* (UID)\r\nd STORE 1 +FLAGS (\\Seen)\r\ne LOGOUT\r\n")
            tags = [line[:4] for line in session.until(b"e ")
                    if line[:1] in b"abcde" and line[1:2] == b" "]
            session.close()
            return tags

        tags = yield in_thread(probe)
        self.assertEqual(tags, [b"a OK", b"b OK", b"c OK", b"d OK", b"e OK"])


class UidListTests(IMAPTestMixin, TestCase):
    def setUp(self):
        return self.start()

    @inlineCallbacks
    def test_corrupt_uidlist_new_validity_no_reuse(self):
        """
        A corrupt uid list is rebuilt with a new UIDVALIDITY.
        """
        yield deliver(self.server, PLAIN)

        def status(client):
            return ok(client.status("INBOX", "(UIDVALIDITY UIDNEXT MESSAGES)"))[0]

        before = yield self.imap(status)
        path = os.path.join(self.server.data_dir, "mail", "localhost", "alice", UIDLIST)
        with open(path, "wb") as f:
            f.write(b"garbage\n")
        after = yield self.imap(status)
        old = int(re.search(rb"UIDVALIDITY (\d+)", before).group(1))
        new = int(re.search(rb"UIDVALIDITY (\d+)", after).group(1))
        self.assertGreater(new, old)
        self.assertIn(b"MESSAGES 1", after)


class HostileInputTests(IMAPTestMixin, TestCase):
    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN)

    @inlineCallbacks
    def test_malformed_commands(self):
        """
        Malformed commands get BAD or NO with their tag; the session goes on
        and other sessions are served.
        """
        junk = [
            b"x1 FETCH abc (FLAGS)", b"x2 FETCH 1 (BODY[99.TEXT])", b"x3 FETCH 0:* FLAGS",
            b"x4 SEARCH BOGUS", b"x5 SEARCH SINCE 99-Abc-2020", b"x6 STORE 1 SETFLAGS (\\Seen)",
            b"x8 CREATE INBOX.x", b"x9 UID FROB 1",
            b"x10 COPY 1 Nowhere", b"x11 APPEND INBOX {999999999999}", b"x12 STATUS INBOX (BOGUS)",
            b"x13 FETCH 1:4294967295 (UID)", b"x14 UID FETCH 1:4294967295 (UID)",
            b"x15 LIST \"\" \"%%%%%%%%%%%%%%%%%%%%%%%%*\"", b"x16 " + b"A" * 2000,
            b"x17 SEARCH CHARSET KOI8 ALL", b"x18 FETCH 1 (BODY[]<5.3>)",
            b"x7 SELECT ../../etc",  # last: a failed SELECT leaves no folder selected
        ]

        def probe():
            session = RawSession(self.server, self.context)
            answers = {}
            for line in junk:
                session.send(line + b"\r\n")
                tag = line.split()[0]
                reply = session.until(tag + b" ")[-1]
                if not reply.startswith(tag + b" "):
                    return answers, b"closed"
                answers[tag] = reply.split()[1]
            session.send(b"z NOOP\r\n")
            final = session.reader.readline()
            session.close()
            return answers, final

        answers, final = yield in_thread(probe)
        self.assertEqual(final[:4], b"z OK")
        for tag in (b"x1", b"x3", b"x4", b"x5", b"x6", b"x9", b"x11", b"x12", b"x16"):
            self.assertEqual(answers[tag], b"BAD", tag)
        for tag in (b"x7", b"x8", b"x10", b"x17"):
            self.assertEqual(answers[tag], b"NO", tag)
        for tag in (b"x2", b"x13", b"x14", b"x15", b"x18"):
            self.assertEqual(answers[tag], b"OK", tag)


    @inlineCallbacks
    def test_append_nul_and_impossible_dates(self):
        """
        APPEND of a literal with a NUL octet is NO and stores nothing (RFC
        3501 literals are CHAR8; FETCH could not serve it); an APPEND
        date-time that does not exist (31-Feb, zone +9999, hour 24) is BAD
        instead of being moved to another day; a real one is kept.
        """
        def appends():
            session = RawSession(self.server, self.context)
            replies = []
            for n, (date, data) in enumerate([
                    (b"", b"Subject: nul\r\n\r\nhe\x00lo\r\n"),
                    (b' "31-Feb-2020 00:00:00 +0000"', b"Subject: d\r\n\r\nx\r\n"),
                    (b' "01-Jan-2020 00:00:00 +9999"', b"Subject: d\r\n\r\nx\r\n"),
                    (b' "01-Jan-2020 24:00:00 +0000"', b"Subject: d\r\n\r\nx\r\n"),
                    (b' " 7-Jul-1996 02:44:25 -0700"', b"Subject: ok\r\n\r\nx\r\n")]):
                tag = b"a%d" % n
                session.send(tag + b" APPEND INBOX ()" + date + b" {%d}\r\n" % len(data))
                first = session.reader.readline()
                if first.startswith(b"+"):
                    session.send(data + b"\r\n")
                    first = session.until(tag + b" ")[-1]
                replies.append(first.split(b" ")[1])
            session.send(b"f FETCH 1:* (INTERNALDATE BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n")
            fetched = b"".join(session.until(b"f "))
            session.close()
            return replies, fetched

        replies, fetched = yield in_thread(appends)
        self.assertEqual(replies, [b"NO", b"BAD", b"BAD", b"BAD", b"OK"])
        self.assertNotIn(b"nul", fetched)
        self.assertNotIn(b"Subject: d", fetched)
        self.assertIn(b'INTERNALDATE " 7-Jul-1996 09:44:25 +0000"', fetched)

class LiteralTests(IMAPTestMixin, TestCase):
    """
    Literals behind a pipelined command, and in SEARCH (found by running
    imaptest's stress mode and by hand against a fresh install).
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()
        yield deliver(self.server, PLAIN)

    @inlineCallbacks
    def test_literal_behind_a_pipelined_command(self):
        """
        A command with a literal sent in the same write as the one before
        it gets its continuation, its literal is read, and it is answered
        (the session used to stop reading for good).
        """
        message = b"Subject: pipelined\r\n\r\nbody\r\n"

        def run():
            session = RawSession(self.server, self.context)
            session.send(b"c NOOP\r\nz APPEND INBOX (\\Seen) {%d}\r\n" % len(message))
            before = session.until(b"+")
            session.send(message + b"\r\n")
            after = session.until(b"z ")
            session.send(b"d CREATE {7}\r\n")
            session.until(b"+")
            session.send(b"Folder7\r\n")
            created = session.until(b"d ")
            session.send(b"e STATUS {5}\r\n")
            session.until(b"+")
            session.send(b"INBOX (MESSAGES UIDNEXT)\r\n")
            status = session.until(b"e ")
            session.close()
            return before, after, created, status

        before, after, created, status = yield in_thread(run)
        self.assertTrue(status[-1].startswith(b"e OK"), status)
        self.assertEqual(status[0], b"* STATUS \"INBOX\" (MESSAGES 2 UIDNEXT 3)\r\n")
        self.assertIn(b"c OK NOOP completed\r\n", before)
        self.assertTrue(after[-1].startswith(b"z OK [APPENDUID "), after)
        self.assertTrue(created[-1].startswith(b"d OK"), created)

    @inlineCallbacks
    def test_search_literal(self):
        """
        A SEARCH string sent as a literal gets a continuation and is searched
        for; its bytes are never run as a command.
        """
        def run():
            session = RawSession(self.server, self.context)
            subject = b"hello"
            session.send(b"f SEARCH CHARSET UTF-8 SUBJECT {%d}\r\n" % len(subject))
            session.until(b"+")
            session.send(subject + b"\r\n")
            found = session.until(b"f ")
            session.send(b"g SEARCH TEXT {20}\r\n")
            session.until(b"+")
            session.send(b"x CREATE qa-injected\r\n")
            injected = session.until(b"g ")
            session.send(b"h LIST \"\" *\r\n")
            listing = session.until(b"h ")
            session.close()
            return found, injected, listing

        found, injected, listing = yield in_thread(run)
        self.assertIn(b"* SEARCH 1\r\n", found)
        self.assertTrue(found[-1].startswith(b"f OK"), found)
        self.assertEqual(injected, [b"* SEARCH\r\n", injected[-1]])
        self.assertTrue(injected[-1].startswith(b"g OK"), injected)
        self.assertFalse([line for line in listing if b"qa-injected" in line], listing)
