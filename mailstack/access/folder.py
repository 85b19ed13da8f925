# -*- test-case-name: tests.test_imap_store,tests.test_imap_trust,tests.test_imap -*-
"""
One Maildir++ folder as IMAP sees it: stable UIDs, flags, \\Recent.

UIDs live in C{mailstack-uidlist} inside the folder (the role of Dovecot's
C{dovecot-uidlist}): a header line C{mailstack-uidlist 1 V<validity>
N<next>}, then one C{<uid> <base name>} line per message.  New UIDs are
appended and fsynced before any client can see them; the file is compacted
(rewritten atomically) when most of its lines name messages that are gone.
A uid list that is missing or does not parse is rebuilt with a new
UIDVALIDITY, so a UID is never given to two different messages under one
UIDVALIDITY.  Every reader and writer holds C{flock} on
C{mailstack-uidlist.lock}, so sessions in several processes agree.

Flags are the Maildir info suffix C{:2,DFPRST}; keywords are the letters
C{a}-C{z}, indexes into the folder's C{mailstack-keywords} (Dovecot's
C{dovecot-keywords} pattern).  \\Recent is kept as the first UID no
read-write session has seen yet (C{mailstack-recent}), so deliveries,
APPEND, COPY and MOVE all make messages recent.
Everything here blocks: call it from a worker thread.
"""

from __future__ import annotations

import errno
import fcntl
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import AbstractSet, Iterator, Sequence

from twisted.logger import Logger

from mailstack.access.scan import find_renamed, served_size
from mailstack.delivery.maildir import SUBDIRS, arrival_key, unique_name
from mailstack.nofollow import check_tree, open_file
from mailstack.safeio import (
    append_file, atomic_write, discard, fsync_directory, private_file, rename, temporary_name,
    write_file,
)

UIDLIST = "mailstack-uidlist"
VALIDITY = "mailstack-uidvalidity"  # the last UIDVALIDITY given, kept apart
LOCKFILE = "mailstack-uidlist.lock"
MAGIC = "mailstack-uidlist 1"
KEYWORDS = "mailstack-keywords"  # "<index> <keyword>" lines, as dovecot-keywords
RECENT = "mailstack-recent"  # "V<uidvalidity> <first recent UID>"
COUNTER = "mailstack-uidvalidity-counter"  # in the account root: the last given
MAX_KEYWORDS = 26  # info letters a-z, as Dovecot's Maildir

log = Logger()

FLAG_LETTERS = {
    "\\Draft": "D",
    "\\Flagged": "F",
    "$Forwarded": "P",
    "\\Answered": "R",
    "\\Seen": "S",
    "\\Deleted": "T",
}
LETTER_FLAGS = {letter: flag for flag, letter in FLAG_LETTERS.items()}
PERMANENT_FLAGS = tuple(FLAG_LETTERS)


class TooManyKeywords(Exception):
    """
    A folder already has L{MAX_KEYWORDS} keywords and one more was asked.
    """


_FLAG_SETS: dict[tuple[str, tuple[str, ...]], set[str]] = {}


def shared_flags(info: str, keywords: Sequence[str]) -> set[str]:
    """
    L{flags_from_info}, one set object for all the messages (of every
    session) with the same letters: a folder's view holds one set per
    distinct flag combination, not one per message.  Never change the set
    in place (every holder would see it): assign a new one.
    """
    key = (info, tuple(keywords))
    found = _FLAG_SETS.get(key)
    if found is None:
        if len(_FLAG_SETS) > 4096:
            _FLAG_SETS.clear()
        found = _FLAG_SETS[key] = flags_from_info(info, keywords)
    return found


def flags_from_info(info: str, keywords: Sequence[str] = ()) -> set[str]:
    """
    The flags of info letters: A-Z system flags, a-z the folder's keywords.
    """
    flags = set()
    for c in info:
        if c in LETTER_FLAGS:
            flags.add(LETTER_FLAGS[c])
        elif "a" <= c <= "z" and ord(c) - 97 < len(keywords):
            flags.add(keywords[ord(c) - 97])
    return flags


