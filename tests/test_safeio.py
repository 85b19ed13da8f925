"""
mailstack.safeio: durable writes.
"""

import os
import threading

from twisted.trial.unittest import TestCase

from mailstack.safeio import atomic_write


class AtomicWriteTests(TestCase):
    def test_concurrent_replacements(self):
        """
        Threads replacing the same file at once (two IMAP sessions' first
        logins both write the subscriptions file) all succeed, and the file
        is always one whole version, never a mix; no temporary file is left.
        """
        directory = self.mktemp()
        os.makedirs(directory)
        path = os.path.join(directory, "subscriptions")
        versions = [bytes([65 + n]) * 20000 for n in range(4)]
        errors = []
        start = threading.Barrier(len(versions))

        def writer(data):
            start.wait()
            for _ in range(30):
                try:
                    atomic_write(path, data)
                except OSError as e:
                    errors.append(e)
                with open(path, "rb") as f:
                    seen = f.read()
                if seen not in versions:
                    errors.append(f"mixed content of {len(seen)} bytes")

        threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        self.assertEqual(errors, [])
        self.assertEqual(os.listdir(directory), ["subscriptions"])
