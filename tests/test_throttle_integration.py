"""
The login throttle against real clients (smtplib, imaplib, poplib) over
TLS on 127.0.0.1 port 0, with a counting password hasher: the block comes
before the hash on SMTP AUTH, IMAP and POP3; a full hash queue answers at
once with a temporary error; the real user on a clean network is served
while an attack on the same user runs elsewhere.

Clients come from different source addresses in 127.0.0.0/8 (one /24
each) to play different networks.
"""

import base64
import imaplib
import poplib
import smtplib
import socket
import threading

from twisted.internet.defer import inlineCallbacks
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from mailstack.auth import verify_password
from tests.support import add_user, client_context, in_thread, start_server

LISTEN = "tcp:0:interface=127.0.0.1"
HOST = "localhost"


def plain(user, password):
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")


class IMAP4From(imaplib.IMAP4):
    """
    imaplib's client, connecting from a given source address.
    """

    def __init__(self, host, port, source):
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


class POP3From(poplib.POP3):
    """
    poplib's client, connecting from a given source address.
    """

    def __init__(self, host, port, source):
        self.source = source
        super().__init__(host, port, timeout=30)

    def _create_socket(self, timeout):
        return socket.create_connection((self.host, self.port), timeout,
                                        source_address=(self.source, 0))


class Clients:
    """
    Opens sessions of one protocol, ready for a password (TLS started),
    and sends one login on each without waiting for the answer.
    """

    def __init__(self, server, protocol):
        self.server = server
        self.protocol = protocol
        self.port = server.ports[protocol]
        self.context = client_context(server)

    def open(self, source):
        if self.protocol == "submission":
            client = smtplib.SMTP(HOST, self.port, timeout=30, source_address=(source, 0))
            client.ehlo("client.test")
            client.starttls(context=self.context)
            client.ehlo("client.test")
        elif self.protocol == "imap":
            client = IMAP4From(HOST, self.port, source)
            client.starttls(self.context)
        else:
            client = POP3From(HOST, self.port, source)
            client.stls(self.context)
            client.user("alice@localhost")
        return client

    def send_login(self, client, password, user="alice@localhost"):
        if self.protocol == "submission":
            client.putcmd("AUTH", "PLAIN " + plain(user, password))
        elif self.protocol == "imap":
            client.send(f'x1 LOGIN "{user}" "{password}"\r\n'.encode())
        else:
            if user != "alice@localhost":
                client.user(user)
            client.sock.sendall(f"PASS {password}\r\n".encode())

    def answer(self, client):
        """
        The answer to the login: C{(kind, text)}, kind one of C{ok},
        C{failed}, C{refused} (a temporary error), C{closed}.
        """
        try:
            if self.protocol == "submission":
                code, text = client.getreply()
                kinds = {235: "ok", 535: "failed", 454: "refused", 421: "refused"}
                return kinds.get(code, str(code)), f"{code} {text.decode()}"
            if self.protocol == "imap":
                while True:
                    line = client.readline().decode()
                    if not line:
                        return "closed", ""
                    if line.startswith("x1 "):
                        break
                if line.startswith("x1 OK"):
                    return "ok", line
                return ("refused" if "[UNAVAILABLE]" in line else "failed"), line
            line = client.file.readline().decode()
            if line.startswith("+OK"):
                return "ok", line
            if line.startswith("-ERR [SYS/TEMP]"):
                return "refused", line
            return ("failed" if line.startswith("-ERR [AUTH]") else "closed"), line
        except (smtplib.SMTPServerDisconnected, OSError, imaplib.IMAP4.abort):
            return "closed", ""

    def login(self, source, password, user="alice@localhost"):
        """
        One session, one login; its answer.
        """
        try:
            client = self.open(source)
        except smtplib.SMTPConnectError as e:
            return "refused", f"{e.smtp_code} {e.smtp_error.decode()}"
        try:
            self.send_login(client, password, user)
            return self.answer(client)
        finally:
            client.sock.close()


class ThrottleIntegrationTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, submission=LISTEN, imap=LISTEN, pop3=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        add_user(self.server, "mallory@localhost", "mallory-pw")
        self.lock = threading.Lock()
        self.hashes = 0
        self.hold = None  # a threading.Event the hashes wait for, if set
        self.entered = threading.Semaphore(0)
        self.server.checker.verify = self.counting_verify
        self.server.throttle.max_delay = 0.01  # the schedule, compressed

    def counting_verify(self, stored, password):
        with self.lock:
            self.hashes += 1
        self.entered.release()
        if self.hold is not None:
            self.hold.wait(30)
        if password not in ("alice-pw", "mallory-pw"):
            return False  # a wrong guess: counted, without Argon2's 0.1-0.2 s (a slow CI)
        return verify_password(stored, password)

    @inlineCallbacks
    def burst(self, protocol):
        """
        Forty sessions opened first from one address, then one wrong
        password on each at once: at most C{limit} passwords are hashed,
        the rest refused; then the right password is refused without a hash.
        """
        clients = Clients(self.server, protocol)
        limit = self.server.throttle.limit

        def attack():
            sessions = [clients.open("127.0.1.5") for _ in range(40)]
            for i, session in enumerate(sessions):
                clients.send_login(session, f"wrong{i}")
            answers = [clients.answer(session) for session in sessions]
            for session in sessions:
                session.sock.close()
            return answers

        answers = yield in_thread(attack)
        kinds = [kind for kind, _ in answers]
        self.assertEqual(self.hashes, limit, answers)
        self.assertEqual(kinds.count("refused") + kinds.count("failed"), 40, answers)
        self.assertGreaterEqual(kinds.count("refused"), 40 - limit, answers)
        hashed = self.hashes
        kind, text = yield in_thread(clients.login, "127.0.1.6", "alice-pw")
        self.assertEqual(kind, "refused", text)
        self.assertEqual(self.hashes, hashed)
        return answers

    @inlineCallbacks
    def test_smtp_block_before_hash(self):
        """
        SMTP AUTH: 40 parallel guesses cost C{limit} hashes (not 40); the
        others and the right password get C{421 4.7.0}.
        """
        answers = yield self.burst("submission")
        refused = [text for kind, text in answers if kind == "refused"]
        self.assertTrue(all("421 4.7.0" in text for text in refused), refused)

    @inlineCallbacks
    def test_imap_block_before_hash(self):
        """
        IMAP LOGIN: as for SMTP, refused with C{NO [UNAVAILABLE]}.
        """
        answers = yield self.burst("imap")
        refused = [text for kind, text in answers if kind == "refused"]
        self.assertTrue(all("NO [UNAVAILABLE]" in text for text in refused), refused)

    @inlineCallbacks
    def test_pop3_block_before_hash(self):
        """
        POP3 PASS: as for SMTP, refused with C{-ERR [SYS/TEMP]}.
        """
        answers = yield self.burst("pop3")
        refused = [text for kind, text in answers if kind == "refused"]
        self.assertTrue(all("-ERR [SYS/TEMP]" in text for text in refused), refused)

    @inlineCallbacks
    def test_own_account_does_not_reset(self):
        """
        Logging in to one's own account between guesses (over all three
        protocols) does not reset the address's failures: the guesses
        still stop after C{limit} in all.
        """
        protocols = [Clients(self.server, p) for p in ("submission", "imap", "pop3")]
        limit = self.server.throttle.limit

        def attack():
            answers = []
            for i in range(limit + 3):
                clients = protocols[i % 3]
                answers.append(clients.login("127.0.1.5", f"wrong{i}")[0])
                answers.append(clients.login("127.0.1.5", "mallory-pw",
                                             user="mallory@localhost")[0])
            return answers

        answers = yield in_thread(attack)
        guesses, own = answers[0::2], answers[1::2]
        # The tenth wrong guess is hashed and answered 421 (SMTP closes).
        self.assertEqual(guesses[:limit - 1], ["failed"] * (limit - 1), answers)
        self.assertEqual(guesses[limit:], ["refused"] * 3, answers)
        self.assertEqual(own[:limit - 1], ["ok"] * (limit - 1), answers)
        self.assertEqual(own[limit - 1:], ["refused"] * 4, answers)
        self.assertEqual(self.hashes, limit + limit - 1)

    @inlineCallbacks
    def test_full_hash_queue(self):
        """
        With the password-check queue full (two checks running, held), a
        login from anywhere gets an immediate temporary error, without a
        hash: C{454 4.7.0}, C{NO [UNAVAILABLE]}, C{-ERR [SYS/TEMP]}; the
        held checks then answer normally.
        """
        self.server.checker.max_pending = 2
        self.hold = threading.Event()
        self.addCleanup(self.hold.set)
        smtp, imap, pop = (Clients(self.server, p) for p in ("submission", "imap", "pop3"))

        def flood():
            first = smtp.open("127.0.4.5")
            second = imap.open("127.0.5.5")
            probes = [(smtp, smtp.open("127.0.7.5")), (imap, imap.open("127.0.8.5")),
                      (pop, pop.open("127.0.6.5"))]
            smtp.send_login(first, "wrong")
            imap.send_login(second, "wrong")
            for _ in range(2):
                if not self.entered.acquire(timeout=30):
                    raise AssertionError("the password checks never started")
            answers = []
            for clients, session in probes:
                clients.send_login(session, "alice-pw")
                answers.append(clients.answer(session))
            # IMAP AUTHENTICATE PLAIN is answered the same way.
            authenticate = imap.open("127.0.9.5")
            authenticate.send(b"x1 AUTHENTICATE PLAIN\r\n")
            authenticate.readline()  # the continuation
            authenticate.send(plain("alice@localhost", "alice-pw").encode() + b"\r\n")
            answers.append(imap.answer(authenticate))
            probes.append((imap, authenticate))
            self.hold.set()
            held = [smtp.answer(first), imap.answer(second)]
            for session in [first, second] + [s for _, s in probes]:
                session.sock.close()
            return answers, held

        answers, held = yield in_thread(flood)
        self.assertEqual(self.hashes, 2)
        self.assertEqual([kind for kind, _ in answers], ["refused"] * 4, answers)
        self.assertTrue(answers[0][1].startswith("454 4.7.0"), answers)
        self.assertIn("NO [UNAVAILABLE]", answers[1][1])
        self.assertTrue(answers[2][1].startswith("-ERR [SYS/TEMP]"), answers)
        self.assertIn("NO [UNAVAILABLE]", answers[3][1])
        self.assertEqual([kind for kind, _ in held], ["failed", "failed"], held)

    @inlineCallbacks
    def test_real_user_served_during_attack(self):
        """
        While alice is attacked from a dozen networks (her user limit
        reached), she is refused from those networks, but the real alice,
        from a network with no failures, logs in over SMTP, IMAP and POP3
        without any delay: the throttle's clock is fake and never moves,
        so a delay would never end.
        """
        self.server.throttle.clock = Clock()
        protocols = [Clients(self.server, p) for p in ("submission", "imap", "pop3")]
        limit = self.server.throttle.user_limit

        def attack():
            failed = [protocols[i % 3].login(f"127.0.{10 + i}.5", f"wrong{i}")[0]
                      for i in range(limit + 2)]
            refused = [clients.login("127.0.10.5", "alice-pw") for clients in protocols]
            real = [clients.login("127.0.200.1", "alice-pw") for clients in protocols]
            return failed, refused, real

        failed, refused, real = yield in_thread(attack)
        self.assertEqual(failed, ["failed"] * (limit + 2))
        self.assertEqual([kind for kind, _ in refused], ["refused"] * 3, refused)
        self.assertTrue(refused[0][1].startswith("454 4.7.0"), refused)
        self.assertEqual([kind for kind, _ in real], ["ok"] * 3, real)

    @inlineCallbacks
    def test_repeated_password_not_counted(self):
        """
        A client retrying one stale password (over all three protocols)
        costs one hash and is never blocked; a new wrong password is still
        counted.
        """
        protocols = [Clients(self.server, p) for p in ("submission", "imap", "pop3")]
        limit = self.server.throttle.limit

        def retry():
            stale = [protocols[i % 3].login("127.0.1.5", "stale")[0] for i in range(limit + 5)]
            return stale, protocols[0].login("127.0.1.5", "alice-pw")[0]

        stale, right = yield in_thread(retry)
        self.assertEqual(stale, ["failed"] * (limit + 5))
        self.assertEqual(right, "ok")
        self.assertEqual(self.hashes, 2)
