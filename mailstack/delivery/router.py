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

from mailstack.address import Address
from mailstack.interfaces import IAliasMap, IUserDatabase
from mailstack.message import LocalRecipient


class UnknownRecipient(LookupError):
    """
    A local-domain address that is neither a user nor an alias.
    """


class AliasLoop(LookupError):
    """
    Alias expansion came back to an address it was already expanding, or
    went deeper than L{Router.max_depth}.
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

    def __init__(self, domains: frozenset[str], users: IUserDatabase, aliases: IAliasMap):
        self.domains = domains
        self.users = users
        self.aliases = aliases

    def is_local(self, address: Address) -> bool:
        return address.domain in self.domains

    def resolve(self, address: Address) -> Resolution:
        """
        Resolve one recipient; raise L{UnknownRecipient} or L{AliasLoop}.
        """
        if not self.is_local(address):
            return Resolution(remote=(address,))
        local: dict[LocalRecipient, None] = {}
        remote: dict[Address, None] = {}
        self._expand(address, (), local, remote)
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
                        self._expand(target, path + (key,), local, remote)
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
