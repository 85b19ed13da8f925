"""
A smoke run of the benchmark runner (benchmarks/run.py): a tiny load through
each system it can start, with the counts checked.  No timing is asserted.
"""

import io
import os
import re
import shutil

from twisted.trial.unittest import SkipTest, TestCase

from benchmarks import run


class RunnerSmokeTests(TestCase):
    def setUp(self):
        if not (shutil.which("smtp-source") or os.path.exists("/usr/sbin/smtp-source")):
            raise SkipTest("smtp-source not installed (apt-get install postfix; .ci/run does)")

    def test_tiny_load_counts(self):
        """
        Three-recipient inbound and relay cases, scaled down to a few
        messages: every system (mailstack alone and with a receiver process,
        Postfix when root) delivers every copy exactly once, and the table
        has a row per case and system plus the idle row.
        """
        systems = [run.Mailstack, run.mailstack_with(2)] + (
            [run.Postfix] if os.getuid() == 0 else [])
        cases = [c.scaled(0.004) for c in run.CASES if c.name in ("inbound-3rcpt", "relay")]
        out = io.StringIO()
        report = run.run(cases, systems, runs=1, idle=20, out=out)
        for case in cases:
            for system in systems:
                [result] = report["results"][(case.name, system.name)]
                self.assertTrue(result.correct, (case.name, system.name, result.detail))
                self.assertGreater(result.rate, 0)
                self.assertGreater(result.pss, 0)
        expected = f"{cases[0].messages * 3}/{cases[0].messages * 3}"
        self.assertEqual(report["results"][("inbound-3rcpt", "mailstack")][0].detail, expected)
        text = run.table(report)
        self.assertEqual(text.count("| mailstack |"), 3)
        self.assertEqual(text.count("| mailstack:2 |"), 3)
        for system in systems:
            pss, connected, greeted = report["idle"][system.name]
            self.assertGreater(pss, 0)
            self.assertEqual((connected, greeted), (20, 20))


class AccessSmokeTests(TestCase):
    """
    The IMAP and POP3 cases (benchmarks/access.py) with a tiny load: through
    mailstack, and through a private Dovecot when root has one installed.
    """

    def test_tiny_load_same_answers(self):
        """
        Every case runs on every system; both systems give the same answers
        (message counts, search hits, POP3 octets), the mix has no failed
        command, every idle session and IDLE client was set up, and the
        table has a ratio on each row when Dovecot ran.
        """
        from benchmarks import access

        if not shutil.which("openssl"):
            raise SkipTest("openssl is needed for the certificate")
        systems = [access.MailstackAccess]
        if os.getuid() == 0 and access.dovecot_available():
            systems.append(access.Dovecot)
        sizes = access.Sizes(big=30, mix=20, pop=5, mix_clients=2, mix_seconds=1,
                             sessions=5, idlers=3, idle_seconds=1)
        out = io.StringIO()
        report = access.run(systems, 1, sizes, out=out)
        for system in systems:
            [measured] = report["results"][system.name]
            self.assertEqual(measured.steps["SELECT INBOX, first (claims new/)"].answer, "30")
            self.assertEqual(measured.steps["FETCH 1:* ENVELOPE"].answer, "30")
            self.assertEqual(measured.steps["SEARCH SUBJECT invoice"].answer, "2")
            self.assertEqual(measured.steps['SEARCH TEXT "Line 5 about"'].answer, "1")
            self.assertTrue(measured.steps["POP3 RETR, per message"].answer.startswith(
                "5 messages, "))
            self.assertEqual(measured.notes["mix errors"], "0")
            self.assertGreater(measured.values["mix commands/s"], 0)
            self.assertGreater(measured.values["idle sessions PSS MiB"], 0)
            self.assertEqual(measured.notes["idle sessions"], "5 logged in, INBOX selected")
            self.assertEqual(measured.notes["IDLE"], "3 clients in IDLE on 30 messages")
        text = access.table(report)
        self.assertNotIn("| NO: ", text)
        if len(systems) == 2:
            self.assertEqual(len(re.findall(r"\| \d+\.\dx \| yes \|", text)),
                             len(access.BIG_STEPS) + 1 + 2)
