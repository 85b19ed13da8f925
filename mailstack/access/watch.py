# -*- test-case-name: tests.test_imap_watch -*-
"""
Whether a folder changed since a session last looked, at a cost that does
not grow with the folder: what NOOP, CHECK and IDLE ask before they rescan.

One L{FolderWatch} per folder path, shared by every session of the process
that has the folder selected (L{Watches} counts them).  Its C{generation}
goes up whenever something may have changed in the folder's C{new/} or
C{cur/} (a delivery, a flag change, an expunge, by any session or process);
a session remembers the generation it read before its last scan, and
rescans only when the generation moved.

On Linux the folder's C{new/} and C{cur/} are watched with
C{twisted.internet.inotify}: a change costs one event, an idle folder
nothing, and an idling session is told at once.  Where inotify is missing,
or the watch cannot be added (C{fs.inotify.max_user_watches} reached), the
watch falls back to the directories' C{stat}: a change of device, inode or
mtime of C{new/} or C{cur/} counts as a change, and so does a directory
modified within the last L{SETTLE} seconds (the file system's clock is
coarse: two changes in one tick leave one mtime, as Dovecot's Maildir code
also assumes).  Idling sessions on such folders are served by one timer
for the whole process, every L{POLL_INTERVAL} seconds, not one per session.

Both ways, L{FolderWatch.poll} also compares the directories' C{stat}, so a
change is never missed when inotify's queue overflowed or the folder was
renamed or deleted under the watch; and it reads inotify events already
queued before answering, so a change made just before a NOOP is seen by
that NOOP whatever the order in which the reactor serves its sockets.
"""

from __future__ import annotations

import os
import select
import time
from typing import Any, Callable

from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

from mailstack.access.folder import FolderState

log = Logger()

SETTLE = 2.0  # seconds: a directory changed this recently may change again unseen
POLL_INTERVAL = 1.0  # seconds between checks of polled folders with idling sessions
SAFETY_INTERVAL = 30.0  # seconds between stat checks of inotify-watched idle folders
SUBDIRS = ("new", "cur")

try:
    from twisted.internet import inotify as _inotify
except ImportError:  # not Linux
    _inotify = None  # type: ignore[assignment]

Fingerprint = tuple[tuple[int, int, int], ...]


def _inodes(found: Fingerprint) -> list[tuple[int, int]]:
    return [(dev, ino) for dev, ino, _ in found]


def fingerprint(path: str) -> Fingerprint:
    """
    Device, inode and mtime of C{new/} and C{cur/} (zeros for a missing one).
    """
    found = []
    for sub in SUBDIRS:
        try:
            st = os.stat(os.path.join(path, sub))
            found.append((st.st_dev, st.st_ino, st.st_mtime_ns))
        except OSError:
            found.append((0, 0, 0))
    return tuple(found)


