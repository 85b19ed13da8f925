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
place instead (L{mailstack.plugins.mailauth} has their plugin factories;
the filter then uses C{--dns-server} or the system's resolver, as other
plugins do).  This module lives below the application so that the server
needs no import of the plugin package, which only C{getPlugins} reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.logger import Logger

log = Logger()

AUTH_CHECKS = "auth-checks"
AUTH_CHECKS_DESCRIPTION = ("SPF, DKIM and DMARC of mail from the internet; "
                           "Authentication-Results; DMARC policy (built in, --auth-checks)")
DKIM_SIGN = "dkim-sign"
DKIM_SIGN_DESCRIPTION = ("DKIM signatures (rsa-sha256 and ed25519-sha256) on mail of local "
                         "domains with a key set (built in, --dkim-sign)")


def auth_checks_filter(config: Any, reactor: Any, resolver: Any = None,
                       current: Callable[[], Any] | None = None) -> Any:
    """
    The C{auth-checks} filter.

    @param resolver: DNS (the server's); by default one made from
        C{--dns-server}, else the system's configuration.
    @param current: returns the running configuration (after reloads);
        by default C{config}.
    """
    from mailstack.mailauth.checks import AuthChecksFilter

    if resolver is None:
        from twisted.names.client import Resolver, createResolver

        resolver = (Resolver(servers=[config.dns_server], reactor=reactor)
                    if config.dns_server else createResolver())
    return AuthChecksFilter(current or (lambda: config), resolver, reactor)


def dkim_sign_transform(config: Any, reactor: Any,
                        current: Callable[[], Any] | None = None) -> Any:
    """
    The C{dkim-sign} transform.

    @param current: returns the running configuration (after reloads);
        by default C{config}.
    """
    from mailstack.mailauth.signing import DKIMSigningTransform

    return DKIMSigningTransform(current or (lambda: config), reactor)


def builtin_filters(config: Any, reactor: Any, resolver: Any,
                    current: Callable[[], Any]) -> list[Any]:
    """
    The built-in filters of the receiving MTA that C{config} turns on.
    """
    if not config.auth_checks or AUTH_CHECKS in config.filter:
        return []
    log.info("filter auth-checks enabled (built in): {description}",
             description=AUTH_CHECKS_DESCRIPTION)
    return [auth_checks_filter(config, reactor, resolver, current)]


def builtin_transforms(config: Any, reactor: Any, current: Callable[[], Any]) -> list[Any]:
    """
    The built-in outbound transforms that C{config} turns on.
    """
    if not config.dkim_sign or DKIM_SIGN in config.transform:
        return []
    log.info("transform dkim-sign enabled (built in): {description}",
             description=DKIM_SIGN_DESCRIPTION)
    return [dkim_sign_transform(config, reactor, current)]
