# -*- test-case-name: tests.test_agents -*-
"""
The built-in C{pipe} delivery agent (C{--delivery pipe}), like Postfix's
pipe(8): runs a command once per recipient with the message on its
standard input, from the outbound queue.

Options (C{[plugins.pipe]}): C{command}, a list (the program and its
arguments; C{{sender}}, C{{recipient}}, C{{user}}, C{{domain}} and
C{{extension}} are replaced, no shell is involved) and C{timeout}
(seconds, default 300).  The environment has C{SENDER}, C{RECIPIENT},
C{USER}, C{DOMAIN}, C{EXTENSION} and C{PATH=/usr/bin:/bin}.  Exit status 0
delivers, 75 (C{EX_TEMPFAIL}), a signal or the time limit defers (the
queue retries), any other status bounces with the command's first line
of output as the reason.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.address import parse_address
from mailstack.interfaces import IDeliveryAgentFactory, IQueuedDeliveryAgent
from mailstack.plugin import check_options
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply

log = Logger()

EX_TEMPFAIL = 75
FIELDS = ("sender", "recipient", "user", "domain", "extension")


def _command(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise ValueError("must be a non-empty list of strings, e.g. [\"/usr/bin/prog\", "
                         "\"{recipient}\"]")
    for v in value:
        try:
            v.format(**{f: "" for f in FIELDS})
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"bad placeholder in {v!r}: {e}") from None
    return tuple(value)


def _seconds(text: Any) -> float:
    value = float(text)
    if value <= 0:
        raise ValueError(f"must be positive: {text!r}")
    return value


class _Run(ProcessProtocol):
    def __init__(self, content: bytes) -> None:
        self.content = content
        self.output = bytearray()
        self.done: Deferred[Any] = Deferred()

    def connectionMade(self) -> None:
        transport: Any = self.transport
        transport.write(self.content)
        transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if len(self.output) < 4096:
            self.output += data[:4096]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.done.callback(reason.value)


def _read_all(open_content: Any) -> bytes:
    with open_content() as f:
        return f.read()


@implementer(IQueuedDeliveryAgent)
class PipeAgent:
    name = "pipe"

    def __init__(self, reactor: IMailReactor, command: Sequence[str], timeout: float) -> None:
        self.reactor = reactor
        self.command = tuple(command)
        self.timeout = timeout

    def deliver_queued(self, sender: str, recipients: Sequence[str], open_content: Any,
                       size: int) -> Deferred[dict[str, Reply]]:
        return Deferred.fromCoroutine(self._deliver(sender, recipients, open_content))

    async def _deliver(self, sender: str, recipients: Sequence[str],
                       open_content: Any) -> dict[str, Reply]:
        content = await deferToThread(_read_all, open_content)
        results = await DeferredList(
            [Deferred.fromCoroutine(self._one(sender, r, content)) for r in recipients],
            consumeErrors=True)
        out = {}
        for rcpt, (ok, value) in zip(recipients, results):
            out[rcpt] = value if ok else Reply(451, "4.3.0", "pipe: the command failed to run")
        return out

    async def _one(self, sender: str, rcpt: str, content: bytes) -> Reply:
        address = parse_address(rcpt)
        user, _, extension = address.local.partition("+")
        values = {"sender": sender, "recipient": rcpt, "user": user,
                  "domain": address.domain, "extension": extension}
        argv = [part.format(**values) for part in self.command]
        env = {k.upper(): v for k, v in values.items()}
        env["PATH"] = "/usr/bin:/bin"
        run = _Run(content)
        try:
            process = self.reactor.spawnProcess(run, argv[0], argv, env=env)
        except OSError as e:
            log.error("pipe: cannot run {program}: {error}", program=argv[0], error=e)
            return Reply(451, "4.3.0", "pipe: the command cannot be started")
        timer = self.reactor.callLater(self.timeout, _kill, process)
        ended = await run.done
        timed_out = not timer.active()
        if timer.active():
            timer.cancel()
        first = bytes(run.output).decode("utf-8", "replace").strip().splitlines()
        # The command's words go into logs and bounces: printable ASCII only.
        said = re.sub(r"[^\x20-\x7e]", "?", " ".join(first[0].split()))[:200] if first else ""
        if timed_out:
            return Reply(451, "4.3.0", f"pipe: {argv[0]}: time limit exceeded")
        if isinstance(ended, ProcessDone):
            return Reply(250, "2.0.0", f"delivered via pipe ({argv[0]})")
        if isinstance(ended, ProcessTerminated) and ended.exitCode is not None:
            if ended.exitCode == EX_TEMPFAIL:
                return Reply(451, "4.3.0", f"pipe: {argv[0]} deferred: {said or 'status 75'}")
            return Reply(550, "5.3.0",
                         f"pipe: {argv[0]} failed with status {ended.exitCode}: {said}")
        return Reply(451, "4.3.0", f"pipe: {argv[0]} was killed by a signal")


def _kill(process: Any) -> None:
    try:
        process.signalProcess("KILL")
    except Exception:  # noqa: BLE001 - it ended meanwhile
        pass


@implementer(IPlugin, IDeliveryAgentFactory)
class PipeFactory:
    name = "pipe"
    description = "runs a command per recipient with the message on stdin (like pipe(8))"
    spec = {"command": (_command, None), "timeout": (_seconds, 300.0)}

    def __init__(self) -> None:
        self.options: dict[str, Any] = {"command": None, "timeout": 300.0}

    def configure(self, options: dict[str, Any]) -> None:
        from mailstack.config import ConfigError
        self.options = check_options(self.name, options, self.spec)
        if self.options["command"] is None:
            raise ConfigError("[plugins.pipe]: command is required")

    def build(self, config: Any, reactor: IMailReactor) -> PipeAgent:
        return PipeAgent(reactor, self.options["command"], self.options["timeout"])


pipe = PipeFactory()
