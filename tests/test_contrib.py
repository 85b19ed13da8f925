"""
The systemd files in contrib/systemd agree with the program: the unit's
command line is a valid twistd and mailstack command line, the sample
configuration loads, the data directory modes are the ones the server
makes.
"""

import configparser
import os
import shlex

from twisted.scripts.twistd import ServerOptions
from twisted.trial.unittest import SynchronousTestCase

from mailstack import privileges
from mailstack.config import build_config

CONTRIB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "contrib", "systemd")


class SystemdTests(SynchronousTestCase):
    def unit(self):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read(os.path.join(CONTRIB, "mailstack.service"))
        return parser

    def test_exec_start_parses(self):
        """
        ExecStart names twistd's --uid/--gid and the mailstack plugin with
        the sample configuration; twistd accepts it (the user mailstack is
        replaced by root, which exists everywhere).
        """
        argv = shlex.split(self.unit()["Service"]["ExecStart"])
        self.assertTrue(argv[0].endswith("/twistd"))
        argv = [a.replace("/etc/mailstack/mailstack.toml",
                          os.path.join(CONTRIB, "mailstack.toml")) for a in argv[1:]]
        self.assertEqual(argv[argv.index("--uid") + 1], "mailstack")
        argv = ["root" if a == "mailstack" and argv[i - 1] in ("--uid", "--gid") else a
                for i, a in enumerate(argv)]
        options = ServerOptions()
        options.parseOptions(argv)
        self.assertEqual((options["uid"], options["gid"], options["nodaemon"]), (0, 0, True))
        self.assertEqual(options.subCommand, "mailstack")
        config = options.subOptions.config
        self.assertEqual(config.data_dir, "/var/lib/mailstack")
        self.assertEqual(config.smtp, "tcp:25")
        self.assertIn("kill -HUP $MAINPID", self.unit()["Service"]["ExecReload"])

    def test_sample_config_loads(self):
        config = build_config({}, os.path.join(CONTRIB, "mailstack.toml"))
        self.assertEqual(config.domain, ("example.org",))

    def test_tmpfiles_modes_match_the_server(self):
        """
        The tmpfiles snippet makes the data directory and the maildrop with
        the modes the server itself sets at start.
        """
        with open(os.path.join(CONTRIB, "mailstack.tmpfiles")) as f:
            lines = [line.split() for line in f if line.strip() and not line.startswith("#")]
        modes = {path: int(mode, 8) for kind, path, mode, user, group, age in lines}
        self.assertEqual(modes, {"/var/lib/mailstack": privileges.DATA_MODE,
                                 "/var/lib/mailstack/maildrop": privileges.MAILDROP_MODE})
