# -*- test-case-name: tests.test_twisted_privates -*-
"""
The private names of Twisted that mailstack relies on
(L{mailstack.twisted_privates}) still exist on the installed Twisted with
the shape expected, and the security-relevant ones still behave as relied
on.  A failure here after a Twisted upgrade names what changed; read the
entry's C{why} before adapting mailstack.
"""

from __future__ import annotations

import ast
import io
import inspect
import os
import re
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor, StringTransport
from twisted.logger import FileLogObserver, LogPublisher
from twisted.mail import imap4, pop3
from twisted.protocols import basic
from twisted.python.failure import Failure
from twisted.python.reflect import namedAny
from twisted.trial.unittest import SynchronousTestCase

import mailstack
from mailstack import twisted_privates
from mailstack.twisted_privates import (
    PRIVATES, buffer_empty, buffered_input_size, discard_buffered_input, forget_pop3_user,
    pop3_pending_user,
)


def source(cls: type) -> str:
    """
    The source of a class, or nothing when it has none to read.
    """
    try:
        return inspect.getsource(cls)
    except (OSError, TypeError):
        return ""


def entry(owner: str, name: str) -> twisted_privates.Private:
    found = [p for p in PRIVATES if p.owner == owner and p.name == name]
    assert len(found) == 1, (owner, name)
    return found[0]


