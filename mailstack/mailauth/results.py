# -*- test-case-name: tests.test_mailauth_checks -*-
"""
The C{Authentication-Results:} header field (RFC 8601): one made from the
SPF, DKIM and DMARC results, and the removal of fields that claim to come
from us (RFC 8601 5) before ours is added.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

_TOKEN = re.compile(r"^[A-Za-z0-9!#$%&'*+\-.^_`{|}~]+$")
_ADDRESS = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~.]*@[A-Za-z0-9.\-]+$")


#: Longest property value and comment kept (hostile tags can be kilobytes
#: long; a header line must stay under 998 characters, RFC 5322 2.1.1).
MAX_VALUE, MAX_COMMENT = 255, 120
#: Lines are folded between the parts of a result beyond this width.
WIDTH = 78


def _printable(text: str, limit: int) -> str:
    text = "".join(c if " " <= c <= "~" else "?" for c in text)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _value(text: str) -> str:
    """
    A property value: as it is when it is a token or an address, else a
    quoted-string (RFC 8601 2.2).
    """
    text = _printable(text, MAX_VALUE)
    if _TOKEN.match(text) or _ADDRESS.match(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _comment(text: str) -> str:
    text = _printable(text, MAX_COMMENT)
    return "(" + re.sub(r"([()\\])", r"\\\1", text) + ")"


def _resinfo(method: str, result: str, comment: str, properties: list[tuple[str, str]]) -> str:
    parts = [f"{method}={result}"]
    if comment:
        parts.append(_comment(comment))
    parts.extend(f"{name}={_value(value)}" for name, value in properties if value)
    lines = [parts[0]]
    for part in parts[1:]:
        if len(lines[-1]) + 1 + len(part) > WIDTH - 8:  # 8: the tab
            lines.append(part)
        else:
            lines[-1] += " " + part
    return "\n\t  ".join(lines)


def authentication_results(authserv_id: str, spf: Iterable[Any] = (), dkim: Iterable[Any] = (),
                           dmarc: Any = None) -> bytes:
    """
    One C{Authentication-Results:} field, folded, LF line endings: a
    C{dkim=} entry per signature (C{dkim=none} when there is none), a
    C{spf=} entry per identity checked, and C{dmarc=}.
    """
    entries = []
    signatures = list(dkim)
    for sig in signatures:
        entries.append(_resinfo("dkim", sig.result, sig.reason, [
            ("header.d", sig.domain), ("header.i", sig.identity), ("header.s", sig.selector),
            ("header.a", sig.algorithm), ("header.b", sig.b)]))
    if not signatures:
        entries.append("dkim=none")
    for result in spf:
        prop = "smtp.mailfrom" if result.identity == "mailfrom" else "smtp.helo"
        value = result.sender if result.identity == "mailfrom" else result.domain
        entries.append(_resinfo("spf", result.result, result.reason, [(prop, value)]))
    if dmarc is not None:
        comment = dmarc.reason
        if dmarc.result in ("pass", "fail"):
            comment = f"p={dmarc.policy} dis={dmarc.disposition}" + (
                f"; {dmarc.reason}" if dmarc.reason else "")
        entries.append(_resinfo("dmarc", dmarc.result, comment,
                                [("header.from", dmarc.from_domain)]))
    return ("Authentication-Results: " + _value(authserv_id) + ";\n\t" +
            ";\n\t".join(entries) + "\n").encode("ascii")


def _strip_comments(text: str) -> str:
    out, depth, escape = [], 0, False
    for c in text:
        if escape:
            escape = False
            if depth == 0:
                out.append(c)
            continue
        if c == "\\":
            escape = True
            if depth == 0:
                out.append(c)
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth == 0:
            out.append(c)
    return "".join(out)


def authserv_id(value: bytes | str) -> str:
    """
    The authserv-id of an C{Authentication-Results} field's value (its
    first item, comments and folding removed), lower-cased.
    """
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    text = _strip_comments(text).strip()
    if text.startswith('"'):
        match = re.match(r'"((?:[^"\\]|\\.)*)"', text)
        return re.sub(r"\\(.)", r"\1", match.group(1)).lower() if match else ""
    return re.split(r"[\s;]", text, maxsplit=1)[0].lower()


def remove_ours(message: bytes, our_id: str) -> bytes:
    """
    C{message} without the C{Authentication-Results} fields whose
    authserv-id is C{our_id} (RFC 8601 5: a forged one could otherwise pass
    for ours).  Everything else stays byte for byte, LF or CRLF.
    """
    our_id = our_id.lower()
    lines = message.splitlines(keepends=True)
    out: list[bytes] = []
    field: list[bytes] = []

    def flush() -> None:
        if field:
            name, _, value = b"".join(field).partition(b":")
            if not (name.strip().lower() == b"authentication-results" and
                    authserv_id(value) == our_id):
                out.extend(field)
            field.clear()

    for index, line in enumerate(lines):
        if line in (b"\n", b"\r\n"):
            flush()
            out.extend(lines[index:])
            return b"".join(out)
        if line[:1] in (b" ", b"\t") and field:
            field.append(line)
        else:
            flush()
            field.append(line)
    flush()
    return b"".join(out)
