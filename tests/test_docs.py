"""The docs keep up with the code: hooks, components, commands, the generated spec reference,
and the plugin walkthrough, which is installed and tested exactly as written."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from kvd.core import hookspecs
from kvd.core.component import config_class
from kvd.core.manager import ALLOWLIST_ENV, load_plugins, reset_plugins

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
HOOKS_DOC = DOCS / "plugin-hooks.md"
INDEX_DOC = DOCS / "index.md"
PLUGIN_DOC = DOCS / "writing-a-plugin.md"
SPEC_REFERENCE = DOCS / "spec-reference.md"
GENERATOR = ROOT / "scripts" / "gen_spec_reference.py"

BUILTINS = load_plugins(entry_points=False)


# --- markdown helpers ---------------------------------------------------------------------------


def prose_lines(text: str) -> Iterator[tuple[bool, str]]:
    """(inside a fenced code block, line) for every line."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            yield True, line
        else:
            yield fenced, line


def headings(text: str) -> list[tuple[int, str]]:
    """(level, title) of every heading outside code blocks."""
    found = []
    for fenced, line in prose_lines(text):
        match = re.match(r"(#{1,6})\s+(.*)", line)
        if match and not fenced:
            found.append((len(match.group(1)), match.group(2).strip()))
    return found


def section(text: str, title_pattern: str) -> str:
    """The body of the first heading matching `title_pattern`, up to the next heading of the
    same or a higher level ('' when there is none)."""
    lines = text.splitlines()
    start, level = None, 0
    for i, (fenced, line) in enumerate(prose_lines(text)):
        match = re.match(r"(#{1,6})\s+(.*)", line)
        if not match or fenced:
            continue
        if start is None and re.search(title_pattern, match.group(2)):
            start, level = i + 1, len(match.group(1))
        elif start is not None and len(match.group(1)) <= level:
            return "\n".join(lines[start:i])
    return "\n".join(lines[start:]) if start is not None else ""


def code_spans(text: str) -> set[str]:
    return set(re.findall(r"`([^`\n]+)`", text))


def table_rows(text: str) -> dict[str, list[str]]:
    """Table rows whose first cell is one code span: name -> cells."""
    rows = {}
    for fenced, line in prose_lines(text):
        if fenced or not line.startswith("|"):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        match = re.fullmatch(r"`([^`]+)`", cells[0])
        if match:
            rows[match.group(1)] = cells
    return rows


def code_after(text: str, marker: str) -> str:
    """The first fenced code block after the first line containing `marker`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if marker in line and "```" not in line)
    opening = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("```"))
    closing = next(i for i in range(opening + 1, len(lines)) if lines[i].startswith("```"))
    return "\n".join(lines[opening + 1 : closing]) + "\n"


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


@pytest.fixture
def builtin_plugins_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Process-wide plugins without third-party ones, reset before and after."""
    monkeypatch.setenv(ALLOWLIST_ENV, "")
    reset_plugins()
    yield
    reset_plugins()


# --- hooks and components -----------------------------------------------------------------------


def hook_names() -> list[str]:
    declared = [
        name
        for name, obj in vars(hookspecs).items()
        if callable(obj) and hasattr(obj, f"{hookspecs.PROJECT}_spec")
    ]
    return sorted(set(declared) | set(hookspecs.KINDS.values()))


@pytest.mark.parametrize("hook", hook_names())
def test_hook_documented(hook: str) -> None:
    text = HOOKS_DOC.read_text(encoding="utf-8")
    titled = any(hook in title for _, title in headings(text))
    assert titled or hook in code_spans(text), f"{hook} is not documented in {HOOKS_DOC.name}"
    assert re.search(rf"def {hook}\(register: Register\) -> None", text), (
        f"{HOOKS_DOC.name} does not show the signature of {hook}"
    )


COMPONENTS = [
    pytest.param(kind, entry.name, id=f"{kind}/{entry.name}")
    for kind in hookspecs.KINDS
    for entry in BUILTINS.registry(kind)
]


@pytest.mark.parametrize(("kind", "name"), COMPONENTS)
def test_component_documented(kind: str, name: str) -> None:
    """Each built-in component has a row in its hook's table, listing its Config fields."""
    hook = hookspecs.KINDS[kind]
    body = section(HOOKS_DOC.read_text(encoding="utf-8"), rf"`{hook}`")
    rows = table_rows(body)
    assert name in rows, f"{kind} component {name!r} has no row under {hook} in {HOOKS_DOC.name}"
    fields = set(config_class(BUILTINS.registry(kind).get(name)).model_fields)
    listed = code_spans(rows[name][-1])
    assert listed == fields, (
        f"{HOOKS_DOC.name}, {kind} {name!r}: options column lists {sorted(listed)}, "
        f"its Config has {sorted(fields)}"
    )


@pytest.mark.parametrize("kind", list(hookspecs.KINDS))
def test_no_stale_component_rows(kind: str) -> None:
    body = section(HOOKS_DOC.read_text(encoding="utf-8"), rf"`{hookspecs.KINDS[kind]}`")
    stale = set(table_rows(body)) - set(BUILTINS.registry(kind).names())
    assert not stale, f"{HOOKS_DOC.name} documents {kind} that do not exist: {sorted(stale)}"


