"""
The C{--http}/C{--https} listener (L{mailstack.wellknown}): a real
MailStack on 127.0.0.1 port 0, asked with real HTTP clients (http.client
in a thread, and the MTA-STS client over HTTPS with a test CA).
"""

import http.client
import os
import socket
import xml.etree.ElementTree as ET

from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import BrowserLikePolicyForHTTPS

from mailstack.mailauth.dnsrecords import mta_sts_id, mta_sts_policy, zone_text
from mailstack.mailauth.lookup import DNSCache
from mailstack.mailauth.mtasts import MTASTSClient
from mailstack.mailauth.testing import ZoneResolver
from mailstack.wellknown import CONNECTION_TIME, IDLE_TIMEOUT, autoconfig_xml, make_site
from tests.support import in_thread, short_tempdir, start_server
from tests.test_mailauth_mtasts import make_ca, make_leaf, pem

LISTEN = "tcp:0:interface=127.0.0.1"


def get(port, path, host, method="GET", body=None, headers=None, chunked=False):
    """
    One HTTP request with the given Host header: (status, headers, body).
    """
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        all_headers = {"Host": host}
        all_headers.update(headers or {})
        connection.request(method, path, body=body, headers=all_headers,
                           encode_chunked=chunked)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


class HTTPListenerTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, http=LISTEN, imap=LISTEN, imaps=LISTEN,
                                         submission=LISTEN, submissions=LISTEN)
        self.port = self.server.ports["http"]
        self.events = []
        observer = lambda event: self.events.append(formatEvent(event))  # noqa: E731
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def get(self, path, host="mta-sts.example.test", **kwargs):
        return in_thread(get, self.port, path, host, **kwargs)

    @inlineCallbacks
    def test_mta_sts_policy(self):
        """
        mta-sts.DOMAIN of a local domain gets the policy that `mailstack
        dns DOMAIN` prints and whose id its TXT record carries, as
        text/plain; another host or path gets 404.
        """
        for host in ("mta-sts.example.test", "MTA-STS.Example.Test:8080", "mta-sts.localhost"):
            status, headers, body = yield self.get("/.well-known/mta-sts.txt", host)
            self.assertEqual(status, 200, host)
            self.assertEqual(headers["Content-Type"], "text/plain; charset=utf-8")
            self.assertEqual(body.decode(), mta_sts_policy("mx.test"))
        printed = zone_text("example.test", "mx.test", [])
        self.assertIn(f'"v=STSv1; id={mta_sts_id(body.decode())}"', printed)
        for line in body.decode().splitlines():
            self.assertIn("; " + line + "\n", printed)
        logged = f"http: 127.0.0.1 GET mta-sts.localhost/.well-known/mta-sts.txt 200 {len(body)}"
        self.assertTrue(any(logged in line for line in self.events))
        for host, path in (("mta-sts.other.test", "/.well-known/mta-sts.txt"),
                           ("example.test", "/.well-known/mta-sts.txt"),
                           ("mta-sts.example.test.evil", "/.well-known/mta-sts.txt"),
                           ("mta-sts.example.test", "/"),
                           ("mta-sts.example.test", "/.well-known/"),
                           ("mta-sts.example.test", "/.well-known/../../etc/passwd"),
                           ("mta-sts.example.test", "/.well-known/mta-sts.txt/x")):
            status, _, body = yield self.get(path, host)
            self.assertEqual(status, 404, (host, path))
            self.assertEqual(body, b"Not found\n")

    @inlineCallbacks
    def test_reloaded_domains(self):
        """
        A domain added by a reload is served at once.
        """
        import dataclasses

        from mailstack.reload import apply

        status, _, _ = yield self.get("/.well-known/mta-sts.txt", "mta-sts.new.test")
        self.assertEqual(status, 404)
        apply(self.server, dataclasses.replace(
            self.server.config, domain=self.server.config.domain + ("new.test",)))
        status, _, _ = yield self.get("/.well-known/mta-sts.txt", "mta-sts.new.test")
        self.assertEqual(status, 200)

    @inlineCallbacks
    def test_autoconfig(self):
        """
        Thunderbird's autoconfiguration names our host, the ports we listen
        on with their TLS modes, and the address as user name, for the
        domain of the address asked about (or of the Host name); services
        that are off are not offered.
        """
        ports = self.server.ports
        for path, host, domain in (
                ("/mail/config-v1.1.xml?emailaddress=bob%40example.test",
                 "autoconfig.whatever.test", "example.test"),
                ("/.well-known/autoconfig/mail/config-v1.1.xml", "example.test",
                 "example.test"),
                ("/mail/config-v1.1.xml", "autoconfig.elsewhere.test", "localhost")):
            status, headers, body = yield self.get(path, host)
            self.assertEqual(status, 200)
            self.assertEqual(headers["Content-Type"], "application/xml; charset=utf-8")
            provider = ET.fromstring(body).find("emailProvider")
            self.assertEqual(provider.get("id"), domain)
            self.assertEqual(provider.findtext("domain"), domain)
            servers = [(s.tag, s.get("type"), s.findtext("hostname"), int(s.findtext("port")),
                        s.findtext("socketType"), s.findtext("username"))
                       for s in provider if s.tag.endswith("Server")]
            self.assertEqual(servers, [
                ("incomingServer", "imap", "mx.test", ports["imaps"], "SSL", "%EMAILADDRESS%"),
                ("incomingServer", "imap", "mx.test", ports["imap"], "STARTTLS",
                 "%EMAILADDRESS%"),
                ("outgoingServer", "smtp", "mx.test", ports["submissions"], "SSL",
                 "%EMAILADDRESS%"),
                ("outgoingServer", "smtp", "mx.test", ports["submission"], "STARTTLS",
                 "%EMAILADDRESS%")])

    @inlineCallbacks
    def test_hostile_requests(self):
        """
        A body is refused with 413 before it is read, POST gets 405, an
        unknown method 501, headers over 16 KiB are refused, and the listener goes
        on serving.
        """
        status, _, _ = yield self.get("/.well-known/mta-sts.txt", method="POST",
                                      body=b"x" * 100000)
        self.assertEqual(status, 413)
        status, _, _ = yield self.get("/.well-known/mta-sts.txt", method="POST", body=b"x",
                                      headers={"Transfer-Encoding": "chunked"}, chunked=True)
        self.assertEqual(status, 413)
        status, headers, _ = yield self.get("/.well-known/mta-sts.txt", method="POST")
        self.assertEqual((status, headers.get("Allow")), (405, "GET, HEAD"))
        status, _, _ = yield self.get("/.well-known/mta-sts.txt", method="DELETE")
        self.assertEqual(status, 501)
        answer = yield in_thread(raw_request, self.port, b"GET /x\x1b[2J HTTP/1.1\r\n"
                                 b"Host: a\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400 "), answer)
        answer = yield in_thread(raw_request, self.port, b"GET /x HTTP/1.1\r\n"
                                 b"Host: a\xff\x1b[2J\r\nConnection: close\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 404 "), answer)
        self.assertTrue(any("\\x1b[2J/x 404" in line for line in self.events),
                        self.events)
        status, _, body = yield self.get("/.well-known/mta-sts.txt", method="HEAD")
        self.assertEqual((status, body), (200, b""))
        answer = yield in_thread(get_raw, self.port, b"X-Long: " + b"a" * 20000 + b"\r\n")
        self.assertFalse(answer.startswith(b"HTTP/1.1 200"), answer[:100])
        status, _, _ = yield self.get("/.well-known/mta-sts.txt")
        self.assertEqual(status, 200)


