"""The contrib packages (plugins_contrib/*) plug in as third-party packages, without pip: each
test puts a package's source and a generated dist-info on sys.path ("installed"), or leaves
them off and keeps an installed copy out with KVD_LOAD_PLUGINS ("uninstalled")."""

from __future__ import annotations

import ast
import json
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvd.cli.app import main
from kvd.core.manager import ALLOWLIST_ENV, ENTRY_POINT_GROUP, allow_key, reset_plugins
from kvd.testing import tiny_causal_lm, tiny_lm_config

ROOT = Path(__file__).resolve().parent.parent
CONTRIB = ROOT / "plugins_contrib"
PACKAGE_DIRS = sorted(p for p in CONTRIB.iterdir() if (p / "pyproject.toml").exists())


@dataclass(frozen=True)
class Contrib:
    """A contrib package as pyproject.toml declares it."""

    path: Path
    name: str
    version: str
    entry_points: dict[str, str]

    @classmethod
    def read(cls, path: Path) -> Contrib:
        project = tomllib.loads((path / "pyproject.toml").read_text(encoding="utf-8"))["project"]
        entry_points = project.get("entry-points", {}).get(ENTRY_POINT_GROUP, {})
        return cls(path, project["name"], project["version"], entry_points)

    @property
    def modules(self) -> list[str]:
        return sorted({value.split(".")[0] for value in self.entry_points.values()})


def tiny_model(seed: int, **shape: Any) -> dict[str, Any]:
    return {"source": "tiny", "seed": seed, "config": tiny_lm_config(**shape)}


def router_spec(folder: Path) -> dict[str, Any]:
    return {
        "teachers": [tiny_model(1, layers=3), tiny_model(2, heads=6, kv_heads=1, head_dim=16)],
        "student": tiny_model(3, head_dim=4),
        "data": {"name": "stdlib", "tasks": ["reference", "module_doc"]},
        "fusion": {"name": "task_attention", "hidden": 16},
    }


def run_teacher_spec(folder: Path) -> dict[str, Any]:
    """A teacher from a finished run's folder (config and tokenizer only: validate reads no
    weights)."""
    student = tiny_causal_lm(layers=2, heads=4, kv_heads=2, head_dim=8)
    student.model.config.save_pretrained(folder / "first" / "student")
    student.tokenizer.save_pretrained(folder / "first" / "student")
    (folder / "first" / "results.json").write_text(json.dumps({"step": 1}))
    return {
        "teachers": [{"id": "gen1", "source": "kvd_run", "run": "first"}],
        "student": tiny_model(3, head_dim=4),
    }


USES: dict[str, tuple[str, str, Callable[[Path], dict[str, Any]], str]] = {
    "kvd-attention-router": ("fusions", "task_attention", router_spec, "fusion.name"),
    "kvd-run-teacher": ("models", "kvd_run", run_teacher_spec, "teachers.0.source"),
}
"""Package -> (kind, component, a spec naming it, where validate reports it when missing)."""


@pytest.fixture(autouse=True)
def _fresh_plugins(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], Contrib]]:
    """`install(name)`: the package's src/ and a dist-info with its entry points on sys.path."""
    installed: list[Contrib] = []

    def _install(name: str) -> Contrib:
        pkg = Contrib.read(CONTRIB / name)
        info = tmp_path / "site" / f"{pkg.name.replace('-', '_')}-{pkg.version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {pkg.name}\nVersion: {pkg.version}\n"
        )
        lines = [f"{k} = {v}" for k, v in pkg.entry_points.items()]
        (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n" + "\n".join(lines) + "\n")
        monkeypatch.syspath_prepend(str(info.parent))
        monkeypatch.syspath_prepend(str(pkg.path / "src"))
        installed.append(pkg)
        return pkg

    yield _install
    for pkg in installed:
        for module in [m for m in sys.modules if m.split(".")[0] in pkg.modules]:
            del sys.modules[module]


def uninstall(pkg: Contrib, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep `pkg`'s entry points from loading even when it is pip-installed here; every other
    installed plugin still loads."""
    others = {
        allow_key(ep.dist.metadata["Name"] if ep.dist else "?", ep.name)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)
        if ep.name not in pkg.entry_points
    }
    monkeypatch.setenv(ALLOWLIST_ENV, ",".join(sorted(others)))


def write_spec(folder: Path, name: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump(USES[name][2](folder)))
    return path


def test_every_contrib_package_is_a_complete_project() -> None:
    assert {p.name for p in PACKAGE_DIRS} >= set(USES)
    for path in PACKAGE_DIRS:
        pkg = Contrib.read(path)
        assert pkg.entry_points, f"{path.name}: no entry point in group {ENTRY_POINT_GROUP!r}"
        assert (path / "README.md").exists() and list((path / "tests").glob("test_*.py"))
        for module in pkg.modules:
            assert (path / "src" / module / "__init__.py").exists()


def _kvd_imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvd"):
            yield from (f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("kvd"))


def test_contrib_uses_only_public_kvd_names_and_the_core_never_imports_it() -> None:
    contrib_modules = {m for path in PACKAGE_DIRS for m in Contrib.read(path).modules}
    for path in PACKAGE_DIRS:
        for source in (path / "src").rglob("*.py"):
            for name in _kvd_imports(ast.parse(source.read_text(encoding="utf-8"))):
                top = name.split(".")[0]
                private = [part for part in name.split(".") if part.startswith("_")]
                assert top in contrib_modules or not private, f"{source}: imports {name}"
    for source in (ROOT / "kvd").rglob("*.py"):
        tops = {n.split(".")[0] for n in _kvd_imports(ast.parse(source.read_bytes()))}
        assert not tops & contrib_modules, f"{source} imports a contrib package"
        assert "plugins_contrib" not in source.read_text(encoding="utf-8"), source


@pytest.mark.parametrize("name", sorted(USES))
def test_installed_component_is_listed(
    name: str, install: Callable[[str], Contrib], capsys: pytest.CaptureFixture[str]
) -> None:
    pkg = install(name)
    kind, component, _, _ = USES[name]
    assert main(["plugins", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    rows = [r for r in listed["components"] if r["name"] == component]
    assert [(r["kind"], r["package"], r["version"]) for r in rows] == [
        (kind, pkg.name, pkg.version)
    ]
    assert rows[0]["plugin"] in pkg.entry_points and rows[0]["summary"]
    assert not listed["failures"]


@pytest.mark.parametrize("name", sorted(USES))
def test_spec_naming_it_validates_once_installed(
    name: str, install: Callable[[str], Contrib], tmp_path: Path
) -> None:
    install(name)
    assert main(["validate", str(write_spec(tmp_path, name))]) == 0


@pytest.mark.parametrize("name", sorted(USES))
def test_uninstalled_is_an_unknown_component_with_a_hint(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uninstall(Contrib.read(CONTRIB / name), monkeypatch)
    kind, component, _, loc = USES[name]
    assert main(["validate", str(write_spec(tmp_path, name))]) == 2
    err = capsys.readouterr().err
    text = " ".join(err.replace("│", " ").split())
    assert "Traceback" not in err
    assert loc in text
    assert f"unknown {kind} component {component!r}" in text
    assert "appears once that package is installed" in text
