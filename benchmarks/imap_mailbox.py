"""
A large INBOX over IMAP: how fast 10,000 messages open, list and search.

    python -m benchmarks.imap_mailbox [--messages 10000]

Fills a fresh user's INBOX C{new/} directly (varied 2-6 KiB messages, with
the file names mailstack's own delivery writes), starts C{twist mailstack}
with IMAPS on 127.0.0.1, and times with imaplib what a mail client does:
the first SELECT (which claims every message from C{new/} and gives out
10,000 UIDs), a second SELECT, the flags/size listing, the header listing a
client shows in its message list, a header SEARCH, a body SEARCH, one
message, and STATUS.  Prints each step's wall time, the server's CPU for
it, and the server's peak memory.
"""

import argparse
import imaplib
import os
import shutil
import ssl
import tempfile
import time

from benchmarks.inbound import peak_rss_mib, process_cpu
from mailstack.address import local_address
from mailstack.auth import hash_password
from mailstack.delivery.maildir import unique_name
from mailstack.testing import start_server_process
from mailstack.users import UserDatabase

WORDS = ("report meeting invoice holiday patch review lunch budget release "
         "draft photos question update schedule").split()


def fill(maildir, count):
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(maildir, sub), exist_ok=True)
    base = time.time() - count
    for i in range(count):
        word = WORDS[i % len(WORDS)]
        body = (f"Line {i} about the {word}.\n" * (40 + (i * 7) % 120)).encode()
        content = (
            f"Return-Path: <sender{i % 97}@remote.test>\n"
            f"Received: from remote.test by mx.test; Mon, 2 Nov 2026 10:00:00 +0000\n"
            f"From: Sender {i % 97} <sender{i % 97}@remote.test>\n"
            f"To: bench@localhost\n"
            f"Subject: {word} number {i}\n"
            f"Date: Mon, 2 Nov 2026 10:{i % 60:02d}:00 +0000\n"
            f"Message-ID: <{i}@remote.test>\n"
            f"\n"
        ).encode() + body
        name = unique_name("mx.test", len(content), now=base + i,
                           vsize=len(content) + content.count(b"\n"))
        with open(os.path.join(maildir, "new", name), "wb") as f:
            f.write(content)


def run(count):
    data_dir = tempfile.mkdtemp(prefix="ms-imap-")
    results = []
    try:
        UserDatabase(data_dir).add(local_address("bench@localhost"), hash_password("pw"))
        fill(os.path.join(data_dir, "mail", "localhost", "bench"), count)
        process, port = start_server_process(
            data_dir, ["--imaps", "tcp:0:interface=127.0.0.1"], listener="imaps")
        try:
            context = ssl.create_default_context(
                cafile=os.path.join(data_dir, "tls", "cert.pem"))
            client = imaplib.IMAP4_SSL("localhost", port, ssl_context=context, timeout=300)
            client.login("bench@localhost", "pw")

            def step(label, f):
                cpu0, t0 = process_cpu(process.pid), time.monotonic()
                typ, data = f()
                elapsed = time.monotonic() - t0
                cpu = process_cpu(process.pid) - cpu0
                assert typ == "OK", (label, typ, data)
                results.append((label, elapsed, cpu, data))
                return data

            exists = step("SELECT INBOX (first: claims new/, assigns UIDs)",
                          lambda: client.select("INBOX"))
            assert exists == [str(count).encode()], exists
            client.close()
            step("SELECT INBOX (again)", lambda: client.select("INBOX"))
            listing = step("UID FETCH 1:* (UID FLAGS RFC822.SIZE INTERNALDATE)",
                           lambda: client.uid("FETCH", "1:*",
                                              "(UID FLAGS RFC822.SIZE INTERNALDATE)"))
            assert len(listing) == count, len(listing)
            headers = step("FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])",
                           lambda: client.fetch(
                               "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (FROM SUBJECT DATE)])"))
            assert len([x for x in headers if isinstance(x, tuple)]) == count
            found = step("SEARCH SUBJECT invoice", lambda: client.search(None, "SUBJECT",
                                                                         "invoice"))
            assert len(found[0].split()) == len(
                [i for i in range(count) if WORDS[i % len(WORDS)] == "invoice"])
            step("SEARCH BODY \"Line 5 about\"",
                 lambda: client.search(None, "BODY", '"Line 5 about"'))
            step("FETCH one message BODY[]", lambda: client.fetch(str(count // 2), "(BODY[])"))
            step("STATUS INBOX (MESSAGES UNSEEN UIDNEXT)",
                 lambda: client.status("INBOX", "(MESSAGES UNSEEN UIDNEXT)"))
            client.logout()
            rss = peak_rss_mib(process.pid)
        finally:
            process.kill()
            process.wait()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    return results, rss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000)
    args = parser.parse_args(argv)
    results, rss = run(args.messages)
    print(f"{args.messages} messages in INBOX; server peak RSS {rss:.0f} MiB")
    print("| step | wall s | server CPU s |")
    print("|---|---|---|")
    for label, elapsed, cpu, _ in results:
        print(f"| {label} | {elapsed:.2f} | {cpu:.2f} |")


if __name__ == "__main__":
    main()
