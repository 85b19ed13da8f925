"""
C{sendmail} for every local user: cron's exact command line, a non-root
user's submission (with the server down and up, the submitter taken from
the kernel), C{-bs}, C{-bp}/C{mailq}, and the maildrop's defences.
"""

import os
import pwd
import subprocess
import sys
import tempfile
import time

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.address import parse_address
from mailstack.message import Envelope, MessageSpool
from mailstack.delivery.maildrop import read_drop
from mailstack.mua.sendmail import SendmailError, parse_args
from mailstack.queue.records import new_record
from mailstack.queue.store import QueueStore
from tests.processes import ROOT, Twistd
from tests.support import (
    add_user,
    in_thread,
    read_messages,
    short_tempdir,
    start_server,
)
from tests.test_privileges import public_tempdir, service_user

LISTEN = "tcp:0:interface=127.0.0.1"
# Modules a command run under os.setuid needs: after the switch the test
# user may not be able to read the interpreter's library (here under /root).
PRELOAD = ("mailstack.cli, mailstack.mailauth.commands, mailstack.mailauth.tlsrpt_cli, "
           "mailstack.mua.sendmail, "
           "mailstack.mua.stdin_smtp, "
           "mailstack.config, email.parser, email.policy, email.utils, email.feedparser, "
           "email.message, email._parseaddr, json, secrets, socket, stat, getpass, argparse, "
           "tomllib, pwd, random, uuid, encodings.idna")


def sendmail(args, stdin=b"", data_dir=None, user=None, argv0="/usr/sbin/sendmail", env=None):
    """
    Run the command installed as C{argv0} (sendmail, mailq) with C{args},
    as root or as C{user} (a name: C{os.setuid} in the child).
    """
    env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    if data_dir is not None:
        env["MAILSTACK_DATA_DIR"] = data_dir
    drop = ""
    if user is not None:
        entry = pwd.getpwnam(user)
        env.update(LOGNAME=user, USER=user, HOME="/")
        drop = (f"os.setgroups([]); os.setgid({entry.pw_gid}); os.setuid({entry.pw_uid}); ")
    code = (f"import os, sys; import {PRELOAD}; {drop}"
            f"sys.argv[0] = {argv0!r}; mailstack.cli.main()")
    return subprocess.run([sys.executable, "-c", code, *args], input=stdin,
                          capture_output=True, env=env, timeout=60, cwd="/", check=False)


def nobody(testcase):
    if os.geteuid() != 0:
        raise testcase.skipTest("needs root (to act as other users)")
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        raise testcase.skipTest("no user nobody") from None


CRON_MESSAGE = (b"From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@host> backup\n"
                b"MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\n"
                b"Content-Transfer-Encoding: 8bit\n\nbackup done\n.\nstill the body\n")


