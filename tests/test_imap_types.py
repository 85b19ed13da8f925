"""
mailstack/access/imap.py after its type fixes (issue 18 item 4): the one
login errback in force answers as intended.
"""

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
