# -*- test-case-name: tests.test_layers -*-
"""
The errors every layer may raise about its settings or its command line,
kept below them all so that no module imports the configuration or the
command line just to raise one.

L{ConfigError} is also importable from L{mailstack.config}, as plugins
have always imported it; L{CommandError} from L{mailstack.cli}.
"""


class ConfigError(ValueError):
    """
    A configuration value or file is wrong; the message says which and why.
    """


class CommandError(Exception):
    """
    A failure to report on stderr, with an exit status (sysexits.h).
    """

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status
