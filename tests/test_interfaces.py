"""
Every C{@implementer} in mailstack is a contract: each class that declares an
interface is built here (a real instance, on placeholders where the server
would pass its parts) and checked with L{zope.interface.verify.verifyObject}
for every interface it provides, so a missing method, a wrong signature or a
declaration on something that is not a class fails a test.  The plugins and
the README's example plugins are checked the same way, and the completeness
test fails when a new C{@implementer} is added without a check here.
"""

import importlib
import inspect
import os
import sys
import tomllib

from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface import providedBy
from zope.interface.verify import verifyObject

import mailstack
from mailstack import plugins
from tests.test_readme_plugins import readme_blocks


def all_modules():
    """
    Every module of the mailstack package (and its built-in plugins).
    """
    # By file: mailstack.queue is a namespace package, which
    # pkgutil.walk_packages does not enter.
    top = os.path.dirname(os.path.abspath(mailstack.__file__))
    names = []
    for directory, _, files in os.walk(top):
        for file in files:
            if file.endswith(".py") and file != "__main__.py":  # that one runs the CLI
                relative = os.path.relpath(os.path.join(directory, file[:-3]), top)
                name = ".".join(["mailstack"] + relative.split(os.sep))
                names.append(name[:-len(".__init__")] if name.endswith(".__init__") else name)
    return [importlib.import_module(name) for name in sorted(names)]


def declared(obj):
    """
    The interfaces an object's own C{@implementer} declares, or C{()}.
    """
    spec = vars(obj).get("__implemented__") if hasattr(obj, "__dict__") else None
    if spec is None:
        return ()
    if inspect.isclass(obj):
        # (a subclass gets an empty one of its own once implementedBy is asked)
        return tuple(spec.declared)
    return tuple(spec.interfaces())  # @implementer on a function


def declarations():
    """
    ({class defined in mailstack that declares interfaces itself},
    [names of non-classes that carry a declaration]).
    """
    classes, others = set(), []
    for module in all_modules():
        for name, obj in vars(module).items():
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            if not declared(obj):
                continue
            if inspect.isclass(obj):
                classes.add(obj)
            else:
                others.append(f"{module.__name__}.{name}")
    return classes, sorted(others)


def verify_all(testcase, obj):
    """
    verifyObject for every interface C{obj} provides; the interfaces checked.
    """
    interfaces = list(providedBy(obj).flattened())
    checked = []
    for iface in interfaces:
        if iface.__name__ == "Interface":
            continue
        verifyObject(iface, obj)
        checked.append(iface)
    testcase.assertTrue(checked, f"{obj!r} provides no interface")
    return checked


class Placeholder:
    """
    A part the server would pass, never used by the checks.
    """


