"""
Relay end to end: accepted over SMTP, queued durably, delivered to a remote
sink, removed from the queue.

    python -m benchmarks.relay [--sessions 20] [--messages 2000]

mailstack relays for 127.0.0.0/8 (C{--relay-networks}) to Postfix's
C{smtp-sink} on 127.0.0.2:25 (C{--route '*=127.0.0.2:25'}), loaded by
C{smtp-source}; the clock stops when the queue directory is empty.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks.inbound import peak_rss_mib, process_cpu
from mailstack.testing import start_server_process


def run(sessions, messages, size=1024):
    source, sink = shutil.which("smtp-source"), shutil.which("smtp-sink")
    if not (source and sink):
        sys.exit("smtp-source/smtp-sink not found: apt-get install postfix (tools only)")
    data_dir = tempfile.mkdtemp(prefix="ms-relay-")
    user = ["-u", "nobody"] if os.getuid() == 0 else []
    sink_process = subprocess.Popen([sink, *user, "127.0.0.2:25", "1000"],
                                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    text=True)
    try:
        process, port = start_server_process(data_dir, extra=[
            "--relay-networks", "127.0.0.0/8", "--route", "*=127.0.0.2:25"])
        try:
            envelopes = os.path.join(data_dir, "queue", "msg")
            cpu0, t0 = process_cpu(process.pid), time.monotonic()
            subprocess.run([source, "-s", str(sessions), "-m", str(messages), "-l", str(size),
                            "-f", "load@bench.test", "-t", "someone@remote.test",
                            f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                if not os.path.isdir(envelopes) or not os.listdir(envelopes):
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            cpu = process_cpu(process.pid) - cpu0
            left = len(os.listdir(envelopes)) if os.path.isdir(envelopes) else 0
            rss = peak_rss_mib(process.pid)
        finally:
            process.kill()
            process.wait()
    finally:
        sink_process.terminate()
        sink_process.wait()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"messages/s": messages / elapsed, "cpu ms/msg": 1000 * cpu / messages,
            "peak RSS MiB": rss, "left in queue": left}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args(argv)
    r = run(args.sessions, args.messages)
    print("| sessions | messages | msg/s | CPU ms/msg | peak RSS | left in queue |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.sessions} | {args.messages} | {r['messages/s']:.0f} | "
          f"{r['cpu ms/msg']:.2f} | {r['peak RSS MiB']:.0f} MiB | {r['left in queue']} |")


if __name__ == "__main__":
    main()
