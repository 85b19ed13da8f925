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
import re
import sys
import time
from typing import IO, Any, BinaryIO, Sequence, TextIO, TypeVar, cast

from mailstack.address import Address, AddressError, local_address, parse_address
from mailstack.auth import hash_password
from mailstack.config import ConfigError, build_config
from mailstack.errors import CommandError
from mailstack.privileges import become_owner
from mailstack.queue.control import send_command as control_command
from mailstack.queue.store import QueueStore, valid_id
from mailstack.users import AliasMap, UserDatabase, alias_key


EX_USAGE, EX_DATAERR, EX_NOUSER, EX_UNAVAILABLE, EX_CANTCREAT, EX_TEMPFAIL = (
    64, 65, 67, 69, 73, 75)
EX_NOPERM = 77
_T = TypeVar("_T")
# Where contrib/systemd's unit reads its configuration; sendmail and mailq
# use it when the environment names no other.
SYSTEM_CONFIG = "/etc/mailstack/mailstack.toml"


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


def _address(text: str) -> Address:
    try:
        return local_address(text)
    except AddressError as e:
        raise CommandError(f"{text}: {e}", EX_DATAERR) from None


def parser() -> argparse.ArgumentParser:
    # The docstring's first paragraph without its epytext markup (C{...}).
    description = re.sub(r"[A-Z]\{([^}]*)\}", r"\1", __doc__.split("\n\n")[0].strip())
    p = argparse.ArgumentParser(prog="mailstack", description=description)
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

    send = commands.add_parser("send", help="compose a message and submit it over TLS")
    send.add_argument("--profile", help="a table of ~/.config/mailstack/client.toml")
    send.add_argument("--server", help="HOST[:PORT] (port 587 by default)")
    mode = send.add_mutually_exclusive_group()
    mode.add_argument("--starttls", action="store_const", const=False, dest="tls",
                      help="STARTTLS (the default, except on ports 465 and 2465)")
    mode.add_argument("--tls", action="store_const", const=True, dest="tls",
                      help="implicit TLS (the default on ports 465 and 2465)")
    send.set_defaults(tls=None)  # neither given: implicit TLS on port 465 only
    send.add_argument("--user", help="login name [default: the --from address]")
    send.add_argument("--password-file", help="file whose first line is the password")
    send.add_argument("--cafile", help="trust this CA (or self-signed certificate)")
    send.add_argument("--insecure", action="store_true", default=None,
                      help="do not verify the server's certificate (never the default)")
    send.add_argument("--from", dest="sender")
    send.add_argument("--to", action="append", default=[])
    send.add_argument("--cc", action="append", default=[])
    send.add_argument("--bcc", action="append", default=[])
    send.add_argument("--subject", default="")
    send.add_argument("--attach", action="append", default=[], metavar="FILE")
    send.add_argument("--header", action="append", default=[], metavar="'NAME: VALUE'")
    send.add_argument("--body", help="the body [default: read from standard input]")
    send.add_argument("--dry-run", action="store_true", help="print the message, send nothing")
    report = commands.add_parser("report", help="summarise a log: received, delivered, "
                                 "deferred, bounced, rejected, top senders and recipients")
    report.add_argument("logfiles", nargs="*", metavar="LOGFILE",
                        help="log files (.gz too) [default: standard input]")
    report.add_argument("--top", type=int, default=10, help="lines per table [default: 10]")
    commands.add_parser("plugins", help="list the installed plugins and which are enabled")
    commands.add_parser("sendmail", help="sendmail-compatible local injection "
                        "([-t] [-i] [-f SENDER] [-F NAME] [RCPT...])", add_help=False)
    from mailstack.mailauth.commands import add_parsers as add_mailauth_parsers
    add_mailauth_parsers(commands)  # dkim, dns
    from mailstack.mailauth.tlsrpt_cli import add_parser as add_tlsrpt_parser
    add_tlsrpt_parser(commands)
    return p


