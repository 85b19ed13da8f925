"""
Queue scale: how long a queue of N deferred messages takes to load, and
what it costs while none of them is due.

    python -m benchmarks.queue_scale [--messages 100000] [--idle 10]

It writes N queued messages (1 KiB each, two recipients, deferred until
tomorrow) straight into a fresh DATA/queue with the queue's own store
(without fsync, to save setup time), then starts the real OutboundQueue on
the real reactor and reports: load time, resident memory, and the CPU the
process uses over an idle period with the queue's timer armed.
"""

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.python.threadpool import ThreadPool

from mailstack import safeio
from mailstack.message import MessageSpool
from mailstack.queue import store as store_module
from mailstack.queue.courier import Courier
from mailstack.queue.runner import OutboundQueue
from mailstack.queue.store import QueueRecord, QueueStore, RecipientState
from mailstack.testing import FakeResolver


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def populate(store, count, recipients=("a@remote.test", "b@remote.test"), attempts=3,
             spread=3600):
    """
    Write COUNT deferred 1 KiB messages without fsync (setup only), due
    tomorrow within SPREAD seconds of each other.
    """
    real_fsync, real_fsync_dir = os.fsync, safeio.fsync_directory
    os.fsync = lambda fd: None
    store_module.fsync_directory = safeio.fsync_directory = lambda d: None
    try:
        spool = MessageSpool()
        spool.write(b"Subject: queued\n\n" + b"x" * 1000 + b"\n")
        tomorrow = time.time() + 86400
        for i in range(count):
            record = QueueRecord(f"{i:012X}", "sender@example.org", time.time(),
                                 [RecipientState(address) for address in recipients],
                                 attempts=attempts,
                                 next_attempt=tomorrow + (i % spread if spread else 0))
            store.add(record, spool)
    finally:
        os.fsync = real_fsync
        store_module.fsync_directory = safeio.fsync_directory = real_fsync_dir


async def measure(directory, count, idle):
    store = QueueStore(os.path.join(directory, "queue"))
    started = time.monotonic()
    populate(store, count)
    print(f"setup: wrote {count} messages in {time.monotonic() - started:.1f}s", flush=True)
    pool = ThreadPool(1, 4, "bench")
    pool.start()
    try:
        return await _run(store, pool, count, idle)
    finally:
        pool.stop()


async def _run(store, pool, count, idle):
    courier = Courier(reactor, FakeResolver(), "bench.test")
    queue = OutboundQueue(store, courier, reactor, reactor, pool,
                          (300, 600), 5 * 86400, "bench.test")
    rss_before = rss_mib()
    cpu0, t0 = cpu_seconds(), time.monotonic()
    queue.startService()
    loaded = await queue.loaded
    load_time = time.monotonic() - t0
    load_cpu = cpu_seconds() - cpu0
    rss_loaded = rss_mib()
    cpu1 = cpu_seconds()
    await deferLater(reactor, idle, lambda: None)
    idle_cpu = cpu_seconds() - cpu1
    timers = len(reactor.getDelayedCalls())
    stopping = queue.stopService()
    if stopping is not None:
        await stopping
    return {
        "messages": loaded,
        "load_seconds": load_time,
        "load_cpu_seconds": load_cpu,
        "rss_mib_added": rss_loaded - rss_before,
        "idle_seconds": idle,
        "idle_cpu_percent": 100 * idle_cpu / idle,
        "timers": timers,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100000)
    parser.add_argument("--idle", type=float, default=10.0)
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp(prefix="ms-bench-")
    result = {}

    def run():
        d = ensureDeferred(measure(directory, args.messages, args.idle))
        d.addCallback(result.update)
        d.addErrback(lambda f: (f.printTraceback(), result.update(error=True)))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    shutil.rmtree(directory, ignore_errors=True)
    if result.get("error"):
        sys.exit(1)
    print(f"| messages | load time | load CPU | memory added | idle CPU ({args.idle:g}s) "
          f"| timers armed |")
    print("|---|---|---|---|---|---|")
    print(f"| {result['messages']} | {result['load_seconds']:.1f} s | "
          f"{result['load_cpu_seconds']:.1f} s | {result['rss_mib_added']:.0f} MiB | "
          f"{result['idle_cpu_percent']:.2f} % | {result['timers']} |")


if __name__ == "__main__":
    main()
