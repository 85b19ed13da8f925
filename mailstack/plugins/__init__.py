"""
mailstack's plugin package: message filters (L{IMessageFilterFactory})
and whatever else L{mailstack.interfaces} lets a plugin provide.

Like C{twisted.plugins}, it spans every C{mailstack/plugins/} directory on
C{sys.path}, so a third party ships a module there without touching
mailstack.
"""

from twisted.plugin import pluginPackagePaths

# A package's __path__ is set by the import system; mypy does not know it.
__path__.extend(pluginPackagePaths(__name__))  # type: ignore[name-defined]
__all__: list[str] = []
