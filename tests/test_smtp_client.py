"""
Tests for L{mailstack.smtp.client}: the dot-stuffer at every chunk
boundary, and the dialog over a StringTransport with a fake clock.
"""

import io

from twisted.internet.defer import ensureDeferred
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from mailstack.smtp.client import (
    DotStuffer, SMTPClientError, SMTPClientProtocol, Timeouts, TLSRequired, Transaction,
    send_transaction,
)
from mailstack.smtp.data import DataReader


def stuff(content, cuts):
    stuffer = DotStuffer()
    out, start = [], 0
    for cut in list(cuts) + [len(content)]:
        out.append(stuffer(content[start:cut]))
        start = cut
    return b"".join(out) + stuffer.finish()


class DotStufferTests(SynchronousTestCase):
    CONTENT = b".first\n..two\nmid\n.\n\n.x\nend.\n."

    def test_every_boundary(self):
        """
        Wherever the content is cut, and into however many pieces, the
        result is the same, correctly stuffed, and a reader gets the
        original content back (the chunk-boundary hole of Twisted's sender).
        """
        expected = stuff(self.CONTENT, [])
        self.assertEqual(expected,
                         b"..first\r\n...two\r\nmid\r\n..\r\n\r\n..x\r\nend.\r\n..\r\n.\r\n")
        n = len(self.CONTENT)
        for i in range(n + 1):
            for j in range(i, n + 1):
                self.assertEqual(stuff(self.CONTENT, [i, j]), expected, (i, j))
        stored = []
        reader = DataReader(stored.append, 10**6)
        self.assertEqual(reader.feed(expected), b"")
        self.assertEqual(b"".join(stored), self.CONTENT + b"\n")

    def test_single_bytes(self):
        self.assertEqual(stuff(self.CONTENT, range(1, len(self.CONTENT))),
                         stuff(self.CONTENT, []))

    def test_no_bare_cr_or_lf(self):
        """
        Content in the queue with bare CRs and CRLFs (mail that did not come
        through SMTP DATA): every CR goes out as part of a CRLF, so the
        C{\\r.\\r} of an outbound smuggling attempt is a stuffed dot line,
        wherever the chunks are cut.
        """
        content = b"hello\r.\rMAIL FROM:<a@evil.test>\r\nx\r\r\n.\r"
        expected = b"hello\r\n..\r\nMAIL FROM:<a@evil.test>\r\nx\r\n\r\n..\r\n.\r\n"
        for i in range(len(content) + 1):
            for j in range(i, len(content) + 1):
                self.assertEqual(stuff(content, [i, j]), expected, (i, j))
        stored = []
        reader = DataReader(stored.append, 10**6)
        self.assertEqual(reader.feed(expected), b"")
        self.assertIsNone(reader.rejection)


