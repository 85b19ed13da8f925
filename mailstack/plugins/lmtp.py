# -*- test-case-name: tests.test_agents -*-
"""
The built-in C{lmtp} delivery agent (C{--delivery lmtp}): hands local mail
to an LMTP server (RFC 2033) such as Dovecot's, from the outbound queue.
Each recipient's reply after DATA counts on its own (2xx delivered, 4xx
retried by the queue, 5xx bounced).

Options (C{[plugins.lmtp]}): C{server} (C{HOST:PORT} or C{unix:/path};
default C{unix:/run/dovecot/lmtp}), C{timeout} (seconds for each step;
default 300).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, UNIXClientEndpoint, connectProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.protocols.basic import LineOnlyReceiver
from zope.interface import implementer

from mailstack.config import ConfigError, parse_hostport
from mailstack.interfaces import IDeliveryAgentFactory, IQueuedDeliveryAgent
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply
from mailstack.wire import DotStuffer

log = Logger()


def _server(text: Any) -> str:
    text = str(text).strip()
    if text.startswith("unix:"):
        if len(text) <= 5:
            raise ConfigError("unix: needs a socket path")
        return text
    parse_hostport(text)
    return text


def _seconds(text: Any) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be positive: {text!r}")
    return value


class LMTPError(Exception):
    """
    The LMTP server did not follow the protocol, or refused the session.
    """

    def __init__(self, reply: Reply) -> None:
        super().__init__(str(reply))
        self.reply = reply


class LMTPClient(LineOnlyReceiver):
    """
    One LMTP session: replies are read one at a time, in order.
    """

    delimiter = b"\r\n"
    MAX_LENGTH = 4096

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._waiting: list[Deferred[Reply]] = []
        self._replies: list[Reply] = []
        self.lost = False

    def lineReceived(self, line: bytes) -> None:
        text = line.decode("utf-8", "replace")
        self._lines.append(text)
        if len(text) >= 4 and text[3] == "-":
            return
        lines, self._lines = self._lines, []
        try:
            code = int(lines[-1][:3])
        except ValueError:
            code = 451
        body = [t[4:] for t in lines]
        enhanced = ""
        match = re.match(r"([245]\.\d{1,3}\.\d{1,3}) ", body[0] + " ")
        if match:
            enhanced = match.group(1)
            body[0] = body[0][len(enhanced):].strip()
        reply = Reply(code, enhanced, "\n".join(body)[:500])
        if self._waiting:
            self._waiting.pop(0).callback(reply)
        else:
            self._replies.append(reply)

    def connectionLost(self, reason: Any = None) -> None:
        self.lost = True
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(LMTPError(Reply(451, "4.4.2", "LMTP server closed the connection")))

    def reply(self) -> Deferred[Reply]:
        if self._replies:
            d: Deferred[Reply] = Deferred()
            d.callback(self._replies.pop(0))
            return d
        if self.lost:
            d = Deferred()
            d.errback(LMTPError(Reply(451, "4.4.2", "LMTP server closed the connection")))
            return d
        d = Deferred()
        self._waiting.append(d)
        return d

    def command(self, line: str) -> Deferred[Reply]:
        self.sendLine(line.encode("utf-8"))
        return self.reply()


def dot_stuffed(content: bytes) -> bytes:
    """
    LF content as SMTP/LMTP DATA: CRLF line ends, dots doubled, ended
    (L{mailstack.wire.DotStuffer}: a bare CR ends a line too, so none goes
    out).
    """
    stuffer = DotStuffer()
    return stuffer(content) + stuffer.finish()


def _read_all(open_content: Any) -> bytes:
    with open_content() as f:
        return f.read()


@implementer(IQueuedDeliveryAgent)
class LMTPAgent:
    name = "lmtp"

    def __init__(self, reactor: IMailReactor, server: str, hostname: str, timeout: float
                 ) -> None:
        self.reactor = reactor
        self.server = server
        self.hostname = hostname
        self.timeout = timeout

    def endpoint(self) -> Any:
        if self.server.startswith("unix:"):
            return UNIXClientEndpoint(self.reactor, self.server[5:], timeout=self.timeout)
        host, port = parse_hostport(self.server)
        return TCP4ClientEndpoint(self.reactor, host, port, timeout=self.timeout)

    def deliver_queued(self, sender: str, recipients: Sequence[str], open_content: Any,
                       size: int) -> Deferred[dict[str, Reply]]:
        return Deferred.fromCoroutine(self._deliver(sender, recipients, open_content))

    async def _step(self, d: Deferred[Reply]) -> Reply:
        d.addTimeout(self.timeout, self.reactor)
        return await d

    async def _deliver(self, sender: str, recipients: Sequence[str],
                       open_content: Any) -> dict[str, Reply]:
        content = await deferToThread(_read_all, open_content)
        try:
            client = await connectProtocol(self.endpoint(), LMTPClient())
        except Exception as e:  # noqa: BLE001 - a connection failure defers all
            reply = Reply(451, "4.4.1", f"cannot connect to the LMTP server: {type(e).__name__}")
            return {r: reply for r in recipients}
        try:
            return await self._session(client, sender, recipients, content)
        except LMTPError as e:
            return {r: e.reply for r in recipients}
        except Exception:  # noqa: BLE001 - a timeout or a protocol error defers all
            log.failure("lmtp: session with {server} failed", server=self.server)
            reply = Reply(451, "4.4.2", "LMTP session failed")
            return {r: reply for r in recipients}
        finally:
            client.transport.loseConnection()

    async def _session(self, client: LMTPClient, sender: str, recipients: Sequence[str],
                       content: bytes) -> dict[str, Reply]:
        for step in (client.reply, lambda: client.command(f"LHLO {self.hostname}")):
            reply = await self._step(step())
            if reply.code >= 400:
                raise LMTPError(_remote(reply))
        reply = await self._step(client.command(f"MAIL FROM:<{sender}>"))
        if reply.code >= 400:
            raise LMTPError(_remote(reply))
        results: dict[str, Reply] = {}
        accepted = []
        for rcpt in recipients:
            reply = await self._step(client.command(f"RCPT TO:<{rcpt}>"))
            if reply.code >= 400:
                results[rcpt] = _remote(reply)
            else:
                accepted.append(rcpt)
        if not accepted:
            await self._step(client.command("QUIT"))
            return results
        reply = await self._step(client.command("DATA"))
        if reply.code != 354:
            raise LMTPError(_remote(reply))
        transport: Any = client.transport
        transport.write(dot_stuffed(content))
        for rcpt in accepted:  # RFC 2033 4.2: one reply per accepted recipient
            results[rcpt] = _remote(await self._step(client.reply()))
        await self._step(client.command("QUIT"))
        return results


def _remote(reply: Reply) -> Reply:
    """
    The LMTP server's reply as the queue records it (the log's and the
    bounce's diagnostic text).
    """
    text = re.sub(r"[^\x20-\x7e]", "?", " ".join(reply.text.split()))[:300]
    enhanced = reply.enhanced or {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(reply.code // 100,
                                                                           "4.0.0")
    return Reply(reply.code, enhanced, f"lmtp said: {reply.code} {enhanced} {text}")


@implementer(IPlugin, IDeliveryAgentFactory)
class LMTPFactory:
    name = "lmtp"
    description = "hands local mail to an LMTP server (Dovecot), per-recipient replies"
    spec = {"server": (_server, "unix:/run/dovecot/lmtp"), "timeout": (_seconds, 300.0)}

    def __init__(self) -> None:
        self.options = check_options(self.name, {}, self.spec)

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, self.spec)

    def build(self, config: Any, reactor: IMailReactor) -> LMTPAgent:
        return LMTPAgent(reactor, self.options["server"], config.hostname,
                         self.options["timeout"])


lmtp = LMTPFactory()
