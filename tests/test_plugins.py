"""
The plugin API end to end: a third party's filter and outbound transform in
a mailstack/plugins/ directory outside the package, against real servers
with smtplib: verdicts (header fields, Junk folder, discard), failures and
time limits tempfail, filters on locally injected mail, transforms on
outbound mail only, [plugins.NAME] options, and `mailstack plugins`.
"""

import imaplib
import os
import smtplib
import subprocess
import sys
import textwrap

from twisted.internet.defer import inlineCallbacks
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from mailstack import plugins
from mailstack.tap import Options
from tests.support import (
    add_user, client_context, in_thread, maildir_files, read_messages, short_tempdir,
    smtp_session, start_server,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "tcp:0:interface=127.0.0.1"

THIRD_PARTY = '''
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.plugin import IPlugin
from zope.interface import implementer

from mailstack.interfaces import (
    IMessageFilterFactory, IOutboundTransform, IOutboundTransformFactory,
)
from mailstack.plugin import Verdict, check_options
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply


class Scanner(MessageFilter):
    name = "scanner"
    timeout = 0.5

    def connect(self, session):
        if session.peer_host == "127.0.0.2":
            raise ValueError("cannot check this client")

    async def data(self, session, envelope, spool):
        body = await deferToThread(spool.read)  # CPU work off the reactor
        fields = [f"X-Scanned: yes; origin={session.service}"]
        if b"CRASH" in body:
            raise RuntimeError("the scanner broke")
        if b"HANG" in body:
            await Deferred()  # never answers
        if b"DISCARD" in body:
            return Verdict(discard=True, reason="a test")
        if b"REJECT" in body:
            return Reply(550, "5.7.1", "rejected by the scanner")
        if b"SPAM" in body:
            return Verdict(headers=fields + ["X-Spam: yes"], folder="Junk")
        forged = [i for i, f in enumerate(spool.header_fields())
                  if f.lower().startswith(b"authentication-results: mx.test")]
        return Verdict(headers=fields + ["Authentication-Results: mx.test; none"],
                       remove=tuple(forged))


@implementer(IPlugin, IMessageFilterFactory)
class ScannerFactory:
    name = "scanner"
    description = "a third party's content scanner, for the tests"

    def build(self, config, reactor):
        return Scanner()


@implementer(IOutboundTransform)
class Signer:
    name = "signer"

    def __init__(self, selector):
        self.selector = selector

    def transform(self, envelope, spool):
        return [f"X-Signed: s={self.selector}; origin={envelope.origin}"]


@implementer(IPlugin, IOutboundTransformFactory)
class SignerFactory:
    name = "signer"
    description = "a third party's signer, for the tests"
    options = {"selector": "default"}

    def configure(self, options):
        self.options = check_options(self.name, options, {"selector": (str, "default")})

    def build(self, config, reactor):
        return Signer(self.options["selector"])


scanner = ScannerFactory()
signer = SignerFactory()
'''


def install_third_party(testcase):
    root = testcase.mktemp()
    directory = os.path.join(root, "mailstack", "plugins")
    os.makedirs(directory)
    with open(os.path.join(directory, "thirdparty_plugin.py"), "w") as f:
        f.write(textwrap.dedent(THIRD_PARTY))
    plugins.__path__.append(directory)
    testcase.addCleanup(plugins.__path__.remove, directory)
    testcase.addCleanup(sys.modules.pop, "mailstack.plugins.thirdparty_plugin", None)
    return root


def send(port, body, rcpt="alice@localhost"):
    def talk(client):
        client.ehlo("client.test")
        try:
            client.sendmail("x@remote.test", [rcpt], b"Subject: t\r\n\r\n" + body + b"\r\n")
            return 250, b""
        except smtplib.SMTPDataError as e:
            return e.smtp_code, e.smtp_error
    return in_thread(smtp_session, port, talk)


class VerdictTests(TestCase):
    @inlineCallbacks
    def setUp(self):
        install_third_party(self)
        # The third-party scanner plays an Authentication-Results filter with
        # our authserv-id: the built-in one (tests.test_mailauth_wiring) is off.
        self.server = yield start_server(self, smtp=LISTEN, submission=LISTEN, imap=LISTEN,
                                         filter=["scanner"], transform=["signer"],
                                         auth_checks="no")
        add_user(self.server, "alice@localhost", "alice-pw")
        self.port = self.server.ports["smtp"]

    @inlineCallbacks
    def test_headers_prepended_in_order(self):
        """
        The verdict's header fields go on top, above our Received, in order;
        inbound mail for a local user is not transformed.
        """
        result = yield send(self.port, b"hello")
        self.assertEqual(result[0], 250)
        [message] = read_messages(self.server, "alice@localhost")
        body = message.split(b"\n\n", 1)[0]
        lines = body.split(b"\n")
        self.assertEqual(lines[2], b"X-Scanned: yes; origin=smtp")
        self.assertEqual(lines[3], b"Authentication-Results: mx.test; none")
        self.assertTrue(lines[4].startswith(b"Received: from client.test"))
        self.assertNotIn(b"X-Signed", message)

    @inlineCallbacks
    def test_forged_fields_removed(self):
        """
        A verdict removes received fields (a forged Authentication-Results
        with our authserv-id, folded) and adds its own; others stay; the
        Maildir name's size is the stored size.
        """
        def talk(client):
            client.ehlo("client.test")
            client.sendmail("x@remote.test", ["alice@localhost"], (
                b"Authentication-Results: mx.test; dkim=pass\r\n\t(forged)\r\n"
                b"Subject: t\r\nAuthentication-Results: other.test; spf=fail\r\n"
                b"authentication-results: MX.test; spf=pass\r\n\r\nbody\r\n"))

        yield in_thread(smtp_session, self.port, talk)
        [path] = maildir_files(self.server, "alice@localhost")
        with open(path, "rb") as f:
            message = f.read()
        self.assertNotIn(b"forged", message)
        self.assertNotIn(b"spf=pass", message)
        self.assertEqual(message.count(b"Authentication-Results: mx.test; none\n"), 1)
        self.assertIn(b"\nSubject: t\nAuthentication-Results: other.test; spf=fail\n\nbody\n",
                      message)
        self.assertIn(f",S={len(message)},".encode(), os.path.basename(path).encode())

    @inlineCallbacks
    def test_junk_folder(self):
        result = yield send(self.port, b"SPAM")
        self.assertEqual(result[0], 250)
        self.assertEqual(read_messages(self.server, "alice@localhost"), [])
        junk = os.path.join(self.server.data_dir, "mail", "localhost", "alice", ".Junk")
        [name] = os.listdir(os.path.join(junk, "new"))
        with open(os.path.join(junk, "new", name), "rb") as f:
            message = f.read()
        self.assertIn(b"X-Spam: yes\n", message)
        self.assertTrue(os.path.exists(os.path.join(junk, "maildirfolder")))
        context = client_context(self.server)

        def imap():
            client = imaplib.IMAP4("localhost", self.server.ports["imap"], timeout=30)
            try:
                client.starttls(ssl_context=context)
                client.login("alice@localhost", "alice-pw")
                typ, data = client.select("Junk")
                return typ, int(data[0])
            finally:
                client.logout()

        self.assertEqual((yield in_thread(imap)), ("OK", 1))

    @inlineCallbacks
    def test_discard_and_refusal(self):
        discarded = yield send(self.port, b"DISCARD")
        refused = yield send(self.port, b"REJECT")
        self.assertEqual(discarded[0], 250)
        self.assertEqual(refused, (550, b"5.7.1 rejected by the scanner"))
        self.assertEqual(maildir_files(self.server, "alice@localhost"), [])

    @inlineCallbacks
    def test_raise_and_timeout_tempfail(self):
        """
        A filter that raises or does not answer in time gets 451 4.7.1 (no
        exception text), the traceback is logged, and the server goes on.
        """
        crashed = yield send(self.port, b"CRASH")
        hung = yield send(self.port, b"HANG")
        self.assertEqual(crashed[0], 451)
        self.assertTrue(crashed[1].startswith(b"4.7.1"))
        self.assertNotIn(b"broke", crashed[1])
        self.assertEqual(hung[0], 451)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        ok = yield send(self.port, b"fine")
        self.assertEqual(ok[0], 250)
        self.assertEqual(len(read_messages(self.server, "alice@localhost")), 1)

    @inlineCallbacks
    def test_failure_at_connect_is_421(self):
        def connect():
            try:
                smtplib.SMTP("127.0.0.1", self.port, timeout=30,
                             source_address=("127.0.0.2", 0))
            except smtplib.SMTPConnectError as e:
                return e.smtp_code, e.smtp_error
            return None

        refused = yield in_thread(connect)
        self.assertEqual(refused, (421, b"4.7.1 Error: the connection could not be checked, "
                                        b"try again later"))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)

    @inlineCallbacks
    def test_submission_is_transformed_once(self):
        """
        Mail a local user submits is filtered (origin submission) and
        transformed once, its field on top.
        """
        context = client_context(self.server)

        def talk(client):
            client.ehlo("client.test")
            client.starttls(context=context)
            client.ehlo("client.test")
            client.login("alice@localhost", "alice-pw")
            client.sendmail("alice@localhost", ["alice@localhost"],
                            b"Subject: mine\r\n\r\nhello\r\n")

        yield in_thread(smtp_session, self.server.ports["submission"], talk,
                        host="localhost")
        [message] = read_messages(self.server, "alice@localhost")
        head = message.split(b"\n\n", 1)[0].split(b"\n")
        self.assertEqual(head[2], b"X-Signed: s=default; origin=submission")
        self.assertEqual(head[3], b"X-Scanned: yes; origin=submission")
        self.assertEqual(message.count(b"X-Signed"), 1)

    @inlineCallbacks
    def test_injected_mail_is_filtered(self):
        """
        Mail from `mailstack sendmail` goes through the filters (origin
        local) and the transform; a 5xx verdict moves the file aside.
        """
        data_dir = self.server.data_dir
        for body in (b"Subject: a\n\nfine\n", b"Subject: b\n\nREJECT\n"):
            result = yield in_thread(mailstack, "--data-dir", data_dir, "sendmail",
                                     "alice@localhost", stdin=body)
            self.assertEqual(result.returncode, 0, result.stderr)
        yield self.server.pickup.poke()
        [message] = read_messages(self.server, "alice@localhost")
        self.assertIn(b"X-Scanned: yes; origin=local\n", message)
        self.assertIn(b"X-Signed: s=default; origin=local\n", message)
        left = os.listdir(os.path.join(data_dir, "maildrop"))
        self.assertEqual(len(left), 1)
        self.assertTrue(left[0].startswith(".rejected-"))


