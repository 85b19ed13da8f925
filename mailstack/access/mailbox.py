# -*- test-case-name: tests.test_imap -*-
"""
A user's Maildir++ as Twisted's IMAP interfaces: L{MaildirAccount}
(C{IAccount}), L{MaildirMailbox} (C{IMailbox}, C{ISearchableMailbox}) and
L{MaildirMessage} (C{IMessage}, C{IMessageFile}).

INBOX is the Maildir root; another folder C{A.B} is the directory
C{.A.B} (names in modified UTF-7, hierarchy delimiter C{.}).  Every file
operation runs in a worker thread and the methods return Deferreds.

A session's view of the selected folder (its sequence numbers) changes
only when the session asks for L{MaildirMailbox.refresh}, so messages
delivered, flagged or expunged by others are reported at the moments IMAP
allows (NOOP, IDLE, EXPUNGE, ...), never in the middle of a FETCH.
"""

from __future__ import annotations

import bisect
import email.utils
import fcntl
import functools
import io
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.mail import imap4
from twisted.mail.imap4 import MailboxException
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.access.cache import PART_OVERHEAD, PartCache, parsed
from mailstack.access.limits import MAX_FOLDER_NAME, MAX_FOLDERS, FolderLimit
from mailstack.access.index import (
    CachedPart, FolderIndex, Record, indexes, make_record, search_cacheable,
)
from mailstack.access.folder import (
    PERMANENT_FLAGS, Entry, Folder, Snapshot, ensure_folder,
)
from mailstack.access.mime import Part, crlf, lf
from mailstack.access.search import Candidate, Columns, Messages, Ranges, evaluate, needs
from mailstack.access.watch import FolderWatch, Watches
from mailstack.nofollow import SymlinkRefused, open_file
from mailstack.safeio import atomic_write, temporary_name

log = Logger()

DELIMITER = "."
SPECIAL = {"Sent": "\\Sent", "Drafts": "\\Drafts", "Trash": "\\Trash", "Junk": "\\Junk"}
SUBSCRIPTIONS = "subscriptions"

NOTHING, HEADER, WHOLE = 0, 1, 2
INDEX_SAVE_INTERVAL = 5.0  # seconds between two writes of a folder's index
_index_saved: dict[str, float] = {}  # folder path -> when its index was last written


def folder_dirname(name: str) -> str:
    """
    The directory of folder C{name} under the Maildir root, after checking
    the name cannot reach outside it.
    """
    if name.upper() == "INBOX":
        return ""
    if name.upper().startswith("INBOX" + DELIMITER):
        raise MailboxException("Folders under INBOX are not supported here")
    parts = name.split(DELIMITER)
    if (not name or any(not p for p in parts)
            or any(c in name for c in "/\\\0\r\n") or any(ord(c) < 32 for c in name)):
        raise MailboxException(f"Invalid folder name {name[:100]!r}")
    encoded = name.encode("imap4-utf-7").decode("ascii")
    if len(encoded) + 1 > MAX_FOLDER_NAME:
        raise FolderLimit(f"Folder names are limited to {MAX_FOLDER_NAME - 1} bytes"
                          " (modified UTF-7)")
    return "." + encoded


def folder_name(dirname: str) -> str:
    return dirname[1:].encode("ascii").decode("imap4-utf-7")


@dataclass
class Loaded:
    """
    A message ready to render: its entry, its content as far as needed, and
    its arrival time.
    """

    seq: int
    entry: Entry
    part: Part | CachedPart | None
    internal_date: float
    flags_changed: bool = False


@dataclass
class Changes:
    """
    What a refresh found, in the order IMAP reports it.
    """

    expunged: list[int] = field(default_factory=list)  # sequence numbers, highest first
    exists: int | None = None
    recent: int | None = None
    flags: list[tuple[int, Entry]] = field(default_factory=list)


class MissingFolder(MailboxException):
    """
    A folder that does not exist (answered C{NO [TRYCREATE]}).
    """


