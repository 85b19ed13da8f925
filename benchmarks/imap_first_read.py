"""
The first read of a folder, step by step, in one process (issue 18): the
first header listing, the index written, the first ENVELOPE, the index
read anew, the first SEARCH SUBJECT and SEARCH TEXT (as a session runs
them, L{search_folder}), over the messages of
L{benchmarks.imap_mailbox.fill}, each step's CPU time printed; C{-p}
prints each step's cProfile (top 8 by own time) as well.

    python -m benchmarks.imap_first_read 10000 [-p]
"""

import cProfile
import os
import pstats
import shutil
import sys
import tempfile
import time

from twisted.mail import imap4

from benchmarks.imap_mailbox import fill
from mailstack.access.folder import Folder, ensure_folder
from mailstack.access.imap import render
from mailstack.access.index import indexes
from mailstack.access.mailbox import HEADER, load, search_folder


def main(argv: list[str]) -> None:
    count = int(argv[0]) if argv and argv[0].isdigit() else 10000
    profile = "-p" in argv
    root = tempfile.mkdtemp(prefix="ms-first-read-")
    try:
        fill(root, count)
        ensure_folder(root, subfolder=False)
        folder = Folder(root)
        items = list(enumerate(folder.scan().entries, 1))

        def query(text: bytes) -> list:
            return imap4.IMAP4Server().arg_fetchatt(text)[0]

        def fetch(items_query: list, envelope: bool) -> int:
            loaded = load(folder, items, HEADER, cached=True, envelope=envelope)
            return sum(len(render(m, items_query, False)) for m in loaded if m is not None)

        columns: dict = {}  # as a session's mailbox keeps them

        def search(keys: list) -> int:
            return len(search_folder(folder, items, keys, False, columns))

        listing = query(b"(BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])")
        steps = [
            ("first header listing", lambda: fetch(listing, False)),
            ("writing the index", lambda: indexes.get(root).save()),
            ("first ENVELOPE", lambda: fetch(query(b"ENVELOPE"), True)),
            ("writing the index again", lambda: indexes.get(root).save()),
            ("reading the index anew", lambda: (indexes.forget(root), indexes.get(root))),
            ("first SEARCH SUBJECT", lambda: search([b"SUBJECT", b"invoice"])),
            ("SEARCH SUBJECT again", lambda: search([b"SUBJECT", b"invoice"])),
            ("SEARCH TEXT", lambda: search([b"TEXT", b"Line 5 about"])),
        ]
        for name, step in steps:
            started = time.process_time()
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                step()
                profiler.disable()
                print("=====", name)
                pstats.Stats(profiler).sort_stats("tottime").print_stats(8)
            else:
                step()
            print(f"{name}: {1000 * (time.process_time() - started):.0f} ms CPU")
        size = os.path.getsize(os.path.join(root, "mailstack-index"))
        print(f"index file: {size} bytes")
    finally:
        indexes.forget(root)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
