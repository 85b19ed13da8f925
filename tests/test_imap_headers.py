"""
The header-field parser of L{mailstack.access.headers} (issue 18, the
first read of a folder) gives the IMAP answers the C{email} package gave:
ENVELOPE strings, field values, content types, HEADER.FIELDS bytes and
SEARCH hits, over generated and hostile header blocks, with and without
the folder's index.

The reference here is the code as it was before the parser (the C{email}
package, policy C{compat32}, on the unfolded header block), kept in this
file so that the comparison does not depend on the code it checks.
"""

import os
import re
from email.header import decode_header, make_header
from email.parser import BytesHeaderParser
from email.policy import compat32

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from mailstack.access import search
from mailstack.access.addresses import parse_addresses
from mailstack.access.headers import HeaderFields, raw_fields
from mailstack.access.index import (
    CACHED_FIELDS, ENVELOPE_FIELDS, CachedPart, decode_records, encode_records, make_record,
    reduced_header,
)
from mailstack.access.limits import (
    MAX_ADDRESS_FIELD, MAX_ENVELOPE_ADDRESSES, MAX_HEADER_PARSE,
)
from mailstack.access.mime import Part, crlf, header_fields, string
from mailstack.access.search import Candidate, matches

# -- the reference: what mime.Part did with the email package ------------------------

_parser = BytesHeaderParser(policy=compat32)
_FOLD = re.compile(rb"\r?\n(?=[ \t])")


def _old_bounded(header):
    if len(header) <= MAX_HEADER_PARSE:
        return header
    cut = header.rfind(b"\r\n", 0, MAX_HEADER_PARSE)
    return header[:cut + 2 if cut > 0 else MAX_HEADER_PARSE] + b"\r\n"


class OldHeader:
    """
    A header block's answers as the email package gave them.
    """

    def __init__(self, header, default_type="text/plain"):
        self.header = header
        self.fields = _parser.parsebytes(_FOLD.sub(b"", _old_bounded(header)))
        self.fields.set_default_type(default_type)

    def header_value(self, name):
        value = self.fields.get(name)
        if value is None:
            return None
        return str(value).encode("utf-8", "surrogateescape").strip()

    def header_values(self, name):
        return [str(v).encode("utf-8", "surrogateescape").strip()
                for v in self.fields.get_all(name) or []]

    def cached_values(self):
        values = {}
        for name, value in self.fields.items():
            if name.lower() in {n.decode() for n in CACHED_FIELDS}:
                values.setdefault(name.lower().encode(), []).append(
                    str(value).encode("utf-8", "surrogateescape").strip())
        return values

    def envelope(self):
        def bounded(value):
            if len(value) > MAX_ADDRESS_FIELD:
                cut = value.rfind(b",", 0, MAX_ADDRESS_FIELD)
                value = value[:cut if cut > 0 else MAX_ADDRESS_FIELD]
            return value.decode("utf-8", "surrogateescape")

        def addresses(name, fallback=None):
            value = self.header_value(name)
            found = (parse_addresses(bounded(value))[:MAX_ENVELOPE_ADDRESSES]
                     if value else [])
            if not found and fallback is not None:
                return addresses(fallback)
            items = [b"(" + b" ".join([string(a.name), string(a.route), string(a.mailbox),
                                       string(a.host)]) + b")" for a in found]
            return b"(" + b"".join(items) + b")" if items else b"NIL"

        return b"(" + b" ".join([
            string(self.header_value("date")), string(self.header_value("subject")),
            addresses("from"), addresses("sender", "from"), addresses("reply-to", "from"),
            addresses("to"), addresses("cc"), addresses("bcc"),
            string(self.header_value("in-reply-to")), string(self.header_value("message-id")),
        ]) + b")"


def old_text(value):
    raw = value.decode("utf-8", "replace")
    try:
        return str(make_header(decode_header(raw))).lower()
    except (ValueError, LookupError, UnicodeError):
        return raw.lower()


# -- generated header blocks ----------------------------------------------------------