def _where(args: argparse.Namespace, environment: bool = False
           ) -> tuple[str, tuple[str, ...] | None]:
    """
    The data directory and, when a configuration file says, the local
    domains: from --config or --data-dir, and with C{environment} (when this
    runs as C{sendmail}) from MAILSTACK_CONFIG / MAILSTACK_DATA_DIR.
    """
    config_file = args.config
    if environment and not (config_file or args.data_dir):
        config_file = os.environ.get("MAILSTACK_CONFIG")
        if (not config_file and not os.environ.get("MAILSTACK_DATA_DIR")
                and os.path.exists(SYSTEM_CONFIG)):
            config_file = SYSTEM_CONFIG  # the packaged service's file (contrib/systemd)
    if config_file:
        if environment:
            # sendmail and mailq need only these two, and must not fail for
            # a local user on what only the server may read (relay-auth
            # password files).
            return _where_only(config_file)
        try:
            config = build_config({}, config_file)
        except ConfigError as e:
            raise CommandError(str(e), EX_USAGE) from None
        return config.data_dir, config.domain
    default = os.environ.get("MAILSTACK_DATA_DIR") if environment else None
    return args.data_dir or default or "./mailstack-data", None


def _where_only(config_file: str) -> tuple[str, tuple[str, ...] | None]:
    """
    C{data-dir} and C{domain} of a configuration file, the rest unread.
    """
    from mailstack.config import OPTIONS_BY_NAME, read_toml

    try:
        values = read_toml(config_file)
        data_dir = OPTIONS_BY_NAME["data-dir"].parse(
            values.get("data-dir", OPTIONS_BY_NAME["data-dir"].default))
        domains = values.get("domain", OPTIONS_BY_NAME["domain"].default)
        domains = [domains] if isinstance(domains, str) else list(domains)
        parsed = tuple(OPTIONS_BY_NAME["domain"].parse(d) for d in domains)
    except ConfigError as e:
        raise CommandError(str(e), EX_USAGE) from None
    return data_dir, parsed or None


def _bytes_of(stream: IO[Any]) -> BinaryIO:
    # A text stream's bytes are its .buffer (sys.stdin); a byte stream
    # (a test's BytesIO) is used as it is.
    return cast(BinaryIO, getattr(stream, "buffer", stream))


def sendmail_command(argv: Sequence[str], data_dir: str, domain: str,
                     stdin: TextIO | BinaryIO, stdout: TextIO | None = None) -> None:
    from mailstack.mua.sendmail import (
        SendmailError,
        drop,
        parse_args,
        poke,
        prepare,
        read_message,
    )

    try:
        options = parse_args(argv)
        if options.mode == "i":
            return  # newaliases: the server reads DATA/aliases when it changes
        if options.mode == "p":
            list_queue(data_dir, stdout or sys.stdout)
            return
        if options.mode == "s":
            import socket

            from mailstack.mua.stdin_smtp import serve

            out = _bytes_of(stdout or sys.stdout)
            serve(_bytes_of(stdin), out, data_dir, domain, socket.getfqdn(),
                  poke=lambda: poke(data_dir))
            return
        raw = read_message(_bytes_of(stdin), options.ignore_dots)
        sender, recipients, content = prepare(options, raw, domain)
        drop(data_dir, sender, recipients, content)
    except SendmailError as e:
        raise CommandError(str(e), e.status) from None
    poke(data_dir)  # not running or busy: it picks up at start and every minute


def load_profile(name: str | None) -> dict[str, object]:
    import tomllib

    path = os.path.join(os.environ.get("XDG_CONFIG_HOME") or
                        os.path.expanduser("~/.config"), "mailstack", "client.toml")
    if not os.path.exists(path):
        if name:
            raise CommandError(f"no profile file {path}", EX_USAGE)
        return {}
    try:
        with open(path, "rb") as f:
            profiles = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise CommandError(f"{path}: {e}", EX_USAGE) from None
    table = profiles.get(name or "default")
    if table is None:
        if name:
            raise CommandError(f"no profile [{name}] in {path}", EX_USAGE)
        return {}
    known = {"server", "user", "password-file", "cafile", "insecure", "tls", "from"}
    values = {k.replace("_", "-"): v for k, v in table.items()}
    unknown = set(values) - known
    if unknown:
        raise CommandError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(known: {', '.join(sorted(known))})", EX_USAGE)
    return values


