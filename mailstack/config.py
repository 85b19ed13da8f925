# -*- test-case-name: tests.test_tap,tests.test_limits,tests.test_bind_address,tests.test_reload -*-
"""
Options and TOML files become one immutable L{Config}.

Every option is declared once, in L{OPTIONS}: its name, default, parser and
help.  The twistd options (L{mailstack.tap}), the TOML loader and the
C{mailstack} command all read that table, so a name cannot mean one thing on
the command line and another in a file.  Precedence: command line, then the
file given by C{--config}, then the defaults here.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mailstack.address import AddressError, normalize_domain
from mailstack.errors import ConfigError
from mailstack.queue.routes import Route


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str | int | float) -> float:
    """
    Parse C{"90"}, C{"90s"}, C{"5m"}, C{"4h"}, C{"5d"} into seconds.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text))
        if match is None:
            raise ConfigError(f"not a duration: {text!r} (use e.g. 90s, 5m, 4h, 5d)")
        value = float(match.group(1)) * _UNITS.get(match.group(2) or "s", 1)
    if value <= 0:
        raise ConfigError(f"a duration must be positive: {text!r}")
    return value


def parse_schedule(text: str | Sequence[str]) -> tuple[float, ...]:
    """
    Parse a retry schedule, C{"5m,10m,4h"} or a TOML list, into seconds.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    schedule = tuple(parse_duration(item) for item in items if str(item).strip())
    if not schedule:
        raise ConfigError("the retry schedule is empty")
    return schedule


def parse_size(text: str | int) -> int:
    """
    Parse a size in bytes (a plain integer; C{k}, C{M}, C{G} suffixes allowed).
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", str(text))
        if match is None:
            raise ConfigError(f"not a size in bytes: {text!r}")
        scale = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
        value = int(match.group(1)) * scale[match.group(2).lower()]
    if value < 1024:
        raise ConfigError(f"a message size limit under 1 KiB makes no sense: {text!r}")
    return value


def parse_networks(
    text: str | Sequence[str],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """
    Parse C{"127.0.0.0/8,::1/128"} (or a TOML list) into networks.
    """
    items = text.split(",") if isinstance(text, str) else list(text)
    networks = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as e:
            raise ConfigError(f"not a network: {item!r} ({e})") from None
    return tuple(networks)


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """
    Parse C{host:port}, C{[v6addr]:port} or, with a default port, C{host}.
    """
    text = str(text).strip()
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?|([^:\[\]\s]+)(?::(\d+))?", text)
    if match is None:
        raise ConfigError(f"not HOST:PORT: {text!r}")
    host = match.group(1) or match.group(3)
    port_text = match.group(2) or match.group(4)
    if port_text is None:
        if default_port is None:
            raise ConfigError(f"a port is needed: {text!r}")
        return host, default_port
    port = int(port_text)
    if not 0 < port < 65536:
        raise ConfigError(f"port out of range: {text!r}")
    return host, port


def parse_route(text: str) -> Route:
    """
    Parse C{DOMAIN=HOST:PORT}.
    """
    domain, sep, target = str(text).partition("=")
    if not sep or not domain.strip():
        raise ConfigError(f"a route is DOMAIN=HOST:PORT: {text!r}")
    domain = domain.strip()
    if domain != "*":
        domain = _domain(domain)
    host, port = parse_hostport(target, 25)
    return Route(domain, host, port)


@dataclass(frozen=True)
class RelayAuth:
    """
    Credentials for a next hop (a smarthost): its host name, the user, and
    the file holding the password (read at start; never on a command line).
    """

    host: str
    user: str
    password_file: str

    def password(self) -> str:
        with open(self.password_file, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")


def parse_relay_auth(text: str) -> RelayAuth:
    """
    Parse C{HOST=USER:PASSWORD-FILE}.
    """
    host, sep, rest = str(text).partition("=")
    user, sep2, path = rest.rpartition(":")
    if not (sep and sep2 and host.strip() and user and path):
        raise ConfigError(f"relay auth is HOST=USER:PASSWORD-FILE: {text!r}")
    auth = RelayAuth(host.strip().lower(), user, path)
    try:
        auth.password()
    except OSError as e:
        raise ConfigError(f"cannot read the password file {path}: {e.strerror}") from None
    return auth


def _domain(text: str) -> str:
    try:
        return normalize_domain(str(text))
    except AddressError as e:
        raise ConfigError(f"not a domain name: {text!r} ({e})") from None


def _endpoint(text: str) -> str | None:
    text = str(text).strip()
    if text.lower() == "none":
        return None
    if not text:
        raise ConfigError("an empty endpoint; use 'none' to disable a listener")
    check_endpoint_syntax(text)
    return text


def check_endpoint_syntax(text: str) -> None:
    """
    Refuse a server endpoint string Twisted cannot parse (C{tcp:notaport},
    a malformed option), so that it is a one-line usage error at start rather
    than a traceback.  Only C{tcp}, C{tcp6} and C{unix} are parsed here
    (their parsers bind nothing and read nothing); other types (C{ssl}
    loads its certificate files, C{systemd} looks up inherited sockets) are
    left to the start.
    """
    from twisted.internet.endpoints import serverFromString

    description = text[len("haproxy:"):] if text.lower().startswith("haproxy:") else text
    if description.split(":", 1)[0].lower() not in ("tcp", "tcp6", "unix"):
        return
    try:
        # Parsing builds the endpoint object, which only keeps the reactor.
        serverFromString(object(), description)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"not a server endpoint: {text!r} ({e})") from None


def _positive(text: Any) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise ConfigError(f"not a number: {text!r}") from None
    if value <= 0:
        raise ConfigError(f"must be positive: {text!r}")
    return value


def _hostname(text: str) -> str:
    text = str(text).strip().rstrip(".")
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?", text):
        raise ConfigError(f"not a host name: {text!r}")
    return text.lower()


def _text(text: Any) -> str:
    return str(text)


def _count(text: Any) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"not a whole number: {text!r}") from None
    if not 1 <= value <= 64:
        raise ConfigError(f"must be between 1 and 64: {value}")
    return value


