# -*- test-case-name: tests.test_mua -*-
"""
Picks up mail that C{mailstack sendmail} left in C{DATA/maildrop/}: at
start, when poked through the control socket, and once a minute.  Each
file is delivered through the dispatcher (local Maildirs, the queue) and
removed only once that is durable: at least once, never lost.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import TimerService
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger

from mailstack.address import AddressError, parse_address
from mailstack.mua.sendmail import maildrop_dir, read_drop
from mailstack.smtp.reply import SMTPError

log = Logger()


class Pickup(TimerService):
    """
    The maildrop reader.
    """

    interval = 60.0

    def __init__(self, data_dir: str, dispatcher: Any, reactor: Any, pool: Any) -> None:
        super().__init__(self.interval, self.poke)
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
                sender, recipients, who, content = await deferToThreadPool(
                    self.reactor, self.pool, read_drop, path)
                rcpts = [parse_address(r) for r in recipients]
                from_ = parse_address(sender) if sender else None
            except (OSError, ValueError, KeyError, AddressError) as e:
                log.error("maildrop: cannot read {name}: {error}; moved aside", name=name,
                          error=e)
                os.replace(path, os.path.join(self.directory, ".bad-" + name))
                continue
            try:
                await self.dispatcher.inject(from_, rcpts, content, client=f"local {who}",
                                             user=who)
            except SMTPError as e:  # the message filters' refusal
                if e.reply.code < 500:
                    log.info("maildrop: {name} refused for now: {reply}; will retry",
                             name=name, reply=e.reply)
                    continue
                log.warn("maildrop: {name} from <{sender}> (local user {who}) rejected: "
                         "{reply}; moved to .rejected-{name}", name=name, sender=sender,
                         who=who, reply=e.reply)
                os.replace(path, os.path.join(self.directory, ".rejected-" + name))
                continue
            except OSError as e:  # a full disk: one line, not a traceback
                log.error("maildrop: cannot deliver {name}: {error}; will retry", name=name,
                          error=e)
                continue
            except Exception:
                log.failure("maildrop: cannot deliver {name}; will retry", name=name)
                continue
            await deferToThreadPool(self.reactor, self.pool, os.unlink, path)
            handled += 1
        return handled

    def _listing(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.directory) if not n.startswith("."))
        except FileNotFoundError:
            return []
