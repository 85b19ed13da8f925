"""
Messages built to stall the server (issue 11 item 5), mailed to port 25
and fetched over IMAP: the MIME limits hold, the answers are valid, the
parse runs in a worker thread, and another session is served meanwhile.
"""

import re
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.access import imap as imap_module
from mailstack.access.cache import PartCache
from mailstack.access.limits import MAX_ENVELOPE_ADDRESSES, MAX_MIME_DEPTH, MAX_MIME_PARTS
from mailstack.access.mime import Part
from tests.support import (
    IMAPSession, add_user, client_context, in_thread, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"


def many_parts(count=60_000):
    body = b"".join(b"--b\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i
                    for i in range(count))
    return (b"From: a@remote.test\r\nTo: alice@localhost\r\nSubject: parts\r\n"
            b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n"
            + body + b"--b--\r\n")


def many_addresses(count=150_000):
    to = b"To: " + b",\r\n ".join(b"user%d@example.test" % i for i in range(count))
    return b"From: a@remote.test\r\n" + to + b"\r\nSubject: addresses\r\n\r\nhi\r\n"


def deep(depth=5_000):
    head = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i)
                    for i in range(depth))
    tail = b"".join(b"\r\n--b%d--\r\n" % i for i in reversed(range(depth)))
    return (b"From: a@remote.test\r\nTo: alice@localhost\r\nSubject: deep\r\nMIME-Version: 1.0\r\n"
            + head + b"Content-Type: text/plain\r\n\r\ndeep inside" + tail)


class LimitTests(SynchronousTestCase):
    """
    The limits on the parse itself.
    """

    def test_part_limit(self):
        part = Part(many_parts(12_000).replace(b"\r\n", b"\r\n")).parse_all()
        children = part.children()
        self.assertEqual(part.budget.parts, MAX_MIME_PARTS + 1)
        self.assertEqual(children[-1].type, "application/octet-stream")
        self.assertTrue(children[-1].raw.startswith(b"Content-Type: text/plain\r\n\r\npart 9999"))
        self.assertTrue(children[-1].raw.endswith(b"part 11999"))  # the rest, whole
        self.assertEqual(part.section((2,), ""), b"part 1")

    def test_depth_limit(self):
        part = Part(deep()).parse_all()
        self.assertEqual(part.budget.parts, MAX_MIME_DEPTH + 2)
        node, levels = part, 0
        while node.children():
            node, levels = node.children()[0], levels + 1
        self.assertEqual(levels, MAX_MIME_DEPTH + 1)
        self.assertTrue(node.opaque)
        structure = part.bodystructure(True)  # no RecursionError
        self.assertEqual(structure.count(b'"MIXED"'), MAX_MIME_DEPTH + 1)
        self.assertEqual(structure.count(b"("), structure.count(b")"))

    def test_message_rfc822_nesting(self):
        """
        message/rfc822 inside message/rfc822 counts towards the depth too.
        """
        inner = b"Subject: innermost\r\n\r\nbody\r\n"
        for _ in range(3000):
            inner = b"Content-Type: message/rfc822\r\n\r\n" + inner
        part = Part(b"Subject: outer\r\n" + inner).parse_all()
        self.assertLessEqual(part.budget.parts, MAX_MIME_DEPTH + 2)
        part.bodystructure(True)

    def test_address_limit(self):
        envelope = Part(many_addresses()).envelope()
        self.assertEqual(envelope.count(b'"example.test")'), MAX_ENVELOPE_ADDRESSES)

    def test_cache_bounded(self):
        cache = PartCache(max_bytes=1000, max_entries=3)
        for i in range(5):
            cache.put(i, str(i), 100)
        self.assertEqual(len(cache), 3)
        self.assertIsNone(cache.get(0))
        self.assertEqual(cache.get(4), "4")
        cache.put("big", "x", 900)  # over a quarter of the cache: not kept
        self.assertIsNone(cache.get("big"))
        cache.put(5, "5", 240)
        cache.put(6, "6", 240)
        cache.put(7, "7", 240)
        cache.put(8, "8", 240)
        self.assertLessEqual(cache._bytes, 1000)


