"""
Tests for L{mailstack.users} and L{mailstack.delivery.router}.
"""

import os

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import Address, local_address
from mailstack.delivery.router import AliasLoop, Router, UnknownRecipient
from mailstack.message import LocalRecipient
from mailstack.users import AliasMap, UserDatabase


def A(text):
    return local_address(text)


class UserDatabaseTests(SynchronousTestCase):
    def setUp(self):
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.users = UserDatabase(self.dir)

    def test_add_and_reload(self):
        """
        A second instance (the server) sees what the first (the command)
        wrote, without being told; the file is private.
        """
        server = UserDatabase(self.dir)
        self.assertFalse(server.exists(A("alice@localhost")))
        self.users.add(A("Alice@LOCALHOST"), "$argon2id$hash")
        self.assertTrue(server.exists(Address("ALICE", "localhost")))
        self.assertEqual(server.password_hash(A("alice@localhost")), "$argon2id$hash")
        self.assertEqual(os.stat(self.users.path).st_mode & 0o777, 0o600)
        self.users.set_password(A("alice@localhost"), "$argon2id$other")
        self.assertEqual(server.password_hash(A("alice@localhost")), "$argon2id$other")
        self.users.delete(A("alice@localhost"))
        self.assertFalse(server.exists(A("alice@localhost")))

    def test_duplicates_and_missing(self):
        self.users.add(A("a@x.test"), "h")
        self.assertRaises(KeyError, self.users.add, A("a@x.test"), "h")
        self.assertRaises(KeyError, self.users.delete, A("b@x.test"))
        self.assertRaises(KeyError, self.users.set_password, A("b@x.test"), "h")

    def test_file_format(self):
        """
        One C{address:hash} line per user.
        """
        self.users.add(A("b@x.test"), "h2")
        self.users.add(A("a@x.test"), "h1")
        with open(self.users.path) as f:
            self.assertEqual(f.read(), "a@x.test:h1\nb@x.test:h2\n")


class RouterTests(SynchronousTestCase):
    def setUp(self):
        d = self.mktemp()
        os.makedirs(d)
        self.users, self.aliases = UserDatabase(d), AliasMap(d)
        for user in ("alice@localhost", "bob@localhost"):
            self.users.add(A(user), "h")
        self.router = Router(frozenset({"localhost"}), self.users, self.aliases)

    def alias(self, name, *targets):
        self.aliases.add(A(name), tuple(Address(*t.split("@")) for t in targets))

    def test_user_and_plus(self):
        r = self.router.resolve(Address("Alice+News", "localhost"))
        self.assertEqual(r.local, (LocalRecipient(A("alice@localhost"),
                                                  Address("Alice+News", "localhost")),))
        self.assertRaises(UnknownRecipient, self.router.resolve, Address("carol", "localhost"))

    def test_remote(self):
        r = self.router.resolve(Address("x", "remote.test"))
        self.assertEqual((r.local, r.remote), ((), (Address("x", "remote.test"),)))

    def test_aliases(self):
        """
        Aliases expand recursively, to local users and remote addresses.
        """
        self.alias("team@localhost", "alice@localhost", "ops@localhost")
        self.alias("ops@localhost", "bob@localhost", "pager@remote.test")
        r = self.router.resolve(Address("team", "localhost"))
        self.assertEqual([str(x.user) for x in r.local], ["alice@localhost", "bob@localhost"])
        self.assertEqual(r.remote, (Address("pager", "remote.test"),))
        r = self.router.resolve(Address("team+x", "localhost"))
        self.assertEqual(len(r.local), 2)

    def test_self_reference_keeps_a_copy(self):
        self.alias("alice@localhost", "alice@localhost", "bob@localhost")
        r = self.router.resolve(Address("alice", "localhost"))
        self.assertEqual([str(x.user) for x in r.local], ["alice@localhost", "bob@localhost"])

    def test_loops(self):
        self.alias("a@localhost", "b@localhost")
        self.alias("b@localhost", "c@localhost")
        self.alias("c@localhost", "a@localhost")
        self.assertRaises(AliasLoop, self.router.resolve, Address("a", "localhost"))

    def test_alias_to_nobody(self):
        self.alias("x@localhost", "ghost@localhost")
        self.assertRaises(UnknownRecipient, self.router.resolve, Address("x", "localhost"))
