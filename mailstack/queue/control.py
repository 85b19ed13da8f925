# -*- test-case-name: tests.test_queue -*-
"""
The control socket, C{DATA/control.sock}: how C{mailstack queue flush} and
C{mailstack queue delete} reach a running server.

A UNIX socket in the data directory (mode 0700), so only the owner of the
data can use it.  One command a line, one answer a line::

    flush            ->  ok 12
    delete 4F2A9C... ->  ok  |  error no such message
    pickup           ->  ok   (mail was left in DATA/maildrop by sendmail)
"""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet.defer import maybeDeferred
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineReceiver

from mailstack.queue.store import valid_id
from mailstack.transport import IConnection
from mailstack.twisted_privates import buffered_input_size, discard_buffered_input


class ControlProtocol(LineReceiver):
    """
    One command at a time: while one is pending, reading stops and later
    lines wait, at most L{MAX_PENDING} octets of them (then: an error and
    the connection closed).
    """

    transport: IConnection  # once connected: see mailstack.transport

    delimiter = b"\n"
    MAX_LENGTH = 1024
    MAX_PENDING = 64 * 1024

    def dataReceived(self, data: bytes) -> None:
        if buffered_input_size(self) + len(data) > self.MAX_PENDING:
            discard_buffered_input(self)
            self.paused = True
            self.answer("error too much input")
            self.transport.loseConnection()
            return
        super().dataReceived(data)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.answer("error line too long")
        self.transport.loseConnection()

    def _wait(self, d: Any) -> None:
        """
        Stop reading until C{d} has answered.
        """
        self.pauseProducing()

        def resume(result: Any) -> None:
            if self.transport is not None and not self.transport.disconnecting:
                self.resumeProducing()

        d.addBoth(resume)

    def lineReceived(self, line: bytes) -> None:
        command, _, arg = line.decode("ascii", "replace").strip().partition(" ")
        queue = self.factory.queue
        if command == "flush":
            self.answer(f"ok {queue.flush()}")
        elif command == "pickup" and self.factory.pickup is not None:
            self.factory.pickup.poke()
            self.answer("ok")
        elif command == "delete" and valid_id(arg.strip()):
            d = maybeDeferred(queue.delete, arg.strip())
            d.addCallback(lambda found: self.answer("ok" if found else "error no such message"))
            d.addErrback(lambda f: self.answer(f"error {f.getErrorMessage()}"))
            self._wait(d)
        elif command == "adopt" and valid_id(arg.strip()):
            d = maybeDeferred(queue.adopt, arg.strip())
            d.addCallback(lambda found: self.answer("ok" if found else "error no such message"))
            d.addErrback(lambda f: self.answer(f"error {f.getErrorMessage()}"))
            self._wait(d)
        else:
            self.answer("error unknown command")

    def answer(self, text: str) -> None:
        self.sendLine(text.encode("utf-8"))


class ControlFactory(Factory):
    protocol = ControlProtocol
    noisy = False

    def __init__(self, queue: Any, pickup: Any = None) -> None:
        self.queue = queue
        self.pickup = pickup


def control_path(data_dir: str) -> str:
    return os.path.join(os.path.abspath(data_dir), "control.sock")


def send_command(data_dir: str, command: str, timeout: float = 30) -> str | None:
    """
    Send one command to the running server; C{None} if none is running.
    """
    path = control_path(data_dir)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            return None
        s.sendall(command.encode("utf-8") + b"\n")
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            answer += chunk
    return answer.decode("utf-8").strip()
