"""
The delivery side alone: what the queue, the courier and the SMTP client
cost per message, without the receiving side.

    python -m benchmarks.delivery [--messages 2000] [--rounds 1]
        [--pythonpath A --pythonpath B ...] [--profile FILE]

It writes N queued 1 KiB messages (one recipient each, deferred until
tomorrow) into a fresh C{DATA/queue} with the queue's own store (fsync
skipped during setup only), starts C{twist mailstack} with C{--route
'*=127.0.0.2:PORT'} to Postfix's C{smtp-sink}, waits until the server
is idle (the queue loaded), then makes every message due with the control
socket's C{flush} and measures the server's CPU and the time until the
queue directory is empty and the sink has every message.  With several
C{--pythonpath} (e.g. a checkout of main and this tree) the rounds
alternate between them on the same machine.
"""

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import time

from benchmarks.inbound import process_cpu
from benchmarks.queue_scale import populate
from benchmarks.run import Sink
from mailstack.queue.control import send_command
from mailstack.queue.store import QueueStore
from mailstack.testing import start_server_process


def fill(data_dir, count):
    """
    Write COUNT deferred 1 KiB messages for one remote recipient each
    (without fsync: setup only).
    """
    populate(QueueStore(os.path.join(data_dir, "queue")), count,
             recipients=("someone@remote.test",), attempts=0, spread=0)


def wait_idle(pid, quiet=0.5, limit=120):
    """
    Wait until the process used no CPU for C{quiet} seconds.
    """
    deadline = time.monotonic() + limit
    last = process_cpu(pid)
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = process_cpu(pid)
        if now == last:
            return
        last = now


def run(count, pythonpath=None, profile=None):
    data_dir = tempfile.mkdtemp(prefix="ms-delivery-")
    sink = Sink()
    try:
        fill(data_dir, count)
        process, _ = start_server_process(data_dir, ["--route", f"*=127.0.0.2:{sink.port}"],
                                          pythonpath=pythonpath)
        try:
            wait_idle(process.pid)
            spy = None
            if profile:
                spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "-r", "250", "-f",
                                        "raw", "-o", profile, "-p", str(process.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                time.sleep(1)
            envelopes = os.path.join(data_dir, "queue", "envelope")
            cpu0, t0 = process_cpu(process.pid), time.monotonic()
            answer = send_command(data_dir, "flush")
            if answer != f"ok {count}":
                raise SystemExit(f"flush answered {answer!r}, not ok {count}")
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                if not os.listdir(envelopes) and sink.received >= count:
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - t0
            cpu = process_cpu(process.pid) - cpu0
            left = len(os.listdir(envelopes))
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait()
        finally:
            process.kill()
            process.wait()
    finally:
        sink.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return {"msg/s": count / elapsed, "cpu ms/msg": 1000 * cpu / count,
            "received": sink.received, "left": left}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--profile", help="py-spy's raw samples of the last round to this file")
    parser.add_argument("--pythonpath", action="append",
                        help="the server's PYTHONPATH (repeat to alternate trees)")
    args = parser.parse_args(argv)
    paths = args.pythonpath or [None]
    print("| round | tree | msg/s | CPU ms/msg | received | left in queue |")
    print("|---|---|---|---|---|---|")
    for n in range(args.rounds):
        for path in paths:
            r = run(args.messages, path, args.profile)
            print(f"| {n + 1} | {path or '-'} | {r['msg/s']:.0f} | {r['cpu ms/msg']:.2f} | "
                  f"{r['received']} | {r['left']} |", flush=True)


if __name__ == "__main__":
    main()
