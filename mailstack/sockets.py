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
