# -*- test-case-name: tests.test_plugins -*-
"""
What a plugin author uses, and how mailstack finds and configures plugins.

Plugins are Twisted plugins in the C{mailstack.plugins} package (any
C{mailstack/plugins/} directory on C{sys.path}), found with
C{twisted.plugin.getPlugins}.  Each kind has a factory interface in
L{mailstack.interfaces}: message filters (enabled with C{--filter NAME}),
outbound transforms (C{--transform NAME}) and delivery agents
(C{--delivery [WHERE=]NAME}).  A C{[plugins.NAME]} table in the TOML
configuration carries a plugin's options; the factory's C{configure}
validates them (see L{check_options}) before C{build}.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from twisted.logger import Logger
from twisted.plugin import getPlugins

from mailstack.errors import ConfigError
from mailstack.reactors import IMailReactor
from mailstack.smtp.reply import Reply

log = Logger()

_FIELD_NAME = re.compile(r"[!-9;-~]+")
_FOLDER = re.compile(r"[A-Za-z0-9][A-Za-z0-9 _+-]{0,63}")


@dataclass(frozen=True)
class Verdict:
    """
    A filter's answer at DATA beyond "no objection".

    @ivar reply: a refusal (4xx or 5xx) or C{None} to accept.
    @ivar headers: header fields to prepend, in order, each C{"Name: value"}
        (C{str} or C{bytes}, without the line end; folded lines continue
        with a space or tab after an LF).
    @ivar folder: a folder for local Maildir delivery (C{"Junk"} is
        Maildir++ C{.Junk}), or C{None} for the inbox.
    @ivar discard: accept the message (C{250}) and deliver it nowhere;
        C{reason} goes into the log line.
    @ivar remove: received header fields to remove, by index in
        C{spool.header_fields()} as the filter saw it (e.g. a forged
        C{Authentication-Results} with our authserv-id, RFC 8601 5); the
        filters after see the message without them.
    @ivar reason: why it is discarded, for the log line.
    """

    reply: Reply | None = None
    headers: tuple[Any, ...] = ()
    remove: tuple[int, ...] = ()
    folder: str | None = None
    discard: bool = False
    reason: str = ""


def header_lines(fields: Iterable[Any]) -> bytes:
    """
    Check header fields given by a plugin and return them as stored (LF
    line endings); raise C{ValueError} for anything that is not one field.
    """
    out = []
    for value in fields:
        if isinstance(value, tuple):
            name, body = value
            value = f"{name}: {body}"
        if isinstance(value, str):
            value = value.encode("utf-8")
        if not isinstance(value, bytes):
            raise ValueError(f"a header field must be text: {value!r}")
        value = value.replace(b"\r\n", b"\n").rstrip(b"\n")
        name, colon, _ = value.partition(b":")
        if not colon or not _FIELD_NAME.fullmatch(name.decode("latin-1")):
            raise ValueError(f"not a header field: {value[:80]!r}")
        for continuation in value.split(b"\n")[1:]:
            if continuation[:1] not in (b" ", b"\t") or not continuation.strip():
                raise ValueError(f"a header field line must be folded: {value[:80]!r}")
        if b"\r" in value or b"\0" in value:
            raise ValueError(f"CR or NUL in a header field: {value[:80]!r}")
        out.append(value + b"\n")
    return b"".join(out)


def check_folder(name: str) -> str:
    """
    A folder a verdict asks for: letters, digits, space, C{_+-}; no dots or
    slashes (it becomes the Maildir++ directory C{.NAME}).
    """
    if not isinstance(name, str) or not _FOLDER.fullmatch(name):
        raise ValueError(f"not a folder name: {name!r}")
    return name


def check_options(plugin: str, given: Mapping[str, Any],
                  spec: Mapping[str, tuple[Callable[[Any], Any], Any]]) -> dict[str, Any]:
    """
    Validate a C{[plugins.NAME]} table against C{spec}, C{{key: (parse,
    default)}}: every key parsed (a parser raises C{ValueError} or
    L{ConfigError}), defaults filled in; an unknown key is a L{ConfigError}
    naming the plugin, the key and the keys it knows.

    @param plugin: the plugin's name, for messages.
    @param given: the table from the configuration file.
    @param spec: the options the plugin knows.
    @return: the options, parsed, with defaults.
    """
    unknown = sorted(set(given) - set(spec))
    if unknown:
        known = ", ".join(sorted(spec)) or "none"
        raise ConfigError(f"[plugins.{plugin}]: unknown option(s) {', '.join(unknown)} "
                          f"(known: {known})")
    result = {}
    for key, (parse, default) in spec.items():
        if key not in given:
            result[key] = default
            continue
        try:
            result[key] = parse(given[key])
        except (ValueError, TypeError, ConfigError) as e:
            raise ConfigError(f"[plugins.{plugin}] {key}: {e}") from None
    return result


def kinds() -> dict[str, Any]:
    """
    The factory interfaces, by what the configuration calls them.
    """
    from mailstack.interfaces import (
        IDeliveryAgentFactory, IMessageFilterFactory, IOutboundTransformFactory,
        IUserDatabaseFactory,
    )
    return {"filter": IMessageFilterFactory, "transform": IOutboundTransformFactory,
            "delivery": IDeliveryAgentFactory, "user-db": IUserDatabaseFactory}


def available(kind: str) -> dict[str, Any]:
    """
    Every installed plugin of one kind (C{filter}, C{transform},
    C{delivery}), by name.
    """
    from mailstack import plugins
    return {f.name: f for f in getPlugins(kinds()[kind], plugins)}


def enabled_names(config: Any) -> dict[str, set[str]]:
    """
    The plugin names the configuration enables, by kind.
    """
    return {
        # auth-checks and dkim-sign are built in, on unless turned off.
        "filter": set(config.filter) | ({"auth-checks"} if config.auth_checks else set()),
        "transform": set(config.transform) | ({"dkim-sign"} if config.dkim_sign else set()),
        "delivery": {name for _, name in config.delivery},
        "user-db": {config.user_db},
    }


def check_tables(config: Any) -> None:
    """
    Every C{[plugins.NAME]} table must name an installed plugin.
    """
    installed: set[str] = set()
    for kind in kinds():
        installed |= set(available(kind))
    for name in config.plugins:
        if name not in installed:
            raise ConfigError(f"[plugins.{name}]: no plugin named {name!r} is installed "
                              f"(installed: {', '.join(sorted(installed)) or 'none'})")


def validate(config: Any) -> None:
    """
    At start: every C{[plugins.NAME]} table names an installed plugin, every
    enabled plugin is installed, and each enabled plugin accepts its options.
    """
    check_tables(config)
    for where, name in config.delivery:
        if where is not None and where.rpartition("@")[2] not in config.domains:
            raise ConfigError(f"--delivery {where}={name}: {where.rpartition('@')[2]} is not "
                              "a local domain (--domain)")
    for kind, names in enabled_names(config).items():
        found = available(kind)
        for name in sorted(names):
            if kind == "delivery" and name == "maildir":
                continue
            if name not in found:
                known = ", ".join(sorted(found)) or "none installed"
                raise ConfigError(f"--{kind}: no {kind} plugin named {name!r} "
                                  f"(available: {known})")
            _configure(found[name], name, config)


def _configure(factory: Any, name: str, config: Any) -> None:
    table = dict(config.plugins.get(name, {}))
    configure = getattr(factory, "configure", None)
    if configure is not None:
        configure(table)
    elif table:
        raise ConfigError(f"[plugins.{name}]: the plugin takes no options "
                          f"(unknown: {', '.join(sorted(table))})")


def build_plugin(kind: str, name: str, config: Any, reactor: IMailReactor,
                 provides: Any) -> Any:
    """
    Configure and build one enabled plugin; an unknown name, a bad option or
    a build that does not provide C{provides} is a L{ConfigError}.
    """
    found = available(kind)
    if name not in found:
        known = ", ".join(sorted(found)) or "none installed"
        raise ConfigError(f"--{kind}: no {kind} plugin named {name!r} (available: {known})")
    factory = found[name]
    _configure(factory, name, config)
    built = factory.build(config, reactor)
    if not provides.providedBy(built):
        raise ConfigError(f"--{kind} {name}: the plugin did not build an {provides.__name__}")
    log.info("{kind} {name} enabled: {description}", kind=kind, name=name,
             description=factory.description)
    return built


def listing(config: Any) -> list[str]:
    """
    One line per installed plugin: kind, name, enabled or not, description.
    """
    enabled = enabled_names(config) if config is not None else {}
    lines = []
    builtin_agents = {"maildir"}
    for kind in kinds():
        names = dict(available(kind))
        if kind == "delivery":
            names.update({n: None for n in builtin_agents})
        for name in sorted(names):
            on = name in enabled.get(kind, set())
            if kind == "delivery" and name == "maildir" and config is not None:
                on = on or all(where is not None for where, _ in config.delivery)
            description = ("local Maildirs in DATA/mail (the default)" if names[name] is None
                           else names[name].description)
            lines.append(f"{kind:9} {name:16} {'enabled ' if on else 'disabled'} {description}")
    return lines
