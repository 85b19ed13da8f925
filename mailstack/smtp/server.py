# -*- test-case-name: tests.test_smtp_server -*-
"""
mailstack's ESMTP server protocol.

Not Twisted's C{ESMTP}: the audit in shared/notes shows it runs commands
pipelined after STARTTLS inside TLS, falls back to command mode in the
middle of DATA after a long line, buffers a line without CRLF without
bound, answers out of order when a check is asynchronous, and turns any
delivery failure into a permanent 550.  This class is a small explicit
state machine instead:

  - one command at a time: while a policy check or a delivery is pending,
    later commands wait in the buffer, so pipelined replies always come
    in order (RFC 2920), and input is paused as soon as there is any (at
    once if commands are already waiting; a client that waits for the
    reply costs no pause and resume, two C{epoll_ctl} calls each);
  - bounded buffers: a command line over 512 octets is answered
    C{500 5.5.2} and dropped as it arrives; DATA goes through
    L{DataReader}, the only place that decides where a message ends;
  - STARTTLS drops whatever the client sent after it in clear text and
    forgets HELO/EHLO and the transaction (CVE-2011-0411);
  - the policy (L{mailstack.smtp.policy}) decides who may send what to
    whom, and delivers; a failed delivery answers C{451}, never C{5xx}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from OpenSSL import SSL
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack import tally
from mailstack.address import Address, AddressError, parse_path
from mailstack.clock import wall_seconds
from mailstack.limits import CommandDeadline
from mailstack.logsafe import safe
from mailstack.message import Envelope, MessageSpool, new_queue_id, rfc5322_date
from mailstack.smtp.data import DataReader
from mailstack.smtp.rdns import client_name
from mailstack.smtp.reply import Reply, SMTPError
from mailstack.sockets import set_nodelay, write_now
from mailstack.transport import IConnection

log = Logger()

MAX_COMMAND_LINE = 512  # octets, with CRLF (RFC 5321 4.5.3.1.4)
MAX_AUTH_LINE = 12288  # octets, AUTH and its responses (RFC 4954 4)
MAX_PENDING_INPUT = 256 * 1024  # octets a client may send ahead while a command is pending
_HELO_NAME = re.compile(r"[A-Za-z0-9._:\-\[\]]{1,255}")


@dataclass
class ServerSettings:
    """
    What one SMTP listener needs to know besides its policy.
    """

    hostname: str
    max_message_size: int
    timeout: float = 300.0  # for each whole command; DATA: min_data_rate
    min_data_rate: float = 500.0  # octets per second (Postfix's smtpd_min_data_rate)
    max_recipients: int = 100
    # Postfix's smtpd_recipient_overshoot_limit: recipients refused past
    # max_recipients count as errors only beyond this many.
    recipient_overshoot: int = 1000
    # Postfix's smtpd_hard_error_limit: errors without a delivery; a
    # delivered message starts the count again.
    max_errors: int = 20
    max_hops: int = 50
    implicit_tls: bool = False
    name: str = "smtp"
    # A bare RCPT TO:<postmaster> (RFC 5321 4.5.1) means postmaster@ this
    # domain (the first local domain); None: the hostname.
    postmaster_domain: str | None = None


@dataclass
class Session:
    """
    What is known about the client of one connection.  Message filters get
    it (L{mailstack.interfaces.IMessageFilter}); for locally injected mail
    they get a L{mailstack.smtp.filters.LocalSession} with the same
    attributes.

    @ivar peer_host: the client's IP address as text (C{unix} on a UNIX
        socket).
    @ivar peer_port: the client's port (0 on a UNIX socket).
    @ivar service: the listener: C{smtp} (the receiving MTA),
        C{submission} or C{submissions}.
    @ivar helo: the name the client gave with HELO or EHLO (its own claim,
        unchecked), or C{None} before it and again after STARTTLS.
    @ivar esmtp: whether the client said EHLO.
    @ivar tls: whether the connection is encrypted (after STARTTLS, or
        implicit TLS).
    @ivar tls_info: not filled in by the SMTP server (empty).
    @ivar user: the authenticated user (a L{mailstack.address.Address})
        after AUTH on submission; C{None} before and on the receiving MTA.
    @ivar name: the client's forward-confirmed reverse DNS name, or
        C{unknown}.
    """

    peer_host: str
    peer_port: int
    service: str = "smtp"
    helo: str | None = None
    esmtp: bool = False
    tls: bool = False
    tls_info: str = ""
    user: Any = None
    name: str = "unknown"  # forward-confirmed reverse DNS (mailstack.smtp.rdns)

    @property
    def client(self) -> str:
        """
        C{name[ip]:port} for logs: the forward-confirmed reverse DNS name
        or C{unknown}, never the HELO name (the client's own claim).
        """
        return safe(f"{self.name}[{self.peer_host}]:{self.peer_port}")

    @property
    def protocol_name(self) -> str:
        """
        The C{with} clause of a Received header (RFC 3848).
        """
        name = "ESMTP" if self.esmtp else "SMTP"
        if self.tls:
            name += "S"
        if self.user is not None:
            name += "A"
        return name


def split_path(text: str) -> tuple[str, str]:
    """
    Split C{<path> PARAMS} into the bracketed path and the parameters, minding
    quoted local parts that hold C{>} or spaces.
    """
    if not text.startswith("<"):
        raise AddressError("the address must be in angle brackets")
    quoted = escaped = False
    for i, ch in enumerate(text):
        if escaped:
            escaped = False
        elif ch == "\\" and quoted:
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return text[: i + 1], text[i + 1 :].strip()
    raise AddressError("unterminated address")


def parse_params(text: str) -> dict[str, str | None]:
    """
    Parse C{KEY=VALUE KEY} ESMTP parameters; keys are uppercased.
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        key, eq, value = item.partition("=")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", key) or (eq and not value):
            raise SMTPError(501, "5.5.4", f"Bad parameter syntax: {item}")
        params[key.upper()] = value if eq else None
    return params


@implementer(IPushProducer)
class SMTPServer(Protocol):
    """
    One SMTP session; see the module docstring.  It is the push producer
    registered with its transport (see L{pauseProducing}).
    """

    transport: IConnection  # once connected: see mailstack.transport

    factory: "SMTPServerFactory"

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        settings = self.factory.settings
        self.settings = settings
        self.policy = self.factory.policy
        peer = self.transport.getPeer()
        self.session = Session(
            getattr(peer, "host", "unix"), getattr(peer, "port", 0), service=settings.name
        )
        self.session.tls = settings.implicit_tls
        self.envelope: Envelope | None = None
        self._buffer = b""
        self._discarding = False
        self._busy = False
        self._paused = False  # an answer is pending: no commands run, the clock stopped
        self._input_paused = False  # the transport paused (see _pause_input)
        self._challenge: Deferred[str] | None = None
        self._processing = False
        self._closed = False
        self._errors = 0
        self._uncounted = False  # the next reply is no client error (see _reply)
        self._overshoot = 0
        self._data: DataReader | None = None
        self._spool: MessageSpool | None = None
        # Not an idle timer that any byte resets: each whole command must
        # arrive in time, and DATA must keep a minimum rate.
        self._deadline = CommandDeadline(self.factory.clock, settings.timeout,
                                         self.timeoutConnection, settings.min_data_rate)
        self._deadline.start()
        # The transport says when its write buffer is full (a client that
        # pipelines without reading the replies): then no command runs, and
        # what it sends meanwhile counts against MAX_PENDING_INPUT.  (Not
        # pausing the transport: TLS pauses us in its handshake, which needs
        # to read.)
        self._output_full = False
        self.transport.registerProducer(self, True)
        self.factory.sessions.add(self)
        self._respond(self._connect(), self._greet)

    def _connect(self) -> Any:
        """
        The client's confirmed name first (if the factory has a resolver),
        then the policy's verdict on the connection.
        """
        def connected(_: Any = None) -> Any:
            log.info("connect from {client} ({service})", client=self.session.client,
                     service=self.settings.name)
            tally.session(self.settings.name)
            return maybeDeferred(self.policy.connect, self.session)

        if self.factory.resolver is None:
            return connected()

        def named(name: str) -> Any:
            self.session.name = name
            return connected()

        return client_name(self.factory.resolver, self.session.peer_host,
                           self.factory.clock).addCallback(named)

    def _greet(self, reply: Reply | None) -> Reply:
        if reply is not None and reply.is_error:
            self._close_after = True
            return reply
        return Reply(220, "", f"{self.settings.hostname} ESMTP mailstack")

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closed = True
        self.factory.sessions.discard(self)
        self._deadline.stop()
        if self._challenge is not None:
            d, self._challenge = self._challenge, None
            d.errback(ConnectionDone("connection lost during AUTH"))
        self._drop_transaction()
        log.info("disconnect from {client}", client=self.session.client)

    def timeoutConnection(self) -> None:
        if self._closed:
            return
        log.info("timeout after {state} from {client}",
                 state="DATA" if self._data else "command", client=self.session.client)
        self._send(Reply(421, "4.4.2", f"{self.settings.hostname} Error: timeout exceeded"))
        self._close()
        if self._output_full:
            self.transport.abortConnection()  # it does not read: the 421 would never go

    # IPushProducer, for the transport's write buffer

    def pauseProducing(self) -> None:
        self._output_full = True

    def resumeProducing(self) -> None:
        self._output_full = False
        if not self._closed:
            self._process()

    def stopProducing(self) -> None:
        pass  # the connection is going: connectionLost cleans up

    # Input

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        self._buffer += data
        if self._paused:
            self._pause_input()  # more input while an answer is pending: stop reading
        if self._data is not None:
            self._deadline.credit(len(data))
        if (self._busy and self._challenge is None or self._output_full) and \
                len(self._buffer) > MAX_PENDING_INPUT:
            # Input should have stopped while a command is pending: never
            # hold more than this for one session, whatever the transport does.
            log.warn("too much input ({n} octets) while a command is pending from {client}",
                     n=len(self._buffer), client=self.session.client)
            self._buffer = b""
            self._send(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too much "
                                           "pipelined input"))
            self._close()
            return
        self._process()

    def _process(self) -> None:
        """
        Run buffered input until it is used up or a pending answer stops it.
        """
        if self._processing:
            return
        self._processing = True
        try:
            while not self._closed and not self._output_full and (
                    not self._busy or self._challenge is not None):
                if self._data is not None:
                    if not self._buffer:
                        break
                    chunk, self._buffer = self._buffer, b""
                    rest = self._data.feed(chunk)
                    if rest is None:
                        if self._spool is not None and self._spool.backlog_full:
                            # The disk is slower than the client: stop reading
                            # until the spill file catches up.
                            self._respond(self._spool.drained())
                        break
                    self._buffer = rest
                    self._deadline.start()
                    self._end_data()
                else:
                    line = self._take_line()
                    if line is None:
                        break
                    self._deadline.start()  # the next command's time starts now
                    if self._challenge is not None:
                        self._answer_challenge(line)
                    else:
                        self._command(line)
        finally:
            self._processing = False

    def _take_line(self) -> bytes | None:
        while True:
            end = self._buffer.find(b"\n")
            if end < 0:
                if len(self._buffer) > MAX_AUTH_LINE:
                    # No end in sight: answer now, drop the rest of the line as it comes.
                    self._buffer = b""
                    if not self._discarding:
                        self._discarding = True
                        self._reply(Reply(500, "5.5.2", "Error: line too long"))
                return None
            line, self._buffer = self._buffer[:end], self._buffer[end + 1 :]
            if self._discarding:
                self._discarding = False
                continue
            auth = self._challenge is not None or line[:5].upper() == b"AUTH "
            if len(line) + 1 > (MAX_AUTH_LINE if auth else MAX_COMMAND_LINE):
                self._reply(Reply(500, "5.5.2", "Error: line too long"))
                if self._closed:
                    return None
                continue
            return line[:-1] if line.endswith(b"\r") else line

    def _command(self, line: bytes) -> None:
        if b"\0" not in line and not line.isascii() and line[:5].upper() in (b"MAIL ", b"RCPT "):
            # RFC 6531 3.7.4.1 and Postfix: an 8-bit address without
            # SMTPUTF8 is 553 5.6.7, a refusal of the address, no
            # protocol error, so it does not count toward max_errors.
            log.info("reject: {verb} from {client}: 8-bit address without SMTPUTF8",
                     verb=line[:4].decode("ascii").upper(), client=self.session.client)
            self._uncounted = True
            self._respond(Reply(553, "5.6.7", "Error: 8-bit characters in an address "
                                              "need SMTPUTF8, which is not offered"))
            return
        if b"\0" in line or not line.isascii():
            self._respond(Reply(500, "5.5.2", "Error: bad characters in command"))
            return
        text = line.decode("ascii")
        verb, _, arg = text.strip().partition(" ")
        handler: Callable[[str], Any] | None = getattr(self, "smtp_" + verb.upper(), None)
        if handler is None or not verb.isalpha():
            log.info("unknown command {verb} from {client}", verb=safe(verb, 20),
                     client=self.session.client)
            self._respond(Reply(500, "5.5.2", "Error: command not recognized"))
            return
        self._respond(maybeDeferred(handler, arg.strip()))

    def challenge(self, text: str) -> "Deferred[str]":
        """
        Send a C{334} challenge and return the client's next line (for SASL);
        input flows again until it arrives.
        """
        self._send(Reply(334, "", text))
        d: Deferred[str] = Deferred()
        self._challenge = d
        if self._paused:
            self._paused = False
            self._deadline.start()
            self._resume_input()
        self._process()
        return d

    def _answer_challenge(self, line: bytes) -> None:
        d, self._challenge = self._challenge, None
        assert d is not None
        d.callback(line.decode("ascii", "replace"))
        if self._busy and self._challenge is None and not self._paused and not self._closed:
            self._paused = True
            self._deadline.stop()
            if self._buffer:
                self._pause_input()

    # Output

    def _respond(self, result: Any, transform: Callable[[Any], Any] | None = None) -> None:
        """
        Send a reply, or, for a Deferred, pause input until it has one.
        """
        if not isinstance(result, Deferred):
            if transform is not None:
                result = transform(result)
            if result is not None:
                self._reply(result)
            return
        self._busy = True
        if transform is not None:
            result.addCallback(transform)
        result.addErrback(self._failed)
        result.addCallback(self._resume)
        if self._busy and self._challenge is None and not self._closed:
            # Still pending: stop the clock until it answers, and reading
            # once there is input (now, if commands are waiting already).
            self._paused = True
            self._deadline.stop()
            if self._buffer:
                self._pause_input()

    def _failed(self, failure: Failure) -> Reply:
        if failure.check(SMTPError):
            return failure.value.reply
        if failure.check(AddressError):
            e = failure.value
            return Reply(e.code, e.enhanced, f"Error: {e}")
        log.failure("internal error in session with {client}", failure,
                    client=self.session.client)
        return Reply(451, "4.3.0", "Error: internal error, try again later")

    def _resume(self, reply: Reply | None) -> None:
        self._busy = False
        if self._closed:
            return
        if reply is not None:
            self._reply(reply)
        if self._paused and not self._closed:
            self._paused = False
            if self._data is not None:
                self._deadline.start_data()  # paused in DATA (spill backpressure)
            else:
                self._deadline.start()
            self._resume_input()
            self._process()

    def _pause_input(self) -> None:
        if not self._input_paused and not self._closed:
            self._input_paused = True
            self.transport.pauseProducing()

    def _resume_input(self) -> None:
        if self._input_paused:
            self._input_paused = False
            self.transport.resumeProducing()

    _close_after = False

    def _reply(self, reply: Reply) -> None:
        self._send(reply)
        if self._close_after or reply.code == 421:
            self._close()
            return
        uncounted, self._uncounted = self._uncounted, False
        if reply.code >= 400 and not uncounted:
            self._errors += 1
            if self._errors >= self.settings.max_errors:
                log.info("too many errors from {client}", client=self.session.client)
                self._send(Reply(421, "4.7.0", f"{self.settings.hostname} Error: too many errors"))
                self._close()

    def _send(self, reply: Reply) -> None:
        if not self._closed:
            # Straight to the socket when nothing is waiting before it: no
            # epoll write interest on and off, no extra turn per reply.
            write_now(self.transport, reply.encode())

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            # TLS only closes once no producer is registered.
            self.transport.unregisterProducer()
            self.transport.loseConnection()

    def _drop_transaction(self) -> None:
        self.envelope = None
        self._overshoot = 0
        self._data = None
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    # Commands

    def smtp_HELO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=False)

    def smtp_EHLO(self, arg: str) -> Reply:
        return self._hello(arg, esmtp=True)

    def _hello(self, arg: str, esmtp: bool) -> Reply:
        verb = "EHLO" if esmtp else "HELO"
        if not _HELO_NAME.fullmatch(arg):
            return Reply(501, "5.5.4", f"Syntax: {verb} hostname")
        self._drop_transaction()
        self.session.helo = arg
        self.session.esmtp = esmtp
        if not esmtp:
            return Reply(250, "", self.settings.hostname)
        lines = [
            self.settings.hostname,
            "PIPELINING",
            f"SIZE {self.settings.max_message_size}",
            "8BITMIME",
            "ENHANCEDSTATUSCODES",
        ]
        if self.factory.tls is not None and not self.session.tls:
            lines.append("STARTTLS")
        lines.extend(self.policy.extensions(self.session))
        return Reply(250, "", "\n".join(lines))

    def smtp_STARTTLS(self, arg: str) -> Reply | None:
        if arg:
            return Reply(501, "5.5.4", "Syntax: STARTTLS")
        if self.session.tls:
            return Reply(503, "5.5.1", "Error: TLS already active")
        tls = self.factory.tls
        if tls is None:
            return Reply(502, "5.5.1", "Error: command not implemented")
        self._send(Reply(220, "2.0.0", "Ready to start TLS"))
        if self._buffer:
            log.warn("discarded {n} bytes pipelined after STARTTLS by {client}",
                     n=len(self._buffer), client=self.session.client)
        self._buffer = b""
        self.transport.startTLS(tls())
        log.info("STARTTLS from {client} ({service})", client=self.session.client,
                 service=self.settings.name)
        self._drop_transaction()
        self.session.helo = None
        self.session.esmtp = False
        self.session.tls = True
        return None

    def smtp_NOOP(self, arg: str) -> Reply:
        return Reply(250, "2.0.0", "Ok")

    def smtp_RSET(self, arg: str) -> Reply:
        if arg:
            return Reply(501, "5.5.4", "Syntax: RSET")
        self._drop_transaction()
        return Reply(250, "2.0.0", "Ok")

    def smtp_QUIT(self, arg: str) -> None:
        self._send(Reply(221, "2.0.0", "Bye"))
        self._close()

    def smtp_VRFY(self, arg: str) -> Reply:
        return Reply(252, "2.5.2", "Cannot VRFY user, but will accept message and attempt delivery")

    def smtp_HELP(self, arg: str) -> Reply:
        return Reply(214, "2.0.0", "See RFC 5321 (https://www.rfc-editor.org/rfc/rfc5321)")

    def smtp_AUTH(self, arg: str) -> Any:
        return self.policy.auth(self, arg)

    def smtp_MAIL(self, arg: str) -> Any:
        if self.session.helo is None:
            return Reply(503, "5.5.1", "Error: send HELO/EHLO first")
        if self.envelope is not None:
            return Reply(503, "5.5.1", "Error: nested MAIL command")
        match = re.match(r"FROM:\s*", arg, re.IGNORECASE)
        if match is None:
            return Reply(501, "5.5.4", "Syntax: MAIL FROM:<address>")
        path, rest = split_path(arg[match.end():])
        sender = parse_path(path)
        params = parse_params(rest)
        if params and not self.session.esmtp:
            return Reply(555, "5.5.4", "Error: parameters need EHLO")
        size = params.pop("SIZE", None)
        if size is not None:
            if not size.isdigit():
                return Reply(501, "5.5.4", "Bad SIZE parameter")
            if int(size) > self.settings.max_message_size:
                log.info("reject: MAIL from {client}: SIZE={size} over the limit",
                         client=self.session.client, size=safe(size))
                return Reply(552, "5.3.4", "Message size exceeds fixed maximum message size")
        body = params.pop("BODY", "7BIT")
        if (body or "").upper() not in ("7BIT", "8BITMIME"):
            return Reply(501, "5.5.4", "Bad BODY parameter")
        params.pop("AUTH", None)  # RFC 4954 5: we may ignore it
        if params:
            return Reply(555, "5.5.4", f"Unsupported parameter: {next(iter(params))}")

        def accepted(reply: Reply | None) -> Reply:
            reply = reply or Reply(250, "2.1.0", "Ok")
            if reply.code == 250:
                self.envelope = Envelope(
                    new_queue_id(), sender, received_at=wall_seconds(self.factory.clock),
                    client=self.session.client, origin=self.session.service,
                )
                log.info("{qid}: client={client} helo=<{helo}>", qid=self.envelope.queue_id,
                         client=self.session.client, helo=safe(self.session.helo or ""))
            return reply

        return maybeDeferred(self.policy.mail, self.session, sender).addCallback(accepted)

    def smtp_RCPT(self, arg: str) -> Any:
        envelope = self.envelope
        if envelope is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        match = re.match(r"TO:\s*", arg, re.IGNORECASE)
        if match is None:
            return Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
        path, rest = split_path(arg[match.end():])
        if rest:
            return Reply(555, "5.5.4", "Unsupported RCPT parameters")
        rcpt: Address | None
        if path.lower() == "<postmaster>":  # RFC 5321 4.1.1.3: no domain needed
            rcpt = Address("postmaster",
                           self.settings.postmaster_domain or self.settings.hostname)
        else:
            rcpt = parse_path(path)
        if rcpt is None:
            return Reply(501, "5.1.3", "Error: the null address is not a recipient")
        if "%" in rcpt.local or "!" in rcpt.local:
            log.info("{qid}: reject: RCPT from {client}: <{rcpt}>: routed address",
                     qid=envelope.queue_id, client=self.session.client, rcpt=safe(rcpt))
            return Reply(553, "5.1.3", "Error: %-hack and bang-path addresses are not accepted")
        if len(envelope.rcpts) >= self.settings.max_recipients:
            # RFC 5321 4.5.3.1.10: the client sends the rest in another
            # transaction; that is no error until the overshoot limit.
            self._overshoot += 1
            self._uncounted = self._overshoot <= self.settings.recipient_overshoot
            return Reply(452, "4.5.3", "Error: too many recipients")

        def accepted(resolution: Any) -> Reply:
            if self.envelope is not envelope:
                return Reply(503, "5.5.1", "Error: transaction reset")
            envelope.add(rcpt, resolution)
            return Reply(250, "2.1.5", "Ok")

        def refused(failure: Failure) -> Failure:
            if failure.check(SMTPError):
                log.info("{qid}: reject: RCPT from {client}: {reply}; from=<{sender}> to=<{rcpt}>",
                         qid=envelope.queue_id, client=self.session.client,
                         reply=safe(failure.value.reply), sender=safe(envelope.sender or ""),
                         rcpt=safe(rcpt))
            return failure

        d = maybeDeferred(self.policy.rcpt, self.session, envelope, rcpt)
        return d.addCallbacks(accepted, refused)

    def smtp_DATA(self, arg: str) -> Reply | None:
        envelope = self.envelope
        if envelope is None:
            return Reply(503, "5.5.1", "Error: need MAIL command")
        if not envelope.rcpts:
            return Reply(554, "5.5.1", "Error: no valid recipients")
        if arg:
            return Reply(501, "5.5.4", "Syntax: DATA")
        self._spool = MessageSpool(self.factory.spool_dir, self.factory.blocking)
        self._data = DataReader(self._spool.write, self.settings.max_message_size)
        self._send(Reply(354, "", "End data with <CR><LF>.<CR><LF>"))
        self._deadline.start_data()
        return None

    def smtp_BDAT(self, arg: str) -> Reply:
        return Reply(502, "5.5.1", "Error: CHUNKING is not offered")

    def _end_data(self) -> None:
        reader, spool, envelope = self._data, self._spool, self.envelope
        assert reader is not None and spool is not None and envelope is not None
        self._data = None
        self._spool = None
        self.envelope = None
        self._overshoot = 0
        # A message over 1 MiB is being written to DATA/tmp in a worker
        # thread; the answer waits for the last of it.
        d = spool.finished()
        d.addCallbacks(lambda _: self._complete(reader, spool, envelope),
                       self._spool_failed, errbackArgs=(spool, envelope))
        self._respond(d)

    def _spool_failed(self, failure: Failure, spool: MessageSpool, envelope: Envelope) -> Reply:
        spool.close()
        failure.trap(OSError)
        reply = Reply(451, "4.3.0", "Error: could not store the message, try again later")
        log.error("{qid}: reject: DATA from {client}: {reply} (spool: {error})",
                  qid=envelope.queue_id, client=self.session.client, reply=reply,
                  error=failure.value.strerror or failure.value)
        return reply

    def _complete(self, reader: DataReader, spool: MessageSpool, envelope: Envelope) -> Any:
        rejection = reader.rejection
        if rejection is None:
            hops = sum(1 for name in spool.header_names() if name in ("received", "delivered-to"))
            if hops >= self.settings.max_hops:
                rejection = (554, "5.4.6", "Error: too many hops (mail loop?)")
        if rejection is not None:
            spool.close()
            reply = Reply(*rejection)
            log.info("{qid}: reject: DATA from {client}: {reply}",
                     qid=envelope.queue_id, client=self.session.client, reply=safe(reply))
            return reply
        spool.add_header(self.received_header(envelope))
        log.info("{qid}: from=<{sender}> size={size} nrcpt={nrcpt}",
                 qid=envelope.queue_id, sender=safe(envelope.sender or ""), size=spool.size,
                 nrcpt=len(envelope.rcpts), service=self.settings.name, tls=self.session.tls)
        tally.received(self.settings.name, bool(self.session.tls))

        def delivered(reply: Reply | None) -> Reply:
            reply = reply or Reply(250, "2.0.0", f"Ok: queued as {envelope.queue_id}")
            if reply.code == 250:
                self._errors = 0  # the hard error limit is for sessions delivering nothing
            return reply

        def done(result: Any) -> Any:
            spool.close()
            return result

        d = maybeDeferred(self.policy.deliver, self.session, envelope, spool)
        d.addCallback(delivered)
        d.addErrback(self._delivery_failed, envelope)
        d.addBoth(done)
        return d

    def _delivery_failed(self, failure: Failure, envelope: Envelope) -> Reply:
        if failure.check(SMTPError):
            reply = failure.value.reply
        elif failure.check(OSError):
            # A full disk is no bug: one line, not a traceback.
            log.error("{qid}: could not store the message: {error}",
                      qid=envelope.queue_id, error=failure.value)
            reply = Reply(451, "4.3.0", "Error: could not store the message, try again later")
        else:
            log.failure("{qid}: delivery failed", failure, qid=envelope.queue_id)
            reply = Reply(451, "4.3.0", "Error: could not store the message, try again later")
        log.info("{qid}: reject: DATA from {client}: {reply}",
                 qid=envelope.queue_id, client=self.session.client, reply=safe(reply))
        return reply

    # Trace

    def received_header(self, envelope: Envelope) -> bytes:
        """
        The C{Received:} field this server adds to every message (RFC 5321
        4.4), with LF line endings as stored.
        """
        s = self.session
        ip = s.peer_host
        literal = f"IPv6:{ip}" if ":" in ip else ip
        tls = ""
        if s.tls:
            info = self.tls_description()
            tls = f"\n\t({info})" if info else ""
        auth = f"\n\t(authenticated as {s.user})" if s.user is not None else ""
        single = f"\n\tfor <{envelope.rcpts[0]}>" if len(envelope.rcpts) == 1 else ""
        date = rfc5322_date(wall_seconds(self.factory.clock))
        return (
            f"Received: from {s.helo} ([{literal}]){tls}{auth}\n"
            f"\tby {self.settings.hostname} (mailstack) with {s.protocol_name}"
            f" id {envelope.queue_id}{single};\n\t{date}\n"
        ).encode("ascii", "replace")

    def tls_description(self) -> str:
        """
        C{using TLSv1.3 with cipher ...}, as Postfix writes it, if known.
        """
        try:
            connection: Any = self.transport.getHandle()  # an SSL.Connection under TLS
            version = connection.get_protocol_version_name()
            cipher = connection.get_cipher_name()
            bits = connection.get_cipher_bits()
        except (AttributeError, SSL.Error):  # not a TLS transport, or no session yet
            return ""
        return f"using {version} with cipher {cipher} ({bits}/{bits} bits)"


class SMTPServerFactory(Factory[SMTPServer]):
    """
    Builds L{SMTPServer} sessions for one listener.

    @ivar tls: a callable returning the current TLS context factory (so a
        renewed certificate is picked up), or C{None} for no STARTTLS.
    """

    protocol = SMTPServer
    noisy = False

    def __init__(
        self,
        policy: Any,
        settings: ServerSettings,
        clock: IReactorTime,
        spool_dir: str | None = None,
        tls: Callable[[], Any] | None = None,
        blocking: Callable[..., Deferred[Any]] | None = None,
    ) -> None:
        """
        @param blocking: C{blocking(f, *args)} runs C{f} in a worker thread
            (a message spilled to C{spool_dir} is written there).
        """
        self.policy = policy
        self.settings = settings
        self.clock = clock
        self.spool_dir = spool_dir
        self.tls = tls
        self.blocking = blocking
        self.sessions: set[SMTPServer] = set()  # open sessions, for the drain at stop
        self.resolver: Any = None  # for the client's name in logs (mailstack.smtp.rdns)
