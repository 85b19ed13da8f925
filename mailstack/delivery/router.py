# -*- test-case-name: tests.test_router -*-
"""
Recipient routing: what an address means on this host.

An address in a local domain is an alias (expanded recursively), a user,
or a plus-address of either (C{user+tag@} reaches C{user@}); anything else
there is unknown.  Addresses in other domains are remote.  Aliases win over
users, as in Postfix's virtual_alias_maps; an alias that names itself among
its targets keeps a copy in the user's own mailbox (C{alice: alice, bob}).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from mailstack.address import Address
from mailstack.interfaces import IAliasMap, IUserDatabase
from mailstack.message import LocalRecipient

log = Logger()


class UnknownRecipient(LookupError):
    """
    A local-domain address that is neither a user nor an alias.
    """


class AliasLoop(LookupError):
    """
    Alias expansion came back to an address it was already expanding, or
    went deeper than L{Router.max_depth}.
    """


class EmptyResolution(LookupError):
    """
    A local address whose alias leads to no recipient at all (its targets
    do not parse): a broken table, refused at RCPT with a 4xx until fixed.
    """


@dataclass(frozen=True)
class Resolution:
    """
    Where mail for one envelope recipient goes.
    """

    local: tuple[LocalRecipient, ...] = field(default=())
    remote: tuple[Address, ...] = field(default=())


class Router:
    """
    Resolves envelope recipients against the local domains, users and aliases.
    """

    max_depth = 10

    def __init__(self, domains: frozenset[str], users: IUserDatabase, aliases: IAliasMap,
                 postmaster: Address | None = None):
        self.domains = domains
        self.users = users
        self.aliases = aliases
        # RFC 5321 4.5.1: postmaster@ every local domain is accepted; without
        # a user or alias of its own it goes here (--postmaster).
        self.postmaster = postmaster

    def postmaster_for(self, address: Address) -> Address | None:
        """
        Where C{postmaster@} a local domain goes when no user or alias has
        that name; C{None} for other addresses.
        """
        if address.base.local.lower() != "postmaster" or not self.is_local(address):
            return None
        return self.postmaster or Address("postmaster", address.domain)

    def is_local(self, address: Address) -> bool:
        return address.domain in self.domains

    def resolve(self, address: Address) -> Resolution:
        """
        Resolve one recipient; raise L{UnknownRecipient}, L{AliasLoop} or
        L{EmptyResolution}.  Only for a user database and alias map that
        answer at once (the file database); L{lookup} works with any.
        """
        d = self.lookup(address)
        result: list[Any] = []
        d.addBoth(result.append)
        if not result:
            d.cancel()
            raise RuntimeError("the user database answers asynchronously: use lookup()")
        if isinstance(result[0], Failure):
            result[0].raiseException()
        return result[0]

    def lookup(self, address: Address) -> Deferred[Resolution]:
        """
        L{resolve} for any user database and alias map: their methods may
        return Deferreds (an SQL database in worker threads).
        """
        return Deferred.fromCoroutine(self._resolve(address))

    async def _resolve(self, address: Address) -> Resolution:
        if not self.is_local(address):
            return Resolution(remote=(address,))
        local: dict[LocalRecipient, None] = {}
        remote: dict[Address, None] = {}
        await self._expand(address, (), local, remote)
        if not local and not remote:
            raise EmptyResolution(f"{address} resolves to no recipient (bad alias targets?)")
        return Resolution(tuple(local), tuple(remote))

    async def _targets(self, address: Address) -> Any:
        targets: Any = self.aliases.targets
        return await maybeDeferred(targets, address)

    async def _exists(self, address: Address) -> bool:
        exists: Any = self.users.exists
        return bool(await maybeDeferred(exists, address))

    async def _expand(
        self,
        address: Address,
        path: tuple[Address, ...],
        local: dict[LocalRecipient, None],
        remote: dict[Address, None],
    ) -> None:
        if len(path) >= self.max_depth:
            raise AliasLoop(f"alias expansion of {path[0]} is deeper than {self.max_depth}")
        key = address.lower()
        base = key.base
        targets = await self._targets(key)
        alias = key
        if targets is None and base != key:
            targets, alias = await self._targets(base), base
        if targets is None:
            if await self._exists(key):
                local[LocalRecipient(key, address)] = None
            elif await self._exists(base):
                local[LocalRecipient(base, address)] = None
            elif (postmaster := self.postmaster_for(key)) is not None:
                if postmaster.lower() in (key, base) or postmaster.lower() in path:
                    # The postmaster's own mailbox, created on first delivery.
                    local[LocalRecipient(postmaster.lower(), address)] = None
                elif not self.is_local(postmaster):
                    remote[postmaster] = None
                else:
                    try:
                        await self._expand(postmaster, path + (key,), local, remote)
                    except UnknownRecipient:
                        # A --postmaster nobody created: still never refused.
                        log.error("--postmaster <{postmaster}> is no user or alias; "
                                  "mail for <{rcpt}> goes to its own mailbox",
                                  postmaster=postmaster, rcpt=address)
                        own = Address("postmaster", key.domain)
                        local[LocalRecipient(own, address)] = None
            else:
                # A catch-all (@domain) takes what no user or alias took.
                catch_all = getattr(self.aliases, "catch_all", None)
                targets = catch_all(key.domain) if catch_all is not None else None
                if not targets:
                    raise UnknownRecipient(str(address))
                for target in targets:
                    if not self.is_local(target):
                        remote[target] = None
                    elif target.lower() in path or target.lower() == key:
                        raise AliasLoop(f"catch-all loop: {key} -> {target}")
                    else:
                        await self._expand(target, path + (key,), local, remote)
            return
        for target in targets:
            if target.lower() == alias:
                if not await self._exists(alias):
                    raise UnknownRecipient(str(target))
                local[LocalRecipient(alias, address)] = None
            elif not self.is_local(target):
                remote[target] = None
            elif target.lower() in path or target.lower() == key:
                raise AliasLoop(f"alias loop: {' -> '.join(map(str, path + (key, target)))}")
            else:
                await self._expand(target, path + (key,), local, remote)
