"""The `kvd` Typer application: built-in commands plus those registered by plugins."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import typer

import kvd
from kvd.cli.errors import render_error, stderr
from kvd.core.errors import KvdError
from kvd.core.manager import ALLOWLIST_ENV, get_plugins, reset_plugins


def build_app() -> typer.Typer:
    """A fresh app with every built-in and plugin command."""
    from kvd.cli import (
        ab,
        cache_teachers,
        check_shapes,
        compare,
        export,
        plugins,
        schema,
        train,
        validate,
    )
    from kvd.cli import eval as eval_cli

    app = typer.Typer(
        name="kvd",
        help="Distil several heterogeneous teacher LLMs into one student through their KV caches.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        add_completion=True,
    )

    @app.callback()
    def _root(
        no_plugins: bool = typer.Option(
            False, "--no-plugins", help=f"Load no third-party plugins (like {ALLOWLIST_ENV}=)."
        ),
        version: bool = typer.Option(
            False,
            "--version",
            help="Print kvd's version and exit.",
            is_eager=True,
            callback=_print_version,
        ),
    ) -> None:
        """kvd: multi-teacher KV-cache distillation."""

    for module in (
        plugins,
        validate,
        schema,
        check_shapes,
        train,
        cache_teachers,
        eval_cli,
        export,
        compare,
        ab,
    ):
        module.register(app)
    loaded = get_plugins()
    for failure in loaded.failures:
        stderr.print(
            f"warning: plugin {failure.name!r} ({failure.package}) failed to load: "
            f"{failure.error}; run `kvd plugins` for details",
            markup=False,
        )
    for entry in loaded.registry("commands"):
        app.command(entry.name)(entry.obj)
    return app


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"kvd {kvd.__version__}")
        raise typer.Exit(0)


def quiet_transformers() -> None:
    """No tqdm bars of transformers / huggingface_hub ("Loading weights", "Writing model
    shards") in kvd's output: its own progress lines say where a run is. A user's
    HF_HUB_DISABLE_PROGRESS_BARS=0 keeps them."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] != "0":
        from transformers.utils import logging

        logging.disable_progress_bar()


def _click() -> Any:
    """The click that Typer runs on: its own vendored copy since typer 0.26, else click."""
    try:
        return importlib.import_module("typer._click")
    except ImportError:
        return importlib.import_module("click")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user-fixable errors are printed and turned into exit codes. Under torchrun,
    the process group a command opened is closed before returning."""
    code = _run(list(sys.argv[1:] if argv is None else argv))
    if "kvd.core.runtime" in sys.modules:  # else no command opened a process group
        from kvd.core.runtime import close_process_group

        close_process_group(clean=code == 0)
    return code


def _run(args: list[str]) -> int:
    """The command's exit code."""
    quiet_transformers()
    if "--no-plugins" in args:
        os.environ[ALLOWLIST_ENV] = ""
        reset_plugins()
    click = _click()
    try:
        app = build_app()
        result = app(args=args, prog_name="kvd", standalone_mode=False)
    except KvdError as exc:
        render_error(exc)
        return exc.exit_code
    except typer.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return int(exc.exit_code)
    except typer.Abort:
        stderr.print("aborted")
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
