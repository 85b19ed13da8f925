"""
Symbolic links planted in a Maildir are never followed (issue 11 item
10): IMAP FETCH/APPEND/SELECT, POP3 RETR and local delivery refuse them
and log it; nothing outside the data directory is read or written.
"""

import os
import poplib
import smtplib
import socket

from twisted.internet.defer import inlineCallbacks
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.nofollow import SymlinkRefused, check_tree, open_file
from tests.support import (
    add_user, client_context, in_thread, short_tempdir, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"
SECRET = b"Subject: secret\n\nTOP-SECRET outside the data directory\n"


class NofollowTests(SynchronousTestCase):
    def test_helpers(self):
        base = short_tempdir(self)
        outside = short_tempdir(self)
        with open(os.path.join(outside, "secret"), "wb") as f:
            f.write(SECRET)
        os.makedirs(os.path.join(base, "d", "real"))
        os.symlink(os.path.join(outside, "secret"), os.path.join(base, "d", "link"))
        os.symlink(outside, os.path.join(base, "d", "dirlink"))
        os.mkfifo(os.path.join(base, "d", "fifo"))
        with self.assertRaises(SymlinkRefused):
            open_file(os.path.join(base, "d", "link"))
        with self.assertRaises(SymlinkRefused):
            open_file(os.path.join(base, "d", "fifo"))  # and without blocking
        with self.assertRaises(SymlinkRefused):
            check_tree(base, os.path.join(base, "d", "dirlink"))
        with self.assertRaises(SymlinkRefused):
            check_tree(base, os.path.join(base, "d"), ["dirlink"])
        check_tree(base, os.path.join(base, "d", "real"), ["missing"])
        check_tree(base, os.path.join(base, "d", "not", "yet"))


class SymlinkTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, imaps=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        add_user(self.server, "bob@localhost", "bob-pw")
        self.context = client_context(self.server)
        self.outside = short_tempdir(self)
        self.secret = os.path.join(self.outside, "secret")
        with open(self.secret, "wb") as f:
            f.write(SECRET)
        self.root = os.path.join(self.server.data_dir, "mail", "localhost", "alice")
        self.events = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def logged(self, word):
        from twisted.logger import formatEvent
        return [formatEvent(e) for e in self.events if word in formatEvent(e)]

    def deliver(self, to="alice@localhost"):
        def send(client):
            return client.sendmail("bob@remote.test", [to], b"Subject: real\r\n\r\nreal mail\r\n")
        return in_thread(smtp_session, self.server.ports["smtp"], send)

    def replace_with_link(self):
        """
        Turn alice's delivered message into a link to the secret (same
        name, so its W= size is believed) and plant another link.
        """
        new = os.path.join(self.root, "new")
        name = sorted(os.listdir(new))[0]
        os.unlink(os.path.join(new, name))
        os.symlink(self.secret, os.path.join(new, name))
        os.symlink(self.secret, os.path.join(self.root, "cur",
                                             "1.M1P1Q1R0.evil,S=56,W=59:2,"))

    def imap(self, *lines):
        def run():
            raw = socket.create_connection(("127.0.0.1", self.server.ports["imaps"]), 30)
            tls = self.context.wrap_socket(raw, server_hostname="localhost")
            reader = tls.makefile("rb")
            reader.readline()
            out = []
            for line in (b"l LOGIN alice@localhost alice-pw",) + lines:
                tag = line.split()[0]
                tls.sendall(line + b"\r\n")
                got = []
                while True:
                    got.append(reader.readline())
                    if not got[-1] or got[-1].startswith(tag + b" "):
                        break
                out.append(b"".join(got))
            tls.close()
            return out[1:]
        return in_thread(run)

    @inlineCallbacks
    def test_imap_fetch(self):
        yield self.deliver()
        yield self.imap(b"n NOOP")  # first login made the folders
        self.replace_with_link()
        select, fetch, noop = yield self.imap(
            b"s SELECT INBOX", b"f FETCH 1:* (BODY.PEEK[] BODY.PEEK[HEADER] ENVELOPE)",
            b"n NOOP")
        self.assertNotIn(b"TOP-SECRET", fetch)
        self.assertNotIn(b"secret", fetch)
        self.assertIn(b"n OK", noop)
        self.assertTrue(self.logged("symbolic link"))

    @inlineCallbacks
    def test_imap_folder_links(self):
        """
        A folder that is a link, or whose cur/ is one, is neither listed
        nor selected nor appended to; nothing is written outside.
        """
        yield self.imap(b"n NOOP")
        for sub in ("tmp", "new", "cur"):
            os.mkdir(os.path.join(self.outside, sub))
        os.symlink(self.outside, os.path.join(self.root, ".Evil"))
        sent_cur = os.path.join(self.root, ".Sent", "cur")
        os.rmdir(sent_cur)
        os.symlink(os.path.join(self.outside, "cur"), sent_cur)
        listed, select, append, status, noop = yield self.imap(
            b'l LIST "" *', b"s SELECT Evil", b"a APPEND Sent {10}\r\nSubject: x",
            b"t STATUS Sent (MESSAGES)", b"n NOOP")
        self.assertNotIn(b"Evil", listed)
        self.assertIn(b"s NO", select)
        self.assertIn(b"a NO", append)
        self.assertIn(b"t NO", status)
        self.assertIn(b"n OK", noop)
        for sub in ("tmp", "new", "cur"):
            self.assertEqual(os.listdir(os.path.join(self.outside, sub)), [])
        self.assertTrue(self.logged("refusing"))

    @inlineCallbacks
    def test_pop3_retr(self):
        """
        Links are not listed at login; a message swapped for a link after
        the listing is not served by RETR (O_NOFOLLOW).
        """
        yield self.deliver()
        yield self.deliver()

        def login():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=30)
            client.stls(context=self.context)
            client.user("alice@localhost")
            client.pass_("alice-pw")
            return client

        def run():
            self.replace_with_link()  # the first message, and one planted
            client = login()
            listing = client.list()[1]
            new = os.path.join(self.root, "new")
            name = [n for n in os.listdir(new) if not os.path.islink(os.path.join(new, n))][0]
            os.unlink(os.path.join(new, name))
            os.symlink(self.secret, os.path.join(new, name))  # swapped after the listing
            try:
                retr = b"\n".join(client.retr(1)[1])
            except poplib.error_proto as e:
                retr = e.args[0]
            client.quit()
            return listing, retr

        listing, retr = yield in_thread(run)
        self.assertEqual(len(listing), 1)  # only the real message is listed
        self.assertTrue(retr.startswith(b"-ERR"), retr)
        self.assertNotIn(b"TOP-SECRET", retr)
        self.assertTrue(self.logged("refusing the symbolic link"))
        self.assertTrue(self.logged("not serving"))

    @inlineCallbacks
    def test_delivery(self):
        """
        A maildir whose new/ (or the user's directory itself) is a link
        gets no mail: 451, nothing written outside, logged.
        """
        yield self.deliver()  # creates the Maildir
        new = os.path.join(self.root, "new")
        for name in os.listdir(new):
            os.unlink(os.path.join(new, name))
        os.rmdir(new)
        os.symlink(self.outside, new)
        bob_parent = os.path.join(self.server.data_dir, "mail", "localhost")
        os.symlink(self.outside, os.path.join(bob_parent, "bob"))
        for to in ("alice@localhost", "bob@localhost"):
            def send(client, to=to):
                try:
                    client.sendmail("x@remote.test", [to], b"Subject: t\r\n\r\nt\r\n")
                except smtplib.SMTPException as e:
                    return e
            error = yield in_thread(smtp_session, self.server.ports["smtp"], send)
            self.assertEqual(getattr(error, "smtp_code", None), 451, to)
        self.assertEqual(sorted(os.listdir(self.outside)), ["secret"])
        self.assertEqual(len(self.logged("refusing a link in a maildir")), 2)
        self.flushLoggedErrors(SymlinkRefused)
