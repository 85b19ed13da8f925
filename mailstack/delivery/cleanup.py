# -*- test-case-name: tests.test_cleanup -*-
"""
Normalises content that enters the system by a path other than SMTP DATA
(C{mailstack sendmail}'s maildrop, bounces and delay warnings, anything
given to L{mailstack.delivery.dispatch.Dispatcher.inject}), as Postfix's
cleanup daemon does for its pickup and bounce paths.

SMTP DATA refuses bad content outright (L{mailstack.smtp.data}); a local
script cannot be answered with a 550, so its content is repaired instead:

  - CRLF and a lone CR end a line, like LF (stored with LF endings):
    C{hello\\r.\\rMAIL FROM:...} becomes three lines, never a smuggled
    end of DATA at the next hop;
  - NUL characters are removed;
  - a line over 998 octets is folded: broken with LF SPACE, as Postfix's
    C{smtp_line_length_limit} does, so the message can be relayed
    (RFC 5321 4.5.3.1.6).
"""

from __future__ import annotations

MAX_LINE = 998  # octets, without the line ending


def normalize(content: bytes) -> bytes:
    """
    The content with LF line endings only, no NUL, and no line over
    L{MAX_LINE} octets.
    """
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if b"\0" in content:
        content = content.replace(b"\0", b"")
    if len(content) <= MAX_LINE:
        return content
    lines = content.split(b"\n")
    if max(map(len, lines)) <= MAX_LINE:
        return content
    out = []
    for line in lines:
        if len(line) <= MAX_LINE:
            out.append(line)
            continue
        # First piece MAX_LINE octets, then continuation lines of a space
        # and MAX_LINE - 1 octets.
        out.append(line[:MAX_LINE])
        for start in range(MAX_LINE, len(line), MAX_LINE - 1):
            out.append(b" " + line[start:start + MAX_LINE - 1])
    return b"\n".join(out)
