"""
Tests for L{mailstack.limits}: connection limits on every listener (unit
tests over fake transports, then real clients against a real server), and
the per-command deadline with a fake clock.
"""

import poplib
import smtplib
import socket
import ssl

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.config import parse_networks
from mailstack.limits import (
    REFUSAL_LINGER,
    CommandDeadline,
    ConnectionLimits,
    LimitedFactory,
    client_key,
    default_total,
    raise_nofile_limit,
)
from tests.support import client_context, in_thread, start_server

LISTEN = "tcp:0:interface=127.0.0.1"


class Recorder(Protocol):
    made = lost = 0

    def connectionMade(self):
        self.factory.made += 1

    def dataReceived(self, data):
        self.factory.data.append(data)

    def connectionLost(self, reason=None):
        self.factory.lost += 1


class RecorderFactory(Factory):
    protocol = Recorder

    def __init__(self):
        self.made = self.lost = 0
        self.data = []


def connect(factory, host, port=1234, v6=False):
    """
    A connection from C{host} through C{factory}; return (protocol, transport).
    """
    address = (IPv6Address if v6 else IPv4Address)("TCP", host, port)
    protocol = factory.buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


class ClientKeyTests(SynchronousTestCase):
    def test_keys(self):
        """
        IPv4 counts by address, IPv6 by /64, a mapped IPv4 as IPv4, and a
        UNIX socket peer not at all.
        """
        self.assertEqual(client_key(IPv4Address("TCP", "192.0.2.7", 1)), "192.0.2.7")
        self.assertEqual(client_key(IPv6Address("TCP", "2001:db8:1:2:aaaa::1", 1)),
                         "2001:db8:1:2::/64")
        self.assertEqual(client_key(IPv6Address("TCP", "2001:db8:1:2:ffff::9", 1)),
                         "2001:db8:1:2::/64")
        self.assertEqual(client_key(IPv6Address("TCP", "::ffff:192.0.2.7", 1)), "192.0.2.7")
        self.assertIsNone(client_key(UNIXAddress("/tmp/x.sock")))
        self.assertIsNone(client_key(None))

    def test_default_total(self):
        """
        The global cap leaves descriptors for files: half of what is left
        after the reserve, never less than 16.
        """
        self.assertEqual(default_total(1024), 384)
        self.assertEqual(default_total(100), 16)
        self.assertEqual(default_total(65536), 32640)

    def test_raise_nofile_limit(self):
        """
        The soft limit is raised to the hard one.
        """
        import resource
        before = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.addCleanup(resource.setrlimit, resource.RLIMIT_NOFILE, before)
        if before[1] != resource.RLIM_INFINITY and before[1] > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, before[1]))
        soft = raise_nofile_limit()
        self.assertEqual(resource.getrlimit(resource.RLIMIT_NOFILE)[0], before[1])
        self.assertEqual(soft, before[1])


class LimitedFactoryTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.limits = ConnectionLimits(per_client=2, total=5,
                                       exempt=parse_networks("198.51.100.0/24"))
        self.inner = RecorderFactory()
        self.factory = LimitedFactory(self.inner, self.limits, "smtp", "smtp", self.clock,
                                      "mx.test")

    def test_per_client(self):
        """
        The third connection from one address is refused in SMTP's words and
        closed, without reaching the protocol; another address is served;
        when one of the first ends, the address may connect again.
        """
        first, _ = connect(self.factory, "192.0.2.1")
        connect(self.factory, "192.0.2.1")
        _, transport = connect(self.factory, "192.0.2.1")
        self.assertEqual(transport.value(),
                         b"421 4.7.0 mx.test Error: too many connections from 192.0.2.1; "
                         b"try again later\r\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.inner.made, 2)
        connect(self.factory, "192.0.2.2")
        self.assertEqual(self.inner.made, 3)
        first.connectionLost(None)
        self.assertEqual(self.inner.lost, 1)
        _, transport = connect(self.factory, "192.0.2.1")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.inner.made, 4)

    def test_ipv6_by_64(self):
        """
        Two addresses of one /64 share a count; another /64 does not.
        """
        connect(self.factory, "2001:db8::1", v6=True)
        connect(self.factory, "2001:db8::ffff:2", v6=True)
        _, transport = connect(self.factory, "2001:db8::3", v6=True)
        self.assertIn(b"421 4.7.0", transport.value())
        _, transport = connect(self.factory, "2001:db8:0:1::3", v6=True)
        self.assertEqual(transport.value(), b"")

    def test_exempt(self):
        for _ in range(4):
            _, transport = connect(self.factory, "198.51.100.9")
            self.assertEqual(transport.value(), b"")

    def test_total_across_listeners(self):
        """
        The global cap counts every listener sharing the limits; the refusal
        is in each protocol's words.
        """
        imap = LimitedFactory(RecorderFactory(), self.limits, "imap", "imap", self.clock)
        pop3 = LimitedFactory(RecorderFactory(), self.limits, "pop3", "pop3", self.clock)
        for i in range(3):
            connect(self.factory, f"192.0.2.{i}")
        connect(imap, "192.0.2.10")
        connect(pop3, "192.0.2.11")
        _, transport = connect(imap, "192.0.2.12")
        self.assertEqual(transport.value(),
                         b"* BYE [UNAVAILABLE] Too many connections; try again later\r\n")
        _, transport = connect(pop3, "192.0.2.13")
        self.assertEqual(transport.value(),
                         b"-ERR [SYS/TEMP] Too many connections; try again later\r\n")
        self.assertEqual(self.limits.active, 5)

    def test_per_listener(self):
        """
        The per-client count is per listener: a client at its limit on one
        may still use another.
        """
        imap = LimitedFactory(RecorderFactory(), self.limits, "imap", "imap", self.clock)
        connect(self.factory, "192.0.2.1")
        connect(self.factory, "192.0.2.1")
        _, transport = connect(imap, "192.0.2.1")
        self.assertEqual(transport.value(), b"")

    def test_refused_client_aborted(self):
        """
        A refused client that does not go away is cut off.
        """
        connect(self.factory, "192.0.2.1")
        connect(self.factory, "192.0.2.1")
        _, transport = connect(self.factory, "192.0.2.1")
        aborted = []
        transport.abortConnection = lambda: aborted.append(True)
        self.clock.advance(REFUSAL_LINGER)
        self.assertEqual(aborted, [True])
        self.assertEqual(self.limits.active, 2)


class CommandDeadlineTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.fired = []
        self.deadline = CommandDeadline(self.clock, 300, lambda: self.fired.append(
            self.clock.seconds()), min_rate=500)

    def test_command(self):
        """
        A command must be whole within the time from when it is awaited;
        nothing but L{start} moves that.
        """
        self.deadline.start()
        self.deadline.credit(10)  # bytes of a command line do not count
        self.clock.advance(299)
        self.assertEqual(self.fired, [])
        self.clock.advance(1)
        self.assertEqual(self.fired, [300])

    def test_stopped_while_busy(self):
        self.deadline.start()
        self.deadline.stop()
        self.clock.advance(1000)
        self.assertEqual(self.fired, [])
        self.assertFalse(self.deadline.running)

    def test_data_rate(self):
        """
        In DATA every 500 bytes buy one more second, up to the full time
        from now; a client that trickles falls behind and is cut off.
        """
        self.deadline.start_data()
        for _ in range(100):
            self.clock.advance(10)
            self.deadline.credit(5000)  # 500 B/s: keeps up
        self.assertEqual(self.fired, [])
        self.deadline.credit(10**9)  # never more than 300 s ahead
        self.clock.advance(300)
        self.assertEqual(self.fired, [1300])
        self.fired.clear()
        self.deadline.start_data()
        for _ in range(1000):
            self.clock.advance(10)
            self.deadline.credit(1000)  # 100 B/s: 8 s lost every round
            if self.fired:
                break
        self.assertEqual(len(self.fired), 1)
        self.assertLess(self.fired[0] - 1300, 400)


def read_line(sock):
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1024)
        if not chunk:
            break
        data += chunk
    return data


def raw(port, source="127.0.0.1", context=None):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                    source_address=(source, 0))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="localhost")
    return sock


def closed_by_server(sock):
    try:
        return sock.recv(1024) == b""
    except (ConnectionResetError, ssl.SSLError):
        return True


