# -*- test-case-name: tests.test_tap -*-
"""
C{twistd mailstack}: its options and its service.

The options are generated from L{mailstack.config.OPTIONS}; a value not
given on the command line comes from C{--config FILE}, else its default.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.python import usage

from mailstack.config import OPTIONS, Config, ConfigError, build_config


def _help(option: Any) -> str:
    if option.default in (None, (), "") or "[default" in option.help:
        return option.help
    default = option.default
    if isinstance(default, tuple):
        default = ",".join(default)
    return f"{option.help} [default: {default}]"


def _repeatable(name: str, doc: str) -> Any:
    def opt(self: "Options", value: str) -> None:
        self.setdefault(name, []).append(value)

    opt.__doc__ = doc
    return opt


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run mailstack: a receiving MTA, submission, an outbound queue, IMAP and POP3 "
        "for one host.  Every option may also be set in the TOML file given by --config "
        "(same names); the command line wins."
    )
    optParameters = [["config", None, None, "TOML configuration file"]] + [
        [o.name, None, None, _help(o)] for o in OPTIONS if not o.repeatable
    ]
    for _o in OPTIONS:
        if _o.repeatable:
            locals()["opt_" + _o.attribute] = _repeatable(_o.name, _help(_o))
    del _o

    config: Config

    def postOptions(self) -> None:
        from mailstack.smtp.filters import available_filters

        try:
            self.config = build_config(self, self["config"])
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None
        known = available_filters() if self.config.filter else {}
        for name in self.config.filter:
            if name not in known:
                raise usage.UsageError(
                    f"--filter: no filter plugin named {name!r} "
                    f"(available: {', '.join(sorted(known)) or 'none installed'})")
        from mailstack.plugin import validate
        try:
            validate(self.config)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


def makeService(options: Options) -> Any:
    """
    The one place that takes the global reactor.
    """
    from twisted.internet import reactor as global_reactor

    from mailstack import privileges, reload
    from mailstack.clock import use_monotonic_time
    from mailstack.logs import filter_noise
    from mailstack.metrics import install as install_metrics
    from mailstack.reactors import IMailReactor
    from mailstack.service import MailStack

    reactor = cast(IMailReactor, global_reactor)  # see mailstack.reactors

    use_monotonic_time(reactor)  # timers must not follow wall-clock steps
    parent = getattr(options, "parent", None) or {}
    owner = privileges.target_ids(parent.get("uid"), parent.get("gid"))
    service = MailStack(options.config, reactor)
    reactor.callWhenRunning(filter_noise, reactor=reactor)  # twistd's log observers exist by then
    install_metrics(service, reactor)
    # SIGHUP re-reads the file given with --config; the command line still wins.
    reload.install(service, reactor, lambda: build_config(options, options["config"]))
    if owner is not None:
        # Still root: everything made so far (the layout, a generated TLS
        # key, files root's `mailstack` commands wrote) goes to the user
        # twistd switches to after binding the ports.
        privileges.prepare(options.config.data_dir, *owner)
    return service
