"""
Several receiving processes on one SMTP socket (--receivers): mail for
local and remote recipients arrives whichever process accepts it; remote
mail is handed to the main process's queue (announced, or found by its
sweep); receivers stop with the main process, even when it is killed.
"""

import os
import signal
import smtplib
import socket
import threading
import time

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineReceiver
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import SynchronousTestCase, TestCase

from benchmarks.run import children_by_parent
from mailstack.address import local_address, parse_address
from mailstack.delivery.dispatch import Dispatcher
from mailstack.queue.announce import Announcer
from mailstack.queue.control import control_path
from mailstack.queue.handoff import QueueHandoff
from mailstack.queue.records import new_record
from mailstack.queue.store import QueueStore
from mailstack.message import Envelope, MessageSpool
from mailstack.testing import start_server_process
from mailstack.users import UserDatabase
from tests.support import add_user, fast_hash, in_thread, short_tempdir, start_server
from tests.test_relay import Sink

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "tcp:0:interface=127.0.0.1"


class ThreadSink:
    """
    A minimal SMTP sink in a thread (the server under test is another
    process, and these tests do not run a reactor): counts messages.
    """

    def __init__(self):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(50)
        self.port = self.listener.getsockname()[1]
        self.subjects = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()

    def _session(self, conn):
        try:
            self._converse(conn)
        except OSError:
            pass  # the server was killed mid-session (tests.test_crash)

    def _converse(self, conn):
        with conn, conn.makefile("rb") as lines:
            conn.sendall(b"220 sink\r\n")
            data = None
            for line in lines:
                if data is not None:
                    if line == b".\r\n":
                        subject = [x for x in data if x.startswith(b"Subject:")]
                        with self.lock:
                            self.subjects.append(subject[0].strip() if subject else b"")
                        data = None
                        conn.sendall(b"250 ok\r\n")
                    else:
                        data.append(line)
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    data = []
                    conn.sendall(b"354 go\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")

    def close(self):
        self.listener.close()


def receiver_pids(main_pid):
    found = []
    for pid in children_by_parent().get(main_pid, []):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"mailstack.receivers" in f.read():
                    found.append(pid)
        except OSError:
            continue  # ended meanwhile
    return found


def wait_for(condition, timeout=60):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)  # polling other processes; no fake clock can drive them
    return True


