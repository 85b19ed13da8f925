"""
Nagle's algorithm is off on every accepted SMTP, POP3 and IMAP connection
(a reply of several writes must not wait for the client's delayed ACK).
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from mailstack.sockets import set_nodelay
from tests.support import start_server

LISTEN = "tcp:0:interface=127.0.0.1"


def server_socket_for(client: socket.socket):
    """
    The server side of C{client}'s connection, among the reactor's readers.
    """
    local = client.getsockname()
    for reader in reactor.getReaders():
        try:
            peer = reader.getPeer()
        except (AttributeError, NotImplementedError):
            continue  # a listening port, a waker
        if (getattr(peer, "host", None), getattr(peer, "port", None)) == local:
            return reader.getHandle()
    return None


class NoDelayTests(TestCase):
    @inlineCallbacks
    def test_accepted_connections(self):
        """
        An accepted connection on each listener (SMTP, POP3, IMAP and IMAPS,
        the last one behind the TLS wrapper) has TCP_NODELAY set.
        """
        server = yield start_server(self, smtp=LISTEN, pop3=LISTEN, imap=LISTEN, imaps=LISTEN)
        for label in ("smtp", "pop3", "imap", "imaps"):
            client = socket.create_connection(("127.0.0.1", server.ports[label]))
            self.addCleanup(client.close)
            handle = None
            for _ in range(200):
                handle = server_socket_for(client)
                if handle is not None:
                    break
                yield deferLater(reactor, 0.01)
            self.assertIsNotNone(handle, label)
            self.assertTrue(handle.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), label)

    def test_not_tcp(self):
        """
        A transport without the option (a UNIX socket's, a test double) is
        left alone.
        """
        class Refuses:
            def setTcpNoDelay(self, enabled):
                raise OSError(95, "Operation not supported")

        self.assertFalse(set_nodelay(object()))
        self.assertFalse(set_nodelay(Refuses()))
