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

from twisted.logger import Logger

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
        L{EmptyResolution}.
        """
        if not self.is_local(address):
            return Resolution(remote=(address,))
        local: dict[LocalRecipient, None] = {}
        remote: dict[Address, None] = {}
        self._expand(address, (), local, remote)
        if not local and not remote:
            raise EmptyResolution(f"{address} resolves to no recipient (bad alias targets?)")
        return Resolution(tuple(local), tuple(remote))

    def _expand(
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
        targets = self.aliases.targets(key)
        alias = key
        if targets is None and base != key:
            targets, alias = self.aliases.targets(base), base
        if targets is None:
            if self.users.exists(key):
                local[LocalRecipient(key, address)] = None
            elif self.users.exists(base):
                local[LocalRecipient(base, address)] = None
            elif (postmaster := self.postmaster_for(key)) is not None:
                if postmaster.lower() in (key, base) or postmaster.lower() in path:
                    # The postmaster's own mailbox, created on first delivery.
                    local[LocalRecipient(postmaster.lower(), address)] = None
                elif not self.is_local(postmaster):
                    remote[postmaster] = None
                else:
                    try:
                        self._expand(postmaster, path + (key,), local, remote)
                    except UnknownRecipient:
                        # A --postmaster nobody created: still never refused.
                        log.error("--postmaster <{postmaster}> is no user or alias; "
                                  "mail for <{rcpt}> goes to its own mailbox",
                                  postmaster=postmaster, rcpt=address)
                        own = Address("postmaster", key.domain)
                        local[LocalRecipient(own, address)] = None
            else:
                raise UnknownRecipient(str(address))
            return
        for target in targets:
            if target.lower() == alias:
                if not self.users.exists(alias):
                    raise UnknownRecipient(str(target))
                local[LocalRecipient(alias, address)] = None
            elif not self.is_local(target):
                remote[target] = None
            elif target.lower() in path or target.lower() == key:
                raise AliasLoop(f"alias loop: {' -> '.join(map(str, path + (key, target)))}")
            else:
                self._expand(target, path + (key,), local, remote)
