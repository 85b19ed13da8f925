# -*- test-case-name: tests.test_mailauth_wiring -*-
"""
The built-in mail authentication plugins (issue 17), on by default:

 - C{auth-checks}, a message filter: SPF, DKIM and DMARC of mail the
   receiving MTA gets from the internet, one C{Authentication-Results}
   field, the DMARC policy (L{mailstack.mailauth.checks}).  Off with
   C{--auth-checks no}.
 - C{dkim-sign}, an outbound transform: DKIM signatures on mail of local
   domains with an active key set (L{mailstack.mailauth.signing}).  Off
   with C{--dkim-sign no}.

The server adds them itself (L{builtin_filters}, L{builtin_transforms}):
the filter runs before the C{--filter} ones, on the receiving MTA only;
the signer after the C{--transform} ones, so that it signs the message as
it leaves.  Naming one in C{--filter} or C{--transform} puts it in that
place instead (then the filter uses C{--dns-server} or the system's
resolver, as other plugins do).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.interfaces import IMessageFilterFactory, IOutboundTransformFactory

log = Logger()


def _resolver(config: Any, reactor: Any) -> Any:
    from twisted.names.client import Resolver, createResolver

    if config.dns_server:
        return Resolver(servers=[config.dns_server], reactor=reactor)
    return createResolver()


@implementer(IPlugin, IMessageFilterFactory)
class AuthChecksFactory:
    name = "auth-checks"
    description = ("SPF, DKIM and DMARC of mail from the internet; Authentication-Results; "
                   "DMARC policy (built in, --auth-checks)")

    def build(self, config: Any, reactor: Any, resolver: Any = None,
              current: Callable[[], Any] | None = None) -> Any:
        """
        @param resolver: DNS (the server's); by default one made from
            C{--dns-server}, else the system's configuration.
        @param current: returns the running configuration (after reloads);
            by default C{config}.
        """
        from mailstack.mailauth.checks import AuthChecksFilter

        return AuthChecksFilter(current or (lambda: config),
                                resolver if resolver is not None else _resolver(config, reactor),
                                reactor)


@implementer(IPlugin, IOutboundTransformFactory)
class DKIMSignFactory:
    name = "dkim-sign"
    description = ("DKIM signatures (rsa-sha256 and ed25519-sha256) on mail of local domains "
                   "with a key set (built in, --dkim-sign)")

    def build(self, config: Any, reactor: Any,
              current: Callable[[], Any] | None = None) -> Any:
        from mailstack.mailauth.signing import DKIMSigningTransform

        return DKIMSigningTransform(current or (lambda: config), reactor)


auth_checks = AuthChecksFactory()
dkim_sign = DKIMSignFactory()


def builtin_filters(config: Any, reactor: Any, resolver: Any,
                    current: Callable[[], Any]) -> list[Any]:
    """
    The built-in filters of the receiving MTA that C{config} turns on.
    """
    if not config.auth_checks or auth_checks.name in config.filter:
        return []
    log.info("filter auth-checks enabled (built in): {description}",
             description=auth_checks.description)
    return [auth_checks.build(config, reactor, resolver, current)]


def builtin_transforms(config: Any, reactor: Any, current: Callable[[], Any]) -> list[Any]:
    """
    The built-in outbound transforms that C{config} turns on.
    """
    if not config.dkim_sign or dkim_sign.name in config.transform:
        return []
    log.info("transform dkim-sign enabled (built in): {description}",
             description=dkim_sign.description)
    return [dkim_sign.build(config, reactor, current)]
