"""The layering of docs/architecture.md holds: every module of kvd sits in one layer, imports
(at module level or inside functions) go to its own layer or lower ones only, and the import
graph has no cycle."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "kvd"


def layers() -> dict[str, int]:
    """Top-level module or package name -> its layer's index in the doc's table (0 = bottom)."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "`" in line]
    return {
        name: i for i, row in enumerate(rows) for name in re.findall(r"`(\w+)`", row.split("|")[2])
    }


def modules() -> dict[str, Path]:
    """Dotted name -> file of every module of kvd (a package is named by its __init__)."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The kvd modules `path` imports anywhere in it (`from kvd.a import b` names kvd.a.b
    when that is a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {n for n in names if n in known}
    return found


def top(name: str) -> str:
    return name.split(".")[1] if name != "kvd" else "__init__"


def test_every_module_sits_in_one_layer_and_imports_only_downwards() -> None:
    assert "import" not in (PACKAGE / "__init__.py").read_text()  # kvd itself: a version only
    layer = layers() | {"__init__": 0}
    mods = modules()
    unplaced = sorted({top(m) for m in mods} - set(layer))
    assert not unplaced, f"modules missing from docs/architecture.md's layer table: {unplaced}"
    upward = [
        f"{m} imports {t}"
        for m, path in mods.items()
        for t in imports(path, mods)
        if layer[top(t)] > layer[top(m)]
    ]
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_the_import_graph_has_no_cycle() -> None:
    mods = modules()
    graph = {m: imports(path, mods) - {m} for m, path in mods.items()}
    done: set[str] = set()
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            cycles.append(" -> ".join([*trail[trail.index(node) :], node]))
            return
        if node in done:
            return
        for nxt in sorted(graph[node]):
            visit(nxt, [*trail, node])
        done.add(node)

    for m in sorted(graph):
        visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_public_paths_are_the_same_objects_as_their_homes() -> None:
    """`from kvd.errors import KvdError` (plugins, docs) gives the very object kvd raises."""
    import importlib

    homes = {
        "errors": "core.errors",
        "hookspecs": "core.hookspecs",
        "manager": "core.manager",
        "component": "core.component",
        "types": "core.types",
        "models": "spec.models",
        "geometry": "spec.geometry",
    }
    layer = layers()
    assert {n for n, i in layer.items() if i == max(layer.values())} == set(homes)
    for public, home in homes.items():
        shim, real = (
            importlib.import_module(f"kvd.{public}"),
            importlib.import_module(f"kvd.{home}"),
        )
        names = [n for n in vars(real) if not n.startswith("_")]
        assert names and all(getattr(shim, n) is getattr(real, n) for n in names), public
    spec = importlib.import_module("kvd.spec")
    runspec = importlib.import_module("kvd.spec.runspec")
    assert all(getattr(spec, n) is getattr(runspec, n) for n in spec.__all__)
