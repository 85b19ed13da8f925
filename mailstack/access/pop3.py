# -*- test-case-name: tests.test_pop3 -*-
"""
POP3 over the Maildirs: Twisted's C{POP3} parser with what it lacks.

  - STLS (RFC 2595), which Twisted does not have: whatever the client sent
    after it in clear text is dropped, like STARTTLS on SMTP;
  - USER/PASS only inside TLS; no APOP (it needs recoverable passwords);
  - RETR and TOP byte-stuffed by L{DotStuffer}, which keeps its line-start
    state across chunks (Twisted's stuffs each chunk on its own);
  - DELE takes effect at QUIT only; an interrupted session deletes nothing;
  - failed logins are throttled like SMTP AUTH.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.cred.portal import Portal
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.access.maildir import MaildirMessage
from mailstack.smtp.client import DotStuffer
from mailstack.sockets import set_nodelay
from mailstack.throttle import LoginThrottle

log = Logger()


@implementer(pop3.IMailbox)
class MaildirMailbox:
    """
    One user's INBOX, as listed when the session logged in (RFC 1939: the
    message numbers do not change during a session).
    """

    def __init__(self, messages: list[MaildirMessage]) -> None:
        self.messages = messages

    def _message(self, index: int) -> MaildirMessage:
        if not 0 <= index < len(self.messages):
            raise ValueError(index)
        return self.messages[index]

    def listMessages(self, index: int | None = None) -> Any:
        if index is None:
            return [0 if m.deleted else m.size for m in self.messages]
        message = self._message(index)
        return 0 if message.deleted else message.size

    def getMessage(self, index: int) -> Any:
        message = self._message(index)
        if message.deleted:
            raise ValueError(index)
        return open(message.path, "rb")

    def getUidl(self, index: int) -> bytes:
        message = self._message(index)
        if message.deleted:
            raise ValueError(index)
        return message.uid.encode("ascii", "replace")

    def deleteMessage(self, index: int) -> None:
        self._message(index).deleted = True

    def undeleteMessages(self) -> None:
        for message in self.messages:
            message.deleted = False

    def sync(self) -> None:
        for message in self.messages:
            if message.deleted:
                try:
                    os.unlink(message.path)
                except FileNotFoundError:
                    pass  # another session deleted it first: the same outcome


class POP3Server(pop3.POP3):
    """
    One POP3 session; see the module docstring.
    """

    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"APOP", b"AUTH", b"RPOP", b"QUIT", b"STLS"]
    MAX_LENGTH = 512
    factory: "POP3Factory"

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.portal = self.factory.portal
        self.challengers = {}
        self.tls = self.factory.implicit_tls
        self.callLater = self.factory.reactor.callLater  # type: ignore[assignment]
        self.timeOut = self.factory.timeout
        self._stuffer = DotStuffer()
        self._after_stls = False
        peer = self.transport.getPeer()
        self.client = f"[{getattr(peer, 'host', '?')}]:{getattr(peer, 'port', 0)}"
        log.info("pop3: connect from {client}", client=self.client)
        super().connectionMade()

    def generateMagic(self) -> bytes:
        return b"<mailstack>"  # no APOP: no timestamp to give away

    def successResponse(self, message: Any = "") -> None:
        super().successResponse(message.encode() if isinstance(message, str) else message)

    def failResponse(self, message: Any = b"") -> None:
        super().failResponse(message.encode() if isinstance(message, str) else message)

    def listCapabilities(self) -> list[bytes]:
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"IMPLEMENTATION mailstack"]
        if self.tls:
            caps.append(b"USER")
        elif self.factory.tls is not None:
            caps.append(b"STLS")
        return caps

    def dataReceived(self, data: bytes) -> None:
        self._after_stls = False
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> Any:
        # LineOnlyReceiver has already split the whole packet: the lines that
        # came after STLS in it must not run inside TLS (CVE-2011-0411).
        if self._after_stls:
            return None
        return super().lineReceived(line)

    def do_STLS(self) -> None:
        if self.tls or self.factory.tls is None:
            self.failResponse("STLS not available")
            return
        self.successResponse("Begin TLS negotiation")
        log.info("pop3: STLS from {client}", client=self.client)
        self._buffer = b""
        self._after_stls = True
        self.transport.startTLS(self.factory.tls())
        self.tls = True
        self._userIs = None

    def do_USER(self, user: bytes) -> None:
        if not self.tls:
            self.failResponse("[AUTH] Use STLS first: no passwords in clear text")
            return
        super().do_USER(user)

    def do_PASS(self, password: bytes, *words: bytes) -> Any:
        if not self.tls:
            self.failResponse("[AUTH] Use STLS first: no passwords in clear text")
            return None
        throttle = self.factory.throttle
        ip = self.transport.getPeer().host
        if throttle.blocked(ip):
            self.failResponse("[SYS/TEMP] Too many failed logins, try again later")
            self.transport.loseConnection()
            return None
        self._login_user = (self._userIs or b"").decode("utf-8", "replace")
        return super().do_PASS(password, *words)

    def do_APOP(self, user: bytes, digest: bytes) -> None:
        self.failResponse("APOP is not offered")

    def _cbMailbox(self, result: Any, user: bytes) -> None:
        log.info("pop3: login of {user} from {client}", user=user.decode("utf-8", "replace"),
                 client=self.client)
        super()._cbMailbox(result, user)

    def _ebMailbox(self, failure: Any) -> None:
        user = getattr(self, "_login_user", "")
        self.factory.throttle.failed(self.transport.getPeer().host, user or None)
        log.warn("pop3: failed login from {client}", client=self.client)
        self.failResponse("[AUTH] Authentication failed")

    def do_QUIT(self) -> Any:
        """
        Apply the DELEs in a worker thread (there may be thousands of
        unlinks), then say goodbye (RFC 1939 UPDATE state).
        """
        mbox, self.mbox = self.mbox, None
        if mbox is None:
            return super().do_QUIT()
        d = deferToThreadPool(self.factory.reactor, self.factory.pool, mbox.sync)

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                log.failure("pop3: cannot remove deleted messages", result)
                self.failResponse("[SYS/TEMP] some messages were not removed")
            else:
                self.successResponse()
            self.transport.loseConnection()

        return self._longOperation(d.addBoth(done))

    def do_RETR(self, i: bytes) -> Any:
        self._stuffer = DotStuffer()
        return super().do_RETR(i)

    def do_TOP(self, i: bytes, size: bytes) -> Any:
        self._stuffer = DotStuffer()
        return super().do_TOP(i, size)

    def transformChunk(self, chunk: bytes) -> bytes:
        return self._stuffer(chunk)

    def connectionLost(self, reason: Any = None) -> None:
        log.info("pop3: disconnect from {client}", client=self.client)
        self.mbox = None  # an interrupted session deletes nothing
        super().connectionLost(reason)


class POP3Factory(Factory):
    protocol = POP3Server
    noisy = False

    def __init__(self, portal: Portal, reactor: Any, pool: Any, throttle: LoginThrottle,
                 tls: Any = None, implicit_tls: bool = False, timeout: float = 600) -> None:
        self.portal = portal
        self.reactor = reactor
        self.pool = pool
        self.throttle = throttle
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.timeout = timeout