@implementer(imap4.IMessage, imap4.IMessageFile)
class MaildirMessage:
    """
    One message for Twisted's interfaces.  mailstack's own server renders
    L{Loaded} instead and never calls these on the reactor thread.
    """

    def __init__(self, loaded: Loaded) -> None:
        self.loaded = loaded

    def _part(self) -> Part:
        part = self.loaded.part  # always a whole Part here: fetch() loads WHOLE
        return part if isinstance(part, Part) else Part(b"")

    def getHeaders(self, negate: bool, *names: Any) -> dict[str, str]:
        wanted = {n.decode() if isinstance(n, bytes) else n for n in names}
        wanted = {n.lower() for n in wanted}
        fields = self._part().fields
        return {k.lower(): str(v) for k, v in fields.items()
                if not names or ((k.lower() in wanted) != negate)}

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self._part().body)

    def getSize(self) -> int:
        return self.loaded.entry.size

    def isMultipart(self) -> bool:
        return self._part().multipart

    def getSubPart(self, part: int) -> Any:
        children = self._part().children()
        if not 0 <= part < len(children):
            raise IndexError(part)
        entry = Entry(0, "", "", "", len(children[part].body))
        return MaildirMessage(Loaded(0, entry, children[part], self.loaded.internal_date))

    def getUID(self) -> int:
        return self.loaded.entry.uid

    def getFlags(self) -> list[str]:
        return sorted(self.loaded.entry.flags) + (
            ["\\Recent"] if self.loaded.entry.recent else [])

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.loaded.internal_date, localtime=True)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self._part().raw)


def _read_header(f: Any) -> bytes:
    """
    The header block of a stored message, without reading its body.
    """
    data = b""
    while len(data) < 1 << 20:
        chunk = f.read(8192)
        if not chunk:
            break
        data += chunk
        end = data.find(b"\n\n")
        if end >= 0 or data.startswith(b"\n"):
            return data[:end + 2] if end >= 0 else b"\n"
    return data


def load(folder: Folder, items: list[tuple[int, Entry]], level: int,
         mark_seen: bool = False, cached: bool = False, envelope: bool = False
         ) -> list[Loaded | None]:
    """
    Read what a FETCH or SEARCH needs of each message; None for a message
    that is gone.  Blocking.

    @param cached: the request needs only what the folder's index keeps
        (L{mailstack.access.index}): a message it knows is not opened.
    @param envelope: the request shows ENVELOPE (kept in the index too).
    """
    out: list[Loaded | None] = []
    index = indexes.get(folder.path) if level <= HEADER else None
    for seq, entry in items:
        record = index.get(entry.base, entry.size, entry.inode) if index else None
        found: tuple[float, Part | CachedPart | None] | None
        if record is not None and level == NOTHING:
            found = record.mtime, None
        elif record is not None and cached and index is not None:
            if envelope and record.envelope is None:
                CachedPart(record).envelope()
                index.put(entry.base, record)
            found = record.mtime, CachedPart(record)
        else:
            found = _read(folder, entry, level, index, cached, envelope)
        if found is None:
            out.append(None)
            continue
        changed = False
        if mark_seen and "\\Seen" not in entry.flags:
            changed = folder.change_flags([entry], add={"\\Seen"})[0]
        out.append(Loaded(seq, entry, found[1], found[0], changed))
    return out


def search_folder(folder: Folder, view: list[tuple[int, Entry]], query: list[Any], uid: bool,
                  columns: Columns | None = None) -> list[int]:
    """
    The sequence numbers (or UIDs, if C{uid}) of the messages of C{view}
    that C{query} matches.  Blocking.

    @param columns: the header-field texts kept between searches (see
        L{mailstack.access.search.evaluate}).
    @raise SearchError: the query is malformed.
    """
    level = needs(query)
    cached = search_cacheable(query)
    last_seq = len(view)
    last_uid = view[-1][1].uid if view else 0
    evaluate(query, [], last_seq, last_uid)  # keys lacking arguments: BAD before reading
    # The messages the index knows are searched from their records,
    # nothing made per message; the others are read (and recorded).
    index = indexes.get(folder.path) if cached and level == HEADER else None
    records = ([index.get(e.base, e.size, e.inode) for _, e in view] if index
               else [None] * len(view))
    unknown = [item for item, record in zip(view, records) if record is None]
    read: dict[int, Loaded | None] = {}
    for start in range(0, len(unknown), 200):
        batch = unknown[start:start + 200]
        for (seq, _), loaded in zip(batch, load(folder, batch, level, cached=cached)):
            read[seq] = loaded
    kept: list[tuple[int, Entry]] = []
    sources: list[Record | Part | None] = []
    dates: list[float] = []
    for (seq, entry), record in zip(view, records):
        if record is None:
            loaded = read[seq]
            if loaded is None:
                continue  # gone
            part = loaded.part  # recorded now: known by its record
            sources.append(part.record if isinstance(part, CachedPart) else part)
            dates.append(loaded.internal_date)
        else:
            sources.append(record)
            dates.append(record.mtime)
        kept.append((seq, entry))

    def candidate(i: int) -> Candidate:
        seq, entry = kept[i]
        flags = set(entry.flags) | ({"\\Recent"} if entry.recent else set())
        source = sources[i]
        part = CachedPart(source) if isinstance(source, Record) else source
        return Candidate(seq, entry.uid, flags, entry.size, dates[i], part)

    # Column-wise: each header key tested over every message at once.
    hits = evaluate(query, Messages(sources, candidate), last_seq, last_uid, columns)
    return [entry.uid if uid else seq for (seq, entry), hit in zip(kept, hits) if hit]