class FolderWatch:
    """
    Change detection for one folder, shared by the sessions that have it
    selected.

    @ivar generation: goes up on every change (or possible change) seen.
    @ivar notified: True while inotify watches the folder; False when it is
        polled with C{stat}.
    @ivar state: what the last scan of the folder by any of these sessions
        found (L{FolderState}); it serves while C{generation} stays the
        one it was made at.
    """

    def __init__(self, watches: "Watches", path: str) -> None:
        self.watches = watches
        self.path = path
        self.generation = 0
        self.users = 0
        self.listeners: list[Callable[[], None]] = []
        self.notified = False
        self.descriptors: list[FilePath[Any]] = []
        self._fingerprint = fingerprint(path)
        self._pending = False
        self.state = FolderState()

    # -- asking ---------------------------------------------------------------------

    def poll(self) -> int:
        """
        The generation now, after reading queued events and comparing the
        directories' C{stat} with the last (two C{stat} calls).
        """
        if self.notified:
            self.watches.drain()
        now = self.watches.clock()
        current = fingerprint(self.path)
        if current != self._fingerprint:
            self._fingerprint = current
            self.bump()
        elif not self.notified and any(
                mtime / 1e9 > now - SETTLE for _, _, mtime in current):
            self.bump()  # too recent to trust: a change in the same tick hides
        return self.generation

    def changed_since(self, generation: int) -> bool:
        return self.poll() != generation

    # -- being told ---------------------------------------------------------------------

    def bump(self) -> None:
        """
        Something may have changed: raise the generation and tell the
        listeners (once per reactor turn, however many events came).
        """
        self.generation += 1
        if self.listeners and not self._pending:
            self._pending = True
            self.watches.reactor.callLater(0, self._tell)

    def _tell(self) -> None:
        self._pending = False
        for listener in list(self.listeners):
            try:
                listener()
            except Exception:  # noqa: BLE001 - one session's failure must not stop the others'
                log.failure("imap: a change listener failed for {path}", path=self.path)

    def event(self, ignored: Any, path: FilePath[Any], mask: int) -> None:
        """
        An inotify event on C{new/} or C{cur/}.
        """
        if _inotify is not None and mask & (_inotify.IN_MOVE_SELF | _inotify.IN_IGNORED
                                            | _inotify.IN_UNMOUNT):
            # The directory is not where it was: poll the path from now on
            # (after this event: Twisted is still handling it).
            self.notified = False
            self.watches.reactor.callLater(0, self.watches.unwatch, self)
        self.bump()  # IN_DELETE_SELF: Twisted closes the descriptor, see Watches.lost

    def add_listener(self, listener: Callable[[], None]) -> None:
        self.listeners.append(listener)
        self.watches.schedule()

    def remove_listener(self, listener: Callable[[], None]) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)


