# -*- test-case-name: tests.test_interfaces -*-
"""
The transport a connected mailstack protocol is given, as one type.

Twisted's C{Protocol} declares C{transport} as C{ITransport | None}: None
before C{makeConnection}, and only C{write}/C{loseConnection}/C{getPeer}
besides.  The servers and clients here run only once connected, on TCP or
UNIX stream transports, with or without TLS layered on (C{startTLS}, or
Twisted's TLS wrapper for implicit TLS), and use what those provide:
abortConnection, the push-producer half for flow control, startTLS,
the socket or TLS handle, and the C{disconnecting} flag.  Each protocol
class says so once, with a class-level annotation C{transport:
IConnection}, rather than every use checking for None.
"""

from twisted.internet.interfaces import (
    IConsumer, IPushProducer, ISystemHandle, ITLSTransport,
)
from zope.interface import Attribute


class IConnection(ITLSTransport, IPushProducer, IConsumer, ISystemHandle):
    """
    A connected stream transport (TCP or UNIX, TLS possible), as the
    reactor's connections and Twisted's TLS and wrapping protocols provide.
    """

    disconnecting = Attribute("True once the connection is being closed.")
