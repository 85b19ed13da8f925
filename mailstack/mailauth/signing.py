# -*- test-case-name: tests.test_mailauth_wiring -*-
"""
DKIM signing of outgoing mail, as the built-in outbound transform
C{dkim-sign} (L{mailstack.interfaces.IOutboundTransform}), on by default
(C{--dkim-sign yes}).

The dispatcher runs transforms once per message, before it is queued, so
a message is signed once, whatever the number of delivery attempts.  Which
messages are signed:

 - mail our own senders sent: submission (C{submission}, C{submissions}),
   C{mailstack sendmail} (C{local}), and mail the receiving MTA relays for
   a client in C{--relay-networks};
 - delivery status notifications we make (C{bounce});
 - and of those, only the ones whose From domain (RFC 5322.From, the
   identifier DMARC aligns with) is a local domain with an active key set
   (C{mailstack dkim keygen}); mail without such a key passes untouched.

Mail that came from the internet and is forwarded (an alias to a remote
address) is never signed, whatever its From says: signing it would vouch
for a stranger's message.  Reading the keys and signing (RSA in pure
Python, ~40 ms; hashing the body) run in a worker thread, never on the
reactor thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any

from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from mailstack.interfaces import IOutboundTransform
from mailstack.mailauth.dkim import sign_message
from mailstack.message import Envelope, MessageSpool

log = Logger()

#: Origins whose mail is ours to sign (see the module docstring).
SIGNED_ORIGINS = frozenset({"submission", "submissions", "local", "bounce"})

_CLIENT_IP = re.compile(r"\[([^\]]*)\]:\d+$")
_TAG = re.compile(rb"[;\s]([ds])=([^;\s]*)")


def client_ip(client: str) -> str | None:
    """
    The address in an envelope's C{client} (C{name[ip]:port}), or C{None}.
    """
    match = _CLIENT_IP.search(client)
    return match.group(1) if match else None


def split_fields(header: bytes) -> list[bytes]:
    """
    Header fields (with their continuation lines), one item each, without
    the final line end.
    """
    fields: list[bytes] = []
    for line in header.splitlines(keepends=True):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1] += line
        elif line.strip():
            fields.append(line)
    return [f.rstrip(b"\r\n") for f in fields]


@implementer(IOutboundTransform)
class DKIMSigningTransform:
    """
    Prepends the two C{DKIM-Signature} fields (C{rsa-sha256} and
    C{ed25519-sha256}, L{mailstack.mailauth.dkim.DKIMSigner}) to mail of ours.

    @param config: returns the running L{mailstack.config.Config} (its
        data directory, local domains and relay networks; a reload's new
        values apply to the next message).  The keys are read for each
        message, so a rotation (C{mailstack dkim activate}) takes effect
        at once.
    @param reactor: the reactor.
    @param threadpool: where signing runs (the reactor's by default).
    """

    name = "dkim-sign"
    timeout = 120.0  # hashing a 25 MiB body in Python takes seconds

    def __init__(self, config: Callable[[], Any], reactor: Any, threadpool: Any = None) -> None:
        self.config = config
        self.data_dir = os.path.abspath(config().data_dir)  # not reloadable
        self.reactor = reactor
        self.threadpool = threadpool

    def ours(self, envelope: Envelope) -> bool:
        """
        Whether C{envelope}'s message was sent by one of our own senders
        (or is our bounce), so that signing it is right.
        """
        if envelope.origin in SIGNED_ORIGINS:
            return True
        networks = self.config().relay_networks
        if envelope.origin != "smtp" or not networks:
            return False
        try:
            address = ipaddress.ip_address(client_ip(envelope.client) or "")
        except ValueError:
            return False
        return any(address in network for network in networks)

    async def transform(self, envelope: Envelope, spool: MessageSpool) -> list[bytes]:
        if not self.ours(envelope):
            return []
        config = self.config()
        threadpool = self.threadpool or self.reactor.getThreadPool()
        signatures = await deferToThreadPool(self.reactor, threadpool, self._sign, spool,
                                             tuple(config.domains))
        fields = split_fields(signatures)
        if fields:
            tags = [dict(_TAG.findall(b" " + f.partition(b":")[2])) for f in fields]
            log.info("{qid}: dkim-sign: d={domain} s={selectors}", qid=envelope.queue_id,
                     domain=tags[0].get(b"d", b"").decode("ascii", "replace"),
                     selectors=",".join(t.get(b"s", b"").decode("ascii", "replace")
                                        for t in tags))
        return fields

    def _sign(self, spool: MessageSpool, domains: tuple[str, ...]) -> bytes:
        return sign_message(self.data_dir, spool.read(), domains)


__all__ = ["DKIMSigningTransform", "SIGNED_ORIGINS", "client_ip", "split_fields"]
