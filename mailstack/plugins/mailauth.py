# -*- test-case-name: tests.test_mailauth_wiring -*-
"""
The plugin factories of the built-in mail authentication plugins
C{auth-checks} and C{dkim-sign} (L{mailstack.mailauth.builtin}, which the
server uses to turn them on by default): through them C{mailstack plugins}
lists them, and C{--filter}/C{--transform} can name them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.interfaces import IMessageFilterFactory, IOutboundTransformFactory
from mailstack.mailauth import builtin


@implementer(IPlugin, IMessageFilterFactory)
class AuthChecksFactory:
    name = builtin.AUTH_CHECKS
    description = builtin.AUTH_CHECKS_DESCRIPTION

    def build(self, config: Any, reactor: Any, resolver: Any = None,
              current: Callable[[], Any] | None = None) -> Any:
        """
        @param resolver: DNS (the server's); by default one made from
            C{--dns-server}, else the system's configuration.
        @param current: returns the running configuration (after reloads);
            by default C{config}.
        """
        return builtin.auth_checks_filter(config, reactor, resolver, current)


@implementer(IPlugin, IOutboundTransformFactory)
class DKIMSignFactory:
    name = builtin.DKIM_SIGN
    description = builtin.DKIM_SIGN_DESCRIPTION

    def build(self, config: Any, reactor: Any,
              current: Callable[[], Any] | None = None) -> Any:
        """
        @param current: returns the running configuration (after reloads);
            by default C{config}.
        """
        return builtin.dkim_sign_transform(config, reactor, current)


auth_checks = AuthChecksFactory()
dkim_sign = DKIMSignFactory()
