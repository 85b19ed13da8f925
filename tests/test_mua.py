"""
The MUA side end to end: C{mailstack send} and C{mailstack sendmail} run as
a user runs them (subprocesses) against a real server on 127.0.0.1.
"""

import email
import email.policy
import os
import subprocess
import sys

from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack.mua.sendmail import parse_args, prepare
from tests.support import add_user, in_thread, read_messages, short_tempdir, start_server

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "tcp:0:interface=127.0.0.1"


def mailstack(*args, stdin=b"", env=None):
    environment = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, "-m", "mailstack", *args], input=stdin,
                          capture_output=True, env=environment, timeout=60)


class SendTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        self.server = yield start_server(self, submission=LISTEN, submissions=LISTEN)
        add_user(self.server, "alice@localhost", "alice-pw")
        add_user(self.server, "bob@example.test", "bob-pw")
        self.cafile = self.server.tls.cert_path
        self.attachment = os.path.join(short_tempdir(self), "report.pdf")
        with open(self.attachment, "wb") as f:
            f.write(b"%PDF-1.4 binary \x00\xff data")

    def send(self, *args, password="alice-pw", port="submission"):
        return in_thread(mailstack, "send", "--server",
                         f"localhost:{self.server.ports[port]}", "--from", "alice@localhost",
                         *args, env={"MAILSTACK_PASSWORD": password})

    @inlineCallbacks
    def test_send_with_attachment(self):
        """
        A message with a UTF-8 subject, a body, an attachment and a Bcc is
        delivered and parses back to the same parts; Bcc is not in it.
        """
        result = yield self.send("--cafile", self.cafile, "--to", "bob@example.test",
                                 "--bcc", "alice@localhost", "--subject", "Grüße, ünïcode",
                                 "--attach", self.attachment, "--header", "X-Tag: t1",
                                 "--body", "Hello Bob,\nsee attached.")
        self.assertEqual(result.returncode, 0, result.stderr)
        [raw] = read_messages(self.server, "bob@example.test")
        message = email.message_from_bytes(raw, policy=email.policy.default)
        self.assertEqual(message["Subject"], "Grüße, ünïcode")
        self.assertEqual(message["X-Tag"], "t1")
        self.assertIsNone(message["Bcc"])
        self.assertNotIn(b"Bcc", raw)
        body, attachment = message.iter_parts()
        self.assertEqual(body.get_content(), "Hello Bob,\nsee attached.\n")
        self.assertEqual(attachment.get_filename(), "report.pdf")
        self.assertEqual(attachment.get_content_type(), "application/pdf")
        self.assertEqual(attachment.get_content(), b"%PDF-1.4 binary \x00\xff data")
        self.assertEqual(len(read_messages(self.server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_implicit_tls(self):
        result = yield self.send("--cafile", self.cafile, "--tls", "--to", "bob@example.test",
                                 "--body", "x", port="submissions")
        self.assertEqual(result.returncode, 0, result.stderr)

    @inlineCallbacks
    def test_failures(self):
        """
        A wrong password, a certificate that does not verify and a refused
        recipient each exit non-zero, distinctly, quoting the server.
        """
        wrong = yield self.send("--cafile", self.cafile, "--to", "bob@example.test",
                                "--body", "x", password="nope")
        self.assertEqual(wrong.returncode, 77)
        self.assertIn(b"535 5.7.8", wrong.stderr)
        untrusted = yield self.send("--to", "bob@example.test", "--body", "x")
        self.assertEqual(untrusted.returncode, 76)
        self.assertIn(b"certificate", untrusted.stderr)
        refused = yield self.send("--cafile", self.cafile, "--to", "nobody@localhost",
                                  "--body", "x")
        self.assertEqual(refused.returncode, 69)
        self.assertIn(b"550 5.1.1", refused.stderr)
        foreign = yield self.send("--cafile", self.cafile, "--to", "bob@example.test",
                                  "--body", "x", "--user", "bob@example.test",
                                  password="bob-pw")
        self.assertEqual(foreign.returncode, 69)
        self.assertIn(b"553 5.7.1", foreign.stderr)
        self.assertEqual(read_messages(self.server, "bob@example.test"), [])

    @inlineCallbacks
    def test_insecure_is_explicit(self):
        """
        Only --insecure skips verification.
        """
        result = yield self.send("--insecure", "--to", "bob@example.test", "--body", "x")
        self.assertEqual(result.returncode, 0, result.stderr)

    def test_dry_run(self):
        result = mailstack("send", "--from", "a@x.test", "--to", "b@y.test", "--subject", "é",
                           "--dry-run", stdin=b"body from stdin\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn(b"Subject: =?utf-8?q?=C3=A9?=", result.stdout)
        self.assertIn(b"body from stdin", result.stdout)

    def test_line_breaks_in_fields_are_bad_input(self):
        """
        A CR or LF in --subject, --from, --to or a --header value (a field
        injection such as a hidden Bcc) is exit 65 with one line naming
        the field, never a traceback.
        """
        for args in (("--subject", "hi\r\nBcc: evil@x.test"),
                     ("--header", "X-A: 1\rBcc: evil@x.test"),
                     ("--to", "b@y.test\nBcc: evil@x.test")):
            result = mailstack("send", "--from", "a@x.test", "--to", "b@y.test", *args,
                               "--body", "x", "--dry-run")
            self.assertEqual(result.returncode, 65, (args, result.stderr))
            self.assertNotIn(b"Traceback", result.stderr)
            self.assertTrue(result.stderr.startswith(b"mailstack: bad "), result.stderr)
            self.assertEqual(result.stdout, b"")


class SendmailTests(TestCase):
    @inlineCallbacks
    def test_injection(self):
        """
        C{sendmail -t} delivers to a local user with Bcc stripped; with -i a
        line holding one dot is kept; mail injected while the server is
        stopped is delivered when it starts.
        """
        data_dir = short_tempdir(self)
        message = (b"To: Alice <alice@localhost>\nBcc: bob@example.test\nSubject: cron\n\n"
                   b"line 1\n.\nline 3\n")
        result = yield in_thread(mailstack, "--data-dir", data_dir, "sendmail", "-t", "-i",
                                 "-odi", "-oem", stdin=message)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(len(os.listdir(os.path.join(data_dir, "maildrop"))), 1)
        server = yield start_server(self, data_dir=data_dir, smtp=LISTEN)
        add_user(server, "alice@localhost")
        add_user(server, "bob@example.test")
        yield server.pickup.poke()
        [delivered] = read_messages(server, "alice@localhost")
        self.assertNotIn(b"Bcc", delivered)
        self.assertTrue(delivered.endswith(b"\n\nline 1\n.\nline 3\n"))
        self.assertIn(b"Message-ID: <", delivered)
        self.assertEqual(len(read_messages(server, "bob@example.test")), 1)
        self.assertEqual(os.listdir(os.path.join(data_dir, "maildrop")), [])
        # While it runs, a new injection is delivered at once (control socket).
        result = yield in_thread(mailstack, "--data-dir", data_dir, "sendmail",
                                 "alice@localhost", stdin=b"Subject: two\n\nx\n.\nnot kept\n")
        self.assertEqual(result.returncode, 0, result.stderr)
        # Whether the control socket's poke is still running or done, a pick-up
        # that starts or ends after the file was written has delivered it.
        yield server.pickup.poke()
        second = [m for m in read_messages(server, "alice@localhost") if b"two" in m]
        self.assertEqual(len(second), 1)
        self.assertTrue(second[0].endswith(b"\n\nx\n"))

    @inlineCallbacks
    def test_unknown_local_recipient_bounces_to_sender(self):
        """
        C{sendmail} to a local user that does not exist (a typo in a cron
        MAILTO) delivers to the others and sends the sender an RFC 3464
        report naming the unknown one with 5.1.1 (it was only logged, and
        the mail went nowhere without a word); the report is from <>.
        """
        data_dir = short_tempdir(self)
        server = yield start_server(self, data_dir=data_dir, smtp=LISTEN)
        add_user(server, "alice@localhost")
        add_user(server, "bob@localhost")
        message = b"Subject: nightly\n\nall good\n"
        result = yield in_thread(mailstack, "--data-dir", data_dir, "sendmail", "-f",
                                 "alice@localhost", "bob@localhost", "bbo@localhost",
                                 stdin=message)
        self.assertEqual(result.returncode, 0, result.stderr)
        yield server.pickup.poke()
        [delivered] = read_messages(server, "bob@localhost")
        self.assertIn(b"Subject: nightly", delivered)
        [bounce] = read_messages(server, "alice@localhost")
        self.assertIn(b"Return-Path: <>\n", bounce)
        report = email.message_from_bytes(bounce, policy=email.policy.default)
        self.assertEqual(report.get_content_type(), "multipart/report")
        status = list(report.iter_parts())[1].get_payload()[1]
        self.assertEqual((status["Final-Recipient"], status["Action"], status["Status"]),
                         ("rfc822; bbo@localhost", "failed", "5.1.1"))
        self.assertIn("Subject: nightly", list(report.iter_parts())[2].get_content())


class SendmailArgumentTests(SynchronousTestCase):
    def test_flags(self):
        args = parse_args(["-oi", "-f", "bounce@x.test", "-Fname", "-odi", "-oem", "-v",
                           "a@x.test", "--", "-b@x.test"])
        self.assertEqual((args.ignore_dots, args.sender, args.full_name, args.recipients),
                         (True, "bounce@x.test", "name", ["a@x.test", "-b@x.test"]))

    def test_prepare_adds_headers(self):
        args = parse_args(["-F", "Cron Daemon", "a@x.test"])
        sender, rcpts, content = prepare(args, b"Subject: s\n\nbody\n", "mx.test", login="root")
        self.assertEqual((sender, rcpts), ("root@mx.test", ["a@x.test"]))
        self.assertIn(b"From: Cron Daemon <root@mx.test>\n", content)
        self.assertIn(b"Date: ", content)
        self.assertTrue(content.endswith(b"Subject: s\n\nbody\n"))


class SendProfileTests(SynchronousTestCase):
    """
    C{mailstack send} takes defaults from a profile in
    C{~/.config/mailstack/client.toml}; a value of the wrong TOML type is a
    usage error naming the key, not silently turned into a string.
    """

    def profile(self, text):
        import io

        from mailstack import cli

        home = self.mktemp()
        os.makedirs(os.path.join(home, "mailstack"))
        with open(os.path.join(home, "mailstack", "client.toml"), "w") as f:
            f.write(text)
        before = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = home
        self.addCleanup(lambda: os.environ.pop("XDG_CONFIG_HOME") if before is None
                        else os.environ.__setitem__("XDG_CONFIG_HOME", before))
        out = io.StringIO()
        cli.run(["send", "--to", "b@y.test", "--dry-run"], io.StringIO("body\n"), out)
        return out.getvalue()

    def test_string_value(self):
        self.assertIn("From: alice@x.test", self.profile('[default]\nfrom = "alice@x.test"\n'))

    def test_wrong_type(self):
        from mailstack.cli import EX_USAGE, CommandError

        e = self.assertRaises(CommandError, self.profile, "[default]\nfrom = 5\n")
        self.assertEqual(e.status, EX_USAGE)
        self.assertIn("profile key from: a string is needed, not 5", str(e))
