"""
mailstack's IMAP and POP3 beside a private Dovecot, on the same messages.

    python -m benchmarks.access [--runs 3] [--scale 1.0] [--systems mailstack,dovecot]

(also run by C{python -m benchmarks}, after the SMTP cases).  For every run
each system is started fresh on loopback with a temporary directory holding
the same Maildirs (hard links of one generated set) and the same users file
(mailstack's, which is Dovecot's passwd-file form; ARGON2ID hashes, read by
Dovecot with C{scheme=ARGON2ID}), and the same generated certificate: both
systems refuse passwords before TLS, so IMAP is IMAPS and POP3 uses STLS.
The cases, with imaplib and poplib:

  - C{big}: one session on a 10,000-message INBOX: the first SELECT (which
    claims C{new/}), SELECT again, C{FETCH 1:* (FLAGS UID RFC822.SIZE)}, the
    header listing a client shows, C{FETCH 1:* ENVELOPE}, C{SEARCH SUBJECT},
    C{SEARCH TEXT}, the listing, ENVELOPE and SEARCH SUBJECT again (from
    the servers' caches), and C{NOOP} (the median of 20);
  - C{mix}: 10 clients with sessions kept open, each repeating SELECT,
    FETCH flags, headers and bodies, STORE, SEARCH, APPEND, EXPUNGE and
    NOOP on a 500-message INBOX for a fixed time: the command rate;
  - C{pop3}: C{RETR} then C{TOP n 10} of each of 200 messages, ms per message;
  - C{idle-sessions}: 1,000 sessions logged in with a small INBOX selected:
    the PSS of the server's process tree;
  - C{idle}: 200 clients in IDLE on the 10,000-message INBOX: the server's
    CPU over a 10 s window, as % of one core.

Dovecot runs as its own instance: C{dovecot -c} with a configuration in the
temporary directory (its own base_dir, state_dir and log, listeners on free
loopback ports; never the system instance), Maildir through a static userdb
(uid nobody), C{default_process_limit} raised to 2500 so that 1,000 sessions
fit (Debian's default is 100).  It needs root and Debian's
C{dovecot-imapd} and C{dovecot-pop3d}, which the runner installs when
missing and it can.  The password hashes are Argon2id with small
parameters (t=1, m=1 MiB), the same string for both servers: this
measures mail access, not password hashing, and 1,000 logins at the
default cost would take minutes.
"""

from __future__ import annotations

import argparse
import imaplib
import os
import poplib
import random
import resource
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import argon2

from benchmarks.imap_mailbox import WORDS, fill
from benchmarks.run import (
    PeakSampler,
    free_port,
    tree_cpu,
    tree_pss_mib,
    wait_for_port,
)
from mailstack.address import local_address
from mailstack.users import UserDatabase

DOMAIN = "localhost"
PASSWORD = "bench-pw"


@dataclass
class Sizes:
    big: int = 10000  # messages in the big INBOX
    mix: int = 500  # messages in the mix INBOX
    pop: int = 200  # messages read over POP3
    mix_clients: int = 10
    mix_seconds: float = 10
    sessions: int = 1000  # idle IMAP sessions
    idlers: int = 200  # clients in IDLE
    idle_seconds: float = 10

    def scaled(self, scale: float) -> Sizes:
        if scale >= 1:
            return self
        return Sizes(big=max(20, int(self.big * scale)), mix=max(20, int(self.mix * scale)),
                     pop=max(5, int(self.pop * scale)), mix_clients=min(self.mix_clients, 3),
                     mix_seconds=max(1.0, self.mix_seconds * scale),
                     sessions=max(5, int(self.sessions * scale)),
                     idlers=max(2, int(self.idlers * scale)),
                     idle_seconds=max(1.0, self.idle_seconds * scale))


# -- the common content -------------------------------------------------------------------