NAMES = [n.decode() for n in sorted(CACHED_FIELDS)] + [
    "From", "SUBJECT", "X-Other", "Received", "Content-Disposition", "From ", "from",
    "bad name", "", "X:Y", "\u212a", "Subj\xe9ct",
]
VALUE_BITS = [
    b"Bob <bob@remote.test>", b"=?utf-8?q?J=C3=BCrgen?= <j@x.test>", b"group: a@b.test, c@d;",
    b"\"quoted, name\" <q@x>", b"(comment) x@y (other)", b"<@route,@r2:u@h>", b"undisclosed:;",
    b"=?utf-8?b?w6l0w6k=?=", b"=?bogus?q?x?=", b"=?utf-8?b?!!!?=", b"=?utf-8?q?broken",
    b"\xc3\xa9t\xc3\xa9", b"\xff\xfe", b"\x00", b"\r", b"\n", b"\r\n", b"\r\n ", b"\r\n\t",
    b"\n ", b"\r ", b" ", b"\t", b";", b":", b",", b"<", b">", b"\"", b"(", b")", b"\\",
    b"text/plain; charset=utf-8", b"multipart/mixed; boundary=x", b"TEXT/HTML", b"a/b/c",
    b"Mon, 2 Nov 2026 10:00:00 +0000", b"invoice", b"\x1c", b"\x0b", b"\x0c", b"From ",
    b"=?", b"?=",
]
field_names = st.sampled_from([
    b"From", b"To", b"Cc", b"Bcc", b"Subject", b"Date", b"Message-ID", b"In-Reply-To",
    b"References", b"Sender", b"Reply-To", b"Content-Type", b"X-Other", b"from", b"SUBJECT",
    b"Received", b"List-ID", b"Bad Name", b"", b"From ", b" From", b"\tTo", b"X\xe9",
])
separators = st.sampled_from([b":", b": ", b":\t", b" :", b"", b"::"])
values = st.lists(st.sampled_from(VALUE_BITS), max_size=8).map(b"".join)
endings = st.sampled_from([b"\r\n", b"\r\n", b"\r\n", b"\n", b"\r", b"\r\n\r\n", b"\r\n "])
lines = st.tuples(field_names, separators, values, endings).map(b"".join)
headers = st.one_of(
    st.lists(lines, max_size=14).map(b"".join),
    st.binary(max_size=300),
    st.lists(st.sampled_from(VALUE_BITS + [b"Subject:", b"From:", b"To:"]), max_size=30)
    .map(b"".join),
)

SAMPLES = [
    b"From: Bob <bob@remote.test>\r\nSubject: hello\r\n\r\n",
    b"From nobody Mon Nov  2 10:00:00 2026\r\nFrom: a@b\r\nFrom x@y\r\nTo: c@d\r\n\r\n",
    b" leading: continuation\r\nSubject: after\r\n\r\n",
    b"Subject: one\r\ngarbage line\r\nFrom: hidden@x\r\n\r\n",
    b":no name\r\nFrom: a@b\r\n  folded\r\n\r\n",
    b"Subject: bare\rCR\r\nTo: x\r y@z\r\n\r\n",
    b"Subject: a\r\nSubject: b\r\nTo: 1@x\r\nto: 2@x\r\n\r\n",
    b"Content-Type: multipart/mixed\r\n\r\n",
    b"Content-Type: Multipart/Mixed; boundary=\"b\"\r\n\r\n",
    b"Content-Type: text/\xe9; x\r\n\r\n",
    b"Subject: \x00nul\x00\r\nFrom: \x1cx@y\x1c\r\n\r\n",
    b"From ",
    b"",
    b"\r\n",
]


