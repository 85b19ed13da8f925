"""
A smoke run of the benchmark runner (benchmarks/run.py): a tiny load through
each system it can start, with the counts checked.  No timing is asserted.
"""

import io
import os
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
