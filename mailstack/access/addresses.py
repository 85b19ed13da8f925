# -*- test-case-name: tests.test_imap_store -*-
"""
RFC 5322 address lists as IMAP needs them: ENVELOPE's address structures
(with group syntax) and the text SEARCH FROM/TO/CC/BCC matches.

C{email.utils.getaddresses} knows no groups and puts comments into names.
This parser follows RFC 5322 with its obsolete forms, as Dovecot's does:
a phrase's comments are dropped; an address without a phrase takes its
comment as the name; comments and spaces inside an address are ignored;
a group is reported as C{(NIL NIL "name" NIL)}, its members, then
C{(NIL NIL NIL NIL)}.  Nothing here raises on bad input: what does not
parse is kept as well as it can be.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SPECIALS = '()<>@,;:\\".[]'


@dataclass
class Address:
    """
    One ENVELOPE address: a mailbox, or a group's start (host None,
    mailbox the group name) or end (everything None).
    """

    name: str | None
    route: str | None
    mailbox: str | None
    host: str | None


def _tokens(text: str) -> list[tuple[str, str]]:
    """
    (kind, value) pairs: "atom", "quoted", "comment", "literal", or a
    special character as its own kind.  Whitespace separates.
    """
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == '"':
            i += 1
            value = []
            while i < n and text[i] != '"':
                if text[i] == "\\" and i + 1 < n:
                    i += 1
                if text[i] not in "\r\n":
                    value.append(text[i])
                i += 1
            i += 1
            out.append(("quoted", "".join(value)))
        elif c == "(":
            depth, i, value = 1, i + 1, []
            while i < n and depth:
                ch = text[i]
                if ch == "\\" and i + 1 < n:
                    i += 1
                    ch = text[i]
                elif ch == "(":
                    depth += 1
                elif ch == ")":
                    depth -= 1
                    if not depth:
                        break
                value.append(ch)
                i += 1
            i += 1
            out.append(("comment", " ".join("".join(value).split())))
        elif c == "[":
            end = text.find("]", i)
            end = n - 1 if end < 0 else end
            out.append(("literal", text[i:end + 1]))
            i = end + 1
        elif c in _SPECIALS:
            out.append((c, c))
            i += 1
        else:
            start = i
            while i < n and text[i] not in _SPECIALS and text[i] not in " \t\r\n":
                i += 1
            out.append(("atom", text[start:i]))
    return out


def _phrase(words: list[tuple[str, str]]) -> str | None:
    parts = [value for kind, value in words if kind in ("atom", "quoted", ".")]
    text = ""
    for part in parts:
        if part == "." or text.endswith("."):
            text += part
        else:
            text += (" " if text else "") + part
    return text or None


def _addr_spec(words: list[tuple[str, str]]) -> tuple[str | None, str | None]:
    """
    Local part and domain of tokens (comments already removed).
    """
    local: list[str] = []
    domain: list[str] | None = None
    for kind, value in words:
        if kind == "@" and domain is None:
            domain = []
        elif kind in ("atom", "quoted", ".", "literal"):
            (local if domain is None else domain).append(value)
    mailbox = "".join(local) or None
    host = "".join(domain) if domain else ""
    return mailbox, host


def _mailbox(tokens: list[tuple[str, str]]) -> Address | None:
    """
    One mailbox from its tokens (name-addr or addr-spec).
    """
    comments = [v for k, v in tokens if k == "comment"]
    words = [(k, v) for k, v in tokens if k != "comment"]
    if not words:
        return None
    if ("<", "<") in words:
        at = words.index(("<", "<"))
        name = _phrase(words[:at])
        inner = words[at + 1:]
        if (">", ">") in inner:
            inner = inner[:inner.index((">", ">"))]
        route = None
        if (":", ":") in inner:  # obsolete route: @a,@b:user@host
            colon = inner.index((":", ":"))
            route = "".join(v for k, v in inner[:colon]) or None
            inner = inner[colon + 1:]
        mailbox, host = _addr_spec(inner)
        if mailbox is None and not host:
            return None
        return Address(name, route, mailbox, host or "")
    mailbox, host = _addr_spec(words)
    if mailbox is None and not host:
        return None
    return Address(comments[-1] if comments else None, None, mailbox, host or "")


# The common forms, read without tokens: "a@b.c" and "Some Name <a@b.c>",
# comma separated, with no quoting, comment, group, route or literal.
_ATOM = r'[^()<>@,;:\\".\[\] \t\r\n]+'
_DOTTED = rf'{_ATOM}(?:\.{_ATOM})*'
# Matched against a piece stripped of spaces and tabs, so that no two
# runs of blanks meet (which would make a long run quadratic).
_SIMPLE_NAME_ADDR = re.compile(
    rf'((?:{_ATOM}[ \t]+)*?{_ATOM})?[ \t]*<[ \t]*({_DOTTED})[ \t]*@[ \t]*({_DOTTED})'
    r'[ \t]*>')
_SIMPLE_ADDR_SPEC = re.compile(rf'({_DOTTED})[ \t]*@[ \t]*({_DOTTED})')
_NOT_SIMPLE = re.compile(r'["():;\\\[\]\r\n]')
_SPACES = re.compile(r"[ \t]+")
_SIMPLE_MAX = 4096  # longer values take the general way


def _simple(text: str) -> list[Address] | None:
    """
    The addresses of a value in only the common forms, as L{_parse} reads
    them; None when the value has anything else.
    """
    if len(text) > _SIMPLE_MAX or _NOT_SIMPLE.search(text):
        return None
    out = []
    for piece in text.split(","):
        piece = piece.strip(" \t")
        match = _SIMPLE_ADDR_SPEC.fullmatch(piece)
        if match is not None:
            out.append(Address(None, None, match[1], match[2]))
            continue
        match = _SIMPLE_NAME_ADDR.fullmatch(piece)
        if match is not None:
            name = match[1]
            out.append(Address(_SPACES.sub(" ", name) if name else None, None, match[2],
                               match[3]))
        elif piece:
            return None
    return out


def parse_addresses(text: str) -> list[Address]:
    """
    The addresses of a header field's value, groups marked.
    """
    found = _simple(text)
    return found if found is not None else _parse(text)


def _parse(text: str) -> list[Address]:
    tokens = _tokens(text)
    out: list[Address] = []
    current: list[tuple[str, str]] = []
    in_group = False
    angle = 0
    for token in tokens:
        kind = token[0]
        if kind == "<":
            angle += 1
        elif kind == ">":
            angle = max(0, angle - 1)
        if angle:
            current.append(token)
            continue
        if kind == ":" and not in_group:
            name = _phrase([t for t in current if t[0] != "comment"])
            out.append(Address(None, None, name or "", None))
            in_group, current = True, []
        elif kind == ";" and in_group:
            found = _mailbox(current)
            if found:
                out.append(found)
            out.append(Address(None, None, None, None))
            in_group, current = False, []
        elif kind == ",":
            found = _mailbox(current)
            if found:
                out.append(found)
            current = []
        else:
            current.append(token)
    found = _mailbox(current)
    if found:
        out.append(found)
    if in_group:
        out.append(Address(None, None, None, None))
    return out


def search_text(text: str) -> str:
    """
    What SEARCH FROM/TO/CC/BCC looks in: each address as
    C{name <mailbox@host>}, group names included, comments removed.
    """
    out = []
    for address in parse_addresses(text):
        if address.host is None:
            if address.mailbox:
                out.append(address.mailbox)
            continue
        spec = (address.mailbox or "") + ("@" + address.host if address.host else "")
        out.append(f"{address.name} <{spec}>" if address.name else f"<{spec}>")
    return ", ".join(out)
