"""
Durability: a server process killed with SIGKILL in the middle of a load
has every message it answered 250 for in its Maildir, whole, and nothing
half-written in new/.
"""

import os
import re
import signal
import smtplib
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from mailstack.address import local_address
from mailstack.users import UserDatabase
from mailstack.testing import start_server_process
from tests.support import fast_hash, short_tempdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
END = b"END-OF-MESSAGE"


class CrashTests(SynchronousTestCase):
    def test_sigkill_under_load(self):
        data_dir = short_tempdir(self)
        UserDatabase(data_dir).add(local_address("alice@localhost"), fast_hash("pw"))
        process, port = start_server_process(data_dir, pythonpath=ROOT)
        self.addCleanup(lambda: process.poll() is None and process.kill())

        acknowledged = []
        lock = threading.Lock()
        stop = threading.Event()
        filler = b"x" * 76 + b"\r\n"

        def sender(worker):
            n = 0
            try:
                client = smtplib.SMTP("127.0.0.1", port, timeout=30)
                client.ehlo("load.test")
                while not stop.is_set() and n < 1000:
                    subject = f"msg-{worker}-{n}"
                    body = (f"Subject: {subject}\r\n\r\n".encode() + filler * 50 + END + b"\r\n")
                    client.sendmail("load@remote.test", ["alice@localhost"], body)
                    with lock:
                        acknowledged.append(subject)
                    n += 1
            except (smtplib.SMTPException, OSError):
                pass  # the server died under us: expected

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling another process; no fake clock can drive it
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        stop.set()
        for t in threads:
            t.join(30)
        self.assertGreaterEqual(len(acknowledged), 60)

        new = os.path.join(data_dir, "mail", "localhost", "alice", "new")
        found = {}
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                content = f.read()
            self.assertTrue(content.endswith(END + b"\n"), f"partial file in new/: {name}")
            self.assertIn(f",S={len(content)}", name)
            subject = re.search(rb"^Subject: (\S+)$", content, re.M).group(1).decode()
            found[subject] = found.get(subject, 0) + 1
        missing = [s for s in acknowledged if s not in found]
        self.assertEqual(missing, [], "acknowledged with 250 but lost")
        self.assertEqual([s for s, count in found.items() if count > 1], [])


class RelayCrashTests(SynchronousTestCase):
    """
    SIGKILL while relaying: every message answered 250 is relayed once the
    server is started again (at least once: a message being removed from
    the queue when the kill came may go twice), with one process and with
    receiver processes (whose queued mail is announced to the main process
    and, when that is lost, found at start).
    """

    def relay_and_kill(self, receivers):
        from tests.test_receivers import ThreadSink, receiver_pids, wait_for

        data_dir = short_tempdir(self)
        sink = ThreadSink()
        self.addCleanup(sink.close)
        extra = ["--relay-networks", "127.0.0.0/8", "--route", f"*=127.0.0.1:{sink.port}",
                 "--receivers", str(receivers)]
        process, port = start_server_process(data_dir, extra, pythonpath=ROOT)
        self.addCleanup(lambda: process.poll() is None and process.kill())
        if receivers > 1:
            self.assertTrue(wait_for(lambda: len(receiver_pids(process.pid)) == receivers - 1))
        others = receiver_pids(process.pid)

        acknowledged = []
        lock = threading.Lock()
        stop = threading.Event()

        def sender(worker):
            n = 0
            try:
                while not stop.is_set() and n < 1000:
                    # A connection per message, as smtp-source makes them, so
                    # that receivers get their share.
                    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                        subject = f"relay-{worker}-{n}"
                        client.sendmail("load@here.test", ["bob@remote.test"],
                                        f"Subject: {subject}\r\n\r\nx\r\n".encode())
                    with lock:
                        acknowledged.append(subject)
                    n += 1
            except (smtplib.SMTPException, OSError):
                pass  # the server died under us: expected

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(acknowledged) < 60 and time.monotonic() < deadline:
            time.sleep(0.01)  # polling another process; no fake clock can drive it
        os.kill(process.pid, signal.SIGKILL)
        process.wait(10)
        # Receivers stop when the main process is gone (their sessions end first).
        self.assertTrue(wait_for(lambda: not any(os.path.exists(f"/proc/{pid}")
                                                 for pid in others)))
        stop.set()
        for t in threads:
            t.join(30)
        self.assertGreaterEqual(len(acknowledged), 60)

        again, _ = start_server_process(data_dir, extra, pythonpath=ROOT)
        self.addCleanup(lambda: again.poll() is None and again.kill())
        envelopes = os.path.join(data_dir, "queue", "msg")
        wanted = {f"Subject: {s}".encode() for s in acknowledged}
        self.assertTrue(wait_for(lambda: wanted <= set(sink.subjects) and
                                 not os.listdir(envelopes), timeout=120),
                        f"{len(wanted - set(sink.subjects))} of {len(wanted)} acknowledged "
                        f"messages not relayed")
        again.terminate()
        again.wait(30)

    def test_one_process(self):
        self.relay_and_kill(1)

    def test_receivers(self):
        self.relay_and_kill(2)
