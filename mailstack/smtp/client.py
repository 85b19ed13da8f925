# -*- test-case-name: tests.test_smtp_client -*-
"""
mailstack's SMTP client: the outbound queue and C{mailstack send} use it.

Not Twisted's C{ESMTPSender}: the audit shows it dot-stuffs each 16 KiB
chunk on its own (a C{.} line on a chunk boundary goes out unstuffed and
ends DATA early: smuggling), aborts when opportunistic STARTTLS fails, has
no timeouts and sends AUTH in clear text.  Here:

  - L{DotStuffer} keeps its line-start state across chunks;
  - every reply is awaited with a timeout (RFC 5321 4.5.3.2);
  - AUTH is only ever sent over TLS;
  - results are per recipient, so the queue can defer or bounce each.

The dialog is a coroutine (L{send_transaction}) over a small protocol that
turns bytes into replies (L{SMTPClientProtocol}).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from mailstack.smtp.reply import Reply
from mailstack.transport import IConnection
from mailstack.wire import DotStuffer

MAX_REPLY_LINE = 4096
MAX_REPLY_LINES = 100


@dataclass(frozen=True)
class Timeouts:
    """
    How long to wait for each reply (RFC 5321 4.5.3.2), in seconds.
    """

    greeting: float = 300
    command: float = 300
    data_start: float = 120
    data_block: float = 180
    data_end: float = 600


class SMTPClientError(Exception):
    """
    The session failed as a whole; C{reply} is the server's answer, or a
    made-up 4xx for a network failure.
    """

    def __init__(self, reply: Reply, stage: str) -> None:
        super().__init__(f"{stage}: {reply.code} {reply.text}")
        self.reply = reply
        self.stage = stage

    @property
    def permanent(self) -> bool:
        return self.reply.code >= 500


class TLSRequired(SMTPClientError):
    """
    TLS was required but the server does not offer it.
    """


class STARTTLSInjection(SMTPClientError):
    """
    Data followed the server's C{220} to STARTTLS in clear text: injected
    answers, or a server whose TLS layer failed at once (a TLS alert).
    Either way no TLS session exists; an opportunistic sender may treat it
    as a failed handshake.
    """


def parse_reply_lines(lines: list[bytes]) -> Reply:
    """
    Join the lines of one reply; split off an enhanced status code if any.
    """
    code = int(lines[0][:3])
    texts = [line[4:].decode("utf-8", "replace") for line in lines]
    enhanced = ""
    first = texts[0].split(" ", 1)
    if len(first) == 2 and first[0].count(".") == 2 and first[0][0] in "245":
        enhanced = first[0]
        texts[0] = first[1]
    return Reply(code, enhanced, "\n".join(texts))


class SMTPClientProtocol(Protocol):
    """
    Reads replies; a coroutine asks for them one at a time.
    """

    transport: IConnection  # once connected: see mailstack.transport
    ehlo_name = ""  # the name the server gave in its EHLO reply

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._buffer = b""
        self._lines: list[bytes] = []
        self._replies: list[Reply] = []
        self._waiting: Deferred[Reply] | None = None
        self._timer: Any = None
        self._lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_REPLY_LINE:
                    self._abort("reply line too long")
                return
            line, self._buffer = self._buffer[:end].rstrip(b"\r"), self._buffer[end + 1 :]
            if len(line) < 3 or not line[:3].isdigit() or line[3:4] not in (b"", b" ", b"-"):
                self._abort(f"malformed reply {line[:60]!r}")
                return
            self._lines.append(line)
            if len(self._lines) > MAX_REPLY_LINES:
                self._abort("reply too long")
                return
            if line[3:4] != b"-":
                lines, self._lines = self._lines, []
                self._deliver(parse_reply_lines(lines))

    def _deliver(self, reply: Reply) -> None:
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            self._cancel_timer()
            d.callback(reply)
        else:
            self._replies.append(reply)

    def _abort(self, why: str) -> None:
        self._fail(Failure(SMTPClientError(Reply(451, "4.4.0", why), "protocol")))
        self.transport.abortConnection()

    def _fail(self, failure: Failure) -> None:
        self._lost = self._lost or failure
        if self._waiting is not None:
            d, self._waiting = self._waiting, None
            self._cancel_timer()
            d.errback(failure)

    def connectionLost(self, reason: Failure | None = None) -> None:
        # (built here, not once at import time as a default argument)
        self._fail(reason if reason is not None else Failure(ConnectionDone()))

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def read_reply(self, timeout: float) -> "Deferred[Reply]":
        if self._replies:
            d: Deferred[Reply] = Deferred()
            d.callback(self._replies.pop(0))
            return d
        if self._lost is not None:
            d = Deferred()
            d.errback(self._lost)
            return d
        self._waiting = Deferred()

        def timed_out() -> None:
            self._timer = None
            self._fail(Failure(TimeoutError(f"no reply in {timeout:g}s")))
            self.transport.abortConnection()

        self._timer = self.clock.callLater(timeout, timed_out)
        return self._waiting

    def discard_pending(self) -> int:
        """
        Forget whatever arrived but was not asked for yet (replies, partial
        lines); return how many bytes and replies that was.
        """
        pending = len(self._buffer) + len(self._replies) + len(self._lines)
        self._buffer = b""
        self._replies = []
        self._lines = []
        return pending

    def send_line(self, line: str | bytes) -> None:
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.transport.write(line + b"\r\n")

    async def command(self, line: str | bytes, timeout: float) -> Reply:
        self.send_line(line)
        return await self.read_reply(timeout)


@dataclass
class Transaction:
    """
    One message to send: envelope, size, and its LF-terminated content.
    """

    sender: str  # "" for the null sender
    recipients: Sequence[str]
    content: BinaryIO
    size: int
    eightbit: bool = True


@dataclass
class TransactionResult:
    """
    The reply to each RCPT, and to the end of DATA if it was sent.
    """

    recipients: dict[str, Reply] = field(default_factory=dict)
    data: Reply | None = None
    tls: bool = False
    reused: bool = False  # on a session kept from an earlier transaction

    def reply_for(self, recipient: str) -> Reply:
        """
        What happened to one recipient: its RCPT refusal, or DATA's answer.
        """
        reply = self.recipients[recipient]
        if reply.code >= 300 or self.data is None:
            return reply
        return self.data


@dataclass
class Session:
    """
    An open SMTP session, greeted (and upgraded, and logged in): ready for
    transactions, one after another.
    """

    proto: SMTPClientProtocol
    extensions: dict[str, str]
    tls: bool
    transactions: int = 0
    clean: bool = True  # the last transaction ended in a state to start another
    stage: str = "MAIL"  # where the current transaction is
    peer_names: tuple[str, ...] = ()  # the names in its greeting and EHLO reply, lowercased

    @property
    def alive(self) -> bool:
        return self.proto._lost is None and self.proto.transport is not None and \
            not self.proto.transport.disconnecting


async def open_session(
    proto: SMTPClientProtocol,
    helo: str,
    tls_context: Any = None,
    require_tls: bool = False,
    credentials: tuple[str, str] | None = None,
    timeouts: Timeouts = Timeouts(),
    implicit_tls: bool = False,
) -> Session:
    """
    Greeting, EHLO, STARTTLS when offered (required with C{require_tls}),
    AUTH inside TLS with C{credentials}; raise L{SMTPClientError} if any
    of them fails.

    @param implicit_tls: the connection is TLS from its first byte (port 465).
    """
    tls = implicit_tls
    greeting = await proto.read_reply(timeouts.greeting)
    if greeting.code != 220:
        raise SMTPClientError(greeting, "greeting")
    extensions = await _hello(proto, helo, timeouts)
    upgrade = not tls and "STARTTLS" in extensions and tls_context is not None
    if upgrade:
        reply = await proto.command("STARTTLS", timeouts.command)
        if reply.code != 220:
            if require_tls:
                raise TLSRequired(reply, "STARTTLS")
        else:
            # Anything the server sent after its 220 came in clear text and
            # would be read as answers inside TLS (STARTTLS response
            # injection, CVE-2011-1575 class): a real server sends nothing
            # there, so the session fails.
            if proto.discard_pending():
                proto.transport.abortConnection()
                raise STARTTLSInjection(
                    Reply(451, "4.7.0", "data after the STARTTLS reply (injection?)"), "STARTTLS")
            proto.transport.startTLS(tls_context)
            tls = True
            extensions = await _hello(proto, helo, timeouts)
    elif require_tls and not tls:
        raise TLSRequired(Reply(530, "5.7.10", "the server does not offer STARTTLS"), "EHLO")
    if credentials is not None:
        if not tls:
            raise TLSRequired(Reply(530, "5.7.0", "refusing to send a password without TLS"),
                              "AUTH")
        await _authenticate(proto, extensions, credentials, timeouts)
    names = (greeting.text.split() or [""])[0], getattr(proto, "ehlo_name", "")
    return Session(proto, extensions, tls, peer_names=tuple(n.lower() for n in names if n))


async def run_transaction(session: Session, transaction: Transaction,
                          timeouts: Timeouts = Timeouts()) -> TransactionResult:
    """
    MAIL, RCPT, DATA and the content on an open session; raise
    L{SMTPClientError} if MAIL or DATA is refused.  The session stays open.
    """
    proto, extensions = session.proto, session.extensions
    session.transactions += 1
    session.clean = False
    session.stage = "MAIL"
    result = TransactionResult(tls=session.tls)
    limit = extensions.get("SIZE", "")
    if limit.isdigit() and 0 < int(limit) < transaction.size:
        raise SMTPClientError(Reply(552, "5.3.4", f"message too big for the server (SIZE {limit})"),
                              "SIZE")
    mail = f"MAIL FROM:<{transaction.sender}>"
    if "SIZE" in extensions:
        mail += f" SIZE={transaction.size}"
    if transaction.eightbit and "8BITMIME" in extensions:
        mail += " BODY=8BITMIME"
    if "PIPELINING" in extensions:
        # RFC 2920: MAIL, every RCPT and DATA in one write, replies in order.
        lines = [mail] + [f"RCPT TO:<{rcpt}>" for rcpt in transaction.recipients] + ["DATA"]
        proto.transport.write("".join(line + "\r\n" for line in lines).encode("utf-8"))
        reply = await proto.read_reply(timeouts.command)
        rcpt_replies: list[Reply] = []
        try:
            for _ in transaction.recipients:
                rcpt_replies.append(await proto.read_reply(timeouts.command))
            data_reply = await proto.read_reply(timeouts.data_start)
        except Exception as e:  # noqa: BLE001 - whatever ended the connection (any reason, TLS, timeout)
            # Closed after a reply (a 421 to a RCPT, say): what was answered
            # stands, the rest is deferred.
            lost = next((r for r in reversed(rcpt_replies) if r.code == 421), None) or Reply(
                451, "4.4.2", f"connection lost: {str(e).strip() or e.__class__.__name__}")
            rcpt_replies += [lost] * (len(transaction.recipients) - len(rcpt_replies))
            data_reply = lost
        if data_reply.code == 354 and (reply.code != 250 or not any(
                r.code in (250, 251) for r in rcpt_replies)):
            # A server that should have refused DATA: end an empty message.
            proto.transport.write(b".\r\n")
            await proto.read_reply(timeouts.data_end)
        if reply.code != 250:
            raise SMTPClientError(reply, "MAIL")
        session.stage = "RCPT"
        result.recipients = dict(zip(transaction.recipients, rcpt_replies))
    else:
        reply = await proto.command(mail, timeouts.command)
        if reply.code != 250:
            raise SMTPClientError(reply, "MAIL")
        session.stage = "RCPT"
        for rcpt in transaction.recipients:
            result.recipients[rcpt] = await proto.command(f"RCPT TO:<{rcpt}>",
                                                          timeouts.command)
        data_reply = None
    if not any(r.code in (250, 251) for r in result.recipients.values()):
        try:
            session.clean = (await proto.command("RSET", timeouts.command)).code == 250
        except Exception:  # noqa: BLE001 - any failure of RSET only makes the session not reusable
            session.clean = False  # the outcome is known; the session is just not reusable
        return result
    session.stage = "DATA"
    if data_reply is None:
        data_reply = await proto.command("DATA", timeouts.data_start)
    if data_reply.code != 354:
        raise SMTPClientError(data_reply, "DATA")
    stuffer = DotStuffer()
    if isinstance(transaction.content, io.BytesIO):
        # Content already in memory (the queue reads small messages ahead):
        # the whole of it and the final dot in one write, not a producer's
        # chunk per reactor turn and a write of its own for the dot.
        body = stuffer(transaction.content.read())
        proto.transport.write(body + stuffer.finish())
    else:
        await FileSender().beginFileTransfer(transaction.content, proto.transport, stuffer)
        proto.transport.write(stuffer.finish())
    result.data = await proto.read_reply(timeouts.data_end)
    session.clean = True
    return result


async def close_session(session: Session) -> None:
    await _quit(session.proto)


async def send_transaction(
    proto: SMTPClientProtocol,
    helo: str,
    transaction: Transaction,
    tls_context: Any = None,
    require_tls: bool = False,
    credentials: tuple[str, str] | None = None,
    timeouts: Timeouts = Timeouts(),
    implicit_tls: bool = False,
) -> TransactionResult:
    """
    One session with one transaction, then QUIT; raise L{SMTPClientError}
    if the session fails as a whole (greeting, EHLO, TLS, AUTH, MAIL or
    DATA refused).
    """
    session = await open_session(proto, helo, tls_context, require_tls, credentials,
                                 timeouts, implicit_tls)
    result = await run_transaction(session, transaction, timeouts)
    await close_session(session)
    return result


async def _hello(proto: SMTPClientProtocol, helo: str, timeouts: Timeouts) -> dict[str, str]:
    reply = await proto.command(f"EHLO {helo}", timeouts.command)
    if reply.code != 250:
        reply = await proto.command(f"HELO {helo}", timeouts.command)
        if reply.code != 250:
            raise SMTPClientError(reply, "HELO")
        return {}
    proto.ehlo_name = (reply.text.split() or [""])[0]
    extensions = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        extensions[keyword.upper()] = params
    return extensions


async def _authenticate(proto: SMTPClientProtocol, extensions: dict[str, str],
                        credentials: tuple[str, str], timeouts: Timeouts) -> None:
    mechanisms = extensions.get("AUTH", "").upper().split()
    user, password = credentials
    if "PLAIN" in mechanisms:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        reply = await proto.command(f"AUTH PLAIN {token}", timeouts.command)
    elif "LOGIN" in mechanisms:
        reply = await proto.command("AUTH LOGIN", timeouts.command)
        if reply.code == 334:
            reply = await proto.command(base64.b64encode(user.encode()), timeouts.command)
        if reply.code == 334:
            reply = await proto.command(base64.b64encode(password.encode()), timeouts.command)
    else:
        raise SMTPClientError(Reply(504, "5.7.4", "the server offers no PLAIN or LOGIN AUTH"),
                              "AUTH")
    if reply.code != 235:
        raise SMTPClientError(reply, "AUTH")


async def _quit(proto: SMTPClientProtocol) -> None:
    try:
        proto.send_line("QUIT")
        await proto.read_reply(10)
    except Exception:  # noqa: BLE001 - QUIT is a courtesy: any failure is ignored
        pass  # QUIT is a courtesy: the transaction's result is already known
    proto.transport.loseConnection()