class LimitTests(TestCase):
    @inlineCallbacks
    def test_connection_limit(self):
        """
        The shared connection limits apply: over the per-client limit, a
        client gets 503 and the connection is closed.
        """
        server = yield start_server(self, http=LISTEN, max_client_connections=1,
                                    connection_limit_exempt="none")
        port = server.ports["http"]
        holder = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(holder.close)
        yield in_thread(holder.send, b"GET / HTTP/1.1\r\n")  # counted, not finished

        def second():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                data = b""
                while chunk := s.recv(4096):
                    data += chunk
                return data

        answer = yield in_thread(second)
        self.assertTrue(answer.startswith(b"HTTP/1.1 503 "), answer)


class IdleTimeoutTests(SynchronousTestCase):
    def test_idle_connection_closed(self):
        """
        A connection that sends nothing more is closed after IDLE_TIMEOUT.
        """
        clock = Clock()
        site = make_site(("example.test",), "mx.test", dict, reactor=clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\n")
        clock.advance(IDLE_TIMEOUT - 1)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)

    def test_slow_client_cut(self):
        """
        A client that keeps the connection busy with one byte before each
        idle timeout is cut after CONNECTION_TIME all the same.
        """
        clock = Clock()
        site = make_site(("example.test",), "mx.test", dict, reactor=clock)
        protocol = site.buildProtocol(None)
        transport = StringTransport()
        transport.abortConnection = lambda: setattr(transport, "aborted", True)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nX: ")
        for _ in range(CONNECTION_TIME // 10 - 1):
            clock.advance(10)
            protocol.dataReceived(b"a")
        self.assertFalse(getattr(transport, "aborted", False))
        clock.advance(10)
        self.assertTrue(transport.aborted)

    def test_xml_escaped(self):
        """
        Names are escaped in the XML.
        """
        xml = autoconfig_xml("a&b.test", "mx<.test", {"imap": 143})
        root = ET.fromstring(xml)
        self.assertEqual(root.find("emailProvider/domain").text, "a&b.test")
        self.assertEqual(root.find("emailProvider/incomingServer/hostname").text, "mx<.test")


class HTTPSTests(TestCase):
    @inlineCallbacks
    def test_policy_fetched_over_https(self):
        """
        With --https and a certificate for mta-sts.DOMAIN (from a test CA),
        an MTA-STS client that trusts the CA fetches and parses the policy
        `mailstack dns` announces: the whole chain a sender follows.
        """
        directory = short_tempdir(self)
        ca_key, ca_cert = make_ca()
        key, cert = make_leaf(ca_key, ca_cert, "mta-sts.example.test")
        paths = []
        for name, data in (("cert.pem", pem(cert)), ("key.pem", pem(key))):
            paths.append(os.path.join(directory, name))
            with open(paths[-1], "wb") as f:
                f.write(data)
        server = yield start_server(self, https=LISTEN, tls_cert=paths[0], tls_key=paths[1])
        policy_id = mta_sts_id(mta_sts_policy("mx.test"))
        zone = ZoneResolver({"_mta-sts.example.test": {"TXT": [f"v=STSv1; id={policy_id}"]}})
        client = MTASTSClient(
            reactor, DNSCache(zone, reactor),
            tls=BrowserLikePolicyForHTTPS(trustRoot=ssl.Certificate.loadPEM(pem(ca_cert))),
            connect_to={"mta-sts.example.test": ("127.0.0.1", server.ports["https"])},
            timeout=10)
        policy = yield Deferred.fromCoroutine(client.policy("example.test"))
        self.assertEqual((policy.mode, policy.mx, policy.max_age, policy.id),
                         ("enforce", ("mx.test",), 604800, policy_id))
        # Plain HTTP on the TLS port gets nothing.
        answer = yield in_thread(get_raw, server.ports["https"])
        self.assertNotIn(b"STSv1", answer)


def raw_request(port, request):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def get_raw(port, extra=b""):
    """
    The policy asked for in a raw request: what came back before the
    server closed the connection.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        try:
            s.sendall(b"GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: mta-sts.example.test\r\n"
                      + extra + b"\r\n")
        except OSError:
            return b""
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except OSError:
            pass
        return data