class ShapeTests(SynchronousTestCase):
    """
    Each listed name exists where it is listed, as a method with the
    parameters expected or as an attribute.
    """

    def test_methods(self) -> None:
        for private in PRIVATES:
            if private.kind != "method":
                continue
            owner = namedAny(private.owner)
            method = vars(owner).get(private.name)
            self.assertTrue(callable(method), f"{private.owner}.{private.name} is gone")
            self.assertEqual(tuple(inspect.signature(method).parameters), private.parameters,
                             f"{private.owner}.{private.name} changed its parameters")

    def test_class_attributes(self) -> None:
        """
        The attributes Twisted gives a default on the class have it.
        """
        self.assertEqual(basic.LineReceiver._buffer, b"")
        self.assertEqual(basic.LineOnlyReceiver._buffer, b"")
        self.assertIsNone(pop3.POP3._userIs)
        self.assertIsNone(imap4.IMAP4Server._pendingLiteral)
        self.assertIsInstance(imap4.IMAP4Server._literalStringLimit, int)

    def test_waiting_for_port(self) -> None:
        """
        C{StreamServerEndpointService} keeps the listening port's Deferred in
        C{_waitingForPort} once it starts.
        """
        listening: Deferred[Any] = Deferred()

        class Endpoint:
            def listen(self, factory: Any) -> Deferred[Any]:
                return listening

        service = StreamServerEndpointService(Endpoint(), Factory())
        service.privilegedStartService()
        self.assertIs(service._waitingForPort, listening)

    def test_log_observers(self) -> None:
        """
        C{LogPublisher} keeps its observers in the list C{_observers}.
        """
        def observer(event: Any) -> None:
            pass

        publisher = LogPublisher(observer)
        self.assertIsInstance(publisher._observers, list)
        self.assertEqual(publisher._observers, [observer])

    def test_log_file(self) -> None:
        """
        C{FileLogObserver} writes to the file in C{_outFile}.
        """
        out = io.StringIO()
        observer = FileLogObserver(out, lambda event: "text\n")
        self.assertIs(observer._outFile, out)
        observer._outFile = replaced = io.StringIO()
        observer({})
        self.assertEqual((out.getvalue(), replaced.getvalue()), ("", "text\n"))

    def test_write_buffer(self) -> None:
        """
        A connection's C{write} keeps data in C{_tempDataLen} (with
        C{dataBuffer}) until it is sent, and C{_writeDisconnected} is false
        while the connection may write.
        """
        connection = FileDescriptor(reactor=MemoryReactor())
        connection.connected = True
        connection.startWriting = lambda: None  # type: ignore[method-assign]  # no real descriptor
        connection.writeSomeData = lambda data: len(data)  # type: ignore[method-assign]  # all sent
        self.assertTrue(buffer_empty(connection))
        connection.write(b"250 ok\r\n")
        self.assertEqual(connection._tempDataLen, 8)
        self.assertFalse(buffer_empty(connection))
        connection.stopWriting = lambda: None  # type: ignore[method-assign]
        connection.doWrite()
        self.assertTrue(buffer_empty(connection))
        self.assertFalse(connection._writeDisconnected)

    def test_every_use_is_listed(self) -> None:
        """
        Every private name of a Twisted base class (a class attribute or
        one its code sets on C{self}) that a mailstack class overrides or
        uses through C{self} is in L{PRIVATES}: a new use gets
        an entry (and a check) here.
        """
        listed = {(p.owner, p.name) for p in PRIVATES}
        root = os.path.dirname(os.path.abspath(mailstack.__file__))
        missing = []
        for directory, _, files in os.walk(root):
            for filename in files:
                if not filename.endswith(".py"):
                    continue
                path = os.path.join(directory, filename)
                dotted = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                if dotted.endswith("__main__") or dotted.endswith("__init__"):
                    continue
                module = __import__(dotted, fromlist=["_"])
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if not isinstance(node, ast.ClassDef):
                        continue
                    cls = getattr(module, node.name, None)
                    if not inspect.isclass(cls):
                        continue
                    bases = [c for c in cls.__mro__ if c.__module__.startswith("twisted.")]
                    names = {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute)}
                    names |= {n.name for n in ast.walk(node)
                              if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
                    for name in sorted(names):
                        if not name.startswith("_") or name.endswith("__"):
                            continue
                        for base in bases:
                            if name in vars(base) or re.search(
                                    rf"self\.{re.escape(name)}\b", source(base)):
                                owner = f"{base.__module__}.{base.__qualname__}"
                                if (owner, name) not in listed and not any(
                                        (f"{b.__module__}.{b.__qualname__}", name) in listed
                                        for b in bases):
                                    missing.append(f"{dotted}.{node.name}: {owner}.{name}")
                                break
        self.assertEqual(missing, [])


    def test_no_method_defined_twice(self) -> None:
        """
        No mailstack class defines a method twice: the second definition
        silently replaces the first (IMAPServer once had two
        C{_IMAP4Server__ebLogin}, and the one that won handed failures to
        Twisted's, which sends the exception's text).
        """
        root = os.path.dirname(os.path.abspath(mailstack.__file__))
        twice = []
        for directory, _, files in os.walk(root):
            for filename in sorted(files):
                if not filename.endswith(".py"):
                    continue
                path = os.path.join(directory, filename)
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if not isinstance(node, ast.ClassDef):
                        continue
                    seen: set[str] = set()
                    for item in node.body:
                        if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                            continue
                        decorators = [ast.unparse(d) for d in item.decorator_list]
                        if any(d.endswith((".setter", ".deleter")) or "overload" in d
                               for d in decorators):
                            continue
                        if item.name in seen:
                            twice.append(f"{path}:{item.lineno}: {node.name}.{item.name}")
                        seen.add(item.name)
        self.assertEqual(twice, [])


class LineBufferTests(SynchronousTestCase):
    """
    Emptying a line receiver's buffer drops the clear-text bytes that came
    with STARTTLS/STLS (CVE-2011-0411), as the IMAP and POP3 servers rely on.
    """

    def test_imap_starttls_discard(self) -> None:
        """
        C{LineReceiver} (under IMAP): emptying C{_buffer} while a line is
        handled drops the rest of the packet; later packets are read.
        """
        entry("twisted.protocols.basic.LineReceiver", "_buffer")
        lines = []

        class Server(basic.LineReceiver):
            def lineReceived(self, line: bytes) -> None:
                lines.append(line)
                if line == b"a STARTTLS":
                    discard_buffered_input(self)

        server = Server()
        server.makeConnection(StringTransport())
        server.dataReceived(b"a STARTTLS\r\nb LOGIN injected secret\r\nc NOO")
        self.assertEqual(lines, [b"a STARTTLS"])
        self.assertEqual(buffered_input_size(server), 0)
        server.dataReceived(b"d NOOP\r\n")
        self.assertEqual(lines, [b"a STARTTLS", b"d NOOP"])

    def test_pop3_stls_discard(self) -> None:
        """
        C{LineOnlyReceiver} (under POP3) splits the whole packet first: the
        complete lines after STLS are still handed over (which is why the
        POP3 server drops them itself), and emptying C{_buffer} drops the
        partial line, which would otherwise begin the next line.
        """
        entry("twisted.protocols.basic.LineOnlyReceiver", "_buffer")
        lines = []

        class Server(basic.LineOnlyReceiver):
            def lineReceived(self, line: bytes) -> None:
                lines.append(line)
                if line == b"STLS":
                    discard_buffered_input(self)

        server = Server()
        server.makeConnection(StringTransport())
        server.dataReceived(b"STLS\r\nUSER injected\r\nPASS inj")
        self.assertEqual(lines, [b"STLS", b"USER injected"])
        self.assertEqual(buffered_input_size(server), 0)
        server.dataReceived(b"NOOP\r\n")
        self.assertEqual(lines[-1], b"NOOP")

    def test_mailstack_pop3_after_stls(self) -> None:
        """
        And mailstack's POP3 server, on the installed Twisted: nothing that
        came in the STLS packet is answered, and the name a USER gave before
        STLS is forgotten.
        """
        from mailstack.access.pop3 import POP3Factory

        factory = POP3Factory(None, Clock(), None, None, tls=lambda: None)
        server = factory.buildProtocol(None)
        transport = StringTransport()
        started = []
        transport.startTLS = started.append  # type: ignore[attr-defined]
        server.makeConnection(transport)
        transport.clear()
        server._userIs = b"before-tls"
        server.dataReceived(b"STLS\r\nCAPA\r\nQUIT\r\nPA")
        self.assertEqual(len(started), 1)
        self.assertEqual(transport.value(), b"+OK Begin TLS negotiation\r\n")
        self.assertEqual(buffered_input_size(server), 0)
        self.assertIsNone(pop3_pending_user(server))


class POP3Tests(SynchronousTestCase):
    """
    The POP3 internals the server overrides or uses.
    """

    def make(self) -> tuple[pop3.POP3, StringTransport]:
        server = pop3.POP3()
        transport = StringTransport()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(transport)
        transport.clear()
        return server, transport

    def test_user_is(self) -> None:
        """
        USER stores the name in C{_userIs}, where mailstack reads and resets it.
        """
        server, _ = self.make()
        server.lineReceived(b"USER alice")
        self.assertEqual(pop3_pending_user(server), b"alice")
        forget_pop3_user(server)
        self.assertIsNone(server._userIs)

    def test_long_operation_and_unblock(self) -> None:
        """
        While C{_longOperation}'s Deferred runs, commands queue in
        C{blocked}; C{_unblock} runs them.
        """
        server, transport = self.make()
        d: Deferred[None] = Deferred()
        server._longOperation(d)
        server.lineReceived(b"CAPA")
        self.assertEqual(transport.value(), b"")
        self.assertEqual(len(server.blocked), 1)
        server._unblock(None)
        self.assertIsNone(server.blocked)
        self.assertTrue(transport.value().startswith(b"+OK"))

    def test_login_callbacks(self) -> None:
        """
        PASS reports through C{_cbMailbox}, C{_ebMailbox}, C{_ebUnexpected}.
        """
        calls = []

        class Server(pop3.POP3):
            def _cbMailbox(self, result: Any, user: bytes) -> None:
                calls.append(("cb", user))

            def _ebMailbox(self, failure: Failure) -> None:
                calls.append(("eb", failure.type))
                failure.raiseException()

            def _ebUnexpected(self, failure: Failure) -> None:
                calls.append(("unexpected", failure.type))

        server = Server()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(StringTransport())
        server.portal = Portal(object(), [InMemoryUsernamePasswordDatabaseDontUse()])
        server.authenticateUserPASS = lambda user, password: fail(  # type: ignore[method-assign]
            RuntimeError("boom"))
        server.lineReceived(b"USER alice")
        server.lineReceived(b"PASS secret")
        self.assertEqual(calls, [("eb", RuntimeError), ("unexpected", RuntimeError)])


class IMAPTests(SynchronousTestCase):
    """
    The IMAP internals the server overrides or calls.
    """

    def test_respond_sees_tagged_responses(self) -> None:
        seen = []

        class Server(imap4.IMAP4Server):
            def _respond(self, state: bytes, tag: Any, message: Any) -> None:
                seen.append((state, tag))
                super()._respond(state, tag, message)

        server = Server()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(StringTransport())
        server.lineReceived(b"a1 NOOP")
        self.assertIn((b"OK", b"a1"), seen)

    def test_eb_login_is_called(self) -> None:
        """
        A failed LOGIN reaches C{_IMAP4Server__ebLogin} of the subclass, as
        mailstack's override needs.
        """
        seen = []

        class Server(imap4.IMAP4Server):
            def _IMAP4Server__ebLogin(self, failure: Failure, tag: bytes) -> None:
                seen.append((failure.type, tag))

        server = Server()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(StringTransport())
        server.authenticateLogin = lambda user, password: fail(  # type: ignore[method-assign]
            UnauthorizedLogin())
        server.lineReceived(b"a1 LOGIN alice secret")
        self.assertEqual(seen, [(UnauthorizedLogin, b"a1")])

    def test_eb_dispatch_is_called(self) -> None:
        """
        A command that raises reaches C{_IMAP4Server__ebDispatch} of the
        subclass, through C{_IMAP4Server__doCommand}.
        """
        seen = []

        def bad_argument(self: Any, line: bytes) -> Any:
            raise RuntimeError("secret detail")

        class Server(imap4.IMAP4Server):
            def do_NOOP(self, tag: bytes, argument: Any) -> None:
                seen.append("ran")

            unauth_NOOP = (do_NOOP, bad_argument)

            def _IMAP4Server__ebDispatch(self, failure: Failure, tag: bytes) -> None:
                seen.append((failure.type, tag))

        server = Server()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(StringTransport())
        server.lineReceived(b"a1 NOOP x")
        self.assertEqual(seen, [(RuntimeError, b"a1")])

    def test_string_literal_limit(self) -> None:
        """
        C{_stringLiteral} refuses a literal over C{_literalStringLimit} and
        reads one within it through C{_pendingLiteral}.
        """
        server = imap4.IMAP4Server()
        server.callLater = Clock().callLater  # type: ignore[method-assign]
        server.makeConnection(StringTransport())
        server._literalStringLimit = 10
        self.assertRaises(imap4.IllegalClientResponse, server._stringLiteral, 11)
        d = server._stringLiteral(5)
        self.assertIsNotNone(server._pendingLiteral)
        got = []
        d.addCallback(got.append)
        server.dataReceived(b"hello rest\r\n")
        self.assertEqual(got, [(b"hello", b" rest")])