def make_content(root: str, sizes: Sizes) -> dict[str, str]:
    """
    The Maildirs (C{root/<user>}, messages in C{new/}), a certificate, and
    the password hash; every system gets hard links of these.
    """
    fill(os.path.join(root, "big"), sizes.big)
    fill(os.path.join(root, "mix"), sizes.mix)
    fill(os.path.join(root, "pop"), sizes.pop)
    cert, key = os.path.join(root, "cert.pem"), os.path.join(root, "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", key, "-out", cert], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    hasher = argon2.PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    return {"root": root, "cert": cert, "key": key, "hash": hasher.hash(PASSWORD)}


def install_content(content: dict[str, str], mail: str, users_dir: str) -> None:
    users = UserDatabase(users_dir)
    for user in ("big", "mix", "pop"):
        users.add(local_address(f"{user}@{DOMAIN}"), content["hash"])
        shutil.copytree(os.path.join(content["root"], user),
                        os.path.join(mail, DOMAIN, user), copy_function=os.link)


# -- the systems --------------------------------------------------------------------------------

class MailstackAccess:
    name = "mailstack"

    def __init__(self, content: dict[str, str], work: str) -> None:
        data = os.path.join(work, "data")
        install_content(content, os.path.join(data, "mail"), data)
        self.imaps, self.pop3 = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "twisted", f"--log-file={work}/mailstack.log",
             "--log-format=text", "mailstack", "--data-dir", data, "--hostname", "mx.test",
             "--smtp=none", "--submission=none", "--submissions=none", "--imap=none",
             "--imaps", f"tcp:{self.imaps}:interface=127.0.0.1",
             "--pop3", f"tcp:{self.pop3}:interface=127.0.0.1",
             "--tls-cert", content["cert"], "--tls-key", content["key"]], cwd=data)
        self.root = self.process.pid
        wait_for_port("127.0.0.1", self.imaps)
        wait_for_port("127.0.0.1", self.pop3)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


DOVECOT_CONF = """\
base_dir = {work}/run
state_dir = {work}/state
instance_name = bench-{tag}
log_path = {work}/dovecot.log
protocols = imap pop3
listen = 127.0.0.1
ssl = required
ssl_cert = <{cert}
ssl_key = <{key}
disable_plaintext_auth = yes
auth_mechanisms = plain
default_process_limit = 2500
default_client_limit = 10000
mail_location = maildir:{work}/mail/%d/%n
passdb {{
  driver = passwd-file
  args = scheme=ARGON2ID {work}/users
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home={work}/mail/%d/%n
}}
protocol imap {{
  mail_max_userip_connections = 10000
}}
protocol pop3 {{
  mail_max_userip_connections = 10000
}}
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {imaps}
    ssl = yes
  }}
}}
service pop3-login {{
  inet_listener pop3 {{
    address = 127.0.0.1
    port = {pop3}
  }}
  inet_listener pop3s {{
    port = 0
  }}
}}
"""


class Dovecot:
    """
    A private Dovecot instance in C{work} (see the module docstring).
    """

    name = "dovecot"

    def __init__(self, content: dict[str, str], work: str) -> None:
        self.work = work
        mail = os.path.join(work, "mail")
        install_content(content, mail, work)
        for directory, _, files in os.walk(mail):
            shutil.chown(directory, 65534, 65534)
            for name in files:
                shutil.chown(os.path.join(directory, name), 65534, 65534)
        os.chmod(work, 0o755)
        shutil.chown(os.path.join(work, "users"), "dovecot")  # its auth process reads it
        self.imaps, self.pop3 = free_port("127.0.0.1"), free_port("127.0.0.1")
        self.conf = os.path.join(work, "dovecot.conf")
        with open(self.conf, "w") as f:
            f.write(DOVECOT_CONF.format(work=work, tag=os.path.basename(work), cert=content["cert"],
                                        key=content["key"], imaps=self.imaps, pop3=self.pop3))
        subprocess.run([dovecot_binary(), "-c", self.conf], check=True)
        pidfile = os.path.join(work, "run", "master.pid")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with open(pidfile) as f:
                    self.root = int(f.read().strip())
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        else:
            raise RuntimeError(f"dovecot did not start; see {work}/dovecot.log")
        wait_for_port("127.0.0.1", self.imaps)
        wait_for_port("127.0.0.1", self.pop3)

    def stop(self) -> None:
        subprocess.run([dovecot_binary(), "-c", self.conf, "stop"], check=False,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{self.root}"):
            time.sleep(0.05)


def dovecot_binary() -> str:
    return shutil.which("dovecot") or "/usr/sbin/dovecot"


def dovecot_available() -> bool:
    return (os.path.exists(dovecot_binary()) and os.path.exists("/usr/lib/dovecot/imap")
            and os.path.exists("/usr/lib/dovecot/pop3"))


def ensure_dovecot() -> bool:
    """
    Install Debian's dovecot-imapd and dovecot-pop3d when missing and
    possible; whether Dovecot can be measured (root is needed).
    """
    if os.getuid() != 0:
        return False
    if not dovecot_available() and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "install", "-y", "-q", "dovecot-imapd", "dovecot-pop3d"],
                       check=True, env=env, stdout=subprocess.DEVNULL)
    return dovecot_available()


