"""
Catch-all aliases (C{mailstack alias add '@domain' TARGET}): they take
mail for any address of the domain that no user or alias takes.
"""

import os
import subprocess
import sys

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import local_address, parse_address
from mailstack.delivery.router import AliasLoop, Router, UnknownRecipient
from mailstack.users import AliasMap, UserDatabase
from tests.support import fast_hash, short_tempdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mailstack(data, *args):
    return subprocess.run([sys.executable, "-m", "mailstack", "--data-dir", data, *args],
                          capture_output=True, text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=ROOT))


class CatchAllTests(SynchronousTestCase):
    def setUp(self):
        self.data = short_tempdir(self)
        self.users = UserDatabase(self.data)
        self.aliases = AliasMap(self.data)
        for user in ("alice@example.test", "bob@example.test", "carol@other.test"):
            self.users.add(local_address(user), fast_hash("pw"))
        self.router = Router(frozenset({"example.test", "other.test"}), self.users,
                             self.aliases)

    def resolve(self, address):
        resolution = self.router.resolve(parse_address(address))
        return ([str(r.user) for r in resolution.local],
                [str(r) for r in resolution.remote])

    def test_command_and_routing(self):
        """
        C{alias add '@example.test'} works from the command line; unknown
        addresses of that domain reach the target; users (with +tags) and
        explicit aliases win; other domains are not affected.
        """
        result = mailstack(self.data, "alias", "add", "@Example.TEST", "alice@example.test")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, "@example.test: alice@example.test\n")
        self.assertEqual(mailstack(self.data, "alias", "add", "sales@example.test",
                                   "bob@example.test", "x@remote.test").returncode, 0)
        self.assertEqual(mailstack(self.data, "alias", "list").stdout,
                         "@example.test: alice@example.test\n"
                         "sales@example.test: bob@example.test, x@remote.test\n")
        self.assertEqual(self.resolve("anything@example.test")[0], ["alice@example.test"])
        self.assertEqual(self.resolve("bob@example.test")[0], ["bob@example.test"])
        self.assertEqual(self.resolve("bob+tag@example.test")[0], ["bob@example.test"])
        self.assertEqual(self.resolve("sales@example.test"),
                         (["bob@example.test"], ["x@remote.test"]))
        with self.assertRaises(UnknownRecipient):
            self.resolve("anything@other.test")
        result = mailstack(self.data, "alias", "del", "@example.test")
        self.assertEqual(result.returncode, 0, result.stderr)
        with self.assertRaises(UnknownRecipient):
            self.resolve("anything@example.test")
        self.assertEqual(mailstack(self.data, "alias", "del", "@example.test").returncode, 67)
        self.assertEqual(mailstack(self.data, "alias", "add", "@bad..domain",
                                   "alice@example.test").returncode, 65)

    def test_remote_target_and_loop(self):
        """
        A catch-all may forward to a remote address; one whose target is
        itself unknown in the domain is a loop, refused.
        """
        self.aliases.add("@other.test", (parse_address("all@remote.test"),))
        self.assertEqual(self.resolve("who@other.test"), ([], ["all@remote.test"]))
        self.assertEqual(self.resolve("carol@other.test")[0], ["carol@other.test"])
        self.aliases.add("@example.test", (parse_address("nobody@example.test"),))
        with self.assertRaises(AliasLoop):
            self.resolve("who@example.test")
