"""
The log's lines of a reactor turn written together (L{mailstack.turnlog}):
the same text, fewer writes, nothing lost at shutdown.
"""

import io
import re
import smtplib
import threading

from twisted.internet.task import Clock
from twisted.logger import Logger, LogPublisher, textFileLogObserver
from twisted.trial.unittest import SynchronousTestCase

from mailstack.logs import filter_noise, turn_writes
from mailstack.turnlog import PIPE_BUF, TurnWriter
from tests.processes import Twistd
from tests.support import short_tempdir


class FakeReactor(Clock):
    """
    A clock with the reactor's C{running} flag and system event triggers.
    """

    def __init__(self):
        super().__init__()
        self.running = True
        self.triggers = []

    def addSystemEventTrigger(self, phase, event, f, *args):
        self.triggers.append((phase, event, f))

    def shutdown(self):
        # What the reactor does at stop: crash() clears running in an
        # "after" trigger registered before anyone else's.
        self.running = False
        for phase, event, f in self.triggers:
            if (phase, event) == ("after", "shutdown"):
                f()


class CountingFile(io.StringIO):
    def __init__(self):
        super().__init__()
        self.flushed = []  # the text of each write-and-flush

    def flush(self):
        text = self.getvalue()
        done = sum(len(t) for t in self.flushed)
        if len(text) > done:
            self.flushed.append(text[done:])


class TurnWriterTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = FakeReactor()
        self.out = CountingFile()
        self.writer = TurnWriter(self.out, self.reactor)
        self.addCleanup(self.writer.close)

    def test_turn_written_together(self):
        """
        Lines written during a turn wait for its end, then go in one write.
        """
        for i in range(3):
            self.writer.write(f"line {i}\n")
            self.writer.flush()  # what FileLogObserver does after each line
        self.assertEqual(self.out.getvalue(), "")
        self.reactor.advance(0)
        self.assertEqual(self.out.flushed, ["line 0\nline 1\nline 2\n"])
        self.assertEqual(self.writer.writes, 1)

    def test_chunks_of_whole_lines_up_to_pipe_buf(self):
        """
        No write is longer than PIPE_BUF unless one line is, and no line is
        split: lines of processes sharing a pipe never interleave.
        """
        line = "x" * 99 + "\n"
        for _ in range(100):
            self.writer.write(line)
        self.writer.write("y" * (PIPE_BUF + 10) + "\n")
        self.writer.write("\u00e9" * 3000 + "\n")  # 6001 octets in UTF-8
        self.writer.write(line)
        self.reactor.advance(0)
        writes = self.out.flushed
        self.assertEqual("".join(writes), line * 100 + "y" * (PIPE_BUF + 10) + "\n"
                         + "\u00e9" * 3000 + "\n" + line)
        for text in writes:
            self.assertTrue(text.endswith("\n"))
            self.assertTrue(len(text.encode()) <= PIPE_BUF or text.count("\n") == 1, text[:20])
        self.assertEqual(len(writes), 3 + 1 + 1 + 1)  # 100 lines: 40 + 40 + 20

    def test_not_running_written_at_once(self):
        """
        Before the reactor runs and after it stopped, a line goes out at once.
        """
        self.reactor.running = False
        self.writer.write("early\n")
        self.writer.flush()
        self.assertEqual(self.out.flushed, ["early\n"])

    def test_shutdown_writes_pending(self):
        """
        Lines of the last turn before the reactor stops are written by the
        after-shutdown trigger, and later lines go out at once, in order.
        """
        self.writer.write("stopping\n")
        self.reactor.shutdown()  # no turn ends any more
        self.assertEqual(self.out.getvalue(), "stopping\n")
        self.writer.write("Main loop terminated.\n")
        self.writer.flush()
        self.assertEqual(self.out.getvalue(), "stopping\nMain loop terminated.\n")

    def test_other_thread_in_order(self):
        """
        A line from another thread is written at once, after the pending
        lines of the reactor thread.
        """
        self.writer.write("first\n")
        t = threading.Thread(target=self.writer.write, args=("from a thread\n",))
        t.start()
        t.join()
        self.assertEqual(self.out.getvalue(), "first\nfrom a thread\n")
        self.writer.write("third\n")
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue(), "first\nfrom a thread\nthird\n")

    def test_signal_handler_logs_during_a_write(self):
        """
        A line logged while the writer is writing, on the same thread (the
        reactor's signal handler logs "Received SIGTERM" wherever the
        thread is), neither deadlocks nor is lost.
        """
        for running in (True, False):
            self.reactor.running = running
            self.assertEqual(sorted(self.interrupted_write().splitlines()),
                             ["Received SIGTERM, shutting down.", "a line"])

    def interrupted_write(self):
        class Interrupted(CountingFile):
            writer = None

            def write(self, text):
                writer, self.writer = self.writer, None
                if writer is not None:
                    writer.write("Received SIGTERM, shutting down.\n")
                return super().write(text)

        out = Interrupted()
        done = threading.Event()

        def scenario():
            # Made in this thread: the writer's thread is the reactor's.
            writer = out.writer = TurnWriter(out, self.reactor)
            writer.write("a line\n")
            writer.flush()
            self.reactor.advance(0)
            writer.close()
            done.set()

        threading.Thread(target=scenario, daemon=True).start()
        self.assertTrue(done.wait(10), "deadlocked")
        return out.getvalue()

    def test_closed_log_is_no_error(self):
        """
        A log whose reader is gone (EPIPE) loses the lines, as Twisted's
        observer would, without an error in the reactor.
        """
        class Broken(CountingFile):
            def write(self, text):
                raise BrokenPipeError()

        writer = TurnWriter(Broken(), self.reactor)
        writer.write("lost\n")
        self.reactor.advance(0)
        self.assertEqual(writer.writes, 1)


