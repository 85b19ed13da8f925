"""
Helpers for tests that run a real mailstack on 127.0.0.1 port 0.
"""

import os
import shutil
import smtplib
import ssl
import tempfile

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks, returnValue
from twisted.internet.threads import deferToThread

from mailstack.auth import hash_password
from mailstack.config import build_config
from mailstack.service import MailStack
from mailstack.testing import FakeResolver

_FAST_HASHES = {}


def fast_hash(password):
    """
    Argon2 is slow on purpose; tests reuse one hash per password.
    """
    if password not in _FAST_HASHES:
        _FAST_HASHES[password] = hash_password(password)
    return _FAST_HASHES[password]


def test_config(data_dir, **options):
    """
    A Config with every listener off but those given, on loopback port 0.
    """
    values = {name: "none" for name in
              ("smtp", "submission", "submissions", "imap", "imaps", "pop3")}
    values.update({"data-dir": data_dir, "hostname": "mx.test",
                   "domain": ["localhost", "example.test"]})
    for key, value in options.items():
        values[key.replace("_", "-")] = value
    return build_config(values)


def short_tempdir(testcase):
    """
    A fresh directory with a short path (a UNIX socket path must fit in 108
    bytes), removed after the test.
    """
    path = tempfile.mkdtemp(prefix="ms-")
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


@inlineCallbacks
def start_server(testcase, resolver=None, relay_endpoint=None, relay_port=25,
                 relay_timeouts=None, clock=None, **options):
    """
    Start a MailStack with the given listeners (e.g. smtp="tcp:0:interface=127.0.0.1")
    and return it, with C{ports} mapping each listener to its port number.
    DNS is a L{FakeResolver} unless one is given, or C{resolver=False} for
    the one the configuration makes (C{--dns-server}).
    """
    data_dir = options.pop("data_dir", None) or short_tempdir(testcase)
    extra = {"relay_timeouts": relay_timeouts} if relay_timeouts else {}
    service = MailStack(test_config(data_dir, **options), reactor,
                        resolver=FakeResolver() if resolver is None else (resolver or None),
                        relay_endpoint=relay_endpoint,
                        relay_port=relay_port, clock=clock, **extra)
    service.privilegedStartService()
    service.startService()
    testcase.addCleanup(service.stopService)
    service.ports = {}
    for listener in service:
        if hasattr(listener, "listening"):
            port = yield listener.listening
            service.ports[listener.label] = getattr(port.getHost(), "port", None)
    returnValue(service)


def add_user(service, address, password="secret"):
    from mailstack.address import local_address
    service.users.add(local_address(address), fast_hash(password))


def maildir_files(service, address, sub="new"):
    local, domain = address.split("@")
    path = os.path.join(service.data_dir, "mail", domain, local, sub)
    if not os.path.isdir(path):
        return []
    return [os.path.join(path, name) for name in sorted(os.listdir(path))]


def read_messages(service, address):
    result = []
    for path in maildir_files(service, address):
        with open(path, "rb") as f:
            result.append(f.read())
    return result


def client_context(service):
    return ssl.create_default_context(cafile=service.tls.cert_path)


def in_thread(f, *args, **kwargs):
    """
    Run a blocking client (smtplib, imaplib, ...) off the reactor thread.
    """
    return deferToThread(f, *args, **kwargs)


def smtp_session(port, actions, host="127.0.0.1"):
    """
    Open an SMTP session and run C{actions(client)} in it, in this thread.
    """
    client = smtplib.SMTP(host, port, timeout=30)
    try:
        return actions(client)
    finally:
        try:
            client.quit()
        except (smtplib.SMTPServerDisconnected, OSError):
            pass


class IMAPSession:
    """
    A logged-in IMAPS session on a raw TLS socket: one command at a time,
    its answer returned whole (up to and including the tagged line).
    """

    def __init__(self, server, context, user="alice@localhost", password="alice-pw",
                 timeout=30):
        import socket

        raw = socket.create_connection(("127.0.0.1", server.ports["imaps"]), timeout)
        self.tls = context.wrap_socket(raw, server_hostname="localhost")
        self.reader = self.tls.makefile("rb")
        self.reader.readline()  # greeting
        assert b"OK" in self.command(b"l LOGIN %s %s" % (user.encode(), password.encode()))

    def command(self, line):
        tag = line.split()[0]
        self.tls.sendall(line + b"\r\n")
        out = []
        while True:
            got = self.reader.readline()
            out.append(got)
            if not got or got.startswith(tag + b" "):
                return b"".join(out)

    def close(self):
        self.tls.close()
