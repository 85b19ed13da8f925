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