def check_same(test, header):
    """
    Every answer of the new parser for C{header} is the old one.
    """
    block = Part(header).header  # the header block as the server cuts it
    old = OldHeader(block)
    new = HeaderFields.parse(block)
    for name in NAMES:
        test.assertEqual(new.all(name), old.header_values(name), (block, name))
        test.assertEqual(new.value(name), old.header_value(name), (block, name))
    for default in ("text/plain", "message/rfc822"):
        test.assertEqual(new.content_type(default),
                         OldHeader(block, default).fields.get_content_type(), block)
    expected = old.envelope()
    test.assertEqual(Part(block).envelope(), expected, block)
    stat = os.stat(__file__)
    record = make_record(block, stat, 100, envelope=True)
    if len(block) > MAX_HEADER_PARSE:  # not cached: read from the file each time
        test.assertIsNone(record)
        return
    test.assertEqual(record.envelope, expected, block)
    test.assertEqual(record.values, old.cached_values(), block)
    again = decode_records(encode_records({"base": record}))["base"]  # through the file
    test.assertEqual((again.header, again.values, again.envelope),
                     (record.header, record.values, record.envelope), block)
    for text in (block, block + b"X: after\r\n", block.rstrip(b"\r\n")):
        test.assertEqual(reduced_header(text), b"".join(
            raw for name, raw in header_fields(text) if name in CACHED_FIELDS) + b"\r\n")
    lazy = CachedPart(make_record(block, stat, 100))  # ENVELOPE made from the record
    test.assertEqual(lazy.envelope(), expected, block)
    wanted = [b"FROM", b"Subject", b"date", b"TO", b"x-other"]
    test.assertEqual(lazy.section((), "HEADER.FIELDS", wanted[:4]),
                     Part(block).section((), "HEADER.FIELDS", wanted[:4]), block)
    for query in ([b"SUBJECT", b"invoice"], [b"SUBJECT", b"\xc3\xa9t\xc3\xa9"],
                  [b"FROM", b"bob"], [b"FROM", b"j\xc3\xbcrgen"], [b"TO", b"c@d"],
                  [b"CC", b"x"], [b"BCC", b"a"], [b"SENTSINCE", b"1-Nov-2026"],
                  [b"HEADER", b"message-id", b"a"], [b"HEADER", b"references", b""],
                  [b"SUBJECT", b"=?"], [b"SUBJECT", b"\x00"]):
        reference = matches(query, Candidate(1, 7, set(), 10, 0.0, old), 1, 7)
        for part in (Part(block), lazy, lazy):  # the second: texts kept in memory
            test.assertEqual(matches(query, Candidate(1, 7, set(), 10, 0.0, part), 1, 7),
                             reference, (block, query))


class SameAnswersTests(SynchronousTestCase):
    def test_samples(self):
        for header in SAMPLES:
            check_same(self, header)

    @settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(headers)
    @example(b"Subject: x\r\n\r\n")
    def test_generated(self, header):
        check_same(self, header)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.sampled_from(VALUE_BITS), max_size=12).map(b"".join))
    def test_search_text(self, value):
        """
        SEARCH's decoding of a value (RFC 2047 words) is the email
        package's, with and without encoded words.
        """
        self.assertEqual(search._text(value), old_text(value))

    def test_huge_folds(self):
        """
        A long folded field and a header block past L{MAX_HEADER_PARSE}:
        the same answers, and fields past the limit stay invisible.
        """
        folded = b"Subject: start" + b"\r\n continued" * 20000 + b"\r\nTo: x@y\r\n\r\n"
        check_same(self, folded)
        past = (b"X-Pad: " + b"p" * (MAX_HEADER_PARSE - 20) + b"\r\nFrom: late@x\r\n"
                + b"To: later@x\r\n\r\n")
        check_same(self, past)
        self.assertIsNone(HeaderFields.parse(past).value("to"))
        many = b"".join(b"To: a%d@x\r\n" % i for i in range(30000)) + b"\r\n"
        check_same(self, many)

    def test_unix_from_and_stop_line(self):
        """
        The quirks kept: a first C{From } line is no field, and a line
        that is no field ends the fields.
        """
        fields = raw_fields(crlf(b"From a@b Mon\nSubject: s\nnot a field\nTo: t@x\n\n"))
        self.assertEqual(fields, [(b"Subject", b"s")])

    def test_envelope_fields_cached(self):
        """
        Every field an ENVELOPE shows is kept in a record (else a cached
        ENVELOPE could differ from one read from the file).
        """
        self.assertTrue(set(ENVELOPE_FIELDS) <= CACHED_FIELDS)


address_text = st.lists(st.sampled_from([
    "a", "b.c", "x@y", "@", ".", ",", " ", "\t", "<", ">", "Name", "J.", "\u00e9", "\x0b",
    "\udce9", '"', "(", ")", ":", ";", "[", "]", "\\", "\r\n", "=?utf-8?q?x?=",
]), max_size=20).map("".join)


class AddressTests(SynchronousTestCase):
    @settings(max_examples=500, deadline=None)
    @given(address_text)
    @example("Sender 5 <sender5@remote.test>, a@b.c,, <x@y> ,")
    @example(" A  B\t<x.y@z> , c@d,")
    def test_simple_forms(self, text):
        """
        The common forms read without tokens give what the tokenizer gives.
        """
        from mailstack.access import addresses

        simple = addresses._simple(text)
        if simple is not None:
            self.assertEqual(simple, addresses._parse(text), text)
        self.assertEqual(addresses.parse_addresses(text), addresses._parse(text), text)

    def test_simple_used(self):
        from mailstack.access import addresses

        self.assertIsNotNone(addresses._simple("Sender 5 <s5@remote.test>, a@b.test"))
        self.assertIsNone(addresses._simple('"Quoted" <q@x>'))
