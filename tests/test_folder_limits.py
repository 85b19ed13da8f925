"""
One user cannot starve the others (issue 11 item 6): folder count and
name length limits answered NO [LIMIT], LIST attributes computed in one
pass, IMAP/POP3 reads in their own worker pool with a per-user share, so
delivery never waits behind them.
"""

import os
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.access.limits import MAX_FOLDERS
from mailstack.access.mailbox import MaildirAccount, folder_dirname, wildcard_match
from tests.support import (
    IMAPSession, add_user, client_context, in_thread, maildir_files, short_tempdir, smtp_session,
    start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"


class FolderListTests(SynchronousTestCase):
    def test_attributes_in_one_pass(self):
        """
        \\HasChildren, \\HasNoChildren and implied \\Noselect parents for
        thousands of folders (the old code compared every pair).
        """
        root = short_tempdir(self)
        account = MaildirAccount(root, "localhost", None, None)
        account.prepare()
        for i in range(3000):
            os.mkdir(os.path.join(root, f".top{i % 30}.sub{i}"))
            os.mkdir(os.path.join(root, f".top{i % 30}.sub{i}", "cur"))
        os.mkdir(os.path.join(root, ".top0"))
        os.mkdir(os.path.join(root, ".top0", "cur"))
        infos = {i.name: i.attributes for i in account.folders()}
        self.assertEqual(len(infos), 1 + 4 + 3000 + 30)
        self.assertEqual(infos["top0"], ["\\HasChildren"])
        self.assertEqual(infos["top1"], ["\\Noselect", "\\HasChildren"])
        self.assertEqual(infos["top1.sub1"], ["\\HasNoChildren"])
        self.assertEqual(infos["Sent"], ["\\HasNoChildren", "\\Sent"])

    def test_wildcards_without_backtracking(self):
        """
        A pattern full of wildcards is matched in linear time and agrees
        with the plain meaning of * and %.
        """
        name = "a" * 250
        self.assertFalse(wildcard_match("*a" * 40 + "b", name))
        self.assertTrue(wildcard_match("*a" * 40, name))
        self.assertTrue(wildcard_match("%a%a%a%", "xa.y") is False)
        self.assertTrue(wildcard_match("%%%.%%%", "ab.cd"))
        self.assertTrue(wildcard_match("in%", "INBOX"))

    def test_name_length(self):
        self.assertEqual(folder_dirname("a" * 254), "." + "a" * 254)
        for name in ("a" * 255, "é" * 100, "x." * 128 + "y"):
            with self.assertRaises(Exception) as caught:
                folder_dirname(name)
            self.assertEqual(type(caught.exception).__name__, "FolderLimit")


Raw = IMAPSession


class FolderLimitTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, imaps=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        add_user(self.server, "bob@localhost", "bob-pw")
        self.context = client_context(self.server)
        self.root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")

    def session(self, actions, user="alice@localhost", password="alice-pw"):
        def run():
            raw = Raw(self.server, self.context, user, password)
            try:
                return actions(raw)
            finally:
                raw.close()
        return in_thread(run)

    @inlineCallbacks
    def test_folder_count_limit(self):
        """
        The 1,001st folder is refused with NO [LIMIT]; RENAME still works.
        """
        yield self.session(lambda raw: raw.command(b"n NOOP"))  # first login: Sent, ...
        existing = len([e for e in os.listdir(self.root) if e.startswith(".")])
        for i in range(MAX_FOLDERS - existing - 1):
            os.makedirs(os.path.join(self.root, f".f{i}", "cur"))

        def create(raw):
            return (raw.command(b"c1 CREATE last"), raw.command(b"c2 CREATE toomany"),
                    raw.command(b"c3 RENAME last renamed"), raw.command(b"c4 LIST \"\" *"))

        last, over, renamed, listed = yield self.session(create)
        self.assertIn(b"c1 OK", last)
        self.assertIn(b"c2 NO [LIMIT]", over)
        self.assertFalse(os.path.exists(os.path.join(self.root, ".toomany")))
        self.assertIn(b"c3 OK", renamed)
        self.assertEqual(listed.count(b"* LIST"), MAX_FOLDERS + 1)  # with INBOX

    @inlineCallbacks
    def test_long_names(self):
        """
        A name whose directory would pass 255 bytes gets NO [LIMIT] (no
        "file name too long" error), for CREATE and for RENAME of a parent
        whose children would grow too long.
        """
        long_utf7 = ("é" * 100).encode("imap4-utf-7")
        ok_name = b"p." + b"c" * 240

        def run(raw):
            return [raw.command(b"c1 CREATE " + b"a" * 300),
                    raw.command(b"c2 CREATE " + long_utf7),
                    raw.command(b"c3 CREATE p") and raw.command(b"c3 CREATE " + ok_name),
                    raw.command(b"c4 RENAME p " + b"q" * 20),
                    raw.command(b"c5 SELECT " + b"a" * 300),
                    raw.command(b"c6 NOOP")]

        replies = yield self.session(run)
        for reply, tag in zip(replies[:2], (b"c1", b"c2")):
            self.assertIn(tag + b" NO [LIMIT]", reply)
            self.assertNotIn(b"long", reply.lower().replace(b"limited", b""))
        self.assertIn(b"c3 OK", replies[2])
        self.assertIn(b"c4 NO [LIMIT]", replies[3])
        self.assertTrue(os.path.isdir(os.path.join(self.root, ".p." + "c" * 240)))
        self.assertIn(b"c5 NO", replies[4])
        self.assertIn(b"c6 OK", replies[5])

    @inlineCallbacks
    def test_delivery_not_behind_imap_reads(self):
        """
        With every IMAP/POP3 worker thread busy, mail is still delivered:
        delivery has its own pool.
        """
        self.assertIsNot(self.server.access_pool, self.server.io_pool)
        release = threading.Event()
        busy = threading.Barrier(self.server.access_pool.max + 1, timeout=30)

        def hold():
            busy.wait()
            release.wait(60)

        for _ in range(self.server.access_pool.max):
            self.server.access_pool.callInThread(hold)
        yield in_thread(busy.wait)  # every access thread is now held
        try:
            def send(client):
                return client.sendmail("bob@remote.test", ["alice@localhost"],
                                       b"Subject: through\r\n\r\nhi\r\n")
            refused = yield in_thread(smtp_session, self.server.ports["smtp"], send)
            self.assertEqual(refused, {})
            self.assertEqual(len(maildir_files(self.server, "alice@localhost")), 1)
        finally:
            release.set()

    @inlineCallbacks
    def test_one_user_cannot_take_every_thread(self):
        """
        Parallel LISTs of one user (six sessions) hold at most the user's share of
        worker threads; another user's LIST is answered meanwhile.
        """
        release = threading.Event()
        running = []
        folders = MaildirAccount.folders

        def held(account):
            if account.root.endswith("alice"):
                running.append(threading.current_thread())
                release.wait(60)
            return folders(account)

        self.patch(MaildirAccount, "folders", held)
        replies = []

        def alice():
            raw = Raw(self.server, self.context)
            try:
                replies.append(raw.command(b"x LIST \"\" *"))
            finally:
                raw.close()

        # Plain threads: the reactor's thread pool (in_thread) has only 10.
        clients = [threading.Thread(target=alice) for _ in range(6)]
        for client in clients:
            client.start()
        try:
            bob = yield self.session(lambda raw: raw.command(b"y LIST \"\" *"),
                                     "bob@localhost", "bob-pw")
            self.assertIn(b"y OK", bob)
            self.assertLessEqual(len(running), 2)
        finally:
            release.set()
            yield in_thread(lambda: [client.join(60) for client in clients])
        self.assertEqual(len(replies), 6)
        for reply in replies:
            self.assertIn(b"x OK", reply)
        self.assertEqual(len(running), 6)
