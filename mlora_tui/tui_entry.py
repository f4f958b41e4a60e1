"""The `mlora-tui` console script: start or attach to an engine and watch it live.

    mlora-tui CONFIG            the engine for CONFIG: started, or the one already serving
                                its output_dir
    mlora-tui --attach NAME     a running engine, by name or pid
    mlora-tui                   the only running engine
    mlora-tui --playground DIR [DIR...]
                                the playground alone on adapter folders (a finished run's):
                                it loads the base model and the adapters itself

The engine runs in its own process session: quitting the TUI (q, d), closing the terminal
or losing SSH leaves it training; attach again at any time. A bad config or an unknown
engine is reported on stderr before the screen opens (exit 2, or 3 for no such engine).
Starting the engine happens behind the first frame, so the screen is up at once.

Keys can be remapped in a TOML file of ``binding_id = "key"`` lines (``--keymap``, by
default ``$XDG_CONFIG_HOME/mlora-tui/keymap.toml`` when it exists); ``?`` lists the ids'
keys. Imports no torch, ever: the engine is another process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.core.errors import UserError
from engine.core.jobs import EXIT_NO_ENGINE, EXIT_OK, EXIT_USER_ERROR

cli = typer.Typer(name="mlora-tui", add_completion=False, rich_markup_mode="rich",
                  pretty_exceptions_show_locals=False)
stderr = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def default_keymap_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "mlora-tui" / "keymap.toml"


def load_keymap(path: Path, known_ids: set[str]) -> dict[str, str]:
    """``binding_id = "keys"`` pairs from a TOML file; UserError naming what is wrong."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"{path}: cannot read the keymap: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML: {e}") from None
    for binding_id, keys in data.items():
        if binding_id not in known_ids:
            raise UserError(f"{path}: {binding_id!r} is not a key binding id; known: "
                            f"{', '.join(sorted(known_ids))}")
        if not isinstance(keys, str) or not keys.strip():
            raise UserError(f"{path}: {binding_id} must be a string of keys, like "
                            f"{binding_id} = \"ctrl+x\" or \"x,ctrl+x\"")
    return data


@cli.command(help="Watch and steer the LoRA jobs of an engine in a terminal UI.\n\n"
                  "With CONFIG, start its engine (or attach to the one already running it); "
                  "with --attach, attach to a running engine; with neither, attach to the "
                  "only running engine. Quitting (q) leaves the engine training.")
def main_command(
    config: Annotated[Optional[list[Path]], typer.Argument(
        help="A config TOML file: start its engine, or attach to it if running (with "
             "--playground: adapter folders).",
        metavar="CONFIG", show_default=False)] = None,
    attach: Annotated[Optional[str], typer.Option(
        "--attach", "-a", help="Attach to the running engine with this name (or pid).",
        show_default=False)] = None,
    keymap: Annotated[Optional[Path], typer.Option(
        help="A TOML file of binding_id = \"key\" lines that remap keys (default: "
             "$XDG_CONFIG_HOME/mlora-tui/keymap.toml when it exists; ? shows the ids' keys).",
        show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="With CONFIG: continue its run from the newest checkpoint (after a "
                         "crash, a kill or a stop) instead of refusing a folder that holds "
                         "it.")] = False,
    playground: Annotated[bool, typer.Option(
        "--playground", help="Open the playground alone on the adapter folders given "
                             "(DIR [DIR...]): they answer a prompt side by side; the base "
                             "model and the adapters are loaded here, no engine.")] = False,
) -> None:
    if playground:
        _playground(config or [], attach)
    if config is not None and len(config) > 1:
        _fail("give one CONFIG (several folders go with --playground)")
    config = config[0] if config else None
    if config is not None and attach is not None:
        _fail("give a CONFIG or --attach NAME, not both")
    from engine.core.runtime import EngineNotFound
    from mlora_tui.launcher import attach_target, ensure_engine

    try:
        if config is not None:
            from engine.core.preflight import preflight

            # A typo, a bad data row or a folder holding another run is reported here,
            # before the screen opens; the engine starts behind the first frame.
            found = preflight(config, resume=resume)
            locate = lambda: ensure_engine(config, resume=resume, checked=found)  # noqa: E731
            target = None
        else:
            record = attach_target(attach)
            locate = lambda: record  # noqa: E731
            target = record.name
        from mlora_tui.app import MloraApp, binding_ids

        keymap_path = keymap or default_keymap_path()
        keys = (load_keymap(keymap_path, binding_ids())
                if keymap is not None or keymap_path.is_file() else {})
    except EngineNotFound as e:
        _fail(str(e), EXIT_NO_ENGINE)
    except UserError as e:
        _fail(str(e))
    app = MloraApp(locate, target_name=target, keymap=keys)
    app.run()
    if app.failure:
        _fail(app.failure, app.return_code or EXIT_USER_ERROR)
    raise typer.Exit(app.return_code or EXIT_OK)


def _playground(folders: list[Path], attach: Optional[str]) -> NoReturn:
    if attach is not None:
        _fail("--playground takes adapter folders, not --attach")
    from mlora_tui.playground_local import check_folders

    problem = check_folders(folders)
    if problem:
        _fail(problem)
    from mlora_tui.widgets.playground import PlaygroundApp

    app = PlaygroundApp(folders)
    app.run()
    raise typer.Exit(app.return_code or EXIT_OK)


def main() -> None:
    """Entry point of the `mlora-tui` console script."""
    cli()


if __name__ == "__main__":
    main()
