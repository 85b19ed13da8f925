# -*- test-case-name: tests.test_imap -*-
"""
IMAP4rev1 over the Maildirs: Twisted's C{IMAP4Server} for reading
commands, literals and AUTHENTICATE, with what it lacks or gets wrong
replaced (see the audit in shared/notes):

  - one command at a time: a pipelined command waits until the one before
    it is answered, so replies never interleave and state is consistent;
  - STARTTLS drops whatever the client sent after it in clear text;
    LOGIN and AUTHENTICATE only inside TLS (LOGINDISABLED before);
    failed logins are throttled like SMTP AUTH;
  - FETCH, SEARCH, STORE, COPY/MOVE, APPEND, EXPUNGE, LIST and STATUS are
    mailstack's own, on L{mailstack.access.mailbox}: they read only what a
    request needs (no bodies for headers, nothing for FLAGS), in a worker
    thread, in batches, pausing while the client is slow to read;
    BODY[...] sets \\Seen; byte-exact sections; UIDPLUS, MOVE, IDLE,
    SPECIAL-USE, CHILDREN, UNSELECT, NAMESPACE.
  - NOOP, CHECK and IDLE rescan the folder only when its watch saw a
    change (inotify, else two C{stat} calls; L{mailstack.access.watch}).
"""

from __future__ import annotations

