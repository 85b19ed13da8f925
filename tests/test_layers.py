# -*- test-case-name: tests.test_layers -*-
"""
The layers of C{mailstack/} point down: a module imports only from its own
layer or the layers below, and no modules import each other in a circle.

Every import counts, at module level or inside a function (an import
inside a function is how an upward edge hides).  The layers, lowest
first, are L{LAYERS}; README.rst ("The code's layers") shows the same
table.  A new module must be given a layer here, so its author decides
where it stands.
"""

from __future__ import annotations

import ast
import os
import textwrap
from dataclasses import dataclass

from twisted.trial.unittest import SynchronousTestCase

import mailstack

# Lowest first.  A name stands for the module and, unless a longer name
# says otherwise, everything under it.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("base", (
        "mailstack.__init__", "mailstack.address", "mailstack.auth", "mailstack.clock",
        "mailstack.errors", "mailstack.interfaces", "mailstack.limits", "mailstack.logs",
        "mailstack.logsafe", "mailstack.message", "mailstack.nofollow", "mailstack.privileges",
        "mailstack.proxy", "mailstack.reactors", "mailstack.safeio", "mailstack.shared",
        "mailstack.tally",
        "mailstack.sockets",
        "mailstack.throttle", "mailstack.tls", "mailstack.transport", "mailstack.turnlog",
        "mailstack.twisted_privates", "mailstack.users", "mailstack.wire",
        # The reply value every layer answers with, and the plugin package
        # itself (a namespace; the plugins in it are the top layer).
        "mailstack.smtp.reply", "mailstack.plugins.__init__",
    )),
    ("shared", (
        # What features share: the SMTP client (the queue's and the MUA's),
        # the plugin API and the filter chain, mail authentication.
        "mailstack.smtp.client", "mailstack.plugin", "mailstack.smtp.filters",
        "mailstack.mailauth",
    )),
    ("queue", ("mailstack.queue",)),
    ("delivery", ("mailstack.delivery",)),
    ("services", (
        # The SMTP server and its policies, IMAP and POP3, the MUA.
        "mailstack.smtp", "mailstack.access", "mailstack.mua", "mailstack.testing",
    )),
    ("application", (
        "mailstack.config", "mailstack.stack", "mailstack.reload", "mailstack.metrics",
        "mailstack.receivers", "mailstack.service", "mailstack.tap", "mailstack.cli",
        "mailstack.report", "mailstack.__main__", "mailstack.mailauth.commands",
        "mailstack.mailauth.tlsrpt_cli", "mailstack.wellknown",
    )),
    ("plugins", ("mailstack.plugins",)),
)


@dataclass(frozen=True)
class Edge:
    """
    One import: C{importer} imports C{imported} at C{path}:C{line}.
    """

    importer: str
    imported: str
    path: str
    line: int

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported}"


def modules(root: str, package: str) -> dict[str, str]:
    """
    Every module of the package in C{root} (a directory named C{package}),
    by dotted name; a package's C{__init__} is the package's name.
    """
    found = {}
    base = os.path.dirname(root)
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(directory, name)
            dotted = os.path.relpath(path, base)[:-3].replace(os.sep, ".")
            if dotted.endswith(".__init__"):
                dotted = dotted[:-len(".__init__")]
            found[dotted] = path
    return found


def import_edges(root: str, package: str) -> list[Edge]:
    """
    Every import of a module of C{package} by a module of C{package}, at
    any depth in the code (module level, functions, C{if TYPE_CHECKING}).
    """
    mods = modules(root, package)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges = []
    for importer, path in mods.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        is_package = os.path.basename(path) == "__init__.py"
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    parts = importer.split(".")
                    if not is_package:
                        parts = parts[:-1]
                    parts = parts[:len(parts) - (node.level - 1)]
                    base = ".".join(parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # "from package import module" imports the module.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in mods else base
                           for alias in node.names]
            for target in targets:
                if target != package and not target.startswith(package + "."):
                    continue
                imported = resolve(target)
                edge = Edge(importer, imported or "", path, node.lineno)
                if imported is not None and imported != importer and edge not in edges:
                    edges.append(edge)
    return edges


def layer_of(module: str, layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS
             ) -> tuple[int, str] | None:
    """
    The layer (index and name) of a module: the one naming its longest
    prefix; C{None} for a module no layer names.
    """
    best: tuple[int, int, str] | None = None
    for index, (name, prefixes) in enumerate(layers):
        for prefix in prefixes:
            exact = prefix.endswith(".__init__")
            prefix = prefix[:-len(".__init__")] if exact else prefix
            if module == prefix or (not exact and module.startswith(prefix + ".")):
                length = len(prefix) + (1 if exact else 0)
                if best is None or length > best[0]:
                    best = (length, index, name)
    return None if best is None else (best[1], best[2])


