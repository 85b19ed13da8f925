# -*- test-case-name: tests.test_twisted_privates -*-
"""
Every private name of Twisted that mailstack relies on, where and why.

Twisted may rename or remove a private name in any release without a
deprecation.  Some of mailstack's security rests on them: the bytes a
client sends after STARTTLS/STLS in the same packet must never be read as
commands inside TLS (CVE-2011-0411), and a POP3 USER given before STLS
must not carry over.  So each use is listed in L{PRIVATES}, and
C{tests.test_twisted_privates} checks on the installed Twisted that each
still exists with the shape mailstack expects and, where that is cheap,
still behaves as relied on.  A Twisted upgrade that changes one fails that
test by name instead of silently reopening a hole.

The uses that only read or reset a value go through the functions here
(L{buffered_input_size}, L{discard_buffered_input}, L{pop3_pending_user},
L{forget_pop3_user}); overrides of private methods cannot, and are listed
with the methods that override them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Private:
    """
    One private name of Twisted that mailstack uses.

    @ivar owner: the dotted name of the Twisted class that defines it.
    @ivar name: the attribute as looked up (a C{__name} method in its
        mangled form, C{_Class__name}).
    @ivar kind: C{"method"} (called or overridden) or C{"attribute"}.
    @ivar parameters: for a method, the parameter names expected, C{self}
        first; C{None} for an attribute.
    @ivar users: where mailstack uses it (module: what).
    @ivar why: what mailstack needs it for.
    @ivar security: whether a change could reopen a security hole (rather
        than only break a feature, which other tests would show).
    """

    owner: str
    name: str
    kind: str
    parameters: tuple[str, ...] | None
    users: tuple[str, ...]
    why: str
    security: bool = False


LINE_RECEIVER = "twisted.protocols.basic.LineReceiver"
LINE_ONLY_RECEIVER = "twisted.protocols.basic.LineOnlyReceiver"
IMAP4_SERVER = "twisted.mail.imap4.IMAP4Server"
POP3 = "twisted.mail.pop3.POP3"

PRIVATES: tuple[Private, ...] = (
    Private(
        LINE_RECEIVER, "_buffer", "attribute", None,
        ("mailstack.access.imap: STARTTLS, the limit on input read ahead, "
         "lineLengthExceeded", "mailstack.queue.control: the limit on input read ahead"),
        "The bytes read but not yet handed over as lines.  Emptying it while "
        "a line is handled drops the rest of the packet, because "
        "LineReceiver.dataReceived reads the next line from it after each one: "
        "after STARTTLS nothing sent in clear text runs inside TLS.",
        security=True),
    Private(
        LINE_ONLY_RECEIVER, "_buffer", "attribute", None,
        ("mailstack.access.pop3: STLS",),
        "The partial line after the last delimiter of a packet.  "
        "LineOnlyReceiver splits the whole packet before handing over lines, so "
        "on STLS mailstack drops the complete lines itself (_after_stls) and "
        "empties this for the partial one, which would otherwise start the "
        "first line read inside TLS.",
        security=True),
    Private(
        POP3, "_userIs", "attribute", None,
        ("mailstack.access.pop3: STLS, PASS",),
        "The name given with USER, which POP3.do_USER stores and PASS uses.  "
        "Reset on STLS so a USER sent in clear text (or injected before the "
        "handshake) does not carry into the TLS session; read by the PASS "
        "that mailstack's throttle wraps.",
        security=True),
    Private(
        POP3, "_longOperation", "method", ("self", "d"),
        ("mailstack.access.pop3: overridden",),
        "Twisted calls it around RETR, TOP, LIST, UIDL and QUIT and stops the "
        "idle timer meanwhile; the override keeps the timer running, so a "
        "client that never reads its RETR cannot hold the session forever.",
        security=True),
    Private(
        POP3, "_unblock", "method", ("self", "_"),
        ("mailstack.access.pop3: overridden, called",),
        "Runs the commands queued in POP3.blocked once an operation ends; the "
        "override also resumes reading (paused while commands queue, to "
        "bound the memory a client can make the server hold).",
        security=True),
    Private(
        POP3, "_cbMailbox", "method", ("self", "result", "user"),
        ("mailstack.access.pop3: overridden, called from do_PASS",),
        "Completes a login: the override logs it, then lets Twisted set the "
        "mailbox up."),
    Private(
        POP3, "_ebMailbox", "method", ("self", "failure"),
        ("mailstack.access.pop3: overridden, called from do_PASS",),
        "A failed login: the override answers the throttle's refusals with "
        "[SYS/TEMP] and logs failures with the user's name."),
    Private(
        POP3, "_ebUnexpected", "method", ("self", "failure"),
        ("mailstack.access.pop3: overridden, called from do_PASS",),
        "An unexpected login error: the override logs it and answers without "
        "the exception's text (Twisted's sends it to the client).",
        security=True),
    Private(
        POP3, "_highest", "attribute", None,
        ("mailstack.access.pop3: RETR, TOP",),
        "The highest message number retrieved, which Twisted's LAST answers "
        "and RSET resets; mailstack sends RETR and TOP itself (one write per "
        "message) and keeps it up to date as Twisted's did."),
    Private(
        IMAP4_SERVER, "_respond", "method", ("self", "state", "tag", "message"),
        ("mailstack.access.imap: overridden",),
        "Every tagged response passes here: the override marks the command "
        "done (the session reads again) and counts BAD answers in a row.",
        security=True),
    Private(
        IMAP4_SERVER, "_IMAP4Server__doCommand", "method",
        ("self", "tag", "handler", "args", "parseargs", "line", "uid"),
        ("mailstack.access.imap: parse_command calls it",),
        "Runs a command with its argument parsers; mailstack calls it with "
        "stricter parsers of its own (literals limited, errors answered BAD)."),
    Private(
        IMAP4_SERVER, "_IMAP4Server__ebDispatch", "method", ("self", "failure", "tag"),
        ("mailstack.access.imap: overridden",),
        "A command that failed: the override answers without the exception's "
        "text and logs the traceback.",
        security=True),
    Private(
        IMAP4_SERVER, "_IMAP4Server__ebLogin", "method", ("self", "failure", "tag"),
        ("mailstack.access.imap: overridden",),
        "A failed LOGIN: the override answers the throttle's refusals, storage "
        "errors, a wrong password (NO [AUTHENTICATIONFAILED]) and anything "
        "else without the exception's text, which Twisted's answer carries.",
        security=True),
    Private(
        IMAP4_SERVER, "_IMAP4Server__ebAuthResp", "method", ("self", "failure", "tag"),
        ("mailstack.access.imap: overridden",),
        "A failed AUTHENTICATE, as for LOGIN.",
        security=True),
    Private(
        IMAP4_SERVER, "_IMAP4Server__ebAuthChunk", "method", ("self", "failure", "tag"),
        ("mailstack.access.imap: overridden",),
        "A bad AUTHENTICATE continuation: the override answers without the "
        "exception's text.",
        security=True),
    Private(
        IMAP4_SERVER, "_stringLiteral", "method", ("self", "size"),
        ("mailstack.access.imap: overridden, called for string literals",),
        "Reads a string literal; the override sets its size limit first.",
        security=True),
    Private(
        IMAP4_SERVER, "_literalStringLimit", "attribute", None,
        ("mailstack.access.imap: _stringLiteral",),
        "The largest string literal _stringLiteral accepts; mailstack sets "
        "its own limit (memory a client can make the server hold).",
        security=True),
    Private(
        IMAP4_SERVER, "_fileLiteral", "method", ("self", "size"),
        ("mailstack.access.imap: arg_literal",),
        "Reads a message literal (APPEND) into a temporary file, after "
        "mailstack checked its size against --max-message-size."),
    Private(
        IMAP4_SERVER, "_pendingLiteral", "attribute", None,
        ("mailstack.access.imap: rawDataReceived",),
        "The literal being read; mailstack's rawDataReceived feeds it so that "
        "literal bytes do not reset the idle timer."),
    Private(
        "twisted.application.internet.StreamServerEndpointService", "_waitingForPort",
        "attribute", None,
        ("mailstack.stack: Listener.privilegedStartService",),
        "The Deferred of the listening port, which Twisted does not expose: "
        "a Listener logs where it listens and fires its own public Deferred."),
    Private(
        "twisted.logger.LogPublisher", "_observers", "attribute", None,
        ("mailstack.logs: filter_noise",),
        "The observers already added (twistd's log file), wrapped in the noise "
        "filter; without it the noise is logged and nothing else changes."),
    Private(
        "twisted.internet.abstract.FileDescriptor", "_tempDataLen", "attribute", None,
        ("mailstack.sockets: write_now",),
        "How much a connection's write buffer holds besides dataBuffer: a "
        "reply goes straight to the socket only when nothing is waiting "
        "before it (the order of the bytes)."),
    Private(
        "twisted.internet.abstract.FileDescriptor", "_writeDisconnected", "attribute", None,
        ("mailstack.sockets: write_now",),
        "Whether the connection's writing half was shut down: then nothing "
        "is sent straight to the socket."),
    Private(
        "twisted.logger.FileLogObserver", "_outFile", "attribute", None,
        ("mailstack.logs: turn_writes",),
        "The log's file, replaced by a writer that writes a reactor turn's "
        "lines together (mailstack.turnlog); without it every line is one "
        "write, as before, and nothing else changes."),
    Private(
        "twisted.names.common.ResolverBase", "_lookup", "method",
        ("self", "name", "cls", "type", "timeout"),
        ("mailstack.testing: FakeResolver", "mailstack.mailauth.testing: ZoneResolver"),
        "The one method a ResolverBase subclass implements (Twisted's own "
        "resolvers do); the test resolvers answer there."),
    Private(
        "twisted.internet.inotify.INotify", "_fd", "attribute", None,
        ("mailstack.access.watch: _Notifier.connectionLost",),
        "The inotify descriptor, marked closed (-1) when Twisted closes it "
        "after a watched folder is deleted, so that the watches are made "
        "again on a new one instead of on a dead descriptor."),
    Private(
        "twisted.names.server.DNSServerFactory", "_responseFromMessage", "method",
        ("self", "message", "rCode", "answers", "authority", "additional"),
        ("mailstack.mailauth.testing: _ZoneServerFactory.gotResolverError",),
        "The test DNS server answers SERVFAIL where Twisted answers NXDOMAIN; "
        "a change breaks only the tests' DNS server."),
)


def buffered_input_size(protocol: Any) -> int:
    """
    How many bytes a line receiver has read but not yet handed over.

    @param protocol: a C{LineReceiver} or C{LineOnlyReceiver}.
    @return: the length of its C{_buffer}.
    """
    return len(protocol._buffer)


def discard_buffered_input(protocol: Any) -> None:
    """
    Drop what a line receiver has read but not yet handed over: after
    STARTTLS/STLS, or when a line was too long.  Called while a line is
    handled, a C{LineReceiver} hands over nothing more of that packet.

    @param protocol: a C{LineReceiver} or C{LineOnlyReceiver}.
    """
    protocol._buffer = b""


def buffer_empty(connection: Any) -> bool:
    """
    Whether a Twisted connection holds no unsent data and may still write.

    @param connection: a C{twisted.internet.abstract.FileDescriptor}.
    """
    return (not connection._tempDataLen and connection.offset == len(connection.dataBuffer)
            and not connection._writeDisconnected)


def pop3_pending_user(protocol: Any) -> bytes | None:
    """
    The name a POP3 session's USER gave, waiting for PASS.

    @param protocol: a C{twisted.mail.pop3.POP3}.
    @return: the name, or C{None}.
    """
    user: bytes | None = protocol._userIs
    return user


def forget_pop3_user(protocol: Any) -> None:
    """
    Forget a POP3 session's USER: PASS then needs a new one.

    @param protocol: a C{twisted.mail.pop3.POP3}.
    """
    protocol._userIs = None