def instances(testcase):
    """
    {class: a real instance of it} for every class that declares an interface.
    """
    from mailstack.access import imap, mailbox, pop3, realm
    from mailstack.access.folder import Folder, Snapshot
    from mailstack.access.mailbox import Loaded
    from mailstack.access.folder import Entry
    from mailstack.auth import PasswordChecker
    from mailstack.delivery import dispatch, maildir
    from mailstack.logs import NoiseFilter
    from mailstack.metrics import Metrics
    from mailstack.mailauth.checks import AuthChecksFilter
    from mailstack.mailauth.signing import DKIMSigningTransform
    from mailstack.plugins import dnsbl, greylist, lmtp, mailauth, pipe, ratelimit, rspamd, userdb
    from mailstack.queue import handoff, runner, tlspolicy
    from mailstack.queue.store import QueueRecord, QueueStore
    from mailstack.smtp.filters import MessageFilter
    from mailstack.smtp.server import SMTPServer
    from mailstack.tls import ReloadingContextFactory, TLSMaterial, generate_self_signed
    from mailstack.users import AliasMap, UserDatabase

    data = testcase.mktemp()
    os.makedirs(data)
    clock = Clock()
    cert, key = os.path.join(data, "cert.pem"), os.path.join(data, "key.pem")
    generate_self_signed("localhost", cert, key)
    pool = ThreadPool(minthreads=0, maxthreads=1)
    users = UserDatabase(data)
    store = maildir.MaildirStore(os.path.join(data, "mail"))
    writer = maildir.MaildirWriter(store, "localhost")
    agent = maildir.MaildirDeliveryAgent(writer, clock, pool)
    queue_store = QueueStore(os.path.join(data, "queue"))
    queue = runner.OutboundQueue(queue_store, Placeholder(), clock, clock, pool,
                                 schedule=[60.0], lifetime=3600.0, hostname="localhost")
    record = QueueRecord(queue_id="Q1", sender="", arrival=0.0, recipients=[],
                         next_attempt=0.0, received_from=None)
    hand = handoff.QueueHandoff(queue_store, data, clock, pool)
    box = os.path.join(data, "box")
    for sub in ("cur", "new", "tmp"):
        os.makedirs(os.path.join(box, sub))
    account = mailbox.MaildirAccount(box, "localhost", clock, pool)
    entry = Entry(uid=1, base="1.x.localhost", sub="new", name="1.x.localhost", size=0)
    imap_factory = imap.IMAPFactory(Placeholder(), clock, Placeholder(), None,
                                    max_message_size=1000, implicit_tls=True)
    config = Placeholder()
    config.data_dir = data
    config.hostname = "localhost"
    config.dns_server = "127.0.0.1:53"
    dnsbl_factory = dnsbl.DNSBLFactory()
    dnsbl_factory.configure({"sites": ["zen.example"]})
    pipe_factory = pipe.PipeFactory()
    pipe_factory.configure({"command": ["/bin/true"]})
    sqlite_factory = userdb.SQLiteFactory()
    made = {
        UserDatabase: users,
        AliasMap: AliasMap(data),
        PasswordChecker: PasswordChecker(users, clock, pool),
        dispatch._Written: dispatch._Written(agent),
        maildir.MaildirDeliveryAgent: agent,
        maildir.StagedCopies: maildir.StagedCopies(agent, Placeholder(), []),
        ReloadingContextFactory: ReloadingContextFactory(TLSMaterial(cert, key)),
        MessageFilter: MessageFilter(),
        SMTPServer: SMTPServer(),
        tlspolicy.CheckingTLS: tlspolicy.CheckingTLS("mx.example"),
        realm.MaildirRealm: realm.MaildirRealm(store, "localhost", clock, pool),
        mailbox.MaildirMessage: mailbox.MaildirMessage(Loaded(1, entry, None, 0.0)),
        mailbox.MaildirMailbox: mailbox.MaildirMailbox(
            account, "INBOX", Folder(box), Snapshot(validity=1, uid_next=1, entries=[]),
            rw=True),
        mailbox.MaildirAccount: account,
        imap.IMAPServer: imap.IMAPServer(imap_factory, implicit_tls=True),
        pop3.MaildirMailbox: pop3.MaildirMailbox([]),
        pop3._Pacer: pop3._Pacer(),
        runner.OutboundQueue: queue,
        runner.StagedMessage: runner.StagedMessage(queue, record),
        handoff.QueueHandoff: hand,
        handoff._Staged: handoff._Staged(hand, record),
        NoiseFilter: NoiseFilter(lambda event: None),
        Metrics: Metrics(Placeholder(), clock),
        # The plugins as the server finds them, and what they build.
        userdb.FileFactory: userdb.file,
        userdb.SQLiteFactory: sqlite_factory,
        userdb.SQLiteDatabase: sqlite_factory.build(config, clock),
        dnsbl.DNSBLFactory: dnsbl.dnsbl,
        mailauth.AuthChecksFactory: mailauth.auth_checks,
        mailauth.DKIMSignFactory: mailauth.dkim_sign,
        AuthChecksFilter: mailauth.auth_checks.build(config, clock, Placeholder()),
        DKIMSigningTransform: mailauth.dkim_sign.build(config, clock),
        greylist.GreylistFactory: greylist.greylist,
        lmtp.LMTPAgent: lmtp.lmtp.build(config, clock),
        lmtp.LMTPFactory: lmtp.lmtp,
        pipe.PipeAgent: pipe_factory.build(config, clock),
        pipe.PipeFactory: pipe.pipe,
        ratelimit.RateLimitFactory: ratelimit.rate_limit,
        rspamd.RspamdFactory: rspamd.rspamd,
    }
    # Filters inherit MessageFilter's declaration: each is checked as built.
    products = [dnsbl_factory.build(config, clock), greylist.greylist.build(None, clock),
                greylist.greylist.build(config, clock), ratelimit.rate_limit.build(config, clock),
                rspamd.rspamd.build(config, clock)]
    return made, products


