"""
mailstack/access/imap.py after its type fixes (issue 18 item 4): the one
login errback in force answers as intended.
"""

import os

from twisted.internet.defer import fail, inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack.access.realm import MaildirRealm
from tests.test_imap import IMAPTestMixin


class LoginFailureTests(IMAPTestMixin, TestCase):
    """
    A failed login says RFC 5530's code; a server fault during a login
    says NO [SERVERBUG], never the exception's text (imap.py had two
    definitions of the login errback, and the one in force passed such a
    failure to Twisted's, which answered BAD with the text).
    """

    @inlineCallbacks
    def setUp(self):
        yield self.start()

    @inlineCallbacks
    def test_answers(self):
        def attempt(password):
            def run(client):
                try:
                    client.login("alice@localhost", password)
                except client.error as e:
                    return str(e)
                return "OK"
            return self.imap(run, implicit=True, login=False)

        wrong = yield attempt("wrong")
        self.patch(MaildirRealm, "requestAvatar",
                   lambda *args: fail(RuntimeError("/secret/path broke")))
        broken = yield attempt("alice-pw")
        self.assertIn("[AUTHENTICATIONFAILED]", wrong)
        self.assertIn("[SERVERBUG]", broken)
        self.assertNotIn("secret", broken)
        self.flushLoggedErrors(RuntimeError)


class IdleMemoryTests(TestCase):
    """
    Issue 18 item 3: what an idle session keeps.
    """

    def test_tls_buffers_released(self):
        """
        The server's TLS context releases OpenSSL's buffers of idle
        connections (SSL_MODE_RELEASE_BUFFERS).
        """
        from OpenSSL import SSL

        from mailstack.tls import TLSMaterial, generate_self_signed
        from tests.support import short_tempdir

        directory = short_tempdir(self)
        cert, key = os.path.join(directory, "c.pem"), os.path.join(directory, "k.pem")
        generate_self_signed("mx.test", cert, key)
        context = TLSMaterial(cert, key).context_factory().getContext()
        self.assertTrue(context.set_mode(0) & SSL.MODE_RELEASE_BUFFERS)

    def test_entries_shared(self):
        """
        Two sessions' views of one folder share file names and flag sets.
        """
        from mailstack.access.folder import Folder, ensure_folder

        root = self.mktemp()
        os.makedirs(root)
        ensure_folder(root, subfolder=False)
        folder = Folder(root)
        for i in range(3):
            folder.add(b"Subject: %d\n\nbody\n" % i, {"\\Seen"})
        first, second = Folder(root).scan().entries, Folder(root).scan().entries
        for a, b in zip(first, second):
            self.assertIs(a.name, b.name)
            self.assertIs(a.base, b.base)
            self.assertIs(a.flags, b.flags)
        self.assertIs(first[0].flags, first[1].flags)
        self.assertFalse(hasattr(first[0], "__dict__"))
