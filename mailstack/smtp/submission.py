# -*- test-case-name: tests.test_submission -*-
"""
The submission policy (RFC 6409): mail from our own users' clients.

  - AUTH PLAIN and LOGIN (RFC 4954), offered and accepted only over TLS;
  - MAIL and RCPT need AUTH; the envelope sender must belong to the user
    (their address, its plus-addresses, or an alias that reaches them),
    and so must every C{From:} address in a local domain;
  - recipients anywhere: local ones through the router, remote ones to
    the outbound queue;
  - a missing C{Message-ID:} or C{Date:} is added (RFC 6409 8);
  - logins go through the shared L{LoginThrottle} before any password is
    hashed (per client network and per user; see L{mailstack.throttle}).
"""

from __future__ import annotations

import base64
import binascii
import re
import secrets
from email.utils import getaddresses
from typing import Any

from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

from mailstack.address import Address, AddressError, parse_address
from mailstack.clock import wall_seconds
from mailstack.delivery.router import AliasLoop, EmptyResolution, Resolution, UnknownRecipient
from mailstack.logsafe import safe
from mailstack.mailauth.header import header_end
from mailstack.mailauth.lookup import to_alabel
from mailstack.message import Envelope, MessageSpool, rfc5322_date
from mailstack.smtp.policy import ReceivingPolicy
from mailstack.smtp.reply import Reply, SMTPError
from mailstack.throttle import LoginThrottle, LoginUnavailable

log = Logger()

MECHANISMS = ("PLAIN", "LOGIN")
NEED_TLS = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
NEED_AUTH = Reply(530, "5.7.0", "Authentication required")


def _from_values(spool: MessageSpool) -> list[bytes]:
    """
    The values of every C{From:} field in the header section of the
    message in C{spool} (the whole section, where the DKIM signer looks,
    L{mailstack.mailauth.header.header_end}), unfolded; lenient where the
    signer is strict, so it finds at least what the signer finds.  In a
    worker thread: it reads the spool.
    """
    message = spool.read()
    values: list[bytes] = []
    current = False
    for line in re.split(rb"\r?\n", message[:header_end(message)]):
        if line[:1] in (b" ", b"\t"):
            if current:
                values[-1] += line
            continue
        name, colon, value = line.partition(b":")
        current = bool(colon) and name.strip().lower() == b"from"
        if current:
            values.append(value)
    return values


class _Cancelled(Exception):
    """
    The client answered a SASL challenge with C{*}.
    """


def _decode(line: str, empty_ok: bool = False) -> bytes:
    """
    Decode one base64 SASL response; C{*} cancels (RFC 4954 4).
    """
    line = line.strip()
    if line == "*":
        raise _Cancelled()
    if line == "=" and empty_ok:
        return b""
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise SMTPError(501, "5.5.2", "Error: cannot decode response") from None


