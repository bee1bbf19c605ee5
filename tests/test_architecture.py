"""The package's layering, checked on its source: no import cycles, and no lower layer importing a higher one.

Layers, lowest first (ARCHITECTURE.md): core < data, models < mixing < attacks < certify < train < evaluate < cli.
Every import of an adasmooth module counts, also one inside a function: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import adasmooth

SRC = Path(adasmooth.__file__).resolve().parent
LAYERS = {"core": 0, "data": 1, "models": 1, "mixing": 2, "attacks": 3, "certify": 4, "train": 5, "evaluate": 6,
          "cli": 7}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST, type_checking: bool = False):
    """Every node except those under ``if TYPE_CHECKING:`` (imports for annotations only, never
    executed), unless ``type_checking``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if not type_checking and isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, name: str, known: set[str], type_checking: bool = False) -> set[str]:
    """adasmooth modules imported by the file at ``path`` (module ``name``), resolved to known module
    names; with ``type_checking`` also those imported for annotations only."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path)), type_checking):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one, else names of pkg
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph(root: Path, type_checking: bool = False) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    known = set(files)
    return {name: imports_of(path, name, known, type_checking) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    # The top-level package re-exports a few names; importing it costs the highest layer it imports.
    top_rank = max((LAYERS[layer_of(d)] for d in graph.get("adasmooth", ()) if layer_of(d)), default=0)
    bad = []
    for module, deps in sorted(graph.items()):
        mine = layer_of(module)
        if mine is None:
            continue
        for dep in sorted(deps):
            theirs = layer_of(dep)
            rank = LAYERS[theirs] if theirs else top_rank
            if rank > LAYERS[mine]:
                bad.append(f"{module} ({mine}) imports {dep} ({theirs or 'top level'})")
    return bad


def test_every_package_is_placed_in_a_layer():
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert packages == set(LAYERS), f"packages without a layer (add them to LAYERS and ARCHITECTURE.md): {packages ^ set(LAYERS)}"


def test_no_import_cycle():
    # annotation-only imports count here: a circle hidden behind `if TYPE_CHECKING:` is still a circle
    # in the design (two modules that each need the other), only one Python happens not to execute
    cycle = find_cycle(import_graph(SRC, type_checking=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_lower_layers_never_import_higher_ones():
    assert layer_violations(import_graph(SRC)) == []


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    pkg = tmp_path / "adasmooth"
    for sub in ("attacks", "train", "core"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "attacks" / "pgd.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train" / "loop.py").write_text("from ..core.a import x\n")
    (pkg / "core" / "a.py").write_text("from .b import y\n")
    (pkg / "core" / "b.py").write_text("from . import a\n")
    (pkg / "core" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..train import loop\n")
    graph = import_graph(pkg)
    assert graph["adasmooth.attacks.pgd"] == {"adasmooth.train.loop"}
    assert graph["adasmooth.core.c"] == set()  # annotation-only imports do not count
    assert layer_violations(graph) == ["adasmooth.attacks.pgd (attacks) imports adasmooth.train.loop (train)"]
    cycle = find_cycle(graph)
    assert cycle is not None and set(cycle) == {"adasmooth.core.a", "adasmooth.core.b"}


def test_the_cycle_check_sees_circles_inside_a_package_also_behind_type_checking(tmp_path):
    """The train/ circle of issue 21: methods/base.py named loop.py's config for annotations while
    loop.py imported the methods."""
    pkg = tmp_path / "adasmooth"
    (pkg / "train" / "methods").mkdir(parents=True)
    for init in (pkg, pkg / "train", pkg / "train" / "methods"):
        (init / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from .methods import base\n")
    (pkg / "train" / "methods" / "base.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..loop import TrainConfig\n")
    assert find_cycle(import_graph(pkg)) is None  # Python never runs the annotation import ...
    cycle = find_cycle(import_graph(pkg, type_checking=True))  # ... but the design has the circle
    assert cycle is not None and set(cycle) == {"adasmooth.train.loop", "adasmooth.train.methods.base"}
    # a lazy import inside a function is a runtime edge: the same circle is found without the flag
    (pkg / "train" / "methods" / "base.py").write_text("def f():\n    from ..loop import TrainConfig\n")
    cycle = find_cycle(import_graph(pkg))
    assert cycle is not None and set(cycle) == {"adasmooth.train.loop", "adasmooth.train.methods.base"}


@pytest.mark.parametrize("name", sorted(m for m in import_graph(SRC) if not m.endswith("__main__")))
def test_every_module_imports_on_its_own(name):
    import importlib

    importlib.import_module(name)
