"""
Tests for the C{mailstack} command, run as a user would run it.
"""

import os
import re
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import local_address
from mailstack.auth import verify_password
from mailstack.users import AliasMap, UserDatabase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mailstack(*args, stdin=""):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "mailstack", *args], input=stdin,
                          capture_output=True, text=True, env=env, timeout=60)


class CommandTests(SynchronousTestCase):
    def setUp(self):
        self.data = os.path.abspath(self.mktemp())

    def run_ok(self, *args, stdin=""):
        result = mailstack("--data-dir", self.data, *args, stdin=stdin)
        self.assertEqual(result.returncode, 0, result.stderr)
        return result.stdout

    def test_users(self):
        """
        add (password from stdin), list, passwd, del; the hash verifies.
        """
        self.assertEqual(self.run_ok("user", "add", "Alice@LocalHost", stdin="s3cret\n"),
                         "added alice@localhost\n")
        self.run_ok("user", "add", "bob@example.test", stdin="pw\n")
        self.assertEqual(self.run_ok("user", "list"), "alice@localhost\nbob@example.test\n")
        stored = UserDatabase(self.data).password_hash(local_address("alice@localhost"))
        self.assertTrue(stored.startswith("$argon2id$"))
        self.assertTrue(verify_password(stored, "s3cret"))
        self.assertFalse(verify_password(stored, "wrong"))
        self.run_ok("user", "passwd", "alice@localhost", stdin="new\n")
        stored = UserDatabase(self.data).password_hash(local_address("alice@localhost"))
        self.assertTrue(verify_password(stored, "new"))
        self.run_ok("user", "del", "bob@example.test")
        self.assertEqual(self.run_ok("user", "list"), "alice@localhost\n")
        with open(os.path.join(self.data, "users")) as f:
            self.assertNotIn("s3cret", f.read())

    def test_user_errors(self):
        """
        Bad names, duplicates, unknown users and empty passwords fail with
        a message and a sysexits status, changing nothing.
        """
        for args, stdin, status in (
            (("user", "add", "../../etc@localhost"), "pw\n", 65),
            (("user", "add", "a+b@localhost"), "pw\n", 65),
            (("user", "add", "nodomain"), "pw\n", 65),
            (("user", "add", "x@localhost"), "\n", 65),
            (("user", "del", "ghost@localhost"), "", 67),
            (("user", "passwd", "ghost@localhost"), "pw\n", 67),
        ):
            result = mailstack("--data-dir", self.data, *args, stdin=stdin)
            self.assertEqual(result.returncode, status, (args, result.stderr))
            self.assertTrue(result.stderr.startswith("mailstack: "), result.stderr)
        self.run_ok("user", "add", "x@localhost", stdin="pw\n")
        self.assertEqual(mailstack("--data-dir", self.data, "user", "add", "x@localhost",
                                   stdin="pw\n").returncode, 73)
        self.assertEqual(self.run_ok("user", "list"), "x@localhost\n")
        self.assertFalse(os.path.exists(os.path.join(self.data, "mail")))

    def test_aliases(self):
        self.run_ok("alias", "add", "Team@localhost", "alice@localhost", "bob@remote.test")
        self.run_ok("alias", "add", "postmaster@localhost", "alice@localhost")
        self.assertEqual(self.run_ok("alias", "list"),
                         "postmaster@localhost: alice@localhost\n"
                         "team@localhost: alice@localhost, bob@remote.test\n")
        targets = AliasMap(self.data).targets(local_address("team@localhost"))
        self.assertEqual([str(t) for t in targets], ["alice@localhost", "bob@remote.test"])
        self.run_ok("alias", "del", "team@localhost")
        self.assertEqual(self.run_ok("alias", "list"), "postmaster@localhost: alice@localhost\n")
        self.assertEqual(mailstack("--data-dir", self.data, "alias", "add", "x@localhost",
                                   "not an address").returncode, 65)

    def test_config_file(self):
        """
        C{--config} takes the data directory from the server's file.
        """
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(f'data-dir = "{self.data}"\ndomain = ["example.test"]\n')
        result = mailstack("--config", path, "user", "add", "a@example.test", stdin="pw\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(self.run_ok("user", "list"), "a@example.test\n")
        result = mailstack("--config", path, "user", "add", "b@other.test", stdin="pw\n")
        self.assertIn("not a local domain", result.stderr)


class HelpTests(SynchronousTestCase):
    def test_no_epytext_markup(self):
        """
        C{mailstack --help} and every command's help read as plain text: the
        docstring's epytext markup (C{mailstack}) is not shown to the user.
        """
        from mailstack.cli import parser

        p = parser()
        texts = [p.format_help()]
        for action in p._actions:
            choices = getattr(action, "choices", None)
            if isinstance(choices, dict):
                texts += [sub.format_help() for sub in choices.values()]
        self.assertIn("The mailstack command: manage users", texts[0])
        for text in texts:
            self.assertIsNone(re.search(r"[A-Z]\{", text), text)