def send_command(args: argparse.Namespace, stdin: TextIO, stdout: TextIO) -> None:
    from twisted.internet.defer import ensureDeferred
    from twisted.internet.task import react

    from mailstack.config import parse_hostport
    from mailstack.mua.compose import ComposeError, compose, to_bytes
    from mailstack.mua.submit import Server, SubmitError, submit
    from mailstack.reactors import IMailReactor

    profile = load_profile(args.profile)

    def pick(value: _T | None, key: str, kind: type[_T]) -> _T | None:
        if value is not None:
            return value
        found = profile.get(key)
        if found is None or isinstance(found, kind):
            return found
        raise CommandError(f"profile key {key}: a {'boolean' if kind is bool else 'string'} "
                           f"is needed, not {found!r}", EX_USAGE)

    sender = pick(args.sender, "from", str)
    if not sender:
        raise CommandError("--from is needed", EX_USAGE)
    recipients = args.to + args.cc + args.bcc
    if not recipients:
        raise CommandError("at least one --to, --cc or --bcc is needed", EX_USAGE)
    body = args.body if args.body is not None else stdin.read()
    try:
        message = compose(str(sender), args.to, args.cc, args.subject, body, args.attach,
                          args.header)
    except ComposeError as e:
        raise CommandError(str(e), EX_DATAERR) from None
    content = to_bytes(message)
    if args.dry_run:
        stdout.write(content.decode("utf-8", "replace"))
        return
    server_text = pick(args.server, "server", str)
    if not server_text:
        raise CommandError("--server is needed", EX_USAGE)
    try:
        host, port = parse_hostport(str(server_text), 587)
    except ConfigError as e:
        raise CommandError(str(e), EX_USAGE) from None
    implicit = pick(args.tls, "tls", bool)
    # 465 is submissions (RFC 8314); 2465 is mailstack's unprivileged default for it.
    implicit = (port in (465, 2465)) if implicit is None else bool(implicit)
    server = Server(host, port, implicit, cafile=pick(args.cafile, "cafile", str),
                    insecure=bool(pick(args.insecure, "insecure", bool)))
    user = str(pick(args.user, "user", str) or sender)
    password_file = pick(args.password_file, "password-file", str)
    if password_file:
        try:
            with open(os.path.expanduser(str(password_file))) as f:
                password = f.readline().rstrip("\r\n")
        except OSError as e:
            raise CommandError(f"cannot read {password_file}: {e.strerror}", 66) from None
    elif os.environ.get("MAILSTACK_PASSWORD"):
        password = os.environ["MAILSTACK_PASSWORD"]
    else:
        password = getpass.getpass(f"Password for {user}: ")
    try:
        envelope_from = str(parse_address(str(sender).split("<")[-1].strip(" >")))
    except AddressError as e:
        raise CommandError(f"bad --from: {e}", EX_DATAERR) from None
    async def main(reactor: IMailReactor) -> None:
        try:
            replies = await submit(reactor, server, (user, password), envelope_from,
                                   recipients, content)
        except SubmitError as e:
            print(f"mailstack: {e}", file=sys.stderr)
            raise SystemExit(e.status) from None
        failed = {rcpt: reply for rcpt, reply in replies.items() if reply.code >= 300}
        for rcpt, reply in failed.items():
            print(f"mailstack: <{rcpt}>: {reply}", file=sys.stderr)
        if failed:
            permanent = any(reply.code >= 500 for reply in failed.values())
            raise SystemExit(EX_UNAVAILABLE if permanent else EX_TEMPFAIL)
        last = next(iter(replies.values()))
        print(f"sent to {len(replies)} recipient(s): {last}", file=stdout)

    react(lambda reactor: ensureDeferred(main(reactor)), [])


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def list_queue(data_dir: str, stdout: TextIO) -> None:
    """
    C{mailq}, C{sendmail -bp}: C{mailstack queue list}, for whoever may read
    the queue (root and the data directory's owner).
    """
    try:
        queue_command(argparse.Namespace(action="list"), data_dir, stdout)
        maildrop = os.path.join(data_dir, "maildrop")
        waiting = [n for n in os.listdir(maildrop) if not n.startswith(".")] if os.path.isdir(
            maildrop) else []
        if waiting:
            print(f"-- {len(waiting)} messages in the maildrop, waiting for pickup", file=stdout)
    except PermissionError:
        raise CommandError(f"the queue in {os.path.abspath(data_dir)} is readable only by "
                           "root and the mail system's user", EX_NOPERM) from None


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
        unreadable: list[tuple[str, str]] = []
        for queue_id in store.committed_ids():
            try:
                records.append(store.load(queue_id))
            except FileNotFoundError:
                continue  # delivered since it was listed
            except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
                unreadable.append((queue_id, f"unreadable queue file: {e}"))
        unreadable += store.corrupt()
        for queue_id, reason in unreadable:
            print(f"{queue_id}  CORRUPT  ({reason}; see queue/corrupt/)", file=stdout)
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
    answer = control_command(data_dir, command)
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


