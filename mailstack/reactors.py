# -*- test-case-name: tests.test_reactors -*-
"""
The reactor, as mailstack's code types it.

Twisted types a reactor by capability: C{IReactorTime} for timers,
C{IReactorTCP} to connect, C{IReactorFromThreads} to come back from a
worker thread, and so on.  A function or class that uses one capability
takes that interface.  The parts that use several, or hand the reactor on
to parts that do (the service, the courier, the submission client), take
L{IMailReactor}: every capability mailstack uses.

Twisted types C{twisted.internet.reactor} as a made-up interface naming
five capabilities; every reactor twistd installs on Linux (epoll, poll,
select) provides all of L{IMailReactor}'s.  C{mailstack.tap.makeService}
and the receiver process say so once, with a cast, and
C{tests.test_reactors} checks the claim against the running reactor.
"""

from twisted.internet.interfaces import (
    IReactorCore, IReactorPluggableNameResolver, IReactorProcess, IReactorSocket, IReactorTCP,
    IReactorThreads, IReactorTime, IReactorUDP, IReactorUNIX,
)


class IMailReactor(IReactorCore, IReactorTime, IReactorTCP, IReactorUNIX, IReactorUDP,
                   IReactorSocket, IReactorThreads, IReactorProcess,
                   IReactorPluggableNameResolver):
    """
    A reactor with every capability mailstack uses (see the module
    docstring): a type for annotations, never declared by a reactor.
    """
