"""
The sqlite user database plugin (--user-db sqlite) against one server:
SMTP AUTH, IMAP, POP3, routing (users, plus-addresses, aliases) and sender
authorization all answer from the SQLite file, with real clients.
"""

import imaplib
import os
import poplib
import smtplib
import sqlite3

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack.plugin import available
from tests.support import (
    client_context, fast_hash, in_thread, read_messages, short_tempdir, smtp_session,
    start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"


class SQLiteUserDatabaseTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.path = os.path.join(short_tempdir(self), "users.sqlite")
        self.server = yield start_server(
            self, smtp=LISTEN, submission=LISTEN, imap=LISTEN, pop3=LISTEN,
            user_db="sqlite", plugins={"sqlite": {"path": self.path}})
        with sqlite3.connect(self.path) as db:
            db.executemany("INSERT INTO users VALUES (?, ?)", [
                ("alice@example.test", fast_hash("alice-pw")),
                ("bob@example.test", fast_hash("bob-pw"))])
            db.executemany("INSERT INTO aliases VALUES (?, ?)", [
                ("team@example.test", "alice@example.test"),
                ("team@example.test", "bob@example.test"),
                ("sales@example.test", "alice@example.test")])
        db.close()
        self.context = client_context(self.server)

    def test_registered(self):
        self.assertIn("sqlite", available("user-db"))
        self.assertIn("file", available("user-db"))

    @inlineCallbacks
    def test_routing(self):
        """
        Users, plus-addresses and aliases from SQLite; an unknown address
        is 550; a user added while the server runs is known at once.
        """
        def talk(client):
            client.ehlo("client.test")
            client.mail("x@remote.test")
            replies = [client.rcpt(r)[0] for r in (
                "nobody@example.test", "team@example.test", "alice+tag@example.test",
                "carol@example.test")]
            client.rset()
            return replies

        replies = yield in_thread(smtp_session, self.server.ports["smtp"], talk)
        self.assertEqual(replies, [550, 250, 250, 550])
        with sqlite3.connect(self.path) as db:
            db.execute("INSERT INTO users VALUES (?, ?)", ("carol@example.test", "x"))
        db.close()

        def send(client):
            client.ehlo("client.test")
            return client.sendmail("x@remote.test", ["team@example.test", "carol@example.test"],
                                   b"Subject: team\r\n\r\nhello team\r\n")

        refused = yield in_thread(smtp_session, self.server.ports["smtp"], send)
        self.assertEqual(refused, {})
        for user in ("alice", "bob", "carol"):
            [message] = read_messages(self.server, f"{user}@example.test")
            self.assertIn(b"hello team", message)

    @inlineCallbacks
    def test_auth_and_sender_authorization(self):
        """
        SMTP AUTH checks the SQLite hash; a user may send as an alias that
        reaches them (sales, team), not as another user.
        """
        def talk(client):
            client.ehlo("client.test")
            client.starttls(context=self.context)
            client.ehlo("client.test")
            try:
                client.login("alice@example.test", "wrong")
                bad = None
            except smtplib.SMTPAuthenticationError as e:
                bad = e.smtp_code
            client.login("alice@example.test", "alice-pw")
            own = [client.mail(s)[0] for s in ("sales@example.test",)]
            client.rset()
            own.append(client.mail("team@example.test")[0])
            client.rset()
            other = client.mail("bob@example.test")
            client.rset()
            return bad, own, other

        bad, own, other = yield in_thread(smtp_session, self.server.ports["submission"],
                                          talk, host="localhost")
        self.assertEqual(bad, 535)
        self.assertEqual(own, [250, 250])
        self.assertEqual(other[0], 553)
        self.assertIn(b"not owned by user alice@example.test", other[1])

    @inlineCallbacks
    def test_imap_and_pop3(self):
        """
        IMAP and POP3 logins check the SQLite hash and see the mail routed
        by it.
        """
        def send(client):
            client.ehlo("client.test")
            client.sendmail("x@remote.test", ["team@example.test"], b"Subject: s\r\n\r\nhi\r\n")

        yield in_thread(smtp_session, self.server.ports["smtp"], send)

        def imap():
            client = imaplib.IMAP4("localhost", self.server.ports["imap"], timeout=30)
            try:
                client.starttls(ssl_context=self.context)
                try:
                    client.login("alice@example.test", "bob-pw")
                    wrong = "OK"
                except imaplib.IMAP4.error:
                    wrong = "NO"
                client.login("alice@example.test", "alice-pw")
                typ, data = client.select("INBOX")
                return wrong, typ, int(data[0])
            finally:
                client.logout()

        def pop3():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=30)
            try:
                client.stls(context=self.context)
                client.user("bob@example.test")
                client.pass_("bob-pw")
                return client.stat()[0]
            finally:
                client.quit()

        wrong, typ, count = yield in_thread(imap)
        self.assertEqual((wrong, typ, count), ("NO", "OK", 1))
        count = yield in_thread(pop3)
        self.assertEqual(count, 1)
