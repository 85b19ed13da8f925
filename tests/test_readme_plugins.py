"""
The README's "Plugins" examples, extracted as they are printed, installed
in a mailstack/plugins/ directory outside the package, and run against a
real server with smtplib: each works when copied.
"""

import hashlib
import json
import os
import re
import sys
import tomllib

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from mailstack import plugins
from tests.support import (
    add_user, client_context, fast_hash, in_thread, read_messages, short_tempdir, smtp_session,
    start_server,
)
from tests.test_agents import until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "tcp:0:interface=127.0.0.1"


def readme_blocks():
    """
    Every literal block of the README whose first line is a comment naming
    a file: {name: text}.
    """
    with open(os.path.join(ROOT, "README.rst"), encoding="utf-8") as f:
        text = f.read()
    blocks = {}
    for match in re.finditer(r"::\n\n((?:    .*\n|\n)+)", text):
        lines = match.group(1).rstrip("\n").split("\n")
        code = "\n".join(line[4:] for line in lines) + "\n"
        first = code.split("\n", 1)[0]
        if first.startswith("# mailstack/plugins/") or first.startswith("# mailstack.toml"):
            blocks.setdefault(first[2:].strip(), code)
    return blocks


class ReadmeExampleTests(TestCase):
    def setUp(self):
        self.blocks = readme_blocks()
        root = self.mktemp()
        directory = os.path.join(root, "mailstack", "plugins")
        os.makedirs(directory)
        for name, code in self.blocks.items():
            if name.startswith("mailstack/plugins/"):
                with open(os.path.join(root, name), "w") as f:
                    f.write(code)
                module = "mailstack.plugins." + os.path.basename(name)[:-3]
                self.addCleanup(sys.modules.pop, module, None)
        plugins.__path__.append(directory)
        self.addCleanup(plugins.__path__.remove, directory)

    def test_all_four_extracted(self):
        self.assertEqual(sorted(n for n in self.blocks if n.startswith("mailstack/plugins/")),
                         ["mailstack/plugins/archive.py", "mailstack/plugins/bodyhash.py",
                          "mailstack/plugins/jsondb.py", "mailstack/plugins/keywords.py"])

    @inlineCallbacks
    def test_keywords_filter(self):
        config = tomllib.loads(self.blocks["mailstack.toml"])
        server = yield start_server(self, smtp=LISTEN, filter=config["filter"],
                                    plugins=config["plugins"], auth_checks="no")
        add_user(server, "alice@localhost")

        def talk(client):
            client.ehlo("client.test")
            client.sendmail("x@remote.test", ["alice@localhost"],
                            b"Subject: a\r\n\r\nYou are a WINNER\r\n")
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: b\r\n\r\nhi\r\n")

        yield in_thread(smtp_session, server.ports["smtp"], talk)
        [inbox] = read_messages(server, "alice@localhost")
        self.assertTrue(inbox.startswith(b"Return-Path: <x@remote.test>\nDelivered-To: "
                                         b"alice@localhost\nX-Keywords: 0 of 2\n"))
        junk = os.path.join(server.data_dir, "mail", "localhost", "alice", ".Junk", "new")
        [name] = os.listdir(junk)
        with open(os.path.join(junk, name), "rb") as f:
            self.assertIn(b"\nX-Keywords: 1 of 2\n", f.read())

    @inlineCallbacks
    def test_bodyhash_transform(self):
        server = yield start_server(self, submission=LISTEN, transform=["bodyhash"],
                                    plugins={"bodyhash": {"label": "test"}})
        add_user(server, "alice@localhost", "pw")
        context = client_context(server)

        def talk(client):
            client.ehlo("client.test")
            client.starttls(context=context)
            client.ehlo("client.test")
            client.login("alice@localhost", "pw")
            client.sendmail("alice@localhost", ["alice@localhost"],
                            b"Subject: s\r\n\r\nbody text\r\n")

        yield in_thread(smtp_session, server.ports["submission"], talk, host="localhost")
        [message] = read_messages(server, "alice@localhost")
        digest = hashlib.sha256(b"body text\n").hexdigest()
        self.assertIn(f"\nX-Body-Hash: test; sha256={digest}\n".encode(), message)

    @inlineCallbacks
    def test_archive_agent(self):
        directory = short_tempdir(self)
        server = yield start_server(self, smtp=LISTEN, delivery=["example.test=archive"],
                                    plugins={"archive": {"directory": directory}})
        add_user(server, "bob@example.test")

        def talk(client):
            client.ehlo("client.test")
            client.sendmail("x@remote.test", ["bob@example.test"], b"Subject: s\r\n\r\nkept\r\n")

        yield in_thread(smtp_session, server.ports["smtp"], talk)
        yield until(lambda: not server.queue.records)
        with open(os.path.join(directory, "bob@example.test", "1.eml"), "rb") as f:
            self.assertTrue(f.read().endswith(b"\n\nkept\n"))

    @inlineCallbacks
    def test_jsondb(self):
        path = os.path.join(short_tempdir(self), "users.json")
        with open(path, "w") as f:
            json.dump({"users": {"bob@example.test": fast_hash("pw")},
                       "aliases": {"team@example.test": ["bob@example.test"]}}, f)
        server = yield start_server(self, smtp=LISTEN, submission=LISTEN, user_db="jsondb",
                                    plugins={"jsondb": {"path": path}})
        context = client_context(server)

        def talk(client):
            client.ehlo("client.test")
            client.starttls(context=context)
            client.ehlo("client.test")
            client.login("bob@example.test", "pw")
            client.mail("team@example.test")
            return client.rcpt("nobody@example.test")[0], client.rcpt("team@example.test")[0]

        replies = yield in_thread(smtp_session, server.ports["submission"], talk,
                                  host="localhost")
        self.assertEqual(replies, (550, 250))
