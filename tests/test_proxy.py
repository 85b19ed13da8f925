"""
Tests for L{mailstack.proxy}: the PROXY header parser, and a real server
behind C{haproxy:} endpoints taking the client's address from the header
before anything else (logs, Received, relay networks, connection limits).
"""

import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.proxy import (
    V2_SIGNATURE,
    ProxyHeaderError,
    ProxyHeaderFactory,
    parse_header,
)
from tests.support import add_user, in_thread, read_messages, start_server
from tests.test_limits import RecorderFactory, read_line


def v2(src, dst, sport, dport, command=1, family=0x11, tlvs=b""):
    body = socket.inet_pton(socket.AF_INET if family == 0x11 else socket.AF_INET6, src) + \
        socket.inet_pton(socket.AF_INET if family == 0x11 else socket.AF_INET6, dst) + \
        struct.pack("!HH", sport, dport) + tlvs
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


class ParseTests(SynchronousTestCase):
    def test_v1(self):
        source, dest, used = parse_header(b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 25\r\nEHLO")
        self.assertEqual((source.host, source.port, dest.host, dest.port, used),
                         ("192.0.2.1", 5555, "198.51.100.2", 25, 43))
        source, _, _ = parse_header(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 25\r\n")
        self.assertEqual((source.type, source.host), ("TCP", "2001:db8::1"))
        self.assertEqual(parse_header(b"PROXY UNKNOWN\r\n"), (None, None, 15))

    def test_v2(self):
        source, dest, used = parse_header(v2("192.0.2.1", "198.51.100.2", 5555, 465,
                                             tlvs=b"\x01\x00\x02h2") + b"rest")
        self.assertEqual((source.host, source.port, dest.port, used),
                         ("192.0.2.1", 5555, 465, 16 + 12 + 5))
        source, _, _ = parse_header(v2("2001:db8::7", "2001:db8::2", 1, 25, family=0x21))
        self.assertEqual(source.host, "2001:db8::7")
        local = v2("192.0.2.1", "198.51.100.2", 1, 2, command=0)
        self.assertEqual(parse_header(local), (None, None, len(local)))

    def test_incomplete(self):
        """
        Every proper prefix of a header asks for more.
        """
        for header in (b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 25\r\n",
                       v2("192.0.2.1", "198.51.100.2", 5555, 465)):
            for i in range(len(header)):
                self.assertIsNone(parse_header(header[:i]), (header, i))

    def test_invalid(self):
        for bad in (b"EHLO x\r\n", b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 25\r\n",
                    b"PROXY TCP4 2001:db8::1 5.6.7.8 1 25\r\n", b"PROXY TCP4 x y 1 2\r\n",
                    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 25\r\n", b"PROXY " + b"9" * 200,
                    b"PROXY TCP4 1.2.3.4\r\n", V2_SIGNATURE + b"\x31\x11\x00\x00",
                    V2_SIGNATURE + b"\x21\x11\xff\xff"):
            self.assertRaises(ProxyHeaderError, parse_header, bad)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200) | st.builds(
        lambda head, tail: head + tail,
        st.sampled_from([b"PROXY ", b"PROXY TCP4 ", V2_SIGNATURE, V2_SIGNATURE + b"\x21\x11"]),
        st.binary(max_size=120)))
    def test_fuzz(self, data):
        """
        Any input is a header, a request for more, or ProxyHeaderError;
        what is used never exceeds what was given.
        """
        try:
            result = parse_header(data)
        except ProxyHeaderError:
            return
        if result is not None:
            self.assertLessEqual(result[2], len(data))


class WrapperTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.inner = RecorderFactory()
        self.factory = ProxyHeaderFactory(self.inner, self.clock)
        self.protocol = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 1))
        self.protocol.makeConnection(self.transport)

    def test_protocol_starts_after_header(self):
        """
        The protocol is not even built before the header is whole; then it
        sees the client's address, and the bytes after the header.
        """
        self.protocol.dataReceived(b"PROXY TCP4 192.0.2.1 198.51.100.2 5555 25")
        self.assertEqual(self.inner.made, 0)
        self.protocol.dataReceived(b"\r\nEHLO x\r\n")
        self.assertEqual(self.inner.made, 1)
        self.assertEqual(self.inner.data, [b"EHLO x\r\n"])
        self.assertEqual(self.protocol.wrappedProtocol.transport.getPeer().host, "192.0.2.1")

    def test_no_header(self):
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)
        self.protocol.dataReceived(b"EHLO x\r\n")
        self.assertEqual((aborted, self.inner.made), ([True], 0))

    def test_header_timeout(self):
        aborted = []
        self.transport.abortConnection = lambda: aborted.append(True)
        self.protocol.dataReceived(b"PROXY TCP4 ")
        self.clock.advance(5)
        self.assertEqual((aborted, self.inner.made), ([True], 0))