class CronTests(TestCase):
    @inlineCallbacks
    def test_cron_command_line(self):
        """
        Debian cron's exact call, C{sendmail -FCronDaemon -i -B8BITMIME -oem
        root}, is accepted; the bare name C{root} gets the first local
        domain; the message (with its lone dot line, -i) is delivered with
        a Received header naming the submitting userid.
        """
        data_dir = short_tempdir(self)
        server = yield start_server(self, data_dir=data_dir, smtp=LISTEN)
        add_user(server, "root@localhost")
        result = yield in_thread(sendmail, ["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"],
                                 CRON_MESSAGE, data_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        yield server.pickup.poke()
        [message] = read_messages(server, "root@localhost")
        self.assertTrue(message.endswith(b"\n\nbackup done\n.\nstill the body\n"), message)
        uid = os.getuid()
        self.assertTrue(message.startswith(b"Return-Path: <"), message)
        self.assertRegex(message, rb"\nReceived: by mx\.test \(mailstack, from userid "
                         + str(uid).encode() + rb"\)\n\tid [0-9A-F]+; ")
        self.assertIn(b"\nTo: root\n", message)

    def test_bare_names_and_flags(self):
        """
        Bare local names get @domain (sender and recipients, also with -t);
        -B, -N, -R, -V, -X, -O, -bm are accepted.
        """
        from mailstack.mua.sendmail import prepare
        args = parse_args(["-B8BITMIME", "-N", "never", "-R", "hdrs", "-V", "x", "-Xlog",
                           "-O", "x=y", "-bm", "-f", "backup", "-t", "alice"])
        sender, rcpts, _content = prepare(args, b"To: bob, carol@x.test\n\nhi\n", "example.org",
                                         login="root")
        self.assertEqual(sender, "backup@example.org")
        self.assertEqual(rcpts, ["alice@example.org", "bob@example.org", "carol@x.test"])
        with self.assertRaises(SendmailError):
            parse_args(["-bd"])


class NonRootTests(TestCase):
    @inlineCallbacks
    def test_any_user_submits_server_down_and_up(self):
        """
        With the server (running as its own user) stopped, a non-root user
        (nobody) submits; the file waits in the maildrop and is delivered
        when the server starts, with that user's uid from the kernel (the
        file's owner); while it runs, the next submission is delivered at
        once through pickup.sock.  The user cannot list the maildrop.
        """
        who = nobody(self)
        uid, gid = service_user(self)
        data = os.path.join((yield in_thread(public_tempdir, self)), "data")
        args = ["--data-dir", data, "--hostname", "mx.test", "--smtp", LISTEN,
                "--submission", "none", "--submissions", "none", "--imap", "none",
                "--imaps", "none", "--pop3", "none"]
        drop_options = ["--uid", str(uid), "--gid", str(gid)]
        first = Twistd(args, drop_options)
        yield in_thread(first.wait_for, "pickup listening on")
        first.stop()
        # As root, a mailstack command (becomes the data directory's owner).
        result = yield in_thread(subprocess.run, [
            sys.executable, "-m", "mailstack", "--data-dir", data, "user", "add",
            "alice@localhost"], input=b"pw\n", capture_output=True,
            env=dict(os.environ, PYTHONPATH=ROOT), cwd="/")
        self.assertEqual(result.returncode, 0, result.stderr)

        # A forged uid in the content is ignored: the file's owner counts.
        result = yield in_thread(sendmail, ["-f", "someone@localhost", "alice"],
                                 b"Subject: while down\n\nhello\n", data, "nobody")
        self.assertEqual(result.returncode, 0, result.stderr)
        [name] = [n for n in os.listdir(os.path.join(data, "maildrop"))]
        self.assertEqual(os.stat(os.path.join(data, "maildrop", name)).st_uid, who.pw_uid)
        listing = yield in_thread(subprocess.run, [
            sys.executable, "-c", (f"import os; os.setgid({who.pw_gid}); os.setuid("
            f"{who.pw_uid}); os.listdir({os.path.join(data, 'maildrop')!r})")],
            capture_output=True)
        self.assertIn(b"PermissionError", listing.stderr)

        server = Twistd(args, drop_options)
        self.addCleanup(server.stop)
        inbox = os.path.join(data, "mail", "localhost", "alice", "new")
        yield in_thread(server.wait_for, r"to=<alice@localhost>.*status=sent")
        [path] = [os.path.join(inbox, n) for n in os.listdir(inbox)]
        with open(path, "rb") as f:
            message = f.read()
        self.assertIn(f"(mailstack, from userid {who.pw_uid})".encode(), message)
        self.assertIn(b"Return-Path: <someone@localhost>", message)
        server.wait_for(f"local uid={who.pw_uid} user=nobody")

        start = time.monotonic()
        result = yield in_thread(sendmail, ["alice@localhost"], b"Subject: up\n\nagain\n",
                                 data, "nobody")
        self.assertEqual(result.returncode, 0, result.stderr)
        deadline = time.monotonic() + 30
        while len(os.listdir(inbox)) < 2 and time.monotonic() < deadline:
            yield in_thread(time.sleep, 0.05)
        self.assertEqual(len(os.listdir(inbox)), 2)
        # Poked, not found by the minute's scan.
        self.assertLess(time.monotonic() - start, 30)
        self.assertEqual(os.listdir(os.path.join(data, "maildrop")), [])

        # mailq as nobody: refused with a reason; as root: the listing.
        result = yield in_thread(sendmail, [], b"", data, "nobody", argv0="mailq")
        self.assertEqual(result.returncode, 77, result.stderr)
        self.assertIn(b"readable only by root", result.stderr)


class QueueListingTests(TestCase):
    def test_mailq_and_bp(self):
        """
        C{mailq} and C{sendmail -bp} list the queue like C{mailstack queue
        list}, and count mail waiting in the maildrop.
        """
        data_dir = short_tempdir(self)
        store = QueueStore(os.path.join(data_dir, "queue"))
        envelope = Envelope("ABCDEF012345", parse_address("a@localhost"), received_at=0)
        envelope.remote = [parse_address("bob@remote.test")]
        spool = MessageSpool(None)
        spool.write(b"Subject: q\n\nx\n")
        store.add(new_record(envelope, time.time()), spool)
        for argv0, args in (("mailq", []), ("/usr/sbin/sendmail", ["-bp"])):
            result = sendmail(args, b"", data_dir, argv0=argv0)
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertIn(b"ABCDEF012345", result.stdout)
            self.assertIn(b"<bob@remote.test>", result.stdout)
        self.assertEqual(sendmail(["alice@localhost"], b"x\n", data_dir).returncode, 0)
        self.assertIn(b"1 messages in the maildrop", sendmail(["-bp"], b"", data_dir).stdout)


class StdinSMTPTests(TestCase):
    @inlineCallbacks
    def test_bs_dialogue(self):
        """
        C{sendmail -bs} speaks SMTP on standard input: bad commands get
        their codes, each accepted message is queued and delivered.
        """
        data_dir = short_tempdir(self)
        server = yield start_server(self, data_dir=data_dir, smtp=LISTEN)
        add_user(server, "alice@localhost")
        dialogue = (b"MAIL FROM:<a@localhost>\r\nEHLO client\r\nRCPT TO:<alice>\r\n"
                    b"MAIL FROM:<bob>\r\nDATA\r\nRCPT TO:<bad address@>\r\n"
                    b"RCPT TO:<alice@localhost>\r\nDATA\r\nSubject: bs\r\n\r\n..dot\r\n.\r\n"
                    b"XYZZY\r\nQUIT\r\n")
        result = yield in_thread(sendmail, ["-bs"], dialogue, data_dir)
        self.assertEqual(result.returncode, 0, result.stderr)
        codes = [line[:3] for line in result.stdout.split(b"\r\n") if line[3:4] == b" "]
        self.assertEqual(codes, [b"220", b"503", b"250", b"503", b"250", b"503", b"501",
                                 b"250", b"354", b"250", b"502", b"221"])
        yield server.pickup.poke()
        [message] = read_messages(server, "alice@localhost")
        self.assertIn(b"Return-Path: <bob@localhost>", message)
        self.assertTrue(message.endswith(b"\n\n.dot\n"), message)


class MaildropDefenceTests(SynchronousTestCase):
    def test_only_plain_files(self):
        """
        L{read_drop} refuses symbolic links, FIFOs and files with a second
        link (so a user cannot make the server read the users file), and
        returns the owner's uid, ignoring any uid in the content.
        """
        directory = short_tempdir(self)
        secret = os.path.join(directory, "users")
        with open(secret, "w") as f:
            f.write('{"sender": "", "recipients": ["a@b.test"]}\nsecret\n')
        os.symlink(secret, os.path.join(directory, "link"))
        os.link(secret, os.path.join(directory, "hard"))
        os.mkfifo(os.path.join(directory, "fifo"))
        for name in ("link", "hard", "fifo"):
            with self.assertRaises((OSError, ValueError)):
                read_drop(os.path.join(directory, name))
        os.unlink(os.path.join(directory, "hard"))
        plain = os.path.join(directory, "plain")
        with open(plain, "w") as f:
            f.write('{"sender": "", "recipients": ["a@b.test"], "uid": 0, "user": "root"}\n'
                    'x\n')
        os.chown(plain, 12345, 12345) if os.geteuid() == 0 else None
        _sender, rcpts, uid, content = read_drop(plain)
        self.assertEqual((rcpts, uid, content), (["a@b.test"], os.stat(plain).st_uid, b"x\n"))
        with self.assertRaises(ValueError):
            read_drop(plain, max_size=10)


class SystemConfigTests(TestCase):
    def test_user_reads_only_what_it_needs(self):
        """
        A local user's sendmail with MAILSTACK_CONFIG naming the server's
        file works even though that file names a relay password only root
        can read; the bare name gets the file's first domain.
        """
        who = nobody(self)
        base = public_tempdir(self)
        data = os.path.join(base, "data")
        from mailstack.privileges import ensure_layout
        ensure_layout(data)
        secret = tempfile.mkdtemp(prefix="ms-secret-")  # 0700, root's
        self.addCleanup(__import__("shutil").rmtree, secret, True)
        with open(os.path.join(secret, "pw"), "w") as f:
            f.write("pw\n")
        config = os.path.join(base, "mailstack.toml")
        with open(config, "w") as f:
            f.write(f'data-dir = "{data}"\ndomain = ["example.org"]\n'
                    f'relay-auth = ["smarthost.test=me:{secret}/pw"]\n')
        env = {"MAILSTACK_CONFIG": config}
        result = sendmail(["root"], b"Subject: s\n\nx\n", None, "nobody", env=env)
        self.assertEqual(result.returncode, 0, result.stderr)
        [name] = os.listdir(os.path.join(data, "maildrop"))
        sender, rcpts, uid, _ = read_drop(os.path.join(data, "maildrop", name))
        self.assertEqual((sender, rcpts, uid), ("nobody@example.org", ["root@example.org"],
                                                who.pw_uid))


class StaleTemporaryTests(TestCase):
    @inlineCallbacks
    def test_unfinished_submissions_removed_after_a_day(self):
        """
        A temporary maildrop file older than a day (its sendmail died) is
        removed by the pick-up; a younger one is left to its writer.
        """
        data_dir = short_tempdir(self)
        server = yield start_server(self, data_dir=data_dir)
        maildrop = os.path.join(data_dir, "maildrop")
        old, young = os.path.join(maildrop, ".1.tmp"), os.path.join(maildrop, ".2.tmp")
        for path in (old, young):
            with open(path, "w") as f:
                f.write("{")
        os.utime(old, (time.time() - 90000, time.time() - 90000))
        yield server.pickup.poke()  # may be the start-up pick-up, begun before the files
        yield server.pickup.poke()
        self.assertEqual(sorted(os.listdir(maildrop)), [".2.tmp"])
