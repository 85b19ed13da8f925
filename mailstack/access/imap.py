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
  - IDLE notices deliveries by polling two directory mtimes every second.
"""

from __future__ import annotations

import email.utils
from typing import Any

from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import (
    IllegalClientResponse, MailboxException, _parseMbox,  # type: ignore[attr-defined]
)
from twisted.python.failure import Failure
from zope.interface import implementer

from mailstack.access.folder import PERMANENT_FLAGS, Entry
from mailstack.access.mailbox import (
    HEADER, NOTHING, WHOLE, Changes, Loaded, MaildirAccount, MaildirMailbox, MissingFolder,
    wildcard_match,
)
from mailstack.access.mime import lf, literal, string
from mailstack.access.search import SearchError, imap_date, parse_set
from mailstack.safeio import is_disk_full
from mailstack.sockets import set_nodelay
from mailstack.throttle import LoginThrottle

log = Logger()

FLAGS = b"(" + " ".join(PERMANENT_FLAGS).encode() + b")"
BATCH_MESSAGES = 200
BATCH_BYTES = 4 << 20


def _flags(entry: Entry) -> bytes:
    names = sorted(entry.flags) + (["\\Recent"] if entry.recent else [])
    return b"FLAGS (" + " ".join(names).encode() + b")"


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


def _system_flags(flags: list[Any]) -> set[str]:
    """
    The flags mailstack keeps, spelled as IMAP spells them; others dropped
    (PERMANENTFLAGS does not offer keywords).
    """
    known = {f.lower(): f for f in PERMANENT_FLAGS}
    names = (f.decode("utf-8", "replace") if isinstance(f, bytes) else f for f in flags)
    return {known[n.lower()] for n in names if n.lower() in known}


def _parse_date(value: bytes | None) -> float | None:
    if value is None:
        return None
    # "17-Jul-1996 02:44:25 -0700": only the date's dashes become spaces.
    parsed = email.utils.parsedate_tz(value.decode("ascii", "replace").replace("-", " ", 2))
    if parsed is None:
        raise IllegalClientResponse("bad date-time")
    return float(email.utils.mktime_tz(parsed))


@implementer(IPushProducer)
class IMAPServer(imap4.IMAP4Server):
    """
    One IMAP session; see the module docstring.
    """

    IDENT = b"mailstack IMAP4rev1 ready"
    MAX_LENGTH = 65536
    factory: "IMAPFactory"
    mbox: MaildirMailbox | None
    account: MaildirAccount | None

    def __init__(self, factory: "IMAPFactory", implicit_tls: bool) -> None:
        super().__init__(contextFactory=None if implicit_tls else factory.tls)
        self.factory = factory
        self.implicit_tls = implicit_tls
        self._busy = False
        self._waiting: list[bytes] = []
        self._drain_pending = False
        self._paused: Deferred[None] | None = None
        self._idle: LoopingCall | None = None
        self._idle_refresh: Deferred[Any] | None = None
        self._lost = False
        self.client = "?"

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        set_nodelay(self.transport)
        self.callLater = self.factory.reactor.callLater  # TimeoutMixin's clock
        peer = self.transport.getPeer()
        self.ip = getattr(peer, "host", "?")
        self.client = f"[{self.ip}]:{getattr(peer, 'port', 0)}"
        self.portal = _ThrottledPortal(self.factory.portal, self.factory.throttle, self)
        if self.implicit_tls:
            self._tls_started()
        log.info("imap: connect from {client}", client=self.client)
        super().connectionMade()

    def connectionLost(self, reason: Any = None) -> None:
        self._lost = True
        self._stop_idle()
        self._waiting = []
        if self._paused is not None:
            paused, self._paused = self._paused, None
            paused.callback(None)
        log.info("imap: disconnect from {client}", client=self.client)
        super().connectionLost(reason)

    def _tls_started(self) -> None:
        self.startedTLS = True
        self.challengers = {b"PLAIN": imap4.PLAINCredentials, b"LOGIN": imap4.LOGINCredentials}

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
        if self.parseState == "command" and (self._busy or self._waiting):
            if len(self._waiting) > 1000:
                self.sendLine(b"* BYE Too many pipelined commands")
                self.transport.loseConnection()
                return None
            self._waiting.append(line)
            return None
        return super().lineReceived(line)

    def parse_command(self, line: bytes) -> Any:
        words = line.split(None, 1)
        if not words:
            self.sendBadResponse(None, b"Null command")
            return None
        self._busy = True
        try:
            return super().parse_command(line)
        except Exception:
            log.failure("imap: command failed for {client}", client=self.client)
            self.sendBadResponse(words[0], b"Server error")
            return None

    def _respond(self, state: bytes, tag: bytes | None, message: bytes | None) -> None:
        super()._respond(state, tag, message)
        if tag not in (None, b"*") and state in (b"OK", b"NO", b"BAD"):
            self._busy = False
            if self._waiting and not self._drain_pending:
                self._drain_pending = True
                self.factory.reactor.callLater(0, self._drain)

    def _drain(self) -> None:
        self._drain_pending = False
        while (self._waiting and not self._busy and self.parseState == "command"
               and not self.transport.disconnecting):
            super().lineReceived(self._waiting.pop(0))

    def _run(self, tag: bytes, work: Any) -> None:
        """
        Run an C{async def} command; an unexpected failure is a tagged BAD.
        """
        d = Deferred.fromCoroutine(work)

        def failed(failure: Failure) -> None:
            if failure.check(SearchError, IllegalClientResponse):
                self.sendBadResponse(tag, str(failure.value).encode("utf-8", "replace"))
            elif failure.check(MissingFolder):
                self.sendNegativeResponse(tag, b"[TRYCREATE] " + str(failure.value).encode())
            elif failure.check(MailboxException):
                self.sendNegativeResponse(tag, str(failure.value).encode("utf-8", "replace"))
            elif failure.check(OSError):
                self.sendNegativeResponse(tag, self._storage_failed(failure.value))
            else:
                log.failure("imap: command failed for {client}", failure, client=self.client)
                self.sendBadResponse(tag, b"Server error")

        d.addErrback(failed)

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
        if failure.check(OSError):  # the first login creates the Maildir
            self.sendNegativeResponse(tag, self._storage_failed(failure.value))
        else:
            imap4.IMAP4Server._IMAP4Server__ebLogin(self, failure, tag)  # type: ignore[attr-defined]

    def _IMAP4Server__ebAuthResp(self, failure: Failure, tag: bytes) -> None:
        if failure.check(OSError):
            self.sendNegativeResponse(tag, self._storage_failed(failure.value))
        else:
            imap4.IMAP4Server._IMAP4Server__ebAuthResp(self, failure, tag)  # type: ignore[attr-defined]

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
        self._buffer = b""
        self._waiting = []
        self.transport.startTLS(self.ctx())
        self._tls_started()
        log.info("imap: STARTTLS from {client}", client=self.client)

    unauth_STARTTLS = (do_STARTTLS,)

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

    unauth_LOGIN = (do_LOGIN, imap4.IMAP4Server.arg_astring, imap4.IMAP4Server.arg_finalastring)

    def do_AUTHENTICATE(self, tag: bytes, args: bytes) -> None:
        if self._may_login(tag):
            super().do_AUTHENTICATE(tag, args)

    unauth_AUTHENTICATE = (do_AUTHENTICATE, imap4.IMAP4Server.arg_atom)

    def do_ID(self, tag: bytes, rest: bytes) -> None:
        self.sendUntaggedResponse(b'ID ("name" "mailstack")')
        self.sendPositiveResponse(tag, b"ID completed")

    unauth_ID = auth_ID = select_ID = (do_ID, imap4.IMAP4Server.arg_line)

    # -- arguments -----------------------------------------------------------------

    def arg_seqset(self, line: bytes) -> tuple[Any, bytes]:
        word, _, rest = line.partition(b" ")
        try:
            return parse_set(word), rest
        except SearchError as e:
            raise IllegalClientResponse(str(e))

    def arg_literal(self, line: bytes) -> Any:
        try:
            size = int(line[1:-1])
        except ValueError:
            raise IllegalClientResponse("Malformed literal")
        if size > self.factory.max_message_size:
            raise IllegalClientResponse(
                f"[TOOBIG] Messages are limited to {self.factory.max_message_size} bytes")
        return super().arg_literal(line)

    def arg_mailbox(self, line: bytes) -> Any:
        return self.arg_astring(line)

    # -- namespace, list, status -------------------------------------------------

    def do_NAMESPACE(self, tag: bytes) -> None:
        self.sendUntaggedResponse(b'NAMESPACE (("" ".")) NIL NIL')
        self.sendPositiveResponse(tag, b"NAMESPACE completed")

    auth_NAMESPACE = select_NAMESPACE = (do_NAMESPACE,)

    def do_LIST(self, tag: bytes, ref: bytes, pattern: bytes, subscribed: int,
                command: bytes) -> None:
        async def work() -> None:
            ref_name, wanted = _parseMbox(ref), _parseMbox(pattern)
            account = self.account
            if not wanted and not subscribed:
                self.sendUntaggedResponse(b'LIST (\\Noselect) "." ""')
                self.sendPositiveResponse(tag, b"LIST completed")
                return
            infos = await account.run(account.folders)
            names = await account.run(account.subscriptions) if subscribed else None
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

    auth_LIST = select_LIST = (do_LIST, imap4.IMAP4Server.arg_astring,
                               imap4.IMAP4Server.arg_astring, 0, b"LIST")
    auth_LSUB = select_LSUB = (do_LIST, imap4.IMAP4Server.arg_astring,
                               imap4.IMAP4Server.arg_astring, 1, b"LSUB")

    def do_STATUS(self, tag: bytes, name: bytes, names: list[bytes]) -> None:
        async def work() -> None:
            mailbox = _parseMbox(name)
            folder = self.account.existing(mailbox)  # type: ignore[union-attr]
            snapshot = await self.account.run(folder.status)  # type: ignore[union-attr]
            values = {
                b"MESSAGES": len(snapshot.entries),
                b"RECENT": sum(1 for e in snapshot.entries if e.sub == "new"),
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

    auth_STATUS = select_STATUS = (do_STATUS, imap4.IMAP4Server.arg_astring,
                                   imap4.IMAP4Server.arg_plist)

    # -- folders ---------------------------------------------------------------------

    def _folder_command(self, tag: bytes, method: str, *names: bytes) -> None:
        async def work() -> None:
            decoded = [_parseMbox(n) for n in names]
            await getattr(self.account, method)(*decoded)
            self.sendPositiveResponse(tag, method.upper().encode() + b" completed")

        self._run(tag, work())

    def do_CREATE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "create", name)

    def do_DELETE(self, tag: bytes, name: bytes) -> None:
        if self.mbox is not None and _parseMbox(name) == self.mbox.name:
            self.sendNegativeResponse(tag, b"Close the folder before deleting it")
            return
        self._folder_command(tag, "delete", name)

    def do_RENAME(self, tag: bytes, old: bytes, new: bytes) -> None:
        self._folder_command(tag, "rename", old, new)

    def do_SUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "subscribe", name)

    def do_UNSUBSCRIBE(self, tag: bytes, name: bytes) -> None:
        self._folder_command(tag, "unsubscribe", name)

    auth_CREATE = select_CREATE = (do_CREATE, imap4.IMAP4Server.arg_finalastring)
    auth_DELETE = select_DELETE = (do_DELETE, imap4.IMAP4Server.arg_finalastring)
    auth_RENAME = select_RENAME = (do_RENAME, imap4.IMAP4Server.arg_astring,
                                   imap4.IMAP4Server.arg_finalastring)
    auth_SUBSCRIBE = select_SUBSCRIBE = (do_SUBSCRIBE, imap4.IMAP4Server.arg_finalastring)
    auth_UNSUBSCRIBE = select_UNSUBSCRIBE = (do_UNSUBSCRIBE,
                                             imap4.IMAP4Server.arg_finalastring)

    # -- SELECT, CLOSE ---------------------------------------------------------------

    def _deselect(self) -> None:
        if self.mbox is not None:
            self.mbox.removeListener(self)
        self.mbox = None
        self.state = "auth"

    def do_SELECT(self, tag: bytes, name: bytes, rw: int, command: bytes) -> None:
        async def work() -> None:
            self._deselect()
            mailbox = _parseMbox(name)
            mbox = await self.account.select(mailbox, bool(rw))  # type: ignore[union-attr]
            if mbox is None:
                self.sendNegativeResponse(tag, b"No such folder")
                return
            self.sendUntaggedResponse(b"FLAGS " + FLAGS)
            self.sendPositiveResponse(None, b"[PERMANENTFLAGS " + FLAGS + b"] Limited")
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

    auth_SELECT = select_SELECT = (do_SELECT, imap4.IMAP4Server.arg_astring, 1, b"SELECT")
    auth_EXAMINE = select_EXAMINE = (do_SELECT, imap4.IMAP4Server.arg_astring, 0, b"EXAMINE")

    def do_CLOSE(self, tag: bytes) -> None:
        async def work() -> None:
            mbox = self.mbox
            if mbox is not None and mbox.rw:
                await mbox.remove_deleted()
            self._deselect()
            self.sendPositiveResponse(tag, b"CLOSE completed")

        self._run(tag, work())

    select_CLOSE = (do_CLOSE,)

    def do_UNSELECT(self, tag: bytes) -> None:
        self._deselect()
        self.sendPositiveResponse(tag, b"UNSELECT completed")

    select_UNSELECT = (do_UNSELECT,)

    # -- reporting changes -------------------------------------------------------------

    def _report(self, changes: Changes) -> None:
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

    def do_NOOP(self, tag: bytes) -> None:
        async def work() -> None:
            await self._refresh()
            self.sendPositiveResponse(tag, b"NOOP completed")

        self._run(tag, work())

    auth_NOOP = select_NOOP = unauth_NOOP = (do_NOOP,)

    def do_CHECK(self, tag: bytes) -> None:
        async def work() -> None:
            await self._refresh()
            self.sendPositiveResponse(tag, b"CHECK completed")

        self._run(tag, work())

    select_CHECK = (do_CHECK,)

    def do_IDLE(self, tag: bytes) -> None:
        self.sendContinuationRequest(b"idling")
        self.parseTag = tag
        self.lastState = self.parseState
        self.parseState = "idle"
        self._idle = LoopingCall(self._idle_poll)
        self._idle.clock = self.factory.reactor
        self._idle.start(1.0, now=True).addErrback(
            lambda f: log.failure("imap: IDLE poll failed", f))

    auth_IDLE = select_IDLE = (do_IDLE,)

    def _idle_poll(self) -> Deferred[Any] | None:
        mbox = self.mbox
        if mbox is None or not mbox.changed_on_disk() or self._idle_refresh is not None:
            return None
        d = Deferred.fromCoroutine(self._refresh())

        def done(result: Any) -> None:
            self._idle_refresh = None
            if isinstance(result, Failure):
                log.failure("imap: IDLE refresh failed for {client}", result,
                            client=self.client)

        self._idle_refresh = d
        d.addBoth(done)
        return None

    def _stop_idle(self) -> None:
        if self._idle is not None and self._idle.running:
            self._idle.stop()
        self._idle = None

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
                loaded = await mbox.load(items[start:end], level, mark_seen)
                start = end
                out = []
                for message in loaded:
                    if message is None:
                        vanished += 1
                    else:
                        out.append(render(message, query, uid))
                self.transport.write(b"".join(out))
                await self._writable()
        finally:
            self.transport.unregisterProducer()
        if vanished:
            self.sendNegativeResponse(tag, b"[EXPUNGEISSUED] Some messages were expunged")
        else:
            self.sendPositiveResponse(tag, b"FETCH completed")

    select_FETCH = (do_FETCH, arg_seqset, imap4.IMAP4Server.arg_fetchatt)

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
            done = await mbox.store_flags(mbox.resolve(ranges, bool(uid)),
                                          _system_flags(flags), direction)
            if not kind.endswith(b".SILENT"):
                for seq, entry in done:
                    extra = b" UID %d" % entry.uid if uid else b""
                    self.sendUntaggedResponse(b"%d FETCH (" % seq + _flags(entry) + extra + b")")
            self.sendPositiveResponse(tag, b"STORE completed")

        self._run(tag, work())

    select_STORE = (do_STORE, arg_seqset, imap4.IMAP4Server.arg_atom,
                    imap4.IMAP4Server.arg_flaglist)

    def do_SEARCH(self, tag: bytes, charset: Any, query: list[Any], uid: int = 0) -> None:
        async def work() -> None:
            mbox = self.mbox
            assert mbox is not None
            if charset and charset.upper() not in (b"UTF-8", b"US-ASCII"):
                self.sendNegativeResponse(tag, b"[BADCHARSET (UTF-8 US-ASCII)] Unsupported")
                return
            found = await mbox.search_ids(query, bool(uid))
            self.sendUntaggedResponse(b"SEARCH" + b"".join(b" %d" % n for n in found))
            self.sendPositiveResponse(tag, b"SEARCH completed")

        self._run(tag, work())

    select_SEARCH = (do_SEARCH, imap4.IMAP4Server.opt_charset,
                     imap4.IMAP4Server.arg_searchkeys)

    # -- COPY, MOVE, APPEND, EXPUNGE -------------------------------------------------

    def _transfer(self, tag: bytes, ranges: Any, name: bytes, uid: int, move: bool) -> None:
        async def work() -> None:
            mbox, account = self._changeable(tag) if move else self.mbox, self.account
            if mbox is None or account is None:
                return
            target = account.existing(_parseMbox(name))
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

    select_COPY = (do_COPY, arg_seqset, imap4.IMAP4Server.arg_finalastring)
    select_MOVE = (do_MOVE, arg_seqset, imap4.IMAP4Server.arg_finalastring)

    def do_APPEND(self, tag: bytes, name: bytes, flags: Any, date: bytes | None,
                  message: Any) -> None:
        async def work() -> None:
            account = self.account
            assert account is not None
            mailbox = _parseMbox(name)
            folder = account.existing(mailbox)
            wanted = _system_flags(flags or [])
            when = _parse_date(date)
            uid = await account.run(lambda: folder.add(lf(message.read()), wanted, when))
            validity = await account.run(folder.uid_validity)
            log.info("imap: APPEND to {folder} by {client}", folder=mailbox, client=self.client)
            if self.mbox is not None and self.mbox.folder.path == folder.path:
                await self._refresh()
            self.sendPositiveResponse(tag, b"[APPENDUID %d %d] APPEND completed"
                                      % (validity, uid))

        self._run(tag, work())

    auth_APPEND = select_APPEND = (do_APPEND, imap4.IMAP4Server.arg_astring,
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
            await mbox.remove_deleted(chosen)
            await self._refresh()
            self.sendPositiveResponse(tag, b"EXPUNGE completed")

        self._run(tag, work())

    select_EXPUNGE = (do_EXPUNGE,)

    def do_UID(self, tag: bytes, command: bytes, line: bytes) -> None:
        command = command.upper()
        if command == b"EXPUNGE":
            ranges, rest = self.arg_seqset(line)
            self.do_EXPUNGE(tag, ranges)
            return
        if command not in (b"COPY", b"MOVE", b"FETCH", b"STORE", b"SEARCH"):
            raise IllegalClientResponse(command)
        self.dispatchCommand(tag, command, line, uid=1)

    select_UID = (do_UID, imap4.IMAP4Server.arg_atom, imap4.IMAP4Server.arg_line)


class _ThrottledPortal:
    """
    The portal as one session sees it, with SMTP AUTH's throttle: from the
    fourth recent failure every answer (right or wrong) is delayed, and
    failures and logins are logged.
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
        delay = self.throttle.delay(session.ip, user or None)
        try:
            result = await self.portal.login(credentials, mind, *interfaces)
        except UnauthorizedLogin:
            if delay:
                await deferLater(session.factory.reactor, delay)
            self.throttle.failed(session.ip, user or None)
            log.warn("imap: failed login for {user} from {client}", user=user[:100],
                     client=session.client)
            raise
        if delay:
            await deferLater(session.factory.reactor, delay)
        self.throttle.succeeded(session.ip, user)
        log.info("imap: login of {user} from {client}", user=user, client=session.client)
        return result


class IMAPFactory(Factory):
    noisy = False

    def __init__(self, portal: Portal, reactor: Any, throttle: LoginThrottle, tls: Any,
                 max_message_size: int, implicit_tls: bool = False) -> None:
        self.portal = portal
        self.reactor = reactor
        self.throttle = throttle
        self.tls = tls
        self.max_message_size = max_message_size
        self.implicit_tls = implicit_tls

    def buildProtocol(self, addr: Any) -> IMAPServer:
        return IMAPServer(self, self.implicit_tls)
