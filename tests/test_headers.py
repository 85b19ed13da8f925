"""
The C{test-case-name} header of each module (what C{trial --testmodule} and
editors run for it) names test modules that exist.
"""

import os
import re

from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = re.compile(r"-\*- test-case-name: *(.*?) *-\*-")


class TestCaseNameTests(SynchronousTestCase):
    def test_named_modules_exist(self):
        missing, seen = [], 0
        for top in ("mailstack", "benchmarks"):
            for directory, _, files in os.walk(os.path.join(ROOT, top)):
                for name in files:
                    if not name.endswith(".py"):
                        continue
                    path = os.path.join(directory, name)
                    with open(path, encoding="utf-8") as f:
                        head = f.read(300)
                    match = HEADER.search(head)
                    if match is None:
                        continue
                    for module in match.group(1).split(","):
                        seen += 1
                        target = os.path.join(ROOT, *module.strip().split(".")) + ".py"
                        if not os.path.exists(target):
                            missing.append(f"{os.path.relpath(path, ROOT)}: {module.strip()}")
        self.assertGreater(seen, 50)
        self.assertEqual(missing, [])
