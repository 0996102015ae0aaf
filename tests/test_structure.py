"""The package's import structure: no import cycle, and layers that only import downwards.

Every import of every module of ``leanvit/`` is read with ``ast`` (no module is executed):
module level, inside functions and classes, and under ``if TYPE_CHECKING:`` too (an import
for annotations is still a dependency of the design; the package has none left: what is
needed for an annotation lives in the lowest layer that needs it, e.g. ``MacRecorder`` in
:mod:`leanvit.recorder`). ``from a.b import c`` depends on ``a.b`` and, when ``c`` is a
module, on ``a.b.c``; a package's ``__init__`` counts as the package module. The package's
face ``leanvit/__init__.py`` (public re-exports) is left out of the graph: every module
depends on it by name only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "leanvit"

#: layers from the bottom (index = height); a module belongs to the first pattern it matches
#: (a pattern ending in "." is a prefix). Modules no pattern names are applications.
LAYERS = (
    ("pure ops/state/signals", ("leanvit._files", "leanvit.recorder", "leanvit.state",
                                "leanvit.signals", "leanvit.ops", "leanvit.ops.",
                                "leanvit.losses",
                                "leanvit.compaction.modules")),
    ("registry", ("leanvit.registry",)),
    ("adapters", ("leanvit.adapters", "leanvit.adapters.")),
    ("methods", ("leanvit.methods", "leanvit.methods.")),
    ("accounting/io/models", ("leanvit.macs", "leanvit.patching", "leanvit.io", "leanvit.models",
                              "leanvit.heads", "leanvit.compaction", "leanvit.bench",
                              "leanvit.data")),
    ("applications", ()),
    ("cli", ("leanvit.cli", "leanvit.cli.", "leanvit.__main__")),
)

#: upward imports kept on purpose (none: DiffRate's search loop lives in the applications'
#: ``leanvit.search.diffrate`` and is imported from there, not through the method package).
ALLOWED_UPWARD: set[tuple[str, str]] = set()


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PKG).rglob("*.py")):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if name.endswith(".__init__"):
            name = name[: -len(".__init__")]
        out[name] = path
    return out


def imports_of(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The leanvit modules ``name`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package of this module
                parts = name.split(".") if is_pkg else name.split(".")[:-1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in mods:  # an attribute of a module: the module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: (set() if m == PKG else imports_of(m, p, mods)) for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def layer(name: str) -> int:
    for height, (_, patterns) in enumerate(LAYERS):
        for pat in patterns:
            if name == pat or (pat.endswith(".") and name.startswith(pat)):
                return height
    return [n for n, _ in LAYERS].index("applications")


def test_the_checker_finds_a_cycle_and_the_layers_are_ordered():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    assert layer("leanvit.ops.merge") < layer("leanvit.registry") < layer("leanvit.adapters.vit")
    assert layer("leanvit.adapters.vit") < layer("leanvit.methods.tome") < layer("leanvit.macs")
    assert layer("leanvit.macs") < layer("leanvit.train") < layer("leanvit.cli.train")
    # the reader sees imports inside functions and under TYPE_CHECKING
    g = graph()
    assert "leanvit.macs" in g["leanvit.tune"]  # inside _estimate
    assert "leanvit.adapters" in g["leanvit.macs"]  # inside forward_with_macs


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles in leanvit/: " + "; ".join(
        f"{len(c)} modules: {' -> '.join(c)}" for c in found)


def test_layers_import_only_downwards():
    g = graph()
    bad = sorted(f"{m} ({LAYERS[layer(m)][0]}) imports {t} ({LAYERS[layer(t)][0]})"
                 for m, targets in g.items() for t in targets
                 if PKG not in (m, t) and layer(t) > layer(m) and (m, t) not in ALLOWED_UPWARD)
    assert not bad, "upward imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("limit", [300])
def test_no_method_file_over_300_lines(limit):
    long = {str(p.relative_to(ROOT)): n for p in (ROOT / PKG / "methods").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > limit}
    assert not long, f"method files over {limit} lines: {long}"
