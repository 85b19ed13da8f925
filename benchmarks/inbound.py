"""
Inbound throughput: mailstack receiving over SMTP into Maildirs, durably.

    python -m benchmarks.inbound [--sessions 20] [--messages 5000] [--size 1024]

Starts C{twist mailstack} on 127.0.0.1 with a fresh data directory, loads
it with Postfix's C{smtp-source} (Debian package C{postfix}; it is only the
load generator here, no Postfix server is started), waits until every
message is in the Maildir, counts them, and prints messages/s, the server's
CPU per message and its peak memory.  The comparison with Postfix itself
(issue 7) is still to be written.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from mailstack.address import local_address
from mailstack.auth import hash_password
from mailstack.testing import start_server_process
from mailstack.users import UserDatabase


def process_cpu(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run(sessions, messages, size, recipients=1):
    source = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not os.path.exists(source):
        sys.exit("smtp-source not found: apt-get install postfix (only its tools are used)")
    data_dir = tempfile.mkdtemp(prefix="ms-in-")
    try:
        UserDatabase(data_dir).add(local_address("bench@localhost"), hash_password("x"))
        process, port = start_server_process(data_dir)
        try:
            cpu0, t0 = process_cpu(process.pid), time.monotonic()
            subprocess.run([source, "-s", str(sessions), "-m", str(messages),
                            "-l", str(size), "-f", "load@bench.test", "-t", "bench@localhost",
                            f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL)
            new = os.path.join(data_dir, "mail", "localhost", "bench", "new")
            deadline = time.monotonic() + 60
            while len(os.listdir(new)) < messages and time.monotonic() < deadline:
                time.sleep(0.05)  # the last replies may still be on their way
            elapsed = time.monotonic() - t0
            cpu = process_cpu(process.pid) - cpu0
            count = len(os.listdir(new))
            rss = peak_rss_mib(process.pid)
        finally:
            process.kill()
            process.wait()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"messages/s": messages / elapsed, "cpu ms/msg": 1000 * cpu / messages,
            "peak RSS MiB": rss, "delivered": f"{count}/{messages}"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args(argv)
    result = run(args.sessions, args.messages, args.size)
    print("| sessions | messages | size | msg/s | CPU ms/msg | peak RSS | delivered |")
    print("|---|---|---|---|---|---|---|")
    print(f"| {args.sessions} | {args.messages} | {args.size} | {result['messages/s']:.0f} | "
          f"{result['cpu ms/msg']:.2f} | {result['peak RSS MiB']:.0f} MiB | "
          f"{result['delivered']} |")


if __name__ == "__main__":
    main()
