# -*- test-case-name: tests.test_pop3 -*-
"""
POP3 over the Maildirs: Twisted's C{POP3} parser with what it lacks.

  - STLS (RFC 2595), which Twisted does not have: whatever the client sent
    after it in clear text is dropped, like STARTTLS on SMTP;
  - USER/PASS only inside TLS; no APOP (it needs recoverable passwords);
  - RETR and TOP byte-stuffed by L{DotStuffer}, which keeps its line-start
    state across chunks (Twisted's stuffs each chunk on its own), and sent
    as one write when the message fits in one read; TOP cut by L{TopCut}
    (Twisted's dropped a last body line without LF); a message removed by
    another session answers -ERR (Twisted's sent nothing);
  - DELE takes effect at QUIT only; an interrupted session deletes nothing;
  - logins go through the same throttle as SMTP AUTH, before any hash.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Any

from twisted.cred.error import LoginDenied, LoginFailed
from twisted.cred.portal import Portal
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import pop3
from twisted.internet.protocol import Factory
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.access.limits import AccessLimits
from mailstack.access.scan import MaildirMessage, find_renamed
from mailstack.logsafe import safe
from mailstack.nofollow import SymlinkRefused, open_file
from mailstack.reactors import IMailReactor
from mailstack.sockets import set_nodelay
from mailstack.throttle import LoginThrottle, LoginUnavailable
from mailstack.transport import IConnection
from mailstack.twisted_privates import discard_buffered_input, forget_pop3_user, pop3_pending_user
from mailstack.wire import DotStuffer

log = Logger()


class AlreadyDeleted(ValueError):
    """
    DELE of a message already marked deleted in this session.
    """


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
        if message.deleted:
            raise ValueError(index)  # RFC 1939: a deleted message is no message
        return message.size

    def getMessage(self, index: int) -> Any:
        message = self._message(index)
        if message.deleted:
            raise ValueError(index)
        # FileNotFoundError for a message removed under the session (the
        # server answers -ERR [SYS/PERM] and goes on).
        try:
            try:
                return open_file(message.path)
            except FileNotFoundError:
                # Renamed by another session (IMAP flags), or removed.
                if _find(message) is None:
                    raise
                return open_file(message.path)
        except SymlinkRefused as e:
            log.warn("pop3: not serving {path}: {error}", path=e.filename, error=e.strerror)
            raise ValueError(index) from None

    def getUidl(self, index: int) -> bytes:
        message = self._message(index)
        if message.deleted:
            raise ValueError(index)
        return message.uid.encode("ascii", "replace")

    def deleteMessage(self, index: int) -> None:
        message = self._message(index)
        if message.deleted:
            raise AlreadyDeleted(index)
        message.deleted = True

    def live(self) -> list[tuple[int, MaildirMessage]]:
        """
        The messages not marked deleted, with their 1-based numbers.
        """
        return [(n, m) for n, m in enumerate(self.messages, 1) if not m.deleted]

    def undeleteMessages(self) -> None:
        for message in self.messages:
            message.deleted = False

    def sync(self) -> None:
        for message in self.messages:
            if not message.deleted:
                continue
            try:
                os.unlink(message.path)
            except FileNotFoundError:
                # Renamed by another session (IMAP flags): removed under its
                # new name; a message gone already is the same outcome.
                if _find(message) is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(message.path)


def _find(message: MaildirMessage) -> str | None:
    """
    Find a message whose file is no longer where the session listed it
    (L{find_renamed}).

    @return: its path now (also stored in C{message.path}), or C{None} if
        it is gone.
    """
    root = os.path.dirname(os.path.dirname(message.path))
    found = find_renamed(root, message.uid)
    if found is None:
        return None
    message.path = os.path.join(root, *found)
    return message.path


class POP3Server(pop3.POP3):
    """
    One POP3 session; see the module docstring.
    """

    transport: IConnection  # once connected: see mailstack.transport

    AUTH_CMDS = [b"CAPA", b"USER", b"PASS", b"APOP", b"AUTH", b"RPOP", b"QUIT", b"STLS"]
    MAX_LENGTH = 512
    # Twisted's POP3 declares these as class attributes `= None` (and
    # timeOut `= 300`), which mypy reads as their only type; the session
    # sets them in connectionMade and login.
    factory: POP3Factory  # type: ignore[assignment]
    portal: Portal  # type: ignore[assignment]
    mbox: pop3.IMailbox | None  # type: ignore[assignment]
    blocked: list[tuple[bytes, tuple[bytes, ...]]] | None  # type: ignore[assignment]
    timeOut: float  # type: ignore[assignment]
    _userIs: bytes | None  # type: ignore[assignment]
    challengers: dict[bytes, Any]

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.portal = self.factory.portal
        self.challengers = {}
        self.tls = self.factory.implicit_tls
        # TimeoutMixin types callLater as the global reactor's method.
        self.callLater = self.factory.reactor.callLater  # type: ignore[assignment]
        self.limits = self.factory.limits
        self.timeOut = self.factory.timeout
        self._blocked_bytes = 0
        self._reading_paused = False
        self._errors = 0
        self._abort_call: Any = None
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
        if self._after_stls or self.transport.disconnecting:
            return None
        if self.blocked is not None:
            # A command runs: stop reading, keep what was read, up to a cap.
            self._blocked_bytes += len(line) + 2
            if not self._reading_paused:
                self._reading_paused = True
                self.transport.pauseProducing()
            if self._blocked_bytes > self.limits.max_buffered:
                log.warn("pop3: {client} sent more than {cap} bytes while a command ran; "
                         "closed", client=self.client, cap=self.limits.max_buffered)
                self.blocked = []
                self._close(b"-ERR Too much input while a command runs")
                return None
        return super().lineReceived(line)

    def _unblock(self, _: Any) -> None:
        super()._unblock(_)
        if self.blocked is None:
            self._blocked_bytes = 0
            if self._reading_paused:
                self._reading_paused = False
                self.transport.resumeProducing()

    def _longOperation(self, d: Any) -> Any:
        # Twisted stops the idle timer during a long operation, so a client
        # that never reads its RETR holds the session forever; here the
        # timer runs on, and every chunk the client takes resets it.
        self.blocked = []

        def unblock(result: Any) -> Any:
            self._unblock(None)
            return result

        return d.addBoth(unblock)

    def _close(self, goodbye: bytes) -> None:
        if self.transport.disconnecting:
            return
        self.sendLine(goodbye)
        self.transport.pauseProducing()  # read nothing more
        self.transport.loseConnection()
        self._abort_call = self.factory.reactor.callLater(self.limits.close_grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        self.transport.abortConnection()

    def do_DELE(self, i: bytes) -> None:
        try:
            index = int(i) - 1
            if index < 0 or self.mbox is None:
                raise ValueError(i)
            self.mbox.deleteMessage(index)
        except AlreadyDeleted:
            self.failResponse(f"message {index + 1} already deleted")
            return
        except ValueError:
            self.failResponse("Bad message number argument")
            return
        self.successResponse()

    # RFC 1939: messages marked deleted are not counted by STAT nor listed
    # by LIST and UIDL (Twisted's POP3 counts them, lists them with size 0,
    # and its UIDL breaks off with an error in the middle of the listing).

    def do_STAT(self) -> Any:
        if not isinstance(self.mbox, MaildirMailbox):
            return super().do_STAT()
        live = self.mbox.live()
        self.successResponse(b"%d %d" % (len(live), sum(m.size for _, m in live)))
        return None

    def do_LIST(self, i: bytes | None = None) -> Any:
        if i is not None or not isinstance(self.mbox, MaildirMailbox):
            return super().do_LIST(i)
        live = self.mbox.live()
        self.successResponse(b"%d" % len(live))
        self.transport.writeSequence([b"%d %d\r\n" % (n, m.size) for n, m in live]
                                     + [b".\r\n"])
        return None

    def do_UIDL(self, i: bytes | None = None) -> Any:
        if i is not None or not isinstance(self.mbox, MaildirMailbox):
            return super().do_UIDL(i)
        self.successResponse()
        self.transport.writeSequence(
            [b"%d %s\r\n" % (n, m.uid.encode("ascii", "replace")) for n, m in self.mbox.live()]
            + [b".\r\n"])
        return None

    def timeoutConnection(self) -> None:
        log.info("pop3: {client} idle for too long; closed", client=self.client)
        self._close(b"-ERR Autologout; idle for too long")

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("pop3: line over {max} bytes from {client}; closed", max=self.MAX_LENGTH,
                 client=self.client)
        self._close(b"-ERR Line too long")

    def state_COMMAND(self, line: bytes) -> Any:
        """
        Run one command; a malformed one gets C{-ERR} and the session goes
        on (RFC 1939), never exception text; an error of ours is logged.
        """
        if self.blocked is not None:
            self.blocked.append((line, ()))
            return None
        words = line.split(b" ")
        command = words[0].upper()
        name = command.decode("ascii", "replace")
        handler = getattr(self, "do_" + name, None) if name.isalpha() else None
        if handler is None:
            self._refuse("Unknown command")
            return None
        if not self.mbox and command not in self.AUTH_CMDS:
            self._refuse("Log in first")
            return None
        if self.mbox and command in (b"USER", b"PASS", b"APOP", b"AUTH", b"STLS"):
            self._refuse("Already logged in")
            return None
        args = words[1:]
        if command == b"PASS":
            args = [b" ".join(args)] if args else []
        if not _accepts(handler, len(args)):
            self._refuse(f"Syntax error in {name}")
            return None
        self._errors = 0
        try:
            result = handler(*args)
        except Exception:  # noqa: BLE001 - any command's failure is answered -ERR and logged, never fatal
            log.failure("pop3: {command} failed for {client}", command=name,
                        client=self.client)
            self.failResponse("[SYS/TEMP] Internal error; see the server log")
            return None
        if isinstance(result, defer.Deferred):
            result.addErrback(self._unexpected, name)
        return result

    def processCommand(self, command: bytes, *args: bytes) -> Any:
        if self.blocked is not None:
            self.blocked.append((command, args))
            return None
        return self.state_COMMAND(b" ".join((command,) + args))

    def _refuse(self, text: str) -> None:
        self._errors += 1
        self.failResponse(text)
        if self._errors >= self.limits.max_bad_commands:
            log.warn("pop3: {client} sent {n} invalid commands in a row; closed",
                     client=self.client, n=self._errors)
            self._close(b"-ERR Too many invalid commands")

    def _unexpected(self, failure: Failure, name: str) -> None:
        log.failure("pop3: {command} failed for {client}", failure, command=name,
                    client=self.client)
        self.failResponse("[SYS/TEMP] Internal error; see the server log")

    def _ebUnexpected(self, failure: Failure) -> None:
        log.failure("pop3: login failed unexpectedly for {client}", failure,
                    client=self.client)
        self.failResponse("[SYS/TEMP] Internal error; see the server log")

    def do_STLS(self) -> None:
        if self.tls or self.factory.tls is None:
            self.failResponse("STLS not available")
            return
        self.successResponse("Begin TLS negotiation")
        log.info("pop3: STLS from {client}", client=self.client)
        discard_buffered_input(self)
        self._after_stls = True
        self.transport.startTLS(self.factory.tls())
        self.tls = True
        forget_pop3_user(self)

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
        user = pop3_pending_user(self)
        if user is None:
            self.failResponse("USER required before PASS")
            return None
        forget_pop3_user(self)
        self._login_user = user.decode("utf-8", "replace")
        password = b" ".join((password,) + words)
        d = defer.maybeDeferred(self.authenticateUserPASS, user, password)
        d.addCallbacks(self._cbMailbox, self._ebMailbox, callbackArgs=(user,))
        d.addErrback(self._ebUnexpected)
        # Later commands wait for the answer (and the session stops reading).
        return self._longOperation(d)

    def do_APOP(self, user: bytes, digest: bytes) -> None:
        self.failResponse("APOP is not offered")

    def authenticateUserPASS(self, user: bytes, password: bytes) -> Deferred[Any]:
        """
        The login goes through the shared throttle, before any hash.
        """
        return Deferred.fromCoroutine(self.factory.throttle.attempt(
            self.transport.getPeer().host, user,
            lambda: pop3.POP3.authenticateUserPASS(self, user, password), password))

    def _cbMailbox(self, result: Any, user: bytes) -> None:
        log.info("pop3: login of {user} from {client}", user=safe(user, 100),
                 client=self.client)
        super()._cbMailbox(result, user)

    def _ebMailbox(self, failure: Any) -> None:
        user = safe(getattr(self, "_login_user", ""), 100)
        if failure.check(LoginUnavailable):
            log.warn("pop3: login for {user} from {client} refused: {reason}", user=user,
                     client=self.client, reason=failure.value)
            if failure.value.disconnect:
                self.failResponse("[SYS/TEMP] Too many failed logins, try again later")
                self.transport.loseConnection()
            else:
                self.failResponse("[SYS/TEMP] Temporary authentication failure, "
                                  "try again later")
            return
        failure.trap(LoginDenied, LoginFailed)  # anything else: the generic error path
        log.warn("pop3: failed login for {user} from {client}", user=user, client=self.client)
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

    # RETR and TOP (issue 18).  Twisted sends a message as three writes
    # (the +OK line, the content through a FileSender pulled by a
    # cooperator task, the terminator), each its own TLS record and
    # reactor turn; here a message that fits in one read goes out as a
    # single write, and a larger one is read in chunks on the thread pool
    # while the client keeps up.
    CHUNK = 65536
    # A message listed at most this size is read on the reactor thread in
    # one read (what Twisted's FileSender did for every chunk); a larger
    # one is opened and read on the thread pool.
    inline_read_max = 65536

    def do_RETR(self, i: bytes) -> Any:
        return self._send_message(i, None)

    def do_TOP(self, i: bytes, size: bytes) -> Any:
        try:
            lines = int(size)
            if lines < 0:
                raise ValueError(lines)
        except ValueError:
            self.failResponse("Bad line count argument")
            return None
        return self._send_message(i, lines)

    def _send_message(self, i: bytes, lines: int | None) -> Any:
        assert self.mbox is not None
        try:
            index = int(i) - 1
            if index < 0:
                raise ValueError(index)
            size = self.mbox.listMessages(index)
        except (ValueError, IndexError):
            self.failResponse("Bad message number argument")
            return None
        self._highest = max(self._highest, index + 1)
        top = None if lines is None else TopCut(lines)
        stuffer = DotStuffer()
        head = b"+OK %d octets" % size if top is None else b"+OK Top of message follows"
        if isinstance(size, int) and size <= self.inline_read_max:
            d: Deferred[Any] = defer.maybeDeferred(_open_and_read, self.mbox, index, self.CHUNK)
        else:
            d = deferToThreadPool(self.factory.reactor, self.factory.pool,
                                  _open_and_read, self.mbox, index, self.CHUNK)

        def opened(result: tuple[Any, bytes]) -> Any:
            f, chunk = result
            out = stuffer(chunk)
            if top is not None:
                out = top(out)
            if len(chunk) < self.CHUNK or (top is not None and top.done):
                f.close()
                end = b".\r\n" if top is not None and top.done else stuffer.finish()
                self.transport.write(head + b"\r\n" + out + end)
                return None
            self.transport.write(head + b"\r\n" + out)
            return self._stream(f, stuffer, top)

        def failed(failure: Failure) -> None:
            if failure.check(FileNotFoundError):
                log.info("pop3: {client}: message {n} went away before it was read",
                         client=self.client, n=index + 1)
                self.failResponse("[SYS/PERM] message no longer exists")
            elif failure.check(ValueError):
                self.failResponse("Bad message number argument")
            elif failure.check(OSError):
                log.warn("pop3: {client}: cannot read message {n}: {error}",
                         client=self.client, n=index + 1, error=safe(str(failure.value)))
                self.failResponse("[SYS/TEMP] cannot read the message now")
            else:
                log.failure("pop3: {client}: sending message {n}", failure,
                            client=self.client, n=index + 1)
                self.transport.loseConnection()

        return self._longOperation(d.addCallbacks(opened, failed))

    @defer.inlineCallbacks
    def _stream(self, f: Any, stuffer: DotStuffer, top: TopCut | None) -> Any:
        """
        Send the rest of a message larger than one chunk: each chunk read on
        the thread pool, the next read only once the transport has taken
        the last write (a client that does not read holds one chunk).
        """
        sender = _Pacer()
        self.transport.registerProducer(sender, True)
        try:
            while True:
                if sender.paused:
                    yield sender.wait()
                if sender.stopped:
                    return
                chunk = yield deferToThreadPool(self.factory.reactor, self.factory.pool,
                                                f.read, self.CHUNK)
                if self.transport.disconnecting or sender.stopped:
                    return
                self.resetTimeout()  # the client is reading: not idle
                out = stuffer(chunk)
                if top is not None:
                    out = top(out)
                if not chunk or top is not None and top.done:
                    end = b".\r\n" if top is not None and top.done else stuffer.finish()
                    self.transport.write(out + end)
                    return
                self.transport.write(out)
        except OSError as e:
            log.warn("pop3: {client}: reading a message failed: {error}; closed",
                     client=self.client, error=safe(str(e)))
            self.transport.loseConnection()  # the answer is cut: no way to say so
        finally:
            self.transport.unregisterProducer()
            f.close()

    def connectionLost(self, reason: Any = None) -> None:
        log.info("pop3: disconnect from {client}", client=self.client)
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self.mbox = None  # an interrupted session deletes nothing
        super().connectionLost(reason)


def _open_and_read(mbox: pop3.IMailbox, index: int, size: int) -> tuple[Any, bytes]:
    """
    Open message C{index} of C{mbox} and read its first C{size} bytes.

    @return: the open file and what was read.
    """
    f = mbox.getMessage(index)
    try:
        return f, f.read(size)
    except BaseException:
        f.close()
        raise


class TopCut:
    """
    Cuts stuffed CRLF content after the header, the blank line after it
    and C{lines} lines of the body (RFC 1939 TOP), however the content is
    cut into chunks.  Content without a blank line is all header and is
    sent whole.

    The input is L{DotStuffer}'s output, whose CRLFs are never split
    between two chunks, so a blank line is a C{CRLF} at a line start.

    @ivar done: the cut is reached: nothing more is to be sent.
    """

    def __init__(self, lines: int) -> None:
        self.lines = lines
        self.in_header = True
        self.done = False
        self._line_start = True  # the last chunk ended with CRLF

    def __call__(self, out: bytes) -> bytes:
        """
        @param out: the next chunk of stuffed content.
        @return: the part of it to send.
        """
        if self.done or not out:
            return b""
        start = 0
        if self.in_header:
            if self._line_start and out.startswith(b"\r\n"):
                start = 2
            else:
                found = out.find(b"\r\n\r\n")
                if found < 0:
                    self._line_start = out.endswith(b"\r\n")
                    return out
                start = found + 4
            self.in_header = False
        if self.lines == 0:
            self.done = True
            return out[:start]
        if out.count(b"\n", start) < self.lines:
            self.lines -= out.count(b"\n", start)
            return out
        end = start
        while self.lines:
            end = out.index(b"\n", end) + 1
            self.lines -= 1
        self.done = True
        return out[:end]


@implementer(IPushProducer)
class _Pacer:
    """
    The producer a long RETR registers: remembers whether the transport
    wants it to pause, and wakes the sending loop when it may go on.
    """

    def __init__(self) -> None:
        self.paused = False
        self.stopped = False
        self._waiting: Deferred[None] | None = None

    def wait(self) -> Deferred[None]:
        """
        @return: a Deferred that fires when the transport resumes or stops.
        """
        self._waiting = Deferred()
        return self._waiting

    def _wake(self) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            waiting.callback(None)

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        self._wake()

    def stopProducing(self) -> None:
        self.stopped = True
        self._wake()


class POP3Factory(Factory[POP3Server]):
    protocol = POP3Server
    noisy = False

    def __init__(self, portal: Portal, reactor: IMailReactor, pool: ThreadPool,
                 throttle: LoginThrottle,
                 tls: Any = None, implicit_tls: bool = False, timeout: float | None = None,
                 limits: AccessLimits = AccessLimits()) -> None:
        self.portal = portal
        self.limits = limits
        self.reactor = reactor
        self.pool = pool
        self.throttle = throttle
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.timeout = limits.pop3_timeout if timeout is None else timeout


def _accepts(handler: Any, count: int) -> bool:
    """
    Whether C{handler} takes C{count} positional arguments.
    """
    try:
        inspect.signature(handler).bind(*([b""] * count))
    except TypeError:
        return False
    return True
