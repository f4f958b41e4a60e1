"""What every `mlora` command shares: messages on stderr, exit on a user's mistake, talking
to an engine, and m-LoRA's [model] flags. No torch.

People read stderr (progress bars, messages), programs read stdout. A user mistake
(``engine.core.errors.UserError``) prints its message on stderr and exits with code 2,
never a traceback; an engine that is not running or does not answer exits with 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.core.errors import UserError
from engine.core.jobs import EXIT_FAILED, EXIT_NO_ENGINE, EXIT_USER_ERROR

if TYPE_CHECKING:
    from engine.core.preflight import Preflight
    from engine.core.runtime import EngineRecord
    from mlora_tui.client import EngineClient

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``message`` (plain text: brackets in it are not markup) on stderr and exit."""
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def say(message: str, style: str = "") -> None:
    stderr.print(Text(message, style=style), soft_wrap=True)


def checked(config: Path, **options: Any) -> "Preflight":
    """``engine.core.preflight.preflight(config, **options)``; a mistake exits with 2."""
    from engine.core.preflight import preflight

    try:
        return preflight(config, **options)
    except UserError as e:
        fail(str(e))


# -- talking to engines -------------------------------------------------------------------

def run_client(coro: Awaitable[Any]) -> Any:
    """Run a client coroutine; engine and request errors become messages and exit codes."""
    from engine.core.runtime import EngineNotFound
    from mlora_tui.client import EngineUnavailable, RequestFailed, run_sync

    try:
        return run_sync(coro)
    except (EngineNotFound, EngineUnavailable) as e:
        fail(str(e), EXIT_NO_ENGINE)
    except RequestFailed as e:
        if e.code == "user_error":
            fail(e.message)
        fail(f"the engine refused the request ({e.code}): {e.message}", EXIT_FAILED)
    except UserError as e:
        fail(str(e))


def target(name: Optional[str]) -> "EngineRecord":
    from engine.core.runtime import EngineNotFound
    from mlora_tui.launcher import attach_target

    try:
        return attach_target(name)
    except EngineNotFound as e:
        fail(str(e), EXIT_NO_ENGINE)
    except UserError as e:
        fail(str(e))


async def with_client(record: "EngineRecord",
                      action: Callable[["EngineClient"], Awaitable[Any]]) -> Any:
    from mlora_tui.client import EngineClient

    client = await EngineClient.connect(record.socket, client="mlora")
    try:
        return await action(client)
    finally:
        await client.close()


def engine_request(engine: Optional[str],
                   action: Callable[["EngineClient"], Awaitable[Any]]) -> Any:
    """Connect to the chosen engine, run ``action(client)``, and return its result."""
    record = target(engine)
    return run_client(with_client(record, action))


EngineArgument = Annotated[Optional[str], typer.Argument(
    help="The engine's name or pid (see mlora ps); default: the only one running.",
    show_default=False)]
EngineOption = Annotated[Optional[str], typer.Option(
    "--engine", "-e", help="The engine's name or pid (see mlora ps); default: the only "
                           "one running.", show_default=False)]


# -- m-LoRA's command-line flags, as overrides of the config's [model] table ----------------

_MLORA_PANEL = "m-LoRA flags (override \\[model])"
BaseModelOption = Annotated[Optional[str], typer.Option(
    "--base_model", "--base-model", help="\\[model] base_model: smollm2-135m or a model folder.",
    rich_help_panel=_MLORA_PANEL, show_default=False)]
Fp16Option = Annotated[bool, typer.Option(
    "--fp16", help='\\[model] dtype = "fp16".', rich_help_panel=_MLORA_PANEL)]
Bf16Option = Annotated[bool, typer.Option(
    "--bf16", help='\\[model] dtype = "bf16".', rich_help_panel=_MLORA_PANEL)]
Tf32Option = Annotated[bool, typer.Option(
    "--tf32", help="\\[model] tf32 = true (NVIDIA GPUs).", rich_help_panel=_MLORA_PANEL)]
Load4bitOption = Annotated[bool, typer.Option(
    "--load_4bit", "--load-4bit", help='\\[model] quantize = "4bit" (QLoRA).',
    rich_help_panel=_MLORA_PANEL)]
Load8bitOption = Annotated[bool, typer.Option(
    "--load_8bit", "--load-8bit", help='\\[model] quantize = "8bit".',
    rich_help_panel=_MLORA_PANEL)]
AttnImplOption = Annotated[Optional[str], typer.Option(
    "--attn_impl", "--attn-impl", help="\\[model] attn_impl: auto, eager, sdpa or flash_attn.",
    rich_help_panel=_MLORA_PANEL, show_default=False)]


def model_overrides(base_model: Optional[str], fp16: bool, bf16: bool, tf32: bool,
                    load_4bit: bool, load_8bit: bool, attn_impl: Optional[str]) -> dict:
    """The [model] fields that m-LoRA's flags set; conflicting flags are a usage error."""
    if fp16 and bf16:
        fail("--fp16 and --bf16 contradict each other; give one")
    if load_4bit and load_8bit:
        fail("--load_4bit and --load_8bit contradict each other; give one")
    overrides: dict = {}
    if base_model is not None:
        overrides["base_model"] = base_model
    if fp16 or bf16:
        overrides["dtype"] = "fp16" if fp16 else "bf16"
    if tf32:
        overrides["tf32"] = True
    if load_4bit or load_8bit:
        overrides["quantize"] = "4bit" if load_4bit else "8bit"
    if attn_impl is not None:
        overrides["attn_impl"] = attn_impl
    return overrides
