"""
Running as root then as an unprivileged user (C{twistd --uid/--gid}), from
a fresh data directory, with root's C{mailstack} commands before and after
the start; and a clear fatal error when the data directory is unusable.
"""

import imaplib
import os
import pwd
import smtplib
import ssl
import stat
import subprocess
import sys
import tempfile
import time

from twisted.trial.unittest import SynchronousTestCase

from mailstack import privileges
from mailstack.tls import generate_self_signed
from tests.processes import ROOT, Twistd

TEST_USER = "mailstack-test"


def service_user(testcase):
    """
    The unprivileged test user's (uid, gid), creating it if needed; skips
    when not root.
    """
    if os.geteuid() != 0:
        raise testcase.skipTest("needs root (to drop privileges)")
    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", TEST_USER], check=True, capture_output=True)
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


def public_tempdir(testcase):
    """
    A fresh directory that other users may traverse (mkdtemp's is 0700).
    """
    import shutil
    path = tempfile.mkdtemp(prefix="ms-")
    os.chmod(path, 0o755)
    testcase.addCleanup(shutil.rmtree, path, True)
    return path


def mailstack(*args, stdin=b"", **popen):
    return subprocess.run([sys.executable, "-m", "mailstack", *args], input=stdin,
                          capture_output=True, env=dict(os.environ, PYTHONPATH=ROOT),
                          timeout=60, cwd="/", check=False, **popen)


def wait_for_file(directory, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(directory) and os.listdir(directory):
            return [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
        time.sleep(0.05)
    raise AssertionError(f"nothing arrived in {directory}")


class DropTests(SynchronousTestCase):
    def test_fresh_data_directory_as_root_then_user(self):
        """
        If root runs C{mailstack user add} on a data directory that does not
        exist yet and then starts C{twistd --uid/--gid} on it, the server
        runs as that user and serves: SMTP delivers, IMAP logs in; users
        root adds later, and mail root's cron injects with C{sendmail}, are
        usable by the server; everything belongs to the service user.
        """
        uid, gid = service_user(self)
        data = os.path.join(public_tempdir(self), "data")
        self.assertEqual(mailstack("--data-dir", data, "user", "add", "alice@localhost",
                                   stdin=b"pw1\n").returncode, 0)
        server = Twistd(["--data-dir", data, "--hostname", "mx.test",
                         "--smtp", "tcp:0:interface=127.0.0.1",
                         "--imap", "tcp:0:interface=127.0.0.1", "--submission", "none",
                         "--submissions", "none", "--imaps", "none", "--pop3", "none"],
                        ["--uid", str(uid), "--gid", str(gid)])
        self.addCleanup(server.stop)
        ports = server.ports("smtp", "imap")
        server.wait_for("control listening on")  # bound after the drop
        with open(f"/proc/{server.process.pid}/status") as f:
            status = f.read()
        self.assertIn(f"Uid:\t{uid}\t{uid}\t{uid}\t{uid}", status)

        # root adds a user while it runs: the file stays the server's.
        result = mailstack("--data-dir", data, "user", "add", "bob@localhost", stdin=b"pw2\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        with smtplib.SMTP("127.0.0.1", ports["smtp"], timeout=30) as client:
            refused = client.sendmail("x@remote.test", ["alice@localhost", "bob@localhost"],
                                      b"Subject: hello\r\n\r\nhi\r\n")
        self.assertEqual(refused, {})
        # root's cron: sendmail with a bare name.
        result = mailstack("--data-dir", data, "sendmail", "-FCronDaemon", "-i",
                           "-B8BITMIME", "-oem", "alice", stdin=b"Subject: cron\n\nout\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        inbox = os.path.join(data, "mail", "localhost", "alice", "new")
        deadline = time.monotonic() + 30
        while len(os.listdir(inbox)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(os.listdir(inbox)), 2, server.output())
        wait_for_file(os.path.join(data, "mail", "localhost", "bob", "new"))

        context = ssl.create_default_context(cafile=os.path.join(data, "tls", "cert.pem"))
        with imaplib.IMAP4("localhost", ports["imap"], timeout=30) as imap:
            imap.starttls(context)
            self.assertEqual(imap.login("bob@localhost", "pw2")[0], "OK")
            self.assertEqual(imap.select("INBOX"), ("OK", [b"1"]))

        for name in ("", "users", "users.lock", "control.sock", "pickup.sock", "tls",
                     "tls/key.pem", "maildrop", "queue", "mail/localhost/alice/new"):
            st = os.lstat(os.path.join(data, name))
            self.assertEqual((st.st_uid, st.st_gid), (uid, gid), name)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, "users")).st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(data, "maildrop")).st_mode),
                         0o1733)
        self.assertEqual(stat.S_IMODE(os.stat(data).st_mode), 0o711)
        self.assertNotIn("Permission denied", server.output())

    def test_unusable_file_is_fatal(self):
        """
        If the server, once it is the service user, cannot read a file it
        needs (here a TLS key only root can read), it exits at start with a
        critical log line naming the path, instead of answering 451.
        """
        uid, gid = service_user(self)
        data = os.path.join(public_tempdir(self), "data")
        private = tempfile.mkdtemp(prefix="ms-key-")  # 0700, root's
        self.addCleanup(__import__("shutil").rmtree, private, True)
        cert, key = os.path.join(private, "cert.pem"), os.path.join(private, "key.pem")
        generate_self_signed("mx.test", cert, key)
        server = Twistd(["--data-dir", data, "--smtp", "tcp:0:interface=127.0.0.1",
                         "--tls-cert", cert, "--tls-key", key,
                         "--submission", "none", "--submissions", "none", "--imap", "none",
                         "--imaps", "none", "--pop3", "none"],
                        ["--uid", str(uid), "--gid", str(gid)])
        self.addCleanup(server.stop)
        self.assertNotEqual(server.process.wait(60), 0)
        match = server.wait_for(r"cannot start: (\S+): not readable by uid")
        self.assertEqual(match.group(1), cert)