class Watches:
    """
    The process's folder watches, by path; one inotify descriptor for all.

    @param reactor: the reactor (C{IReactorTime}; inotify needs
        C{IReactorFDSet} too, else every folder is polled).
    @param use_inotify: False to poll every folder with C{stat}.
    """

    def __init__(self, reactor: Any, use_inotify: bool = True) -> None:
        self.reactor = reactor
        self.use_inotify = (use_inotify and _inotify is not None
                            and IReactorFDSet.providedBy(reactor))
        self._notifier: Any = None
        self._watches: dict[str, FolderWatch] = {}
        self._loop: LoopingCall | None = None
        self._ticks = 0

    def clock(self) -> float:
        return time.time()

    # -- folders -------------------------------------------------------------------

    def acquire(self, path: str) -> FolderWatch:
        """
        The watch of the folder at C{path}, watching it if nobody did;
        give it back with L{release}.
        """
        watch = self._watches.get(path)
        if watch is not None and watch.notified and _inodes(watch._fingerprint) != _inodes(
                fingerprint(path)):
            # The directories at this path are not the ones watched (the
            # folder was renamed or deleted and made again): start afresh.
            self.unwatch(watch)
            watch = None
        if watch is None:
            watch = FolderWatch(self, path)
            self._watch(watch)
            self._watches[path] = watch
        watch.users += 1
        return watch

    def watched(self, path: str) -> bool:
        """
        Whether a session of the process has the folder at C{path} selected.
        """
        return path in self._watches

    def release(self, watch: FolderWatch) -> None:
        watch.users -= 1
        if watch.users > 0:
            return
        if self._watches.get(watch.path) is watch:
            del self._watches[watch.path]
        self.unwatch(watch)
        if not self._watches:
            self.close()

    def close(self) -> None:
        """
        No folder is watched: close the inotify descriptor, stop the timer.
        """
        notifier, self._notifier = self._notifier, None
        if notifier is not None:
            notifier.loseConnection()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _watch(self, watch: FolderWatch) -> None:
        if not self.use_inotify:
            return
        notifier = self._inotifier()
        if notifier is None:
            return
        mask = (_inotify.IN_CREATE | _inotify.IN_DELETE | _inotify.IN_MOVED_FROM
                | _inotify.IN_MOVED_TO | _inotify.IN_ATTRIB | _inotify.IN_MOVE_SELF
                | _inotify.IN_DELETE_SELF)
        added = []
        try:
            for sub in SUBDIRS:
                target = FilePath(os.path.join(watch.path, sub).encode("utf-8",
                                                                       "surrogateescape"))
                notifier.watch(target, mask=mask, callbacks=[watch.event])
                added.append(target)
        except (_inotify.INotifyError, OSError) as e:
            # The watch limit (ENOSPC), a missing directory: poll this one.
            log.info("imap: polling {path} for changes (inotify: {error})",
                     path=watch.path, error=e)
            for target in added:
                self._ignore(target)
            return
        watch.descriptors = added
        watch.notified = True

    def _ignore(self, target: FilePath[Any]) -> None:
        notifier = self._notifier
        if notifier is None:
            return
        try:
            notifier.ignore(target)
        except (KeyError, _inotify.INotifyError, OSError):
            pass  # gone with its directory already

    def unwatch(self, watch: FolderWatch) -> None:
        """
        Stop inotify for C{watch}; its sessions poll it from now on.
        """
        for target in watch.descriptors:
            self._ignore(target)
        watch.descriptors = []
        if watch.notified:
            watch.notified = False
            self.schedule()
        if self._watches.get(watch.path) is watch and watch.users <= 0:
            del self._watches[watch.path]

    def _inotifier(self) -> Any:
        if self._notifier is not None:
            return self._notifier
        try:
            notifier = _Notifier(self, reactor=self.reactor)
        except Exception as e:  # noqa: BLE001 - no inotify here (or no descriptor left): poll
            log.info("imap: inotify unavailable ({error}); folders are polled", error=e)
            self.use_inotify = False
            return None
        notifier.startReading()
        self._notifier = notifier
        return notifier

    def lost(self, notifier: Any) -> None:
        """
        Twisted closes the inotify descriptor when a watched directory is
        deleted: every folder is polled until the next reactor turn, when a
        new descriptor watches them again.
        """
        if notifier is not self._notifier:
            return
        self._notifier = None
        for watch in list(self._watches.values()):
            watch.descriptors = []
            if watch.notified:
                watch.notified = False
                watch.bump()
        self.schedule()
        self.reactor.callLater(0, self._rewatch)

    def _rewatch(self) -> None:
        for watch in list(self._watches.values()):
            if not watch.notified and watch.users > 0:
                self._watch(watch)
                watch.bump()  # anything between the two descriptors

    def drain(self) -> None:
        """
        Read the inotify events already queued, now.
        """
        notifier = self._notifier
        if notifier is None or notifier.fileno() < 0:
            return
        try:
            readable, _, _ = select.select([notifier.fileno()], [], [], 0)
        except (OSError, ValueError):
            return
        if readable:
            notifier.doRead()

    # -- the one timer for idling sessions ---------------------------------------------

    def schedule(self) -> None:
        """
        Run the timer while some idling session needs it.
        """
        if self._loop is None and any(w.listeners for w in self._watches.values()):
            self._loop = LoopingCall(self._tick)
            self._loop.clock = self.reactor
            self._loop.start(POLL_INTERVAL, now=False).addErrback(
                lambda f: log.failure("imap: folder polling failed", f))

    def _tick(self) -> None:
        self._ticks += 1
        safety = self._ticks % max(1, int(SAFETY_INTERVAL / POLL_INTERVAL)) == 0
        waiting = False
        for watch in list(self._watches.values()):
            if not watch.listeners:
                continue
            waiting = True
            if not watch.notified or safety:
                watch.poll()  # a change bumps, and bumping tells the listeners
        if not waiting and self._loop is not None:
            self._loop.stop()
            self._loop = None


if _inotify is not None:
    class _Notifier(_inotify.INotify):
        """
        Twisted's inotify reader, telling L{Watches} when it closes.
        """

        def __init__(self, watches: Watches, reactor: Any = None) -> None:
            super().__init__(reactor=reactor)
            self.watches = watches

        def connectionLost(self, reason: Any) -> None:
            super().connectionLost(reason)
            self._fd = -1
            self.watches.lost(self)
else:  # pragma: no cover - not Linux
    _Notifier = None  # type: ignore[misc]