class ImplementerTests(TestCase):
    def test_only_classes_declare(self):
        """
        C{@implementer} on a function declares what its results provide,
        which is never what was meant here (it once decorated
        C{queue.runner.new_record} instead of the queue).
        """
        self.assertEqual(declarations()[1], [])

    def test_outbound_queue(self):
        from mailstack.interfaces import IOutboundQueue, ITwoPhaseStore
        from mailstack.queue.runner import OutboundQueue, new_record
        self.assertTrue(IOutboundQueue.implementedBy(OutboundQueue))
        self.assertTrue(ITwoPhaseStore.implementedBy(OutboundQueue))
        self.assertFalse(hasattr(new_record, "__implemented__"))

    def test_every_declaration_checked(self):
        """
        Every class in mailstack with its own C{@implementer} has an instance
        below; a new one must be added here.
        """
        made, _ = instances(self)
        classes = declarations()[0]
        self.assertEqual(sorted(c.__qualname__ for c in classes - set(made)), [])
        self.assertEqual(sorted(c.__qualname__ for c in set(made) - classes), [])

    def test_verify_builtins_and_plugins(self):
        made, products = instances(self)
        for cls, obj in made.items():
            self.assertIsInstance(obj, cls)
            for iface in declared(cls):
                self.assertTrue(iface.providedBy(obj), (cls, iface))
            verify_all(self, obj)
        for obj in products:
            from mailstack.interfaces import IMessageFilter
            self.assertTrue(IMessageFilter.providedBy(obj), obj)
            verify_all(self, obj)

    def test_verify_fails_on_a_broken_contract(self):
        """
        The check above can fail: a class that declares an interface it does
        not implement is caught.
        """
        from zope.interface import implementer
        from zope.interface.exceptions import Invalid

        from mailstack.interfaces import IOutboundQueue

        @implementer(IOutboundQueue)
        class Broken:
            def enqueue(self):  # the interface takes (envelope, spool)
                pass

        self.assertRaises(Invalid, verify_all, self, Broken())


class ReadmePluginTests(TestCase):
    """
    The README's example plugins, extracted as printed: each module-level
    plugin object, and what it builds, keeps its contracts.
    """

    def setUp(self):
        self.blocks = readme_blocks()
        root = self.mktemp()
        directory = os.path.join(root, "mailstack", "plugins")
        os.makedirs(directory)
        self.names = []
        for name, code in self.blocks.items():
            if name.startswith("mailstack/plugins/"):
                with open(os.path.join(root, name), "w") as f:
                    f.write(code)
                module = "mailstack.plugins." + os.path.basename(name)[:-3]
                self.names.append(module)
                self.addCleanup(sys.modules.pop, module, None)
        plugins.__path__.append(directory)
        self.addCleanup(plugins.__path__.remove, directory)
        self.data = self.mktemp()
        os.makedirs(self.data)

    def test_examples(self):
        from twisted.plugin import IPlugin

        from mailstack.plugin import _configure
        self.assertEqual(len(self.names), 4)
        config = Placeholder()
        config.data_dir = self.data
        config.hostname = "localhost"
        config.plugins = tomllib.loads(self.blocks["mailstack.toml"]).get("plugins", {})
        config.plugins.setdefault("archive", {})["directory"] = os.path.join(self.data, "a")
        checked = 0
        for name in self.names:
            module = importlib.import_module(name)
            found = [obj for obj in vars(module).values()
                     if not inspect.isclass(obj) and IPlugin.providedBy(obj)]
            self.assertTrue(found, name)
            for obj in found:
                verify_all(self, obj)
                _configure(obj, obj.name, config)  # as the server does
                product = obj.build(config, Clock())
                verify_all(self, product)
                checked += 2
        self.assertGreaterEqual(checked, 8)
