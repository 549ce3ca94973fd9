"""The package's import graph, read from the source (no module is imported): nothing outside
``counterlens/cli/`` imports the CLI, there is no import cycle, and no module imports from a layer
above its own (DESIGN.md: errors -> model/loading -> data, attribution -> metrics, counterfactual
-> runs -> viz -> cli).

Every ``import`` / ``from ... import`` counts, at module level or inside a function. An edge goes
to the module named: ``from pkg import name`` is an edge to ``pkg.name`` when that is a submodule,
else to ``pkg`` (its ``__init__``); importing ``a.b.c`` is not counted as importing ``a`` and ``a.b``
too (or every module would import the package's ``__init__``). Imports under ``if TYPE_CHECKING:``
count for the CLI and layer rules but not for cycles: they never run, so they cannot make one at import
time (a type annotation may name a class of a module that imports this one).
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "counterlens"

# bottom to top; a module may import from its own layer or a lower one. A top-level module or
# subpackage of counterlens missing here fails the test: place it.
LAYERS = [
    {"errors"},
    {"model", "heads", "preprocessing", "models", "cards", "loading",   # the wrapped model, its output head; architectures, cards, loading;
     "exported_programs",                                            # torch.export programs loaded as modules
     "keras_models", "keras_graph", "keras_layers", "keras_convert",  # Keras models converted to torch modules or wrapped
     "keras_modules"},
    {"data", "attribution", "training", "train_folder"},   # training fits a model on data; train_folder on a folder
    {"metrics", "counterfactual"},
    {"runs"},                                     # the application layer
    {"viz"},
    {"__init__"},                                 # counterlens/__init__.py: the public API, over every library layer
    {"cli"},
]

# Known edges against the layer order, each with why it is here; one that disappears must be
# removed from this list (the test says so), one that is not here fails the test.
KNOWN_LAYER_EXCEPTIONS: dict = {}


# -- the checker --------------------------------------------------------------------------------
def module_files(root: Path, package: str) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` under ``root`` (the folder of ``package``)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of ``name`` that is a module of the package (None: outside it)."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def _typing_only(tree: ast.AST) -> set[int]:
    """``id`` of every import node inside an ``if TYPE_CHECKING:`` (or ``typing.TYPE_CHECKING``) block."""
    out = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING"):
            out |= {id(n) for part in node.body for n in ast.walk(part)}
    return out


def import_edges(modules: dict[str, Path]) -> list[tuple[str, str, int, bool]]:
    """``(importer, imported, line, typing_only)`` for every import of a module of the package by one of them."""
    edges = []
    for name, path in modules.items():
        here = name if _is_package(name, modules) else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = _typing_only(tree)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = here.split(".")[:len(here.split(".")) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _known(base, modules))
            edges += [(name, t, node.lineno, id(node) in typing_only) for t in targets if t is not None and t != name]
    return edges


def cli_imports_from_outside(edges, package: str) -> list[str]:
    cli = f"{package}.cli"
    return [f"{src}:{line} imports {dst}" for src, dst, line, _ in edges
            if (dst == cli or dst.startswith(cli + ".")) and not (src == cli or src.startswith(cli + "."))]


def find_cycles(edges) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one (Tarjan); imports
    that only a type checker runs are left out."""
    graph: dict[str, set[str]] = {}
    for src, dst, _, typing_only in edges:
        if typing_only:
            continue
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):   # recursion depth is bounded by the number of modules
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
            if len(component) > 1 or v in graph[v]:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:   # shortest way from the first module back to itself, inside the component
        start = min(component)
        paths, seen = [[start]], set()
        while paths:
            path = paths.pop(0)
            nxt = [w for w in sorted(graph[path[-1]]) if w in component]
            if start in nxt:
                cycles.append([*path, start])
                break
            for w in nxt:
                if w not in seen:
                    seen.add(w)
                    paths.append([*path, w])
    return cycles


