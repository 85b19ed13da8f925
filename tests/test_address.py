"""
Tests for L{mailstack.address}.
"""

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import (
    Address, AddressError, NonASCIIError, SourceRouteError, local_address, mailbox_name,
    normalize_domain, parse_path,
)


class AddressTests(SynchronousTestCase):
    def test_paths(self):
        """
        SMTP paths: brackets, the null path, quoted local parts, domain case.
        """
        self.assertIsNone(parse_path("<>"))
        self.assertEqual(parse_path("<Bob@Example.ORG>"), Address("Bob", "example.org"))
        self.assertEqual(parse_path('<"a b"@x.test>'), Address('"a b"', "x.test"))
        self.assertEqual(parse_path("<u@[127.0.0.1]>"), Address("u", "[127.0.0.1]"))

    def test_bad_paths(self):
        for text in ("u@x.test", "<u>", "<@x.test>", "<a..b@x.test>", "<.a@x.test>",
                     "<u@x_y.test>", "<u@>", "<" + "a" * 65 + "@x.test>",
                     "<u@" + "a" * 64 + ".test>"):
            self.assertRaises(AddressError, parse_path, text)
        self.assertRaises(SourceRouteError, parse_path, "<@a.test,@b.test:u@c.test>")
        self.assertRaises(NonASCIIError, parse_path, "<jö@x.test>")

    def test_idna(self):
        self.assertEqual(normalize_domain("Bücher.Example."), "xn--bcher-kva.example")

    def test_plus(self):
        self.assertEqual(Address("u+tag+x", "x.test").base, Address("u", "x.test"))
        self.assertEqual(Address("+tag", "x.test").base, Address("+tag", "x.test"))

    def test_mailbox_names_are_safe(self):
        """
        A local user's name is one safe path component, whatever is asked.
        """
        self.assertEqual(mailbox_name("Alice.Smith-1_x"), "alice.smith-1_x")
        for bad in ("..", ".", "a/b", "../x", ".hidden", "a..b", "x.", "a+b", "", "a\0b",
                    "a b", "é", "a" * 65):
            self.assertRaises(AddressError, mailbox_name, bad)
        self.assertRaises(AddressError, local_address, "u@[127.0.0.1]")
        self.assertEqual(local_address(" Alice@LocalHost "), Address("alice", "localhost"))
