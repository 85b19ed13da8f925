# -*- test-case-name: tests.test_smtp_server -*-
"""
Who may send what to whom: the decisions the SMTP protocol asks for.

L{ReceivingPolicy} is the port-25 MTA: it takes mail for local users and
aliases from anyone, and relays only for clients in C{--relay-networks}.
The submission policy (authenticated users) builds on it.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Sequence

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mailstack.address import Address
from mailstack.delivery.dispatch import Dispatcher
from mailstack.delivery.router import AliasLoop, EmptyResolution, Resolution, UnknownRecipient
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool
from mailstack.smtp.reply import Reply, SMTPError

log = Logger()


class ReceivingPolicy:
    """
    The receiving MTA: local recipients from anyone; relaying only for
    C{relay_networks}; no AUTH.
    """

    def __init__(self, dispatcher: Dispatcher, relay_networks: Sequence[Any] = ()) -> None:
        self.dispatcher = dispatcher
        self.router = dispatcher.router
        self.relay_networks = tuple(relay_networks)

    def connect(self, session: Any) -> Reply | None:
        return None

    def extensions(self, session: Any) -> list[str]:
        return []

    def auth(self, protocol: Any, arg: str) -> Reply:
        return Reply(503, "5.5.1", "Error: authentication not enabled")

    def mail(self, session: Any, sender: Address | None
             ) -> Reply | None | Deferred[Reply | None]:
        return None

    def may_relay(self, session: Any) -> bool:
        try:
            ip = ipaddress.ip_address(session.peer_host)
        except ValueError:
            return False
        return any(ip in network for network in self.relay_networks)

    def rcpt(self, session: Any, envelope: Envelope, rcpt: Address) -> Deferred[Resolution]:
        return Deferred.fromCoroutine(self._rcpt(session, envelope, rcpt))

    async def _rcpt(self, session: Any, envelope: Envelope, rcpt: Address) -> Resolution:
        if self.router.is_local(rcpt):
            try:
                resolution = await self.router.lookup(rcpt)
            except UnknownRecipient:
                raise SMTPError(550, "5.1.1", f"<{rcpt}>: Recipient address rejected: "
                                              "User unknown in local recipient table") from None
            except AliasLoop as e:
                log.error("alias loop for <{rcpt}>: {error}", rcpt=safe(rcpt), error=safe(e))
                raise SMTPError(550, "5.4.6", f"<{rcpt}>: Recipient address rejected: "
                                              "alias loop") from None
            except EmptyResolution as e:
                # A 250 here would lose the message: it would go nowhere.
                log.error("{error}", error=e)
                raise SMTPError(451, "4.3.0", f"<{rcpt}>: Recipient address rejected: "
                                              "temporary lookup failure") from None
        elif self.may_relay(session):
            resolution = Resolution(remote=(rcpt,))
        else:
            raise SMTPError(554, "5.7.1", f"<{rcpt}>: Relay access denied")
        if resolution.remote and self.dispatcher.queue is None:
            raise SMTPError(451, "4.3.0", f"<{rcpt}>: remote delivery is not available yet")
        return resolution

    def deliver(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Deferred[Any]:
        """
        Make the message durable for every recipient.
        """
        return self.dispatcher.dispatch(envelope, spool)
