# -*- test-case-name: tests.test_cli -*-
"""
The C{mailstack} command: manage users, aliases and the outbound queue.

It reads the same C{--config} file as the server, so both agree on where
the data is.  Changes are written atomically; a running server sees them
on its next lookup, without a restart.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import Sequence, TextIO

from mailstack.address import AddressError, local_address, parse_address
from mailstack.auth import hash_password
from mailstack.config import ConfigError, build_config
from mailstack.queue.control import send_command
from mailstack.queue.store import QueueStore, valid_id
from mailstack.users import AliasMap, UserDatabase


class CommandError(Exception):
    """
    A failure to report on stderr, with an exit status (sysexits.h).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


EX_USAGE, EX_DATAERR, EX_NOUSER, EX_CANTCREAT = 64, 65, 67, 73


def read_password(stdin: TextIO, prompt: bool) -> str:
    """
    The password from a prompt (twice) on a terminal, or the first line of
    standard input otherwise.
    """
    if prompt:
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            raise CommandError("the passwords differ", EX_DATAERR)
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CommandError("an empty password is not allowed", EX_DATAERR)
    return password


def _address(text: str) -> object:
    try:
        return local_address(text)
    except AddressError as e:
        raise CommandError(f"{text}: {e}", EX_DATAERR) from None


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailstack", description=__doc__.split("\n\n")[0].strip())
    where = p.add_mutually_exclusive_group()
    where.add_argument("--data-dir", help="the data directory [default: ./mailstack-data]")
    where.add_argument("--config", help="the server's TOML configuration file")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    user = commands.add_parser("user", help="manage users").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    user.add_parser("add", help="create a user").add_argument("address")
    user.add_parser("passwd", help="change a user's password").add_argument("address")
    user.add_parser("del", help="delete a user (their mail stays on disk)").add_argument(
        "address")
    user.add_parser("list", help="list users")

    alias = commands.add_parser("alias", help="manage aliases").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    add = alias.add_parser("add", help="create or replace an alias")
    add.add_argument("alias")
    add.add_argument("targets", nargs="+", metavar="TARGET")
    alias.add_parser("del", help="delete an alias").add_argument("alias")
    alias.add_parser("list", help="list aliases")

    queue = commands.add_parser("queue", help="the outbound queue").add_subparsers(
        dest="action", required=True, metavar="ACTION")
    queue.add_parser("list", help="list queued messages, like mailq")
    queue.add_parser("show", help="one message's envelope and state").add_argument("id")
    queue.add_parser("flush", help="attempt delivery of every queued message now")
    queue.add_parser("delete", help="remove a message without bouncing it").add_argument("id")
    return p


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def queue_command(args: argparse.Namespace, data_dir: str, stdout: TextIO) -> None:
    """
    C{list} and C{show} read the queue directory; C{flush} and C{delete} ask
    the running server through its control socket (or, when none runs,
    C{delete} removes the files and C{flush} is left for the next start).
    """
    store = QueueStore(os.path.join(data_dir, "queue"))
    now = time.time()
    if args.action == "list":
        records = []
        if os.path.isdir(store.envelope_dir):
            for name in os.listdir(store.envelope_dir):
                if name.endswith(".json"):
                    try:
                        records.append(store.load(name[:-5]))
                    except (OSError, ValueError, TypeError, KeyError):
                        continue
        if not records:
            print("Mail queue is empty", file=stdout)
            return
        for record in sorted(records, key=lambda r: r.arrival):
            print(f"{record.queue_id}  {record.size:>8}  {_age(now - record.arrival):>4}  "
                  f"<{record.sender}>  next attempt in {_age(record.next_attempt - now)}",
                  file=stdout)
            for rcpt in record.recipients:
                error = f"  ({rcpt.last_error})" if rcpt.last_error else ""
                print(f"    {rcpt.state:<8} <{rcpt.address}>{error}", file=stdout)
        print(f"-- {len(records)} messages", file=stdout)
        return
    if args.action in ("show", "delete") and not valid_id(args.id):
        raise CommandError(f"not a queue id: {args.id}", EX_DATAERR)
    if args.action == "show":
        try:
            record = store.load(args.id)
        except FileNotFoundError:
            raise CommandError(f"no such message: {args.id}", EX_NOUSER) from None
        stdout.write(record.to_json().decode("utf-8") + "\n")
        return
    command = "flush" if args.action == "flush" else f"delete {args.id}"
    answer = send_command(data_dir, command)
    if answer is None:
        if args.action == "flush":
            print("the server is not running; queued mail is attempted when it starts",
                  file=stdout)
            return
        if not store.remove(args.id):
            raise CommandError(f"no such message: {args.id}", EX_NOUSER)
        print(f"deleted {args.id}", file=stdout)
        return
    if not answer.startswith("ok"):
        raise CommandError(answer.removeprefix("error ").strip(), EX_NOUSER)
    if args.action == "flush":
        print(f"flushed {answer.split()[1]} messages", file=stdout)
    else:
        print(f"deleted {args.id}", file=stdout)


def run(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> None:
    args = parser().parse_args(argv)
    try:
        if args.config:
            config = build_config({}, args.config)
            data_dir, domains = config.data_dir, config.domains
        else:
            data_dir = args.data_dir or "./mailstack-data"
            domains = None
    except ConfigError as e:
        raise CommandError(str(e), EX_USAGE) from None
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    if args.command == "queue":
        queue_command(args, data_dir, stdout)
        return
    users, aliases = UserDatabase(data_dir), AliasMap(data_dir)

    def warn_if_not_local(address: object) -> None:
        domain = getattr(address, "domain")
        if domains is not None and domain not in domains:
            print(f"mailstack: warning: {domain} is not a local domain in {args.config}",
                  file=sys.stderr)

    if args.command == "user":
        if args.action == "list":
            for address in users.users():
                print(address, file=stdout)
            return
        address = _address(args.address)
        if args.action == "add":
            if users.exists(address):
                raise CommandError(f"{address} already exists", EX_CANTCREAT)
            warn_if_not_local(address)
            users.add(address, hash_password(read_password(stdin, stdin.isatty())))
            print(f"added {address}", file=stdout)
        elif args.action == "passwd":
            if not users.exists(address):
                raise CommandError(f"no such user: {address}", EX_NOUSER)
            users.set_password(address, hash_password(read_password(stdin, stdin.isatty())))
            print(f"changed the password of {address}", file=stdout)
        elif args.action == "del":
            if not users.exists(address):
                raise CommandError(f"no such user: {address}", EX_NOUSER)
            users.delete(address)
            print(f"deleted {address}", file=stdout)
    elif args.command == "alias":
        if args.action == "list":
            for name, targets in aliases.aliases():
                print(f"{name}: {', '.join(map(str, targets))}", file=stdout)
            return
        name = _address(args.alias)
        if args.action == "add":
            try:
                targets = tuple(parse_address(t.strip()) for t in args.targets)
            except AddressError as e:
                raise CommandError(f"bad target: {e}", EX_DATAERR) from None
            warn_if_not_local(name)
            aliases.add(name, targets)
            print(f"{name}: {', '.join(map(str, targets))}", file=stdout)
        elif args.action == "del":
            if aliases.targets(name) is None:
                raise CommandError(f"no such alias: {name}", EX_NOUSER)
            aliases.delete(name)
            print(f"deleted {name}", file=stdout)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        run(sys.argv[1:] if argv is None else argv, sys.stdin, sys.stdout)
    except CommandError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        sys.exit(e.status)
    except OSError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        sys.exit(EX_CANTCREAT)
