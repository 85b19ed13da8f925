"""
The project's reStructuredText documents parse without errors or warnings
(a table whose text overflows a column silently became a literal block).
"""

import io
import os

import docutils.core
from twisted.trial.unittest import SynchronousTestCase

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTS = ["README.rst", os.path.join("benchmarks", "README.rst")]


class ReStructuredTextTests(SynchronousTestCase):
    def test_documents_parse(self):
        """
        Each document gives docutils nothing to report at warning level or
        above.
        """
        for name in DOCUMENTS:
            with open(os.path.join(ROOT, name), encoding="utf-8") as f:
                source = f.read()
            messages = io.StringIO()
            docutils.core.publish_string(
                source, source_path=name, writer_name="null",
                settings_overrides={"report_level": 2, "halt_level": 5,
                                    "warning_stream": messages})
            self.assertEqual(messages.getvalue(), "", name)