def _read(folder: Folder, entry: Entry, level: int, index: FolderIndex | None = None,
          cached: bool = False, envelope: bool = False
          ) -> tuple[float, Part | CachedPart | None] | None:
    for _ in range(2):
        try:
            path = entry.path(folder.path)
            if level == NOTHING:
                return os.lstat(path).st_mtime, None
            with open_file(path) as f:
                stat = os.fstat(f.fileno())
                mtime = stat.st_mtime
                if level == HEADER:
                    part = Part(crlf(_read_header(f)))  # parsed only as needed
                    if index is not None and entry.inode == stat.st_ino:
                        record = make_record(part.header, stat, entry.size, envelope)
                        if record is not None:
                            index.put(entry.base, record)
                            if cached:  # the ENVELOPE made once
                                return mtime, CachedPart(record)
                    return mtime, part
                return mtime, _parsed(f)
        except FileNotFoundError:
            if not folder.locate(entry):
                return None
        except SymlinkRefused as e:
            log.warn("imap: not serving {path}: {error}", path=e.filename, error=e.strerror)
            return None
    return None


def _parsed(f: Any) -> Part:
    """
    The whole message, parsed (every part, within the limits), from the
    cache when another FETCH parsed it before.  Blocking: call it in a
    worker thread, never on the reactor's.
    """
    key = PartCache.key(os.fstat(f.fileno()))
    part = parsed.get(key)
    if part is None:
        part = Part(crlf(f.read())).parse_all()
        parsed.put(key, part, len(part.raw) + PART_OVERHEAD * part.budget.parts)
    return part


def wildcard_match(pattern: str, name: str) -> bool:
    """
    LIST patterns: C{*} matches anything, C{%} anything but the delimiter;
    INBOX matches in any case.
    """
    return _matcher(pattern)(name)


@functools.lru_cache(maxsize=64)
def _matcher(pattern: str) -> Any:
    """
    A LIST pattern compiled once.  A pattern with many wildcards is run as
    a set of positions (linear in the name, whatever the pattern) instead
    of a backtracking regex, which a pattern like C{*a*a*a*a*b} makes
    exponential.
    """
    pattern = re.sub(r"\*[*%]*", "*", pattern)  # runs of wildcards: one "*" if any
    if pattern.count("*") + pattern.count("%") <= 2:
        regex = "".join(".*" if c == "*" else "[^.]*" if c == "%" else re.escape(c)
                        for c in pattern)
        exact = re.compile(regex, re.DOTALL)
        folded = re.compile(regex, re.DOTALL | re.IGNORECASE)
        return lambda name: (folded if name == "INBOX" else exact).fullmatch(name) is not None

    def closure(states: set[int]) -> set[int]:
        stack = list(states)
        while stack:
            i = stack.pop()
            if i < len(pattern) and pattern[i] in "*%" and i + 1 not in states:
                states.add(i + 1)
                stack.append(i + 1)
        return states

    def match(name: str) -> bool:
        fold = name == "INBOX"
        states = closure({0})
        for c in name:
            step = set()
            for i in states:
                if i >= len(pattern):
                    continue
                p = pattern[i]
                if p == "*" or (p == "%" and c != DELIMITER):
                    step.add(i)
                elif p == c or (fold and p.upper() == c.upper()):
                    step.add(i + 1)
            if not step:
                return False
            states = closure(step)
        return len(pattern) in states

    return match


