"""Plugin discovery: built-ins, entry points, the allowlist, failures and duplicates."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvd.cli.app import main
from kvd.core.errors import DuplicateComponentError, UnknownComponentError
from kvd.core.hookspecs import KINDS
from kvd.core.manager import BUILTIN_PLUGINS, load_plugins, reset_plugins
from kvd.core.registry import Registry
from tests.plugin_fixtures import install_fake_plugin

FUSION_PLUGIN = """
    import torch
    from kvd.core.hookspecs import hookimpl

    class ZeroFusion(torch.nn.Module):
        '''A fusion from a third-party package.'''

    @hookimpl
    def register_fusions(register):
        register("zero_fusion", ZeroFusion)
"""


@pytest.fixture(autouse=True)
def _fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVD_LOAD_PLUGINS", raising=False)
    reset_plugins()
    yield
    reset_plugins()


def test_registry_lookup_and_did_you_mean() -> None:
    reg: Registry[type] = Registry("fusions")
    reg.add("similarity", int, plugin="p", package="pkg", version="1")
    assert reg.get("similarity") is int
    with pytest.raises(UnknownComponentError, match=r"did you mean .similarity.\?"):
        reg.get("similarty")


def test_duplicate_names_both_plugins() -> None:
    reg: Registry[type] = Registry("losses")
    reg.add("kv_mse", int, plugin="first", package="a", version="1")
    with pytest.raises(DuplicateComponentError, match=r"'first'.*'second'"):
        reg.add("kv_mse", float, plugin="second", package="b", version="2")


def test_builtins_register_through_hooks() -> None:
    plugins = load_plugins(entry_points=False)
    assert set(plugins.registries) == set(KINDS)
    for module in BUILTIN_PLUGINS:
        assert plugins.pm.get_plugin(module) is not None
    for entry in plugins.registry("losses"):
        assert entry.package == "kvd"


def test_entry_point_plugin_is_discovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_plugin(
        tmp_path, monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    entry = load_plugins().registry("fusions").entry("zero_fusion")
    assert (entry.plugin, entry.package, entry.version) == ("kvd_zero_plugin", "kvd-zero", "1.2.3")
    assert entry.summary == "A fusion from a third-party package."


@pytest.mark.parametrize(
    ("allow", "loaded"),
    [
        ("", False),
        ("kvd-other:other", False),
        ("kvd-zero:kvd_zero_plugin", True),
        ("KVD_Zero:kvd_zero_plugin", True),  # distribution names compare as pip compares them
        ("kvd-impostor:kvd_zero_plugin", False),  # the name, claimed by another distribution
        ("kvd_zero_plugin", False),  # a bare name: reported, nothing loaded by it
    ],
)
def test_allowlist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, allow: str, loaded: bool
) -> None:
    """KVD_LOAD_PLUGINS names DIST:NAME, so a module that claims an allowed entry-point name
    from another distribution is not imported."""
    install_fake_plugin(
        tmp_path, monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    monkeypatch.setenv("KVD_LOAD_PLUGINS", allow)
    plugins = load_plugins()
    assert ("zero_fusion" in plugins.registry("fusions")) is loaded
    bare = [f for f in plugins.failures if "names no distribution" in f.error]
    assert [f.name for f in bare] == (["kvd_zero_plugin"] if ":" not in allow and allow else [])
    assert (
        plugins.registry("losses").names()
        == load_plugins(entry_points=False).registry("losses").names()
    )


def test_broken_plugin_is_reported_and_help_still_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_fake_plugin(
        tmp_path,
        monkeypatch,
        dist="kvd-broken",
        module="kvd_broken_plugin",
        source="import not_a_module_anywhere\n",
    )
    plugins = load_plugins()
    assert [f.name for f in plugins.failures] == ["kvd_broken_plugin"]
    assert "ModuleNotFoundError" in plugins.failures[0].error
    assert main(["--help"]) == 0
    captured = capsys.readouterr()
    assert "kvd_broken_plugin" in captured.err and "Traceback" not in captured.err
    assert "check-shapes" in captured.out or "plugins" in captured.out


def test_misspelt_hook_fails_loudly_without_breaking_others(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_plugin(
        tmp_path,
        monkeypatch,
        dist="kvd-typo",
        module="kvd_typo_plugin",
        source="""
            from kvd.core.hookspecs import hookimpl

            @hookimpl
            def register_fusion(register):
                register("never", object)
        """,
    )
    plugins = load_plugins()
    (failure,) = plugins.failures
    assert "register_fusion" in failure.error and "register_fusions" in failure.error
    assert "never" not in plugins.registry("fusions")


def test_duplicate_across_plugins_names_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install_fake_plugin(
        tmp_path / "a", monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    install_fake_plugin(
        tmp_path / "b",
        monkeypatch,
        dist="kvd-zero-two",
        module="kvd_zero_two",
        source=FUSION_PLUGIN,
    )
    with pytest.raises(
        DuplicateComponentError, match=r"kvd_zero_(plugin|two).*kvd_zero_(plugin|two)"
    ):
        load_plugins()


def test_plugins_command_lists_package_and_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_fake_plugin(
        tmp_path, monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    assert main(["plugins", "--json"]) == 0
    import json

    rows = json.loads(capsys.readouterr().out)["components"]
    zero = [r for r in rows if r["name"] == "zero_fusion"]
    assert zero == [
        {
            "kind": "fusions",
            "name": "zero_fusion",
            "plugin": "kvd_zero_plugin",
            "package": "kvd-zero",
            "version": "1.2.3",
            "summary": "A fusion from a third-party package.",
        }
    ]


def test_no_plugins_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    install_fake_plugin(
        tmp_path, monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    monkeypatch.setenv("KVD_LOAD_PLUGINS", "kvd_zero_plugin")
    assert main(["--no-plugins", "plugins", "--json"]) == 0
    assert "zero_fusion" not in capsys.readouterr().out


def test_a_component_of_the_wrong_class_is_refused_naming_its_plugin(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The registries are typed per kind: a spec that names a registered "fusion" that is not
    a kvd.fusion.Fusion fails with exit 2 naming the plugin and its package, not deep inside
    training."""
    import yaml

    from tests.specs import tiny_spec

    install_fake_plugin(
        tmp_path / "p", monkeypatch, dist="kvd-zero", module="kvd_zero_plugin", source=FUSION_PLUGIN
    )
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(tmp_path / "run", fusion={"name": "zero_fusion"})))
    assert main(["train", str(spec)]) == 2
    err = capsys.readouterr().err
    assert "zero_fusion" in err and "kvd_zero_plugin" in err and "kvd-zero 1.2.3" in err
    assert "kvd.fusion.base.Fusion" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
