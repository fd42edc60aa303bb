"""Installing throwaway plugin distributions for tests: a module plus a dist-info on sys.path."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest


def install_fake_plugin(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    dist: str,
    module: str,
    source: str,
    entry_name: str | None = None,
    version: str = "1.2.3",
) -> None:
    """Write `module`.py and a `dist`-`version`.dist-info with an entry point in group `kvd`."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[kvd]\n{entry_name or module} = {module}\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.delitem(sys.modules, module, raising=False)
