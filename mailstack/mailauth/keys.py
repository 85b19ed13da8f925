# -*- test-case-name: tests.test_mailauth_dkim -*-
"""
DKIM keys under the data directory, and the TXT records that publish them.

Layout::

    DATA/dkim/<domain>/<selector>-rsa.key       RSA 2048, PEM (PKCS#1), mode 0600
    DATA/dkim/<domain>/<selector>-ed25519.key   Ed25519, PEM (PKCS#8), mode 0600
    DATA/dkim/<domain>/active                   the selector that signs

One C{mailstack dkim keygen DOMAIN [--selector S]} makes a I{key set}: two
keys whose DNS selectors are the file names without C{.key}
(C{S-rsa._domainkey.DOMAIN} and C{S-ed25519._domainkey.DOMAIN}).  S
defaults to the year and month, e.g. C{202611}.  The first set of a domain
is active at once; a later one waits for C{mailstack dkim activate DOMAIN
S}, so that its records can be published (and their TTL run out) before
anything is signed with it.  Rotation is therefore: keygen a new set,
publish its records, activate it a day or more later, and keep the old
records published a few days more for mail still in flight, then delete
the old files and records.
"""

from __future__ import annotations

import base64
import os
import re
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

ALGORITHMS = ("rsa", "ed25519")
_SELECTOR = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,40}[a-z0-9])?$")
_DOMAIN = re.compile(r"^(?=.{1,253}$)(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*"
                     r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


class DKIMKeyError(Exception):
    """
    A bad domain or selector, a missing or unreadable key.
    """


@dataclass(frozen=True)
class DKIMKey:
    """
    One private key and what it signs as.

    @ivar selector: the DNS selector (C{S-rsa} or C{S-ed25519}).
    @ivar algorithm: C{"rsa"} or C{"ed25519"}.
    @ivar pem: the private key, PEM.
    """

    domain: str
    selector: str
    algorithm: str
    pem: bytes

    def public_record(self) -> str:
        """
        The TXT record's text: C{v=DKIM1; k=rsa; p=...} (RFC 6376 3.6.1;
        for Ed25519 the raw 32-byte key, RFC 8463 4.2).
        """
        key = serialization.load_pem_private_key(self.pem, password=None)
        public = key.public_key()
        if self.algorithm == "ed25519":
            data = public.public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)
        else:
            data = public.public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k={self.algorithm}; p={base64.b64encode(data).decode('ascii')}"

    def record_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def zone_line(self) -> str:
        """
        The record as a zone file line, the text cut into strings of at
        most 255 characters.
        """
        text = self.public_record()
        strings = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
        return f"{self.record_name()}. IN TXT {strings}"


def check_domain(domain: str) -> str:
    name = domain.strip().lower().rstrip(".")
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        raise DKIMKeyError(f"not a domain name: {domain!r}") from None
    if not _DOMAIN.match(name):
        raise DKIMKeyError(f"not a domain name: {domain!r}")
    return name


def check_selector(selector: str) -> str:
    if not _SELECTOR.match(selector):
        raise DKIMKeyError(f"not a selector (letters, digits and '-', up to 42): {selector!r}")
    return selector


def default_selector(now: float | None = None) -> str:
    return time.strftime("%Y%m", time.gmtime(time.time() if now is None else now))


def domain_dir(data_dir: str, domain: str) -> str:
    return os.path.join(data_dir, "dkim", check_domain(domain))


def _owned_like(path: str, data_dir: str) -> None:
    """
    Run as root for a data directory that belongs to the server's user,
    give that user what we made.
    """
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        st = os.stat(data_dir)
        if st.st_uid != 0:
            os.chown(path, st.st_uid, st.st_gid)


def _write_private(path: str, data: bytes, data_dir: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    _owned_like(path, data_dir)


def generate(data_dir: str, domain: str, selector: str | None = None) -> tuple[list[DKIMKey], bool]:
    """
    Make an RSA-2048 and an Ed25519 key for C{domain} under C{data_dir}.
    Returns the keys and whether the set is active (the domain's first).
    Refuses to overwrite an existing key.
    """
    domain = check_domain(domain)
    base = check_selector(default_selector() if selector is None else selector)
    directory = domain_dir(data_dir, domain)
    for sub in (os.path.join(data_dir, "dkim"), directory):
        if not os.path.isdir(sub):
            os.makedirs(sub, mode=0o700, exist_ok=True)
            _owned_like(sub, data_dir)
    paths = {alg: os.path.join(directory, f"{base}-{alg}.key") for alg in ALGORITHMS}
    for path in paths.values():
        if os.path.exists(path):
            raise DKIMKeyError(f"{domain} already has a key set {base}; choose another --selector")
    rsa_pem = rsa.generate_private_key(65537, 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption())
    ed_pem = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    keys = []
    for alg, pem in (("rsa", rsa_pem), ("ed25519", ed_pem)):
        _write_private(paths[alg], pem, data_dir)
        keys.append(DKIMKey(domain, f"{base}-{alg}", alg, pem))
    active = active_selector(data_dir, domain) is None
    if active:
        activate(data_dir, domain, base)
    return keys, active


def key_sets(data_dir: str, domain: str) -> dict[str, list[DKIMKey]]:
    """
    Every key set of C{domain}: C{{base selector: [keys]}}.
    """
    directory = domain_dir(data_dir, domain)
    sets: dict[str, list[DKIMKey]] = {}
    if not os.path.isdir(directory):
        return sets
    for name in sorted(os.listdir(directory)):
        match = re.match(r"^(.+)-(rsa|ed25519)\.key$", name)
        if not match or not _SELECTOR.match(match.group(1)):
            continue
        with open(os.path.join(directory, name), "rb") as f:
            pem = f.read()
        sets.setdefault(match.group(1), []).append(
            DKIMKey(check_domain(domain), f"{match.group(1)}-{match.group(2)}",
                    match.group(2), pem))
    for found in sets.values():
        found.sort(key=lambda key: ALGORITHMS.index(key.algorithm))
    return sets


def active_selector(data_dir: str, domain: str) -> str | None:
    try:
        with open(os.path.join(domain_dir(data_dir, domain), "active")) as f:
            selector = f.read().strip()
    except FileNotFoundError:
        return None
    return selector or None


def activate(data_dir: str, domain: str, selector: str) -> None:
    """
    Sign C{domain}'s mail with key set C{selector} from now on.
    """
    if check_selector(selector) not in key_sets(data_dir, domain):
        raise DKIMKeyError(f"{domain} has no key set {selector}")
    directory = domain_dir(data_dir, domain)
    path = os.path.join(directory, "active")
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        f.write(selector + "\n")
        f.flush()
        os.fsync(f.fileno())
    _owned_like(temporary, data_dir)
    os.replace(temporary, path)


def signing_keys(data_dir: str, domain: str) -> list[DKIMKey]:
    """
    The keys that sign C{domain}'s mail now (the active set), or C{[]}.
    """
    selector = active_selector(data_dir, domain)
    if selector is None:
        return []
    return key_sets(data_dir, domain).get(selector, [])
