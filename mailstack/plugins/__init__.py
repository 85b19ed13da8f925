"""
mailstack's plugin package: message filters (L{IMessageFilterFactory})
and whatever else L{mailstack.interfaces} lets a plugin provide.

Like C{twisted.plugins}, it spans every C{mailstack/plugins/} directory on
C{sys.path}, so a third party ships a module there without touching
mailstack.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))
__all__: list[str] = []
