# -*- test-case-name: tests.test_mailauth_dkim -*-
"""
DKIM signing (RFC 6376, RFC 8463) and verification, with dkimpy.

Signing: L{DKIMSigner} makes two signatures, C{rsa-sha256} and
C{ed25519-sha256}, C{relaxed/relaxed}, over the header fields RFC 6376
5.4.1 recommends.  Fields that must not change are over-signed the way
rspamd does it: From, Reply-To, Subject, To and Cc are listed once more
than they occur, even when absent (so none can be added); Sender, Date,
Message-ID, MIME-Version, Content-Type, Content-Transfer-Encoding,
In-Reply-To and References once more than they occur when present (an MTA
may add a missing Date or Message-ID without breaking the signature).

Signing and verifying are CPU work (RSA in pure Python, hashing the
body): callers run L{DKIMSigner.sign} in a worker thread
(C{deferToThreadPool}); L{verify_dkim} does so itself.  Messages may have
LF or CRLF line endings (dkimpy canonicalises both alike); the signature
fields come back with LF endings, as mailstack stores messages.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

import dkim
from cryptography.hazmat.primitives import serialization
from dkim.util import InvalidTagValueList, parse_tag_value
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IReactorThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from mailstack.mailauth.header import header_end, parse_header
from mailstack.mailauth.keys import DKIMKey
from mailstack.mailauth.lookup import DNSCache, DNSTempError

log = Logger()

#: Signatures checked at most in one message (OpenDKIM's default is 3).
MAX_SIGNATURES = 5

#: Header fields signed when present (RFC 6376 5.4.1, plus MIME and List-*).
SIGNED = ("from", "sender", "reply-to", "subject", "date", "message-id", "to", "cc",
          "mime-version", "content-type", "content-transfer-encoding", "content-id",
          "content-description", "resent-date", "resent-from", "resent-sender", "resent-to",
          "resent-cc", "resent-message-id", "in-reply-to", "references", "list-id",
          "list-help", "list-unsubscribe", "list-unsubscribe-post", "list-subscribe",
          "list-post", "list-owner", "list-archive")
#: Signed once more than they occur, absent ones too.
OVERSIGNED_ALWAYS = ("from", "reply-to", "subject", "to", "cc")
#: Signed once more than they occur, when they occur.
OVERSIGNED_PRESENT = ("sender", "date", "message-id", "mime-version", "content-type",
                      "content-transfer-encoding", "in-reply-to", "references")


#: Messages whose header section is larger are not DKIM-verified (C{policy}):
#: dkimpy parses a header in quadratic time, a hostile one of megabytes in
#: minutes (64 KiB: under a second; Postfix's header_size_limit is 100 KiB).
MAX_HEADER = 64 * 1024



def signed_fields(message: bytes) -> list[bytes]:
    """
    The C{h=} list for C{message}: each field of L{SIGNED} as often as it
    occurs, plus the over-signing described above.
    """
    headers = parse_header(message)
    counts: dict[str, int] = {}
    for field_name, _value in headers:
        key = field_name.decode("ascii", "replace").lower()
        counts[key] = counts.get(key, 0) + 1
    fields = []
    for name in SIGNED:
        times = counts.get(name, 0)
        if name in OVERSIGNED_ALWAYS or (name in OVERSIGNED_PRESENT and times):
            times += 1
        fields.extend([name.encode("ascii")] * times)
    return fields


class DKIMSigner:
    """
    Signs mail of one domain with its active keys (L{keys.signing_keys}).
    """

    def __init__(self, keys: list[DKIMKey]) -> None:
        if not keys:
            raise ValueError("no keys to sign with")
        self.keys = keys

    def sign(self, message: bytes) -> bytes:
        """
        The C{DKIM-Signature:} fields to prepend to C{message}, one per
        key, LF line endings.  CPU work: call from a worker thread.
        """
        include = signed_fields(message)
        out = []
        for key in self.keys:
            signer = dkim.DKIM(message, linesep=b"\n")
            if key.algorithm == "ed25519":
                private = serialization.load_pem_private_key(key.pem, password=None)
                seed = private.private_bytes(serialization.Encoding.Raw,
                                             serialization.PrivateFormat.Raw,
                                             serialization.NoEncryption())
                secret, algorithm = base64.b64encode(seed), b"ed25519-sha256"
            else:
                secret, algorithm = key.pem, b"rsa-sha256"
            out.append(signer.sign(key.selector.encode("ascii"), key.domain.encode("ascii"),
                                   secret, signature_algorithm=algorithm,
                                   canonicalize=(b"relaxed", b"relaxed"),
                                   include_headers=include))
        return b"".join(out)


def sign_message(data_dir: str, message: bytes, local_domains: Iterable[str]) -> bytes:
    """
    The C{DKIM-Signature} fields for C{message} when its From domain (one
    domain, RFC 5322.From, the identifier DMARC aligns with) is one of
    C{local_domains} and has an active key set under C{data_dir}; else
    C{b""}.  Reads the keys and signs: call it from a worker thread.
    """
    from mailstack.mailauth.dmarc import from_domains
    from mailstack.mailauth.keys import DKIMKeyError, signing_keys

    try:
        domains = set(from_domains(message))
    except dkim.MessageFormatError:
        return b""
    local = {d.lower().rstrip(".") for d in local_domains}
    if len(domains) != 1 or not domains <= local:
        return b""
    try:
        keys = signing_keys(data_dir, domains.pop())
    except (DKIMKeyError, OSError):
        return b""
    return DKIMSigner(keys).sign(message) if keys else b""


@dataclass(frozen=True)
class DKIMResult:
    """
    The outcome of one signature, as RFC 8601 names it: C{pass}, C{fail},
    C{policy}, C{neutral}, C{temperror} or C{permerror}.
    """

    result: str
    domain: str = ""
    selector: str = ""
    algorithm: str = ""
    identity: str = ""
    b: str = ""
    reason: str = ""


async def verify_dkim(message: bytes, cache: DNSCache, reactor: IReactorThreads,
                      threadpool: ThreadPool | None = None, minkey: int = 1024,
                      max_signatures: int = MAX_SIGNATURES,
                      headers: list[tuple[bytes, bytes]] | None = None) -> list[DKIMResult]:
    """
    Verify every C{DKIM-Signature} of C{message}; C{[]} when there is none.

    The keys are fetched first, asynchronously through C{cache}; then the
    hashing and signature checks run in C{threadpool} (the reactor's by
    default).  A DNS failure is C{temperror}, a missing or malformed key
    C{permerror}, C{rsa-sha1} and RSA keys under C{minkey} bits C{policy}
    (RFC 8301).  Only the first (topmost) C{max_signatures} are checked.
    C{headers}: L{parse_header} of C{message}, when the caller has it.
    """
    try:
        if headers is None:
            headers = parse_header(message)
    except dkim.MessageFormatError:
        return []
    signatures = [value for name, value in headers if name.lower() == b"dkim-signature"]
    if signatures and header_end(message) > MAX_HEADER:
        log.info("DKIM: a header section over {limit} bytes is not verified",
                 limit=MAX_HEADER)
        return [DKIMResult("policy", **_describe(tags), reason="header section too large")
                for tags in _tags(signatures[:max_signatures])]
    if len(signatures) > max_signatures:
        # Each one costs a DNS lookup and a hash of the body: hostile mail
        # could carry thousands (RFC 6376 6.1 lets verifiers limit them).
        log.info("DKIM: checking the first {limit} of {count} signatures",
                 limit=max_signatures, count=len(signatures))
        signatures = signatures[:max_signatures]
    results: list[DKIMResult | None] = []
    parsed: list[dict[bytes, bytes] | None] = []
    keys: dict[bytes, bytes | None] = {}
    for value in signatures:
        try:
            tags = parse_tag_value(value)
        except InvalidTagValueList as e:
            parsed.append(None)
            results.append(DKIMResult("permerror", reason=f"bad signature: {e}"))
            continue
        base = _describe(tags)
        try:
            dkim.validate_signature_fields(tags)
        except dkim.DKIMException as e:
            parsed.append(None)
            results.append(DKIMResult("permerror", **base, reason=str(e)))
            continue
        if tags[b"a"].lower() == b"rsa-sha1":
            parsed.append(None)
            results.append(DKIMResult("policy", **base, reason="rsa-sha1 is not accepted"))
            continue
        name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
        parsed.append(tags)
        results.append(None)
        keys.setdefault(name, None)
    failed: dict[bytes, str] = {}

    async def fetch(name: bytes) -> None:
        try:
            records = await cache.text(name.decode("ascii", "replace"))
        except DNSTempError as e:
            failed[name] = f"key lookup failed: {e}"
            return
        keys[name] = records[0] if records else None

    await gatherResults([Deferred.fromCoroutine(fetch(name)) for name in list(keys)])

    def check(idx: int, tags: dict[bytes, bytes], verifier: dkim.DKIM) -> DKIMResult:
        base = _describe(tags)
        name = tags[b"s"] + b"._domainkey." + tags[b"d"] + b"."
        if name in failed:
            return DKIMResult("temperror", **base, reason=failed[name])
        record = keys[name]
        if record is None:
            return DKIMResult("permerror", **base, reason="no key")
        try:
            dkim.evaluate_pk(name, record)
        except (dkim.DKIMException, ValueError) as e:
            return DKIMResult("permerror", **base, reason=f"bad key: {e}")
        try:
            good = verifier.verify(idx, dnsfunc=lambda _n, timeout=5: record)
        except dkim.KeyFormatError as e:
            return DKIMResult("policy", **base, reason=str(e))
        except dkim.ValidationError as e:
            return DKIMResult("fail", **base, reason=str(e).split(" (")[0])
        except (dkim.DKIMException, ValueError) as e:
            return DKIMResult("permerror", **base, reason=str(e))
        if good:
            return DKIMResult("pass", **base)
        return DKIMResult("fail", **base, reason="signature did not verify")

    def check_all() -> list[DKIMResult]:
        verifier = dkim.DKIM(message, minkey=minkey)  # parses the header once
        checked = []
        for idx, (result, tags) in enumerate(zip(results, parsed)):
            if result is not None:
                checked.append(result)
            elif tags is not None:
                checked.append(check(idx, tags, verifier))
        return checked

    if all(tags is None for tags in parsed):
        return [result for result in results if result is not None]
    if threadpool is None:
        threadpool = reactor.getThreadPool()
    return await deferToThreadPool(reactor, threadpool, check_all)


def _tags(signatures: list[bytes]) -> list[dict[bytes, bytes]]:
    out = []
    for value in signatures:
        try:
            out.append(parse_tag_value(value))
        except InvalidTagValueList:
            out.append({})
    return out


def _describe(tags: dict[bytes, bytes]) -> dict[str, str]:
    def text(key: bytes) -> str:
        return tags.get(key, b"").decode("ascii", "replace").strip()

    b = "".join(text(b"b").split())
    return {"domain": text(b"d").lower(), "selector": text(b"s"),
            "algorithm": text(b"a").lower(), "identity": text(b"i"), "b": b[:8]}


__all__ = ["DKIMResult", "DKIMSigner", "signed_fields", "verify_dkim"]
