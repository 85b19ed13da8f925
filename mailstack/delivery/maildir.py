# -*- test-case-name: tests.test_maildir -*-
"""
Durable delivery into Maildirs.

One delivery writes one copy per local recipient, in two phases, the way
maddy's delivery targets do:

  1. stage: for each copy, a uniquely named file in C{tmp/} is written and
     fsynced;
  2. commit: every staged file is renamed into C{new/}, and each C{new/}
     directory is fsynced.

A failure in either phase removes every file of the delivery, so the
client's 4xx never leaves a copy behind to be duplicated by its retry, and
nothing half-written is ever in C{new/}.

All of it runs in a thread pool, never on the reactor thread.  Directory
fsyncs are group-committed (L{DirectorySyncer}): renames into the same
C{new/} that arrive while an fsync of it runs share the next one, so many
concurrent sessions cost far fewer fsyncs than messages.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack import tally
from mailstack.address import Address, AddressError, mailbox_name
from mailstack.clock import wall_seconds
from mailstack.interfaces import IDeliveryAgent, IPrepared, ITwoPhaseStore
from mailstack.message import Envelope, MessageSpool
from mailstack.nofollow import SymlinkRefused, check_tree
from mailstack.reactors import IMailReactor
from mailstack.safeio import DirectorySyncer, discard, fsync_directory, rename, write_file

log = Logger()

SUBDIRS = ("tmp", "new", "cur")


@dataclass(frozen=True)
class Copy:
    """
    One copy to write: the Maildir, and the header lines that precede the
    shared content in this copy only.
    """

    maildir: str
    prefix: bytes


class MaildirStore:
    """
    Where Maildirs live: C{root/<domain>/<user>/}, created on first use.
    """

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)

    def path_for(self, user: Address) -> str:
        """
        The Maildir of a local user.  The name is checked again here, so no
        address can ever name a path outside the root.
        """
        local = mailbox_name(user.local)
        domain = user.domain
        if domain.startswith(".") or "/" in domain or "\0" in domain or domain in ("", ".."):
            raise AddressError(f"unsafe domain {domain!r}")
        path = os.path.join(self.root, domain, local)
        if os.path.dirname(os.path.dirname(path)) != self.root:
            raise AddressError(f"unsafe mailbox path for {user}")
        return path

    def ensure(self, maildir: str) -> None:
        """
        Create the Maildir and its parents durably if they do not exist.
        """
        if os.path.isdir(os.path.join(maildir, "new")):
            return
        created = []
        path = maildir
        while not os.path.isdir(path):
            created.append(path)
            path = os.path.dirname(path)
        for directory in reversed(created):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
        for sub in SUBDIRS:
            try:
                os.mkdir(os.path.join(maildir, sub), 0o700)
            except FileExistsError:
                pass
        if os.path.basename(maildir).startswith("."):  # a Maildir++ subfolder (Junk)
            os.close(os.open(os.path.join(maildir, "maildirfolder"),
                             os.O_WRONLY | os.O_CREAT, 0o600))
        fsync_directory(maildir)
        for directory in created:
            fsync_directory(os.path.dirname(directory))


_counter = itertools.count(1)


def unique_name(hostname: str, size: int, now: float | None = None,
                vsize: int | None = None) -> str:
    """
    A Maildir file name unique across processes and hosts (time, pid, a
    per-process counter and 64 random bits), with Dovecot's C{S=} size and
    C{W=} size with CRLF line endings (what IMAP and POP3 report).
    """
    now = time.time() if now is None else now
    seconds = int(now)
    micros = min(int((now - seconds) * 1_000_000), 999_999)
    host = hostname.replace("/", "\\057").replace(":", "\\072")
    return (
        f"{seconds}.M{micros:06d}P{os.getpid()}Q{next(_counter)}"
        f"R{secrets.token_hex(8)}.{host},S={size}" + (f",W={vsize}" if vsize is not None else "")
    )


_ARRIVAL = re.compile(r"(\d+)\.(?:[^.]*?M(\d+))?(?:[^.]*?P(\d+))?(?:[^.]*?Q(\d+))?")


def arrival_key(base: str) -> tuple[int, int, int, int, str]:
    """
    Sort key putting Maildir base names in arrival order: seconds, then
    microseconds as a number (names written before they were zero-padded,
    and other writers' names, sort right too), pid and counter; names of
    unknown form by their leading number, then as text.
    """
    match = _ARRIVAL.match(base)
    if match is None:
        return (0, 0, 0, 0, base)
    seconds, micros, pid, counter = (int(g) if g else 0 for g in match.groups())
    return (seconds, micros, pid, counter, base)


class MaildirWriter:
    """
    Writes copies of a spool into Maildirs, durably, in a worker thread.
    """

    def __init__(self, store: MaildirStore, hostname: str, syncer: DirectorySyncer | None = None):
        self.store = store
        self.hostname = hostname
        self.syncer = syncer or DirectorySyncer()

    def write(self, copies: list[Copy], spool: MessageSpool) -> list[str]:
        """
        Stage and commit every copy; return the paths in C{new/}.  Blocking:
        call it in a worker thread.
        """
        return self.commit(self.stage(copies, spool))

    def stage(self, copies: list[Copy], spool: MessageSpool) -> list[tuple[str, str]]:
        """
        Phase 1: write and fsync each copy in C{tmp/}; return the
        C{(tmp, new)} paths.  On failure nothing is left.  Blocking.
        """
        staged: list[tuple[str, str]] = []
        try:
            for copy in copies:
                # No link anywhere below the mail root: a planted one would
                # make delivery write outside the data directory.
                check_tree(self.store.root, copy.maildir, SUBDIRS)
                self.store.ensure(copy.maildir)
                check_tree(self.store.root, copy.maildir, SUBDIRS)
                size = len(copy.prefix) + spool.size
                vsize = size + copy.prefix.count(b"\n") + spool.lines
                name = unique_name(self.hostname, size, vsize=vsize)
                tmp = os.path.join(copy.maildir, "tmp", name)
                write_file(tmp, itertools.chain((copy.prefix,), spool.chunks()))
                staged.append((tmp, os.path.join(copy.maildir, "new", name)))
        except BaseException:
            self.discard(staged, [])
            raise
        return staged

    def commit(self, staged: list[tuple[str, str]]) -> list[str]:
        """
        Phase 2: rename every staged copy into C{new/} and fsync each
        C{new/}; return the paths.  On failure nothing is left.  Blocking.
        """
        committed: list[str] = []
        try:
            for tmp, new in staged:
                rename(tmp, new)
                committed.append(new)
            for directory in dict.fromkeys(os.path.dirname(new) for _, new in staged):
                self.syncer.sync(directory)
        except BaseException:
            self.discard(staged, committed)
            raise
        return committed

    def discard(self, staged: list[tuple[str, str]], committed: list[str]) -> None:
        """
        Remove the copies of a failed delivery, staged or committed, so the
        client's retry after its 4xx duplicates nothing.  Blocking.
        """
        for path in committed + [tmp for tmp, _ in staged]:
            discard(path)
        for directory in dict.fromkeys(os.path.dirname(path) for path in committed):
            try:
                fsync_directory(directory)
            except OSError:
                pass  # the removal is what matters; the original error is reported


@implementer(IDeliveryAgent, ITwoPhaseStore)
class MaildirDeliveryAgent:
    """
    The local delivery agent: one durable Maildir copy per local recipient,
    with C{Return-Path:} and C{Delivered-To:} added to each.
    """

    name = "maildir"

    def __init__(self, writer: MaildirWriter, reactor: IMailReactor,
                 pool: ThreadPool) -> None:
        self.writer = writer
        self.reactor = reactor
        self.pool = pool

    def copies_for(self, envelope: Envelope) -> list[Copy]:
        copies = []
        for rcpt in envelope.local:
            prefix = (
                f"Return-Path: {envelope.return_path}\n"
                f"Delivered-To: {rcpt.delivered_to}\n"
            ).encode("ascii")
            path = self.writer.store.path_for(rcpt.user)
            if envelope.folder:  # a filter's verdict: a Maildir++ subfolder
                path = os.path.join(path, "." + envelope.folder)
            copies.append(Copy(path, prefix))
        return copies

    def deliver(self, envelope: Envelope, spool: MessageSpool) -> "Deferred[list[str]]":
        d = self.prepare(envelope, spool)
        return d.addCallback(lambda staged: staged.commit())

    def prepare(self, envelope: Envelope, spool: MessageSpool) -> "Deferred[StagedCopies]":
        """
        Phase 1 (L{ITwoPhaseStore}): every copy written and fsynced in
        C{tmp/}; the L{StagedCopies} commits them into C{new/} or drops them.
        """
        try:
            copies = self.copies_for(envelope)
        except AddressError as e:
            return fail(e)
        d = deferToThreadPool(self.reactor, self.pool, self.writer.stage, copies, spool)
        d.addErrback(_log_link_refusal, envelope)
        return d.addCallback(lambda staged: StagedCopies(self, envelope, staged))


def _log_link_refusal(failure: Any, envelope: Envelope) -> Any:
    """
    A symbolic link planted in a Maildir is refused, never written through:
    say so in the log (the message is deferred, 451).
    """
    if failure.check(SymlinkRefused):
        log.warn("{qid}: status=deferred (refusing a link in a maildir: {path})",
                 qid=envelope.queue_id, path=failure.value.filename)
    return failure


@implementer(IPrepared)
class StagedCopies:
    """
    The copies of one message in C{tmp/}, waiting for the dispatcher's word.
    """

    def __init__(self, agent: MaildirDeliveryAgent, envelope: Envelope,
                 staged: list[tuple[str, str]]) -> None:
        self.agent = agent
        self.envelope = envelope
        self.staged = staged
        self.committed: list[str] = []

    def _blocking(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self.agent.reactor, self.agent.pool, f, *args)

    def commit(self) -> "Deferred[list[str]]":
        d = self._blocking(self.agent.writer.commit, self.staged)
        d.addErrback(_log_link_refusal, self.envelope)

        def logged(paths: list[str]) -> list[str]:
            self.committed = paths
            envelope = self.envelope
            delay = wall_seconds(self.agent.reactor) - envelope.received_at
            for rcpt in envelope.local:
                log.info(
                    "{qid}: to=<{to}> relay=local delay={delay:.2f} dsn=2.0.0 "
                    "status=sent (delivered to maildir)",
                    qid=envelope.queue_id, to=rcpt.delivered_to, delay=delay,
                )
                tally.delivery("sent", "local", delay)
            return paths

        return d.addCallback(logged)

    def abort(self) -> Deferred[None]:
        staged, committed, self.committed = self.staged, self.committed, []
        if committed:
            log.warn("{qid}: {n} maildir copies removed again: another store failed",
                     qid=self.envelope.queue_id, n=len(committed))
        return self._blocking(self.agent.writer.discard, staged, committed)
