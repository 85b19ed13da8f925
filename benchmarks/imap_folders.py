"""
LIST cost against the number of folders, and what a crafted message costs
to fetch: the figures behind the folder and MIME limits (issue 11).

    python -m benchmarks.imap_folders

Times, in-process and without the network, L{MaildirAccount.folders}
(the work of a LIST) for 250 to 4,000 folders in a two-level hierarchy,
and the parse and BODYSTRUCTURE of a 60,000-part message, a 150,000-address
To: and 5,000-deep nesting (all bounded by the limits).  Linear LIST cost
shows as a constant time per folder.
"""

import os
import shutil
import tempfile
import time

from mailstack.access.mailbox import MaildirAccount
from mailstack.access.mime import Part


def list_cost(count: int) -> float:
    root = tempfile.mkdtemp(prefix="ms-bench-")
    try:
        account = MaildirAccount(root, "localhost", None, None)
        account.prepare()
        for i in range(count):
            os.makedirs(os.path.join(root, f".top{i % 50}.sub{i}", "cur"))
        start = time.perf_counter()
        for _ in range(3):
            infos = account.folders()
        assert len(infos) >= count
        return (time.perf_counter() - start) / 3
    finally:
        shutil.rmtree(root, ignore_errors=True)


def crafted() -> dict[str, bytes]:
    from tests.test_crafted_mail import deep, many_addresses, many_parts
    return {"60,000 parts": many_parts(), "150,000 addresses": many_addresses(),
            "5,000-deep nesting": deep()}


def main() -> None:
    print("folders  LIST work  per folder")
    for count in (250, 500, 1000, 2000, 4000):
        seconds = list_cost(count)
        print(f"{count:7d}  {seconds * 1000:7.1f} ms  {seconds / count * 1e6:6.1f} us")
    print()
    print("message              size       parse+structure+envelope")
    for name, raw in crafted().items():
        start = time.perf_counter()
        part = Part(raw).parse_all()
        part.bodystructure(True)
        part.envelope()
        print(f"{name:20s} {len(raw) / 1e6:5.1f} MB  {time.perf_counter() - start:6.2f} s"
              f"  ({part.budget.parts} parts)")


if __name__ == "__main__":
    main()
