"""
Tests for the answers L{mailstack.queue.courier.Courier} keeps: MX and
address lookups cached for their TTL, on a fake clock.
"""

from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock
from twisted.names import dns
from twisted.trial.unittest import SynchronousTestCase

from mailstack.queue.courier import Courier, RouteError
from mailstack.testing import FakeResolver


class AnswerCacheTests(SynchronousTestCase):
    def courier(self, ttl, **kwargs):
        self.clock = Clock()
        self.clock.advance(1000)
        self.resolver = FakeResolver(
            mx={"remote.test": [(10, "mx1.remote.test"), (20, "mx2.remote.test")],
                "null.test": [(0, "")]},
            a={"mx1.remote.test": ["127.0.0.3", "::1"], "mx2.remote.test": ["127.0.0.4"]},
            ttl=ttl, **kwargs)
        return Courier(self.clock, self.resolver, "mx.test", shuffle=lambda hosts: None)

    def hosts(self, courier, domain="remote.test"):
        return self.successResultOf(ensureDeferred(courier.hosts_for(domain)))

    def addresses(self, courier, host="mx1.remote.test"):
        return self.successResultOf(ensureDeferred(courier.addresses(host)))

    def queries(self, rtype):
        return [name for t, name in self.resolver.queries if t == rtype]

    def test_mx_kept_for_its_ttl(self):
        """
        The MX answer is asked once per TTL: again once it has expired.
        """
        courier = self.courier(ttl=60)
        expected = [("mx1.remote.test", 25), ("mx2.remote.test", 25)]
        self.assertEqual(self.hosts(courier), expected)
        self.clock.advance(59)
        self.assertEqual(self.hosts(courier), expected)
        self.assertEqual(self.queries(dns.MX), ["remote.test"])
        self.clock.advance(1)
        self.assertEqual(self.hosts(courier), expected)
        self.assertEqual(self.queries(dns.MX), ["remote.test", "remote.test"])

    def test_changed_mx_seen_after_expiry(self):
        """
        A changed MX record is used once the kept answer expires.
        """
        courier = self.courier(ttl=30)
        self.hosts(courier)
        self.resolver.mx["remote.test"] = [(5, "new.remote.test")]
        self.assertEqual(self.hosts(courier)[0][0], "mx1.remote.test")
        self.clock.advance(30)
        self.assertEqual(self.hosts(courier), [("new.remote.test", 25)])

    def test_equal_preferences_shuffled_every_time(self):
        """
        Hosts of equal preference are still shuffled on every delivery, not
        once for the TTL.
        """
        courier = self.courier(ttl=60)
        self.resolver.mx["remote.test"] = [(10, "a.test"), (10, "b.test")]
        shuffled = []
        courier.shuffle = lambda hosts: (shuffled.append(list(hosts)), hosts.reverse())
        first, second = self.hosts(courier), self.hosts(courier)
        self.assertEqual(len(shuffled), 2)
        self.assertEqual(first, second)  # reversed from the same kept order both times
        self.assertEqual(len(self.queries(dns.MX)), 1)

    def test_ttl_limit(self):
        """
        A long TTL is cut to L{Courier.dns_ttl_limit}.
        """
        courier = self.courier(ttl=86400)
        self.hosts(courier)
        self.clock.advance(courier.dns_ttl_limit)
        self.hosts(courier)
        self.assertEqual(len(self.queries(dns.MX)), 2)

    def test_ttl_zero_not_kept(self):
        courier = self.courier(ttl=0)
        self.hosts(courier)
        self.hosts(courier)
        self.addresses(courier)
        self.addresses(courier)
        self.assertEqual(len(self.queries(dns.MX)), 2)
        self.assertEqual(len(self.queries(dns.A)), 2)

    def test_null_mx_kept_and_still_refused(self):
        courier = self.courier(ttl=60)
        for _ in range(2):
            failure = self.failureResultOf(ensureDeferred(courier.hosts_for("null.test")),
                                           RouteError)
            self.assertEqual(failure.value.reply.code, 556)
        self.assertEqual(self.queries(dns.MX), ["null.test"])

    def test_failed_lookup_not_kept(self):
        """
        A SERVFAIL defers and is asked again at the next delivery.
        """
        courier = self.courier(ttl=60, servfail={"remote.test"})
        for _ in range(2):
            failure = self.failureResultOf(ensureDeferred(courier.hosts_for("remote.test")),
                                           RouteError)
            self.assertEqual(failure.value.reply.code, 451)
        self.assertEqual(len(self.queries(dns.MX)), 2)

    def test_addresses_kept_for_their_ttl(self):
        courier = self.courier(ttl=60)
        self.assertEqual(self.addresses(courier), ["127.0.0.3", "::1"])
        self.assertEqual(self.addresses(courier), ["127.0.0.3", "::1"])
        self.assertEqual((len(self.queries(dns.A)), len(self.queries(dns.AAAA))), (1, 1))
        self.clock.advance(60)
        self.addresses(courier)
        self.assertEqual((len(self.queries(dns.A)), len(self.queries(dns.AAAA))), (2, 2))

    def test_partly_failed_addresses_not_kept(self):
        """
        When one of the A and AAAA lookups fails, the other's addresses are
        used but not kept: the next delivery asks both again.
        """
        courier = self.courier(ttl=60)
        lookup = self.resolver.lookupIPV6Address
        self.resolver.lookupIPV6Address = lambda name: lookup("no such.name.")
        self.resolver.missing.add("no such.name")
        self.assertEqual(self.addresses(courier), ["127.0.0.3"])
        self.addresses(courier)
        self.assertEqual(len(self.queries(dns.A)), 2)

    def test_new_resolver_starts_afresh(self):
        """
        Answers kept are the resolver's: a courier given another resolver
        asks it at once.
        """
        courier = self.courier(ttl=60)
        self.hosts(courier)
        other = FakeResolver(mx={"remote.test": [(10, "new.remote.test")]}, ttl=60)
        courier.resolver = other
        self.assertEqual(self.hosts(courier), [("new.remote.test", 25)])
