# -*- test-case-name: tests.test_imap,tests.test_pop3 -*-
"""
Who a login becomes: one realm for IMAP and POP3, over the same Maildirs.
"""

from __future__ import annotations

import weakref
from typing import Any

from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.mail import imap4, pop3
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from mailstack.access.mailbox import MaildirAccount
from mailstack.access.scan import scan
from mailstack.access.pop3 import MaildirMailbox
from mailstack.access.watch import Watches
from mailstack.address import parse_address
from mailstack.delivery.maildir import MaildirStore


@implementer(IRealm)
class MaildirRealm:
    """
    A logged-in user gets, for IMAP, an account over their Maildir++ (the
    usual folders created on the first login); for POP3, their INBOX as
    listed at login.  All file work runs in the worker pool, at most
    L{per_user} jobs of one user at a time (all their sessions together),
    so one user's parallel sessions cannot take every worker thread.
    """

    per_user = 2

    def __init__(self, store: MaildirStore, hostname: str, reactor: IReactorFromThreads,
                 pool: ThreadPool) -> None:
        self.store = store
        self.hostname = hostname
        self.reactor = reactor
        self.pool = pool
        self._shares: weakref.WeakValueDictionary[str, DeferredSemaphore] = (
            weakref.WeakValueDictionary())
        self.watches = Watches(reactor)  # folder change detection for every session

    def share(self, root: str) -> DeferredSemaphore:
        """
        The worker-thread share of the user whose Maildir is C{root}, kept
        while one of their sessions lives.
        """
        share = self._shares.get(root)
        if share is None:
            share = self._shares[root] = DeferredSemaphore(self.per_user)
        return share

    def requestAvatar(self, avatar_id: Any, mind: Any, *interfaces: Any) -> Deferred[Any]:
        user = parse_address(avatar_id if isinstance(avatar_id, str) else avatar_id.decode())
        root = self.store.path_for(user)
        if imap4.IAccount in interfaces:
            account = MaildirAccount(root, self.hostname, self.reactor, self.pool,
                                     share=self.share(root), watches=self.watches)

            def prepare() -> None:
                self.store.ensure(root)
                account.prepare()

            d = deferToThreadPool(self.reactor, self.pool, prepare)
            return d.addCallback(lambda _: (imap4.IAccount, account, lambda: None))
        if pop3.IMailbox in interfaces:
            scanned = deferToThreadPool(self.reactor, self.pool, scan, root, self.store.root)
            return scanned.addCallback(lambda messages: (pop3.IMailbox, MaildirMailbox(messages),
                                                   lambda: None))
        raise NotImplementedError("IMAP accounts and POP3 mailboxes only")


def make_portal(store: MaildirStore, hostname: str, checker: ICredentialsChecker,
                reactor: IReactorFromThreads, pool: ThreadPool) -> Portal:
    return Portal(MaildirRealm(store, hostname, reactor, pool), [checker])