class LayoutTests(SynchronousTestCase):
    def test_prepare_gives_everything_but_mail_contents(self):
        """
        L{privileges.prepare} hands the data directory's files to the
        service user, and leaves maildrop files with their submitters.
        """
        uid, gid = service_user(self)
        data = os.path.join(public_tempdir(self), "data")
        privileges.ensure_layout(data)
        for name in ("users", "queue/msg/XXXXXXXXXXXX", "tls/key.pem", "maildrop/1ABC"):
            with open(os.path.join(data, name), "w") as f:
                f.write("x")
        changed = privileges.prepare(data, uid, gid)
        self.assertIn(os.path.join(data, "queue/msg/XXXXXXXXXXXX"), changed)
        for name in ("", "users", "queue/msg/XXXXXXXXXXXX", "tls/key.pem", "maildrop"):
            self.assertEqual(os.stat(os.path.join(data, name)).st_uid, uid, name)
        self.assertEqual(os.stat(os.path.join(data, "maildrop/1ABC")).st_uid, 0)
        self.assertEqual(privileges.prepare(data, uid, gid), [])


class CheckTests(SynchronousTestCase):
    def test_unusable_directory_named(self):
        """
        L{privileges.check}, run as a user who cannot use the data
        directory (root's, mode 0700), raises naming that directory.
        """
        uid, gid = service_user(self)
        data = os.path.join(public_tempdir(self), "data")
        privileges.ensure_layout(data)
        os.chmod(data, 0o755)  # root's: readable by the user, not writable
        code = (f"import os, sys; import mailstack.privileges as p, pwd, grp, stat; "
                f"os.setgroups([]); os.setgid({gid}); os.setuid({uid});\n"
                f"try:\n    p.check({data!r})\nexcept p.StartupError as e:\n"
                f"    print(e)\nelse:\n    print('passed')")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                env=dict(os.environ, PYTHONPATH=ROOT), timeout=60, check=False)
        self.assertTrue(result.stdout.startswith(f"{data}: not usable by uid {uid}"),
                        (result.stdout, result.stderr))
        self.assertIn("owner root, mode 0755", result.stdout)