class InstalledTests(SynchronousTestCase):
    def test_observer_text_unchanged(self):
        """
        A text file observer with the turn writer writes the same text as
        without it, at the end of the turn.
        """
        reactor = FakeReactor()
        plain, turned = io.StringIO(), CountingFile()
        publisher = LogPublisher(textFileLogObserver(plain), textFileLogObserver(turned))
        filter_noise(publisher, reactor=reactor)
        log = Logger(observer=publisher, namespace="mailstack.test")
        log.info("{qid}: to=<{to}> status=sent", qid="4F2A", to="a@b.test")
        log.warn("second {n}", n=2)
        self.assertEqual(turned.getvalue(), "")
        reactor.advance(0)
        self.assertEqual(turned.getvalue(), plain.getvalue())
        self.assertEqual(len(turned.flushed), 1)
        self.assertIn("4F2A: to=<a@b.test> status=sent", turned.getvalue())

    def test_installed_once(self):
        reactor = FakeReactor()
        observer = textFileLogObserver(io.StringIO())
        self.assertTrue(turn_writes(observer, reactor))
        self.assertFalse(turn_writes(observer, reactor))


class ShutdownTests(SynchronousTestCase):
    def test_lines_of_shutdown_after_sigterm(self):
        """
        A real server stopped by SIGTERM writes every line of its shutdown:
        the sessions still open are closed and logged, the listeners'
        stops, and Twisted's last line after the reactor stopped.
        """
        data = short_tempdir(self)
        server = Twistd(["--data-dir", data, "--hostname", "mx.test",
                         "--smtp", "tcp:0:interface=127.0.0.1",
                         "--submission", "none", "--submissions", "none", "--imap", "none",
                         "--imaps", "none", "--pop3", "none"])
        self.addCleanup(server.stop)
        port = server.ports("smtp")["smtp"]
        client = smtplib.SMTP("127.0.0.1", port, timeout=30)
        self.addCleanup(client.close)
        client.ehlo("client.test")
        server.wait_for(r"connect from \S+\[127\.0\.0\.1\]")
        server.stop()  # SIGTERM, then the log read to its end
        self.assertIn(server.process.returncode, (0, -15))  # twistd may end by the signal
        text = server.output()
        self.assertIn("Main loop terminated.", text)
        self.assertTrue(text.endswith("Server Shut Down.\n"), text[-300:])
        self.assertRegex(text, r"disconnect from \S+\[127\.0\.0\.1\]")
        self.assertIn("Received SIGTERM, shutting down.", text)
        # Every line whole: no two lines run together.
        for line in text.splitlines():
            if not line.startswith("\t"):
                self.assertRegex(line, r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[-+]\d{4} \[[^]]+\] ")
        self.assertEqual(len(re.findall("Main loop terminated", text)), 1, text)