def info_from_flags(flags: set[str], keywords: Sequence[str] = ()) -> str:
    """
    Info letters for C{flags}, sorted as Maildir wants; a keyword not in
    the folder's list has no letter (callers add it to the list first).
    """
    index = {k.lower(): i for i, k in enumerate(keywords)}
    letters = [FLAG_LETTERS[f] for f in flags if f in FLAG_LETTERS]
    letters += [chr(97 + index[f.lower()]) for f in flags
                if f not in FLAG_LETTERS and f.lower() in index]
    return "".join(sorted(letters))


def is_keyword(flag: str) -> bool:
    return not flag.startswith("\\") and flag not in FLAG_LETTERS


def split_name(name: str) -> tuple[str, str | None]:
    """
    A file name's unique base and its info letters (None in C{new/}).
    """
    base, sep, info = name.partition(":")
    if not sep:
        return base, None
    return base, info[2:] if info.startswith("2,") else ""


@dataclass(slots=True)
class Entry:
    """
    One message of a folder as a session knows it.  Every idle session
    keeps one per message of its selected folder, so it is small: slots,
    names interned, flag sets shared (L{shared_flags}).
    """

    uid: int
    base: str
    sub: str  # "new" or "cur"
    name: str  # the file name in sub
    size: int  # as served, with CRLF
    recent: bool = False
    flags: set[str] = field(default_factory=set)
    inode: int = 0  # of the file, from the directory listing (0: unknown)

    def path(self, folder: str) -> str:
        return os.path.join(folder, self.sub, self.name)


@dataclass
class Snapshot:
    validity: int
    uid_next: int
    entries: list[Entry]  # by UID
    # Set when the entries are a FolderState's, shared and never to be
    # changed (their recent is False): the lowest UID recent for the
    # session that scanned.  Callers copy what they keep (L{own}).
    recent_from: int | None = None

    def own(self, entry: Entry) -> Entry:
        """
        C{entry} as a session may keep and change it.
        """
        if self.recent_from is None:
            return entry
        return Entry(entry.uid, entry.base, entry.sub, entry.name, entry.size,
                     entry.uid >= self.recent_from, entry.flags, entry.inode)


@dataclass
class UidList:
    validity: int
    next: int
    uids: dict[str, int]  # base name -> UID
    lines: int  # entry lines in the file, live or not
    clean: bool  # the file parsed and ends with a newline