def mailstack(*args, stdin=b"", extra_path=None):
    path = ROOT if extra_path is None else f"{ROOT}:{extra_path}"
    environment = dict(os.environ, PYTHONPATH=path)
    return subprocess.run([sys.executable, "-m", "mailstack", *args], input=stdin,
                          capture_output=True, env=environment, timeout=60)


class ConfigurationTests(TestCase):
    def write_config(self, text):
        path = os.path.join(short_tempdir(self), "mailstack.toml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(text))
        return path

    def test_options_reach_the_plugin(self):
        install_third_party(self)
        path = self.write_config("""
            transform = ["signer"]
            [plugins.signer]
            selector = "2026"
        """)
        options = Options()
        options.parseOptions(["--config", path])
        self.assertEqual(options.config.plugins, {"signer": {"selector": "2026"}})

    def test_unknown_option_is_an_error_naming_it(self):
        install_third_party(self)
        path = self.write_config("""
            transform = ["signer"]
            [plugins.signer]
            selectr = "2026"
        """)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("[plugins.signer]", str(error))
        self.assertIn("selectr", str(error))

    def test_table_for_no_plugin_is_an_error(self):
        path = self.write_config("""
            [plugins.nosuch]
            x = 1
        """)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("nosuch", str(error))

    def test_receivers_get_the_plugins(self):
        """
        --receivers processes rebuild their configuration from what the
        main process sends: the plugins and their options are in it.
        """
        import json

        from mailstack.config import build_config
        from mailstack.receivers import receiver_settings
        path = self.write_config("""
            domain = ["example.org"]
            filter = ["greylist", "rate-limit"]
            transform = ["signer"]
            delivery = ["example.org=lmtp", "bob@example.org=maildir"]
            user-db = "sqlite"
            [plugins.rate-limit]
            network-messages = 5
            [plugins.lmtp]
            server = "127.0.0.1:24"
        """)
        config = build_config({}, path)
        sent = json.loads(json.dumps(receiver_settings(config, 2, 1)))
        again = build_config(sent["options"])
        for name in ("filter", "transform", "delivery", "user_db", "plugins", "domain"):
            self.assertEqual(getattr(again, name), getattr(config, name), name)

    def test_delivery_for_a_domain_not_ours(self):
        path = self.write_config("""
            domain = ["example.org"]
            delivery = ["example.net=lmtp"]
        """)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("example.net is not a local domain", str(error))

    def test_pipe_needs_a_command(self):
        path = self.write_config("""
            delivery = ["pipe"]
        """)
        error = self.assertRaises(usage.UsageError, Options().parseOptions, ["--config", path])
        self.assertIn("command is required", str(error))

    def test_plugins_command(self):
        """
        `mailstack plugins` lists each installed plugin on one line, with
        the third party's, and which are enabled.
        """
        root = install_third_party(self)
        path = self.write_config("""
            filter = ["greylist"]
            transform = ["signer"]
            delivery = ["example.test=lmtp"]
        """)
        result = mailstack("--config", path, "plugins", extra_path=root)
        self.assertEqual(result.returncode, 0, result.stderr)
        lines = {tuple(line.split()[:3]) for line in result.stdout.decode().splitlines()}
        self.assertIn(("filter", "greylist", "enabled"), lines)
        self.assertIn(("filter", "scanner", "disabled"), lines)
        self.assertIn(("transform", "signer", "enabled"), lines)
        self.assertIn(("delivery", "lmtp", "enabled"), lines)
        self.assertIn(("delivery", "maildir", "enabled"), lines)
        self.assertIn(("delivery", "pipe", "disabled"), lines)


class SpoolRemovalTests(SynchronousTestCase):
    """
    MessageSpool.remove_header_fields, in memory and spilled to a file
    read in chunks smaller than a field.
    """

    MESSAGE = (b"Received: x\nAuthentication-Results: mx.test; spf=pass\n\tdkim=pass\n"
               b"Subject: hi\nAuthentication-Results: other; x\n\nbody\nA: b\n")

    def spool(self, spill):
        from mailstack.message import MessageSpool
        spool = MessageSpool(short_tempdir(self))
        if spill:
            spool.memory_limit = 10
            spool.chunk_size = 7
        spool.write(self.MESSAGE[:20])
        spool.write(self.MESSAGE[20:])
        spool.add_header(b"Trace: 1\n")
        spool.prepend_header(b"Top: 1\n")
        self.addCleanup(spool.close)
        return spool

    def test_remove(self):
        for spill in (False, True):
            spool = self.spool(spill)
            self.assertEqual(len(spool.header_fields()), 4)
            spool.remove_header_fields([1])
            self.assertEqual(spool.header_names(),
                             ["received", "subject", "authentication-results"])
            spool.remove_header_fields([2])
            content = spool.read()
            self.assertEqual(content, b"Top: 1\nTrace: 1\nReceived: x\nSubject: hi\n\n"
                                      b"body\nA: b\n")
            self.assertEqual((spool.size, spool.lines), (len(content), content.count(b"\n")))
            self.assertRaises(IndexError, spool.remove_header_fields, [2])
            self.assertEqual(spool.read(), content)

    def test_header_without_body(self):
        """
        A message that is all header (no empty line, no body) ends with
        its last field, which is a field like any other: a forged
        C{Authentication-Results} there must be found to be removed.
        """
        from mailstack.message import MessageSpool
        spool = MessageSpool()
        spool.write(b"Subject: hi\nAuthentication-Results: mx.test; dmarc=pass\n")
        self.assertEqual(spool.header_names(), ["subject", "authentication-results"])
        spool.remove_header_fields([1])
        self.assertEqual(spool.read(), b"Subject: hi\n")

    def test_header_cut_at_limit(self):
        """
        Past the head limit the last (maybe partial) field is left out.
        """
        from mailstack.message import MessageSpool
        spool = MessageSpool()
        first = b"Subject: hi\nX-Long: " + b"a" * 40 + b"\n"
        spool.head_limit = len(first)  # cut at a line end: a continuation follows
        spool.write(first + b" more\n")
        spool.write(b"\nbody\n")
        self.assertEqual([f[:8] for f in spool.header_fields()], [b"Subject:"])

    def test_no_header(self):
        from mailstack.message import MessageSpool
        spool = MessageSpool()
        spool.write(b"\nA: not a header\n")
        self.assertEqual(spool.header_fields(), [])
