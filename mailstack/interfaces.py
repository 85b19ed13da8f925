"""
The contracts between mailstack's parts, which a plugin may also provide.

A plugin is a factory object (L{IMessageFilterFactory},
L{IOutboundTransformFactory}, L{IDeliveryAgentFactory} or
L{IUserDatabaseFactory}, with C{twisted.plugin.IPlugin}) in a module of
the C{mailstack.plugins} package; the server calls its C{configure} (see
L{IConfigurable}) and then its C{build}, and uses what C{build} returns.
The objects a plugin is handed are:

  - L{mailstack.address.Address}: a mailbox, C{local@domain}, the domain
    normalised (C{str()} of it is the address);
  - L{mailstack.smtp.server.Session}: who the SMTP client is;
  - L{mailstack.message.Envelope}: who a message is from and for;
  - L{mailstack.message.MessageSpool}: the message itself, LF line endings;
  - L{mailstack.config.Config}: the server's configuration;
  - the reactor, a L{mailstack.reactors.IMailReactor}.

A plugin answers with C{None}, a L{mailstack.smtp.reply.Reply}, a
L{mailstack.plugin.Verdict}, header fields or a C{dict} of replies, as
each method says.  Every method may instead return a C{Deferred} of its
answer or be an C{async def}; none may block the reactor thread (file,
database and CPU work go to a worker thread:
C{twisted.internet.threads.deferToThread}).
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

    def password_hash(address):
        """
        The password hash of a local user, for a login.

        @param address: the user, normalised (lowercased).
        @type address: L{mailstack.address.Address}
        @return: the stored Argon2 hash (a PHC string, as
            L{mailstack.auth.hash_password} makes it), or C{None} for no
            such user; or a Deferred of it.
        @rtype: C{str} or C{None}
        """

    def exists(address):
        """
        Whether mail to C{address} has a local mailbox.

        @param address: the recipient, normalised.
        @type address: L{mailstack.address.Address}
        @return: whether it is a local user, or a Deferred of it.
        @rtype: C{bool}
        """


class IAliasMap(Interface):
    """
    Aliases: an address that stands for one or more other addresses.  A
    user database that does not provide it has C{DATA/aliases} beside it.
    """

    def targets(address):
        """
        What an alias stands for.

        @param address: the recipient, normalised.
        @type address: L{mailstack.address.Address}
        @return: the targets (local or remote), or C{None} if the address
            is not an alias; or a Deferred of it.  A target may itself be
            an alias; a loop is refused at RCPT.
        @rtype: C{tuple} of L{mailstack.address.Address}, or C{None}
        """


class IUserDatabaseFactory(Interface):
    """
    A user database plugin, chosen with C{--user-db NAME} (default
    C{file}: C{DATA/users} and C{DATA/aliases}).
    """

    name = Attribute("What --user-db calls it (str).")
    description = Attribute("One line for mailstack plugins and the log (str).")

    def build(config, reactor):
        """
        Make the database for a running server.  Called once, at start,
        after C{configure} (L{IConfigurable}).

        @param config: the server's configuration.
        @type config: L{mailstack.config.Config}
        @param reactor: the reactor.
        @type reactor: L{mailstack.reactors.IMailReactor}
        @return: an object providing L{IUserDatabase}, and L{IAliasMap} if
            it keeps the aliases too.
        @raise mailstack.config.ConfigError: the database cannot be used;
            the server does not start, and says why.
        """


class IOutboundQueue(Interface):
    """
    Where mail for remote recipients goes: a durable queue.
    """

    def enqueue(envelope, spool):
        """
        Store the message durably for later delivery to each of the
        envelope's remote recipients.

        @param envelope: its C{remote} recipients are queued.
        @type envelope: L{mailstack.message.Envelope}
        @param spool: the message, complete.
        @type spool: L{mailstack.message.MessageSpool}
        @return: a Deferred that fires (with C{None}) once the message is on
            disk (fsynced), or fails having stored nothing.
        """


class IDeliveryAgent(Interface):
    """
    Something that makes a received message durable for its recipients,
    run at DATA: the C{250} the client gets means every copy is durable.
    """

    name = Attribute("A short name for log lines (str).")

    def deliver(envelope, spool):
        """
        Deliver the message to every local recipient of C{envelope}.

        @param envelope: C{envelope.local} lists the mailboxes (each a
            L{mailstack.message.LocalRecipient}); C{envelope.folder} is the
            folder a filter asked for, or C{None}.
        @type envelope: L{mailstack.message.Envelope}
        @param spool: the message, LF line endings; read it in a worker
            thread (C{spool.chunks()}).
        @type spool: L{mailstack.message.MessageSpool}
        @return: a Deferred that fires once every copy is durable, or fails
            having left none visible (the client then gets a 4xx).
        """


class ITwoPhaseStore(Interface):
    """
    A store (an L{IDeliveryAgent} or L{IOutboundQueue}) that can write a
    message durably without making it visible, so the dispatcher can undo
    every store of a message when one of them fails: a 4xx then leaves
    nothing behind for the client's retry to duplicate.  A store without
    it is written in one step and cannot be undone.
    """

    def prepare(envelope, spool):
        """
        Write everything durably but invisibly (Maildir C{tmp/}, the queue's
        C{tmp/}).

        @param envelope: as for L{IDeliveryAgent.deliver}.
        @type envelope: L{mailstack.message.Envelope}
        @param spool: the message.
        @type spool: L{mailstack.message.MessageSpool}
        @return: a Deferred firing with an L{IPrepared}, or failing having
            left nothing.  It fires only once C{spool} is no longer read.
        """


class IPrepared(Interface):
    """
    A message a L{ITwoPhaseStore} has prepared.
    """

    def commit():
        """
        Make it visible (and deliverable).

        @return: a Deferred that fires once it is; on failure nothing is
            left.
        """

    def abort():
        """
        Remove it, prepared or committed.

        @return: a Deferred that does not fail.
        """


class IMessageFilter(Interface):
    """
    A verdict on an SMTP transaction at connect, MAIL, RCPT and DATA.

    Each method returns C{None} (no objection), a refusal
    (L{mailstack.smtp.reply.Reply} with a 4xx or 5xx code), or a Deferred
    of either, or is an C{async def}; raising
    L{mailstack.smtp.reply.SMTPError} refuses too.  The session
    (L{mailstack.smtp.server.Session}) tells who the client is:
    C{peer_host}, C{helo}, C{tls}, C{user} (after AUTH) and C{service}
    (C{smtp}, C{submission}, C{submissions}, or C{local} for injected
    mail).  Filters run after mailstack's own checks at connect, MAIL and
    RCPT (an unknown user is refused before any filter sees it), and
    before delivery at DATA.  L{mailstack.smtp.filters.MessageFilter} is a
    base with no objection anywhere.

    A filter that raises, answers something else, or has not answered
    within its C{timeout} attribute (seconds, default 30) tempfails: C{451
    4.7.1} (C{421 4.7.1} and the connection closed at connect), its
    traceback logged, the exception text never in the reply.
    """

    name = Attribute("The filter's name, for log lines (str).")

    def connect(session):
        """
        A client connected.

        @param session: who the client is.
        @type session: L{mailstack.smtp.server.Session}
        @return: C{None}, or a L{mailstack.smtp.reply.Reply} refusal (the
            connection is then closed after it); or a Deferred of either.
        """

    def mail(session, sender):
        """
        MAIL FROM.

        @param session: who the client is.
        @type session: L{mailstack.smtp.server.Session}
        @param sender: the envelope sender, or C{None} for the null sender
            (C{MAIL FROM:<>}, a bounce).
        @type sender: L{mailstack.address.Address} or C{None}
        @return: C{None}, or a L{mailstack.smtp.reply.Reply} refusal; or a
            Deferred of either.
        """

    def rcpt(session, sender, rcpt):
        """
        RCPT TO, for a recipient the server would accept.

        @param session: who the client is.
        @type session: L{mailstack.smtp.server.Session}
        @param sender: the envelope sender, or C{None} for the null sender.
        @type sender: L{mailstack.address.Address} or C{None}
        @param rcpt: the recipient.
        @type rcpt: L{mailstack.address.Address}
        @return: C{None}, or a L{mailstack.smtp.reply.Reply} refusal of
            this recipient; or a Deferred of either.
        """

    def data(session, envelope, spool):
        """
        The whole message is in, before it is made durable.  Runs on the
        receiving MTA, on submission, and on locally injected mail
        (maildrop pickup: C{session.service} is C{local}, C{session.user}
        the local user); C{envelope.origin} says the same.

        Besides C{None} and a refusal, it may return a
        L{mailstack.plugin.Verdict}: header fields to prepend (in order,
        above the C{Received:} field), received header fields to remove
        (by index in C{spool.header_fields()}), a folder for local Maildir
        delivery (e.g. C{Junk}), or discard (C{250}, delivered nowhere,
        logged).  The filters run in order; every filter's header fields
        are added, the first folder asked for wins, and a refusal or a
        discard stops the rest.  CPU work belongs in a worker thread
        (C{twisted.internet.threads.deferToThread}).

        @param session: who the client is.
        @type session: L{mailstack.smtp.server.Session}
        @param envelope: the sender and recipients.
        @type envelope: L{mailstack.message.Envelope}
        @param spool: the message (C{read()}, C{chunks()}, C{size},
            C{header_fields()}), with the header fields earlier filters
            added.
        @type spool: L{mailstack.message.MessageSpool}
        @return: C{None}, a L{mailstack.smtp.reply.Reply} refusal, a
            L{mailstack.plugin.Verdict}, or a Deferred or coroutine of one.
        @raise mailstack.smtp.reply.SMTPError: refuses with its reply.
        """


class IMessageFilterFactory(Interface):
    """
    A message filter plugin: an object provided by a module in the
    C{mailstack.plugins} package (any C{mailstack/plugins/} directory on
    C{sys.path}), found with C{twisted.plugin.getPlugins} and enabled with
    C{--filter NAME}.
    """

    name = Attribute("What --filter calls it (str).")
    description = Attribute("One line for --help and the log (str).")

    def build(config, reactor):
        """
        Make the filter for a running server.  Called once, at start,
        after C{configure} (L{IConfigurable}).

        @param config: the server's configuration.
        @type config: L{mailstack.config.Config}
        @param reactor: the reactor.
        @type reactor: L{mailstack.reactors.IMailReactor}
        @return: an L{IMessageFilter}.
        @raise mailstack.config.ConfigError: the filter cannot run; the
            server does not start, and says why.
        """


class IConfigurable(Interface):
    """
    Optional for any plugin factory: options from the C{[plugins.NAME]}
    table of the TOML configuration, given before C{build}.  A factory
    without C{configure} takes no options (a table for it is an error).
    """

    def configure(options):
        """
        Check and keep the options (L{mailstack.plugin.check_options} does
        the work).

        @param options: the table (empty when there is none).
        @type options: C{dict}
        @raise mailstack.config.ConfigError: naming a bad or unknown key;
            the server does not start.
        """


class IOutboundTransform(Interface):
    """
    Changes mail leaving through the queue or submitted by local users
    before it is queued: run once per message, after the filters, for
    every message with a remote recipient or whose origin
    (C{envelope.origin}) is C{submission}, C{submissions} or C{local}.
    What a DKIM signer needs.
    """

    name = Attribute("The transform's name, for log lines (str).")
    timeout = Attribute("Seconds it may take (optional; default 30).")

    def transform(envelope, spool):
        """
        Look at the message and say which header fields to prepend.  A
        failure or timeout tempfails the message (C{451 4.7.1}) and is
        logged with its traceback.  May be an C{async def}.

        @param envelope: the sender and recipients (C{sender}, C{rcpts},
            C{remote}, C{origin}).
        @type envelope: L{mailstack.message.Envelope}
        @param spool: the message with every header field added so far.
        @type spool: L{mailstack.message.MessageSpool}
        @return: a sequence of header fields (C{"Name: value"}, C{str} or
            C{bytes}; folded lines continue after an LF with a space),
            prepended in order; or a Deferred or coroutine of it.
        """


class IOutboundTransformFactory(Interface):
    """
    An outbound transform plugin, enabled with C{--transform NAME}.
    """

    name = Attribute("What --transform calls it (str).")
    description = Attribute("One line for mailstack plugins and the log (str).")

    def build(config, reactor):
        """
        Make the transform for a running server.  Called once, at start,
        after C{configure} (L{IConfigurable}).

        @param config: the server's configuration.
        @type config: L{mailstack.config.Config}
        @param reactor: the reactor.
        @type reactor: L{mailstack.reactors.IMailReactor}
        @return: an L{IOutboundTransform}.
        @raise mailstack.config.ConfigError: the transform cannot run; the
            server does not start, and says why.
        """


class IQueuedDeliveryAgent(Interface):
    """
    A delivery agent run from the outbound queue, as Postfix's lmtp(8)
    and pipe(8) run from its queue: a message for its recipients is first
    made durable in the queue (the C{250} after DATA), then handed over;
    each recipient's answer is honoured on its own: 2xx delivered, 4xx
    retried on the queue's schedule, 5xx bounced to the sender.
    """

    name = Attribute("A short name for log lines (relay=NAME) (str).")

    def deliver_queued(sender, recipients, open_content, size):
        """
        Deliver one message to some of its local recipients.

        @param sender: the envelope sender, C{""} for the null sender.
        @type sender: C{str}
        @param recipients: the recipient addresses.
        @type recipients: C{list} of C{str}
        @param open_content: a callable returning a new binary file of the
            message (LF line endings); read it in a worker thread or in
            chunks, and close it.
        @type open_content: C{Callable[[], BinaryIO]}
        @param size: the message's size in bytes.
        @type size: C{int}
        @return: a Deferred (or coroutine) firing with a C{dict} from each
            recipient to its L{mailstack.smtp.reply.Reply}; a recipient
            left out, or a failure, defers (every recipient, for a
            failure).
        """


class IDeliveryAgentFactory(Interface):
    """
    A delivery agent plugin, chosen with C{--delivery NAME} (everyone),
    C{--delivery DOMAIN=NAME} or C{--delivery USER@DOMAIN=NAME}.
    """

    name = Attribute("What --delivery calls it (str).")
    description = Attribute("One line for mailstack plugins and the log (str).")

    def build(config, reactor):
        """
        Make the agent for a running server.  Called once, at start, after
        C{configure} (L{IConfigurable}).

        @param config: the server's configuration.
        @type config: L{mailstack.config.Config}
        @param reactor: the reactor.
        @type reactor: L{mailstack.reactors.IMailReactor}
        @return: an L{IQueuedDeliveryAgent} (run from the queue, per
            recipient answers), or an L{IDeliveryAgent} run at DATA like
            Maildir (its C{deliver} must make every copy durable before it
            fires; with L{ITwoPhaseStore} too, the dispatcher can undo it
            when another store of the message fails).
        @raise mailstack.config.ConfigError: the agent cannot run; the
            server does not start, and says why.
        """