class DialogTests(SynchronousTestCase):
    """
    The client against scripted replies.
    """

    def setUp(self):
        self.clock = Clock()
        self.proto = SMTPClientProtocol(self.clock)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def start(self, content=b"Subject: x\n\n.hi\n", recipients=("a@x.test", "b@x.test"),
              **kwargs):
        transaction = Transaction("s@y.test", list(recipients), io.BytesIO(content), len(content))
        self.result = ensureDeferred(send_transaction(self.proto, "me.test", transaction,
                                                      timeouts=Timeouts(), **kwargs))

    def server(self, *replies):
        for reply in replies:
            self.proto.dataReceived(reply)

    def sent(self):
        value = self.transport.value()
        self.transport.clear()
        return value

    def test_per_recipient_results(self):
        """
        Each recipient gets its own RCPT answer; DATA's answer applies to the
        accepted ones; SIZE and BODY are declared when offered.
        """
        self.start()
        self.server(b"220 mx ESMTP\r\n",  # greeting
                    b"250-mx\r\n250-SIZE 1000\r\n250 8BITMIME\r\n")  # EHLO
        self.assertEqual(self.sent(),
                         b"EHLO me.test\r\nMAIL FROM:<s@y.test> SIZE=16 BODY=8BITMIME\r\n")
        self.server(b"250 2.1.0 ok\r\n")  # MAIL
        self.server(b"250 2.1.5 ok\r\n")  # RCPT a
        self.server(b"550 5.1.1 unknown\r\n")  # RCPT b
        self.server(b"354 go\r\n")  # DATA
        while self.transport.producer is not None:  # a real transport pulls by itself
            self.transport.producer.resumeProducing()
        self.assertTrue(self.sent().endswith(b"DATA\r\nSubject: x\r\n\r\n..hi\r\n.\r\n"))
        self.server(b"250 2.0.0 queued\r\n", b"221 bye\r\n")
        result = self.successResultOf(self.result)
        self.assertEqual(result.reply_for("a@x.test")[:2], (250, "2.0.0"))
        self.assertEqual(result.reply_for("b@x.test")[:2], (550, "5.1.1"))

    def test_pipelined(self):
        """
        With PIPELINING, MAIL, the RCPTs and DATA go in one write and the
        replies are matched in order.
        """
        self.start()
        self.server(b"220 mx ESMTP\r\n", b"250-mx\r\n250 PIPELINING\r\n")
        self.assertEqual(self.sent(), b"EHLO me.test\r\nMAIL FROM:<s@y.test>\r\n"
                                      b"RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n")
        self.server(b"250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n354 go\r\n")
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertEqual(self.sent(), b"Subject: x\r\n\r\n..hi\r\n.\r\n")
        self.server(b"250 2.0.0 queued\r\n", b"221 bye\r\n")
        result = self.successResultOf(self.result)
        self.assertEqual(result.reply_for("a@x.test")[:2], (550, "5.1.1"))
        self.assertEqual(result.reply_for("b@x.test")[:2], (250, "2.0.0"))

    def test_content_in_memory_is_one_write(self):
        """
        Content in memory (what the queue reads ahead for small mail) goes
        out dot-stuffed with the final dot in a single write, with no
        producer; the MAIL/RCPT/DATA group is one write before it.
        """
        writes = []
        write = self.transport.write
        self.transport.write = lambda data: (writes.append(data), write(data))[1]
        self.start(content=b"Subject: x\n\n.hi\nbye")
        self.server(b"220 mx ESMTP\r\n", b"250-mx\r\n250 PIPELINING\r\n")
        del writes[:]
        self.server(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsNone(self.transport.producer)
        self.assertEqual(writes, [b"Subject: x\r\n\r\n..hi\r\nbye\r\n.\r\n"])
        self.server(b"250 2.0.0 queued\r\n", b"221 bye\r\n")
        self.assertEqual(self.successResultOf(self.result).data.code, 250)

    def test_content_from_a_file_is_streamed(self):
        """
        Content that is not in memory (a large message's open file) is
        streamed by a producer, and dot-stuffed the same way.
        """
        class File(io.BufferedReader):
            pass

        content = b"Subject: x\n\n.hi\n" + b"y" * 40000 + b"\n"
        transaction = Transaction("s@y.test", ["a@x.test"], File(io.BytesIO(content)),
                                  len(content))
        self.result = ensureDeferred(send_transaction(self.proto, "me.test", transaction,
                                                      timeouts=Timeouts()))
        self.server(b"220 mx ESMTP\r\n", b"250-mx\r\n250 PIPELINING\r\n")
        self.sent()
        self.server(b"250 ok\r\n250 ok\r\n354 go\r\n")
        self.assertIsNotNone(self.transport.producer)
        while self.transport.producer is not None:
            self.transport.producer.resumeProducing()
        self.assertEqual(self.sent(), b"Subject: x\r\n\r\n..hi\r\n" + b"y" * 40000
                         + b"\r\n.\r\n")
        self.server(b"250 2.0.0 queued\r\n", b"221 bye\r\n")
        self.assertEqual(self.successResultOf(self.result).data.code, 250)

    def test_pipelined_closed_after_421(self):
        """
        A server that answers a RCPT with 421 and closes: that recipient
        gets the 421, the ones without an answer are deferred, no content is
        sent, and nothing raises.
        """
        self.start()
        self.server(b"220 mx ESMTP\r\n", b"250-mx\r\n250 PIPELINING\r\n")
        self.sent()
        self.server(b"250 ok\r\n421 4.3.2 shutting down\r\n")
        self.proto.connectionLost(Failure(ConnectionDone()))
        result = self.successResultOf(self.result)
        self.assertEqual(result.reply_for("a@x.test")[:2], (421, "4.3.2"))
        self.assertEqual(result.reply_for("b@x.test").code, 421)
        self.assertNotIn(b"Subject", self.sent())

    def test_size_refused_before_sending(self):
        """
        A message over the server's SIZE is not sent at all.
        """
        self.start(content=b"x" * 2000)
        self.server(b"220 mx\r\n", b"250-mx\r\n250 SIZE 1000\r\n")
        failure = self.failureResultOf(self.result, SMTPClientError)
        self.assertEqual(failure.value.reply.code, 552)

    def test_timeout(self):
        """
        A server that does not answer is given up on after the RFC time.
        """
        self.start()
        self.clock.advance(299)
        self.assertNoResult(self.result)
        self.clock.advance(2)
        self.failureResultOf(self.result, TimeoutError)
        self.assertTrue(self.transport.disconnecting)

    def test_no_password_without_tls(self):
        """
        Credentials are never sent when TLS did not happen.
        """
        self.start(credentials=("u", "p"))
        self.server(b"220 mx\r\n", b"250-mx\r\n250 AUTH PLAIN\r\n")
        self.failureResultOf(self.result, TLSRequired)
        self.assertNotIn(b"AUTH", self.sent())

    def test_require_tls(self):
        self.start(require_tls=True)
        self.server(b"220 mx\r\n", b"250 mx\r\n")
        self.failureResultOf(self.result, TLSRequired)

    def test_malformed_reply(self):
        self.start()
        self.server(b"hello there\r\n")
        failure = self.failureResultOf(self.result, SMTPClientError)
        self.assertEqual(failure.value.stage, "protocol")

    def test_mail_refused(self):
        self.start()
        self.server(b"220 mx\r\n", b"250 mx\r\n", b"553 5.7.1 no\r\n")
        failure = self.failureResultOf(self.result, SMTPClientError)
        self.assertEqual((failure.value.stage, failure.value.permanent), ("MAIL", True))


class TLSStringTransport(StringTransport):
    """
    A StringTransport that records when TLS would start.
    """

    tls_started_at = None

    def startTLS(self, context):
        self.tls_started_at = len(self.value())


class STARTTLSInjectionTests(SynchronousTestCase):
    """
    Replies glued to the 220 of STARTTLS arrived in clear text: they must
    never be taken as answers inside TLS.
    """

    def setUp(self):
        self.clock = Clock()
        self.proto = SMTPClientProtocol(self.clock)
        self.transport = TLSStringTransport()
        self.proto.makeConnection(self.transport)
        content = b"Subject: x\n\nhi\n"
        transaction = Transaction("s@y.test", ["a@x.test"], io.BytesIO(content), len(content))
        self.result = ensureDeferred(send_transaction(
            self.proto, "me.test", transaction, tls_context=object(), require_tls=True,
            timeouts=Timeouts()))
        self.proto.dataReceived(b"220 mx ESMTP\r\n")
        self.proto.dataReceived(b"250-mx\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
        self.assertTrue(self.transport.value().endswith(b"STARTTLS\r\n"))

    def test_replies_glued_to_220(self):
        """
        A man in the middle appends an EHLO answer and the whole transaction's
        replies to the 220: the session fails before TLS, nothing more is
        sent, and the message is not reported delivered.
        """
        self.proto.dataReceived(b"220 2.0.0 go ahead\r\n250-mx\r\n250 PIPELINING\r\n"
                                b"250 ok\r\n250 ok\r\n354 go\r\n250 2.0.0 queued\r\n")
        failure = self.failureResultOf(self.result, SMTPClientError)
        self.assertEqual((failure.value.stage, failure.value.reply.code), ("STARTTLS", 451))
        self.assertIsNone(self.transport.tls_started_at)
        self.assertTrue(self.transport.value().endswith(b"STARTTLS\r\n"))
        self.assertTrue(self.transport.disconnecting)

    def test_partial_line_glued_to_220(self):
        """
        Even an unfinished line after the 220 fails the session.
        """
        self.proto.dataReceived(b"220 go ahead\r\n250-m")
        self.failureResultOf(self.result, SMTPClientError)
        self.assertIsNone(self.transport.tls_started_at)

    def test_clean_220(self):
        """
        A 220 alone: TLS starts and EHLO is sent again, inside it.
        """
        before = len(self.transport.value())
        self.proto.dataReceived(b"220 go ahead\r\n")
        self.assertEqual(self.transport.tls_started_at, before)
        self.assertTrue(self.transport.value().endswith(b"STARTTLS\r\nEHLO me.test\r\n"))
        self.assertNoResult(self.result)


class ConnectionLostDefaultTests(SynchronousTestCase):
    """
    C{connectionLost()} without a reason fails the waiting read with a
    ConnectionDone of its own: a Failure built once at import time as the
    default argument was shared by every connection, so each coroutine that
    raised it overwrote the one exception's traceback and context (and kept
    another session's frames alive).
    """

    def test_fresh_failure_per_connection(self):
        errors = []
        for _ in range(2):
            proto = SMTPClientProtocol(Clock())
            proto.makeConnection(StringTransport())
            d = proto.read_reply(10)
            proto.connectionLost()
            errors.append(self.failureResultOf(d, ConnectionDone).value)
        self.assertIsNot(errors[0], errors[1])
