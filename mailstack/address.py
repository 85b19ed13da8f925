# -*- test-case-name: tests.test_address -*-
"""
Mail addresses: parsing SMTP paths, normalising domains, and the rules that
keep a local part from ever naming a path.

Two levels of strictness:

  - L{parse_path} reads what a client puts in C{MAIL FROM:<...>} and
    C{RCPT TO:<...>}: RFC 5321 syntax (dot-atom or quoted local part), no
    source routes, ASCII only (we do not offer SMTPUTF8).
  - L{mailbox_name} is the much narrower rule for names of local users and
    aliases: lowercase letters, digits and C{. _ -}, so a name is always one
    safe path component under C{DATA/mail/<domain>/}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import idna


class AddressError(ValueError):
    """
    Not a valid address; C{code}/C{enhanced} are the SMTP reply to give.
    """

    code = 501
    enhanced = "5.1.3"


class SourceRouteError(AddressError):
    """
    A source route (C{<@a,@b:user@c>}); never accepted.
    """

    code = 553
    enhanced = "5.1.3"


class NonASCIIError(AddressError):
    """
    An 8-bit address without SMTPUTF8, which we do not offer.
    """

    code = 553
    enhanced = "5.6.7"


_ATEXT = r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]"
_DOT_ATOM = re.compile(rf"{_ATEXT}+(?:\.{_ATEXT}+)*")
_QUOTED = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"')
_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_ADDRESS_LITERAL = re.compile(r"\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\]")
_MAILBOX_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?")

MAX_LOCAL = 64
MAX_DOMAIN = 255
MAX_PATH = 256


def normalize_domain(text: str) -> str:
    """
    Return a domain in its canonical form: lowercase ASCII (IDNA A-labels),
    no trailing dot.  Raise L{AddressError} if it is not a host name.
    """
    text = text.strip().rstrip(".")
    if not text:
        raise AddressError("empty domain")
    if _ADDRESS_LITERAL.fullmatch(text):
        return text
    if not text.isascii():
        try:
            text = idna.encode(text, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise AddressError(f"bad internationalised domain: {e}") from None
    text = text.lower()
    if len(text) > MAX_DOMAIN - 2:
        raise AddressError("domain too long")
    labels = text.split(".")
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise AddressError(f"bad domain label {label!r}")
    return text


@dataclass(frozen=True, order=True)
class Address:
    """
    A mailbox, C{local@domain}, with the domain normalised; C{str()} of it
    is the address.  Make one with L{parse_address}.

    @ivar local: the local part, as given (case kept: only the receiving
        host may interpret it).
    @ivar domain: the domain, lowercased, internationalised names in their
        A-label (C{xn--}) form; or an address literal (C{[192.0.2.1]}).
    """

    local: str
    domain: str

    def __str__(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def base(self) -> "Address":
        """
        The address without its C{+tag} (plus-addressing), or itself.
        """
        if "+" in self.local and not self.local.startswith('"'):
            head = self.local.split("+", 1)[0]
            if head:
                return Address(head, self.domain)
        return self

    def lower(self) -> "Address":
        """
        The address with a lowercased local part, the key for lookups.
        """
        return Address(self.local.lower(), self.domain)


def parse_address(text: str) -> Address:
    """
    Parse a bare C{local@domain} (no angle brackets).
    """
    if not text.isascii():
        raise NonASCIIError("8-bit characters in an address need SMTPUTF8")
    if len(text) > MAX_PATH - 2:
        raise AddressError("address too long")
    local, at, domain = text.rpartition("@")
    if not at or not local:
        raise AddressError("an address needs a local part and a domain")
    if not (_DOT_ATOM.fullmatch(local) or _QUOTED.fullmatch(local)):
        raise AddressError("bad local part")
    if len(local) > MAX_LOCAL:
        raise AddressError("local part too long")
    return Address(local, normalize_domain(domain))


def parse_path(text: str) -> Address | None:
    """
    Parse the path of a C{MAIL FROM:} or C{RCPT TO:} command, with its angle
    brackets.  Return C{None} for the null path C{<>}.
    """
    text = text.strip()
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("the address must be in angle brackets")
    inner = text[1:-1].strip()
    if inner == "":
        return None
    if inner.startswith("@"):
        raise SourceRouteError("source routes are not accepted")
    return parse_address(inner)


def mailbox_name(local: str) -> str:
    """
    Check and normalise the local part of a local user or alias.

    Only C{a-z 0-9 . _ -}, starting and ending with a letter or digit, no
    C{..}: such a name is always a single safe path component, never C{.},
    C{..}, or anything with a slash, and never holds the C{+} that separates
    a plus-address tag.
    """
    name = local.lower()
    if not _MAILBOX_NAME.fullmatch(name) or ".." in name:
        raise AddressError(
            f"{local!r} is not a valid mailbox name: use letters, digits and . _ -"
        )
    return name


def local_address(text: str) -> Address:
    """
    Parse and normalise the address of a local user or alias (CLI input).
    """
    address = parse_address(text.strip())
    if address.domain.startswith("["):
        raise AddressError("local users need a domain name, not an address literal")
    return Address(mailbox_name(address.local), address.domain)
