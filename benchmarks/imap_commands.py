"""
Server CPU per IMAP command, one client at a time, on the mix's INBOX.

    python -m benchmarks.imap_commands [--n 40] [--systems mailstack,dovecot]

The commands of C{python -m benchmarks.access --cases mix}, each repeated
C{n} times by one logged-in client while a second session has the folder
selected, the server's CPU (its process tree, from C{/proc}) divided by
C{n}: where the mix's CPU per command goes, command by command.  The
steps marked "another session's STORE" include that STORE.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from typing import Any, Callable

from benchmarks.access import (
    Sizes, client_context, imap_login, make_content, ok, systems_for,
)
from benchmarks.imap_mailbox import WORDS
from benchmarks.run import tree_cpu

APPENDED = b"From: x@remote.test\r\nSubject: appended\r\n\r\n" + b"x" * 2000 + b"\r\n"


def steps(client: Any, other: Any, count: int, rnd: random.Random
          ) -> list[tuple[str, Callable[[], Any]]]:
    some = lambda: str(rnd.randint(1, count))  # noqa: E731 - a one-line helper
    return [
        ("SELECT INBOX, unchanged", lambda: client.select("INBOX")),
        ("FETCH 1:* (FLAGS UID RFC822.SIZE)",
         lambda: client.fetch("1:*", "(FLAGS UID RFC822.SIZE)")),
        ("FETCH 20 BODY.PEEK[HEADER.FIELDS (...)]",
         lambda: client.fetch(f"{count - 19}:{count}",
                              "(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")),
        ("FETCH BODY.PEEK[] of one", lambda: client.fetch(some(), "(BODY.PEEK[])")),
        ("FETCH BODY.PEEK[TEXT] of one", lambda: client.fetch(some(), "(BODY.PEEK[TEXT])")),
        ("STORE +FLAGS (\\Seen)", lambda: client.store(some(), "+FLAGS", "(\\Seen)")),
        ("SEARCH SUBJECT word", lambda: client.search(None, "SUBJECT", rnd.choice(WORDS))),
        ("NOOP, nothing changed", lambda: client.noop()),
        ("APPEND 2 KiB", lambda: client.append("INBOX", None, None, APPENDED)),
        ("STORE +FLAGS (\\Deleted), EXPUNGE",
         lambda: (client.store(str(count), "+FLAGS", "(\\Deleted)"), client.expunge())),
        ("another session's STORE, then NOOP",
         lambda: (other.store(some(), "+FLAGS", "(\\Flagged)"), client.noop())),
        ("another session's STORE, then SELECT",
         lambda: (other.store(some(), "-FLAGS", "(\\Flagged)"), client.select("INBOX"))),
    ]


def measure(system_class: type, content: dict[str, str], n: int) -> dict[str, float]:
    work = tempfile.mkdtemp(prefix=f"bench-commands-{system_class.name}-")
    system = system_class(content, work)
    found: dict[str, float] = {}
    try:
        time.sleep(0.5)
        context = client_context(content)
        client, other = imap_login(system, context, "mix"), imap_login(system, context, "mix")
        ok(other.select("INBOX"))
        count = int(ok(client.select("INBOX"))[0])
        for label, action in steps(client, other, count, random.Random(1)):
            cpu0 = tree_cpu(system.root)  # type: ignore[attr-defined]
            for _ in range(n):
                action()
            found[label] = 1000 * (tree_cpu(system.root) - cpu0) / n  # type: ignore
            ok(client.select("INBOX"))  # the APPENDed ones seen, as the mix's next SELECT
        client.logout()
        other.logout()
    finally:
        system.stop()  # type: ignore[attr-defined]
        shutil.rmtree(work, ignore_errors=True)
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--systems", default="mailstack,dovecot")
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="bench-commands-content-")
    try:
        sizes = Sizes()
        sizes.big = sizes.pop = 20  # only the mix's INBOX is used
        content = make_content(root, sizes)
        systems = systems_for(args.systems.split(","))
        results = {s.name: measure(s, content, args.n) for s in systems}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    names = list(results)
    print(f"{'server CPU ms per command':45}" + "".join(f"{n:>12}" for n in names))
    for label in results[names[0]]:
        print(f"{label:45}" + "".join(f"{results[n][label]:12.2f}" for n in names))


if __name__ == "__main__":
    main()
