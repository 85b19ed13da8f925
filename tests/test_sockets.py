"""
Nagle's algorithm is off on every accepted SMTP, POP3 and IMAP connection
(a reply of several writes must not wait for the client's delayed ACK).
"""

import socket

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.trial.unittest import TestCase

from mailstack.sockets import set_nodelay, write_now
from mailstack.twisted_privates import buffer_empty
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


class Recorder(Protocol):
    """
    Writes what the test says on connection, and records whether the
    transport had to ask the reactor for write readiness.
    """

    def __init__(self, writes):
        self.writes = writes
        self.made = Deferred()

    def connectionMade(self):
        tcp_transport = self.transport
        while isinstance(tcp_transport, ProtocolWrapper):
            tcp_transport = tcp_transport.transport
        self.tcp = tcp_transport
        self.polled = 0
        original = tcp_transport.startWriting

        def startWriting():
            self.polled += 1
            original()

        tcp_transport.startWriting = startWriting
        for how, data in self.writes:
            if how == "now":
                write_now(self.transport, data)
            else:
                self.transport.write(data)
        self.made.callback(self)


class WriteNowTests(TestCase):
    @inlineCallbacks
    def connect(self, writes, wrapped=False):
        protocol = Recorder(writes)
        factory = Factory.forProtocol(lambda: protocol)
        if wrapped:
            factory = WrappingFactory(factory)
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.settimeout(10)
        yield protocol.made
        self.addCleanup(protocol.transport.loseConnection)
        return protocol, client

    def receive(self, client, n):
        data = b""
        while len(data) < n:
            chunk = client.recv(n - len(data))
            if not chunk:
                break
            data += chunk
        return data

    @inlineCallbacks
    def test_straight_to_the_socket(self):
        """
        With nothing buffered, a write goes to the socket at once: no write
        interest asked of the reactor, nothing left in Twisted's buffer,
        also through a wrapper that passes writes on.
        """
        for wrapped in (False, True):
            protocol, client = yield self.connect([("now", b"220 hi\r\n")], wrapped)
            self.assertEqual(protocol.polled, 0)
            self.assertTrue(buffer_empty(protocol.tcp))
            received = yield threads.deferToThread(self.receive, client, 8)
            self.assertEqual(received, b"220 hi\r\n")

    @inlineCallbacks
    def test_order_kept_behind_buffered_data(self):
        """
        When Twisted holds data for the connection, the write joins it after
        that data instead of overtaking it.
        """
        protocol, client = yield self.connect([("buffered", b"one\r\n"), ("now", b"two\r\n")])
        self.assertEqual(protocol.polled, 2)
        received = yield threads.deferToThread(self.receive, client, 10)
        self.assertEqual(received, b"one\r\ntwo\r\n")

    @inlineCallbacks
    def test_more_than_the_socket_takes(self):
        """
        What the socket does not take at once follows through the
        transport, in order.
        """
        big = bytes(range(256)) * 40000  # 10 MiB: more than any socket buffer
        protocol, client = yield self.connect([("now", big), ("now", b"end")])
        self.assertGreaterEqual(protocol.polled, 1)
        received = yield threads.deferToThread(self.receive, client, len(big) + 3)
        self.assertEqual(received, big + b"end")

    def test_not_a_connection(self):
        """
        Anything but a plain TCP connection (a test transport) gets an
        ordinary write.
        """
        transport = StringTransport()
        write_now(transport, b"250 ok\r\n")
        self.assertEqual(transport.value(), b"250 ok\r\n")
