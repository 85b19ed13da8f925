# -*- test-case-name: tests.test_receivers -*-
"""
More than one process accepting on the receiving MTA's socket
(C{--receivers N}), so inbound mail can use more than one core.

The main process listens as usual, and once its queue is loaded it starts
N-1 receiver processes (C{python -m mailstack.receivers}) that inherit
the listening socket; the kernel hands each new connection to one of them.
A receiver has the whole inbound path of its own (policy, filters, Maildir
delivery with its own worker threads) and hands mail for remote
recipients to the main process's queue (L{mailstack.queue.handoff}).  The
main process alone runs the queue, submission, IMAP and POP3.

A receiver reads its settings from standard input, which stays open: when
the main process ends, even by SIGKILL, the pipe closes and the receiver
stops.  A receiver that dies is started again after a second.  Receivers
write their log lines to the main process's standard output.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IListeningPort, IProcessTransport, IReactorSocket
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import ILogObserver, Logger, globalLogBeginner, textFileLogObserver
from twisted.protocols.policies import WrappingFactory
from zope.interface import provider

import mailstack
from mailstack.clock import use_monotonic_time
from mailstack.config import Config, build_config
from mailstack.delivery.dispatch import Dispatcher
from mailstack.logs import fast_text, turn_writes
from mailstack.proxy import ProxyHeaderFactory
from mailstack.queue.handoff import QueueHandoff
from mailstack.queue.store import QueueStore
from mailstack.reactors import IMailReactor
from mailstack.reload import Drain
from mailstack.smtp.policy import ReceivingPolicy
from mailstack.stack import StackBase

log = Logger()

LISTENERS = ("smtp", "submission", "submissions", "imap", "imaps", "pop3")


class AdoptedPort(Service):
    """
    Serve C{factory} on an inherited listening socket.
    """

    def __init__(self, reactor: IReactorSocket, fd: int, family: int, factory: Any) -> None:
        self.reactor = reactor
        self.fd = fd
        self.family = family
        self.factory = factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        super().startService()
        self.port = self.reactor.adoptStreamPort(self.fd, socket.AddressFamily(self.family),
                                                 self.factory)
        os.close(self.fd)  # adoptStreamPort holds its own copy

    def stopService(self) -> Any:
        super().stopService()
        return self.port.stopListening() if self.port is not None else None


def receiver_settings(config: Any, family: int, index: int) -> dict[str, Any]:
    """
    What a receiver needs of the configuration, as option values (parsed
    again, with the same checks, in the receiver).
    """
    options: dict[str, Any] = {name: "none" for name in LISTENERS}
    options.update({
        "data-dir": os.path.abspath(config.data_dir),
        "hostname": config.hostname,
        "domain": list(config.domain),
        "relay-networks": ",".join(str(n) for n in config.relay_networks),
        "max-message-size": config.max_message_size,
        "smtp-timeout": config.smtp_timeout,
        "shutdown-grace": config.shutdown_grace,
        "filter": list(config.filter),
        # Not listened on by a receiver; says whether its socket speaks PROXY.
        "smtp": config.smtp,
        "max-connections": "auto" if config.max_connections is None else config.max_connections,
        "max-client-connections": config.max_client_connections,
        "connection-limit-exempt": ",".join(str(n) for n in config.connection_limit_exempt),
        "smtp-min-data-rate": config.smtp_min_data_rate,
        # Plugins: the same ones, with the same [plugins.NAME] options.
        "transform": list(config.transform),
        "delivery": [f"{where}={name}" if where else name for where, name in config.delivery],
        "user-db": config.user_db,
        # Mail authentication (the receiving MTA's checks, DKIM signing).
        "auth-checks": config.auth_checks, "dmarc-reject": config.dmarc_reject,
        "dmarc-quarantine": config.dmarc_quarantine, "spf-fail-reject": config.spf_fail_reject,
        "dkim-sign": config.dkim_sign,
        "plugins": {name: dict(table) for name, table in config.plugins.items()},
    })
    if config.dns_server is not None:
        options["dns-server"] = "[{}]:{}".format(*config.dns_server)
    for name in ("tls-cert", "tls-key", "postmaster"):
        value = getattr(config, name.replace("-", "_"))
        if value is not None:
            options[name] = value
    return {"options": options, "family": family, "index": index}


class _ReceiverProcess(ProcessProtocol):
    transport: IProcessTransport  # once spawned

    def __init__(self, pool: "ReceiverPool", index: int) -> None:
        self.pool = pool
        self.index = index
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Any) -> None:
        self.pool._ended(self, reason)
        self.ended.callback(None)


class ReceiverPool(Service):
    """
    The receiver processes of the main process; see the module docstring.
    """

    respawn_delay = 1.0
    stop_timeout = 30.0

    def __init__(self, stack: Any, count: int) -> None:
        self.stack = stack
        self.reactor = stack.reactor
        self.count = count
        self.processes: dict[int, _ReceiverProcess] = {}
        self._restarting: set[_ReceiverProcess] = set()

    def startService(self) -> None:
        super().startService()
        listener = self.stack.getServiceNamed("smtp")
        # Not before the queue is loaded: loading removes unfinished queue
        # writes, and a receiver's write in progress must not look like one.
        d = DeferredList([listener.listening, self.stack.queue.loaded],
                         fireOnOneErrback=True, consumeErrors=True)
        def spawn_all(_: object) -> None:
            for i in range(1, self.count + 1):
                self._spawn(i)

        d.addCallback(spawn_all)
        d.addErrback(lambda f: log.failure("receivers not started", f))

    def _spawn(self, index: int) -> None:
        if not self.running:
            return
        port = self.stack.getServiceNamed("smtp").port
        settings = receiver_settings(self.stack.config, port.socket.family, index)
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(mailstack.__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [package_root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        process = _ReceiverProcess(self, index)
        self.reactor.spawnProcess(
            process, sys.executable, [sys.executable, "-m", "mailstack.receivers"], env=env,
            childFDs={0: "w", 1: 1, 2: 2, 3: port.fileno()})
        process.transport.write(json.dumps(settings).encode() + b"\n")
        self.processes[index] = process
        log.info("receiver {index} started (pid {pid})", index=index, pid=process.transport.pid)

    def restart(self) -> None:
        """
        Stop every receiver gracefully (its SMTP transactions finish first);
        each is started again with the main process's current configuration
        (after a reload).  The main process keeps accepting meanwhile.
        """
        for process in list(self.processes.values()):
            self._restarting.add(process)
            process.transport.closeStdin()  # the receiver's signal to stop

    def _ended(self, process: _ReceiverProcess, reason: Any) -> None:
        if self.processes.get(process.index) is process:
            del self.processes[process.index]
        if process in self._restarting and self.running:
            self._restarting.discard(process)
            log.info("receiver {index} stopped; starting it with the new configuration",
                     index=process.index)
            self._spawn(process.index)
        elif self.running:
            log.error("receiver {index} ended ({reason}); starting it again",
                      index=process.index, reason=reason.getErrorMessage())
            self.reactor.callLater(self.respawn_delay, self._spawn, process.index)
        else:
            log.info("receiver {index} stopped", index=process.index)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        if not self.processes:
            return succeed(None)
        waits = []
        for process in list(self.processes.values()):
            process.transport.closeStdin()  # the receiver's signal to stop
            timer = self.reactor.callLater(self.stop_timeout, _kill, process)
            process.ended.addBoth(lambda _, t: t.cancel() if t.active() else None, timer)
            waits.append(process.ended)
        return DeferredList(waits)


def _kill(process: _ReceiverProcess) -> None:
    log.warn("receiver {index} did not stop; killing it", index=process.index)
    try:
        process.transport.signalProcess("KILL")
    except (ProcessExitedAlready, OSError):
        pass  # already gone


class ReceiverStack(StackBase):
    """
    The mail system of a receiver process: the receiving MTA alone, on the
    listening socket it inherited, delivering locally and handing mail for
    remote recipients to the main process's queue
    (C{mailstack.queue.handoff}).
    """

    def __init__(self, config: Config, reactor: IMailReactor, fd: int, family: int) -> None:
        """
        @param config: the main process's settings for a receiver.
        @param reactor: the reactor everything runs on.
        @param fd: the inherited listening socket.
        @param family: its address family.
        """
        super().__init__(config, reactor)
        data = self.data_dir
        self.queue = QueueHandoff(
            QueueStore(os.path.join(data, "queue")), data, reactor, self.io_pool)
        self.dispatcher = Dispatcher(self.router, self.maildir, self.queue, reactor,
                                     self.spool_dir)
        self.plug_in(self.dispatcher)
        policy = self.filtered(ReceivingPolicy(self.dispatcher, config.relay_networks),
                               self.smtp_filters)
        factory: WrappingFactory[Any] = self.limited(self.smtp_factory(policy, "smtp"), "smtp",
                                                "smtp")
        if (config.smtp or "").lower().startswith("haproxy:"):
            factory = ProxyHeaderFactory(factory, reactor, "smtp")
        AdoptedPort(reactor, fd, family, factory).setServiceParent(self)


def main() -> None:
    """
    A receiver process: settings on standard input, the listening socket
    on descriptor 3.
    """
    from twisted.internet import reactor as global_reactor

    reactor = cast(IMailReactor, global_reactor)  # see mailstack.reactors

    settings = json.loads(sys.stdin.readline())
    write = textFileLogObserver(sys.stdout)
    system = f"receiver-{settings['index']}"

    @provider(ILogObserver)
    def observe(event: dict[str, Any]) -> None:
        # "[receiver-1 mailstack.smtp.server#info]": which process said it.
        level = event.get("log_level")
        event["log_system"] = (f"{system} {event.get('log_namespace', '-')}"
                               f"#{level.name if level is not None else '-'}")
        write(event)

    # The same fast formatter and per-turn writes as the main process's log.
    fast_text(write)
    turn_writes(write, reactor)
    globalLogBeginner.beginLoggingTo([observe], redirectStandardIO=False)
    config = build_config(settings["options"])
    use_monotonic_time(reactor)  # timers must not follow wall-clock steps
    stack = ReceiverStack(config, reactor, 3, settings["family"])
    Drain(stack, reactor, config.shutdown_grace).setServiceParent(stack)

    def parent_gone() -> None:
        sys.stdin.read()  # returns at end of file: the main process closed it or died
        reactor.callFromThread(reactor.stop)

    threading.Thread(target=parent_gone, daemon=True).start()
    reactor.callWhenRunning(stack.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stack.stopService)
    log.info("receiver {index} (pid {pid}) accepting on the smtp listener",
             index=settings["index"], pid=os.getpid())
    reactor.run()


if __name__ == "__main__":
    main()