# --- the generated spec reference ---------------------------------------------------------------


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_spec_reference", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_spec_reference_is_current(tmp_path: Path) -> None:
    out = tmp_path / "spec-reference.md"
    assert generator().main([str(out)]) == 0
    fresh = out.read_text(encoding="utf-8")
    committed = SPEC_REFERENCE.read_text(encoding="utf-8") if SPEC_REFERENCE.exists() else ""
    if fresh != committed:
        diff = difflib.unified_diff(
            committed.splitlines(), fresh.splitlines(), "docs/spec-reference.md", "generated", n=1
        )
        shown = "\n".join(list(diff)[:40])
        pytest.fail(
            "docs/spec-reference.md is stale; run `python scripts/gen_spec_reference.py`\n" + shown
        )


def test_every_spec_key_is_described() -> None:
    """Every key of the run spec and of every built-in component's options has a description
    (an attribute docstring under the field, or `Field(description=...)`)."""
    rows = [line for line in generator().render().splitlines() if line.startswith("| `")]
    undescribed = [row.split("|")[1].strip() for row in rows if row.rstrip().endswith("|  |")]
    assert rows and not undescribed, f"keys without a description: {undescribed}"


def test_spec_reference_is_deterministic() -> None:
    module = generator()
    assert module.render() == module.render()


# --- commands -----------------------------------------------------------------------------------


def builtin_commands() -> dict[str, Any]:
    """The click commands of `kvd --help` (built-ins only), by name."""
    import typer

    from kvd.cli.app import build_app

    group: Any = typer.main.get_command(build_app())
    return dict(group.commands)


@pytest.mark.usefixtures("builtin_plugins_only")
def test_every_command_documented() -> None:
    commands = builtin_commands()
    assert commands, "kvd --help lists no command"
    titles = [title for _, title in headings(INDEX_DOC.read_text(encoding="utf-8"))]
    missing = [n for n in sorted(commands) if not any(f"`kvd {n}`" in t for t in titles)]
    assert not missing, f"{INDEX_DOC.name} has no '### `kvd NAME`' section for: {missing}"


@pytest.mark.usefixtures("builtin_plugins_only")
def test_every_command_option_documented() -> None:
    text = INDEX_DOC.read_text(encoding="utf-8")
    missing = []
    for name, command in sorted(builtin_commands().items()):
        body = section(text, rf"`kvd {re.escape(name)}`")
        for param in command.params:
            for opt in getattr(param, "opts", []):
                if opt.startswith("--") and opt != "--help" and opt not in body:
                    missing.append(f"kvd {name} {opt}")
    assert not missing, f"options not described in their command's section: {missing}"


# --- examples in the docs -----------------------------------------------------------------------


def yaml_blocks(text: str) -> list[str]:
    return re.findall(r"^```yaml\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


@pytest.mark.usefixtures("builtin_plugins_only")
def test_spec_examples_validate() -> None:
    from kvd.spec.runspec import parse_spec

    specs = []
    for doc in sorted(DOCS.glob("*.md")):
        for block in yaml_blocks(doc.read_text(encoding="utf-8")):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and "teachers" in data:
                specs.append((doc.name, data))
    assert specs, "the docs show no complete run spec"
    for name, data in specs:
        parse_spec(data, source=name)  # raises SpecError with every problem


def test_links_resolve() -> None:
    broken = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        prose = "\n".join(line for fenced, line in prose_lines(text) if not fenced)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = doc.parent / path if path else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and linked.suffix == ".md":
                titles = headings(linked.read_text(encoding="utf-8"))
                if anchor not in {slug(t) for _, t in titles}:
                    broken.append(f"{doc.name}: {target}")
    assert not broken, f"broken links: {broken}"


def test_plugin_walkthrough_works(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Install the package of writing-a-plugin.md as written and run the tests it shows."""
    text = PLUGIN_DOC.read_text(encoding="utf-8")
    project = tomllib.loads(code_after(text, "`pyproject.toml`:"))["project"]
    entry_points = project["entry-points"]["kvd"]
    assert len(entry_points) == 1
    ((entry_name, module_path),) = entry_points.items()
    package, module = module_path.split(".")
    (tmp_path / package).mkdir()
    (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / package / f"{module}.py").write_text(
        code_after(text, f"`src/{package}/{module}.py`:")
    )
    dist = project["name"]
    info = tmp_path / f"{dist.replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {project['version']}\n"
    )
    (info / "entry_points.txt").write_text(f"[kvd]\n{entry_name} = {module_path}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(ALLOWLIST_ENV, raising=False)
    tests_source = code_after(text, "`tests/test_consensus.py`:")
    namespace: dict[str, Any] = {"__name__": "doc_test_consensus"}
    try:
        reset_plugins()
        exec(compile(tests_source, "writing-a-plugin.md (tests)", "exec"), namespace)
        tests = [fn for name, fn in namespace.items() if name.startswith("test_")]
        assert len(tests) >= 3
        for test in tests:
            test()
    finally:
        reset_plugins()
        for name in [m for m in sys.modules if m == package or m.startswith(f"{package}.")]:
            del sys.modules[name]
