"""
The receiving MTA end to end: a real MailStack on 127.0.0.1 port 0, real
clients (smtplib, raw sockets), real Maildirs.
"""

import os
import socket
import smtplib

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack.address import local_address
from tests.support import (
    add_user, client_context, in_thread, maildir_files, read_messages, smtp_session,
    start_server,
)

SMTP = "tcp:0:interface=127.0.0.1"


def raw_dialog(port, data, read_until=b"221 ", timeout=10):
    """
    Send C{data} in one packet after the greeting; return all replies.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.recv(1024)
        s.sendall(data)
        received = b""
        while read_until not in received:
            chunk = s.recv(65536)
            if not chunk:
                break
            received += chunk
        return received


class ReceivingTests(TestCase):
    """
    Mail for local users, through the whole server.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=SMTP)
        self.port = self.server.ports["smtp"]
        add_user(self.server, "alice@localhost")
        add_user(self.server, "bob@example.test")

    @inlineCallbacks
    def test_byte_exact_delivery(self):
        """
        A message sent with smtplib lands in new/ byte for byte (LF endings,
        dot-stuffed lines restored, UTF-8 kept), after the trace headers.
        """
        body = ("From: x@remote.test\r\nSubject: Grüße\r\n\r\n.leading dot\r\n..two\r\n.\r\n"
                "日本語 ünïcödé\r\nlast line\r\n").encode("utf-8")

        def send(client):
            client.ehlo("client.test")
            return client.sendmail("x@remote.test", ["alice@localhost"], body,
                                   mail_options=["BODY=8BITMIME"])

        refused = yield in_thread(smtp_session, self.port, send)
        self.assertEqual(refused, {})
        [message] = read_messages(self.server, "alice@localhost")
        head, sep, stored = message.partition(b"From: x@remote.test\n")
        self.assertEqual(sep + stored, body.replace(b"\r\n", b"\n"))
        # No Authentication-Results: a loopback client is not checked.
        self.assertTrue(head.startswith(b"Return-Path: <x@remote.test>\n"
                                        b"Delivered-To: alice@localhost\n"
                                        b"Received: from client.test"))
        self.assertIn(b"\nReceived: from client.test ([127.0.0.1])\n", head)
        self.assertIn(b"by mx.test (mailstack) with ESMTP id ", head)
        name = os.path.basename(maildir_files(self.server, "alice@localhost")[0])
        crlf_size = len(message) + message.count(b"\n")
        self.assertTrue(name.endswith(f",S={len(message)},W={crlf_size}"))

    @inlineCallbacks
    def test_refusals(self):
        """
        Unknown users get 550 5.1.1 and other domains 554 5.7.1 at RCPT;
        the known recipient in the same transaction still gets the mail.
        """
        def send(client):
            client.ehlo("client.test")
            client.mail("x@remote.test")
            return [client.rcpt(r) for r in
                    ("nobody@localhost", "victim@gmail.com", "bob@EXAMPLE.test")]

        replies = yield in_thread(smtp_session, self.port, send)
        self.assertEqual([(c, m.split()[0]) for c, m in replies],
                         [(550, b"5.1.1"), (554, b"5.7.1"), (250, b"2.1.5")])
        self.assertEqual(maildir_files(self.server, "nobody@localhost"), [])

    @inlineCallbacks
    def test_plus_and_aliases(self):
        """
        Plus-addresses reach the user; aliases expand to several users once.
        """
        self.server.aliases.add(local_address("team@localhost"),
                                (local_address("alice@localhost"),
                                 local_address("bob@example.test")))

        def send(client):
            return client.sendmail("x@remote.test", ["alice+news@localhost", "team@localhost"],
                                   b"Subject: s\r\n\r\nhi\r\n")

        yield in_thread(smtp_session, self.port, send)
        [for_alice] = read_messages(self.server, "alice@localhost")
        self.assertIn(b"Delivered-To: alice+news@localhost\n", for_alice)
        self.assertEqual(len(read_messages(self.server, "bob@example.test")), 1)

    @inlineCallbacks
    def test_new_user_without_restart(self):
        """
        A user added (as the mailstack command does) while the server runs
        is known at once.
        """
        def rcpt(client):
            client.ehlo("c.test")
            client.mail("x@remote.test")
            return client.rcpt("carol@localhost")[0]

        self.assertEqual((yield in_thread(smtp_session, self.port, rcpt)), 550)
        add_user(self.server, "carol@localhost")
        self.assertEqual((yield in_thread(smtp_session, self.port, rcpt)), 250)

    @inlineCallbacks
    def test_path_traversal(self):
        """
        Local parts that look like paths create nothing anywhere.
        """
        before = sorted(os.walk(self.server.data_dir))

        def send(client):
            client.ehlo("c.test")
            client.mail("x@remote.test")
            return [client.rcpt(r)[0] for r in (
                "../../../tmp/evil@localhost", "..@localhost", "a/b@localhost",
                '"../x"@localhost', ".alice@localhost", "alice/../bob@localhost",
            )]

        codes = yield in_thread(smtp_session, self.port, send)
        self.assertTrue(all(code in (501, 550) for code in codes), codes)
        self.assertEqual(sorted(os.walk(self.server.data_dir)), before)

    @inlineCallbacks
    def test_failed_write_leaves_nothing(self):
        """
        If one recipient's Maildir cannot be written, the client gets 451
        and no copy at all is left, in new/ or tmp/, for anyone.
        """
        add_user(self.server, "carol@localhost")
        os.makedirs(os.path.join(self.server.data_dir, "mail", "localhost"), exist_ok=True)
        # carol's Maildir is a plain file: every write into it fails, even as root.
        with open(os.path.join(self.server.data_dir, "mail", "localhost", "carol"), "w"):
            pass

        def send(client):
            client.ehlo("c.test")
            client.mail("x@remote.test")
            client.rcpt("alice@localhost")
            client.rcpt("carol@localhost")
            return client.data(b"Subject: s\r\n\r\nhi\r\n")

        code, message = yield in_thread(smtp_session, self.port, send)
        self.assertEqual((code, message.split()[0]), (451, b"4.3.0"))
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])
        self.assertEqual(maildir_files(self.server, "alice@localhost", "tmp"), [])
        # One log line (issue 12), not a logged traceback.
        self.assertEqual(self.flushLoggedErrors(NotADirectoryError), [])

    @inlineCallbacks
    def test_starttls_verified(self):
        """
        STARTTLS works with a client that verifies the generated certificate
        (chain and host name), and the Received header records TLS.
        """
        context = client_context(self.server)

        def send(client):
            client.starttls(context=context)
            client.ehlo("c.test")
            return client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: tls\r\n\r\n")

        def session(client):
            client.ehlo("c.test")
            return send(client)

        yield in_thread(smtp_session, self.port, session, host="localhost")
        [message] = read_messages(self.server, "alice@localhost")
        self.assertIn(b"with ESMTPS id", message)
        self.assertIn(b"(using TLSv1.", message)

    @inlineCallbacks
    def test_smuggling(self):
        """
        A bare-LF dot inside DATA neither ends the message nor lets the
        commands after it run: the message is refused whole after the real
        end, and nothing reaches the victim.
        """
        data = (b"EHLO evil.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
                b"DATA\r\nSubject: hi\r\n\r\nhello\n.\nMAIL FROM:<evil@remote.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\nDATA\r\nsmuggled\r\n.\r\nQUIT\r\n")
        replies = yield in_thread(raw_dialog, self.port, data)
        self.assertIn(b"550 5.6.0", replies)
        self.assertEqual(replies.count(b"\r\n354 "), 1)
        self.assertEqual(read_messages(self.server, "bob@example.test"), [])
        self.assertEqual(read_messages(self.server, "alice@localhost"), [])

    @inlineCallbacks
    def test_oversized_message(self):
        """
        A client that declares too big a SIZE is refused at MAIL; one that
        lies (or declares nothing) gets 552 5.3.4 after its data, and the
        session can go on.
        """
        big = (b"x" * 998 + b"\r\n") * (26214400 // 1000 + 10)

        def send(client):
            client.ehlo("c.test")
            try:
                client.sendmail("x@remote.test", ["alice@localhost"], big)
            except smtplib.SMTPSenderRefused as e:
                declared = e.smtp_code, e.smtp_error.split()[0]
            client.mail("x@remote.test", ["SIZE=1000"])
            client.rcpt("alice@localhost")
            code, message = client.data(big)
            return declared, (code, message.split()[0]), client.noop()[0]

        result = yield in_thread(smtp_session, self.port, send)
        self.assertEqual(result, ((552, b"5.3.4"), (552, b"5.3.4"), 250))
        self.assertEqual(read_messages(self.server, "alice@localhost"), [])
