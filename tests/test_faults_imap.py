"""
Issue 12 item 9 for IMAP: a full disk at the first login (which creates
the Maildir) or at APPEND is a tagged NO with an RFC 5530 code, not a BAD
carrying the exception's text.  The fault comes from safeio's
L{RecordingDisk}, not from a full disk.
"""

import imaplib

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack.safeio import RecordingDisk, use_disk
from tests.test_imap import IMAPTestMixin


class DiskFullTests(IMAPTestMixin, TestCase):

    @inlineCallbacks
    def setUp(self):
        self.disk = RecordingDisk()
        self.addCleanup(use_disk, use_disk(self.disk))
        yield self.start()

    @inlineCallbacks
    def test_first_login(self):
        """
        ENOSPC while the first login creates the folders: NO [OVERQUOTA];
        once there is room, the login works.
        """
        self.disk.fail("create", "/mail/localhost/alice/", times=-1)

        def login(client):
            try:
                client.login("alice@localhost", "alice-pw")
            except imaplib.IMAP4.error as e:
                return str(e)
            return "logged in"

        answer = yield self.imap(login, login=False)
        self.assertIn("[OVERQUOTA]", answer)
        self.assertNotIn("Errno", answer)
        self.assertNotIn("/", answer)
        self.disk.heal()
        answer = yield self.imap(login, login=False)
        self.assertEqual(answer, "logged in")

    @inlineCallbacks
    def test_append(self):
        """
        ENOSPC while APPEND writes the message: NO [OVERQUOTA]; an other
        storage error: NO [SERVERBUG]; the session goes on.
        """
        yield self.imap(lambda client: client.select("INBOX"))
        self.disk.fail("write", "/mail/localhost/alice/tmp/")
        self.disk.fail("fsync", "/mail/localhost/alice/tmp/", error=5, after=0)

        def append(client):
            answers = []
            for _ in range(2):
                typ, data = client.append("INBOX", None, None, b"Subject: a\r\n\r\nb\r\n")
                answers.append((typ, data[0]))
            answers.append(client.noop()[0])
            return answers

        answers = yield self.imap(append)
        self.assertEqual(answers[0][0], "NO")
        self.assertTrue(answers[0][1].startswith(b"[OVERQUOTA]"), answers)
        self.assertEqual(answers[1][0], "NO")
        self.assertTrue(answers[1][1].startswith(b"[SERVERBUG]"), answers)
        self.assertEqual(answers[2], "OK")


class UnexpectedLoginErrorTests(IMAPTestMixin, TestCase):
    """
    A login that fails for a reason of ours (a user database or realm that
    raises) is answered without the exception's text, by LOGIN and by
    AUTHENTICATE alike, and a wrong password is NO [AUTHENTICATIONFAILED].
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()

    def attempt(self, client, how, password="alice-pw"):
        try:
            if how == "login":
                client.login("alice@localhost", password)
            else:
                client.authenticate(
                    "PLAIN", lambda _: f"\0alice@localhost\0{password}".encode())
        except imaplib.IMAP4.error as e:
            return str(e)
        return "logged in"

    @inlineCallbacks
    def test_no_exception_text(self):
        from twisted.internet.defer import fail

        from mailstack.access.realm import MaildirRealm

        self.patch(MaildirRealm, "requestAvatar", lambda self, *args: fail(
            RuntimeError("/secret/path/users.db is locked")))
        for how in ("login", "authenticate"):
            answer = yield self.imap(lambda client, how=how: self.attempt(client, how), login=False)
            self.assertNotIn("secret", answer, how)
            self.assertNotIn("Server error", answer, how)
            self.assertIn("[SERVERBUG]", answer, how)
        self.flushLoggedErrors(RuntimeError)

    @inlineCallbacks
    def test_wrong_password(self):
        for how in ("login", "authenticate"):
            answer = yield self.imap(lambda client, how=how: self.attempt(client, how, "wrong"),
                                     login=False)
            self.assertIn("[AUTHENTICATIONFAILED]", answer, how)