class Session(IMAPSession):
    def __init__(self, server, context):
        super().__init__(server, context, timeout=120)
        self.command(b"s SELECT INBOX")


class CraftedMailTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, imaps=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

        def deliver(client):
            for message in (many_parts(), many_addresses(), deep()):
                client.sendmail("a@remote.test", ["alice@localhost"], message)
        yield in_thread(smtp_session, self.server.ports["smtp"], deliver)

    @inlineCallbacks
    def test_fetch_crafted(self):
        """
        BODYSTRUCTURE, ENVELOPE and sections of the three messages get
        valid answers within the limits.
        """
        def run():
            session = Session(self.server, self.context)
            try:
                return [session.command(line) for line in (
                    b"f1 FETCH 1 BODYSTRUCTURE", b"f2 FETCH 1 (BODY.PEEK[2] BODY.PEEK[3.MIME])",
                    b"f3 FETCH 2 ENVELOPE", b"f4 FETCH 3 BODYSTRUCTURE",
                    b"f5 FETCH 3 BODY.PEEK[1.1]", b"f6 FETCH 1:3 ENVELOPE")]
            finally:
                session.close()

        f1, f2, f3, f4, f5, f6 = yield in_thread(run)
        for reply in (f1, f2, f3, f4, f5, f6):
            self.assertRegex(reply.splitlines()[-1], rb"^f\d OK")
        self.assertEqual(f1.count(b'("TEXT" "PLAIN"'), MAX_MIME_PARTS - 1)
        self.assertEqual(f1.count(b'("APPLICATION" "OCTET-STREAM"'), 1)
        self.assertIn(b"BODY[2] {6}\r\npart 1", f2)
        self.assertIn(b"BODY[3.MIME] {28}\r\nContent-Type: text/plain\r\n\r\n", f2)
        self.assertEqual(f3.count(b'"example.test")'), MAX_ENVELOPE_ADDRESSES)
        self.assertEqual(f4.count(b'"MIXED"'), MAX_MIME_DEPTH + 1)
        self.assertIn(b"\r\n--b2\r\n", f5)
        self.assertEqual(len(re.findall(rb"^\* \d FETCH \(ENVELOPE", f6, re.M)), 3)

    @inlineCallbacks
    def test_parse_off_reactor_thread(self):
        """
        The parse and the rendering run in a worker thread: while a parse
        is held there, another session's NOOP is answered.
        """
        started, release = threading.Event(), threading.Event()
        threads = []
        parse_all, render_all = Part.parse_all, imap_module.render_all

        def held_parse(part):
            threads.append(("parse", threading.current_thread()))
            started.set()
            release.wait(60)
            return parse_all(part)

        def spied_render(*args):
            threads.append(("render", threading.current_thread()))
            return render_all(*args)

        self.patch(Part, "parse_all", held_parse)
        self.patch(imap_module, "render_all", spied_render)

        def fetcher():
            session = Session(self.server, self.context)
            try:
                return session.command(b"f FETCH 1 BODYSTRUCTURE")
            finally:
                session.close()

        def other():
            started.wait(60)
            session = Session(self.server, self.context)
            try:
                return session.command(b"n NOOP"), release.is_set()
            finally:
                release.set()
                session.close()

        fetched = in_thread(fetcher)
        noop, released = yield in_thread(other)
        self.assertIn(b"n OK", noop)
        self.assertFalse(released)  # answered while the parse was held
        reply = yield fetched
        self.assertIn(b"f OK", reply)
        self.assertEqual({kind for kind, _ in threads}, {"parse", "render"})
        for kind, thread in threads:
            self.assertIsNot(thread, threading.main_thread(), kind)
