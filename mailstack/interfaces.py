"""
The contracts between mailstack's parts, which a plugin may also provide.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IUserDatabase(Interface):
    """
    Who the local users are, and their password hashes.
    """

    def password_hash(address):  # type: ignore[no-untyped-def]
        """
        Return the stored hash for the normalised L{Address}, or C{None}.
        """

    def exists(address):  # type: ignore[no-untyped-def]
        """
        Return whether the L{Address} is a local user.
        """


class IAliasMap(Interface):
    """
    Aliases: an address that stands for one or more other addresses.
    """

    def targets(address):  # type: ignore[no-untyped-def]
        """
        Return the tuple of target L{Address}es, or C{None} if the address
        is not an alias.
        """


class IOutboundQueue(Interface):
    """
    Where mail for remote recipients goes: a durable queue.
    """

    def enqueue(envelope, spool):  # type: ignore[no-untyped-def]
        """
        Store the message durably for later delivery to each of the
        envelope's remote recipients; the Deferred fires once it is on disk.
        """


class IDeliveryAgent(Interface):
    """
    Something that makes a received message durable for its recipients.
    """

    name = Attribute("A short name for log lines.")

    def deliver(envelope, spool):  # type: ignore[no-untyped-def]
        """
        Deliver C{spool} (the message, LF line endings) to every local
        recipient of C{envelope}; the Deferred fires once every copy is
        durable, or fails having left none visible.
        """


class ITwoPhaseStore(Interface):
    """
    A store (an L{IDeliveryAgent} or L{IOutboundQueue}) that can write a
    message durably without making it visible, so the dispatcher can undo
    every store of a message when one of them fails: a 4xx then leaves
    nothing behind for the client's retry to duplicate.  A store without
    it is written in one step and cannot be undone.
    """

    def prepare(envelope, spool):  # type: ignore[no-untyped-def]
        """
        Write everything durably but invisibly (Maildir C{tmp/}, the queue's
        C{tmp/}); a Deferred firing with an L{IPrepared}, or failing having
        left nothing.  Fires only once C{spool} is no longer read.
        """


class IPrepared(Interface):
    """
    A message a L{ITwoPhaseStore} has prepared.
    """

    def commit():  # type: ignore[no-untyped-def]
        """
        Make it visible (and deliverable); a Deferred.  On failure nothing
        is left.
        """

    def abort():  # type: ignore[no-untyped-def]
        """
        Remove it, prepared or committed; a Deferred that does not fail.
        """


class IMessageFilter(Interface):
    """
    A verdict on an SMTP transaction at connect, MAIL, RCPT and DATA.

    Each method returns C{None} (no objection), a refusal
    (L{mailstack.smtp.reply.Reply} with a 4xx or 5xx code), or a Deferred
    of either; raising L{mailstack.smtp.reply.SMTPError} refuses too.  The
    session (L{mailstack.smtp.server.Session}) tells who the client is:
    C{peer_host}, C{helo}, C{tls}, C{user} (after AUTH) and C{service}
    (C{smtp}, C{submission}, C{submissions}).  Filters run after
    mailstack's own checks at connect, MAIL and RCPT (an unknown user is
    refused before any filter sees it), and before delivery at DATA.
    """

    name = Attribute("The filter's name, for log lines.")

    def connect(session):  # type: ignore[no-untyped-def]
        """
        A client connected.
        """

    def mail(session, sender):  # type: ignore[no-untyped-def]
        """
        MAIL FROM: C{sender} is an L{Address}, or C{None} for the null sender.
        """

    def rcpt(session, sender, rcpt):  # type: ignore[no-untyped-def]
        """
        RCPT TO: an L{Address} the server would accept.
        """

    def data(session, envelope, spool):  # type: ignore[no-untyped-def]
        """
        The whole message (C{spool}, a L{MessageSpool}: C{read()},
        C{chunks()}, C{size}) is in, before it is made durable.
        """


class IMessageFilterFactory(Interface):
    """
    A message filter plugin: an object provided by a module in the
    C{mailstack.plugins} package (any C{mailstack/plugins/} directory on
    C{sys.path}), found with C{twisted.plugin.getPlugins} and enabled with
    C{--filter NAME}.
    """

    name = Attribute("What --filter calls it.")
    description = Attribute("One line for --help and the log.")

    def build(config, reactor):  # type: ignore[no-untyped-def]
        """
        Make the L{IMessageFilter} for a running server with this
        L{mailstack.config.Config}.
        """