class FolderState:
    """
    What the last scan of a folder found, shared by the sessions of the
    process that have the folder selected (it hangs on the folder's
    L{mailstack.access.watch.FolderWatch}, which says when it may be out
    of date): the parsed uid list with the C{stat} it was read at, the
    messages by base name with their sizes and flags, and the
    L{Snapshot} made.  A scan given it reads only the lines appended to
    the uid list since, and measures and parses only the names it does not
    know; a SELECT of a folder unchanged since uses the snapshot and
    scans nothing (L{take}).

    @ivar generation: the watch's generation read (on the reactor thread)
        before the scan that made the snapshot began (-1: none yet); set by
        that scan with the snapshot, under C{lock}.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()  # scans of several threads of this process
        self.generation = -1
        self.uidlist: UidList | None = None
        self.uidlist_stat: tuple[int, int, int] | None = None  # inode, size, mtime_ns
        self.keywords_stat: tuple[int, int, int] | None = None
        self.known: dict[str, Entry] = {}  # base -> the entry last made, by any scan
        self.names: dict[str, str] = {}  # file name -> base name, as last listed
        self.snapshot: Snapshot | None = None
        self.first_recent = 0
        self.waiting = 0  # messages of the snapshot in new/
        self.keywords: list[str] = []

    def take(self, generation: int, path: str) -> Snapshot | None:
        """
        The snapshot (shared: see L{Snapshot.own}) if it still describes
        the folder at C{path}, else None: nothing changed in C{new/} or
        C{cur/} since it was made (the watch's C{generation} is the one it
        was made at), the uid list
        and keyword list are the files read then (two C{stat} calls), no
        scan is under way, and nothing is \\Recent or waiting in C{new/},
        so that selecting the folder again claims nothing (a claim by
        another process changes no directory).
        """
        if not self.lock.acquire(blocking=False):
            return None  # a scan is under way: its result is newer
        try:
            snapshot = self.snapshot
            if (snapshot is None or generation != self.generation or self.waiting
                    or self.first_recent < snapshot.uid_next
                    or _stat_key(os.path.join(path, UIDLIST)) != self.uidlist_stat
                    or _stat_key(os.path.join(path, KEYWORDS)) != self.keywords_stat):
                return None
            # Nothing is recent: the scan's recent_from was for its session.
            return Snapshot(snapshot.validity, snapshot.uid_next, snapshot.entries,
                            snapshot.uid_next)
        finally:
            self.lock.release()


def _stat_key(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


class Folder:
    """
    One Maildir (the INBOX root or a C{.Name} subfolder).
    """

    def __init__(self, path: str, hostname: str = "localhost", root: str | None = None,
                 base: str | None = None) -> None:
        self.path = path
        self.hostname = hostname
        self.root = root or path  # where the account's UIDVALIDITY counter lives
        self.base = base  # trusted directory above: nothing below it may be a link
        self.keywords: list[str] = []  # as last read, index = letter - 'a'
        self.validity = 0  # the UIDVALIDITY as last read by register()

    # -- keywords ----------------------------------------------------------------

    def _read_keywords(self) -> list[str]:
        """
        The folder's keyword list (call with the lock held).
        """
        found: dict[int, str] = {}
        try:
            with open(os.path.join(self.path, KEYWORDS), "rb") as f:
                for line in f.read().decode("utf-8", "replace").split("\n"):
                    number, _, name = line.partition(" ")
                    if number.isdigit() and name and int(number) < MAX_KEYWORDS:
                        found[int(number)] = name
        except FileNotFoundError:
            pass  # no keyword used yet
        keywords = []
        for i in range(MAX_KEYWORDS):
            if i not in found:
                break
            keywords.append(found[i])
        self.keywords = keywords
        return keywords

    def _add_keywords(self, flags: set[str]) -> None:
        """
        Give every keyword in C{flags} a letter (call with the lock held).
        """
        keywords = self._read_keywords()
        known = {k.lower() for k in keywords}
        missing = sorted({f for f in flags if is_keyword(f) and f.lower() not in known},
                         key=str.lower)
        missing = list({f.lower(): f for f in missing}.values())
        if not missing:
            return
        if len(keywords) + len(missing) > MAX_KEYWORDS:
            raise TooManyKeywords(f"at most {MAX_KEYWORDS} keywords per folder")
        keywords = keywords + missing
        text = "".join(f"{i} {k}\n" for i, k in enumerate(keywords))
        atomic_write(os.path.join(self.path, KEYWORDS), text.encode("utf-8"))
        self.keywords = keywords

    def spell(self, flags: set[str]) -> set[str]:
        """
        Keywords as the folder's list spells them (they match in any case).
        """
        known = {k.lower(): k for k in self.keywords}
        return {known.get(f.lower(), f) if is_keyword(f) else f for f in flags}

    def check(self) -> None:
        """
        Refuse (L{SymlinkRefused}) a folder reached through a symbolic link.
        """
        check_tree(self.base or os.path.dirname(self.path), self.path, SUBDIRS)

    # -- the uid list --------------------------------------------------------

    @contextmanager
    def locked(self) -> Iterator[None]:
        fd = os.open(os.path.join(self.path, LOCKFILE),
                     os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_uidlist(self) -> UidList | None:
        try:
            with open(os.path.join(self.path, UIDLIST), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        text = data.decode("ascii", "replace")
        lines = text.split("\n")
        head = lines[0].split(" ")
        if len(head) != 4 or " ".join(head[:2]) != MAGIC:
            return None
        try:
            validity = int(head[2][1:])
            next_uid = int(head[3][1:])
        except ValueError:
            return None
        if not head[2].startswith("V") or not head[3].startswith("N") or validity <= 0:
            return None
        complete = lines[1:-1]  # the last is empty, or a torn line
        uids: dict[str, int] = {}
        seen: set[int] = set()
        for line in complete:
            uid_text, _, base = line.partition(" ")
            if not uid_text.isdigit() or not base or int(uid_text) in seen:
                return None
            uid = int(uid_text)
            seen.add(uid)
            uids[base] = uid
            next_uid = max(next_uid, uid + 1)
        return UidList(validity, next_uid, uids, len(complete), text.endswith("\n"))

    def _rewrite(self, uidlist: UidList) -> None:
        ordered = sorted(uidlist.uids.items(), key=lambda item: item[1])
        text = f"{MAGIC} V{uidlist.validity} N{uidlist.next}\n" + "".join(
            f"{uid} {base}\n" for base, uid in ordered)
        atomic_write(os.path.join(self.path, UIDLIST), text.encode("ascii"))
        uidlist.lines = len(ordered)
        uidlist.clean = True

    def _append(self, uidlist: UidList, added: list[tuple[str, int]]) -> None:
        append_file(os.path.join(self.path, UIDLIST),
                    "".join(f"{uid} {base}\n" for base, uid in added).encode("ascii"))
        uidlist.lines += len(added)

    def _load(self) -> UidList:
        """
        The uid list, rebuilt with a new UIDVALIDITY if it is lost or
        broken.  Call with the lock held.
        """
        uidlist = self._read_uidlist()
        if uidlist is None:
            # Never given a UIDVALIDITY: a new folder (or one from elsewhere),
            # whose messages, however they came, are all recent.
            fresh_folder = not os.path.exists(os.path.join(self.path, VALIDITY))
            uidlist = UidList(self._new_validity(self._previous_validity()), 1, {}, 0, False)
            atomic_write(os.path.join(self.path, VALIDITY), b"%d\n" % uidlist.validity)
            if fresh_folder:
                self._claim_recent(uidlist)
        if not uidlist.clean:
            self._rewrite(uidlist)
        return uidlist

    def _previous_validity(self) -> int:
        """
        The highest UIDVALIDITY this folder may have had, so a rebuilt uid
        list never repeats it even within the same second.
        """
        found = [0]
        try:
            with open(os.path.join(self.path, VALIDITY), "rb") as f:
                found.append(int(f.read().strip() or 0))
        except (OSError, ValueError):
            pass  # lost too: the clock alone decides
        try:
            with open(os.path.join(self.path, UIDLIST), "rb") as f:
                head = f.readline().split()
            if len(head) >= 3 and head[2][:1] == b"V":
                found.append(int(head[2][1:]))
        except (OSError, ValueError):
            pass  # no readable header
        return max(found)

    def _new_validity(self, previous: int) -> int:
        """
        A UIDVALIDITY greater than any this account gave before (the
        counter in its root), this folder's previous one and the clock's
        seconds: a folder deleted and created again in the same second, or
        renamed over a deleted one, never repeats a UIDVALIDITY.
        """
        fd = os.open(os.path.join(self.root, COUNTER), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            text = os.read(fd, 64).strip()
            last = int(text) if text.isdigit() else 0
            validity = max(int(time.time()), last + 1, previous + 1)
            data = b"%d\n" % validity
            os.lseek(fd, 0, os.SEEK_SET)
            os.ftruncate(fd, 0)
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        return validity

    def _first_recent(self, uidlist: UidList, files: dict[str, tuple[str, str]]) -> int:
        """
        The lowest UID still \\Recent: no session selected the folder
        read-write since it arrived (call with the lock held).  Without a
        record (a new or rebuilt list), what is in C{new/} is recent.
        """
        try:
            with open(os.path.join(self.path, RECENT), "rb") as f:
                validity, _, first = f.read().decode("ascii", "replace").strip().partition(" ")
            if validity == f"V{uidlist.validity}" and first.isdigit():
                return int(first)
        except FileNotFoundError:
            pass  # never claimed
        waiting = [uidlist.uids[b] for b, (sub, _) in files.items()
                   if sub == "new" and b in uidlist.uids]
        return min(waiting, default=uidlist.next)

    def _claim_recent(self, uidlist: UidList) -> None:
        """
        Record that every UID so far has been seen as \\Recent.  Not fsynced:
        after a crash a message may be \\Recent once more, nothing worse.
        """
        tmp = temporary_name(os.path.join(self.path, RECENT))
        with open(tmp, "wb", opener=private_file) as f:
            f.write(b"V%d %d\n" % (uidlist.validity, uidlist.next))
        os.replace(tmp, os.path.join(self.path, RECENT))

    def _assign(self, uidlist: UidList, bases: list[str]) -> None:
        added = []
        for base in bases:
            if base not in uidlist.uids:
                uidlist.uids[base] = uidlist.next
                added.append((base, uidlist.next))
                uidlist.next += 1
        if added:
            self._append(uidlist, added)

    # -- listing -------------------------------------------------------------

    def _files(self, inodes: dict[str, int] | None = None,
               names: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
        """
        The messages listed, by base name: (subdirectory, file name).

        @param names: file name -> base name of the last listing, used and
            updated (the names are interned once).
        """
        found: dict[str, tuple[str, str]] = {}
        listed: dict[str, str] = {}
        known = names if names is not None else {}
        for sub in ("new", "cur"):  # a name in cur/ wins over the same in new/
            try:
                entries = list(os.scandir(os.path.join(self.path, sub)))
            except FileNotFoundError:
                continue
            for entry in entries:
                name = entry.name
                if name.startswith("."):
                    continue
                if entry.is_symlink():
                    log.warn("maildir: refusing the symbolic link {path}", path=entry.path)
                    continue
                base = known.get(name)
                if base is None:
                    name = sys.intern(name)  # one copy for every session's view
                    base = sys.intern(split_name(name)[0])
                else:
                    name = sys.intern(name)
                listed[name] = base
                found[base] = (sub, name)
                if inodes is not None:
                    inodes[base] = entry.inode()  # from the listing: no stat
        if names is not None:
            names.clear()
            names.update(listed)
        return found

    def scan(self, claim_new: bool = False, sizes: dict[str, int] | None = None,
             state: FolderState | None = None, generation: int = -1) -> Snapshot:
        """
        Every message with its UID, assigning UIDs to new arrivals.

        @param claim_new: this session selected the folder read-write: move
            messages from C{new/} to C{cur/}, and it alone sees the messages
            that arrived since the last such session as \\Recent.
        @param sizes: sizes already known by base name, to skip measuring.
        @param state: the folder's state shared by the process's sessions
            (L{FolderState}): what it knows is not read or measured again,
            and it is updated with what this scan found.
        @param generation: the folder watch's generation, read before this
            scan began: the state's from now on.
        """
        if state is not None:
            with state.lock:
                return self._scan(claim_new, sizes if sizes is not None else {}, state, generation)
        return self._scan(claim_new, sizes if sizes is not None else {}, None, generation)

    def _scan(self, claim_new: bool, sizes: dict[str, int], state: FolderState | None,
              generation: int) -> Snapshot:
        self.check()
        with self.locked():
            uidlist = self._load() if state is None else self._load_with(state)
            keywords = self._read_keywords()
            inodes: dict[str, int] = {}
            files = self._files(inodes, state.names if state is not None else None)
            fresh = sorted((b for b in files if b not in uidlist.uids), key=arrival_key)
            self._assign(uidlist, fresh)
            gone = len(uidlist.uids) - len(files)
            if gone > 0 and uidlist.lines > 2 * len(files) + 1000:
                for base in [b for b in uidlist.uids if b not in files]:
                    del uidlist.uids[base]
                self._rewrite(uidlist)
            first_recent = self._first_recent(uidlist, files)
            if claim_new and first_recent < uidlist.next:
                self._claim_recent(uidlist)
            uids = {base: uidlist.uids[base] for base in files}
            if state is not None:
                state.uidlist_stat = _stat_key(os.path.join(self.path, UIDLIST))
                state.keywords_stat = _stat_key(os.path.join(self.path, KEYWORDS))
        known = state.known if state is not None and state.keywords == keywords else {}
        entries = []
        for base, (sub, name) in files.items():
            if claim_new and sub == "new":
                target = name if ":" in name else name + ":2,"
                try:
                    os.rename(os.path.join(self.path, "new", name),
                              os.path.join(self.path, "cur", target))
                except FileNotFoundError:
                    continue  # another session claimed or removed it meanwhile
                sub, name = "cur", sys.intern(target)
            uid = uids[base]
            inode = inodes.get(base, 0)
            old = known.get(base)
            if old is not None and old.name == name and old.sub == sub and old.uid == uid:
                if state is not None and old.inode == inode:
                    entries.append(old)  # the state's, unchanged: shared
                else:
                    entries.append(Entry(uid, base, sub, name, old.size, state is None
                                         and uid >= first_recent, old.flags, inode))
                continue
            size = sizes.get(base)
            if size is None:
                try:
                    size = served_size(os.path.join(self.path, sub, name))
                except FileNotFoundError:
                    continue
            info = split_name(name)[1] or ""
            entries.append(Entry(uid, base, sub, name, size,
                                 state is None and uid >= first_recent,
                                 shared_flags(info, keywords), inode))
        entries.sort(key=lambda e: e.uid)
        if state is None:
            return Snapshot(uidlist.validity, uidlist.next, entries)
        snapshot = Snapshot(uidlist.validity, uidlist.next, entries, first_recent)
        if not isinstance(sizes, _AnySize):
            state.snapshot = snapshot
            state.known = {e.base: e for e in entries}
            state.keywords = keywords
            state.first_recent = uidlist.next if claim_new else first_recent
            state.waiting = sum(1 for e in entries if e.sub == "new")
            state.generation = generation
        return snapshot

    def _load_with(self, state: FolderState) -> UidList:
        """
        L{_load} through the shared state: the uid list parsed before if
        the file is the one read then, only its new lines read if it grew
        (lines are only appended to a file; a rewrite is a new inode).
        Call with the lock held.
        """
        path = os.path.join(self.path, UIDLIST)
        key = _stat_key(path)
        cached, before = state.uidlist, state.uidlist_stat
        if cached is not None and key is not None and before is not None:
            if key == before:
                return cached
            if key[0] == before[0] and key[1] > before[1] and self._read_tail(
                    path, before[1], cached):
                return cached
        uidlist = self._load()
        state.uidlist = uidlist
        return uidlist

    def _read_tail(self, path: str, offset: int, uidlist: UidList) -> bool:
        """
        Add the lines appended to the uid list after C{offset} to
        C{uidlist}; False (nothing changed) if they are not whole, valid
        lines, for L{_load} to deal with.
        """
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode("ascii", "replace")
        if not text.endswith("\n"):
            return False
        added: list[tuple[str, int]] = []
        taken = set(uidlist.uids.values())
        for line in text[:-1].split("\n"):
            uid_text, _, base = line.partition(" ")
            if not uid_text.isdigit() or not base or int(uid_text) in taken:
                return False
            taken.add(int(uid_text))
            added.append((base, int(uid_text)))
        for base, uid in added:
            uidlist.uids[base] = uid
            uidlist.next = max(uidlist.next, uid + 1)
        uidlist.lines += len(added)
        return True

    def status(self) -> Snapshot:
        """
        Like L{scan} without claiming, for STATUS; sizes are not measured.
        """
        return self.scan(sizes=_AnySize())

    # -- changing messages ---------------------------------------------------

    def locate(self, entry: Entry) -> bool:
        """
        Find a message another session renamed (flags, new to cur), and
        take its flags from the name found; False if it is gone.
        """
        if os.path.exists(entry.path(self.path)):
            return True
        found = find_renamed(self.path, entry.base)
        if found is None:
            return False
        entry.sub, entry.name = found
        entry.flags = flags_from_info(split_name(entry.name)[1] or "", self.keywords)
        return True

    def change_flags(self, entries: list[Entry], add: AbstractSet[str] = frozenset(),
                     remove: AbstractSet[str] = frozenset(),
                     replace: AbstractSet[str] | None = None) -> list[bool]:
        """
        Apply a flag change to each message's current state on disk, under
        the folder's lock, so concurrent sessions (and processes) never
        undo each other's changes: C{replace} sets the flags, else C{add}
        and C{remove} change them.  Each entry ends with the flags now on
        disk; the result says, per entry, whether the message is still
        there.  Raises L{TooManyKeywords} before changing anything.
        """
        done = []
        with self.locked():
            self._add_keywords(set(add) | set(replace or ()))
            add, remove = self.spell(set(add)), self.spell(set(remove))
            replace = None if replace is None else self.spell(set(replace))
            lower_remove = {f.lower() for f in remove}
            for entry in entries:
                done.append(self._rename_flags(entry, add, lower_remove, replace))
        return done

    def _rename_flags(self, entry: Entry, add: set[str], remove: set[str],
                      replace: set[str] | None) -> bool:
        for _ in range(3):
            if not os.path.exists(entry.path(self.path)) and not self.locate(entry):
                return False
            current = flags_from_info(split_name(entry.name)[1] or "", self.keywords)
            if replace is not None:
                flags = set(replace)
            else:
                flags = {f for f in current if f.lower() not in remove} | add
            target = f"{entry.base}:2,{info_from_flags(flags, self.keywords)}"
            if entry.sub == "cur" and entry.name == target:
                entry.flags = flags
                return True
            try:
                os.rename(entry.path(self.path), os.path.join(self.path, "cur", target))
            except FileNotFoundError:
                continue  # renamed by a writer outside mailstack: look again
            entry.sub, entry.name, entry.flags = "cur", target, flags
            return True
        return False

    def set_flags(self, entry: Entry, flags: set[str]) -> bool:
        """
        Rename the file to carry exactly C{flags} (it moves to C{cur/});
        False if the message is gone.
        """
        return self.change_flags([entry], replace=set(flags))[0]

    def remove(self, entry: Entry) -> None:
        for _ in range(3):
            try:
                os.unlink(entry.path(self.path))
                return
            except FileNotFoundError:
                if not self.locate(entry):
                    return

    def add(self, content: bytes, flags: set[str], date: float | None = None,
            state: FolderState | None = None) -> int:
        """
        Store a message (LF line endings) durably in C{cur/}; its UID.

        @param state: the folder's shared state, whose uid list is used
            (L{register}).
        """
        self.check()
        size = len(content)
        name = unique_name(self.hostname, size, vsize=size + content.count(b"\n"))
        base = name
        if any(is_keyword(f) for f in flags):
            with self.locked():
                self._add_keywords(flags)
        target = f"{name}:2,{info_from_flags(flags, self.keywords)}"
        tmp = os.path.join(self.path, "tmp", name)
        write_file(tmp, [content])
        if date is not None:
            os.utime(tmp, (date, date))
        try:
            rename(tmp, os.path.join(self.path, "cur", target))
        except BaseException:
            discard(tmp)
            raise
        fsync_directory(os.path.join(self.path, "cur"))
        return self.register([base], state)[0]

    def link_from(self, source: str, entry: Entry, move: bool = False) -> str:
        """
        Put a copy (a hard link) or the message itself (a rename) of
        C{entry} from folder C{source} into C{cur/} here; the new base name.
        Call L{register} after, then fsync with L{sync}.
        """
        self.check()
        old = entry.path(source)
        size, vsize = _sizes_from_name(entry.base)
        name = unique_name(self.hostname, size if size is not None else 0,
                           vsize=vsize if vsize is not None else entry.size)
        with self.locked():
            self._add_keywords(entry.flags)
        target = os.path.join(self.path, "cur",
                              f"{name}:2,{info_from_flags(entry.flags, self.keywords)}")
        if move:
            os.rename(old, target)
        else:
            try:
                os.link(old, target)
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                with open_file(old) as f:
                    write_file(target, [f.read()])
        return name

    def register(self, bases: list[str], state: FolderState | None = None) -> list[int]:
        """
        UIDs for messages just put here, in order.

        @param state: the folder's shared state: its uid list is read only
            for lines added since (L{_load_with}), and kept current.
        """
        if state is None:
            return self._register(bases, None)
        with state.lock:
            return self._register(bases, state)

    def _register(self, bases: list[str], state: FolderState | None) -> list[int]:
        with self.locked():
            uidlist = self._load() if state is None else self._load_with(state)
            self._assign(uidlist, bases)
            if state is not None:
                state.uidlist_stat = _stat_key(os.path.join(self.path, UIDLIST))
            self.validity = uidlist.validity
            return [uidlist.uids[b] for b in bases]

    def uid_validity(self) -> int:
        with self.locked():
            return self._load().validity

    def sync(self) -> None:
        fsync_directory(os.path.join(self.path, "cur"))


class _AnySize(dict):
    def get(self, key: object, default: object = None) -> int:
        return 0


def _sizes_from_name(base: str) -> tuple[int | None, int | None]:
    size = vsize = None
    for part in base.split(",")[1:]:
        key, _, value = part.partition("=")
        if value.isdigit():
            if key == "S":
                size = int(value)
            elif key == "W":
                vsize = int(value)
    return size, vsize


def ensure_folder(path: str, subfolder: bool) -> None:
    """
    Create a Maildir (and C{maildirfolder} in a subfolder) if missing.
    """
    created = False
    if not os.path.isdir(path):
        try:
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass  # another session of the same user made it meanwhile
    for sub in SUBDIRS:
        try:
            os.mkdir(os.path.join(path, sub), 0o700)
            created = True
        except FileExistsError:
            pass  # already there
    if subfolder:
        marker = os.path.join(path, "maildirfolder")
        if not os.path.exists(marker):
            try:
                write_file(marker, [b""])
                created = True
            except FileExistsError:
                pass  # written by a concurrent first login
    if created:
        fsync_directory(path)
        fsync_directory(os.path.dirname(path))
