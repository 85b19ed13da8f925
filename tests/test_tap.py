"""
Tests for the twistd plugin, L{mailstack.tap} and L{mailstack.config}.
"""

import re

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from mailstack import tap
from mailstack.config import ConfigError, Route, build_config, parse_duration

DESIGN_OPTIONS = (
    "config data-dir hostname domain smtp submission submissions imap imaps pop3 "
    "tls-cert tls-key dns-server route retry-schedule max-queue-lifetime "
    "max-message-size relay-networks smtp-timeout"
).split()


class PluginTests(SynchronousTestCase):
    def test_found(self):
        """
        twistd finds the C{mailstack} service maker through twisted.plugins.
        """
        makers = {m.tapname: m for m in getPlugins(IServiceMaker)}
        self.assertIn("mailstack", makers)
        self.assertIs(makers["mailstack"].options, tap.Options)

    def test_help_lists_every_option(self):
        """
        C{twistd mailstack --help} names every option of DESIGN.md.
        """
        text = str(tap.Options())
        for name in DESIGN_OPTIONS:
            self.assertTrue(re.search(rf"--{name}=", text), name)


class OptionsTests(SynchronousTestCase):
    def parse(self, *argv):
        options = tap.Options()
        options.parseOptions(list(argv))
        return options.config

    def write(self, text):
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return path

    def test_defaults(self):
        """
        With no options: localhost on loopback, unprivileged ports.
        """
        config = self.parse("--hostname", "mx.test")
        self.assertEqual(config.domain, ("localhost",))
        self.assertEqual(config.data_dir, "./mailstack-data")
        self.assertEqual(config.smtp, "tcp:2525:interface=127.0.0.1")
        self.assertEqual(config.submission, "tcp:2587:interface=127.0.0.1")
        self.assertEqual(config.retry_schedule, (300, 600, 1200, 2400, 4800, 9600, 14400))
        self.assertEqual(config.max_queue_lifetime, 5 * 86400)
        self.assertEqual(config.max_message_size, 26214400)
        self.assertEqual(config.relay_networks, ())
        self.assertEqual(config.smtp_timeout, 300)

    def test_repeatable_and_none(self):
        """
        Repeatable options collect; C{none} disables a listener.
        """
        config = self.parse("--domain", "Example.ORG", "--domain", "bücher.example",
                            "--route", "*=smarthost.test:2525", "--imap", "none")
        self.assertEqual(config.domain, ("example.org", "xn--bcher-kva.example"))
        self.assertEqual(config.route, (Route("*", "smarthost.test", 2525),))
        self.assertIsNone(config.imap)

    def test_file_and_precedence(self):
        """
        Values come from the TOML file (dashes or underscores), and the
        command line wins over it.
        """
        path = self.write('data_dir = "/srv/mail"\nhostname = "file.test"\n'
                          'domain = ["a.test", "b.test"]\nmax-message-size = 2048\n'
                          'relay-networks = ["10.0.0.0/8"]\nretry_schedule = "1m,2m"\n')
        config = self.parse("--config", path, "--hostname", "cli.test")
        self.assertEqual(config.data_dir, "/srv/mail")
        self.assertEqual(config.hostname, "cli.test")
        self.assertEqual(config.domain, ("a.test", "b.test"))
        self.assertEqual(config.max_message_size, 2048)
        self.assertEqual([str(n) for n in config.relay_networks], ["10.0.0.0/8"])
        self.assertEqual(config.retry_schedule, (60, 120))
        config = self.parse("--config", path, "--domain", "c.test")
        self.assertEqual(config.domain, ("c.test",))

    def test_unknown_key(self):
        """
        An unknown key in the file is an error that names it.
        """
        path = self.write('hostname = "x.test"\nsmtp_port = 25\n')
        e = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn("smtp_port", str(e))

    def test_bad_values(self):
        """
        Bad values are usage errors that name the option.
        """
        for argv in (["--max-message-size", "lots"], ["--retry-schedule", "5x"],
                     ["--relay-networks", "10.0.0.0/33"], ["--route", "nohost"],
                     ["--domain", "bad..domain"], ["--tls-cert", "only-cert.pem"],
                     ["--dns-server", "1.2.3.4:99999"], ["--smtp-timeout", "-1"]):
            e = self.assertRaises(usage.UsageError, self.parse, *argv)
            self.assertIn("--", str(e))

    def test_bad_endpoints(self):
        """
        A listener endpoint Twisted cannot parse is a usage error naming the
        option, not a traceback when the server starts; the other kinds
        (ssl, systemd) are parsed only at start, where their files or
        sockets are.
        """
        for option in ("--smtp", "--imap", "--http", "--submission"):
            for value in ("tcp:notaport", "tcp:25:bogus=1", "haproxy:tcp:x",
                          "unix:/tmp/s:mode=zz"):
                e = self.assertRaises(usage.UsageError, self.parse, option, value)
                self.assertIn(option, str(e))
                self.assertIn("not a server endpoint", str(e))
        config = self.parse("--smtp", "haproxy:tcp:25:interface=127.0.0.1",
                            "--imap", "unix:/tmp/imap.sock:mode=600",
                            "--http", "systemd:domain=INET:index=0")
        self.assertEqual(config.smtp, "haproxy:tcp:25:interface=127.0.0.1")
        self.assertEqual(config.http, "systemd:domain=INET:index=0")

    def test_durations(self):
        self.assertEqual(parse_duration("90"), 90)
        self.assertEqual(parse_duration("4h"), 14400)
        self.assertRaises(ConfigError, parse_duration, "0")

    def test_config_is_immutable(self):
        config = build_config({"hostname": "x.test"})
        self.assertRaises(AttributeError, setattr, config, "hostname", "y.test")