import datetime
import math
import os
import re
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import (
    IllegalClientResponse, IllegalMailboxEncoding, IllegalOperation, MailboxException,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.access.folder import MAX_KEYWORDS, Entry, TooManyKeywords
from mailstack.access.index import fetch_cacheable
from mailstack.access.limits import (
    COMMAND, TAG, AccessLimits, FolderLimit, clean_text, literal_size, strict_parser,
)
from mailstack.access.mailbox import (
    HEADER, NOTHING, WHOLE, Changes, Loaded, MaildirAccount, MaildirMailbox, MissingFolder,
    wildcard_match,
)
from mailstack.access.mime import lf, literal, string
from mailstack.access.search import SearchError, check_depth, imap_date, parse_set
from mailstack.access.watch import FolderWatch
from mailstack.logsafe import safe
from mailstack.nofollow import SymlinkRefused
from mailstack.safeio import is_disk_full
from mailstack.sockets import set_nodelay
from mailstack.throttle import LoginThrottle, LoginUnavailable
from mailstack.transport import IConnection
from mailstack.twisted_privates import buffered_input_size, discard_buffered_input

log = Logger()

_TRAILING_LITERAL = re.compile(rb"\{[0-9]+\}$")
SYSTEM_FLAGS = ("\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft")
_ATOM_SPECIALS = re.compile(r'[(){ %*"\\\]\x00-\x1f\x7f-\uffff]')
LOGOUT_TLS_DEADLINE = 2.0  # seconds for the client's TLS close_notify after LOGOUT
BATCH_MESSAGES = 200
BATCH_BYTES = 4 << 20


def _command(*table: Any) -> Any:
    """
    A command table entry (handler, argument parsers...), as Twisted's
    C{IMAP4Server} looks them up by state and name; typed C{Any}, since
    Twisted types its own tables with its own handlers.
    """
    return table


_FLAG_TEXTS: dict[tuple[int, bool], tuple[Any, bytes]] = {}


def _flags(entry: Entry) -> bytes:
    """
    C{FLAGS (...)} of a message, made once per flag set object: a folder's
    messages share a few sets (L{mailstack.access.folder.shared_flags}),
    and a set is replaced, never changed in place.  The cache holds the
    set, so its id cannot name another while the entry is there.
    """
    flags = entry.flags
    key = (id(flags), entry.recent)
    found = _FLAG_TEXTS.get(key)
    if found is not None and found[0] is flags:
        return found[1]
    names = sorted(flags) + (["\\Recent"] if entry.recent else [])
    text = b"FLAGS (" + " ".join(names).encode() + b")"
    if len(_FLAG_TEXTS) >= 4096:
        _FLAG_TEXTS.clear()
    _FLAG_TEXTS[key] = (flags, text)
    return text


def _fetch_level(query: list[Any]) -> int:
    level = NOTHING
    for item in query:
        if item.type in ("envelope", "rfc822header"):
            level = max(level, HEADER)
        elif item.type in ("bodystructure", "rfc822", "rfc822text"):
            return WHOLE
        elif item.type == "body":
            if item.part or not (item.header and not item.text):
                return WHOLE
            level = max(level, HEADER)
    return level


def _sets_seen(query: list[Any]) -> bool:
    return any(item.type in ("rfc822", "rfc822text")
               or (item.type == "body" and not item.peek
                   and (item.header or item.text or item.mime or item.empty))
               for item in query)


def _section_name(item: Any) -> bytes:
    numbers = b".".join(b"%d" % (n + 1) for n in item.part)
    if item.header:
        kind = b"HEADER"
        if item.header.fields:
            kind += b".FIELDS" + (b".NOT" if item.header.negate else b"")
            kind += b" (" + b" ".join(f.upper() for f in item.header.fields) + b")"
    elif item.text:
        kind = b"TEXT"
    elif item.mime:
        kind = b"MIME"
    else:
        kind = b""
    spec = numbers + (b"." if numbers and kind else b"") + kind
    return b"BODY[" + spec + b"]"


def render(loaded: Loaded, query: list[Any], uid: bool) -> bytes:
    """
    One untagged FETCH response.
    """
    entry, part = loaded.entry, loaded.part
    items: list[bytes] = []
    wants_flags = loaded.flags_changed
    for item in query:
        kind = item.type
        if kind == "uid":
            items.append(b"UID %d" % entry.uid)
            uid = False
        elif kind == "flags":
            items.append(_flags(entry))
            wants_flags = False
        elif kind == "internaldate":
            items.append(b"INTERNALDATE " + imap_date(loaded.internal_date))
        elif kind == "rfc822size":
            items.append(b"RFC822.SIZE %d" % entry.size)
        elif kind == "envelope":
            items.append(b"ENVELOPE " + part.envelope())  # type: ignore[union-attr]
        elif kind == "bodystructure":
            items.append(b"BODYSTRUCTURE " + part.bodystructure(True))  # type: ignore[union-attr]
        elif kind == "rfc822":
            items.append(b"RFC822 " + literal(part.raw))  # type: ignore[union-attr]
        elif kind == "rfc822header":
            items.append(b"RFC822.HEADER " + literal(part.header))  # type: ignore[union-attr]
        elif kind == "rfc822text":
            items.append(b"RFC822.TEXT " + literal(part.body))  # type: ignore[union-attr]
        elif kind == "body" and not (item.header or item.text or item.mime or item.empty):
            items.append(b"BODY " + part.bodystructure(False))  # type: ignore[union-attr]
        elif kind == "body":
            numbers = tuple(n + 1 for n in item.part)
            if item.header:
                section = "HEADER.FIELDS" if item.header.fields else "HEADER"
                data = part.section(numbers, section, list(item.header.fields or ()),  # type: ignore[union-attr]
                                    item.header.negate)
            else:
                section = "TEXT" if item.text else "MIME" if item.mime else ""
                data = part.section(numbers, section)  # type: ignore[union-attr]
            name = _section_name(item)
            if item.partialBegin is not None:
                data = data[item.partialBegin:item.partialBegin + item.partialLength]
                name += b"<%d>" % item.partialBegin
            items.append(name + b" " + literal(data))
    if uid:
        items.insert(0, b"UID %d" % entry.uid)
    if wants_flags:
        items.append(_flags(entry))
    return b"* %d FETCH (" % loaded.seq + b" ".join(items) + b")\r\n"


def render_known(items: list[tuple[int, Entry]], query: list[Any], uid: bool) -> bytes:
    """
    The FETCH responses of a batch asking only what a session's view knows
    (UID, FLAGS, RFC822.SIZE), as L{render} would write them.
    """
    kinds = [item.type for item in query]
    lead = uid and "uid" not in kinds
    out = []
    for seq, entry in items:
        parts = [b"UID %d" % entry.uid] if lead else []
        for kind in kinds:
            if kind == "uid":
                parts.append(b"UID %d" % entry.uid)
            elif kind == "flags":
                parts.append(_flags(entry))
            else:
                parts.append(b"RFC822.SIZE %d" % entry.size)
        out.append(b"* %d FETCH (" % seq + b" ".join(parts) + b")\r\n")
    return b"".join(out)


def render_all(loaded: list[Loaded | None], query: list[Any], uid: bool
               ) -> list[bytes | None]:
    """
    The FETCH responses of a batch (None for a message that is gone).
    """
    return [None if message is None else render(message, query, uid) for message in loaded]


def _client_flags(flags: list[Any]) -> set[str]:
    """
    A client's flag list as stored: system flags spelled as IMAP spells
    them, keywords as given.  \\Recent, an unknown system flag or a keyword
    that is not an atom is a BAD command (as Dovecot answers).
    """
    known = {f.lower(): f for f in SYSTEM_FLAGS + ("$Forwarded",)}
    out = set()
    for flag in flags:
        name = flag.decode("utf-8", "replace") if isinstance(flag, bytes) else str(flag)
        if name.lower() in known:
            out.add(known[name.lower()])
        elif name.startswith("\\"):
            raise IllegalClientResponse(f"Invalid system flag {name[:50]}")
        elif not name or len(name) > 200 or _ATOM_SPECIALS.search(name):
            raise IllegalClientResponse("Invalid keyword")
        else:
            out.add(name)
    return out


def _flag_list(keywords: list[str], permanent: bool = False) -> bytes:
    names = list(SYSTEM_FLAGS) + ["$Forwarded"] + [
        k for k in keywords if k.lower() != "$forwarded"]
    if permanent and len(keywords) < MAX_KEYWORDS:
        names.append("\\*")
    return b"(" + " ".join(names).encode("utf-8") + b")"


def _mailbox_name(name: bytes) -> str:
    """
    A folder name from modified UTF-7; one that does not decode names no
    folder (NO, as Dovecot answers), it is not a malformed command.
    """
    try:
        return str(_parseMbox(name))
    except (IllegalMailboxEncoding, UnicodeError):
        raise MailboxException("Invalid folder name (not modified UTF-7)") from None


def _list_name(name: bytes) -> str | None:
    """
    A LIST reference or pattern; None if it cannot match any folder.
    """
    try:
        return _mailbox_name(name)
    except MailboxException:
        return None


def _parseMbox(name: bytes | str) -> str:
    """
    A mailbox name from the client (modified UTF-7) as text; a name that
    does not decode is the client's error (C{NO}), not the server's.
    """
    if isinstance(name, str):
        return name
    try:
        text = name.decode("imap4-utf-7")
        # Twisted's codec is lenient ("&" alone, "&AGE-" for "a", raw
        # 8-bit): only a name that encodes back to itself is valid.
        valid = text.encode("imap4-utf-7") == name
    except (UnicodeError, ValueError):
        valid = False
    if not valid:
        raise IllegalMailboxEncoding("Invalid modified UTF-7 in the folder name")
    return text


_DATE_TIME = re.compile(rb"( ?[0-9]|[0-9]{2})-([A-Za-z]{3})-([0-9]{4}) "
                        rb"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})")
_MONTHS = [b"jan", b"feb", b"mar", b"apr", b"may", b"jun", b"jul", b"aug", b"sep", b"oct",
           b"nov", b"dec"]


def _parse_date(value: bytes | None) -> float | None:
    """
    An APPEND date-time (RFC 3501: C{"17-Jul-1996 02:44:25 -0700"}) as a
    timestamp; a date that does not exist (31-Feb) or a zone past 23:59 is
    C{IllegalClientResponse} (BAD), not a date moved elsewhere.
    """
    if value is None:
        return None
    match = _DATE_TIME.fullmatch(value)
    month = match.group(2).lower() if match else b""
    if match is None or month not in _MONTHS:
        raise IllegalClientResponse("bad date-time")
    day, _, year, hour, minute, second, sign, zh, zm = match.groups()
    try:
        zone = datetime.timedelta(hours=int(zh), minutes=int(zm))
        if zone >= datetime.timedelta(days=1) or int(zm) > 59:
            raise ValueError(value)
        when = datetime.datetime(int(year), _MONTHS.index(month) + 1, int(day), int(hour),
                                 int(minute), int(second),
                                 tzinfo=datetime.timezone(-zone if sign == b"-" else zone))
    except ValueError:
        raise IllegalClientResponse("bad date-time") from None
    return when.timestamp()


class NulInMessage(ValueError):
    """
    An APPEND literal holding a NUL octet (RFC 3501: a literal is CHAR8,
    which excludes NUL; BINARY, which would allow it, is not offered).
    """


def _appended(data: bytes) -> bytes:
    """
    An APPEND literal as stored (LF line ends); raise L{NulInMessage} for
    a NUL, which no client could be served in a FETCH literal.
    """
    if b"\0" in data:
        raise NulInMessage()
    return lf(data)


@implementer(IPushProducer)
class IMAPServer(imap4.IMAP4Server):
    """
    One IMAP session; see the module docstring.
    """

    transport: IConnection  # once connected: see mailstack.transport

    IDENT = b"mailstack IMAP4rev1 ready"
    MAX_LENGTH = 65536
    factory: "IMAPFactory"
    # Twisted's IMAP4Server declares these (and portal, challengers) as
    # "= None" without a type: mypy takes None for their type.
    mbox: MaildirMailbox | None  # type: ignore[assignment]
    account: MaildirAccount | None  # type: ignore[assignment]

    def __init__(self, factory: "IMAPFactory", implicit_tls: bool) -> None:
        super().__init__(contextFactory=None if implicit_tls else factory.tls)
        self.factory = factory
        self.implicit_tls = implicit_tls
        self._busy = False
        self._waiting: list[bytes] = []
        self._drain_pending = False
        self._paused: Deferred[None] | None = None
        self._idle_watch: FolderWatch | None = None
        self._idle_again = False
        self._idle_refresh: Deferred[Any] | None = None
        self._lost = False
        self._logout_timer: Any = None
        self.client = "?"
        self.limits = factory.limits
        self._waiting_bytes = 0
        self._reading_paused = False
        self._bad_in_row = 0
        self._abort_call: Any = None

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.timeOut = math.ceil(self.limits.imap_preauth_timeout)  # whole seconds
        self.POSTAUTH_TIMEOUT = math.ceil(self.limits.imap_timeout)
        peer = self.transport.getPeer()
        self.ip = getattr(peer, "host", "?")
        self.client = f"[{self.ip}]:{getattr(peer, 'port', 0)}"
        self.portal = _ThrottledPortal(  # type: ignore[assignment]  # declared None by Twisted
            self.factory.portal, self.factory.throttle, self)
        if self.implicit_tls:
            self._tls_started()
        log.info("imap: connect from {client}", client=self.client)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        if self._logout_timer is not None and self._logout_timer.active():
            self._logout_timer.cancel()
        self._logout_timer = None
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        self._stop_idle()
        if self.mbox is not None:
            self.mbox.close()  # its folder watch, if no other session holds it
        self._waiting = []
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)
        log.info("imap: disconnect from {client}", client=self.client)
        super().connectionLost(reason)

    def callLater(self, period: float, func: Any) -> Any:
        """
        TimeoutMixin's clock: the factory's reactor (a Clock in tests).
        """
        return self.factory.reactor.callLater(period, func)

    def _tls_started(self) -> None:
        self.startedTLS = True
        self.challengers = {  # type: ignore[assignment]  # declared None by Twisted
            b"PLAIN": imap4.PLAINCredentials, b"LOGIN": imap4.LOGINCredentials}

    def capabilities(self) -> dict[bytes, Any]:
        caps: dict[bytes, Any] = {}
        if self.startedTLS:
            caps[b"AUTH"] = [b"PLAIN", b"LOGIN"]
        elif self.ctx is not None and self.canStartTLS:
            caps[b"STARTTLS"] = None
            caps[b"LOGINDISABLED"] = None
        else:
            caps[b"LOGINDISABLED"] = None
        for name in (b"IDLE", b"NAMESPACE", b"UIDPLUS", b"MOVE", b"UNSELECT",
                     b"SPECIAL-USE", b"CHILDREN", b"ID"):
            caps[name] = None
        return caps

    # -- one command at a time ---------------------------------------------------

    def lineReceived(self, line: bytes) -> Any:
        if self._lost or self.transport.disconnecting:
            return None
        if self.parseState == "command" and (self._busy or self._waiting):
            # A command runs: stop reading (the rest waits in the kernel's
            # socket buffer) and keep what was already read, up to a cap.
            self._waiting.append(line)
            self._waiting_bytes += len(line) + 2
            self._stop_reading()
            if self._waiting_bytes + buffered_input_size(self) > self.limits.max_buffered:
                self._overflow()
            return None
        return self._process(line)

    def _process(self, line: bytes) -> None:
        self.resetTimeout()
        handler = getattr(self, "parse_" + self.parseState)
        try:
            handler(line)
        except Exception:  # noqa: BLE001 - a bug in one handler answers BAD; the session and the server go on
            log.failure("imap: cannot handle a line from {client}", client=self.client)
            self.sendBadResponse(None, b"[SERVERBUG] Internal error")

    def _stop_reading(self) -> None:
        if not self._reading_paused:
            self._reading_paused = True
            self.transport.pauseProducing()

    def _start_reading(self) -> None:
        self._waiting_bytes = 0
        if self._reading_paused and not self._lost and not self.transport.disconnecting:
            self._reading_paused = False
            self.transport.resumeProducing()

    def _overflow(self) -> None:
        log.warn("imap: {client} sent more than {cap} bytes while a command ran; closed",
                 client=self.client, cap=self.limits.max_buffered)
        self._close(b"* BYE Too much input while a command runs")

    def _close(self, goodbye: bytes) -> None:
        """
        Say goodbye and close; a client that does not read is cut after a
        grace period (loseConnection waits for the write buffer).
        """
        self._waiting = []
        self._waiting_bytes = 0
        if self._lost or self.transport.disconnecting:
            return
        self.sendLine(goodbye)
        # Read nothing more (TLS would read on, waiting for close_notify).
        self.transport.pauseProducing()
        self._reading_paused = True
        self.transport.loseConnection()
        self._abort_call = self.factory.reactor.callLater(self.limits.close_grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self._lost:
            self.transport.abortConnection()

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("imap: line over {max} bytes from {client}; closed", max=self.MAX_LENGTH,
                 client=self.client)
        discard_buffered_input(self)
        self._close(b"* BYE Line too long")

    def timeoutConnection(self) -> None:
        log.info("imap: {client} idle for too long; closed", client=self.client)
        self._stop_idle()
        self._close(b"* BYE Autologout; idle for too long")

    def rawDataReceived(self, data: bytes) -> None:
        # Literal bytes do not reset the idle timer: a command with its
        # literals must arrive within the timeout (no trickling forever).
        pending = self._pendingLiteral
        if pending is None:  # not reading a literal: raw mode is for literals only
            self.setLineMode(data)
            return
        passon = pending.write(data)
        if passon is not None:
            self.setLineMode(passon)

    def parse_command(self, line: bytes) -> Any:
        words = line.split(None, 2)
        if not words:
            self.sendBadResponse(None, b"Null command")
            return None
        tag = words[0]
        if len(tag) > 64 or not TAG.fullmatch(tag):
            self._count_bad()
            self.sendBadResponse(None, b"Invalid tag")
            return None
        if len(words) < 2:
            self.sendBadResponse(tag, b"Missing command")
            return None
        command = words[1].upper()
        if not COMMAND.fullmatch(command):
            self.sendBadResponse(tag, b"Invalid command name")
            return None
        self._busy = True
        try:
            self.dispatchCommand(tag, command, words[2] if len(words) > 2 else None)
        except Exception:  # noqa: BLE001 - any command's failure is answered and logged, never fatal
            self._command_failed(tag, Failure())
        return None

    def dispatchCommand(self, tag: bytes, cmd: bytes, rest: bytes | None,
                        uid: int | None = None) -> None:
        found = self.lookupCommand(cmd)
        if not found:
            self.sendBadResponse(tag, b"Unknown command or not allowed in this state")
            return
        # The command tables name Twisted's parsers; use this class's
        # version of each (stricter literals), made strict about errors.
        handler, parsers = found[0], tuple(
            strict_parser(getattr(type(self), p.__name__, p)) if callable(p) else p
            for p in found[1:])
        self._IMAP4Server__doCommand(tag, handler, [self, tag], parsers, rest, uid)  # type: ignore[attr-defined]

    def _IMAP4Server__ebDispatch(self, failure: Failure, tag: bytes) -> None:
        self._command_failed(tag, failure)

    def _IMAP4Server__ebAuthChunk(self, failure: Failure, tag: bytes) -> None:
        if failure.check(IllegalClientResponse, ValueError, TypeError):
            self.sendBadResponse(tag, b"Malformed authentication response")
        else:
            self._command_failed(tag, failure)

    def _command_failed(self, tag: bytes, failure: Failure) -> None:
        """
        The one answer to a command that raised: the protocol's error for
        the client's mistakes, a generic C{NO [SERVERBUG]} for ours (the
        traceback goes to the log only).
        """
        error = failure.value
        if isinstance(error, FolderLimit):
            self.sendNegativeResponse(tag, b"[LIMIT] " + clean_text(error))
        elif isinstance(error, MissingFolder):
            self.sendNegativeResponse(tag, b"[TRYCREATE] " + clean_text(error))
        elif isinstance(error, (SearchError, IllegalClientResponse)):
            text = clean_text(error)
            self.sendBadResponse(tag, text if text.startswith(b"[")
                                 else b"Illegal syntax: " + text)
        elif isinstance(error, IllegalMailboxEncoding):
            self.sendNegativeResponse(tag, b"[CANNOT] Invalid folder name")
        elif isinstance(error, (IllegalOperation, MailboxException)):
            self.sendNegativeResponse(tag, clean_text(error))
        elif isinstance(error, TooManyKeywords):
            self.sendNegativeResponse(tag, b"[LIMIT] " + clean_text(error))
        elif isinstance(error, SymlinkRefused):
            log.warn("imap: {client}: {error} {path}", client=self.client, error=error.strerror,
                     path=error.filename)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Folder unavailable; see the server log")
        elif isinstance(error, FileNotFoundError) and self._selected_vanished():
            # Another session renamed or deleted the selected folder: no
            # command can succeed in it any more (Dovecot says BYE too).
            self._folder_vanished()
        elif isinstance(error, OSError):  # a full disk, a storage fault: one log line
            self.sendNegativeResponse(tag, self._storage_failed(error))
        else:
            log.failure("imap: command failed for {client}", failure, client=self.client)
            self.sendNegativeResponse(tag, b"[SERVERBUG] Internal error; see the server log")

    def _selected_vanished(self) -> bool:
        """
        Whether the selected folder's directory is gone.
        """
        mbox = self.mbox
        folder = getattr(mbox, "folder", None)
        return folder is not None and not os.path.isdir(folder.path)

    def _folder_vanished(self) -> None:
        """
        Another session renamed or deleted the selected folder: no command
        can succeed in it any more, so say BYE and close (as Dovecot does).
        """
        log.info("imap: {client}: the selected folder was renamed or deleted; closed",
                 client=self.client)
        self._close(b"* BYE The selected folder was renamed or deleted")

    def _count_bad(self) -> None:
        self._bad_in_row += 1
        if self._bad_in_row >= self.limits.max_bad_commands:
            log.warn("imap: {client} sent {n} invalid commands in a row; closed",
                     client=self.client, n=self._bad_in_row)
            self._close(b"* BYE Too many invalid commands")

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | None) -> None:
        super()._respond(state, tag, message)
        if tag not in (None, b"*") and state in (b"OK", b"NO", b"BAD"):
            self._busy = False
            if state == b"BAD":
                self._count_bad()
            else:
                self._bad_in_row = 0
            if self._waiting and not self._drain_pending:
                self._drain_pending = True
                self.factory.reactor.callLater(0, self._drain)
            elif not self._waiting:
                self._start_reading()

    def _drain(self) -> None:
        self._drain_pending = False
        while (self._waiting and not self._busy and self.parseState == "command"
               and not self.transport.disconnecting):
            line = self._waiting.pop(0)
            self._waiting_bytes -= len(line) + 2
            self._process(line)
        if not self._waiting and (not self._busy or self.parseState == "pending"):
            # Idle again, or the line just run announced a literal: the
            # client sends its bytes after our continuation, so read them.
            self._start_reading()

    def _run(self, tag: bytes, work: Any) -> None:
        """
        Run an C{async def} command; an unexpected failure is a tagged BAD.
        """
        d = Deferred.fromCoroutine(work)

        d.addErrback(lambda failure: self._command_failed(tag, failure))

    def _storage_failed(self, error: OSError) -> bytes:
        """
        A full disk or another storage error: NO with an RFC 5530 code (no
        exception text for the client), one log line for the administrator.
        """
        log.error("imap: storage error for {client}: {error}", client=self.client, error=error)
        if is_disk_full(error):
            return b"[OVERQUOTA] Not enough disk space, try again later"
        return b"[SERVERBUG] Internal storage error, try again later"

    def _IMAP4Server__ebLogin(self, failure: Failure, tag: bytes) -> None:
        # One definition (there were two, and the second, which handed
        # other failures to Twisted's, put the exception's text in a BAD).
        if self._login_unavailable(failure, tag):
            return
        if failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] LOGIN failed")
        elif failure.check(OSError):  # the first login creates the Maildir
            self.sendNegativeResponse(tag, self._storage_failed(failure.value))
        else:  # not Twisted's answer, which carries the exception's text
            self._command_failed(tag, failure)

    def _IMAP4Server__ebAuthResp(self, failure: Failure, tag: bytes) -> None:
        if self._login_unavailable(failure, tag):
            return
        if failure.check(UnauthorizedLogin):
            self.sendNegativeResponse(tag, b"[AUTHENTICATIONFAILED] Authentication failed")
        elif failure.check(OSError):
            self.sendNegativeResponse(tag, self._storage_failed(failure.value))
        else:  # not Twisted's answer, which carries the exception's text
            self._command_failed(tag, failure)

    # -- flow control for big FETCH responses ------------------------------------

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = Deferred()

    def resumeProducing(self) -> None:
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)

    def stopProducing(self) -> None:
        self.resumeProducing()

    async def _writable(self) -> None:
        if self._paused is not None:
            await self._paused

    # -- unauthenticated ----------------------------------------------------------

    def do_STARTTLS(self, tag: bytes) -> None:
        if self.startedTLS or self.ctx is None or not self.canStartTLS:
            self.sendNegativeResponse(tag, b"TLS not available")
            return
        self.sendPositiveResponse(tag, b"Begin TLS negotiation now")
        # Whatever came after STARTTLS in clear text must not run inside TLS.
        discard_buffered_input(self)
        self._waiting = []
        self.transport.startTLS(self.ctx())
        self._tls_started()
        log.info("imap: STARTTLS from {client}", client=self.client)

    unauth_STARTTLS = _command(do_STARTTLS,)

    def _may_login(self, tag: bytes) -> bool:
        """
        No password outside TLS, none from a client the throttle blocks.
        """
        if not self.startedTLS:
            self.sendNegativeResponse(tag, b"[PRIVACYREQUIRED] Use STARTTLS first")
            return False
        if self.factory.throttle.blocked(self.ip):
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins")
            self.transport.loseConnection()
            return False
        return True

    def do_LOGIN(self, tag: bytes, user: bytes, passwd: bytes) -> None:
        if self._may_login(tag):
            super().do_LOGIN(tag, user, passwd)

    unauth_LOGIN = _command(do_LOGIN, imap4.IMAP4Server.arg_astring,
                            imap4.IMAP4Server.arg_finalastring)

    def do_AUTHENTICATE(self, tag: bytes, args: bytes) -> None:
        if self._may_login(tag):
            super().do_AUTHENTICATE(tag, args)

    unauth_AUTHENTICATE = _command(do_AUTHENTICATE, imap4.IMAP4Server.arg_atom)

    def do_LOGOUT(self, tag: bytes) -> None:
        """
        BYE, the tagged OK, and the connection closed (RFC 3501 6.1.3).
        Inside TLS the server sends its close_notify and waits for the
        client's at most L{IMAPFactory.logout_deadline} seconds: many
        clients never send one.
        """
        self.sendUntaggedResponse(b"BYE Logging out")
        self.sendPositiveResponse(tag, b"LOGOUT completed")
        self._waiting = []
        self.state = "logout"
        self.transport.loseConnection()
        if self.startedTLS and not self._lost:
            self._logout_timer = self.factory.reactor.callLater(
                self.factory.logout_deadline, self.transport.abortConnection)

    unauth_LOGOUT = auth_LOGOUT = select_LOGOUT = logout_LOGOUT = _command(do_LOGOUT,)

    def _login_unavailable(self, failure: Failure, tag: bytes) -> bool:
        """
        A login the throttle refused, or no room to check its password:
        C{NO [UNAVAILABLE]} (RFC 5530), closing the session if its network
        is blocked.  (Twisted's LOGIN and AUTHENTICATE errbacks, above,
        answer everything else.)
        """
        if not failure.check(LoginUnavailable):
            return False
        if failure.value.disconnect:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Too many failed logins")
            self.transport.loseConnection()
        else:
            self.sendNegativeResponse(tag, b"[UNAVAILABLE] Temporary authentication failure, "
                                           b"try again later")
        return True

    def do_ID(self, tag: bytes, rest: bytes) -> None:
        self.sendUntaggedResponse(b'ID ("name" "mailstack")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = auth_ID = select_ID = _command(do_ID, imap4.IMAP4Server.arg_line)

    # -- arguments -----------------------------------------------------------------

    def arg_seqset(self, line: bytes) -> tuple[Any, bytes]:
        word, _, rest = line.partition(b" ")
        try:
            return parse_set(word), rest
        except SearchError as e:
            raise IllegalClientResponse(str(e)) from None

    def arg_literal(self, line: bytes) -> Any:
        size = literal_size(line, self.factory.max_message_size)
        return self._fileLiteral(size)

    def arg_astring(self, line: bytes, final: bool = False) -> Any:
        stripped = line.strip()
        if stripped[:1] == b"{":
            size = literal_size(stripped, self.limits.max_string_literal)
            if final and not size:
                return (b"", b"")
            # What follows the literal comes as the next line, after the
            # space that separates arguments: the next parser gets it
            # without that space, as after a quoted or atom argument
            # (STATUS {5} then " (MESSAGES)").
            return self._stringLiteral(size).addCallback(
                lambda result: (result[0], result[1][1:] if result[1][:1] == b" "
                                else result[1]))
        return super().arg_astring(line, final)

    def arg_searchkeys(self, line: bytes) -> Any:
        """
        SEARCH keys with literals (RFC 3501: any astring may be one; clients
        send non-ASCII text so).  Each literal is read after a continuation
        and handed to the key parser as a quoted string, so its bytes can
        never be taken for a command.
        """
        return self._search_keys(b"", line)

    def _search_keys(self, done: bytes, line: bytes) -> Any:
        match = _TRAILING_LITERAL.search(line)
        if match is None:
            return imap4.IMAP4Server.arg_searchkeys(self, done + line)
        size = literal_size(match.group(0), self.limits.max_string_literal)
        before = line[:match.start()]

        def got(result: tuple[bytes, bytes]) -> Any:
            literal, rest = result
            if b"\r" in literal or b"\n" in literal:
                raise IllegalClientResponse("Line breaks in a search string")
            quoted = b'"' + literal.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
            return self._search_keys(done + before + quoted, rest)

        return self._stringLiteral(size).addCallback(got)

    def _stringLiteral(self, size: int) -> Any:
        self._literalStringLimit = self.limits.max_string_literal
        return super()._stringLiteral(size)

    def arg_fetchatt(self, line: bytes) -> Any:
        if not line or not line.strip():
            raise IllegalClientResponse("Missing FETCH items")
        query, rest = super().arg_fetchatt(line)
        for item in query:
            begin = getattr(item, "partialBegin", None)
            length = getattr(item, "partialLength", None)
            if (begin is not None and begin < 0) or (length is not None and length < 1):
                raise IllegalClientResponse("Bad partial range")
        return query, rest

    def arg_mailbox(self, line: bytes) -> Any:
        return self.arg_astring(line)

    # -- namespace, list, status -------------------------------------------------

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" ".")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = select_NAMESPACE = _command(do_NAMESPACE,)

    def do_LIST(self, tag: bytes, ref: bytes, pattern: bytes, subscribed: int,
                command: bytes) -> None:
        async def work() -> None:
            ref_name, wanted = _list_name(ref), _list_name(pattern)
            account = self.account
            if ref_name is None or wanted is None:  # matches nothing mailstack stores
                self.sendPositiveResponse(tag, command + b" completed")
                return
            if not wanted and not subscribed:
                self.sendUntaggedResponse(b'LIST (\\Noselect) "." ""')
                self.sendPositiveResponse(tag, b"LIST completed")
                return
            assert account is not None  # LIST exists in the auth and select states only
            infos = await account.run(account.folders)
            names = await account.run(account.subscriptions) if subscribed else None
            if names is not None:
                self._lsub(ref_name + wanted, infos, names)
                self.sendPositiveResponse(tag, command + b" completed")
                return
            for info in infos:
                if not wildcard_match(ref_name + wanted, info.name):
                    continue
                if names is not None and info.name not in names:
                    continue
                attributes = " ".join(info.attributes).encode()
                self.sendUntaggedResponse(command + b" (" + attributes + b') "." '
                                          + string(info.name.encode("imap4-utf-7")))
            self.sendPositiveResponse(tag, command + b" completed")

        self._run(tag, work())

    def _lsub(self, pattern: str, infos: list[Any], names: set[str]) -> None:
        """
        LSUB (RFC 3501 6.3.9): the subscribed names matching, existing or
        not, and, where C{%} stops above a subscribed name, its parent
        marked \\Noselect.
        """
        existing = {info.name: info for info in infos}
        shown: dict[str, list[str]] = {}
        for name in sorted(names):
            if wildcard_match(pattern, name):
                info = existing.get(name)
                shown[name] = [a for a in (info.attributes if info else [])
                               if a not in ("\\HasChildren", "\\HasNoChildren")]
                continue
            levels = name.split(".")
            for i in range(1, len(levels)):
                parent = ".".join(levels[:i])
                if parent not in names and wildcard_match(pattern, parent):
                    shown.setdefault(parent, ["\\Noselect"])
        for name, attributes in shown.items():
            self.sendUntaggedResponse(b"LSUB (" + " ".join(attributes).encode() + b') "." '
                                      + string(name.encode("imap4-utf-7")))

    auth_LIST = select_LIST = _command(do_LIST, imap4.IMAP4Server.arg_astring,
                               imap4.IMAP4Server.arg_astring, 0, b"LIST")
    auth_LSUB = select_LSUB = _command(do_LIST, imap4.IMAP4Server.arg_astring,
                               imap4.IMAP4Server.arg_astring, 1, b"LSUB")

    def do_STATUS(self, tag: bytes, name: bytes, names: list[bytes]) -> None:
        async def work() -> None:
            mailbox = _mailbox_name(name)
            folder = self.account.existing(mailbox)  # type: ignore[union-attr]
            snapshot = await self.account.run(folder.status)  # type: ignore[union-attr]
            values = {
                b"MESSAGES": len(snapshot.entries),
                b"RECENT": sum(1 for e in snapshot.entries if e.recent),
                b"UIDNEXT": snapshot.uid_next,
                b"UIDVALIDITY": snapshot.validity,
                b"UNSEEN": sum(1 for e in snapshot.entries if "\\Seen" not in e.flags),
            }
            wanted = [n.upper() for n in names]
            unknown = [n for n in wanted if n not in values]
            if unknown:
                raise IllegalClientResponse(f"unknown STATUS item {unknown[0]!r}")
            pairs = b" ".join(b"%s %d" % (n, values[n]) for n in wanted)
            self.sendUntaggedResponse(b"STATUS " + string(mailbox.encode("imap4-utf-7"))
                                      + b" (" + pairs + b")")
            self.sendPositiveResponse(tag, b"STATUS completed")

        self._run(tag, work())

    auth_STATUS = select_STATUS = _command(do_STATUS, imap4.IMAP4Server.arg_astring,
                                   imap4.IMAP4Server.arg_plist)

    # -- folders ---------------------------------------------------------------------

    def _folder_command(self, tag: bytes, method: str, *names: bytes) -> None:
        async def work() -> None:
            decoded = [_mailbox_name(n) for n in names]
            await getattr(self.account, method)(*decoded)
            self.sendPositiveResponse(tag, method.upper().encode() + b" completed")

        self._run(tag, work())

    def do_CREATE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "create", name)

    def do_DELETE(self, tag: bytes, name: bytes) -> None:
        if self.mbox is not None and _list_name(name) == self.mbox.name:
            self.sendNegativeResponse(tag, b"Close the folder before deleting it")
            return
        self._folder_command(tag, "delete", name)

    def do_RENAME(self, tag: bytes, old: bytes, new: bytes) -> None:
        self._folder_command(tag, "rename", old, new)

    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "subscribe", name)

    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "unsubscribe", name)

    auth_CREATE = select_CREATE = _command(do_CREATE, imap4.IMAP4Server.arg_finalastring)
    auth_DELETE = select_DELETE = _command(do_DELETE, imap4.IMAP4Server.arg_finalastring)
    auth_RENAME = select_RENAME = _command(do_RENAME, imap4.IMAP4Server.arg_astring,
                                   imap4.IMAP4Server.arg_finalastring)
    auth_SUBSCRIBE = select_SUBSCRIBE = _command(do_SUBSCRIBE, imap4.IMAP4Server.arg_finalastring)
    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = _command(do_UNSUBSCRIBE,
                                             imap4.IMAP4Server.arg_finalastring)

    # -- SELECT, CLOSE ---------------------------------------------------------------

    def _deselect(self) -> None:
        self._stop_idle()
        if self.mbox is not None:
            self.mbox.removeListener(self)
            self.mbox.close()
        self.mbox = None
        self.state = "auth"

    def do_SELECT(self, tag: bytes, name: bytes, rw: int, command: bytes) -> None:
        async def work() -> None:
            # The folder left stays watched until the new one is selected:
            # selecting it again finds the state its sessions share.
            account = self.account
            assert account is not None
            held = None
            if self.mbox is not None:
                held = account.watches.acquire(self.mbox.folder.path)
            try:
                self._deselect()
                mailbox = _mailbox_name(name)
                mbox = await account.select(mailbox, bool(rw))
            finally:
                if held is not None:
                    account.watches.release(held)
            if mbox is None:
                self.sendNegativeResponse(tag, b"No such folder")
                return
            self._send_flags(mbox, rw=bool(rw))
            self.sendUntaggedResponse(b"%d EXISTS" % mbox.getMessageCount())
            self.sendUntaggedResponse(b"%d RECENT" % mbox.getRecentCount())
            unseen = mbox.first_unseen()
            if unseen is not None:
                self.sendPositiveResponse(None, b"[UNSEEN %d] First unseen" % unseen)
            self.sendPositiveResponse(None, b"[UIDVALIDITY %d] UIDs valid" % mbox.validity)
            self.sendPositiveResponse(None, b"[UIDNEXT %d] Predicted next UID" % mbox.uid_next)
            self.mbox = mbox
            self.state = "select"
            mbox.addListener(self)
            mode = b"[READ-WRITE]" if rw else b"[READ-ONLY]"
            self.sendPositiveResponse(tag, mode + b" " + command + b" completed")

        self._run(tag, work())

    auth_SELECT = select_SELECT = _command(do_SELECT, imap4.IMAP4Server.arg_astring, 1, b"SELECT")
    auth_EXAMINE = select_EXAMINE = _command(do_SELECT, imap4.IMAP4Server.arg_astring, 0,
                                             b"EXAMINE")

    def _send_flags(self, mbox: MaildirMailbox, rw: bool = True) -> None:
        """
        FLAGS and PERMANENTFLAGS with the folder's keywords (at SELECT, and
        again whenever a keyword is added to it).
        """
        keywords = list(mbox.folder.keywords)
        mbox.keywords_sent = keywords
        self.sendUntaggedResponse(b"FLAGS " + _flag_list(keywords))
        if rw:
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS " + _flag_list(keywords, True)
                                      + b"] Flags permitted")
        else:
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS ()] Read-only folder")

    def _keywords_news(self) -> None:
        mbox = self.mbox
        if mbox is not None and mbox.folder.keywords != mbox.keywords_sent:
            self._send_flags(mbox, mbox.rw)

    def do_CLOSE(self, tag: bytes) -> None:
        async def work() -> None:
            mbox = self.mbox
            if mbox is not None and mbox.rw:
                await mbox.remove_deleted()
            self._deselect()
            self.sendPositiveResponse(tag, b"CLOSE completed")

        self._run(tag, work())

    select_CLOSE = _command(do_CLOSE,)

    def do_UNSELECT(self, tag: bytes) -> None:
        self._deselect()
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = _command(do_UNSELECT,)

    # -- reporting changes -------------------------------------------------------------

    def _report(self, changes: Changes) -> None:
        self._keywords_news()
        for seq in changes.expunged:
            self.sendUntaggedResponse(b"%d EXPUNGE" % seq)
        if changes.exists is not None:
            self.sendUntaggedResponse(b"%d EXISTS" % changes.exists)
        if changes.recent is not None:
            self.sendUntaggedResponse(b"%d RECENT" % changes.recent)
        for seq, entry in changes.flags:
            self.sendUntaggedResponse(b"%d FETCH (" % seq + _flags(entry) + b")")

    async def _refresh(self) -> None:
        if self.mbox is not None:
            self._report(await self.mbox.refresh())

    async def _refresh_if_changed(self) -> None:
        """
        Rescan only if the folder's watch saw a change (O(1) otherwise).
        """
        if self.mbox is not None and self.mbox.changed_on_disk():
            await self._refresh()

    def do_NOOP(self, tag: bytes) -> None:
        async def work() -> None:
            await self._refresh_if_changed()
            self.sendPositiveResponse(tag, b"NOOP completed")

        self._run(tag, work())

    auth_NOOP = select_NOOP = unauth_NOOP = _command(do_NOOP,)

    def do_CHECK(self, tag: bytes) -> None:
        async def work() -> None:
            await self._refresh_if_changed()
            self.sendPositiveResponse(tag, b"CHECK completed")

        self._run(tag, work())

    select_CHECK = _command(do_CHECK,)

    def do_IDLE(self, tag: bytes) -> None:
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"
        mbox = self.mbox
        if mbox is not None and mbox.watch is not None:
            # Told by the folder's watch (inotify, or one timer for the
            # process): nothing runs for this session while nothing changes.
            self._idle_watch = mbox.watch
            mbox.watch.add_listener(self._idle_poll)
        self._idle_poll()  # what changed since the last command

    auth_IDLE = select_IDLE = _command(do_IDLE,)

    def _idle_poll(self) -> None:
        mbox = self.mbox
        if self.parseState != "idle" or mbox is None or self._lost:
            return
        if self._idle_refresh is not None:
            self._idle_again = True  # looked again once this refresh is done
            return
        if not mbox.changed_on_disk():
            return
        self._idle_again = False
        d = Deferred.fromCoroutine(self._refresh())

        def done(result: Any) -> None:
            self._idle_refresh = None
            if isinstance(result, Failure) and result.check(FileNotFoundError) \
                    and self._selected_vanished():
                self._folder_vanished()
            elif isinstance(result, Failure):
                log.failure("imap: IDLE refresh failed for {client}", result,
                            client=self.client)
            elif self._idle_again:
                self._idle_poll()

        self._idle_refresh = d
        d.addBoth(done)

    def _stop_idle(self) -> None:
        watch, self._idle_watch = self._idle_watch, None
        if watch is not None:
            watch.remove_listener(self._idle_poll)

    def parse_idle(self, *args: Any) -> None:
        self._stop_idle()
        tag = self.parseTag
        self.parseState = self.lastState
        del self.parseTag, self.lastState
        pending = self._idle_refresh or succeed(None)
        pending.addBoth(lambda _: self.sendPositiveResponse(tag, b"IDLE terminated"))

    def _changeable(self, tag: bytes) -> MaildirMailbox | None:
        """
        The selected folder if this session may change it; else say NO.
        """
        if self.mbox is not None and self.mbox.rw:
            return self.mbox
        self.sendNegativeResponse(tag, b"[READ-ONLY] Folder is read-only")
        return None

    # -- FETCH, STORE, SEARCH -----------------------------------------------------------

    def do_FETCH(self, tag: bytes, ranges: Any, query: list[Any], uid: int = 0) -> None:
        self._run(tag, self._fetch(tag, ranges, query, bool(uid)))

    async def _fetch(self, tag: bytes, ranges: Any, query: list[Any], uid: bool) -> None:
        mbox = self.mbox
        assert mbox is not None
        items = mbox.resolve(ranges, uid)
        level = _fetch_level(query)
        mark_seen = _sets_seen(query)
        cached = level == HEADER and fetch_cacheable(query)
        envelope = any(item.type == "envelope" for item in query)
        dated = any(item.type == "internaldate" for item in query)
        known = all(item.type in ("uid", "flags", "rfc822size") for item in query)
        vanished = 0
        self.transport.registerProducer(self, True)
        try:
            start = 0
            while start < len(items) and not self._lost:
                end, size = start, 0
                while end < len(items) and end - start < BATCH_MESSAGES and (
                        level < WHOLE or size < BATCH_BYTES or end == start):
                    size += items[end][1].size
                    end += 1
                if known:  # all in the view: no file, no thread
                    self.transport.write(render_known(items[start:end], query, uid))
                    start = end
                    await self._writable()
                    if start < len(items):  # let the other sessions have a turn
                        await deferLater(self.factory.reactor, 0, lambda: None)
                    continue
                loaded = await mbox.load(items[start:end], level, mark_seen, cached, envelope,
                                         dated)
                start = end
                if level == NOTHING:
                    out = render_all(loaded, query, uid)
                else:  # structures and sections: rendered off the reactor thread
                    out = await mbox.account.run(render_all, loaded, query, uid)
                vanished += out.count(None)
                self.transport.write(b"".join(o for o in out if o is not None))
                await self._writable()
        finally:
            self.transport.unregisterProducer()
        if vanished:
            self.sendNegativeResponse(tag, b"[EXPUNGEISSUED] Some messages were expunged")
        else:
            self.sendPositiveResponse(tag, b"FETCH completed")
        if level == HEADER and items:
            mbox.save_index()  # after the answer

    select_FETCH = _command(do_FETCH, arg_seqset, imap4.IMAP4Server.arg_fetchatt)

    def do_STORE(self, tag: bytes, ranges: Any, mode: bytes, flags: list[bytes],
                 uid: int = 0) -> None:
        async def work() -> None:
            mbox = self._changeable(tag)
            if mbox is None:
                return
            kind = mode.upper()
            if kind.lstrip(b"+-") not in (b"FLAGS", b"FLAGS.SILENT"):
                raise IllegalClientResponse(f"bad STORE item {mode!r}")
            direction = 1 if kind.startswith(b"+") else -1 if kind.startswith(b"-") else 0
            wanted = _client_flags(flags)
            try:
                done = await mbox.store_flags(mbox.resolve(ranges, bool(uid)), wanted, direction)
            except TooManyKeywords as e:
                self.sendNegativeResponse(tag, b"[LIMIT] " + str(e).encode())
                return
            self._keywords_news()
            if not kind.endswith(b".SILENT"):
                for seq, entry in done:
                    extra = b" UID %d" % entry.uid if uid else b""
                    self.sendUntaggedResponse(b"%d FETCH (" % seq + _flags(entry) + extra + b")")
            self.sendPositiveResponse(tag, b"STORE completed")

        self._run(tag, work())

    select_STORE = _command(do_STORE, arg_seqset, imap4.IMAP4Server.arg_atom,
                    imap4.IMAP4Server.arg_flaglist)

    def do_SEARCH(self, tag: bytes, charset: Any, query: list[Any], uid: int = 0) -> None:
        async def work() -> None:
            mbox = self.mbox
            assert mbox is not None
            if charset and charset.upper() not in (b"UTF-8", b"US-ASCII"):
                self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported")
                return
            check_depth(query)
            found = await mbox.search_ids(query, bool(uid))
            self.sendUntaggedResponse(b"SEARCH" + b"".join(b" %d" % n for n in found))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        self._run(tag, work())

    select_SEARCH = _command(do_SEARCH, imap4.IMAP4Server.opt_charset,
                     imap4.IMAP4Server.arg_searchkeys)

    # -- COPY, MOVE, APPEND, EXPUNGE -------------------------------------------------

    def _transfer(self, tag: bytes, ranges: Any, name: bytes, uid: int, move: bool) -> None:
        async def work() -> None:
            mbox, account = self._changeable(tag) if move else self.mbox, self.account
            if mbox is None or account is None:
                return
            target = account.existing(_mailbox_name(name))
            items = mbox.resolve(ranges, bool(uid))
            validity, sources, uids = await mbox.transfer(target, items, move)
            code = b""
            if uids:
                code = b"[COPYUID %d %s %s] " % (
                    validity, ",".join(map(str, sources)).encode(),
                    ",".join(map(str, uids)).encode())
            if move:
                if code:
                    self.sendPositiveResponse(None, code.strip())
                await self._refresh()
                self.sendPositiveResponse(tag, b"MOVE completed")
            else:
                if target.path == mbox.folder.path:
                    await self._refresh()
                self.sendPositiveResponse(tag, code + b"COPY completed")

        self._run(tag, work())

    def do_COPY(self, tag: bytes, ranges: Any, name: bytes, uid: int = 0) -> None:
        self._transfer(tag, ranges, name, uid, move=False)

    def do_MOVE(self, tag: bytes, ranges: Any, name: bytes, uid: int = 0) -> None:
        self._transfer(tag, ranges, name, uid, move=True)

    select_COPY = _command(do_COPY, arg_seqset, imap4.IMAP4Server.arg_finalastring)
    select_MOVE = _command(do_MOVE, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def do_APPEND(self, tag: bytes, name: bytes, flags: Any, date: bytes | None,
                  message: Any) -> None:
        async def work() -> None:
            account = self.account
            assert account is not None
            mailbox = _mailbox_name(name)
            folder = account.existing(mailbox)
            wanted = _client_flags(flags or [])
            when = _parse_date(date)
            added: list[int] = []
            mbox = self.mbox
            selected = mbox is not None and mbox.folder.path == folder.path

            state = mbox.watch.state if mbox is not None and mbox.watch is not None else None

            def add() -> None:
                added.append(folder.add(_appended(message.read()), wanted, when,
                                        state if selected else None))

            try:
                if mbox is not None and selected:
                    # One worker job: the message stored, then the folder
                    # rescanned for this session's view.
                    changes = await mbox.refresh(before=add)
                else:
                    await account.run(add)
            except TooManyKeywords as e:
                self.sendNegativeResponse(tag, b"[LIMIT] " + str(e).encode())
                return
            except NulInMessage:
                log.info("imap: APPEND with a NUL octet refused for {client}",
                         client=self.client)
                self.sendNegativeResponse(tag, b"NUL octets are not allowed in a message")
                return
            uid, validity = added[0], folder.validity
            log.info("imap: APPEND to {folder} by {client}", folder=safe(mailbox),
                     client=self.client)
            if mbox is not None and selected:
                self._report(changes)
            self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed"
                                      % (validity, uid))

        self._run(tag, work())

    auth_APPEND = select_APPEND = _command(do_APPEND, imap4.IMAP4Server.arg_astring,
                                   imap4.IMAP4Server.opt_plist,
                                   imap4.IMAP4Server.opt_datetime, arg_literal)

    def do_EXPUNGE(self, tag: bytes, uids: Any = None) -> None:
        async def work() -> None:
            mbox = self._changeable(tag)
            if mbox is None:
                return
            chosen = None
            if uids is not None:
                chosen = {e.uid for _, e in mbox.resolve(uids, True)}
            self._report(await mbox.refresh(remove=mbox.deleted(chosen)))
            self.sendPositiveResponse(tag, b"EXPUNGE completed")

        self._run(tag, work())

    select_EXPUNGE = _command(do_EXPUNGE,)

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        command = command.upper()
        if command == b"EXPUNGE":
            ranges, rest = self.arg_seqset(line or b"")
            if rest:
                raise IllegalClientResponse("Too many arguments")
            self.do_EXPUNGE(tag, ranges)
            return
        if command not in (b"COPY", b"MOVE", b"FETCH", b"STORE", b"SEARCH"):
            raise IllegalClientResponse(command)
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = _command(do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)


