"""
--smtp-bind-address: outbound SMTP leaves from the configured source
address of the destination's family, as the remote MTA sees it.
"""

import socket

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import parse_address
from mailstack.config import ConfigError, build_config
from mailstack.smtp.client import Timeouts
from mailstack.smtp.server import ServerSettings, SMTPServerFactory
from mailstack.testing import FakeResolver, SinkPolicy
from tests.support import start_server


def ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


class BindAddressTests(TestCase):
    @inlineCallbacks
    def sink(self, interface):
        policy = SinkPolicy()
        peers = []
        original = policy.connect

        def connect(session):
            peers.append(session.peer_host)
            return original(session)

        policy.connect = connect
        policy.waiters = []
        deliver = policy.deliver

        def delivered(session, envelope, spool):
            result = deliver(session, envelope, spool)
            waiters, policy.waiters = policy.waiters, []
            for d in waiters:
                d.callback(None)
            return result

        policy.deliver = delivered
        factory = SMTPServerFactory(policy, ServerSettings("sink.test", 10**7), reactor)
        kind = "tcp6" if ":" in interface else "tcp"
        escaped = interface.replace(":", "\\:")
        port = yield serverFromString(reactor, f"{kind}:0:interface={escaped}").listen(factory)
        self.addCleanup(port.stopListening)
        return port.getHost().port, policy, peers

    @inlineCallbacks
    def deliver(self, server, policy, rcpt):
        arrived = Deferred()
        policy.waiters.append(arrived)
        arrived.addTimeout(30, reactor)
        yield server.dispatcher.inject(parse_address("a@localhost"), [parse_address(rcpt)],
                                       b"Subject: x\n\nhi\n")
        yield arrived

    @inlineCallbacks
    def test_ipv4_source(self):
        """
        With --smtp-bind-address 127.0.0.2 (and an IPv6 one beside it), the
        sink on 127.0.0.1 sees the connection come from 127.0.0.2; without
        the option, from 127.0.0.1.
        """
        port, policy, peers = yield self.sink("127.0.0.1")
        resolver = FakeResolver(mx={"remote.test": [(10, "mx.remote.test")]},
                                a={"mx.remote.test": ["127.0.0.1"]})
        server = yield start_server(self, resolver=resolver, relay_port=port,
                                    relay_timeouts=Timeouts(5, 5, 5, 5, 5),
                                    smtp_bind_address=["::1", "127.0.0.2"])
        yield server.queue.loaded
        yield self.deliver(server, policy, "bob@remote.test")
        self.assertEqual(len(policy.received), 1)
        self.assertEqual(peers, ["127.0.0.2"])

        plain = yield start_server(self, resolver=resolver, relay_port=port,
                                   relay_timeouts=Timeouts(5, 5, 5, 5, 5))
        yield plain.queue.loaded
        yield self.deliver(plain, policy, "carol@remote.test")
        self.assertEqual(peers, ["127.0.0.2", "127.0.0.1"])

    @inlineCallbacks
    def test_ipv6_source(self):
        """
        An IPv6 destination gets the IPv6 source address.
        """
        if not ipv6_loopback():
            raise self.skipTest("no IPv6 loopback")
        port, policy, peers = yield self.sink("::1")
        resolver = FakeResolver(mx={"remote.test": [(10, "mx.remote.test")]},
                                a={"mx.remote.test": ["::1"]})
        server = yield start_server(self, resolver=resolver, relay_port=port,
                                    relay_timeouts=Timeouts(5, 5, 5, 5, 5),
                                    smtp_bind_address=["127.0.0.2", "::1"])
        yield server.queue.loaded
        yield self.deliver(server, policy, "bob@remote.test")
        self.assertEqual(peers, ["::1"])
        self.assertEqual(len(policy.received), 1)


class OptionTests(SynchronousTestCase):
    def test_one_per_family(self):
        config = build_config({"smtp-bind-address": ["192.0.2.1", "[2001:db8::1]"]})
        self.assertEqual(config.smtp_bind_address, ("192.0.2.1", "2001:db8::1"))
        with self.assertRaises(ConfigError):
            build_config({"smtp-bind-address": ["192.0.2.1", "192.0.2.2"]})
        with self.assertRaises(ConfigError):
            build_config({"smtp-bind-address": ["mx.example.org"]})
