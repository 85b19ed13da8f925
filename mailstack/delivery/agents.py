# -*- test-case-name: tests.test_agents -*-
"""
Delivery agents chosen per domain or per user (C{--delivery}).

Maildir is the default and runs at DATA (a C{250} means the copy is in
the Maildir, fsynced); a plugin agent providing L{IDeliveryAgent} (and
best L{ITwoPhaseStore}) runs there the same way, for its recipients.  An
agent providing L{IQueuedDeliveryAgent} (the
built-in C{lmtp} and C{pipe}) runs from the outbound queue, as Postfix's
lmtp(8) and pipe(8) run from its queue: the message is made durable in
the queue for those recipients (the C{250}), and the queue hands it to the
agent at once, then on its retry schedule.  Each recipient's answer
counts on its own: a 4xx for one recipient defers only that one, a 5xx
bounces it, and nothing a client was told was accepted is lost.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet.defer import ensureDeferred, maybeDeferred
from twisted.logger import Logger

from mailstack.address import Address, parse_address
from mailstack.interfaces import IDeliveryAgent, IQueuedDeliveryAgent
from mailstack.message import LocalRecipient
from mailstack.queue.courier import Outcome
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply

log = Logger()


class AnyAgent:
    """
    What a delivery agent plugin must build: either kind of agent.
    """

    __name__ = "IDeliveryAgent or IQueuedDeliveryAgent"

    @staticmethod
    def providedBy(obj: Any) -> bool:
        return IDeliveryAgent.providedBy(obj) or IQueuedDeliveryAgent.providedBy(obj)


class AgentMap:
    """
    Which agent delivers for a local user: per user, then per domain, then
    the default (C{None}: Maildir at DATA).
    """

    def __init__(self, default: Any, by_domain: dict[str, Any], by_user: dict[str, Any]):
        self.default = default
        self.by_domain = by_domain
        self.by_user = by_user

    def agent_for(self, user: Address | str) -> Any:
        text = str(user).lower()
        if text in self.by_user:
            return self.by_user[text]
        domain = text.rpartition("@")[2]
        if domain in self.by_domain:
            return self.by_domain[domain]
        return self.default

    def split(self, local: Sequence[LocalRecipient]
              ) -> tuple[dict[Any, list[LocalRecipient]], list[Address]]:
        """
        The recipients for each agent run at DATA (C{None}: Maildir), and
        the addresses the queue hands to an agent: the plus-address as
        sent when it is the user's own (LMTP servers know C{user+tag}),
        else the user.
        """
        inline: dict[Any, list[LocalRecipient]] = {}
        queued = []
        for rcpt in local:
            agent = self.agent_for(rcpt.user)
            if agent is None or not IQueuedDeliveryAgent.providedBy(agent):
                inline.setdefault(agent, []).append(rcpt)
            else:
                own = rcpt.delivered_to.lower().base == rcpt.user
                queued.append(rcpt.delivered_to if own else rcpt.user)
        return inline, queued


def build_agents(config: Any, reactor: IMailReactor) -> AgentMap | None:
    """
    The agents C{--delivery} names, built once each; C{None} if Maildir
    delivers for everyone.
    """
    from mailstack.plugin import build_plugin

    if not config.delivery:
        return None
    built: dict[str, Any] = {"maildir": None}
    for _, name in config.delivery:
        if name not in built:
            built[name] = build_plugin("delivery", name, config, reactor, AnyAgent)
    default, by_domain, by_user = None, {}, {}
    for where, name in config.delivery:
        if where is None:
            default = built[name]
        elif "@" in where:
            by_user[where] = built[name]
        else:
            by_domain[where] = built[name]
    if default is None and not any(by_domain.values()) and not any(by_user.values()):
        return None
    return AgentMap(default, by_domain, by_user)


class AgentCourier:
    """
    The queue's courier with the agents in front: recipients an agent
    delivers for go to it, everything else to remote hosts.
    """

    def __init__(self, courier: Any, agents: AgentMap, local_domains: frozenset[str]) -> None:
        self.courier = courier
        self.agents = agents
        self.local_domains = local_domains

    def __getattr__(self, name: str) -> Any:
        return getattr(self.courier, name)

    async def deliver(self, domain: str, sender: str, recipients: Sequence[str],
                      open_content: Any, size: int) -> dict[str, Outcome]:
        if domain not in self.local_domains:
            return await self.courier.deliver(domain, sender, recipients, open_content, size)
        groups: dict[int, tuple[Any, list[str]]] = {}
        for rcpt in recipients:
            agent = self.agents.agent_for(parse_address(rcpt).lower().base)
            groups.setdefault(id(agent), (agent, []))[1].append(rcpt)
        outcomes: dict[str, Outcome] = {}
        for agent, rcpts in groups.values():
            if agent is None:  # the configuration changed since it was queued
                reply = Reply(451, "4.3.5", "no delivery agent for this local recipient")
                outcomes.update({r: Outcome(reply, "none") for r in rcpts})
                continue
            try:
                replies = await ensureDeferred(_as_coroutine(maybeDeferred(
                    agent.deliver_queued, sender, rcpts, open_content, size)))
            except Exception:  # noqa: BLE001 - any agent failure defers
                log.failure("delivery agent {name} failed", name=agent.name)
                replies = {}
            for r in rcpts:
                reply = replies.get(r) or Reply(451, "4.3.0",
                                                f"delivery agent {agent.name} failed")
                outcomes[r] = Outcome(reply, agent.name)
        return outcomes


async def _as_coroutine(d: Any) -> Any:
    result = await d
    if hasattr(result, "__await__") and not isinstance(result, dict):
        result = await result
    return result