def plugins_command(args: argparse.Namespace, stdout: TextIO) -> None:
    """
    One line per installed plugin: kind, name, enabled or disabled, what it does.
    """
    from mailstack.plugin import listing
    try:
        config = build_config({}, args.config) if args.config else build_config({})
    except ConfigError as e:
        raise CommandError(str(e), EX_USAGE) from None
    for line in listing(config):
        print(line, file=stdout)


def run(argv: Sequence[str], stdin: TextIO, stdout: TextIO) -> None:
    argv = list(argv)
    # sendmail's options are not argparse's: hand it everything after the word.
    position = next((i for i, a in enumerate(argv) if not a.startswith("-") and
                     (i == 0 or argv[i - 1] not in ("--data-dir", "--config"))), None)
    if position is not None and argv[position] == "sendmail":
        args = parser().parse_args(argv[:position] + ["user", "list"])
        data_dir, domains = _where(args, environment=True)
        sendmail_command(argv[position + 1:], data_dir, domains[0] if domains else "localhost",
                         stdin, stdout)
        return
    args = parser().parse_args(argv)
    if args.command == "send":
        send_command(args, stdin, stdout)
        return
    if args.command == "report":
        from mailstack.report import format_report, read_lines, summarise

        try:
            stdout.write(format_report(summarise(read_lines(args.logfiles, stdin)), args.top))
        except FileNotFoundError as e:
            raise CommandError(f"{e.filename}: no such file", 66) from None
        return
    if args.command == "plugins":
        plugins_command(args, stdout)
        return
    data_dir, domains = _where(args)
    # root on a data directory that belongs to the server's user works as
    # that user, so the files it writes stay the server's.
    become_owner(data_dir)
    if args.command == "queue":
        queue_command(args, data_dir, stdout)
        return
    if args.command == "tlsrpt":
        from mailstack.mailauth.tlsrpt_cli import tlsrpt_command
        tlsrpt_command(args, data_dir, domains, args.config, stdout)
        return
    if args.command in ("dkim", "dns"):
        from mailstack.mailauth.commands import dkim_command, dns_command
        if args.command == "dkim":
            dkim_command(args, data_dir, stdout)
        else:
            dns_command(args, data_dir, args.config, stdout)
        return
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    users, aliases = UserDatabase(data_dir), AliasMap(data_dir)

    def warn_if_not_local(address: Any) -> None:  # an Address or a Namespace(domain=)
        domain = address.domain
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
        try:
            name = alias_key(args.alias)  # an address, or @domain: a catch-all
        except AddressError as e:
            raise CommandError(f"{args.alias}: {e}", EX_DATAERR) from None
        if args.action == "add":
            try:
                targets = tuple(parse_address(t.strip()) for t in args.targets)
            except AddressError as e:
                raise CommandError(f"bad target: {e}", EX_DATAERR) from None
            domain = name[1:] if name.startswith("@") else parse_address(name).domain
            warn_if_not_local(argparse.Namespace(domain=domain))
            aliases.add(name, targets)
            print(f"{name}: {', '.join(map(str, targets))}", file=stdout)
        elif args.action == "del":
            if name not in aliases.entries():
                raise CommandError(f"no such alias: {name}", EX_NOUSER)
            aliases.delete(name)
            print(f"deleted {name}", file=stdout)


def main(argv: Sequence[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
        if os.path.basename(sys.argv[0]) == "sendmail":
            argv = ["sendmail", *argv]  # installed as /usr/sbin/sendmail
        elif os.path.basename(sys.argv[0]) == "mailq":
            argv = ["sendmail", "-bp", *argv]  # installed as /usr/bin/mailq
    try:
        run(argv, sys.stdin, sys.stdout)
    except CommandError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        sys.exit(e.status)
    except OSError as e:
        print(f"mailstack: {e}", file=sys.stderr)
        sys.exit(EX_CANTCREAT)
