# -*- test-case-name: tests.test_stack -*-
"""
What both process modes share (L{mailstack.stack}): a listener that cannot
bind its port stops the server instead of leaving it running without it.
"""

import socket

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.stack import CannotListen, Listener, StackBase
from tests.processes import Twistd
from tests.support import short_tempdir


class _Reactor:
    """
    Records what L{StackBase.cannot_listen} asks of the reactor.
    """

    def __init__(self):
        self.when_running = []

    def callWhenRunning(self, f, *args):
        self.when_running.append(f)

    def stop(self):
        raise AssertionError("only through callWhenRunning")


class CannotListenTests(TestCase):
    def test_port_in_use(self):
        """
        A port already in use: the listener tells its owner once, never
        fires C{listening}, and Twisted's log line says why.
        """
        busy = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(busy.stopListening)
        endpoint = TCP4ServerEndpoint(reactor, busy.getHost().port, interface="127.0.0.1")
        listener = Listener("smtp", endpoint, Factory.forProtocol(Protocol))
        failed = []
        listener.on_failure = failed.append
        self.addCleanup(listener.stopService)
        self.assertRaises(CannotListen, listener.privilegedStartService)
        self.assertEqual(failed, [listener])
        self.assertIsNone(listener.port)
        self.assertFalse(listener.listening.called)
        self.assertEqual(len(self.flushLoggedErrors(CannotListenError)), 1)

    def test_stack_stops(self):
        """
        The stack logs one critical line naming the listener and its
        endpoint and stops the reactor once it runs (a privileged port is
        bound before twistd runs the reactor).
        """
        events = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        stack = StackBase.__new__(StackBase)
        stack.reactor = _Reactor()
        stack.cannot_listen("smtp", "tcp:25:interface=127.0.0.1")
        self.assertEqual(stack.reactor.when_running, [stack.reactor.stop])
        [critical] = [e for e in events if e.get("log_level") == LogLevel.critical]
        self.assertEqual((critical["label"], critical["description"]),
                         ("smtp", "tcp:25:interface=127.0.0.1"))


class ExitStatusTests(SynchronousTestCase):
    def test_busy_port_exits_non_zero(self):
        """
        A real C{twistd -n mailstack} whose SMTP port is taken ends by
        itself with a failure status (systemd then reports the failure and
        restarts it), after the critical line naming the listener; before,
        it stopped with status 0.
        """
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        server = Twistd(["--data-dir", short_tempdir(self),
                         "--smtp", f"tcp:{port}:interface=127.0.0.1",
                         "--submission", "none", "--submissions", "none",
                         "--imap", "none", "--imaps", "none", "--pop3", "none"])
        self.addCleanup(server.stop)
        server.wait_for(rf"critical\] smtp: cannot listen on tcp:{port}:")
        status = server.process.wait(60)
        self.assertEqual(status, 1, server.output())
        self.assertNotIn("smtp listening on", server.output())
