"""
mailstack against Postfix on the same machine, in the same run.

    python -m benchmarks [--runs 3] [--scale 1.0] [--systems mailstack,postfix,dovecot]
                         [--cases inbound-20,inbound-3rcpt,...|none] [--idle 1000]
                         [--access-cases big,mix,pop3,idle-sessions,idle|none]

For every case and run, each system is started fresh on loopback with a
temporary directory, loaded with Postfix's C{smtp-source}, and timed until
every message is where it belongs: for inbound cases, a file in the
recipient's Maildir C{new/} (fsynced by both systems); for the relay case,
received by C{smtp-sink} on 127.0.0.2 and gone from the sender's queue.
The counts are checked (the correctness column), and the table gives the
median of the runs: messages/s, CPU ms per message (the whole process tree:
Postfix's master and every daemon it ran, or mailstack's one process), and
peak memory as PSS summed over the tree, sampled while the load runs.
Then each system holds C{--idle} idle SMTP connections, and their PSS is
reported.  The ratio column is mailstack/Postfix.  Then IMAP and POP3 are
measured beside a private Dovecot on the same Maildirs (L{benchmarks.access}).

Postfix runs as a private instance: its own C{main.cf}/C{master.cf} in the
temporary directory, its own queue, SMTP on a loopback port, delivery to
Maildir through virtual(8) (never a system instance, never port 25).  That
needs root; without it only mailstack is measured.  The tools come from
Debian's C{postfix} package, which the runner installs when it is missing
and it may (root and apt-get).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from mailstack.address import local_address
from mailstack.auth import hash_password
from mailstack.testing import start_server_process
from mailstack.users import UserDatabase


@dataclass
class Case:
    name: str
    sessions: int
    messages: int
    size: int
    recipients: int = 1
    relay: bool = False

    def scaled(self, scale: float) -> "Case":
        return Case(self.name, min(self.sessions, max(1, int(self.messages * scale))),
                    max(1, int(self.messages * scale)), self.size, self.recipients, self.relay)

    def describe(self) -> str:
        what = "relay to smtp-sink" if self.relay else "inbound to Maildir"
        rcpt = f", {self.recipients} rcpt" if self.recipients > 1 else ""
        return (f"{what}: {self.sessions} sessions, {self.messages} x "
                f"{self.size // 1024} KiB{rcpt}")


CASES = [
    Case("inbound-20", 20, 5000, 1024),
    Case("inbound-3rcpt", 20, 2000, 1024, recipients=3),
    Case("inbound-100", 100, 5000, 1024),
    Case("inbound-100k", 20, 1000, 100 * 1024),
    Case("relay", 20, 2000, 1024, relay=True),
]

# smtp-source -r N sends to N<user>, ..., 2<user>, <user> (probed).
USER = "bench"
DOMAIN = "localhost"


def recipients_for(case: Case) -> list[str]:
    return [USER] + [f"{i}{USER}" for i in range(2, case.recipients + 1)]


# -- measuring processes -------------------------------------------------------------

def children_by_parent() -> dict[int, list[int]]:
    """
    Every process's children, from /proc.
    """
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    return children


def tree(root: int) -> list[int]:
    children = children_by_parent()
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu(root: int) -> float:
    """
    CPU seconds used so far by C{root} and its descendants, including
    those already reaped (their time is in their parent's cutime/cstime).
    """
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += sum(int(x) for x in fields[11:15])
    return total / ticks


def tree_pss_mib(root: int) -> float:
    total = 0
    for pid in tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1])
                        break
        except OSError:
            continue
    return total / 1024


class PeakSampler(threading.Thread):
    """
    Samples the PSS of a process tree until stopped; keeps the peak.
    """

    def __init__(self, root: int, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak = 0.0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_pss_mib(self.root))
            self._done.wait(self.interval)

    def stop(self) -> float:
        self._done.set()
        self.join()
        self.peak = max(self.peak, tree_pss_mib(self.root))
        return self.peak


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def count_files(directories: list[str]) -> int:
    total = 0
    for directory in directories:
        try:
            with os.scandir(directory) as it:
                total += sum(1 for _ in it)
        except FileNotFoundError:
            pass  # not created yet: nothing delivered there
    return total


# -- the systems -------------------------------------------------------------------------

class Sink:
    """
    Postfix's smtp-sink on 127.0.0.2, counting the messages it accepted.
    """

    def __init__(self) -> None:
        self.port = free_port("127.0.0.2")
        user = ["-u", "nobody"] if os.getuid() == 0 else []
        self.process = subprocess.Popen(
            [tool("smtp-sink"), "-c", *user, f"127.0.0.2:{self.port}", "1000"],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.received = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        time.sleep(0.2)

    def _read(self) -> None:
        buffer = b""
        while True:
            chunk = self.process.stdout.read1(4096)  # type: ignore[union-attr]
            if not chunk:
                return
            buffer = (buffer + chunk)[-256:]
            found = re.findall(rb"mesg=(\d+)", buffer)
            if found:
                self.received = int(found[-1])

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class Mailstack:
    name = "mailstack"
    receivers = 1  # mailstack's --receivers

    def __init__(self, case: Case, work: str, sink: Sink | None) -> None:
        self.case, self.work = case, work
        self.data = os.path.join(work, "data")
        users = UserDatabase(self.data)
        password = hash_password("x")
        for user in recipients_for(case):
            users.add(local_address(f"{user}@{DOMAIN}"), password)
        extra = ["--receivers", str(self.receivers)]
        if sink is not None:
            extra += ["--relay-networks", "127.0.0.0/8", "--route", f"*=127.0.0.2:{sink.port}"]
        self.process, self.port = start_server_process(self.data, extra)
        self.root = self.process.pid

    def delivered(self) -> int:
        return count_files([os.path.join(self.data, "mail", DOMAIN, u, "new")
                            for u in recipients_for(self.case)])

    def queue_empty(self) -> bool:
        return count_files([os.path.join(self.data, "queue", d) for d in ("msg", "envelope")]) == 0

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def mailstack_with(receivers: int) -> type:
    """
    The mailstack system with C{--receivers N}, named C{mailstack:N}.
    """
    if receivers == 1:
        return Mailstack
    return type(f"Mailstack{receivers}", (Mailstack,),
                {"name": f"mailstack:{receivers}", "receivers": receivers})


POSTFIX_MAIN = """\
compatibility_level = 3.6
queue_directory = {work}/queue
data_directory = {work}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
alias_maps =
alias_database =
local_recipient_maps =
virtual_mailbox_domains = {domain}
virtual_mailbox_base = {work}/mail
virtual_mailbox_maps = texthash:{work}/conf/vmailbox
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
virtual_minimum_uid = 100
relayhost = {relayhost}
smtp_host_lookup = native
smtp_dns_support_level = disabled
maillog_file = {work}/maillog
maillog_file_prefixes = {work}
smtpd_banner = $myhostname ESMTP
biff = no
"""


class Postfix:
    """
    A private Postfix instance in C{work}: its own configuration and queue,
    SMTP on a free loopback port, virtual(8) delivery to Maildir.
    """

    name = "postfix"

    def __init__(self, case: Case, work: str, sink: Sink | None) -> None:
        self.case, self.work = case, work
        self.conf = os.path.join(work, "conf")
        self.port = free_port("127.0.0.1")
        for sub in ("conf", "queue", "data", "mail"):
            os.makedirs(os.path.join(work, sub), exist_ok=True)
        os.chmod(work, 0o755)
        nobody = 65534
        shutil.chown(os.path.join(work, "data"), "postfix")
        shutil.chown(os.path.join(work, "mail"), nobody, nobody)
        relayhost = f"[127.0.0.2]:{sink.port}" if sink is not None else ""
        with open(os.path.join(self.conf, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN.format(work=work, domain=DOMAIN, uid=nobody, gid=nobody,
                                        relayhost=relayhost))
        with open(os.path.join(self.conf, "vmailbox"), "w") as f:
            for user in recipients_for(case):
                f.write(f"{user}@{DOMAIN} {DOMAIN}/{user}/\n")
        shipped = [p for p in ("/etc/postfix/master.cf", "/usr/share/postfix/master.cf.dist")
                   if os.path.exists(p)]
        if not shipped:
            raise RuntimeError("no master.cf to start from: is the postfix package installed?")
        with open(shipped[0]) as f:
            master = f.read()
        master = re.sub(r"(?m)^smtp\s+inet\s.*$",
                        f"127.0.0.1:{self.port} inet n - n - - smtpd", master)
        with open(os.path.join(self.conf, "master.cf"), "w") as f:
            f.write(master)
        subprocess.run(["postfix", "-c", self.conf, "start"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pidfile = os.path.join(work, "queue", "pid", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    self.root = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        else:
            raise RuntimeError(f"postfix did not start; see {work}/maillog")
        wait_for_port("127.0.0.1", self.port)

    def delivered(self) -> int:
        return count_files([os.path.join(self.work, "mail", DOMAIN, u, "new")
                            for u in recipients_for(self.case)])

    def queue_empty(self) -> bool:
        return count_files([os.path.join(self.work, "queue", q)
                            for q in ("incoming", "active", "deferred", "maildrop")]) == 0

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", self.conf, "stop"], stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{self.root}"):
            time.sleep(0.05)


def wait_for_port(host: str, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


# -- tools ---------------------------------------------------------------------------------

def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        raise SystemExit(f"{name} not found: apt-get install postfix")
    return path


def ensure_tools(want_postfix: bool) -> None:
    """
    Install Debian's postfix package (the load generator and sink, and the
    server compared against) when missing and possible.
    """
    if shutil.which("smtp-source") or os.path.exists("/usr/sbin/smtp-source"):
        return
    if os.getuid() != 0 or not shutil.which("apt-get"):
        raise SystemExit("smtp-source not found: apt-get install postfix")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=b"postfix postfix/main_mailer_type "
                   b"select No configuration\n", check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "postfix"], check=True, env=env,
                   stdout=subprocess.DEVNULL)


# -- one measurement -------------------------------------------------------------------------

@dataclass
class Result:
    rate: float
    cpu_ms: float
    pss: float
    correct: bool
    detail: str


def measure(system_class: type, case: Case, timeout: float = 600) -> Result:
    work = tempfile.mkdtemp(prefix=f"bench-{system_class.name.replace(':', '-')}-")
    sink = Sink() if case.relay else None
    system = None
    try:
        system = system_class(case, work, sink)
        time.sleep(0.5)  # let start-up work settle before the clock starts
        sampler = PeakSampler(system.root)
        sampler.start()
        cpu0, t0 = tree_cpu(system.root), time.monotonic()
        target = "someone@remote.test" if case.relay else f"{USER}@{DOMAIN}"
        subprocess.run([tool("smtp-source"), "-s", str(case.sessions), "-m", str(case.messages),
                        "-l", str(case.size), "-r", str(case.recipients),
                        "-f", "load@bench.test", "-t", target, f"127.0.0.1:{system.port}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=timeout)
        expected = case.messages * (1 if case.relay else case.recipients)
        deadline = time.monotonic() + timeout

        def done() -> bool:
            if case.relay:
                return sink.received >= expected and system.queue_empty()  # type: ignore[union-attr]
            return system.delivered() >= expected

        while not done() and time.monotonic() < deadline:
            time.sleep(0.02)
        elapsed = time.monotonic() - t0
        cpu = tree_cpu(system.root) - cpu0
        pss = sampler.stop()
        time.sleep(0.3)  # anything delivered twice would show up now
        got = sink.received if case.relay else system.delivered()  # type: ignore[union-attr]
        correct = got == expected and (not case.relay or system.queue_empty())
        return Result(case.messages / elapsed, 1000 * cpu / case.messages, pss, correct,
                      f"{got}/{expected}")
    finally:
        if system is not None:
            system.stop()
        if sink is not None:
            sink.stop()
        shutil.rmtree(work, ignore_errors=True)


def measure_idle(system_class: type, connections: int) -> tuple[float, int, int]:
    """
    PSS with up to C{connections} idle SMTP sessions open: the memory, how
    many connected, and how many were greeted (Postfix serves at most
    C{default_process_limit} = 100 sessions at once; the rest wait in the
    listen queue, and past it the connections time out).
    """
    import select

    work = tempfile.mkdtemp(prefix=f"bench-idle-{system_class.name.replace(':', '-')}-")
    case = Case("idle", 1, 1, 1024)
    system = None
    sockets: list[socket.socket] = []
    try:
        system = system_class(case, work, None)
        time.sleep(0.5)
        for _ in range(connections):
            try:
                sockets.append(socket.create_connection(("127.0.0.1", system.port), 3))
            except OSError:
                break
        greeted: set[socket.socket] = set()
        deadline = time.monotonic() + 10
        while len(greeted) < len(sockets) and time.monotonic() < deadline:
            waiting = [s for s in sockets if s not in greeted]
            readable, _, _ = select.select(waiting[:1000], [], [], 0.5)
            if not readable and greeted:
                break
            for s in readable:
                if s.recv(512).startswith(b"220"):
                    greeted.add(s)
        time.sleep(1)
        return tree_pss_mib(system.root), len(sockets), len(greeted)
    finally:
        for s in sockets:
            s.close()
        if system is not None:
            system.stop()
        shutil.rmtree(work, ignore_errors=True)


# -- the table ---------------------------------------------------------------------------------

def run(cases: list[Case], systems: list[type], runs: int, idle: int,
        out: object = sys.stdout) -> dict:
    results: dict[tuple[str, str], list[Result]] = {}
    for number in range(runs):
        for case in cases:
            for system in systems:
                result = measure(system, case)
                results.setdefault((case.name, system.name), []).append(result)
                print(f"run {number + 1}/{runs} {case.name:14} {system.name:9} "
                      f"{result.rate:7.0f} msg/s {result.cpu_ms:6.2f} ms/msg "
                      f"{result.pss:6.0f} MiB {result.detail}", file=out, flush=True)
    idle_results = {}
    if idle:
        for system in systems:
            idle_results[system.name] = measure_idle(system, idle)
    return {"cases": cases, "systems": systems, "results": results, "idle": idle_results,
            "idle_connections": idle}


def median(results: list[Result], attribute: str) -> float:
    return statistics.median(getattr(r, attribute) for r in results)


def table(report: dict) -> str:
    names = [s.name for s in report["systems"]]
    lines = ["| case | system | msg/s | CPU ms/msg | peak PSS MiB | correct | ratio msg/s |",
             "|---|---|---|---|---|---|---|"]
    for case in report["cases"]:
        rates = {}
        for name in names:
            runs = report["results"].get((case.name, name), [])
            if not runs:
                continue
            rates[name] = median(runs, "rate")
            ratio = ""
            if name.startswith("mailstack") and "postfix" in names:
                other = report["results"].get((case.name, "postfix"))
                if other:
                    ratio = f"{rates[name] / median(other, 'rate'):.2f}x"
            correct = "all" if all(r.correct for r in runs) else ", ".join(
                r.detail for r in runs)
            lines.append(f"| {case.describe()} | {name} | {rates[name]:.0f} | "
                         f"{median(runs, 'cpu_ms'):.2f} | {median(runs, 'pss'):.0f} | "
                         f"{correct} | {ratio} |")
    for name, (pss, connected, greeted) in report["idle"].items():
        lines.append(f"| {report['idle_connections']} idle SMTP connections: {connected} "
                     f"connected, {greeted} greeted | {name} | | | {pss:.0f} | | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply every case's message count (0.01 for a smoke run)")
    parser.add_argument("--systems", default="mailstack,mailstack:2,postfix,dovecot",
                        help="mailstack:N runs mailstack with --receivers N; postfix is "
                             "measured on the SMTP cases, dovecot on the IMAP/POP3 ones")
    parser.add_argument("--access-cases", default="big,mix,pop3,idle-sessions,idle",
                        help="IMAP and POP3 cases beside Dovecot (benchmarks/access.py), "
                             "or none")
    parser.add_argument("--cases", default=",".join(c.name for c in CASES))
    parser.add_argument("--idle", type=int, default=1000,
                        help="idle connections to hold (0: skip)")

    args = parser.parse_args(argv)
    wanted = args.systems.split(",")
    ensure_tools("postfix" in wanted)
    systems: list[type] = []
    for name in wanted:
        if name == "dovecot":
            continue  # the IMAP/POP3 peer, below
        if name == "mailstack" or name.startswith("mailstack:"):
            systems.append(mailstack_with(int(name.partition(":")[2] or 1)))
        elif name == "postfix":
            if os.getuid() != 0:
                print("postfix: needs root for a private instance; skipped", file=sys.stderr)
            else:
                systems.append(Postfix)
        else:
            parser.error(f"unknown system {name}")
    by_name = {c.name: c for c in CASES}
    cases = [by_name[n].scaled(args.scale) for n in args.cases.split(",") if n != "none"]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    report = run(cases, systems, args.runs, args.idle) if cases else None
    access_report = None
    if args.access_cases != "none":
        from benchmarks import access
        access_systems = access.systems_for(
            [n for n in ("mailstack", "dovecot") if n in wanted])
        access_report = access.run(access_systems, args.runs, access.Sizes().scaled(args.scale),
                                   args.access_cases.split(","))
    print()
    print(f"{os.cpu_count()} CPUs; {platform_line()}")
    if report is not None:
        print(table(report))
    if access_report is not None:
        print()
        print(access.table(access_report))
    return {"smtp": report, "access": access_report}


def platform_line() -> str:
    import platform

    import twisted
    return (f"Python {platform.python_version()}, Twisted {twisted.__version__}, "
            f"{platform.platform()}")


if __name__ == "__main__":
    main()