class ListenerLimitTests(TestCase):
    """
    Real clients against a real server with a per-client limit of 2.
    """

    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(
            self, smtp=LISTEN, submissions=LISTEN, imap=LISTEN, pop3=LISTEN,
            max_client_connections="2", connection_limit_exempt="")

    def test_every_listener(self):
        """
        On each listener two connections from 127.0.0.1 are served, the
        third gets the protocol's refusal and is closed; a client from
        another address (127.0.0.2) is still served normally meanwhile.
        """
        ports = self.server.ports
        context = client_context(self.server)

        def attack():
            held = []
            try:
                return attack_holding(held)
            finally:
                for sock in held:
                    sock.close()

        def attack_holding(held):
            seen = {}
            for name, greeting in (("smtp", b"220 "), ("imap", b"* OK"), ("pop3", b"+OK"),
                                   ("submissions", b"220 ")):
                ctx = context if name == "submissions" else None
                for _ in range(2):
                    sock = raw(ports[name], context=ctx)
                    held.append(sock)
                    self.assertTrue(read_line(sock).startswith(greeting), name)
                sock = raw(ports[name], context=ctx)
                seen[name] = read_line(sock)
                self.assertTrue(closed_by_server(sock), name)
                sock.close()
            # The well-behaved client, while all those are held.
            with smtplib.SMTP(timeout=10, source_address=("127.0.0.2", 0)) as client:
                client.connect("127.0.0.1", ports["smtp"])
                self.assertEqual(client.noop()[0], 250)
            sock = raw(ports["imap"], source="127.0.0.2")
            held.append(sock)
            self.assertTrue(read_line(sock).startswith(b"* OK"))
            return seen

        def check(seen):
            self.assertTrue(seen["smtp"].startswith(b"421 4.7.0 "), seen)
            self.assertTrue(seen["submissions"].startswith(b"421 4.7.0 "), seen)
            self.assertTrue(seen["imap"].startswith(b"* BYE "), seen)
            self.assertTrue(seen["pop3"].startswith(b"-ERR [SYS/TEMP] "), seen)

        return in_thread(attack).addCallback(check)

    @inlineCallbacks
    def test_slot_freed(self):
        """
        When a client closes a connection, its slot is free again.
        """
        port = self.server.ports["pop3"]

        def fill():
            socks = [raw(port) for _ in range(2)]
            for sock in socks:
                read_line(sock)
            return socks

        socks = yield in_thread(fill)
        for sock in socks:
            sock.close()
        for _ in range(100):
            if self.server.limits.active == 0:
                break
            yield deferLater(reactor, 0.01, lambda: None)
        self.assertEqual(self.server.limits.active, 0)

        def again():
            client = poplib.POP3("127.0.0.1", port, timeout=10)
            client.quit()
            return True

        self.assertTrue((yield in_thread(again)))


class GlobalLimitTests(TestCase):
    @inlineCallbacks
    def test_total(self):
        """
        With --max-connections 2, a third connection to any listener is
        refused, even from an exempt address.
        """
        server = yield start_server(self, smtp=LISTEN, imap=LISTEN, max_connections="2")
        ports = server.ports

        def attack():
            held = [raw(ports["smtp"]), raw(ports["imap"])]
            for sock in held:
                read_line(sock)
            sock = raw(ports["imap"])
            refusal = read_line(sock)
            sock.close()
            for sock in held:
                sock.close()
            return refusal

        refusal = yield in_thread(attack)
        self.assertTrue(refusal.startswith(b"* BYE [UNAVAILABLE] Too many connections"))


class FakeQueue:
    def __init__(self):
        self.pending = []

    def flush(self):
        return 0

    def delete(self, queue_id):
        d = Deferred()
        self.pending.append(d)
        return d


class ControlInputTests(SynchronousTestCase):
    """
    The control socket runs one command at a time and holds a bounded
    amount of input behind it.
    """

    def setUp(self):
        from mailstack.queue.control import ControlFactory
        self.queue = FakeQueue()
        self.proto = ControlFactory(self.queue).buildProtocol(None)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)

    def test_one_at_a_time(self):
        """
        Commands behind a pending delete wait for it; answers come in order.
        """
        self.proto.dataReceived(b"delete 0123456789AB\nflush\ndelete 0123456789AC\n")
        self.assertEqual(len(self.queue.pending), 1)
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.transport.producerState, "paused")
        self.queue.pending[0].callback(True)
        self.assertEqual(self.transport.value(), b"ok\nok 0\n")
        self.assertEqual(len(self.queue.pending), 2)
        self.queue.pending[1].callback(False)
        self.assertEqual(self.transport.value(), b"ok\nok 0\nerror no such message\n")
        self.assertEqual(self.transport.producerState, "producing")

    def test_flood_behind_pending(self):
        """
        Megabytes of commands behind a pending one: at most MAX_PENDING
        octets are held, then an error and the connection closed; none of
        them runs (before, each started its own delete at once).
        """
        self.proto.dataReceived(b"delete 0123456789AB\n")
        for _ in range(100):
            self.proto.dataReceived(b"delete 0123456789AB\n" * 1000)
            self.assertLessEqual(len(self.proto._buffer), self.proto.MAX_PENDING)
            if self.transport.disconnecting:
                break
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.transport.value(), b"error too much input\n")
        self.assertEqual(len(self.queue.pending), 1)


class OptionTests(SynchronousTestCase):
    def test_options(self):
        """
        The limit options parse, with their defaults, "auto" and "none".
        """
        from mailstack.config import ConfigError, build_config
        config = build_config({})
        self.assertEqual((config.max_connections, config.max_client_connections,
                          [str(n) for n in config.connection_limit_exempt],
                          config.smtp_min_data_rate),
                         (None, 50, ["127.0.0.0/8", "::1/128"], 500.0))
        config = build_config({"max-connections": "100", "max-client-connections": "0",
                               "connection-limit-exempt": "none"})
        self.assertEqual((config.max_connections, config.max_client_connections,
                          config.connection_limit_exempt), (100, 0, ()))
        self.assertRaises(ConfigError, build_config, {"max-connections": "-1"})
        self.assertRaises(ConfigError, build_config, {"max-client-connections": "x"})
