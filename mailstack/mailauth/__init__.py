"""
Mail authentication building blocks (issue 17): DKIM keys and signing,
SPF, DKIM and DMARC checks with one C{Authentication-Results} header,
MTA-STS policies, and the DNS records a domain publishes.

One module per concern; all but the last three are tied to neither the
SMTP server nor the queue, and those three wire them in::

    keys.py        DKIM keys under DATA/dkim/<domain>/, TXT records, rotation
    header.py      the header section parsed in linear time, as dkimpy reads it
    dkim.py        DKIMSigner (dual rsa-sha256 + ed25519-sha256), verify_dkim
    lookup.py      DNSCache: asynchronous twisted.names lookups, time limit, TTL cache
    spf.py         check_spf: RFC 7208 with pyspf, its DNS through DNSCache
    dmarc.py       RFC 7489: record, organisational domain, alignment, evaluate_dmarc
    results.py     Authentication-Results (RFC 8601): make one, remove ours
    verify.py      Authenticator: all checks for one inbound message; policy_verdict
    mtasts.py      MTA-STS (RFC 8461) client: TXT, HTTPS policy fetch, cache, mx_allowed
    dnsrecords.py  the records of `mailstack dns DOMAIN` and their --check
    tlsrpt.py      TLS outcomes per domain and day (RFC 8460 reports)
    commands.py    `mailstack dkim ...` and `mailstack dns ...`
    tlsrpt_cli.py  `mailstack tlsrpt DAY`
    testing.py     ZoneResolver and a loopback DNS server for tests
    checks.py      AuthChecksFilter: the built-in auth-checks message filter
    signing.py     DKIMSigningTransform: the built-in dkim-sign outbound transform
    builtin.py     which of the two the configuration turns on, and where they run

How they are wired (L{mailstack.mailauth.builtin}, on by default; the
plugin factories of L{mailstack.plugins.mailauth} list them and let
C{--filter}/C{--transform} place them elsewhere):

 - Inbound checks are the built-in message filter C{auth-checks} at end of
   DATA on the receiving MTA (L{checks.AuthChecksFilter}): it removes
   C{Authentication-Results} fields carrying our authserv-id, runs
   L{verify.Authenticator} with the client's address, HELO name and MAIL
   FROM, prepends the header it returns, and turns L{verify.policy_verdict}
   into the filter's verdict (550 5.7.1 reject, delivery into Junk, or
   accept).  Mail from authenticated users (submission) and from
   C{--relay-networks} is not checked.  C{--auth-checks no} turns it off.
 - Signing is the built-in outbound transform C{dkim-sign}
   (L{signing.DKIMSigningTransform}): for mail of our own senders whose
   From domain is local and has an active key set, L{dkim.DKIMSigner} makes
   the two C{DKIM-Signature} fields in a worker thread, prepended once,
   before the message is queued.  C{--dkim-sign no} turns it off.
 - MTA-STS is part of the courier's MX selection
   (L{mailstack.queue.tlspolicy}): in C{enforce} mode L{mtasts.mx_allowed}
   filters the MX list and verified TLS is required; the outcomes are
   counted for TLS reports (L{tlsrpt}).
"""
