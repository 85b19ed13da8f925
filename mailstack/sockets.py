"""
Socket options for accepted connections.

Every reply of mailstack's servers is written as soon as it is complete,
and a reply is sometimes several writes (POP3 C{RETR}: the status line, the
message in chunks, the terminating dot line; IMAP literals).  With Nagle's
algorithm on, a small write that follows an unacknowledged one waits for
the peer's ACK, which a client delays by up to 40 ms when it has nothing
to send: POP3 C{TOP}/C{RETR} took 44 ms per message that way.  Postfix and
Dovecot turn Nagle off on their connections; so does mailstack.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.protocols.policies import ProtocolWrapper

from mailstack.twisted_privates import buffer_empty


def set_nodelay(transport: Any) -> bool:
    """
    Turn Nagle's algorithm off on C{transport}'s TCP connection (through a
    TLS wrapper, which passes the call on).  Returns whether it was set: a
    UNIX socket or a test transport has no such option, and that is fine.
    """
    setter = getattr(transport, "setTcpNoDelay", None)
    if setter is None:
        return False
    try:
        setter(True)
    except OSError:
        return False  # not a TCP socket (e.g. a UNIX socket), or already closed
    return True


def write_now(transport: Any, data: bytes) -> None:
    """
    Write C{data} to C{transport}, straight to its socket if nothing is
    waiting in Twisted's buffer for it (a plain TCP connection, through
    wrappers that only pass writes on).

    C{transport.write} keeps the data until the next poll says the socket
    is writable: for a one-line reply to a client that waits for it, that
    is two C{epoll_ctl} calls (write interest on and off) and one more
    reactor turn per reply.  Sent here, a reply that fits the socket's
    buffer (nearly all) goes at once; what does not fit goes to
    C{transport.write}, after it, so the order is kept.  Under TLS, or
    whenever Twisted holds unsent data, it is C{transport.write} as usual.
    """
    connection = transport
    while type(connection).write is ProtocolWrapper.write:
        connection = connection.transport
    if (not isinstance(connection, tcp.Connection) or connection.TLS
            or not connection.connected or connection.disconnecting
            or not buffer_empty(connection)):
        transport.write(data)
        return
    try:
        sent = connection.socket.send(data)
    except OSError:
        sent = 0  # would block, or an error Twisted reports at its next write
    if sent < len(data):
        transport.write(data[sent:])
