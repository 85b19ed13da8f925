# -*- test-case-name: tests.test_sendmail -*-
"""
C{sendmail -bs}: an SMTP dialogue on standard input and output, as
sendmail and Postfix offer it for tools that speak SMTP to a local
program.  Each accepted message goes into the maildrop like any other
C{sendmail} submission (the submitter is still the file's owner); the
reply to the final dot says where.  No network, no AUTH, no TLS: the
client is the local user who ran the command.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import BinaryIO

from mailstack.address import AddressError, parse_address
from mailstack.mua.sendmail import SendmailArgs, SendmailError, drop, prepare, qualify

MAX_LINE = 1000


def _path(arg: str, keyword: str) -> str | None:
    """
    The address in C{FROM:<a@b> PARAMS} / C{TO:<a@b>}, or C{None} if malformed.
    """
    head, sep, rest = arg.partition(":")
    if not sep or head.strip().upper() != keyword:
        return None
    rest = rest.strip()
    if rest.startswith("<"):
        end = rest.find(">")
        return None if end < 0 else rest[1:end]
    return rest.split(" ", 1)[0] if rest else None


def serve(stdin: BinaryIO, stdout: BinaryIO, data_dir: str, domain: str, hostname: str,
          login: str | None = None, poke: Callable[[], object] = lambda: None) -> int:
    """
    Run the dialogue until QUIT or end of input; returns how many messages
    were accepted.
    """
    def reply(code: int, text: str, *more: str) -> None:
        lines = [text, *more]
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            stdout.write(f"{code}{sep}{line}\r\n".encode())
        stdout.flush()

    def readline() -> bytes | None:
        line = stdin.readline(MAX_LINE + 2)
        return line if line else None

    accepted = 0
    helo = False
    sender: str | None = None
    recipients: list[str] = []
    reply(220, f"{hostname} ESMTP mailstack (sendmail -bs)")
    while True:
        raw = readline()
        if raw is None:
            return accepted
        if not raw.endswith(b"\n"):
            reply(500, "5.5.2 Error: line too long")
            while raw is not None and not raw.endswith(b"\n"):
                raw = readline()
            continue
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        verb, _, arg = line.partition(" ")
        verb = verb.upper()
        if verb in ("HELO", "EHLO"):
            helo = True
            sender, recipients = None, []
            if verb == "EHLO":
                reply(250, hostname, "8BITMIME", "ENHANCEDSTATUSCODES", "PIPELINING")
            else:
                reply(250, hostname)
        elif verb == "MAIL":
            address = _path(arg, "FROM")
            if not helo:
                reply(503, "5.5.1 Error: send HELO/EHLO first")
            elif sender is not None:
                reply(503, "5.5.1 Error: nested MAIL command")
            elif address is None:
                reply(501, "5.5.4 Syntax: MAIL FROM:<address>")
            else:
                try:
                    sender = str(parse_address(qualify(address, domain))) if address else ""
                    reply(250, "2.1.0 Ok")
                except AddressError as e:
                    reply(501, f"5.1.7 Bad sender address syntax: {e}")
        elif verb == "RCPT":
            address = _path(arg, "TO")
            if sender is None:
                reply(503, "5.5.1 Error: need MAIL command")
            elif not address:
                reply(501, "5.5.4 Syntax: RCPT TO:<address>")
            else:
                try:
                    recipients.append(str(parse_address(qualify(address, domain))))
                    reply(250, "2.1.5 Ok")
                except AddressError as e:
                    reply(501, f"5.1.3 Bad recipient address syntax: {e}")
        elif verb == "DATA":
            if not recipients:
                reply(503, "5.5.1 Error: need RCPT command")
                continue
            reply(354, "End data with <CR><LF>.<CR><LF>")
            lines = []
            too_long = False
            while True:
                raw = readline()
                if raw is None:
                    return accepted  # the client went away mid-message: nothing kept
                if not raw.endswith(b"\n"):
                    too_long = True
                    continue
                body_line = raw.rstrip(b"\r\n")
                if body_line == b".":
                    break
                if body_line.startswith(b"."):
                    body_line = body_line[1:]
                lines.append(body_line + b"\n")
            if too_long:
                reply(500, "5.5.2 Error: line too long in DATA")
            else:
                args = SendmailArgs(sender=sender if sender else "<>", recipients=recipients)
                try:
                    envelope_from, rcpts, content = prepare(args, b"".join(lines), domain,
                                                            login)
                    name = drop(data_dir, envelope_from, rcpts, content)
                except SendmailError as e:
                    reply(451 if e.status in (73, 75) else 554, f"4.3.0 Error: {e}"
                          if e.status in (73, 75) else f"5.6.0 Error: {e}")
                else:
                    accepted += 1
                    poke()
                    reply(250, f"2.0.0 Ok: queued as {name}")
            sender, recipients = None, []
        elif verb == "RSET":
            sender, recipients = None, []
            reply(250, "2.0.0 Ok")
        elif verb == "NOOP":
            reply(250, "2.0.0 Ok")
        elif verb == "VRFY":
            reply(252, "2.0.0 Cannot VRFY user; try RCPT to attempt delivery")
        elif verb == "QUIT":
            reply(221, "2.0.0 Bye")
            return accepted
        else:
            reply(502, "5.5.2 Error: command not recognized")
