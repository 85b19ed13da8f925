"""
The contracts between mailstack's parts, which a plugin may also provide.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface


class IUserDatabase(Interface):
    """
    Who the local users are, and their password hashes.  One database
    serves SMTP AUTH, IMAP, POP3, routing and sender authorization.  Each
    method may answer at once or with a Deferred (e.g. SQL in a worker
    thread); it must never block the reactor thread.
    """

    def password_hash(address):  # type: ignore[no-untyped-def]
        """
        @param address: a normalised (lowercased) L{Address}.
        @return: the stored Argon2 hash (PHC string), or C{None}; or a
            Deferred of it.
        """

    def exists(address):  # type: ignore[no-untyped-def]
        """
        @param address: a normalised L{Address}.
        @return: whether it is a local user, or a Deferred of it.
        """


class IAliasMap(Interface):
    """
    Aliases: an address that stands for one or more other addresses.
    """

    def targets(address):  # type: ignore[no-untyped-def]
        """
        @param address: a normalised L{Address}.
        @return: the tuple of target L{Address}es, or C{None} if the
            address is not an alias; or a Deferred of it.
        """


class IUserDatabaseFactory(Interface):
    """
    A user database plugin, chosen with C{--user-db NAME} (default
    C{file}: C{DATA/users} and C{DATA/aliases}).
    """

    name = Attribute("What --user-db calls it.")
    description = Attribute("One line for mailstack plugins and the log.")

    def build(config, reactor):  # type: ignore[no-untyped-def]
        """
        @param config: the L{mailstack.config.Config}.
        @param reactor: the reactor.
        @return: an object providing L{IUserDatabase} and L{IAliasMap}.
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
        C{chunks()}, C{size}) is in, before it is made durable.  Runs on
        the receiving MTA, on submission, and on locally injected mail
        (maildrop pickup: C{session.service} is C{local}, C{session.user}
        the local user); C{envelope.origin} says the same.

        Besides C{None} and a refusal, it may return a
        L{mailstack.plugin.Verdict}: header fields to prepend (in order,
        above the C{Received:} field), received header fields to remove
        (by index in C{spool.header_fields()}), a folder for local Maildir
        delivery (e.g. C{Junk}), or discard (C{250}, delivered nowhere,
        logged).
        The filters run in order; every filter's header fields are added,
        the first folder asked for wins, and a refusal or a discard stops
        the rest.  A filter that raises, or has not answered within its
        C{timeout} attribute (seconds, default 30), tempfails the message
        (C{451 4.7.1}) and its traceback is logged.  The method may be an
        C{async def}; CPU work belongs in a worker thread
        (C{twisted.internet.threads.deferToThread}).

        @param session: who the client is (L{mailstack.smtp.server.Session}).
        @param envelope: the L{mailstack.message.Envelope}.
        @param spool: the L{mailstack.message.MessageSpool}.
        @return: C{None}, a L{mailstack.smtp.reply.Reply} refusal, a
            L{mailstack.plugin.Verdict}, or a Deferred or coroutine of one.
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


class IConfigurable(Interface):
    """
    Optional for any plugin factory: options from the C{[plugins.NAME]}
    table of the TOML configuration, given before C{build}.  A factory
    without C{configure} takes no options (a table for it is an error).
    """

    def configure(options):  # type: ignore[no-untyped-def]
        """
        Check and keep the options (L{mailstack.plugin.check_options} does
        the work); raise L{mailstack.config.ConfigError} naming a bad or
        unknown key, which stops the server at start.

        @param options: the table, a C{dict} (empty when there is none).
        """


class IOutboundTransform(Interface):
    """
    Changes mail leaving through the queue or submitted by local users
    before it is queued: run once per message, after the filters, for
    every message with a remote recipient or whose origin
    (C{envelope.origin}) is C{submission}, C{submissions} or C{local}.
    What a DKIM signer needs.
    """

    name = Attribute("The transform's name, for log lines.")
    timeout = Attribute("Seconds it may take (optional; default 30).")

    def transform(envelope, spool):  # type: ignore[no-untyped-def]
        """
        Look at the message and say which header fields to prepend.  A
        failure or timeout tempfails the message (C{451 4.7.1}) and is
        logged with its traceback.  May be an C{async def}.

        @param envelope: the L{mailstack.message.Envelope} (C{sender},
            C{rcpts}, C{remote}, C{origin}).
        @param spool: the L{mailstack.message.MessageSpool} with every
            header field added so far.
        @return: a sequence of header fields (C{"Name: value"}, C{str} or
            C{bytes}; folded lines continue after an LF with a space),
            prepended in order; or a Deferred or coroutine of it.
        """


class IOutboundTransformFactory(Interface):
    """
    An outbound transform plugin, enabled with C{--transform NAME}.
    """

    name = Attribute("What --transform calls it.")
    description = Attribute("One line for mailstack plugins and the log.")

    def build(config, reactor):  # type: ignore[no-untyped-def]
        """
        @param config: the L{mailstack.config.Config}.
        @param reactor: the reactor.
        @return: an L{IOutboundTransform}.
        """


class IQueuedDeliveryAgent(Interface):
    """
    A delivery agent run from the outbound queue, as Postfix's lmtp(8)
    and pipe(8) run from its queue: a message for its recipients is first
    made durable in the queue (the C{250} after DATA), then handed over;
    each recipient's answer is honoured on its own: 2xx delivered, 4xx
    retried on the queue's schedule, 5xx bounced to the sender.
    """

    name = Attribute("A short name for log lines (relay=NAME).")

    def deliver_queued(sender, recipients, open_content, size):  # type: ignore[no-untyped-def]
        """
        Deliver one message to some of its local recipients.

        @param sender: the envelope sender, C{""} for the null sender.
        @param recipients: the recipient addresses (C{str}).
        @param open_content: a callable returning a new binary file of the
            message (LF line endings); read it in a worker thread or in
            chunks.
        @param size: the message's size in bytes.
        @return: a Deferred (or coroutine) firing with a C{dict} from each
            recipient to its L{mailstack.smtp.reply.Reply}; a failure
            defers every recipient.
        """


class IDeliveryAgentFactory(Interface):
    """
    A delivery agent plugin, chosen with C{--delivery NAME} (everyone),
    C{--delivery DOMAIN=NAME} or C{--delivery USER@DOMAIN=NAME}.
    """

    name = Attribute("What --delivery calls it.")
    description = Attribute("One line for mailstack plugins and the log.")

    def build(config, reactor):  # type: ignore[no-untyped-def]
        """
        @param config: the L{mailstack.config.Config}.
        @param reactor: the reactor.
        @return: an L{IQueuedDeliveryAgent} (run from the queue, per
            recipient answers), or an L{IDeliveryAgent} run at DATA like
            Maildir (its C{deliver} must make every copy durable before it
            fires; with L{ITwoPhaseStore} too, the dispatcher can undo it
            when another store of the message fails).
        """
