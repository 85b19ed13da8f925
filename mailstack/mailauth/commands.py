# -*- test-case-name: tests.test_mailauth_dns -*-
"""
The C{mailstack dkim ...} and C{mailstack dns ...} commands.
"""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:  # the command imports Twisted only when it runs
    from mailstack.reactors import IMailReactor

EX_USAGE, EX_DATAERR, EX_CANTCREAT = 64, 65, 73


def add_parsers(commands: Any) -> None:
    """
    Register C{dkim} and C{dns} on the C{mailstack} command's subparsers.
    """
    dkim = commands.add_parser("dkim", help="DKIM keys").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    keygen = dkim.add_parser("keygen", help="make an RSA and an Ed25519 key and print "
                             "their TXT records")
    keygen.add_argument("domain")
    keygen.add_argument("--selector", help="key set name; the selectors are S-rsa and "
                        "S-ed25519 [default: the year and month, e.g. 202611]")
    activate = dkim.add_parser("activate", help="sign with this key set from now on")
    activate.add_argument("domain")
    activate.add_argument("selector")
    dkim.add_parser("list", help="key sets and their TXT records").add_argument(
        "domain", nargs="?")

    dns = commands.add_parser("dns", help="print the DNS records a domain needs")
    dns.add_argument("domain")
    dns.add_argument("--check", action="store_true",
                     help="look the records up and say what is missing or wrong")
    dns.add_argument("--dns-server", help="HOST[:PORT] to ask [default: the system resolver, "
                     "or dns-server from --config]")
    dns.add_argument("--hostname", help="the MX host [default: hostname from --config, "
                     "else this machine's name]")
    dns.add_argument("--report-address", help="where DMARC and TLS reports go "
                     "[default: postmaster@DOMAIN]")


def _fail(message: str, status: int) -> None:
    from mailstack.errors import CommandError
    raise CommandError(message, status)


def make_resolver(server: tuple[str, int] | None, reactor: IMailReactor) -> Any:
    """
    A twisted.names resolver: C{server} alone when given, else the system's
    configuration (/etc/resolv.conf and /etc/hosts).
    """
    from twisted.names.client import Resolver, createResolver

    if server:
        return Resolver(servers=[server], reactor=reactor)
    return createResolver()


def dkim_command(args: argparse.Namespace, data_dir: str, stdout: TextIO) -> None:
    from mailstack.mailauth import keys

    try:
        if args.action == "keygen":
            made, active = keys.generate(data_dir, args.domain, args.selector)
            for key in made:
                print(key.zone_line(), file=stdout)
            base = made[0].selector.rsplit("-", 1)[0]
            if active:
                print(f"; key set {base} is active: mail of {made[0].domain} is signed with it",
                      file=stdout)
            else:
                print(f"; publish these records, then after their TTL: "
                      f"mailstack dkim activate {made[0].domain} {base}", file=stdout)
        elif args.action == "activate":
            keys.activate(data_dir, args.domain, args.selector)
            print(f"{keys.check_domain(args.domain)}: signing with key set {args.selector}",
                  file=stdout)
        else:
            root = os.path.join(data_dir, "dkim")
            domains = [args.domain] if args.domain else (
                sorted(os.listdir(root)) if os.path.isdir(root) else [])
            for domain in domains:
                current = keys.active_selector(data_dir, domain)
                for base, found in sorted(keys.key_sets(data_dir, domain).items()):
                    state = "active" if base == current else "inactive"
                    print(f"; {keys.check_domain(domain)} key set {base} ({state})", file=stdout)
                    for key in found:
                        print(key.zone_line(), file=stdout)
    except keys.DKIMKeyError as e:
        _fail(str(e), EX_DATAERR)


def dns_command(args: argparse.Namespace, data_dir: str, config_file: str | None,
                stdout: TextIO) -> None:
    from mailstack.config import ConfigError, build_config, parse_hostport
    from mailstack.mailauth import keys
    from mailstack.mailauth.dnsrecords import check_all, zone_text

    try:
        domain = keys.check_domain(args.domain)
    except keys.DKIMKeyError as e:
        _fail(str(e), EX_DATAERR)
    hostname, server = args.hostname, None
    try:
        config = build_config({}, config_file) if config_file else None
        if args.dns_server:
            server = parse_hostport(args.dns_server, 53)
        elif config is not None:
            server = config.dns_server
    except ConfigError as e:
        _fail(str(e), EX_USAGE)
    if not hostname:
        import socket
        hostname = config.hostname if config is not None else socket.getfqdn()
    hostname = hostname.lower().rstrip(".")
    found = []
    for found_set in keys.key_sets(data_dir, domain).values():
        found.extend(found_set)
    if not args.check:
        stdout.write(zone_text(domain, hostname, found, args.report_address))
        return

    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    async def main(reactor: IMailReactor) -> None:
        from mailstack.mailauth.lookup import DNSCache

        cache = DNSCache(make_resolver(server, reactor), reactor, timeout=10)
        findings = await check_all(cache, domain, hostname, found, args.report_address)
        bad = 0
        for finding in findings:
            record = finding.record
            mark = {"ok": "ok", "missing": "MISSING", "wrong": "WRONG"}.get(
                finding.status, "ERROR")
            bad += finding.status != "ok"
            print(f"{mark:<8} {record.purpose:<22} {record.name} {record.rtype}"
                  + (f": {finding.detail}" if finding.detail else ""), file=stdout)
            if finding.status in ("missing", "wrong") and not record.name.startswith("*"):
                print(f"         publish: {record.zone_line()}", file=stdout)
        print(f"{len(findings) - bad} of {len(findings)} records are right", file=stdout)
        stdout.flush()
        if bad:
            raise SystemExit(1)

    react(lambda reactor: ensureDeferred(main(reactor)), [])


__all__ = ["add_parsers", "dkim_command", "dns_command"]
