"""
A real C{twistd -n mailstack} in a child process, for tests of what only a
whole process shows: privilege drop, signals, the log file.
"""

import os
import queue
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = [sys.executable, "-c", ("import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()")]


class Twistd:
    """
    C{twistd -n [twistd_args] mailstack [args]}; every log line is kept in
    C{lines} (read by a thread, so the pipe never blocks the server).
    """

    def __init__(self, args, twistd_args=(), cwd=None, **popen):
        argv = TWISTD + ["-n", "--pidfile=", *twistd_args, "mailstack", *args]
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        env=env, cwd=cwd or "/", **popen)
        self.lines = []
        self._new = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.process.stdout:
            text = line.decode("utf-8", "replace")
            self.lines.append(text)
            self._new.put(text)
        self._new.put(None)

    def output(self):
        return "".join(self.lines)

    def wait_for(self, pattern, timeout=60):
        """
        The match of the first log line (from now on, or already read) for
        C{pattern}; raise with the whole log if the process ends first.
        """
        for line in list(self.lines):
            match = re.search(pattern, line)
            if match:
                return match
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(0.05, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            match = re.search(pattern, line)
            if match:
                return match
        raise AssertionError(f"no log line matching {pattern!r}:\n" + self.output())

    def ports(self, *labels, timeout=60):
        return {label: int(self.wait_for(label + r" listening on 127\.0\.0\.1:(\d+)",
                                         timeout).group(1))
                for label in labels}

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        # The process is gone, but its last lines may still be in the pipe:
        # read to the end before anyone looks at them.
        self._reader.join(30)
