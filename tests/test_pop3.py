"""
POP3 over the Maildirs, with poplib over real TLS on 127.0.0.1 port 0.
"""

import os
import poplib
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.access.pop3 import TopCut
from mailstack.wire import DotStuffer

from tests.support import (
    add_user, client_context, in_thread, maildir_files, smtp_session, start_server,
)

LISTEN = "tcp:0:interface=127.0.0.1"
BODY = b"Subject: dots\r\n\r\nfirst\r\n.\r\n..\r\n.x\r\nlast\r\n"



def pop_session(server, context, actions, tls=True, login=True, timeout=30):
    """
    In a thread: a poplib session with C{server} (after STLS and as alice,
    unless told otherwise) that runs C{actions(client)} and always QUITs.
    """
    def run():
        client = poplib.POP3("localhost", server.ports["pop3"], timeout=timeout)
        try:
            if tls:
                client.stls(context=context)
            if login:
                client.user("alice@localhost")
                client.pass_("alice-pw")
            return actions(client)
        finally:
            try:
                client.quit()
            except (poplib.error_proto, OSError):
                pass  # the test's own actions may have ended the session
    return in_thread(run)


class POP3Tests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

        def deliver(client):
            client.sendmail("x@remote.test", ["alice@localhost"], BODY)
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: two\r\n\r\n2\r\n")

        yield in_thread(smtp_session, self.server.ports["smtp"], deliver)

    def pop(self, actions, tls=True, login=True):
        return pop_session(self.server, self.context, actions, tls=tls, login=login)

    @inlineCallbacks
    def test_no_password_before_stls(self):
        """
        Before STLS, CAPA offers STLS and not USER, and USER is refused.
        """
        def probe(client):
            caps = client.capa()
            try:
                client.user("alice@localhost")
            except poplib.error_proto as e:
                return caps, e.args[0]

        caps, error = yield self.pop(probe, tls=False, login=False)
        self.assertIn("STLS", caps)
        self.assertNotIn("USER", caps)
        self.assertTrue(error.startswith(b"-ERR [AUTH]"))

    @inlineCallbacks
    def test_retrieve_byte_exact(self):
        """
        STAT, LIST and UIDL agree with the files; RETR gives the stored
        message with CRLF, dot lines intact after poplib un-stuffs them.
        """
        def read(client):
            return client.stat(), client.uidl(), client.retr(1), client.list()

        (count, total), uidl, (_, lines, octets), listing = yield self.pop(read)
        files = maildir_files(self.server, "alice@localhost")
        self.assertEqual(count, 2)
        with open(files[0], "rb") as f:
            stored = f.read()
        self.assertEqual(b"\r\n".join(lines) + b"\r\n", stored.replace(b"\n", b"\r\n"))
        self.assertTrue(stored.endswith(b"\nfirst\n.\n..\n.x\nlast\n"))
        served = [len(open(p, "rb").read().replace(b"\n", b"\r\n")) for p in files]
        self.assertEqual(total, sum(served))
        uids = [line.split()[1].decode() for line in uidl[1]]
        self.assertEqual(uids, [os.path.basename(p) for p in files])

    @inlineCallbacks
    def test_deleted_message_gone_from_listings(self):
        """
        RFC 1939: after DELE 1, STAT counts only message 2, LIST and UIDL
        list only 2 (UIDL broke off with an error in the middle of its
        listing, LIST showed "1 0"), LIST 1, UIDL 1, RETR 1 and a second
        DELE 1 are errors; RSET brings it back.
        """
        def run(client):
            before = client.stat(), client.list()[1], client.uidl()[1]
            client.dele(1)
            after = client.stat(), client.list()[1], client.uidl()[1]
            errors = []
            for command in ("LIST 1", "UIDL 1", "RETR 1", "TOP 1 0", "DELE 1"):
                try:
                    client._shortcmd(command)
                    errors.append((command, None))
                except poplib.error_proto as e:
                    errors.append((command, e.args[0]))
            client.rset()
            return before, after, errors, client.stat(), client.noop()

        before, after, errors, reset, noop = yield self.pop(run)
        (count, total), listing, uidl = before
        self.assertEqual(count, 2)
        (count_after, total_after), listing_after, uidl_after = after
        self.assertEqual(count_after, 1)
        self.assertEqual(total_after, int(listing[1].split()[1]))
        self.assertEqual(listing_after, [listing[1]])
        self.assertEqual(uidl_after, [uidl[1]])
        for command, error in errors:
            self.assertIsNotNone(error, command)
            self.assertTrue(error.startswith(b"-ERR"), (command, error))
        self.assertEqual(dict(errors)["DELE 1"], b"-ERR message 1 already deleted")
        self.assertEqual(reset, (count, total))
        self.assertTrue(noop.startswith(b"+OK"))

    @inlineCallbacks
    def test_dele_applies_at_quit(self):
        """
        DELE removes the file only at QUIT; a session that drops deletes nothing.
        """
        def dele_and_drop(client):
            client.dele(1)
            client.sock.shutdown(socket.SHUT_RDWR)  # drop the connection, no QUIT

        yield self.pop(dele_and_drop)
        self.assertEqual(len(maildir_files(self.server, "alice@localhost")), 2)
        yield self.pop(lambda client: client.dele(1))
        self.assertEqual(len(maildir_files(self.server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_wrong_password(self):
        def login(client):
            client.user("alice@localhost")
            try:
                client.pass_("nope")
            except poplib.error_proto as e:
                return e.args[0]

        error = yield self.pop(login, login=False)
        self.assertTrue(error.startswith(b"-ERR [AUTH]"))

    @inlineCallbacks
    def test_stls_injection(self):
        """
        Commands pipelined in clear text after STLS are not run inside TLS.
        """
        port = self.server.ports["pop3"]
        context = self.context

        def probe():
            with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
                raw.recv(1024)
                raw.sendall(b"STLS\r\nUSER alice@localhost\r\n")
                answer = raw.recv(1024)
                with context.wrap_socket(raw, server_hostname="localhost") as tls:
                    tls.sendall(b"PASS alice-pw\r\n")
                    return answer, tls.recv(1024)

        answer, after = yield in_thread(probe)
        self.assertTrue(answer.startswith(b"+OK"))
        self.assertEqual(answer.count(b"\r\n"), 1)
        self.assertTrue(after.startswith(b"-ERR"), after)

    @inlineCallbacks
    def test_renamed_and_removed_under_the_session(self):
        """
        RETR and DELE of a message whose file another session renamed find
        it under its new name (RETR hung with no answer and logged a
        traceback; DELE left the message in place); RETR of one another
        session removed is an C{-ERR}, and the session goes on.
        """
        yield in_thread(smtp_session, self.server.ports["smtp"], lambda client: client.sendmail(
            "x@remote.test", ["alice@localhost"], b"Subject: three\r\n\r\n3\r\n"))
        first, second, third = maildir_files(self.server, "alice@localhost")
        cur = os.path.join(os.path.dirname(os.path.dirname(first)), "cur")

        def work(client):
            client.stat()
            for path in (first, third):
                os.rename(path, os.path.join(cur, os.path.basename(path) + ":2,S"))
            os.unlink(second)
            retrieved = client.retr(1)[1]
            with self.assertRaises(poplib.error_proto) as gone:
                client.retr(2)
            client.dele(1)
            client.dele(3)  # never retrieved: still known by its old name
            return retrieved, gone.exception, client.stat()

        retrieved, gone, stat = yield self.pop(work)
        self.assertEqual(b"\r\n".join(retrieved).split(b"\r\n\r\n", 1)[1] + b"\r\n",
                         BODY.split(b"\r\n\r\n", 1)[1])
        self.assertTrue(str(gone).startswith("b'-ERR"), gone)
        self.assertEqual(stat[0], 1)  # the removed one, still listed
        self.assertEqual(maildir_files(self.server, "alice@localhost", "cur"), [])
        self.assertEqual(maildir_files(self.server, "alice@localhost", "new"), [])

def wire(client, command):
    """
    Send C{command} and return the answer as it came on the wire: the
    status line and, for a multi-line answer, its lines up to the
    terminator, still byte-stuffed, without their CRLFs.
    """
    client._putcmd(command)
    status = client.file.readline()
    if not status.startswith(b"+OK"):
        return status.rstrip(b"\r\n"), None
    lines = []
    while True:
        line = client.file.readline()
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
            raise AssertionError(f"bare CR or LF on the wire: {line!r}")
        if line == b".\r\n":
            return status.rstrip(b"\r\n"), lines
        lines.append(line[:-2])


# name -> stored content; RETR and TOP must answer these exactly.
PLANTED = {
    "no-body": b"Subject: no body\nX-A: b\n",
    "dots": b"Subject: dots\n\n.one\n..two\nthree\n.\n",
    "bare-cr": b"Subject: cr\n\na\rb\r\n.c\rd",
    "no-final-lf": b"Subject: short\n\nl1\nl2",
    "empty-header": b"\nbody1\nbody2\n",
}


class RetrTopTests(TestCase):
    """
    RETR and TOP on the wire (issue 18 rewrote how they are sent): dot
    stuffing, CRLF for any line end, TOP's cut, messages larger than one
    read, and a message removed under a session.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, smtp=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        self.context = client_context(self.server)

        def deliver(client):
            client.sendmail("x@remote.test", ["alice@localhost"], b"Subject: one\r\n\r\n1\r\n")

        yield in_thread(smtp_session, self.server.ports["smtp"], deliver)
        self.new = os.path.dirname(maildir_files(self.server, "alice@localhost")[0])

    def plant(self, messages):
        for name, content in messages.items():
            with open(os.path.join(self.new, name), "wb") as f:
                f.write(content)

    def session(self, actions):
        """
        Run C{actions(client, numbers)} in a logged-in session, C{numbers}
        mapping each message's unique name to its number.
        """
        def with_numbers(client):
            numbers = {line.split()[1].decode(): int(line.split()[0])
                       for line in client.uidl()[1]}
            return actions(client, numbers)
        return pop_session(self.server, self.context, with_numbers, timeout=10)

    @inlineCallbacks
    def test_retr_and_top_edge_cases(self):
        """
        A message without a body (TOP gives the whole header), body lines
        starting with a dot (stuffed), a bare CR and a CRLF in the store
        (each a line end, never a bare CR on the wire), n larger than the
        body and a last line without LF (Twisted's TOP dropped it), an
        empty header.
        """
        self.plant(PLANTED)

        def run(client, numbers):
            answers = {}
            for name in PLANTED:
                n = numbers[name]
                answers[name] = {
                    command: wire(client, command % n)
                    for command in ("RETR %d", "TOP %d 0", "TOP %d 1", "TOP %d 2", "TOP %d 99")}
            return answers

        answers = yield self.session(run)
        header = [b"Subject: no body", b"X-A: b"]
        for command in ("RETR %d", "TOP %d 0", "TOP %d 2", "TOP %d 99"):
            self.assertEqual(answers["no-body"][command][1], header, command)
        dots = answers["dots"]
        self.assertEqual(dots["RETR %d"][1],
                         [b"Subject: dots", b"", b"..one", b"...two", b"three", b".."])
        self.assertEqual(dots["TOP %d 0"][1], [b"Subject: dots", b""])
        self.assertEqual(dots["TOP %d 2"][1], [b"Subject: dots", b"", b"..one", b"...two"])
        self.assertEqual(dots["TOP %d 99"][1], dots["RETR %d"][1])
        cr = answers["bare-cr"]
        self.assertEqual(cr["RETR %d"][1], [b"Subject: cr", b"", b"a", b"b", b"..c", b"d"])
        self.assertEqual(cr["TOP %d 2"][1], [b"Subject: cr", b"", b"a", b"b"])
        self.assertEqual(cr["TOP %d 99"][1], cr["RETR %d"][1])
        short = answers["no-final-lf"]
        self.assertEqual(short["TOP %d 99"][1], [b"Subject: short", b"", b"l1", b"l2"])
        self.assertEqual(short["TOP %d 1"][1], [b"Subject: short", b"", b"l1"])
        self.assertEqual(short["RETR %d"][1], short["TOP %d 99"][1])
        empty = answers["empty-header"]
        self.assertEqual(empty["TOP %d 0"][1], [b""])
        self.assertEqual(empty["TOP %d 1"][1], [b"", b"body1"])
        self.assertEqual(empty["RETR %d"][1], [b"", b"body1", b"body2"])
        for name in PLANTED:
            status = answers[name]["RETR %d"][0]
            self.assertTrue(status.startswith(b"+OK "), status)

    @inlineCallbacks
    def test_large_message(self):
        """
        A message of several reads (read on the thread pool): RETR gives it
        whole and stuffed; TOP cuts right where the header and the lines
        asked for cross a read boundary.
        """
        header = b"".join(b"X-Pad-%05d: %s\n" % (i, b"h" * 60) for i in range(1200))  # ~90 KiB
        body = b"".join((b"." if i % 7 == 0 else b"") + b"line %06d %s\n" % (i, b"b" * 80)
                        for i in range(4000))  # ~370 KiB
        content = header + b"\n" + body
        self.plant({"large": content})

        def run(client, numbers):
            n = numbers["large"]
            return (wire(client, "RETR %d" % n), wire(client, "TOP %d 3" % n),
                    wire(client, "TOP %d 3999" % n), client.noop(),
                    (client._shortcmd("LAST"), n))

        retr, top, top_all_but_one, noop, (last, n) = yield self.session(run)
        stored = content.split(b"\n")[:-1]
        stuffed = [b"." + line if line.startswith(b".") else line for line in stored]
        self.assertEqual(retr[1], stuffed)
        self.assertEqual(top[1], stuffed[:1200 + 1 + 3])
        self.assertEqual(top_all_but_one[1], stuffed[:-1])
        self.assertTrue(noop.startswith(b"+OK"))
        self.assertEqual(last, b"+OK %d" % n)  # Twisted's LAST (RFC 1725) still counts RETR

    @inlineCallbacks
    def test_large_retr_not_read(self):
        """
        A client that sends RETR of a large message and reads none of it
        holds the server to what the transport buffers (the next chunk is
        read only when the last one is taken); when it goes away the file
        is closed.
        """
        path = os.path.join(self.new, "huge")
        self.plant({"huge": b"Subject: huge\n\n" + (b"x" * 99 + b"\n") * 200000})  # 20 MB

        def open_on_it():
            names = []
            for fd in os.listdir("/proc/self/fd"):
                try:
                    names.append(os.readlink(os.path.join("/proc/self/fd", fd)))
                except OSError:
                    pass
            return names.count(path)

        def start():
            client = poplib.POP3("localhost", self.server.ports["pop3"], timeout=10)
            client.stls(context=self.context)
            client.user("alice@localhost")
            client.pass_("alice-pw")
            numbers = {line.split()[1]: line.split()[0] for line in client.uidl()[1]}
            client._putcmd("RETR %s" % numbers[b"huge"].decode())
            return client

        client = yield in_thread(start)
        self.addCleanup(client.file.close)
        self.addCleanup(client.sock.close)
        for _ in range(20):  # the server sends what the socket takes, then waits
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(open_on_it(), 1)
        client.file.close()  # it holds the socket open too
        client.sock.close()
        for _ in range(200):
            if not open_on_it():
                break
            yield deferLater(reactor, 0.05, lambda: None)
        self.assertEqual(open_on_it(), 0)

    @inlineCallbacks
    def test_message_removed_under_the_session(self):
        """
        A message deleted by another session after the listing: RETR and
        TOP answer -ERR (Twisted sent no answer at all and the client
        waited), and the session goes on serving the others.
        """
        self.plant({"gone": b"Subject: gone\n\nx\n", "stays": b"Subject: stays\n\ny\n"})

        def run(client, numbers):
            os.unlink(os.path.join(self.new, "gone"))
            return (wire(client, "RETR %d" % numbers["gone"]),
                    wire(client, "TOP %d 1" % numbers["gone"]),
                    wire(client, "RETR %d" % numbers["stays"]))

        retr, top, other = yield self.session(run)
        self.assertEqual(retr, (b"-ERR [SYS/PERM] message no longer exists", None))
        self.assertEqual(top, (b"-ERR [SYS/PERM] message no longer exists", None))
        self.assertEqual(other[1], [b"Subject: stays", b"", b"y"])


class TopCutTests(SynchronousTestCase):
    """
    L{TopCut} after L{DotStuffer} gives the same answer however the
    content is cut into reads.
    """

    def reference(self, content, lines):
        stored = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        rows = stored.split(b"\n")
        if rows[-1] == b"":
            rows.pop()
        if b"" in rows:
            blank = rows.index(b"")
            rows = rows[:blank + 1 + lines]
        return b"".join((b"." if r.startswith(b".") else b"") + r + b"\r\n" for r in rows)

    def test_every_split(self):
        """
        Every message of L{PLANTED} and a few more, cut at every pair of
        positions, for n from 0 to 4.
        """
        contents = list(PLANTED.values()) + [
            b"A: b\r\n\r\n.x\r\n\r\ny\r\nz\r\n", b"\n\n\n.\n", b"A: b\n\r\n\r\n", b""]
        for content in contents:
            for lines in range(5):
                expected = self.reference(content, lines)
                for i in range(len(content) + 1):
                    for j in range(i, len(content) + 1):
                        stuffer, top = DotStuffer(), TopCut(lines)
                        out = b"".join(top(stuffer(part))
                                       for part in (content[:i], content[i:j], content[j:]))
                        if not top.done:
                            out += top(stuffer.finish()[:-3])
                        self.assertEqual(out, expected, (content, lines, i, j))
