# -*- test-case-name: tests.test_rspamd -*-
"""
The built-in C{rspamd} filter (C{--filter rspamd}): scans each message at
DATA with rspamd's HTTP protocol (C{POST /checkv2}, what rspamd's own
proxy speaks) and turns its answer into a verdict:

  - C{no action}: delivered, with C{X-Spamd-Result} (score and symbols)
    and C{X-Spam: No} prepended;
  - C{add header} and C{rewrite subject}: C{X-Spam: Yes} as well, and
    filed into the C{Junk} folder (local Maildir delivery).  mailstack
    never edits a message's own header fields, so the subject is not
    rewritten: the Junk folder and C{X-Spam: Yes} say the same;
  - C{greylist} and C{soft reject}: C{451 4.7.1} (rspamd's message if any);
  - C{reject}: C{554 5.7.1} (rspamd's message, or "Spam message rejected").

Header fields rspamd asks for (C{milter.add_headers}) are prepended too.
Mail from authenticated users and from local injection is not scanned
unless C{scan-outbound} is set.  If rspamd cannot be reached, fails or
does not answer within C{timeout}, the message is tempfailed
(C{on-failure = "tempfail"}, the default, Postfix's
C{milter_default_action}) or accepted unscanned with a log line
(C{"accept"}); never lost.

Options (C{[plugins.rspamd]}): C{url} (default
C{http://127.0.0.1:11333}), C{timeout} (seconds, default 20),
C{on-failure}, C{junk-folder} (default C{Junk}; C{""} for the inbox),
C{scan-outbound} (default false), C{password} (sent as rspamd's
C{Password} header, for a controller or proxy that needs one).
"""

from __future__ import annotations

import json
import re
from io import BytesIO
from typing import Any

from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from twisted.plugin import IPlugin
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from zope.interface import implementer

from mailstack.config import ConfigError
from mailstack.interfaces import IMessageFilterFactory
from mailstack.plugin import Verdict, check_folder, check_options
from mailstack.reactors import IMailReactor
from mailstack.smtp.filters import MessageFilter
from mailstack.smtp.reply import Reply

log = Logger()

_UNSAFE = re.compile(r"[^\x20-\x7e]")


def clean(text: Any, limit: int = 200) -> str:
    """
    Printable ASCII only, bounded: rspamd's words may quote the message.
    """
    return _UNSAFE.sub("?", str(text))[:limit]


def _url(value: Any) -> str:
    text = str(value).rstrip("/")
    if not re.fullmatch(r"https?://[A-Za-z0-9.:\[\]-]+(/[^\s]*)?", text):
        raise ValueError(f"not an http:// URL: {value!r}")
    return text


def _positive(value: Any) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"must be positive: {value!r}")
    return number


def _choice(*choices: str) -> Any:
    def parse(value: Any) -> str:
        if value not in choices:
            raise ValueError(f"one of {', '.join(choices)}, not {value!r}")
        return str(value)
    return parse


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"true or false, not {value!r}")
    return value


def _folder(value: Any) -> str:
    return "" if value == "" else check_folder(value)


SPEC = {
    "url": (_url, "http://127.0.0.1:11333"),
    "timeout": (_positive, 20.0),
    "on-failure": (_choice("tempfail", "accept"), "tempfail"),
    "junk-folder": (_folder, "Junk"),
    "scan-outbound": (_bool, False),
    "password": (str, None),
}


def spamd_result(result: dict[str, Any]) -> str:
    """
    The C{X-Spamd-Result} field rspamd's proxy adds: the verdict, score
    and each symbol with its score, one symbol a folded line.
    """
    score = float(result.get("score", 0.0))
    required = float(result.get("required_score", 0.0))
    spam = result.get("action") in ("reject", "add header", "rewrite subject")
    lines = [f"default: {spam} [{score:.2f} / {required:.2f}]"]
    symbols = result.get("symbols") or {}
    for name in sorted(symbols):
        symbol = symbols[name] or {}
        options = symbol.get("options") or []
        text = f"{clean(name, 64)}({float(symbol.get('score', 0.0)):.2f})"
        if options:
            text += "[" + ",".join(clean(o, 64) for o in options[:5]) + "]"
        lines.append(text)
    return "X-Spamd-Result: " + ";\n\t".join(lines)


