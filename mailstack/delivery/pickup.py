# -*- test-case-name: tests.test_mua -*-
"""
Picks up mail that C{mailstack sendmail} left in C{DATA/maildrop/}: at
start, when poked through the control socket or C{DATA/pickup.sock}, and
once a minute.  Each file is delivered through the dispatcher (local
Maildirs, the queue) and removed only once that is durable: at least once,
never lost.  The submitting user is the file's owner (see
L{mailstack.mua.sendmail}); a C{Received:} header says so, as Postfix's
pickup does (C{by host (Postfix, from userid 1000)}).
"""

from __future__ import annotations

import email.utils
import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.protocol import Factory
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.threadpool import ThreadPool

from mailstack.address import AddressError, parse_address
from mailstack.clock import wall_seconds
from mailstack.logsafe import safe
from mailstack.message import new_queue_id
from mailstack.delivery.maildrop import maildrop_dir, read_drop
from mailstack.privileges import user_name
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import SMTPError
from mailstack.transport import IConnection

log = Logger()


class Pickup(TimerService):
    """
    The maildrop reader.
    """

    interval = 60.0

    def __init__(self, data_dir: str, dispatcher: Any, reactor: IMailReactor, pool: ThreadPool,
                 hostname: str = "localhost", max_size: int | None = None) -> None:
        super().__init__(self.interval, self.poke)
        self.hostname = hostname
        self.max_size = max_size
        self.clock = reactor
        self.directory = maildrop_dir(data_dir)
        self.dispatcher = dispatcher
        self.reactor = reactor
        self.pool = pool
        self._running: Deferred[int] | None = None
        self._again = False

    def poke(self) -> Deferred[int]:
        """
        Deliver whatever is waiting; fires with how many files were handled.
        """
        if self._running is not None:
            self._again = True
            return self._running
        self._running = ensureDeferred(self._pick_up())

        def done(result: Any) -> Any:
            self._running = None
            if self._again:
                self._again = False
                self.poke()
            return result

        return self._running.addBoth(done)

    async def _pick_up(self) -> int:
        names = await deferToThreadPool(self.reactor, self.pool, self._listing)
        handled = 0
        for name in names:
            path = os.path.join(self.directory, name)
            try:
                sender, recipients, uid, content = await deferToThreadPool(
                    self.reactor, self.pool, read_drop, path,
                    None if self.max_size is None else self.max_size + 65536)
                rcpts = [parse_address(r) for r in recipients]
                from_ = parse_address(sender) if sender else None
            except (OSError, ValueError, KeyError, AddressError) as e:
                log.error("maildrop: cannot read {name}: {error}; moved aside",
                          name=safe(name), error=safe(e))
                os.replace(path, os.path.join(self.directory, ".bad-" + name))
                continue
            qid = new_queue_id()
            received = (f"Received: by {self.hostname} (mailstack, from userid {uid})\n"
                        f"\tid {qid}; {email.utils.formatdate(wall_seconds(self.clock))}\n")
            who = f"uid={uid} user={user_name(uid)}"
            try:
                await self.dispatcher.inject(from_, rcpts, received.encode("ascii") + content,
                                             client=f"local {who}", queue_id=qid, user=who)
            except SMTPError as e:  # the message filters' refusal
                if e.reply.code < 500:
                    log.info("maildrop: {name} refused for now: {reply}; will retry",
                             name=name, reply=e.reply)
                    continue
                log.warn("maildrop: {name} from <{sender}> (local user {who}) rejected: "
                         "{reply}; moved to .rejected-{name}", name=name, sender=safe(sender),
                         who=who, reply=e.reply)
                os.replace(path, os.path.join(self.directory, ".rejected-" + name))
                continue
            except OSError as e:  # a full disk: one line, not a traceback
                log.error("maildrop: cannot deliver {name}: {error}; will retry", name=name,
                          error=e)
                continue
            except Exception:  # noqa: BLE001 - one file's failure must not stop the others
                log.failure("maildrop: cannot deliver {name}; will retry", name=safe(name))
                continue
            await deferToThreadPool(self.reactor, self.pool, os.unlink, path)
            handled += 1
        return handled

    stale_after = 86400.0  # a sendmail that died mid-write left its temporary file

    def _listing(self) -> list[str]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return []
        now = wall_seconds(self.clock)  # compared with file times
        for name in names:
            if name.startswith(".") and name.endswith(".tmp"):
                path = os.path.join(self.directory, name)
                try:
                    if now - os.lstat(path).st_mtime > self.stale_after:
                        os.unlink(path)
                        log.info("maildrop: removed {name}, a submission left unfinished "
                                 "a day ago", name=name)
                except OSError:
                    pass  # gone already, or renamed by its writer meanwhile
        return sorted(n for n in names if not n.startswith("."))


class PokeProtocol(LineOnlyReceiver):
    """
    C{DATA/pickup.sock}: any local user's C{sendmail} says "pickup" here
    (the socket is mode 0666, like Postfix's public/pickup FIFO); it can do
    nothing else.  Pokes coalesce, so a flood costs directory listings.
    """

    transport: IConnection  # once connected: see mailstack.transport

    delimiter = b"\n"
    MAX_LENGTH = 64

    def lineReceived(self, line: bytes) -> None:
        if line.strip() == b"pickup":
            self.factory.pickup.poke()
            self.sendLine(b"ok")
        else:
            self.sendLine(b"error unknown command")
        self.transport.loseConnection()


class PokeFactory(Factory):
    protocol = PokeProtocol
    noisy = False

    def __init__(self, pickup: Pickup) -> None:
        self.pickup = pickup