class SubmissionPolicy(ReceivingPolicy):
    """
    Mail from authenticated local users, to anywhere.
    """

    def __init__(
        self,
        dispatcher: Any,
        checker: Any,
        throttle: LoginThrottle,
        clock: IReactorTime,
        hostname: str,
    ) -> None:
        super().__init__(dispatcher)
        self.checker = checker
        self.throttle = throttle
        self.clock = clock
        self.hostname = hostname

    def connect(self, session: Any) -> Reply | None:
        if self.throttle.blocked(session.peer_host):
            log.info("refused {client}: too many failed logins", client=session.client)
            return Reply(421, "4.7.0", f"{self.hostname} Error: too many failed logins, "
                                       "try again later")
        return None

    def extensions(self, session: Any) -> list[str]:
        return [f"AUTH {' '.join(MECHANISMS)}"] if session.tls else []

    # AUTH

    def auth(self, protocol: Any, arg: str) -> Any:
        return Deferred.fromCoroutine(self._auth(protocol, arg))

    async def _auth(self, protocol: Any, arg: str) -> Reply:
        session = protocol.session
        if not session.tls:
            return NEED_TLS
        if session.helo is None:
            return Reply(503, "5.5.1", "Error: send EHLO first")
        if session.user is not None:
            return Reply(503, "5.5.1", "Error: already authenticated")
        if protocol.envelope is not None:
            return Reply(503, "5.5.1", "Error: MAIL transaction in progress")
        mechanism, _, initial = arg.strip().partition(" ")
        mechanism = mechanism.upper()
        if not mechanism:
            return Reply(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        if mechanism not in MECHANISMS:
            return Reply(504, "5.5.4", "Error: unsupported authentication mechanism")
        try:
            username, password = await self._exchange(protocol, mechanism, initial.strip())
        except _Cancelled:
            return Reply(501, "5.0.0", "Error: authentication cancelled")
        except UnicodeDecodeError:
            return Reply(501, "5.5.2", "Error: cannot decode response")
        ip = session.peer_host
        user = safe(username, 100)
        credentials = UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))
        try:
            avatar = await self.throttle.attempt(
                ip, username, lambda: self.checker.requestAvatarId(credentials), password)
        except UnauthorizedLogin:
            log.warn("{client}: SASL {mechanism} authentication failed: user=<{user}>",
                     client=session.client, mechanism=mechanism, user=user)
            if self.throttle.blocked(ip):
                log.warn("{client}: too many failed logins; disconnecting",
                         client=session.client)
                return Reply(421, "4.7.0", f"{self.hostname} Error: too many failed logins")
            return Reply(535, "5.7.8", "Error: authentication credentials invalid")
        except LoginUnavailable as e:
            log.warn("{client}: SASL {mechanism} authentication refused: user=<{user}>: {reason}",
                     client=session.client, mechanism=mechanism, user=user, reason=e)
            if e.disconnect:
                return Reply(421, "4.7.0", f"{self.hostname} Error: too many failed logins")
            return Reply(454, "4.7.0", "Temporary authentication failure, try again later")
        if isinstance(avatar, bytes):  # a checker written to Twisted's contract
            avatar = avatar.decode("utf-8")
        session.user = parse_address(avatar)
        log.info("{client}: sasl_method={mechanism}, sasl_username={user}",
                 client=session.client, mechanism=mechanism, user=avatar)
        return Reply(235, "2.7.0", "Authentication successful")

    async def _exchange(self, protocol: Any, mechanism: str, initial: str) -> tuple[str, str]:
        if mechanism == "PLAIN":
            if initial:
                response = _decode(initial, empty_ok=True)
            else:
                response = _decode(await protocol.challenge(""))
            parts = response.split(b"\0")
            if len(parts) != 3:
                raise SMTPError(501, "5.5.2", "Error: malformed PLAIN response")
            authzid, authcid, password = (p.decode("utf-8") for p in parts)
            if authzid and authzid != authcid:
                # Acting as another user is not offered: treat as a failure.
                return authcid, "\0never matches\0"
            return authcid, password
        if initial:
            username = _decode(initial).decode("utf-8")
        else:
            username = _decode(await protocol.challenge("VXNlcm5hbWU6")).decode("utf-8")
        password = _decode(await protocol.challenge("UGFzc3dvcmQ6")).decode("utf-8")
        return username, password

    # The envelope

    def mail(self, session: Any, sender: Address | None) -> Deferred[Reply | None]:
        return Deferred.fromCoroutine(self._mail(session, sender))

    async def _mail(self, session: Any, sender: Address | None) -> Reply | None:
        if not session.tls:
            raise SMTPError(*NEED_TLS)
        if session.user is None:
            raise SMTPError(*NEED_AUTH)
        if sender is None:
            raise SMTPError(553, "5.7.1", "Error: the null sender is not allowed here")
        if not await self.owns(session.user, sender):
            log.info("reject: MAIL from {client}: <{sender}> not owned by {user}",
                     client=session.client, sender=safe(sender), user=session.user)
            raise SMTPError(553, "5.7.1", f"<{sender}>: Sender address rejected: "
                                          f"not owned by user {session.user}")
        return None

    async def owns(self, user: Address, sender: Address) -> bool:
        """
        Whether C{user} may use C{sender}: their address, a plus-address of
        it, or an alias that delivers to them.
        """
        key = sender.lower()
        if key == user or key.base == user:
            return True
        if not self.router.is_local(sender):
            return False
        try:
            resolution = await self.router.lookup(sender)
        except (UnknownRecipient, AliasLoop, EmptyResolution, AddressError):
            return False
        return any(local.user == user for local in resolution.local)

    def may_relay(self, session: Any) -> bool:
        return session.user is not None

    def rcpt(self, session: Any, envelope: Envelope, rcpt: Address) -> Deferred[Resolution]:
        if not session.tls:
            raise SMTPError(*NEED_TLS)
        if session.user is None:
            raise SMTPError(*NEED_AUTH)
        return super().rcpt(session, envelope, rcpt)

    async def header_senders_owned(self, session: Any, envelope: Envelope,
                                   spool: MessageSpool) -> None:
        """
        The addresses of the C{From:} fields (RFC 5322.From, what DKIM
        signs for and DMARC aligns with) that are in a local domain must
        belong to the user, as the envelope sender must: otherwise one user
        could send mail as another local user, signed with the domain's
        DKIM key (mox and maddy refuse it too).  Addresses of other domains
        pass: they are never signed here, and DMARC judges them at the
        receiver.

        @raise SMTPError: C{550 5.7.1} naming the address.
        """
        # Both views of the header: the spool's (its first 256 KiB) and
        # the whole header section, where the DKIM signer looks, so that no
        # From: hides from one of them (after a huge header, or as the last
        # line of a message without a body).
        raw = [value for name, _, value in
               (field.partition(b":") for field in spool.header_fields())
               if name.strip().lower() == b"from"]
        raw += await deferToThread(_from_values, spool)
        values = [value.decode("utf-8", "replace").replace("\r", "").replace("\n", "")
                  for value in raw]
        local = {d.lower().rstrip(".") for d in self.router.domains}
        checked = set()
        for _name, text in getaddresses(values):
            if text in checked:
                continue
            checked.add(text)
            domain = to_alabel(text.rpartition("@")[2]).rstrip(".")
            if not text or "@" not in text or domain not in local:
                continue
            try:
                owned = await self.owns(session.user, parse_address(text))
            except AddressError:
                owned = False
            if not owned:
                log.info("{qid}: reject: DATA from {client}: From: <{address}> not owned by "
                         "{user}", qid=envelope.queue_id, client=session.client,
                         address=safe(text), user=session.user)
                raise SMTPError(550, "5.7.1", f"<{text}>: From: header address rejected: "
                                              f"not owned by user {session.user}")

    def deliver(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._deliver(session, envelope, spool))

    async def _deliver(self, session: Any, envelope: Envelope, spool: MessageSpool) -> Any:
        await self.header_senders_owned(session, envelope, spool)
        names = set(spool.header_names())
        if "message-id" not in names:
            token = secrets.token_hex(8)
            spool.add_header(f"Message-ID: <{envelope.queue_id}.{token}@{self.hostname}>\n"
                             .encode("ascii"))
        if "date" not in names:
            spool.add_header(f"Date: {rfc5322_date(wall_seconds(self.clock))}\n".encode("ascii"))
        return await super().deliver(session, envelope, spool)