class _ThrottledPortal:
    """
    The portal as one session sees it: every login goes through the shared
    L{LoginThrottle} (decided before the password is hashed), and failures
    and logins are logged.
    """

    def __init__(self, portal: Portal, throttle: LoginThrottle, session: IMAPServer) -> None:
        self.portal = portal
        self.throttle = throttle
        self.session = session

    def login(self, credentials: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._login(credentials, mind, *interfaces))

    async def _login(self, credentials: Any, mind: Any, *interfaces: Any) -> Any:
        user = getattr(credentials, "username", b"")
        if isinstance(user, bytes):
            user = user.decode("utf-8", "replace")
        session = self.session
        try:
            result = await self.throttle.attempt(
                session.ip, user, lambda: self.portal.login(credentials, mind, *interfaces),
                getattr(credentials, "password", None))
        except UnauthorizedLogin:
            log.warn("imap: failed login for {user} from {client}", user=safe(user, 100),
                     client=session.client)
            raise
        except LoginUnavailable as e:
            log.warn("imap: login for {user} from {client} refused: {reason}",
                     user=safe(user, 100), client=session.client, reason=e)
            raise
        log.info("imap: login of {user} from {client}", user=safe(user, 100),
                 client=session.client)
        return result


class IMAPFactory(Factory[IMAPServer]):
    noisy = False

    def __init__(self, portal: Portal, reactor: Any, throttle: LoginThrottle, tls: Any,
                 max_message_size: int, implicit_tls: bool = False,
                 limits: AccessLimits = AccessLimits()) -> None:
        self.portal = portal
        self.limits = limits
        self.reactor = reactor
        self.throttle = throttle
        self.tls = tls
        self.max_message_size = max_message_size
        self.implicit_tls = implicit_tls
        self.logout_deadline = LOGOUT_TLS_DEADLINE

    def buildProtocol(self, addr: Any) -> IMAPServer:
        return IMAPServer(self, self.implicit_tls)