class ProxiedServerTests(TestCase):
    """
    A real server with C{haproxy:} listeners, and clients that send a PROXY
    header over real sockets.
    """

    def send(self, port, payload):
        def run():
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            try:
                sock.sendall(payload)
                try:
                    sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass  # the server refused and closed first: read its answer
                data = b""
                while True:
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if not chunk:
                        return data
                    data += chunk
            finally:
                sock.close()
        return in_thread(run)

    @inlineCallbacks
    def test_relay_decided_on_client_address(self):
        """
        The proxy (127.0.0.1) is in --relay-networks, the client (from the
        v1 header) is not: relaying is refused, as it would be without the
        proxy.  Then a client inside the relay networks, through the same
        proxy, may relay; a local delivery's Received names the client.
        """
        server = yield start_server(self, smtp="haproxy:tcp:0:interface=127.0.0.1",
                                    relay_networks="127.0.0.0/8,10.9.0.0/16")
        add_user(server, "alice@localhost")
        port = server.ports["smtp"]
        dialog = (b"EHLO client.test\r\nMAIL FROM:<x@remote.test>\r\n"
                  b"RCPT TO:<victim@elsewhere.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
                  b"Subject: hi\r\n\r\nhello\r\n.\r\nQUIT\r\n")
        answer = yield self.send(port, b"PROXY TCP4 192.0.2.77 127.0.0.1 40000 25\r\n" + dialog)
        lines = answer.split(b"\r\n")
        self.assertTrue(lines[0].startswith(b"220 "), answer)
        self.assertTrue(any(line.startswith(b"554 5.7.1") for line in lines), answer)
        [message] = read_messages(server, "alice@localhost")
        self.assertIn(b"([192.0.2.77])", message)
        self.assertNotIn(b"127.0.0.1", message.split(b"\n\n")[0])
        answer = yield self.send(port, b"PROXY TCP4 10.9.1.1 127.0.0.1 40000 25\r\n" + dialog)
        self.assertNotIn(b"554 5.7.1", answer)
        self.assertEqual(answer.count(b"\r\n250 2.1.5"), 2, answer)

    @inlineCallbacks
    def test_v2_and_limits_by_client(self):
        """
        With a v2 header, the per-client connection limit counts the
        client, not the proxy: two clients behind the one proxy, each at
        its own limit.
        """
        server = yield start_server(self, pop3="haproxy:tcp:0:interface=127.0.0.1",
                                    max_client_connections="1", connection_limit_exempt="")
        port = server.ports["pop3"]

        def run():
            socks = []
            try:
                answers = []
                for client in ("192.0.2.1", "192.0.2.2", "192.0.2.1"):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    socks.append(sock)
                    sock.sendall(v2(client, "127.0.0.1", 4000, 110))
                    answers.append(read_line(sock))
                return answers
            finally:
                for sock in socks:
                    sock.close()

        answers = yield in_thread(run)
        self.assertTrue(answers[0].startswith(b"+OK"), answers)
        self.assertTrue(answers[1].startswith(b"+OK"), answers)
        self.assertTrue(answers[2].startswith(b"-ERR [SYS/TEMP]"), answers)

    @inlineCallbacks
    def test_no_header_refused(self):
        """
        A client that connects directly, without a header, gets nothing and
        is closed: it cannot pretend to be anyone.
        """
        server = yield start_server(self, smtp="haproxy:tcp:0:interface=127.0.0.1")
        answer = yield self.send(server.ports["smtp"], b"EHLO direct.test\r\n")
        self.assertEqual(answer, b"")

    @inlineCallbacks
    def test_implicit_tls_behind_proxy(self):
        """
        On an implicit-TLS listener the header comes before the TLS
        handshake; the session inside TLS sees the client's address (here:
        the per-client limit counts the two clients apart, and refuses the
        second connection of one of them inside TLS).
        """
        from tests.support import client_context

        server = yield start_server(self, submissions="haproxy:tcp:0:interface=127.0.0.1",
                                    max_client_connections="1", connection_limit_exempt="none")
        port = server.ports["submissions"]
        context = client_context(server)

        def run():
            socks = []
            try:
                answers = []
                for client in ("192.0.2.1", "192.0.2.2", "192.0.2.1"):
                    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                    socks.append(sock)
                    sock.sendall(f"PROXY TCP4 {client} 127.0.0.1 4000 465\r\n".encode())
                    sock = context.wrap_socket(sock, server_hostname="localhost")
                    socks.append(sock)
                    answers.append(read_line(sock))
                return answers
            finally:
                for sock in socks:
                    sock.close()

        answers = yield in_thread(run)
        self.assertEqual([a[:4] for a in answers], [b"220 ", b"220 ", b"421 "], answers)
        self.assertIn(b"too many connections from 192.0.2.1", answers[2])