# -- clients -----------------------------------------------------------------------------------

def client_context(content: dict[str, str]) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=content["cert"])
    context.check_hostname = False  # connected by address; the certificate is still checked
    return context


def imap_login(system: object, context: ssl.SSLContext, user: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("127.0.0.1", system.imaps, ssl_context=context,  # type: ignore
                               timeout=600)
    client.login(f"{user}@{DOMAIN}", PASSWORD)
    return client


def ok(answer: tuple) -> list:
    typ, data = answer
    if typ != "OK":
        raise RuntimeError(f"{typ} {data!r}")
    return data


def fetched(data: list) -> int:
    """
    How many messages a FETCH answered for.
    """
    return sum(1 for item in data if item not in (b")",) and item is not None)


# -- the cases -----------------------------------------------------------------------------------

@dataclass
class Step:
    seconds: float
    cpu: float
    answer: str  # what the server answered, compared across systems


@dataclass
class Measured:
    steps: dict[str, Step] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)


BIG_STEPS = [
    ("SELECT INBOX, first (claims new/)", lambda c: ok(c.select("INBOX"))[0].decode()),
    ("SELECT INBOX, again", lambda c: ok(c.select("INBOX"))[0].decode()),
    ("FETCH 1:* (FLAGS UID RFC822.SIZE)",
     lambda c: str(fetched(ok(c.fetch("1:*", "(FLAGS UID RFC822.SIZE)"))))),
    ("FETCH 1:* BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)]",
     lambda c: str(fetched(ok(c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"))))),
    ("FETCH 1:* ENVELOPE", lambda c: str(fetched(ok(c.fetch("1:*", "ENVELOPE"))))),
    ("SEARCH SUBJECT invoice",
     lambda c: str(len(ok(c.search(None, "SUBJECT", "invoice"))[0].split()))),
    ('SEARCH TEXT "Line 5 about"',
     lambda c: str(len(ok(c.search(None, "TEXT", '"Line 5 about"'))[0].split()))),
    # The same once more: both servers answer from their caches now.
    ("header listing, again",
     lambda c: str(fetched(ok(c.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"))))),
    ("FETCH 1:* ENVELOPE, again", lambda c: str(fetched(ok(c.fetch("1:*", "ENVELOPE"))))),
    ("SEARCH SUBJECT invoice, again",
     lambda c: str(len(ok(c.search(None, "SUBJECT", "invoice"))[0].split()))),
]


def case_big(system: object, content: dict[str, str], sizes: Sizes, into: Measured) -> None:
    client = imap_login(system, client_context(content), "big")
    try:
        for label, action in BIG_STEPS:
            cpu0, t0 = tree_cpu(system.root), time.monotonic()  # type: ignore[attr-defined]
            answer = action(client)
            into.steps[label] = Step(time.monotonic() - t0,
                                     tree_cpu(system.root) - cpu0, answer)  # type: ignore
        times = []
        cpu0 = tree_cpu(system.root)  # type: ignore[attr-defined]
        for _ in range(20):
            t0 = time.monotonic()
            ok(client.noop())
            times.append(time.monotonic() - t0)
        into.steps["NOOP (median of 20)"] = Step(
            statistics.median(times), (tree_cpu(system.root) - cpu0) / 20, "OK")  # type: ignore
        client.logout()
    finally:
        close(client)


def mix_client(system: object, context: ssl.SSLContext, seconds: float, seed: int,
               counts: list[int], errors: list[str], refused: list[str],
               start: threading.Barrier) -> None:
    rnd = random.Random(seed)
    commands = 0
    try:
        for attempt in range(3):
            try:
                client = imap_login(system, context, "mix")
                break
            except imaplib.IMAP4.error as e:
                # Counted: mailstack once answered concurrent first logins
                # with a storage error (see benchmarks/README.rst).
                errors.append(f"login: {e}"[:200])
                if attempt == 2:
                    raise
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            exists = int(ok(client.select("INBOX"))[0])
            last = max(1, exists)
            some = rnd.randint(1, last)
            appended = (f"From: mix{seed}@remote.test\r\nSubject: appended\r\n\r\n"
                        f"{'x' * 2000}\r\n").encode()
            actions: list[tuple[Any, tuple]] = [
                (client.fetch, ("1:*", "(FLAGS UID RFC822.SIZE)")),
                (client.fetch, (f"{max(1, last - 19)}:{last}",
                                "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")),
                (client.fetch, (str(some), "(BODY.PEEK[])")),
                (client.fetch, (str(rnd.randint(1, last)), "(BODY.PEEK[TEXT])")),
                (client.store, (str(some), "+FLAGS", "(\\Seen)")),
                (client.search, (None, "SUBJECT", rnd.choice(WORDS))),
                (client.append, ("INBOX", None, None, appended)),
                (client.store, (str(last), "+FLAGS", "(\\Deleted)")),
                (client.expunge, ()),
                (client.noop, ()),
            ]
            commands += 1  # the SELECT
            for method, args in actions:
                try:
                    typ, data = method(*args)
                except imaplib.IMAP4.error as e:
                    # imaplib raises on BAD: Dovecot's answer to a sequence
                    # number that another client's EXPUNGE just removed.
                    typ, data = "NO", [str(e).encode()]
                commands += 1
                if typ == "NO":
                    refused.append(f"{data!r}"[:200])  # e.g. EXPUNGEISSUED, another client's
                elif typ != "OK":
                    errors.append(f"{typ} {data!r}"[:200])
        client.logout()
    except Exception as e:  # noqa: BLE001 - reported in the table, the run goes on
        start.abort()
        errors.append(repr(e)[:200])
    finally:
        counts.append(commands)


def case_mix(system: object, content: dict[str, str], sizes: Sizes, into: Measured) -> None:
    context = client_context(content)
    counts: list[int] = []
    errors: list[str] = []
    refused: list[str] = []
    start = threading.Barrier(sizes.mix_clients + 1)
    threads = [threading.Thread(target=mix_client, args=(system, context, sizes.mix_seconds, i,
                                                         counts, errors, refused, start),
                               daemon=True)
               for i in range(sizes.mix_clients)]
    for thread in threads:
        thread.start()
    try:
        start.wait(timeout=300)
    except threading.BrokenBarrierError:
        raise RuntimeError(f"mix clients failed to start: {errors}") from None
    cpu0, t0 = tree_cpu(system.root), time.monotonic()  # type: ignore[attr-defined]
    sampler = PeakSampler(system.root)  # type: ignore[attr-defined]
    sampler.start()
    for thread in threads:
        thread.join()
    elapsed = time.monotonic() - t0
    cpu = tree_cpu(system.root) - cpu0  # type: ignore[attr-defined]
    total = sum(counts)
    into.values["mix commands/s"] = total / elapsed
    into.values["mix CPU ms/command"] = 1000 * cpu / max(1, total)
    into.values["mix peak PSS MiB"] = sampler.stop()
    into.notes["mix errors"] = str(len(errors)) + (f" (first: {errors[0]})" if errors else "")
    into.values["mix NO answers"] = len(refused)


def case_pop3(system: object, content: dict[str, str], sizes: Sizes, into: Measured) -> None:
    client = poplib.POP3("127.0.0.1", system.pop3, timeout=600)  # type: ignore[attr-defined]
    try:
        client.stls(context=client_context(content))
        client.user(f"pop@{DOMAIN}")
        client.pass_(PASSWORD)
        count, _ = client.stat()
        for label, read in (("RETR", lambda i: client.retr(i)),
                            ("TOP n 10", lambda i: client.top(i, 10))):
            cpu0, t0 = tree_cpu(system.root), time.monotonic()  # type: ignore[attr-defined]
            octets = sum(len(b"".join(read(i)[1])) for i in range(1, count + 1))
            elapsed = time.monotonic() - t0
            into.steps[f"POP3 {label}, per message"] = Step(
                elapsed / count, (tree_cpu(system.root) - cpu0) / count,  # type: ignore
                f"{count} messages, {octets} octets")
        client.rset()
        client.quit()
    finally:
        client.close()


def hold_sessions(system: object, context: ssl.SSLContext, count: int, user: str,
                  idle: bool) -> list[imaplib.IMAP4_SSL]:
    clients = []
    for _ in range(count):
        client = imap_login(system, context, user)
        ok(client.select("INBOX"))
        if idle:
            tag = client._new_tag()  # type: ignore[attr-defined]
            client.send(tag + b" IDLE\r\n")
            line = client.readline()
            if not line.startswith(b"+"):
                raise RuntimeError(f"IDLE refused: {line!r}")
            client.idle_tag = tag  # type: ignore[attr-defined]
        clients.append(client)
    return clients


def close(client: imaplib.IMAP4_SSL) -> None:
    try:
        client.shutdown()
    except OSError:
        pass  # logged out already


def release(clients: list[imaplib.IMAP4_SSL]) -> None:
    for client in clients:
        try:
            if hasattr(client, "idle_tag"):
                client.send(b"DONE\r\n")
        except OSError:
            pass  # the server closed it already; close() below is all that is left
        close(client)


def case_sessions(system: object, content: dict[str, str], sizes: Sizes,
                  into: Measured) -> None:
    pss0 = tree_pss_mib(system.root)  # type: ignore[attr-defined]
    clients = hold_sessions(system, client_context(content), sizes.sessions, "pop", idle=False)
    try:
        time.sleep(1)
        into.values["idle sessions PSS MiB"] = tree_pss_mib(system.root)  # type: ignore
        into.values["idle sessions PSS before MiB"] = pss0
        into.notes["idle sessions"] = f"{len(clients)} logged in, INBOX selected"
    finally:
        release(clients)


def case_idle(system: object, content: dict[str, str], sizes: Sizes, into: Measured) -> None:
    clients = hold_sessions(system, client_context(content), sizes.idlers, "big", idle=True)
    try:
        time.sleep(1)
        cpu0, t0 = tree_cpu(system.root), time.monotonic()  # type: ignore[attr-defined]
        time.sleep(sizes.idle_seconds)
        cpu = tree_cpu(system.root) - cpu0  # type: ignore[attr-defined]
        into.values["IDLE CPU % of a core"] = 100 * cpu / (time.monotonic() - t0)
        into.notes["IDLE"] = f"{len(clients)} clients in IDLE on {sizes.big} messages"
    finally:
        release(clients)


CASES = {"big": case_big, "mix": case_mix, "pop3": case_pop3,
         "idle-sessions": case_sessions, "idle": case_idle}


def print_logs(work: str) -> None:
    """
    The server's warnings and errors, for a case that went wrong.
    """
    for name in ("dovecot.log", "mailstack.log"):
        path = os.path.join(work, name)
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                lines = [line for line in f if any(
                    word in line for word in ("rror", "arn", "Traceback", "Fatal", "Panic"))]
            print(f"{name}:", *lines[-20:], sep="\n", file=sys.stderr)


def measure(system_class: type, content: dict[str, str], sizes: Sizes,
            cases: list[str]) -> Measured:
    work = tempfile.mkdtemp(prefix=f"bench-access-{system_class.name}-")
    system = None
    result = Measured()
    try:
        system = system_class(content, work)
        time.sleep(0.5)
        for name in cases:
            t0 = time.monotonic()
            CASES[name](system, content, sizes, result)
            result.notes.setdefault("case seconds", "")
            result.notes["case seconds"] += f"{name} {time.monotonic() - t0:.0f} "
        if result.notes.get("mix errors", "0") != "0":
            print_logs(work)
        return result
    except BaseException:
        print_logs(work)
        raise
    finally:
        if system is not None:
            system.stop()
        shutil.rmtree(work, ignore_errors=True)


# -- the report ----------------------------------------------------------------------------------

def run(systems: list[type], runs: int, sizes: Sizes, cases: list[str] | None = None,
        out: object = sys.stdout) -> dict:
    cases = cases or list(CASES)
    root = tempfile.mkdtemp(prefix="bench-access-content-")
    results: dict[str, list[Measured]] = {}
    try:
        content = make_content(root, sizes)
        for number in range(runs):
            for system in systems:
                measured = measure(system, content, sizes, cases)
                results.setdefault(system.name, []).append(measured)
                summary = ", ".join(f"{k} {v:.3g}" for k, v in measured.values.items())
                print(f"access run {number + 1}/{runs} {system.name:9} {summary}",
                      file=out, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"systems": systems, "results": results, "sizes": sizes}


def table(report: dict) -> str:
    """
    Medians over the runs; ratio = mailstack / Dovecot (for times, above 1
    is slower; for the command rate, above 1 is faster).
    """
    names = [s.name for s in report["systems"]]
    results = report["results"]
    lines = ["| measure | " + " | ".join(names) + " | ratio | same answers |",
             "|---|" + "---|" * len(names) + "---|---|"]
    first = results[names[0]][0]
    for label in first.steps:
        medians, cpus, answers = {}, {}, set()
        for name in names:
            steps = [m.steps[label] for m in results[name] if label in m.steps]
            medians[name] = statistics.median(s.seconds for s in steps)
            cpus[name] = statistics.median(s.cpu for s in steps)
            answers.update(s.answer for s in steps)
        ratio = (f"{medians['mailstack'] / medians['dovecot']:.1f}x"
                 if {"mailstack", "dovecot"} <= set(medians) and medians["dovecot"] else "")
        cells = " | ".join(f"{1000 * medians[n]:.2f} ms (CPU {1000 * cpus[n]:.2f})"
                           for n in names)
        lines.append(f"| {label} | {cells} | {ratio} | "
                     f"{'yes' if len(answers) == 1 else 'NO: ' + '; '.join(sorted(answers))} |")
    for label in first.values:
        medians = {n: statistics.median(m.values[label] for m in results[n]) for n in names}
        ratio = (f"{medians['mailstack'] / medians['dovecot']:.2f}x"
                 if {"mailstack", "dovecot"} <= set(medians) and medians["dovecot"] else "")
        cells = " | ".join(f"{medians[n]:.3g}" for n in names)
        lines.append(f"| {label} | {cells} | {ratio} | |")
    for label in first.notes:
        cells = " | ".join("; ".join(sorted({m.notes[label] for m in results[n]}))
                           for n in names)
        lines.append(f"| {label} | {cells} | | |")
    return "\n".join(lines)


def systems_for(names: list[str]) -> list[type]:
    systems: list[type] = []
    for name in names:
        if name == "mailstack":
            systems.append(MailstackAccess)
        elif name == "dovecot":
            if ensure_dovecot():
                systems.append(Dovecot)
            else:
                print("dovecot: needs root and dovecot-imapd/dovecot-pop3d; skipped",
                      file=sys.stderr)
    return systems


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--systems", default="mailstack,dovecot")
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    report = run(systems_for(args.systems.split(",")), args.runs,
                 Sizes().scaled(args.scale), args.cases.split(","))
    print()
    print(table(report))
    return report


if __name__ == "__main__":
    main()