def layer_of(module: str, package: str) -> str:
    """``counterlens.metrics.evaluate`` -> ``metrics``; the package's own ``__init__`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_violations(edges, modules, package: str, layers: list[set[str]]) -> tuple[list[tuple], list[str]]:
    """``(violations, unplaced)``: edges ``(importer, imported, line, text)`` that go up the layers, and
    the top-level names that ``layers`` does not place."""
    rank = {name: i for i, names in enumerate(layers) for name in names}
    unplaced = sorted({layer_of(m, package) for m in modules} - set(rank))
    bad = []
    for src, dst, line, _ in edges:
        a, b = layer_of(src, package), layer_of(dst, package)
        if a in rank and b in rank and rank[b] > rank[a]:
            bad.append((src, dst, line, f"{src}:{line} imports {dst} ({a!r} is below {b!r})"))
    return bad, unplaced


# -- the package ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph():
    modules = module_files(SRC, "counterlens")
    return modules, import_edges(modules)


def test_nothing_outside_cli_imports_cli(graph):
    modules, edges = graph
    assert "counterlens.cli" in modules
    offenders = cli_imports_from_outside(edges, "counterlens")
    assert not offenders, "only counterlens/cli/ may import the CLI:\n" + "\n".join(offenders)


def test_no_import_cycles(graph):
    cycles = find_cycles(graph[1])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_order(graph):
    modules, edges = graph
    bad, unplaced = layer_violations(edges, modules, "counterlens", LAYERS)
    assert not unplaced, f"place these in LAYERS of {Path(__file__).name}: {unplaced}"
    new = [text for src, dst, _, text in bad if (src, dst) not in KNOWN_LAYER_EXCEPTIONS]
    assert not new, "imports from a layer above (DESIGN.md, 'Layout'):\n" + "\n".join(new)
    gone = sorted(set(KNOWN_LAYER_EXCEPTIONS) - {(src, dst) for src, dst, _, _ in bad})
    assert not gone, f"these known exceptions no longer occur; remove them from KNOWN_LAYER_EXCEPTIONS: {gone}"


# -- the checker on a package made up for it ------------------------------------------------------
def _fake_package(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        path = root / "fake" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return module_files(root / "fake", "fake")


FAKE = {
    "__init__.py": "from .metrics import score\n",
    "errors.py": "",
    "model.py": """
        from typing import TYPE_CHECKING

        import fake.errors
        from .errors import Oops

        if TYPE_CHECKING:
            from .metrics.score import Score    # typing only: no cycle, but a layer violation
        """,
    "metrics/__init__.py": "from .score import score\n",
    "metrics/score.py": """
        from .. import model
        from ..errors import Oops


        def score():
            from ..cli import common      # function-level: still an edge
            from ..runs import store
            return common, store
        """,
    "runs/__init__.py": "",
    "runs/store.py": "from ..metrics import helper\n",   # helper is a name, not a submodule: edge to metrics/__init__
    "cli/__init__.py": "from . import common\n",
    "cli/common.py": "from ..metrics.score import score\n",
}
FAKE_LAYERS = [{"errors"}, {"model"}, {"metrics"}, {"runs"}, {"__init__"}, {"cli"}]


def test_checker_resolves_relative_submodule_and_function_level_imports(tmp_path):
    modules = _fake_package(tmp_path, FAKE)
    edges = {(src, dst) for src, dst, *_ in import_edges(modules)}
    assert ("fake.metrics.score", "fake.model") in edges               # from .. import model: a submodule
    assert ("fake.metrics.score", "fake.errors") in edges
    assert ("fake.metrics.score", "fake.cli.common") in edges          # inside a function
    assert ("fake.runs.store", "fake.metrics") in edges                # a name of the package's __init__
    assert ("fake.model", "fake.errors") in edges                      # import fake.errors
    assert ("fake.cli", "fake.cli.common") in edges and ("fake", "fake.metrics.score") in edges   # a submodule
    typing_only = {(src, dst) for src, dst, _, flag in import_edges(modules) if flag}
    assert typing_only == {("fake.model", "fake.metrics.score")}


def test_checker_names_a_cli_import_from_outside(tmp_path):
    edges = import_edges(_fake_package(tmp_path, FAKE))
    offenders = cli_imports_from_outside(edges, "fake")
    assert len(offenders) == 1 and offenders[0].startswith("fake.metrics.score:7 imports fake.cli.common")


def test_checker_prints_a_cycle(tmp_path):
    cycles = find_cycles(import_edges(_fake_package(tmp_path, FAKE)))
    # metrics.score -> runs.store -> metrics -> metrics.score, and metrics.score -> cli.common -> metrics.score
    assert cycles and len(cycles) == 1
    cycle = cycles[0]
    assert cycle[0] == cycle[-1] == "fake.cli.common"
    assert "fake.metrics.score" in cycle
    assert not find_cycles([("a", "b", 1, False), ("b", "c", 1, False)])
    assert find_cycles([("a", "a", 1, False)]) == [["a", "a"]]
    assert not find_cycles([("a", "b", 1, False), ("b", "a", 2, True)])   # b's import of a is for type checkers


def test_checker_names_an_import_from_a_layer_above(tmp_path):
    modules = _fake_package(tmp_path, FAKE)
    bad, unplaced = layer_violations(import_edges(modules), modules, "fake", FAKE_LAYERS)
    assert not unplaced
    assert sorted((src, dst) for src, dst, _, _ in bad) == [("fake.metrics.score", "fake.cli.common"),
                                                           ("fake.metrics.score", "fake.runs.store"),
                                                           ("fake.model", "fake.metrics.score")]
    assert "fake.metrics.score:8 imports fake.runs.store ('metrics' is below 'runs')" in [t for *_, t in bad]
    _, unplaced = layer_violations(import_edges(modules), modules, "fake", FAKE_LAYERS[1:])
    assert unplaced == ["errors"]