class Rspamd(MessageFilter):
    name = "rspamd"

    def __init__(self, reactor: IMailReactor, options: dict[str, Any], hostname: str) -> None:
        self.reactor = reactor
        self.options = options
        self.hostname = hostname
        self.agent = Agent(reactor, connectTimeout=options["timeout"])
        # The filter's own limit, past the HTTP request's.
        self.timeout = options["timeout"] + 5

    def request_headers(self, session: Any, envelope: Any) -> Headers:
        headers = Headers({"IP": [session.peer_host], "Queue-Id": [envelope.queue_id],
                           "MTA-Name": [self.hostname], "Content-Type": ["message/rfc822"]})
        if session.helo:
            headers.addRawHeader("Helo", clean(session.helo, 255))
        headers.addRawHeader("From", str(envelope.sender or ""))
        for rcpt in envelope.rcpts:
            headers.addRawHeader("Rcpt", str(rcpt))
        if session.user is not None:
            headers.addRawHeader("User", str(session.user))
        if self.options["password"]:
            headers.addRawHeader("Password", self.options["password"])
        return headers

    async def scan(self, session: Any, envelope: Any, spool: Any) -> dict[str, Any]:
        body = await deferToThread(spool.read)
        producer: Any = FileBodyProducer(BytesIO(body))
        request = self.agent.request(b"POST",
                                     (self.options["url"] + "/checkv2").encode("ascii"),
                                     self.request_headers(session, envelope), producer)
        request.addTimeout(self.options["timeout"], self.reactor)
        response = await request
        reading = readBody(response)
        reading.addTimeout(self.options["timeout"], self.reactor)
        data = await reading
        if response.code != 200:
            raise RuntimeError(f"rspamd answered HTTP {response.code}")
        result = json.loads(data)
        if not isinstance(result, dict) or "action" not in result:
            raise RuntimeError("rspamd's answer has no action")
        return result

    async def data(self, session: Any, envelope: Any, spool: Any) -> Any:
        if (session.service != "smtp" or session.user is not None) \
                and not self.options["scan-outbound"]:
            return None
        try:
            result = await self.scan(session, envelope, spool)
        except Exception as e:  # noqa: BLE001 - whatever went wrong, the option decides
            if self.options["on-failure"] == "accept":
                log.warn("{qid}: rspamd: {error}; accepted unscanned (on-failure = accept)",
                         qid=envelope.queue_id, error=clean(e))
                return None
            log.error("{qid}: rspamd: {error}; tempfail (on-failure = tempfail)",
                      qid=envelope.queue_id, error=clean(e))
            return Reply(451, "4.7.1", "Error: the message could not be scanned, "
                                       "try again later")
        return self.verdict(envelope, result)

    def verdict(self, envelope: Any, result: dict[str, Any]) -> Any:
        action = result.get("action")
        message = ""
        messages = result.get("messages")
        if isinstance(messages, dict):
            message = clean(messages.get("smtp_message", ""))
        log.info("{qid}: rspamd: action={action} score={score}", qid=envelope.queue_id,
                 action=clean(action, 32), score=result.get("score"))
        if action == "reject":
            return Reply(554, "5.7.1", message or "Spam message rejected")
        if action in ("soft reject", "greylist"):
            return Reply(451, "4.7.1", message or "Try again later")
        spam = action in ("add header", "rewrite subject")
        headers = [spamd_result(result), f"X-Spam: {'Yes' if spam else 'No'}"]
        milter = result.get("milter")
        if isinstance(milter, dict) and isinstance(milter.get("add_headers"), dict):
            for name, value in milter["add_headers"].items():
                if isinstance(value, dict):
                    value = value.get("value", "")
                if re.fullmatch(r"[A-Za-z0-9-]{1,64}", str(name)) and \
                        str(name).lower() not in ("x-spam", "x-spamd-result"):
                    headers.append(f"{name}: {clean(value, 900)}")
        folder = self.options["junk-folder"] if spam and self.options["junk-folder"] else None
        return Verdict(headers=tuple(headers), folder=folder)


@implementer(IPlugin, IMessageFilterFactory)
class RspamdFactory:
    name = "rspamd"
    description = "scans with rspamd (/checkv2): headers, Junk, reject, greylist"

    def __init__(self) -> None:
        self.options = check_options(self.name, {}, SPEC)

    def configure(self, options: dict[str, Any]) -> None:
        self.options = check_options(self.name, options, SPEC)

    def build(self, config: Any, reactor: IMailReactor) -> Rspamd:
        if config is None:
            raise ConfigError("rspamd needs a configuration")
        return Rspamd(reactor, dict(self.options), config.hostname)


rspamd = RspamdFactory()