@implementer(imap4.IMailbox, imap4.ISearchableMailbox)
class MaildirMailbox:
    """
    The selected folder of one session.
    """

    def __init__(self, account: "MaildirAccount", name: str, folder: Folder,
                 snapshot: Snapshot, rw: bool, watch: FolderWatch | None = None,
                 generation: int = 0) -> None:
        self.account = account
        self.name = name
        self.folder = folder
        self.rw = rw
        self.view: list[Entry] = (snapshot.entries if snapshot.recent_from is None
                                  else [snapshot.own(e) for e in snapshot.entries])
        self.validity = snapshot.validity
        self.uid_next = snapshot.uid_next
        self.listeners: list[Any] = []
        self.keywords_sent: list[str] = []  # the keywords this session was told of
        if watch is None:  # made by hand: a watch of its own, seen now
            watch = account.watches.acquire(folder.path)
            generation = watch.poll()
        self.watch: FolderWatch | None = watch
        self._generation = generation  # the watch's, read before the last scan began
        self._unsaved_index: FolderIndex | None = None  # changed, its write put off
        # SEARCH's header-field texts of every message, with the records
        # they were made of (see mailstack.access.search.evaluate).
        self.search_columns: Columns = {}

    def _run(self, f: Any, *args: Any) -> Deferred[Any]:
        return self.account.run(f, *args)

    # -- the view --------------------------------------------------------------

    def resolve(self, ranges: Ranges, uid: bool) -> list[tuple[int, Entry]]:
        """
        The (sequence number, entry) pairs a sequence set names.
        """
        if not self.view:
            return []
        count = len(self.view)
        chosen: set[int] = set()  # indexes into the view
        if uid:
            uids = [e.uid for e in self.view]  # ascending
            for lo, hi in ranges:
                a = uids[-1] if lo is None else lo
                b = uids[-1] if hi is None else hi
                chosen.update(range(bisect.bisect_left(uids, min(a, b)),
                                    bisect.bisect_right(uids, max(a, b))))
        else:
            for lo, hi in ranges:
                a = count if lo is None else lo
                b = count if hi is None else hi
                chosen.update(range(max(1, min(a, b)) - 1, min(count, max(a, b))))
        return [(i + 1, self.view[i]) for i in sorted(chosen)]

    def changed_on_disk(self) -> bool:
        """
        Whether a delivery, a flag change or an expunge by anyone may have
        touched the folder since the last refresh began (O(1): see
        L{mailstack.access.watch}); NOOP, CHECK and IDLE rescan only then.
        """
        if self.watch is None:
            return True
        return self.watch.changed_since(self._generation)

    def close(self) -> None:
        """
        The session leaves the folder: give its watch back.
        """
        watch, self.watch = self.watch, None
        unsaved = self._unsaved_index
        if unsaved is not None and unsaved.dirty:
            self._write_index(unsaved, self.account.reactor.seconds())  # type: ignore[attr-defined]  # IReactorTime too
        if watch is not None:
            self.account.watches.release(watch)
            if not self.account.watches.watched(self.folder.path):
                # Nobody here has it selected: its index leaves memory (it
                # is read again from its file at the next FETCH).
                indexes.forget(self.folder.path)

    def refresh(self, remove: list[Entry] | None = None, before: Any = None
                ) -> Deferred[Changes]:
        """
        Bring the view up to date, and say what changed.  The scan is
        shared: when another session of the process already scanned the
        folder since its last change, its snapshot serves without a scan
        (L{FolderState.take}); else a scan in a worker thread reads only
        what the folder's state does not know yet.

        @param remove: messages to remove first, in the same worker job
            (EXPUNGE).
        @param before: a callable to run first in that job (APPEND).
        """
        watch = self.watch
        generation = watch.poll() if watch is not None else 0
        state = watch.state if watch is not None else None
        sizes = {} if state is not None else {e.base: e.size for e in self.view}

        def scan() -> Snapshot:
            if before is not None:
                before()
            for entry in remove or ():
                self.folder.remove(entry)
            return self.folder.scan(claim_new=self.rw, sizes=sizes, state=state,
                                    generation=generation)

        def apply(snapshot: Snapshot) -> Changes:
            self._generation = generation
            changes = Changes()
            current = {e.uid: e for e in snapshot.entries}
            kept = []
            for seq in range(len(self.view), 0, -1):
                if self.view[seq - 1].uid not in current:
                    changes.expunged.append(seq)
            known = set()
            for entry in self.view:
                fresh = current.get(entry.uid)
                if fresh is None:
                    continue
                known.add(entry.uid)
                flags_before = entry.flags  # replaced, never changed in place
                entry.sub, entry.name, entry.flags = fresh.sub, fresh.name, fresh.flags
                entry.inode = fresh.inode
                kept.append(entry)
                if flags_before is not fresh.flags and flags_before != fresh.flags:
                    changes.flags.append((len(kept), entry))
            added = [snapshot.own(e) for e in snapshot.entries if e.uid not in known]
            self.view = kept + added
            self.uid_next = snapshot.uid_next
            if added or changes.expunged:
                changes.exists = len(self.view)
            if added:
                changes.recent = self.getRecentCount()
            return changes

        if state is not None and not remove and before is None:
            snapshot = state.take(generation, self.folder.path)
            if snapshot is not None:
                self.folder.keywords = list(state.keywords)
                return succeed(apply(snapshot))
        return self._run(scan).addCallback(apply)

    # -- operations for the server ----------------------------------------------

    def load(self, items: list[tuple[int, Entry]], level: int,
             mark_seen: bool = False, cached: bool = False, envelope: bool = False,
             dated: bool = True) -> Deferred[list[Loaded | None]]:
        """
        L{load} in a worker thread; what the view knows (FLAGS, UID,
        RFC822.SIZE: C{level} L{NOTHING} and not C{dated}) at once, with no
        file touched and no thread.
        """
        if level == NOTHING and not dated and not mark_seen:
            return succeed([Loaded(seq, entry, None, 0.0) for seq, entry in items])
        return self._run(load, self.folder, items, level, mark_seen and self.rw, cached,
                         envelope)

    def save_index(self, force: bool = False) -> None:
        """
        Write the folder's index in a worker thread if it changed (after a
        FETCH was answered), keeping the records of the messages this
        session sees.  Not within L{INDEX_SAVE_INTERVAL} seconds of the
        last write of the folder's index by this process, unless
        C{force}d: sessions that keep appending and listing would rewrite
        the whole index at every command.  What is left unwritten is
        written by a later FETCH, or when the session leaves the folder.
        """
        index = indexes.get(self.folder.path)  # read already by the FETCH
        if not index.dirty:
            return
        path = self.folder.path
        now = self.account.reactor.seconds()  # type: ignore[attr-defined]  # IReactorTime too
        if not force and now < _index_saved.get(path, -INDEX_SAVE_INTERVAL) + INDEX_SAVE_INTERVAL:
            self._unsaved_index = index
            return
        self._write_index(index, now)

    def _write_index(self, index: FolderIndex, now: float) -> None:
        self._unsaved_index = None
        if len(_index_saved) > 1024:
            _index_saved.clear()
        _index_saved[self.folder.path] = now
        live = [e.base for e in self.view]
        self._run(index.save, live).addErrback(
            lambda f: log.failure("imap: writing the index failed", f))

    def store_flags(self, items: list[tuple[int, Entry]], flags: Iterable[str],
                    mode: int) -> Deferred[list[tuple[int, Entry]]]:
        """
        Replace (0), add (1) or remove (-1) flags, each against the
        message's state on disk at that moment; the entries still there.
        """
        wanted = set(flags)

        def work() -> list[tuple[int, Entry]]:
            entries = [entry for _, entry in items]
            if mode > 0:
                there = self.folder.change_flags(entries, add=wanted)
            elif mode < 0:
                there = self.folder.change_flags(entries, remove=wanted)
            else:
                there = self.folder.change_flags(entries, replace=wanted)
            return [item for item, kept in zip(items, there) if kept]

        return self._run(work)

    def deleted(self, uids: set[int] | None = None) -> list[Entry]:
        """
        The messages this session sees as \\Deleted (only those in C{uids},
        if given).
        """
        return [e for e in self.view if "\\Deleted" in e.flags
                and (uids is None or e.uid in uids)]

    def remove_deleted(self, uids: set[int] | None = None) -> Deferred[None]:
        """
        Remove the messages this session sees as \\Deleted (only those in
        C{uids}, if given).
        """
        doomed = self.deleted(uids)

        def work() -> None:
            for entry in doomed:
                self.folder.remove(entry)

        return self._run(work)

    def transfer(self, target: Folder, items: list[tuple[int, Entry]], move: bool
                 ) -> Deferred[tuple[int, list[int], list[int]]]:
        """
        Copy (hard links) or move messages into C{target}: its UIDVALIDITY,
        the source UIDs and the new UIDs, for COPYUID.
        """
        def work() -> tuple[int, list[int], list[int]]:
            sources, bases = [], []
            for _, entry in items:
                for _ in range(2):
                    try:
                        bases.append(target.link_from(self.folder.path, entry, move))
                        sources.append(entry.uid)
                        break
                    except FileNotFoundError:
                        if not self.folder.locate(entry):
                            break
            target.sync()
            if move:
                self.folder.sync()
            uids = target.register(bases)
            return target.uid_validity(), sources, uids

        return self._run(work)

    def search_ids(self, query: list[Any], uid: bool) -> Deferred[list[int]]:
        level = needs(query)
        view = list(enumerate(self.view, 1))

        def work() -> list[int]:
            return search_folder(self.folder, view, query, uid, self.search_columns)

        def saved(found: list[int]) -> list[int]:
            if level <= HEADER:
                self.save_index()
            return found

        return self._run(work).addCallback(saved)

    # -- IMailbox ------------------------------------------------------------------

    def getUIDValidity(self) -> int:
        return self.validity

    def getUIDNext(self) -> int:
        return self.uid_next

    def getUID(self, message: int) -> int:
        return self.view[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.view)

    def getRecentCount(self) -> int:
        return sum(1 for e in self.view if e.recent)

    def getUnseenCount(self) -> int:
        return sum(1 for e in self.view if "\\Seen" not in e.flags)

    def first_unseen(self) -> int | None:
        for seq, entry in enumerate(self.view, 1):
            if "\\Seen" not in entry.flags:
                return seq
        return None

    def isWriteable(self) -> bool:
        return self.rw

    def destroy(self) -> None:
        raise MailboxException("Use DELETE on the folder")

    def requestStatus(self, names: Iterable[str]) -> Deferred[dict[str, int]]:
        values = {"MESSAGES": self.getMessageCount(), "RECENT": self.getRecentCount(),
                  "UIDNEXT": self.uid_next, "UIDVALIDITY": self.validity,
                  "UNSEEN": self.getUnseenCount()}
        return succeed({n: values[n] for n in (x.upper() for x in names) if n in values})

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)

    def addMessage(self, message: Any, flags: Iterable[str] = (), date: Any = None
                   ) -> Deferred[int]:
        return self._run(lambda: self.folder.add(lf(message.read()), set(flags), None))

    def expunge(self) -> Deferred[list[int]]:
        d = self.refresh(remove=self.deleted())
        return d.addCallback(lambda changes: changes.expunged)

    def fetch(self, messages: Any, uid: bool) -> Deferred[list[tuple[int, MaildirMessage]]]:
        ranges = [(lo, hi) for lo, hi in getattr(messages, "ranges", messages)]
        d = self.load(self.resolve(ranges, uid), WHOLE)
        return d.addCallback(lambda loaded: [(m.seq, MaildirMessage(m)) for m in loaded if m])

    def store(self, messages: Any, flags: Iterable[str], mode: int, uid: bool
              ) -> Deferred[dict[int, list[str]]]:
        ranges = [(lo, hi) for lo, hi in getattr(messages, "ranges", messages)]
        d = self.store_flags(self.resolve(ranges, uid), flags, mode)
        return d.addCallback(lambda done: {seq: sorted(e.flags) for seq, e in done})

    def search(self, query: list[Any], uid: bool) -> Deferred[list[int]]:
        return self.search_ids(query, uid)

    def getFlags(self) -> list[str]:
        return list(PERMANENT_FLAGS) + list(self.folder.keywords)

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


