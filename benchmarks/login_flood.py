"""
A real user's login while bogus logins flood the server (Argon2 flood).

    python -m benchmarks.login_flood [--attackers 100] [--logins 10]

Starts C{twist mailstack} with submissions (implicit TLS) on 127.0.0.1
and times a real user's login (TCP, TLS, EHLO, AUTH PLAIN, QUIT) with
smtplib (the whole session, and the AUTH command alone, which is where
the throttle and the hash queue act): first on an idle server, then while
C{--attackers} threads send wrong passwords as fast as the server answers, each thread from its own
source address, either all in one /24 (one attacking network) or each in
its own /24 (a distributed attack, the worst case for the throttle's
per-network limits).  The real user comes from a network with no
failures.  Prints the median and worst login time, the real user's
answers (C{235}, or C{454 4.7.0} when the password-check queue was full),
and what the attackers got.
"""

import argparse
import base64
import os
import shutil
import smtplib
import ssl
import statistics
import tempfile
import threading
import time
from collections import Counter

from mailstack.address import local_address
from mailstack.auth import hash_password
from mailstack.testing import start_server_process
from mailstack.users import UserDatabase


def login(port, context, source, password):
    """
    One session with one AUTH PLAIN: the reply code, the seconds taken by
    the whole session and by the AUTH command alone.
    """
    t0 = time.monotonic()
    try:
        client = smtplib.SMTP_SSL("localhost", port, context=context, timeout=60,
                                  source_address=(source, 0))
    except smtplib.SMTPConnectError as e:
        return e.smtp_code, time.monotonic() - t0, 0.0
    except OSError:
        return "error", time.monotonic() - t0, 0.0
    try:
        client.ehlo("bench.test")
        token = base64.b64encode(f"\0bench@localhost\0{password}".encode()).decode()
        t1 = time.monotonic()
        code, _ = client.docmd("AUTH", "PLAIN " + token)
        auth = time.monotonic() - t1
        try:
            client.quit()
        except (smtplib.SMTPServerDisconnected, OSError):
            pass  # a throttled client is cut by the server; the AUTH figure is taken
        return code, time.monotonic() - t0, auth
    except (smtplib.SMTPServerDisconnected, OSError):
        return "closed", time.monotonic() - t0, 0.0
    finally:
        client.close()


def real_logins(port, context, count):
    results = []
    for _ in range(count):
        results.append(login(port, context, "127.0.200.1", "pw"))
        time.sleep(0.2)
    return results


def flood(port, context, sources, stop, answers):
    def attacker(source, number):
        guess = 0
        while not stop.is_set():
            code, _, _ = login(port, context, source, f"guess-{number}-{guess}")
            answers[code] += 1
            guess += 1

    threads = [threading.Thread(target=attacker, args=(source, i), daemon=True)
               for i, source in enumerate(sources)]
    for thread in threads:
        thread.start()
    return threads


def summary(label, results):
    times = [t for _, t, _ in results]
    auths = [a for _, _, a in results]
    codes = Counter(code for code, _, _ in results)
    print(f"{label:<40} session median {statistics.median(times):6.3f} s, "
          f"worst {max(times):6.3f} s; AUTH median {statistics.median(auths):6.3f} s, "
          f"worst {max(auths):6.3f} s; answers {dict(codes)}")


def run(attackers, logins):
    data_dir = tempfile.mkdtemp(prefix="ms-flood-")
    try:
        UserDatabase(data_dir).add(local_address("bench@localhost"), hash_password("pw"))
        process, port = start_server_process(
            data_dir, ["--submissions", "tcp:0:interface=127.0.0.1"], listener="submissions")
        try:
            context = ssl.create_default_context(
                cafile=os.path.join(data_dir, "tls", "cert.pem"))
            summary("idle server", real_logins(port, context, logins))
            scenarios = [
                (f"{attackers} attackers in one /24", [f"127.0.5.{i + 1}"
                                                       for i in range(attackers)]),
                (f"{attackers} attackers, each its own /24", [f"127.{1 + i // 200}.{i % 200}.9"
                                                              for i in range(attackers)]),
            ]
            for label, sources in scenarios:
                stop = threading.Event()
                answers = Counter()
                threads = flood(port, context, sources, stop, answers)
                time.sleep(2)
                results = real_logins(port, context, logins)
                stop.set()
                for thread in threads:
                    thread.join(120)
                summary(label, results)
                print(f"{'':<40} attackers got {dict(answers)}")
        finally:
            process.kill()
            process.wait()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attackers", type=int, default=100)
    parser.add_argument("--logins", type=int, default=10)
    args = parser.parse_args()
    run(args.attackers, args.logins)


if __name__ == "__main__":
    main()
