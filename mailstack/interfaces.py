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
