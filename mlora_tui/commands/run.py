"""`mlora run`, `mlora attach` and `mlora serve`: start an engine (or find the one already
running for the config), watch its events until it exits, and the engine process itself.

Only ``serve`` imports torch, inside the command: the engine is another process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable, Optional

import typer

from engine.core.errors import UserError
from engine.core.jobs import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USER_ERROR
from mlora_tui.commands.common import (AttnImplOption, BaseModelOption, Bf16Option,
                                       EngineArgument, Fp16Option, Load4bitOption,
                                       Load8bitOption, Tf32Option, checked, fail,
                                       model_overrides, run_client, say, stderr, target)

if TYPE_CHECKING:
    from engine.core.runtime import EngineRecord

# Help texts: one line per paragraph, so Rich wraps them to the terminal's width.
RUN_HELP = "\n\n".join([
    "Train every adapter in CONFIG together until all jobs finish.",
    "Training runs in an engine process of its own (its log: OUTPUT_DIR/engine.log), so "
    "closing the terminal or losing SSH never stops it. If an engine already runs for "
    "CONFIG's output_dir, this attaches to it instead of starting another.",
    "An output_dir that already holds a run (adapter folders, checkpoints, or a "
    "metrics.jsonl with training steps) is refused before anything starts: "
    "[bold]--overwrite[/bold] moves that run into OUTPUT_DIR/replaced-TIME/ (nothing is "
    "deleted) and starts afresh. A folder where a run failed before its first step is "
    "reused as it is.",
    "Progress goes to stderr: one bar per adapter, with state changes and warnings above the "
    "bars. With [bold]--json[/bold], stdout gets every engine event as one JSON object a line "
    "(the same lines as OUTPUT_DIR/metrics.jsonl) and no bars are drawn.",
    "Ctrl-C stops the engine after the current step and saves a checkpoint of every "
    "unfinished job; a second Ctrl-C detaches at once (the engine still stops). With "
    "[bold]--detach[/bold] the command returns once the engine answers and leaves it "
    "training: watch it with [bold]mlora attach NAME[/bold] or [bold]mlora-tui --attach "
    "NAME[/bold].",
    "[bold]Exit codes[/bold]: 0 every job finished (or --max-steps was reached, or the "
    "engine was stopped by someone else) with no failure, or --detach; 1 some job failed or "
    "the engine crashed; 2 usage, config or data error; 130 interrupted with Ctrl-C.",
])
ATTACH_HELP = "\n\n".join([
    "Watch a running engine: its whole history so far, then live, as [bold]mlora run[/bold] "
    "shows it.",
    "NAME is the engine's name or pid (see [bold]mlora ps[/bold]); without it, the only "
    "engine running. Ctrl-C only detaches: the engine keeps training.",
    "[bold]Exit codes[/bold]: 0 the engine's run ended with no failure; 1 a job failed or "
    "the engine crashed; 3 no such engine running, or it does not answer; 130 detached with "
    "Ctrl-C.",
])
SERVE_HELP = "\n\n".join([
    "Run the engine process for CONFIG in this process (mlora run starts it this way, "
    "detached). It listens on a private Unix socket, logs to OUTPUT_DIR/engine.log, ignores "
    "hangups, and exits when no job can train any more or when stopped (SIGTERM, Ctrl-C or "
    "mlora stop: checkpoints first).",
    "[bold]Exit codes[/bold]: 0 the run ended (or was stopped); 1 a job failed or the "
    "engine crashed; 2 config, data or model error, or an engine already runs for this "
    "output_dir; 130 aborted by a second signal.",
])


def run(
    config: Annotated[Path, typer.Argument(help="The run's TOML config.", show_default=False)],
    json_lines: Annotated[bool, typer.Option(
        "--json", help="Print every event as a JSON line on stdout instead of progress bars "
                       "(with --detach: the engine's record).")] = False,
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many batched steps (a quick try); each unfinished job "
                    "saves a checkpoint of where it got to. Applies to a new engine only.",
        show_default=False)] = None,
    detach: Annotated[bool, typer.Option(
        "--detach", "-d", help="Start the engine and return, leaving it training.")] = False,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue every job from the newest checkpoint in OUTPUT_DIR/"
                         "checkpoints, exactly where it was (after a crash, a kill or a "
                         "stop). A config that changed what the jobs compute is refused, "
                         "naming each change.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="If OUTPUT_DIR already holds a run, move it (run.json, "
                            "metrics.jsonl, engine.log, adapter folders) into "
                            "OUTPUT_DIR/replaced-TIME/ and start afresh; nothing is "
                            "deleted.")] = False,
    base_model: BaseModelOption = None,
    fp16: Fp16Option = False,
    bf16: Bf16Option = False,
    tf32: Tf32Option = False,
    load_4bit: Load4bitOption = False,
    load_8bit: Load8bitOption = False,
    attn_impl: AttnImplOption = None,
) -> None:
    from mlora_tui.launcher import ensure_engine

    overrides = model_overrides(base_model, fp16, bf16, tf32, load_4bit, load_8bit, attn_impl)
    found = checked(config, model_overrides=overrides, resume=resume, overwrite=overwrite)
    if found.moved is not None:
        say(f"--overwrite: moved the previous run in {found.output_dir} to {found.moved}",
            style="yellow")
    asked = time.time()
    try:
        record = ensure_engine(config, max_steps=max_steps, model_overrides=overrides,
                               resume=resume, checked=found)
    except UserError as e:
        fail(str(e))
    except KeyboardInterrupt:
        say("Interrupted while the engine started; it may be running: see mlora ps.")
        raise typer.Exit(EXIT_INTERRUPTED)
    if record.started < asked:
        say(f"An engine already runs for {record.output_dir}: attaching to {record.name} "
            f"(pid {record.pid}, config {record.config}).", style="yellow")
        if max_steps is not None or overrides or overwrite or resume:
            say("--max-steps, --resume, --overwrite and [model] flags apply only to a new "
                "engine; ignored.", style="yellow")
    if detach:
        if json_lines:
            sys.stdout.write(json.dumps(record.to_json()) + "\n")
        say(f"Engine {record.name} (pid {record.pid}) is training; its log: {record.log}")
        say(f"  watch it:  mlora attach {record.name}   or   mlora-tui --attach {record.name}")
        say(f"  steer it:  mlora jobs list -e {record.name}     stop it:  mlora stop {record.name}")
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(follow(record, json_lines, on_ctrl_c="stop"))


def attach(
    name: EngineArgument = None,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="Print every event as a JSON line on stdout instead of progress "
                       "bars.")] = False,
) -> None:
    record = target(name)
    say(f"Attached to engine {record.name} (pid {record.pid}, {record.output_dir}); "
        f"Ctrl-C detaches and leaves it training.", style="dim")
    raise typer.Exit(follow(record, json_lines, on_ctrl_c="detach"))


def serve(
    config: Annotated[Path, typer.Argument(help="The run's TOML config.", show_default=False)],
    max_steps: Annotated[Optional[int], typer.Option(
        min=1, help="Stop after this many batched steps, with checkpoints.",
        show_default=False)] = None,
    log: Annotated[Optional[Path], typer.Option(
        "--log", help="Log here instead of OUTPUT_DIR/engine.log.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue from the newest checkpoint in OUTPUT_DIR.")] = False,
    base_model: BaseModelOption = None,
    fp16: Fp16Option = False,
    bf16: Bf16Option = False,
    tf32: Tf32Option = False,
    load_4bit: Load4bitOption = False,
    load_8bit: Load8bitOption = False,
    attn_impl: AttnImplOption = None,
    model_overrides_json: Annotated[Optional[str], typer.Option(
        "--model-overrides", hidden=True,
        help="[model] fields as JSON (how `mlora run` passes its flags on).")] = None,
) -> None:
    from engine.server.process import serve as serve_engine

    overrides = model_overrides(base_model, fp16, bf16, tf32, load_4bit, load_8bit, attn_impl)
    if model_overrides_json:
        overrides = {**json.loads(model_overrides_json), **overrides}
    raise typer.Exit(serve_engine(config, max_steps=max_steps, log_path=log,
                                  model_overrides=overrides, resume=resume))


# -- watching an engine ---------------------------------------------------------------------

def follow(record: "EngineRecord", json_lines: bool, on_ctrl_c: str) -> int:
    """Show an engine's events (replayed from the start) until it exits; the exit code.

    ``on_ctrl_c``: "stop" asks the engine for a graceful stop on the first Ctrl-C (and
    detaches on the second); "detach" detaches at once.
    """
    from mlora_tui.progress import RunProgress, RunSummary

    summary = RunSummary()
    if json_lines:
        def show(event: dict) -> None:
            # The same object as the line in metrics.jsonl: seq is the socket's business.
            event = {k: v for k, v in event.items() if k != "seq"}
            sys.stdout.write(json.dumps(event, default=str) + "\n")
            sys.stdout.flush()
        outcome = run_client(watch(record, [summary.handle, show], on_ctrl_c, say))
    else:
        with RunProgress(stderr) as progress:
            outcome = run_client(watch(record, [summary.handle, progress.handle],
                                       on_ctrl_c, progress.print))
    summary.render(stderr)
    if outcome == "detached":
        say(f"Detached; engine {record.name} keeps running. Re-attach: mlora attach "
            f"{record.name}   or   mlora-tui --attach {record.name}")
        return EXIT_INTERRUPTED
    if outcome == "stopped":
        say("Stopped by Ctrl-C; unfinished jobs saved checkpoints (see the summary).")
        return EXIT_INTERRUPTED
    if summary.any_failed:
        return EXIT_FAILED
    if summary.exit_code is None:
        say(f"Lost the engine before it said it exited; see its log: {record.log}",
            style="bold red")
        return EXIT_FAILED
    if summary.exit_code == EXIT_USER_ERROR:
        return EXIT_USER_ERROR
    return EXIT_OK if summary.exit_code == 0 else EXIT_FAILED


async def watch(record: "EngineRecord", sinks: list[Callable[[dict], None]], on_ctrl_c: str,
                say: Callable[[str], None]) -> str:
    """Feed every event to ``sinks`` until the engine closes the connection or the user
    detaches; returns "ended", "stopped" (Ctrl-C asked for a stop) or "detached"."""
    from mlora_tui.client import EngineClient, EngineUnavailable, RequestFailed

    client = await EngineClient.connect(record.socket, client="mlora")
    loop = asyncio.get_running_loop()
    detached = asyncio.Event()
    stop_asked = False

    async def ask_stop() -> None:
        try:
            await client.stop()
        except (EngineUnavailable, RequestFailed) as e:
            say(f"The stop request failed: {e}")

    def on_sigint() -> None:
        nonlocal stop_asked
        if on_ctrl_c == "stop" and not stop_asked:
            stop_asked = True
            say("Ctrl-C: stopping the engine after the current step and saving checkpoints; "
                "press Ctrl-C again to detach (the engine still stops).")
            loop.create_task(ask_stop())
        else:
            detached.set()

    async def consume() -> None:
        async for event in client.events(replay=True):
            for sink in sinks:
                sink(event)

    loop.add_signal_handler(signal.SIGINT, on_sigint)
    consumer = loop.create_task(consume())
    detacher = loop.create_task(detached.wait())
    try:
        await asyncio.wait({consumer, detacher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        detacher.cancel()
        if not consumer.done():
            consumer.cancel()
        await client.close()
    if consumer.done() and not consumer.cancelled():
        consumer.result()   # re-raise what broke the stream
        return "stopped" if stop_asked else "ended"
    return "detached"
