# -*- test-case-name: tests.test_imap_store -*-
"""
IMAP sequence sets and SEARCH keys (RFC 3501 6.4.4).

Twisted's own search helpers compare C{str} header values with C{bytes}
search strings on Python 3 and cannot match; this evaluator works on what
the mailbox loaded: flags, sizes and dates from the file name and C{stat},
the header block only when a key needs it, the body only for BODY/TEXT.
"""

from __future__ import annotations

import email.utils
import re
import time
from dataclasses import dataclass
from datetime import date, datetime
from email.header import decode_header, make_header
from typing import Any, Callable

from mailstack.access.addresses import search_text
from mailstack.access.headers import HeaderFields
from mailstack.access.index import CachedPart, Record
from mailstack.access.mime import Part

Ranges = list[tuple[int | None, int | None]]

_MONTHS = {m: i for i, m in enumerate(
    ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}


class SearchError(ValueError):
    """
    A malformed sequence set or search key (answered with BAD).
    """


def parse_set(text: bytes) -> Ranges:
    """
    C{1:3,7,9:*} as ranges; None stands for C{*}.
    """
    ranges: Ranges = []
    for item in text.split(b","):
        ends = item.split(b":")
        if len(ends) > 2 or not item:
            raise SearchError(f"bad sequence set {text!r}")
        values: list[int | None] = []
        for end in ends:
            if end == b"*":
                values.append(None)
            elif end.isdigit() and int(end) > 0:
                values.append(int(end))
            else:
                raise SearchError(f"bad sequence set {text!r}")
        ranges.append((values[0], values[-1]))
    return ranges


def in_set(n: int, ranges: Ranges, last: int) -> bool:
    for lo, hi in ranges:
        a = last if lo is None else lo
        b = last if hi is None else hi
        if min(a, b) <= n <= max(a, b):
            return True
    return False


_SET_WORD = re.compile(rb"[0-9:*,]+")


def is_set(word: Any) -> bool:
    """
    Whether a search key is a sequence set (asked of every key of every
    message searched: one regex match).
    """
    return isinstance(word, bytes) and _SET_WORD.fullmatch(word) is not None


@dataclass
class Candidate:
    """
    One message as a search key sees it.
    """

    seq: int
    uid: int
    flags: set[str]
    size: int
    internal_date: float
    part: Part | CachedPart | None  # the header only (maybe from the index), or all of it


HEADER_KEYS = {b"BCC", b"CC", b"FROM", b"HEADER", b"SUBJECT", b"TO", b"SENTBEFORE",
               b"SENTON", b"SENTSINCE"}
BODY_KEYS = {b"BODY", b"TEXT"}
ARGS = {b"BCC": 1, b"BEFORE": 1, b"BODY": 1, b"CC": 1, b"FROM": 1, b"HEADER": 2,
        b"KEYWORD": 1, b"LARGER": 1, b"ON": 1, b"SENTBEFORE": 1, b"SENTON": 1,
        b"SENTSINCE": 1, b"SINCE": 1, b"SMALLER": 1, b"SUBJECT": 1, b"TEXT": 1, b"TO": 1,
        b"UID": 1, b"UNKEYWORD": 1, b"NOT": 0, b"OR": 0}
FLAG_KEYS = {
    b"ANSWERED": ("\\Answered", True), b"UNANSWERED": ("\\Answered", False),
    b"DELETED": ("\\Deleted", True), b"UNDELETED": ("\\Deleted", False),
    b"DRAFT": ("\\Draft", True), b"UNDRAFT": ("\\Draft", False),
    b"FLAGGED": ("\\Flagged", True), b"UNFLAGGED": ("\\Flagged", False),
    b"SEEN": ("\\Seen", True), b"UNSEEN": ("\\Seen", False),
    b"RECENT": ("\\Recent", True), b"OLD": ("\\Recent", False),
}


#: How deep search keys may nest (NOT, OR, parentheses): the matcher
#: recurses once per level, and real clients nest a few levels at most.
MAX_DEPTH = 100


def check_depth(query: list[Any], limit: int = MAX_DEPTH) -> None:
    """
    Raise L{SearchError} (a C{BAD}) when the keys of C{query} nest deeper
    than C{limit}: C{NOT NOT NOT ...} or C{OR ALL OR ALL ...} thousands
    deep would otherwise exhaust the matcher's recursion.  Iterative, so
    any query is measured without recursing.
    """
    todo: list[tuple[list[Any], int]] = [(query, 0)]
    while todo:
        words, base = todo.pop()
        owed: list[int] = []  # operands still owed to the open NOT/OR keys
        i = 0
        while i < len(words):
            word = words[i]
            i += 1
            level = base + len(owed)
            if level > limit:
                raise SearchError(f"search keys nested deeper than {limit}")
            if isinstance(word, list):
                todo.append((word, level + 1))
            elif isinstance(word, bytes):
                key = word.upper()
                if key in (b"NOT", b"OR"):
                    owed.append(1 if key == b"NOT" else 2)
                    continue
                i += ARGS.get(key, 0)
            while owed:  # one operand done: it completes the keys it ends
                owed[-1] -= 1
                if owed[-1]:
                    break
                owed.pop()


def needs(query: list[Any]) -> int:
    """
    What the keys read: 0 nothing, 1 the header block, 2 the whole message.
    """
    level = 0
    for word in query:
        if isinstance(word, list):
            level = max(level, needs(word))
        elif isinstance(word, bytes):
            upper = word.upper()
            if upper in BODY_KEYS:
                return 2
            if upper in HEADER_KEYS:
                level = 1
    return level


def parse_date(word: Any) -> date:
    try:
        day, month, year = word.decode("ascii").split("-")
        return date(int(year), _MONTHS[month.lower()], int(day))
    except (AttributeError, ValueError, KeyError, UnicodeDecodeError):
        raise SearchError(f"bad date {word!r}") from None


def _text(value: bytes | None) -> str:
    if value is None:
        return ""
    raw = value.decode("utf-8", "replace")
    if "=?" not in raw:  # no encoded word: what make_header(decode_header()) gives
        return raw.lower()
    try:
        return str(make_header(decode_header(raw))).lower()
    except (ValueError, LookupError, UnicodeError):
        return raw.lower()


def _needle(word: Any) -> str:
    if word is None:  # the atom NIL is a valid astring: the text "NIL"
        return "nil"
    if not isinstance(word, bytes):
        raise SearchError("a search string is missing")
    return word.decode("utf-8", "replace").lower()


ADDRESS_KEYS = {b"FROM", b"TO", b"CC", b"BCC"}


def _field_texts(c: Candidate, name: str) -> list[str]:
    """
    Every occurrence of a header field, decoded, lowercased; address
    fields as C{name <mailbox@host>} lists (comments out, groups in).
    """
    return _part_texts(c.part, name)


def _part_texts(part: Part | CachedPart | None, name: str) -> list[str]:
    if part is None:
        return []
    if isinstance(part, CachedPart):  # decoded once per message, then kept
        found = part.texts.get(name.lower())
        if found is None:
            found = part.texts[name.lower()] = _decoded_texts(part, name)
        return found
    return _decoded_texts(part, name)


def _decoded_texts(part: Part | CachedPart, name: str) -> list[str]:
    return _decoded(part.header_values(name), name)


def _record_texts(record: Record, name: str) -> list[str]:
    """
    L{_part_texts} of the record's L{CachedPart}, reading only the field's
    own lines when the record's values were not parsed yet.
    """
    found = record.texts.get(name)
    if found is None:
        key = HeaderFields.key(name)
        values = record.field_values(key) if key is not None else []
        found = record.texts[name] = _decoded(values, name)
    return found


def _decoded(raw: list[bytes], name: str) -> list[str]:
    values = [v.replace(b"\r\n", b"").replace(b"\n", b"") for v in raw]
    if name.upper().encode() in ADDRESS_KEYS:
        return [_text(search_text(v.decode("utf-8", "replace")).encode("utf-8"))
                + " " + _text(v) for v in values]
    return [_text(v) for v in values]


def _sent(c: Candidate) -> date | None:
    value = c.part.header_value("date") if c.part else None
    if value is None:
        return None
    parsed = email.utils.parsedate(value.decode("ascii", "replace"))
    return date(*parsed[:3]) if parsed else None


def matches(query: list[Any], c: Candidate, last_seq: int, last_uid: int) -> bool:
    """
    Whether every key of C{query} holds for C{c}.
    """
    words = list(query)
    while words:
        if not _one(words, c, last_seq, last_uid):
            return False
    return True


def _take(words: list[Any]) -> Any:
    if not words:
        raise SearchError("a search key lacks its argument")
    return words.pop(0)


def _one(words: list[Any], c: Candidate, last_seq: int, last_uid: int) -> bool:
    word = words.pop(0)
    if isinstance(word, list):
        return matches(word, c, last_seq, last_uid)
    if not isinstance(word, bytes):
        raise SearchError(f"bad search key {word!r}")
    key = word.upper()
    if is_set(key):
        return in_set(c.seq, parse_set(key), last_seq)
    if key == b"ALL":
        return True
    if key in FLAG_KEYS:
        flag, present = FLAG_KEYS[key]
        return (flag in c.flags) == present
    if key == b"NEW":
        return "\\Recent" in c.flags and "\\Seen" not in c.flags
    if key == b"NOT":
        return not _one(words, c, last_seq, last_uid)
    if key == b"OR":
        first = _one(words, c, last_seq, last_uid)
        second = _one(words, c, last_seq, last_uid)
        return first or second
    if key in (b"KEYWORD", b"UNKEYWORD"):
        keyword = _needle(_take(words))
        return (keyword in {f.lower() for f in c.flags}) == (key == b"KEYWORD")
    if key in (b"LARGER", b"SMALLER"):
        arg = _take(words)
        if not isinstance(arg, bytes) or not arg.isdigit():
            raise SearchError(f"bad size {arg!r}")
        return c.size > int(arg) if key == b"LARGER" else c.size < int(arg)
    if key == b"UID":
        return in_set(c.uid, parse_set(_take(words)), last_uid)
    if key in (b"BEFORE", b"ON", b"SINCE"):
        wanted = parse_date(_take(words))
        day = datetime.fromtimestamp(c.internal_date).date()
        return _compare(key, day, wanted)
    if key in (b"SENTBEFORE", b"SENTON", b"SENTSINCE"):
        wanted = parse_date(_take(words))
        sent = _sent(c)
        return sent is not None and _compare(key[4:], sent, wanted)
    if key in (b"FROM", b"TO", b"CC", b"BCC", b"SUBJECT"):
        needle = _needle(_take(words))
        return any(needle in text for text in _field_texts(c, key.decode().lower()))
    if key == b"HEADER":
        name = _take(words)
        needle = _needle(_take(words))
        if name is None:
            name = b"NIL"
        if not isinstance(name, bytes):
            raise SearchError("bad HEADER field name")
        return any(needle in text for text in _field_texts(c, name.decode("ascii", "replace")))
    if key in BODY_KEYS:
        octets = _needle(_take(words)).encode("utf-8")
        if not isinstance(c.part, Part):  # BODY and TEXT always load the whole message
            return False
        haystack = (c.part.raw if key == b"TEXT" else c.part.body).lower()
        return octets in haystack
    raise SearchError(f"unknown search key {word.decode('ascii', 'replace')}")


#: The node kinds of a parsed query (see L{evaluate}).
_AND, _NOT, _OR, _FIELD, _KEY = range(5)
#: Between the values of a field in a column's text: a needle holding
#: it is tested value by value instead.
_JOIN = "\0"

Columns = dict[str, tuple[list[Any], list[str]]]


def _parse_all(words: list[Any]) -> tuple[Any, ...]:
    nodes = []
    at = [0]
    while at[0] < len(words):
        nodes.append(_parse_one(words, at))
    return (_AND, nodes)


def _parse_one(words: list[Any], at: list[int]) -> tuple[Any, ...]:
    def take() -> Any:
        if at[0] >= len(words):
            raise SearchError("a search key lacks its argument")
        at[0] += 1
        return words[at[0] - 1]

    word = take()
    if isinstance(word, list):
        return _parse_all(word)
    if not isinstance(word, bytes):
        raise SearchError(f"bad search key {word!r}")
    key = word.upper()
    if key == b"NOT":
        return (_NOT, _parse_one(words, at))
    if key == b"OR":
        first = _parse_one(words, at)
        return (_OR, first, _parse_one(words, at))
    if key in (b"FROM", b"TO", b"CC", b"BCC", b"SUBJECT"):
        return (_FIELD, key.decode().lower(), _needle(take()))
    if key == b"HEADER":
        name = take()
        needle = _needle(take())
        if name is None:
            name = b"NIL"
        if not isinstance(name, bytes):
            raise SearchError("bad HEADER field name")
        return (_FIELD, name.decode("ascii", "replace").lower(), needle)
    leaf = [word] + [take() for _ in range(0 if is_set(key) else ARGS.get(key, 0))]
    return (_KEY, leaf)


class Messages:
    """
    The messages a SEARCH runs over, column by column: what the header
    keys of each read (its index record, its part read from the file, or
    None), and its L{Candidate}, made only when a key needs one.
    """

    def __init__(self, sources: list[Record | Part | None],
                 candidate: Callable[[int], Candidate]) -> None:
        """
        @param sources: per message, its record or its part.
        @param candidate: the L{Candidate} of the message at an index.
        """
        self.sources = sources
        self._candidate = candidate
        self._candidates: list[Candidate] | None = None

    @classmethod
    def of(cls, candidates: list[Candidate]) -> Messages:
        """
        The messages of ready-made candidates.
        """
        sources = [c.part.record if isinstance(c.part, CachedPart) else c.part
                   for c in candidates]
        return cls(sources, candidates.__getitem__)

    def candidates(self) -> list[Candidate]:
        if self._candidates is None:
            self._candidates = [self._candidate(i) for i in range(len(self.sources))]
        return self._candidates

    def part(self, i: int) -> Part | CachedPart | None:
        source = self.sources[i]
        return CachedPart(source) if isinstance(source, Record) else source


def evaluate(query: list[Any], messages: Messages | list[Candidate], last_seq: int,
             last_uid: int, columns: Columns | None = None) -> list[bool]:
    """
    Whether every key of C{query} holds, for each message (the same
    answers as L{matches} gives one by one).  Header-field keys (C{FROM},
    C{TO}, C{CC}, C{BCC}, C{SUBJECT}, C{HEADER}) are tested column-wise:
    the decoded, lowercased values of the field of every message, one
    text each, searched in one tight loop; the other keys per message.

    @param messages: the messages, or their candidates.
    @param columns: where the texts of each field are kept between calls,
        with the records they were made of: a later search over the same
        records (the folder unchanged) reuses them.
    @raise SearchError: a key lacks its argument (checked before any
        message is looked at), or an argument is malformed.
    """
    tree = _parse_all(list(query))
    if isinstance(messages, list):
        messages = Messages.of(messages)
    return _evaluate(tree, messages, last_seq, last_uid, columns)


def _evaluate(node: tuple[Any, ...], messages: Messages, last_seq: int,
              last_uid: int, columns: Columns | None) -> list[bool]:
    kind = node[0]
    if kind == _AND:
        result = [True] * len(messages.sources)
        for child in node[1]:
            found = _evaluate(child, messages, last_seq, last_uid, columns)
            result = [a and b for a, b in zip(result, found)]
        return result
    if kind == _NOT:
        return [not a for a in _evaluate(node[1], messages, last_seq, last_uid, columns)]
    if kind == _OR:
        first = _evaluate(node[1], messages, last_seq, last_uid, columns)
        second = _evaluate(node[2], messages, last_seq, last_uid, columns)
        return [a or b for a, b in zip(first, second)]
    if kind == _FIELD:
        name, needle = node[1], node[2]
        if not needle or _JOIN in needle:  # "" is in every text, present or not
            return [any(needle in t for t in _part_texts(messages.part(i), name))
                    for i in range(len(messages.sources))]
        return [needle in text for text in _column(messages, name, columns)]
    words = node[1]
    return [_one(list(words), c, last_seq, last_uid) for c in messages.candidates()]


def _column(messages: Messages, name: str, columns: Columns | None) -> list[str]:
    """
    The texts of field C{name} of every message, each one string (its
    values joined by L{_JOIN}), from C{columns} when made of the same
    records.
    """
    # A cached message is known by its record (replaced when the file
    # changes); a message read from its file by its part, new each time.
    sources = messages.sources
    if columns is not None:
        kept = columns.get(name)
        if kept is not None and kept[0] == sources:  # identity: records have no __eq__
            return kept[1]
    texts = []
    for source in sources:
        if isinstance(source, Record):
            found = _record_texts(source, name)
        else:
            found = _part_texts(source, name)
        texts.append(_JOIN.join(found))
    if columns is not None and not any(isinstance(s, Part) for s in sources):
        columns[name] = (list(sources), texts)  # never a read part: kept for nothing
    return texts


def _compare(key: bytes, day: date, wanted: date) -> bool:
    if key == b"BEFORE":
        return day < wanted
    if key == b"ON":
        return day == wanted
    return day >= wanted


def imap_date(timestamp: float) -> bytes:
    """
    An INTERNALDATE: C{"17-Jul-1996 02:44:25 -0700"}, local time.
    """
    local = time.localtime(timestamp)
    offset = local.tm_gmtoff // 60
    sign = "+" if offset >= 0 else "-"
    month = list(_MONTHS)[local.tm_mon - 1].capitalize()
    return (f'"{local.tm_mday:2d}-{month}-{local.tm_year} '
            f'{local.tm_hour:02d}:{local.tm_min:02d}:{local.tm_sec:02d} '
            f'{sign}{abs(offset) // 60:02d}{abs(offset) % 60:02d}"').encode("ascii")
