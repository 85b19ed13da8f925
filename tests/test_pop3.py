"""
POP3 over the Maildirs, with poplib over real TLS on 127.0.0.1 port 0.
"""

import os
import poplib
import socket

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from tests.support import (
    add_user, client_context, in_thread, maildir_files, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"
BODY = b"Subject: dots\r\n\r\nfirst\r\n.\r\n..\r\n.x\r\nlast\r\n"


class POP3Tests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

        def deliver(client):
            client.sendmail("x@remote.test", ["alice@localhost"], BODY)
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: two\r\n\r\n2\r\n")

        yield in_thread(smtp_session, self.server.ports["smtp"], deliver)

    def pop(self, actions, tls=True, login=True):
        def run():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=30)
            try:
                if tls:
                    client.stls(context=self.context)
                if login:
                    client.user("alice@localhost")
                    client.pass_("alice-pw")
                return actions(client)
            finally:
                try:
                    client.quit()
                except (poplib.error_proto, OSError):
                    pass
        return in_thread(run)

    @inlineCallbacks
    def test_no_password_before_stls(self):
        """
        Before STLS, CAPA offers STLS and not USER, and USER is refused.
        """
        def probe(client):
            caps = client.capa()
            try:
                client.user("alice@localhost")
            except poplib.error_proto as e:
                return caps, e.args[0]

        caps, error = yield self.pop(probe, tls=False, login=False)
        self.assertIn("STLS", caps)
        self.assertNotIn("USER", caps)
        self.assertTrue(error.startswith(b"-ERR [AUTH]"))

    @inlineCallbacks
    def test_retrieve_byte_exact(self):
        """
        STAT, LIST and UIDL agree with the files; RETR gives the stored
        message with CRLF, dot lines intact after poplib un-stuffs them.
        """
        def read(client):
            return client.stat(), client.uidl(), client.retr(1), client.list()

        (count, total), uidl, (_, lines, octets), listing = yield self.pop(read)
        files = maildir_files(self.server, "alice@localhost")
        self.assertEqual(count, 2)
        with open(files[0], "rb") as f:
            stored = f.read()
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", stored.replace(b"\n", b"\r\n"))
        self.assertTrue(stored.endswith(b"\nfirst\n.\n..\n.x\nlast\n"))
        served = [len(open(p, "rb").read().replace(b"\n", b"\r\n")) for p in files]
        self.assertEqual(total, sum(served))
        uids = [line.split()[1].decode() for line in uidl[1]]
        self.assertEqual(uids, [os.path.basename(p) for p in files])

    @inlineCallbacks
    def test_deleted_message_gone_from_listings(self):
        """
        RFC 1939: after DELE 1, STAT counts only message 2, LIST and UIDL
        list only 2 (UIDL broke off with an error in the middle of its
        listing, LIST showed "1 0"), LIST 1, UIDL 1, RETR 1 and a second
        DELE 1 are errors; RSET brings it back.
        """
        def run(client):
            before = client.stat(), client.list()[1], client.uidl()[1]
            client.dele(1)
            after = client.stat(), client.list()[1], client.uidl()[1]
            errors = []
            for command in ("LIST 1", "UIDL 1", "RETR 1", "TOP 1 0", "DELE 1"):
                try:
                    client._shortcmd(command)
                    errors.append((command, None))
                except poplib.error_proto as e:
                    errors.append((command, e.args[0]))
            client.rset()
            return before, after, errors, client.stat(), client.noop()

        before, after, errors, reset, noop = yield self.pop(run)
        (count, total), listing, uidl = before
        self.assertEqual(count, 2)
        (count_after, total_after), listing_after, uidl_after = after
        self.assertEqual(count_after, 1)
        self.assertEqual(total_after, int(listing[1].split()[1]))
        self.assertEqual(listing_after, [listing[1]])
        self.assertEqual(uidl_after, [uidl[1]])
        for command, error in errors:
            self.assertIsNotNone(error, command)
            self.assertTrue(error.startswith(b"-ERR"), (command, error))
        self.assertEqual(dict(errors)["DELE 1"], b"-ERR message 1 already deleted")
        self.assertEqual(reset, (count, total))
        self.assertTrue(noop.startswith(b"+OK"))

    @inlineCallbacks
    def test_dele_applies_at_quit(self):
        """
        DELE removes the file only at QUIT; a session that drops deletes nothing.
        """
        def dele_and_drop(client):
            client.dele(1)
            client.sock.shutdown(socket.SHUT_RDWR)  # drop the connection, no QUIT

        yield self.pop(dele_and_drop)
        self.assertEqual(len(maildir_files(self.server, "alice@localhost")), 2)
        yield self.pop(lambda client: client.dele(1))
        self.assertEqual(len(maildir_files(self.server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_wrong_password(self):
        def login(client):
            client.user("alice@localhost")
            try:
                client.pass_("nope")
            except poplib.error_proto as e:
                return e.args[0]

        error = yield self.pop(login, login=False)
        self.assertTrue(error.startswith(b"-ERR [AUTH]"))

    @inlineCallbacks
    def test_stls_injection(self):
        """
        Commands pipelined in clear text after STLS are not run inside TLS.
        """
        port = self.server.ports["pop3"]
        context = self.context

        def probe():
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                raw.recv(1024)
                raw.sendall(b"STLS\r\nUSER alice@localhost\r\n")
                answer = raw.recv(1024)
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"PASS alice-pw\r\n")
                    return answer, tls.recv(1024)

        answer, after = yield in_thread(probe)
        self.assertTrue(answer.startswith(b"+OK"))
        self.assertEqual(answer.count(b"\r\n"), 1)
        self.assertTrue(after.startswith(b"-ERR"), after)

    @inlineCallbacks
    def test_renamed_and_removed_under_the_session(self):
        """
        RETR and DELE of a message whose file another session renamed find
        it under its new name (RETR hung with no answer and logged a
        traceback; DELE left the message in place); RETR of one another
        session removed is an C{-ERR}, and the session goes on.
        """
        yield in_thread(smtp_session, self.server.ports["smtp"], lambda client: client.sendmail(
            "x@remote.test", ["alice@localhost"], b"Subject: three\r\n\r\n3\r\n"))
        first, second, third = maildir_files(self.server, "alice@localhost")
        cur = os.path.join(os.path.dirname(os.path.dirname(first)), "cur")

        def work(client):
            client.stat()
            for path in (first, third):
                os.rename(path, os.path.join(cur, os.path.basename(path) + ":2,S"))
            os.unlink(second)
            retrieved = client.retr(1)[1]
            with self.assertRaises(poplib.error_proto) as gone:
                client.retr(2)
            client.dele(1)
            client.dele(3)  # never retrieved: still known by its old name
            return retrieved, gone.exception, client.stat()

        retrieved, gone, stat = yield self.pop(work)
        self.assertEqual(b"\r\n".join(retrieved).split(b"\r\n\r\n", 1)[1] + b"\r\n",
                         BODY.split(b"\r\n\r\n", 1)[1])
        self.assertTrue(str(gone).startswith("b'-ERR"), gone)
        self.assertEqual(stat[0], 1)  # the removed one, still listed
        self.assertEqual(maildir_files(self.server, "alice@localhost", "cur"), [])
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])
