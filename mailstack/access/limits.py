# -*- test-case-name: tests.test_access_abuse,tests.test_folder_limits -*-
"""
What one IMAP or POP3 session, one message and one user may cost the
server: the limits, their defaults (Dovecot's where it has one), and the
small helpers the protocols share to enforce them and to answer malformed
input with the protocol's own error, never with exception text.

  - input: while a command runs the session stops reading (the kernel's
    socket buffer holds the rest); what it has already read is capped at
    L{AccessLimits.max_buffered} bytes (C{* BYE} / C{-ERR}, closed);
  - literals: at most C{--max-message-size} for APPEND and
    L{AccessLimits.max_string_literal} for any other string, refused
    before the upload; a literal's size is digits only (no C{{-1}});
  - idle: IMAP 60 s before login (Dovecot's pre-login default), 30
    minutes after (RFC 3501 5.4); POP3 10 minutes (RFC 1939 3); a
    command's literals must arrive within the same time;
  - MIME: nesting at most 100 levels, at most 10,000 parts per message
    (Dovecot's limits since CVE-2020-12100); beyond them the rest is one
    opaque part; at most 1,000 addresses per ENVELOPE field;
  - folders: at most 1,000 per user; a folder's directory name (modified
    UTF-7, with the level separators) at most 255 bytes, the file system's
    limit for one name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.mail.imap4 import (
    IllegalClientResponse, IllegalMailboxEncoding, IllegalOperation, MailboxException,
)

# -- MIME -------------------------------------------------------------------------
MAX_MIME_DEPTH = 100
MAX_MIME_PARTS = 10_000
MAX_ENVELOPE_ADDRESSES = 1_000
MAX_ADDRESS_FIELD = 64 * 1024  # bytes of one address header that are parsed
MAX_HEADER_PARSE = 256 * 1024  # bytes of a header block whose fields count

# -- folders ----------------------------------------------------------------------
MAX_FOLDERS = 1_000
MAX_FOLDER_NAME = 255  # bytes of the Maildir++ directory name, dot included


@dataclass(frozen=True)
class AccessLimits:
    """
    Per-session limits of the IMAP and POP3 services.
    """

    max_buffered: int = 1 << 20  # bytes read but not yet processed
    max_string_literal: int = 64 * 1024  # a literal that is not an APPEND message
    max_bad_commands: int = 20  # BAD answers in a row, then BYE (Dovecot: 20)
    imap_preauth_timeout: float = 60.0
    imap_timeout: float = 30 * 60.0
    pop3_timeout: float = 10 * 60.0
    close_grace: float = 10.0  # after BYE, a client that does not read is cut


class FolderLimit(MailboxException):
    """
    A folder operation over a limit: answered C{NO [LIMIT]} (RFC 5530).
    """


class SyntaxFault(IllegalClientResponse):
    """
    Client input an argument parser could not make sense of.
    """


# RFC 3501 tag: 1*<ASTRING-CHAR except "+">; ASTRING-CHAR is ATOM-CHAR or "]".
TAG = re.compile(rb'[!#$&\'\-,./0-9:;<=>?@A-Z\[\]^_`a-z|}~]+')
COMMAND = re.compile(rb"[A-Za-z][A-Za-z0-9]*")
_LITERAL = re.compile(rb"\{([0-9]{1,10})\}")
_UNPRINTABLE = re.compile(r"[^\x20-\x7e]")


def clean_text(value: Any, limit: int = 120) -> bytes:
    """
    Text for a reply: printable ASCII only, shortened.
    """
    text = value if isinstance(value, str) else str(value)
    text = _UNPRINTABLE.sub("?", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("ascii")


def literal_size(spec: bytes, limit: int) -> int:
    """
    The size of a literal announced as C{{N}} (RFC 3501: digits only).

    @raise IllegalClientResponse: malformed, or larger than C{limit}
        (C{[TOOBIG]}, before the client sends it).
    """
    match = _LITERAL.fullmatch(spec.strip())
    if match is None:
        raise IllegalClientResponse("Malformed literal")
    size = int(match.group(1))
    if size > limit:
        raise IllegalClientResponse(f"[TOOBIG] Literals are limited to {limit} bytes here")
    return size


PROTOCOL_ERRORS = (IllegalClientResponse, IllegalOperation, IllegalMailboxEncoding,
                   MailboxException)


def strict_parser(parser: Callable[[Any, bytes], Any]) -> Callable[[Any, bytes], Any]:
    """
    An argument parser whose unexpected exceptions (Twisted's parsers raise
    ValueError, IndexError, TypeError, MismatchedNesting, ... on odd input)
    become L{SyntaxFault}: the client's error, answered BAD.
    """
    def convert(error: Exception) -> Exception:
        if isinstance(error, PROTOCOL_ERRORS):
            return error
        return SyntaxFault("Syntax error in the arguments")

    def parse(self: Any, line: bytes) -> Any:
        try:
            result = parser(self, line)
        except Exception as e:  # whatever Twisted's parser raises becomes a protocol error
            raise convert(e) from e
        if isinstance(result, Deferred):
            def failed(failure: Any) -> Any:
                raise convert(failure.value)
            result.addErrback(failed)
        return result

    parse.__name__ = getattr(parser, "__name__", "parse")
    return parse