class ReceiverProcessTests(SynchronousTestCase):
    def start(self):
        self.data_dir = short_tempdir(self)
        UserDatabase(self.data_dir).add(local_address("alice@localhost"), fast_hash("pw"))
        self.sink = ThreadSink()
        self.addCleanup(self.sink.close)
        self.process, self.port = start_server_process(self.data_dir, [
            "--receivers", "3", "--relay-networks", "127.0.0.0/8",
            "--route", f"*=127.0.0.1:{self.sink.port}"], pythonpath=ROOT)
        self.addCleanup(lambda: self.process.poll() is None and self.process.kill())
        self.assertTrue(wait_for(lambda: len(receiver_pids(self.process.pid)) == 2, 30))
        return receiver_pids(self.process.pid)

    def test_local_and_remote_mail_through_all_processes(self):
        """
        80 messages over 8 concurrent sessions: every local one is in the
        Maildir once, every remote one reached the remote host once, the
        queue is empty; SIGTERM stops the receivers with the main process.
        """
        receivers = self.start()

        def sender(worker):
            client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
            for n in range(10):
                to = "alice@localhost" if n % 2 else "bob@remote.test"
                client.sendmail("load@remote.test", [to],
                                f"Subject: m-{worker}-{n}\r\n\r\nbody\r\n".encode())
            client.quit()

        threads = [threading.Thread(target=sender, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        new = os.path.join(self.data_dir, "mail", "localhost", "alice", "new")
        envelopes = os.path.join(self.data_dir, "queue", "msg")
        self.assertTrue(wait_for(lambda: len(self.sink.subjects) >= 40 and not os.listdir(
            envelopes)))
        local = []
        for name in os.listdir(new):
            with open(os.path.join(new, name), "rb") as f:
                local += [x.strip() for x in f if x.startswith(b"Subject:")]
        expected_local = sorted(f"Subject: m-{w}-{n}".encode() for w in range(8)
                                for n in range(1, 10, 2))
        expected_remote = sorted(f"Subject: m-{w}-{n}".encode() for w in range(8)
                                 for n in range(0, 10, 2))
        self.assertEqual(sorted(local), expected_local)
        self.assertEqual(sorted(self.sink.subjects), expected_remote)

        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        self.assertTrue(wait_for(lambda: not any(os.path.exists(f"/proc/{p}/cmdline")
                                                 and _alive(p) for p in receivers), 30))

    def test_receivers_end_when_main_is_killed(self):
        receivers = self.start()
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.assertTrue(wait_for(lambda: not any(_alive(p) for p in receivers), 30))


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class HandoffTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.sink = yield Sink().start(self)
        self.server = yield start_server(
            self, smtp=LISTEN, route=[f"*=127.0.0.1:{self.sink.number}"])
        yield self.server.queue.loaded
        add_user(self.server, "alice@localhost")

    @inlineCallbacks
    def test_handoff_announced(self):
        """
        A receiver's queue stores the message in the shared directory and
        announces it; the main process's queue delivers it.
        """
        handoff = QueueHandoff(QueueStore(os.path.join(self.server.data_dir, "queue")),
                               self.server.data_dir, self.server.reactor, self.server.io_pool)
        self.addCleanup(handoff.announcer.close)
        dispatcher = Dispatcher(self.server.router, self.server.maildir, handoff,
                                self.server.reactor, self.server.spool_dir)
        arrived = self.sink.next_message()
        yield dispatcher.inject(parse_address("alice@localhost"),
                                [parse_address("bob@remote.test")], b"Subject: handed\n\nx\n")
        yield arrived
        [(sender, rcpts, content)] = self.sink.policy.received
        self.assertEqual((sender, rcpts), ("alice@localhost", ["bob@remote.test"]))
        self.assertIn(b"Subject: handed", content)

    @inlineCallbacks
    def test_sweep_takes_up_unannounced(self):
        """
        A message stored by a receiver that could not announce it is found
        by the sweep, once, and delivered.
        """
        store = QueueStore(os.path.join(self.server.data_dir, "queue"))
        envelope = Envelope("AB12CD34EF56", parse_address("alice@localhost"),
                            received_at=0, client="receiver")
        envelope.remote = [parse_address("carol@remote.test")]
        spool = MessageSpool(self.server.spool_dir)
        spool.write(b"Subject: swept\n\nx\n")
        yield in_thread(store.add, new_record(envelope, self.server.reactor.seconds()), spool)
        arrived = self.sink.next_message()
        found = yield self.server.queue.sweep()
        again = yield self.server.queue.sweep()
        yield arrived
        self.assertEqual((found, again), (1, 0))
        self.assertEqual([r for _, r, _ in self.sink.policy.received], [["carol@remote.test"]])


class HeldControl(LineReceiver):
    """
    A control socket that records the lines and answers when told.
    """

    delimiter = b"\n"

    def connectionMade(self):
        self.factory.connections.append(self)
        self.lines = []

    def lineReceived(self, line):
        self.lines.append(line.decode())
        self.factory.arrived.append(line.decode())
        waiter, self.factory.waiter = self.factory.waiter, None
        if waiter is not None:
            waiter.callback(line)


class AnnouncerTests(TestCase):
    """
    L{Announcer}: the announcements of a receiver on one connection, a
    bounded number in flight, the 250 never waiting for them.
    """

    def setUp(self):
        self.data_dir = short_tempdir(self)
        self.factory = Factory.forProtocol(HeldControl)
        self.factory.connections, self.factory.arrived, self.factory.waiter = [], [], None
        self.port = reactor.listenUNIX(control_path(self.data_dir), self.factory)
        self.addCleanup(self.port.stopListening)
        self.announcer = Announcer(reactor, self.data_dir)
        self.addCleanup(self.announcer.close)

    def line_arrives(self):
        self.factory.waiter = Deferred()
        return self.factory.waiter

    @inlineCallbacks
    def wait_for_lines(self, n):
        while len(self.factory.arrived) < n:
            yield self.line_arrives()

    @inlineCallbacks
    def test_one_connection_in_order(self):
        """
        Many announcements share one connection and get their own
        answers, in order.
        """
        ids = [f"{n:012X}" for n in range(10)]
        answers = [self.announcer.announce(i) for i in ids]
        yield self.wait_for_lines(10)
        [control] = self.factory.connections
        self.assertEqual(control.lines, [f"adopt {i}" for i in ids])
        for n in range(10):
            control.sendLine(b"ok" if n % 2 else b"error no such message")
        results = yield gatherResults(answers)
        self.assertEqual(results, ["error no such message", "ok"] * 5)
        later = self.announcer.announce("ABCDEF012345")
        yield self.wait_for_lines(11)
        control.sendLine(b"ok")
        self.assertEqual((yield later), "ok")
        self.assertEqual(len(self.factory.connections), 1)

    @inlineCallbacks
    def test_window(self):
        """
        At most L{Announcer.window} are unanswered; the rest are sent as
        answers come.
        """
        self.announcer.window = 2
        answers = [self.announcer.announce(f"{n:012X}") for n in range(5)]
        yield self.wait_for_lines(2)
        [control] = self.factory.connections
        for _ in range(3):  # a few reactor turns: nothing more comes
            yield deferLater(reactor, 0, lambda: None)
        self.assertEqual(len(control.lines), 2)
        for n in range(5):
            control.sendLine(b"ok")
            yield self.wait_for_lines(min(5, n + 3))
        self.assertEqual((yield gatherResults(answers)), ["ok"] * 5)

    @inlineCallbacks
    def test_lost_connection(self):
        """
        Announcements in flight when the connection is lost answer an
        error (the sweep takes those messages up); the next one gets a new
        connection.
        """
        first = self.announcer.announce("AAAAAAAAAAAA")
        yield self.wait_for_lines(1)
        self.factory.connections[0].transport.loseConnection()
        answer = yield first
        self.assertTrue(answer.startswith("error "), answer)
        second = self.announcer.announce("BBBBBBBBBBBB")
        yield self.wait_for_lines(2)
        self.assertEqual(len(self.factory.connections), 2)
        self.factory.connections[1].sendLine(b"ok")
        self.assertEqual((yield second), "ok")

    @inlineCallbacks
    def test_no_queue_manager(self):
        """
        With nobody listening, an announcement answers an error; it never
        fails.
        """
        yield self.port.stopListening()
        answer = yield Announcer(reactor, self.data_dir).announce("AAAAAAAAAAAA")
        self.assertTrue(answer.startswith("error "), answer)

    @inlineCallbacks
    def test_commit_does_not_wait_for_the_answer(self):
        """
        A receiver's staged message is committed (and the 250 can go)
        before the queue manager has answered its announcement.
        """
        store = QueueStore(os.path.join(self.data_dir, "queue"))
        pool = ThreadPool(1, 1)
        pool.start()
        self.addCleanup(pool.stop)
        handoff = QueueHandoff(store, self.data_dir, reactor, pool)
        handoff.announcer = self.announcer
        envelope = Envelope("AB12CD34EF56", parse_address("alice@localhost"),
                            received_at=0, client="receiver")
        envelope.remote = [parse_address("carol@remote.test")]
        spool = MessageSpool(short_tempdir(self))
        spool.write(b"Subject: x\n\nx\n")
        staged = yield handoff.prepare(envelope, spool)
        yield staged.commit()
        self.assertEqual(store.committed_ids(), ["AB12CD34EF56"])
        yield self.wait_for_lines(1)
        self.assertFalse(staged.announced.called)
        self.factory.connections[0].sendLine(b"ok")
        yield staged.announced


class ControlSocketPathTests(TestCase):
    @inlineCallbacks
    def test_colon_in_data_directory(self):
        """
        A data directory whose path holds ':' (endpoint syntax) still gets
        its control socket, which answers.
        """
        from mailstack.queue.control import send_command

        data_dir = os.path.join(short_tempdir(self), "a:b")
        yield start_server(self, smtp=LISTEN, data_dir=data_dir)
        answer = yield in_thread(send_command, data_dir, "flush")
        self.assertEqual(answer, "ok 0")
