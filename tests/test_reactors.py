"""
L{mailstack.reactors.IMailReactor} is only a type: C{mailstack.tap} casts the
global reactor to it.  The cast is true only if that reactor provides every
capability the interface names; checked here against the reactor trial
runs (the default one twistd installs).
"""

from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from mailstack.reactors import IMailReactor


class MailReactorTests(SynchronousTestCase):
    def test_global_reactor_provides_every_capability(self):
        """
        Each interface L{IMailReactor} extends is declared and verified on
        the global reactor.
        """
        bases = [base for base in IMailReactor.__iro__[1:] if base.__name__.startswith("IReactor")]
        self.assertGreaterEqual(len(bases), 9)
        for base in bases:
            self.assertTrue(base.providedBy(reactor), base)
            verifyObject(base, reactor)
