# -*- test-case-name: tests.test_tlspolicy -*-
"""
C{mailstack tlsrpt DAY [DOMAIN]}: the RFC 8460 reports of a day's outbound
TLS outcomes (L{mailstack.mailauth.tlsrpt}).  Apart from that module so
that building the command line parser (which C{sendmail} does too, under a
restricted user) imports nothing heavy.
"""

from __future__ import annotations

from typing import Any


def add_parser(commands: Any) -> None:
    """
    Register C{tlsrpt} on the C{mailstack} command's subparsers.
    """
    parser = commands.add_parser("tlsrpt", help="print the TLS reports (RFC 8460 JSON) of a "
                                 "day's outbound sessions")
    parser.add_argument("day", help="the UTC day, YYYY-MM-DD")
    parser.add_argument("domain", nargs="?", help="only this recipient domain's report")
    parser.add_argument("--contact", help="contact-info of the reports "
                        "[default: postmaster@ the first local domain]")


def tlsrpt_command(args: Any, data_dir: str, domains: tuple[str, ...] | None,
                   config_file: str | None, stdout: Any) -> None:
    """
    C{mailstack tlsrpt DAY [DOMAIN]}: a JSON list of the day's reports, or
    with DOMAIN that domain's report.
    """
    import json
    import os
    import re
    import socket

    from mailstack.errors import CommandError
    from mailstack.mailauth.tlsrpt import make_reports, read_day

    if not re.match(r"^\d{4}-\d{2}-\d{2}$", args.day):
        raise CommandError(f"not a day: {args.day!r} (YYYY-MM-DD)", 64)
    organization = socket.getfqdn()
    if config_file:
        from mailstack.config import build_config
        organization = build_config({}, config_file).hostname
    contact = args.contact or f"postmaster@{(domains or ('localhost',))[0]}"
    try:
        lines = read_day(os.path.join(data_dir, "tlsrpt"), args.day)
    except OSError as e:
        raise CommandError(f"cannot read the TLS reports: {e.strerror}", 66) from None
    reports = make_reports(lines, args.day, organization, contact)
    if args.domain:
        wanted = args.domain.strip().lower().rstrip(".")
        reports = [r for r in reports if r["policies"][0]["policy"]["policy-domain"] == wanted]
        if not reports:
            raise CommandError(f"no TLS outcomes for {wanted} on {args.day}", 66)
        stdout.write(json.dumps(reports[0], indent=2) + "\n")
        return
    stdout.write(json.dumps(reports, indent=2) + "\n")