def upward_edges(edges: list[Edge], layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS
                 ) -> list[str]:
    """
    The imports from a higher layer, each described.
    """
    found = []
    for edge in edges:
        low, high = layer_of(edge.importer, layers), layer_of(edge.imported, layers)
        if low is not None and high is not None and high[0] > low[0]:
            found.append(f"{edge} (layer {low[1]} imports from the higher layer {high[1]})")
    return found


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """
    Each circle of imports (a strongly connected set of modules), as the
    edges that make it.
    """
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.importer, set()).add(edge.imported)
        graph.setdefault(edge.imported, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[e for e in edges if e.importer in c and e.imported in c] for c in components]


def unplaced(root: str, package: str,
             layers: tuple[tuple[str, tuple[str, ...]], ...] = LAYERS) -> list[str]:
    """
    The modules no layer names.
    """
    return [m for m in modules(root, package) if layer_of(m, layers) is None]


ROOT = os.path.dirname(os.path.abspath(mailstack.__file__))


class MailstackLayersTests(SynchronousTestCase):
    """
    The import graph of C{mailstack/} as it is.
    """

    def setUp(self) -> None:
        self.edges = import_edges(ROOT, "mailstack")

    def test_graph_is_read(self) -> None:
        """
        The graph has the imports it must have, function-level ones too
        (else the checks below would pass on an empty graph).
        """
        found = {(e.importer, e.imported) for e in self.edges}
        self.assertIn(("mailstack.service", "mailstack.stack"), found)
        self.assertIn(("mailstack.tap", "mailstack.service"), found)  # inside a function
        self.assertGreater(len(found), 200)

    def test_every_module_has_a_layer(self) -> None:
        """
        Every module is in a layer of L{LAYERS}: a new one is placed on
        purpose.
        """
        self.assertEqual(unplaced(ROOT, "mailstack"), [])

    def test_no_upward_import(self) -> None:
        """
        No module imports from a layer above its own.
        """
        problems = upward_edges(self.edges)
        self.assertEqual(problems, [], "\n" + "\n".join(problems))

    def test_no_cycle(self) -> None:
        """
        No modules import each other in a circle, even within a layer.
        """
        found = cycles(self.edges)
        self.assertEqual(found, [], "\n" + "\n\n".join(
            "\n".join(str(e) for e in c) for c in found))


class CheckerTests(SynchronousTestCase):
    """
    The checks find what they are for, in a made-up package.
    """

    LAYERS = (("low", ("pkg.low", "pkg.__init__")), ("high", ("pkg.high",)))

    def make(self, files: dict[str, str]) -> str:
        root = os.path.join(os.path.abspath(self.mktemp()), "pkg")
        for name, text in files.items():
            path = os.path.join(root, name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(textwrap.dedent(text))
        return root

    def test_upward_import_in_a_function(self) -> None:
        """
        An import from a higher layer is found and named with its place,
        also when it hides in a function.
        """
        root = self.make({
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "def f():\n    from pkg.high.b import g\n    return g\n",
            "high/__init__.py": "",
            "high/b.py": "from pkg.low import a\ng = a\n",
        })
        problems = upward_edges(import_edges(root, "pkg"), self.LAYERS)
        self.assertEqual(len(problems), 1)
        self.assertIn("low/a.py:2: pkg.low.a imports pkg.high.b", problems[0])
        self.assertIn("layer low imports from the higher layer high", problems[0])

    def test_relative_imports_and_cycles(self) -> None:
        """
        Relative imports are resolved; a circle within one layer is found
        with each of its edges.
        """
        root = self.make({
            "__init__.py": "",
            "low/__init__.py": "",
            "low/a.py": "from . import b\n",
            "low/b.py": "import pkg.low.c\n",
            "low/c.py": "def f():\n    from .a import x\n",
            "low/d.py": "from pkg.low import a\n",
        })
        edges = import_edges(root, "pkg")
        self.assertEqual(upward_edges(edges, self.LAYERS), [])
        found = cycles(edges)
        self.assertEqual(len(found), 1)
        self.assertEqual(sorted((e.importer, e.imported) for e in found[0]), [
            ("pkg.low.a", "pkg.low.b"), ("pkg.low.b", "pkg.low.c"), ("pkg.low.c", "pkg.low.a")])

    def test_unplaced_module(self) -> None:
        """
        A module no layer names is reported; a package's own C{__init__}
        can have a layer of its own.
        """
        root = self.make({"__init__.py": "", "low/__init__.py": "", "other.py": ""})
        self.assertEqual(unplaced(root, "pkg", self.LAYERS), ["pkg.other"])
        self.assertEqual(layer_of("pkg", self.LAYERS), (0, "low"))
        self.assertIsNone(layer_of("pkg.other", self.LAYERS))