@dataclass
class FolderInfo:
    """
    A LIST line: the name and its attributes.
    """

    name: str
    attributes: list[str]

    def getFlags(self) -> list[str]:
        return self.attributes

    def getHierarchicalDelimiter(self) -> str:
        return DELIMITER


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class MaildirAccount:
    """
    One logged-in user's folders.
    """

    def __init__(self, root: str, hostname: str, reactor: IReactorFromThreads, pool: ThreadPool,
                 share: Any = None, watches: Watches | None = None) -> None:
        self.root = root
        self.hostname = hostname
        self.reactor = reactor
        self.pool = pool
        self.share = share  # a DeferredSemaphore shared by the user's sessions
        # Folder change detection, shared by the process's sessions.
        self.watches = watches if watches is not None else Watches(reactor)

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        if self.share is not None:
            return self.share.run(deferToThreadPool, self.reactor, self.pool, f, *args)
        return deferToThreadPool(self.reactor, self.pool, f, *args)

    def folder(self, name: str) -> Folder:
        return Folder(os.path.join(self.root, folder_dirname(name)), self.hostname, self.root,
                      base=os.path.dirname(os.path.dirname(self.root)))

    def existing(self, name: str) -> Folder:
        folder = self.folder(name)
        if not os.path.isdir(os.path.join(folder.path, "cur")):
            raise MissingFolder(f"No folder {name}")
        return folder

    # -- set-up ------------------------------------------------------------------

    def prepare(self) -> None:
        """
        First login: the Maildir and the usual folders, subscribed.
        Blocking.
        """
        ensure_folder(self.root, subfolder=False)
        created = []
        for name in SPECIAL:
            path = os.path.join(self.root, folder_dirname(name))
            if not os.path.isdir(path):
                ensure_folder(path, subfolder=True)
                created.append(name)
        if created or not os.path.exists(os.path.join(self.root, SUBSCRIPTIONS)):
            with self._subscriptions_locked():
                self._write_subscriptions(self._subscriptions() | set(created) | {"INBOX"})

    # -- folders -----------------------------------------------------------------

    def folders(self) -> list[FolderInfo]:
        """
        Every folder with its LIST attributes.  Blocking.
        """
        names = ["INBOX"]
        for entry in sorted(os.listdir(self.root)):
            if entry.startswith(".") and entry not in (".", "..") and os.path.isdir(
                    os.path.join(self.root, entry, "cur")) and not os.path.islink(
                    os.path.join(self.root, entry)):
                try:
                    names.append(folder_name(entry))
                except (UnicodeError, ValueError):
                    continue  # not a name mailstack would have written
        present = set(names)
        implied = set()
        parents = set()  # every name with a child: linear, not a scan per name
        for name in names[1:]:
            parts = name.split(DELIMITER)
            for i in range(1, len(parts)):
                parent = DELIMITER.join(parts[:i])
                parents.add(parent)
                if parent not in present:
                    implied.add(parent)
        infos = []
        for name in names + sorted(implied):
            children = name in parents
            attributes = ["\\HasChildren" if children else "\\HasNoChildren"]
            if name in implied:
                attributes.insert(0, "\\Noselect")
            if name in SPECIAL:
                attributes.append(SPECIAL[name])
            infos.append(FolderInfo(name, attributes))
        return infos

    def create_folder(self, name: str) -> None:
        if folder_dirname(name) == "":
            raise MailboxException("INBOX always exists")
        path = os.path.join(self.root, folder_dirname(name))
        if os.path.isdir(path):
            raise MailboxException(f"{name} already exists")
        if self.folder_count() >= MAX_FOLDERS:
            raise FolderLimit(f"At most {MAX_FOLDERS} folders per user")
        ensure_folder(path, subfolder=True)

    def folder_count(self) -> int:
        """
        The folders (subdirectories C{.Name}) of this user.  Blocking.
        """
        with os.scandir(self.root) as entries:
            return sum(1 for e in entries if e.name.startswith(".") and e.name[1:2] != "#"
                       and e.is_dir(follow_symlinks=False))

    def delete_folder(self, name: str) -> None:
        dirname = folder_dirname(name)
        if dirname == "":
            raise MailboxException("INBOX cannot be deleted")
        path = os.path.join(self.root, dirname)
        if not os.path.isdir(path):
            raise MailboxException(f"No folder {name}")
        trash = temporary_name(os.path.join(self.root, "#deleting"))  # unique per call
        os.rename(path, trash)  # gone at once for everyone, removed at leisure
        shutil.rmtree(trash, ignore_errors=True)
        with self._subscriptions_locked():
            self._write_subscriptions(self._subscriptions() - {name})

    def rename_folder(self, old: str, new: str) -> None:
        old_dir, new_dir = folder_dirname(old), folder_dirname(new)
        if "" in (old_dir, new_dir):
            raise MailboxException("INBOX cannot be renamed here")
        if new_dir.startswith(old_dir + "."):
            # Its children would move under themselves (Dovecot refuses too).
            raise MailboxException(f"{old} cannot be renamed under itself")
        if not os.path.isdir(os.path.join(self.root, old_dir)):
            raise MailboxException(f"No folder {old}")
        if os.path.exists(os.path.join(self.root, new_dir)):
            raise MailboxException(f"{new} already exists")
        moves = [(old_dir, new_dir)] + [
            (entry, new_dir + entry[len(old_dir):]) for entry in os.listdir(self.root)
            if entry.startswith(old_dir + ".")]
        if any(len(target) > MAX_FOLDER_NAME for _, target in moves):
            raise FolderLimit(f"Folder names are limited to {MAX_FOLDER_NAME - 1} bytes"
                              " (modified UTF-7)")
        for source, target in moves:
            os.rename(os.path.join(self.root, source), os.path.join(self.root, target))
        with self._subscriptions_locked():
            subscribed = self._subscriptions()
            renamed = {new + s[len(old):] if s == old or s.startswith(old + DELIMITER) else s
                       for s in subscribed}
            if renamed != subscribed:
                self._write_subscriptions(renamed)

    # -- subscriptions -----------------------------------------------------------

    @contextmanager
    def _subscriptions_locked(self) -> Iterator[None]:
        """
        Serialise read-modify-write of the subscriptions among sessions.
        """
        fd = os.open(os.path.join(self.root, SUBSCRIPTIONS + ".lock"),
                     os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _subscriptions(self) -> set[str]:
        try:
            with open(os.path.join(self.root, SUBSCRIPTIONS), encoding="utf-8") as f:
                return {line.rstrip("\n") for line in f if line.strip()}
        except FileNotFoundError:
            return set()

    def _write_subscriptions(self, names: set[str]) -> None:
        text = "".join(f"{n}\n" for n in sorted(names))
        atomic_write(os.path.join(self.root, SUBSCRIPTIONS), text.encode("utf-8"))

    def subscriptions(self) -> set[str]:
        return self._subscriptions()

    def set_subscribed(self, name: str, subscribed: bool) -> None:
        folder_dirname(name)  # checks the name
        with self._subscriptions_locked():
            names = self._subscriptions()
            if (name in names) != subscribed:
                self._write_subscriptions(names | {name} if subscribed else names - {name})

    # -- IAccount --------------------------------------------------------------------

    def select(self, name: str, rw: bool = True) -> Deferred[MaildirMailbox | None]:
        """
        The folder's view for a session: from the snapshot the process's
        sessions share when the folder did not change since it was made
        (no scan, no worker thread), else from a scan.
        """
        path = self.folder(name).path
        watch = self.watches.acquire(path)
        generation = watch.poll()  # before the scan: a change during it is seen next
        label = "INBOX" if name.upper() == "INBOX" else name
        state = watch.state
        snapshot = state.take(generation, path)
        if snapshot is not None:
            folder = self.folder(name)
            folder.keywords = list(state.keywords)
            return succeed(MaildirMailbox(self, label, folder, snapshot, rw, watch, generation))

        def work() -> MaildirMailbox | None:
            try:
                folder = self.existing(name)
            except MissingFolder:
                return None
            snapshot = folder.scan(claim_new=rw, state=state, generation=generation)
            return MaildirMailbox(self, label, folder, snapshot, rw, watch, generation)

        def done(mbox: MaildirMailbox | None) -> MaildirMailbox | None:
            if mbox is None:
                self.watches.release(watch)
            return mbox

        def failed(failure: Any) -> Any:
            self.watches.release(watch)
            return failure

        return self.run(work).addCallbacks(done, failed)

    def addMailbox(self, name: str, mbox: Any = None) -> Deferred[None]:
        return self.run(self.create_folder, name)

    def create(self, pathspec: str) -> Deferred[bool]:
        return self.run(self.create_folder, pathspec.rstrip(DELIMITER)).addCallback(
            lambda _: True)

    def delete(self, name: str) -> Deferred[None]:
        return self.run(self.delete_folder, name)

    def rename(self, oldname: str, newname: str) -> Deferred[None]:
        return self.run(self.rename_folder, oldname, newname)

    def isSubscribed(self, name: str) -> bool:
        return name in self._subscriptions()

    def subscribe(self, name: str) -> Deferred[None]:
        return self.run(self.set_subscribed, name, True)

    def unsubscribe(self, name: str) -> Deferred[None]:
        return self.run(self.set_subscribed, name, False)

    def listMailboxes(self, ref: str, wildcard: str) -> Deferred[list[tuple[str, FolderInfo]]]:
        pattern = ref + wildcard
        return self.run(self.folders).addCallback(
            lambda infos: [(i.name, i) for i in infos if wildcard_match(pattern, i.name)])

    def getPersonalNamespaces(self) -> list[list[str]]:
        return [["", DELIMITER]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def getUserNamespaces(self) -> None:
        # INamespacePresenter's name for the other users' namespaces: none.
        return None