def _limit(text: Any) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise ConfigError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise ConfigError(f"must be 0 (no limit) or more: {value}")
    return value


def _networks_or_none(text: Any) -> tuple[Any, ...]:
    return () if str(text).strip().lower() == "none" else parse_networks(text)


def _limit_or_auto(text: Any) -> int | None:
    return None if str(text).strip().lower() == "auto" else _limit(text)
def _postmaster(text: Any) -> str:
    from mailstack.address import parse_address
    try:
        return str(parse_address(str(text).strip()))
    except AddressError as e:
        raise ConfigError(f"not an address: {text!r} ({e})") from None


def _filter_name(text: Any) -> str:
    name = str(text).strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ConfigError(f"not a filter name: {text!r}")
    return name


def _yes_no(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("yes", "true", "on", "1"):
        return True
    if value in ("no", "false", "off", "0"):
        return False
    raise ConfigError(f"not yes or no: {text!r}")


def _bind_address(text: Any) -> str:
    try:
        return str(ipaddress.ip_address(str(text).strip().strip("[]")))
    except ValueError:
        raise ConfigError(f"not an IP address: {text!r}") from None


def metrics_endpoint(text: Any) -> str | None:
    """
    Parse C{--metrics}: C{none}, a port number, or a server endpoint; TCP
    without C{interface=} listens on 127.0.0.1.
    """
    text = str(text).strip()
    if text.lower() in ("", "none"):
        return None
    if text.isdigit():
        text = f"tcp:{text}"
    kind = text.split(":", 1)[0].lower()
    if kind not in ("tcp", "tcp6", "unix", "ssl"):
        raise ConfigError(f"not a server endpoint: {text!r} (e.g. tcp:9125)")
    if kind in ("tcp", "ssl") and "interface=" not in text:
        text += ":interface=127.0.0.1"
    elif kind == "tcp6" and "interface=" not in text:
        text += ":interface=\\:\\:1"
    return text


def _on_off(text: Any) -> bool:
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise ConfigError(f"not on or off: {text!r}")



def _delivery(text: Any) -> tuple[str | None, str]:
    """
    C{NAME} (every local recipient), C{DOMAIN=NAME} or C{USER@DOMAIN=NAME}.
    """
    where, sep, name = str(text).strip().rpartition("=")
    name = _filter_name(name)
    if not sep:
        return None, name
    where = where.strip()
    if "@" in where:
        return _postmaster(where).lower(), name
    return _domain(where), name


@dataclass(frozen=True)
class Option:
    """
    One configuration option, as the command line and TOML files know it.
    """

    name: str
    default: Any
    parse: Callable[[Any], Any]
    help: str
    repeatable: bool = False
    metavar: str = ""

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: tuple[Option, ...] = (
    Option("data-dir", "./mailstack-data", _text,
           "all state: users, aliases, mail, queue, TLS", metavar="DIR"),
    Option("hostname", None, _hostname,
           "greeting, HELO/EHLO name, Received headers [default: the machine's FQDN]",
           metavar="NAME"),
    Option("domain", ("localhost",), _domain,
           "a local domain (repeatable) [default: localhost]", repeatable=True,
           metavar="NAME"),
    Option("smtp", "tcp:2525:interface=127.0.0.1", _endpoint,
           "receiving MTA endpoint (port 25 in production), or none", metavar="ENDPOINT"),
    Option("submission", "tcp:2587:interface=127.0.0.1", _endpoint,
           "submission endpoint with STARTTLS (587), or none", metavar="ENDPOINT"),
    Option("submissions", "tcp:2465:interface=127.0.0.1", _endpoint,
           "submission endpoint with implicit TLS (465), or none", metavar="ENDPOINT"),
    Option("imap", "tcp:2143:interface=127.0.0.1", _endpoint,
           "IMAP4rev1 endpoint with STARTTLS, or none", metavar="ENDPOINT"),
    Option("imaps", "tcp:2993:interface=127.0.0.1", _endpoint,
           "IMAP endpoint with implicit TLS, or none", metavar="ENDPOINT"),
    Option("pop3", "tcp:2110:interface=127.0.0.1", _endpoint,
           "POP3 endpoint with STLS, or none", metavar="ENDPOINT"),
    Option("tls-cert", None, _text,
           "PEM certificate chain [default: DATA/tls/cert.pem, generated]", metavar="FILE"),
    Option("tls-key", None, _text,
           "PEM private key [default: DATA/tls/key.pem, generated]", metavar="FILE"),
    Option("dns-server", None, lambda v: parse_hostport(v, 53),
           "resolver for MX/A/AAAA lookups and the SPF/DKIM/DMARC checks "
           "[default: the system resolver]",
           metavar="HOST:PORT"),
    Option("route", (), parse_route,
           "static next hop for a domain; * is a smarthost (repeatable)",
           repeatable=True, metavar="DOMAIN=HOST:PORT"),
    Option("relay-auth", (), parse_relay_auth,
           "log in to next hop HOST (a smarthost) with USER and the password in FILE; "
           "needs TLS (repeatable)", repeatable=True, metavar="HOST=USER:PASSWORD-FILE"),
    Option("require-tls", (), lambda v: "*" if str(v).strip() == "*" else _domain(v),
           "deliver to DOMAIN only over TLS with a verified certificate; * for all "
           "(repeatable) [default: opportunistic, unverified TLS]",
           repeatable=True, metavar="DOMAIN"),
    Option("retry-schedule", "5m,10m,20m,40m,80m,160m,4h", parse_schedule,
           "delays between delivery attempts; the last repeats", metavar="LIST"),
    Option("max-queue-lifetime", "5d", parse_duration,
           "after this, undelivered recipients bounce", metavar="DURATION"),
    Option("max-message-size", 26214400, parse_size,
           "advertised in SIZE, enforced in DATA", metavar="BYTES"),
    Option("relay-networks", "", parse_networks,
           "clients allowed to relay without AUTH [default: none]", metavar="CIDR,..."),
    Option("smtp-timeout", 300, _positive,
           "seconds a client has for each whole SMTP command; bytes do not reset it "
           "(RFC 5321 4.5.3.2)", metavar="SECONDS"),
    Option("receivers", 1, _count,
           "processes accepting on the smtp listener (the main one and N-1 more); "
           "their logs go to standard output", metavar="N"),
    Option("filter", (), _filter_name,
           "enable a message filter plugin from mailstack.plugins, e.g. greylist "
           "(repeatable; they run in this order)", repeatable=True, metavar="NAME"),
    # Mail authentication (mailstack.mailauth; README "Mail authentication").
    Option("auth-checks", "yes", _yes_no,
           "check SPF, DKIM and DMARC of mail the receiving MTA gets from the internet "
           "and add an Authentication-Results field", metavar="yes|no"),
    Option("dmarc-reject", "yes", _yes_no,
           "refuse (550 5.7.1) mail failing DMARC whose domain asks p=reject",
           metavar="yes|no"),
    Option("dmarc-quarantine", "yes", _yes_no,
           "deliver mail failing DMARC whose domain asks p=quarantine into Junk",
           metavar="yes|no"),
    Option("spf-fail-reject", "no", _yes_no,
           "refuse (550 5.7.23) mail whose MAIL FROM domain's SPF says fail",
           metavar="yes|no"),
    Option("dkim-sign", "yes", _yes_no,
           "DKIM-sign mail from local domains that have an active key set "
           "(mailstack dkim keygen)", metavar="yes|no"),
    Option("max-connections", "auto", _limit_or_auto,
           "concurrent connections on all listeners together; auto derives it from the "
           "open files limit (raised to the hard limit at start); 0 for no limit",
           metavar="N|auto"),
    Option("max-client-connections", 50, _limit,
           "concurrent connections from one IPv4 address or IPv6 /64, on each process; "
           "0 for no limit", metavar="N"),
    Option("connection-limit-exempt", "127.0.0.0/8,::1/128", _networks_or_none,
           "clients the per-client limit does not count (the relay networks neither); "
           "none for no exception",
           metavar="CIDR,..."),
    Option("smtp-min-data-rate", 500, _positive,
           "bytes per second a client must keep up in DATA (Postfix's smtpd_min_data_rate)",
           metavar="BYTES"),
    Option("transform", (), _filter_name,
           "enable an outbound transform plugin (e.g. a DKIM signer) for mail leaving "
           "through the queue or submitted by local users (repeatable; in this order)",
           repeatable=True, metavar="NAME"),
    Option("delivery", (), _delivery,
           "the delivery agent for local mail: NAME for everyone, DOMAIN=NAME or "
           "USER@DOMAIN=NAME for some (repeatable) [default: maildir]",
           repeatable=True, metavar="[WHERE=]NAME"),
    Option("user-db", "file", _filter_name,
           "the user database plugin: file (DATA/users, DATA/aliases) or sqlite "
           "([plugins.sqlite] path)", metavar="NAME"),
    Option("postmaster", None, _postmaster,
           "where mail to postmaster (bare, or at any local domain) goes when no user "
           "or alias of that name exists [default: postmaster@ the first --domain, "
           "a Maildir of its own]", metavar="ADDRESS"),
    Option("smtp-bind-address", (), _bind_address,
           "source address of outbound SMTP, one IPv4 and one IPv6 at most "
           "(repeatable) [default: the kernel's choice]", repeatable=True, metavar="ADDRESS"),
    Option("metrics", None, lambda v: metrics_endpoint(v),
           "serve Prometheus metrics at /metrics on this endpoint (loopback unless an "
           "interface is given), e.g. tcp:9125 [default: off]", metavar="ENDPOINT"),
    Option("shutdown-grace", 30, _positive,
           "on SIGTERM, seconds SMTP transactions in flight get to finish",
           metavar="SECONDS"),
    Option("mta-sts", True, _on_off,
           "apply the MTA-STS policies (RFC 8461) of the domains mail is delivered to "
           "[default: on]", metavar="on|off"),
    Option("tls-ca-file", None, _text,
           "PEM CA certificates that verified outbound TLS (MTA-STS, --require-tls) "
           "trusts instead of the system's", metavar="FILE"),
    Option("http", None, _endpoint,
           "HTTP endpoint serving the MTA-STS policy and client autoconfiguration "
           "(behind a TLS proxy), or none [default: none]", metavar="ENDPOINT"),
    Option("https", None, _endpoint,
           "the same over TLS with --tls-cert (port 443), or none [default: none]",
           metavar="ENDPOINT"),
)

OPTIONS_BY_NAME: Mapping[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """
    The effective configuration of one mailstack instance.
    """

    data_dir: str
    hostname: str
    domain: tuple[str, ...]
    smtp: str | None
    submission: str | None
    submissions: str | None
    imap: str | None
    imaps: str | None
    pop3: str | None
    tls_cert: str | None
    tls_key: str | None
    dns_server: tuple[str, int] | None
    route: tuple[Route, ...]
    relay_auth: tuple[RelayAuth, ...]
    require_tls: tuple[str, ...]
    retry_schedule: tuple[float, ...]
    max_queue_lifetime: float
    max_message_size: int
    relay_networks: tuple[Any, ...]
    smtp_timeout: float
    receivers: int = 1
    filter: tuple[str, ...] = ()
    max_connections: int | None = None
    max_client_connections: int = 50
    connection_limit_exempt: tuple[Any, ...] = ()
    smtp_min_data_rate: float = 500.0
    postmaster: str | None = None
    shutdown_grace: float = 30.0
    metrics: str | None = None
    smtp_bind_address: tuple[str, ...] = ()
    transform: tuple[str, ...] = ()
    auth_checks: bool = True
    dmarc_reject: bool = True
    dmarc_quarantine: bool = True
    spf_fail_reject: bool = False
    dkim_sign: bool = True
    user_db: str = "file"
    delivery: tuple[tuple[str | None, str], ...] = ()
    mta_sts: bool = True
    tls_ca_file: str | None = None
    http: str | None = None
    https: str | None = None
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)
    source: str = field(default="defaults", compare=False)

    @property
    def domains(self) -> frozenset[str]:
        return frozenset(self.domain)

    def describe(self) -> list[str]:
        """
        One C{name = value} line per option, for the start-up log.
        """
        lines = []
        for option in OPTIONS:
            value = getattr(self, option.attribute)
            if option.name == "route":
                value = [f"{r.domain}={r.host}:{r.port}" for r in value]
            elif option.name == "relay-auth":
                value = [f"{a.host}={a.user}:{a.password_file}" for a in value]
            elif option.name == "max-connections" and value is None:
                value = "auto"
            elif option.name == "delivery":
                value = [f"{w}={n}" if w else n for w, n in value]
            elif option.name in ("relay-networks", "connection-limit-exempt"):
                value = [str(n) for n in value]
            elif isinstance(value, tuple):
                value = list(value)
            lines.append(f"{option.name} = {value!r}")
        for name, table in sorted(self.plugins.items()):
            lines.append(f"[plugins.{name}] = {dict(table)!r}")
        return lines


def canonical_key(key: str) -> str:
    """
    TOML keys may use underscores or dashes: C{data_dir} is C{data-dir}.
    """
    return key.strip().replace("_", "-").lower()


def read_toml(path: str) -> dict[str, Any]:
    """
    Read a TOML configuration file, rejecting keys that are not options.
    """
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: {e}") from None
    values: dict[str, Any] = {}
    unknown = []
    tables = raw.pop("plugins", {})
    if not isinstance(tables, dict) or not all(isinstance(t, dict) for t in tables.values()):
        raise ConfigError(f"{path}: plugins must be [plugins.NAME] tables")
    if tables:
        values["plugins"] = tables
    for key, value in raw.items():
        name = canonical_key(key)
        if name not in OPTIONS_BY_NAME or name == "config":
            unknown.append(key)
        else:
            values[name] = value
    if unknown:
        known = ", ".join(o.name for o in OPTIONS)
        raise ConfigError(
            f"{path}: unknown option(s) {', '.join(sorted(unknown))}; known options: {known}"
        )
    return values


def build_config(
    command_line: Mapping[str, Any], config_file: str | None = None
) -> Config:
    """
    Merge command line values (C{None} or missing: not given) over the file's
    values over the defaults, parse each, and return the L{Config}.
    """
    from_file = read_toml(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        given = command_line.get(option.name)
        if given is None or (option.repeatable and not given):
            given = from_file.get(option.name)
        origin = "command line" if command_line.get(option.name) else "config file"
        if given is None:
            given, origin = option.default, "default"
        try:
            if option.repeatable:
                items = [given] if isinstance(given, str) else list(given)
                value: Any = tuple(option.parse(item) for item in items)
                if option.name == "domain" and not value:
                    raise ConfigError("at least one local domain is needed")
            elif given is None:
                value = None
            else:
                value = option.parse(given)
        except ConfigError as e:
            raise ConfigError(f"--{option.name} ({origin}): {e}") from None
        values[option.attribute] = value
    values["plugins"] = dict(command_line.get("plugins") or from_file.get("plugins") or {})
    if values["hostname"] is None:
        values["hostname"] = _hostname(socket.getfqdn() or "localhost")
    if (values["tls_cert"] is None) != (values["tls_key"] is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    values["domain"] = tuple(dict.fromkeys(values["domain"]))
    families = [ipaddress.ip_address(a).version for a in values["smtp_bind_address"]]
    if len(families) != len(set(families)):
        raise ConfigError("--smtp-bind-address: at most one IPv4 and one IPv6 address")
    return Config(**values, source=config_file or "defaults")
