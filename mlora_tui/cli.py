"""The `mlora` command line: engines, jobs, configs, and trying trained adapters.

Training runs in an engine process (engine/server/process.py) that outlives the terminal; these
commands start it, watch it and steer it over its Unix socket (mlora_tui/launcher.py,
mlora_tui/client.py): `run` starts one (or attaches to the one already running for the
config) and shows its progress, `attach` watches a running one, `ps` lists them, `jobs ...`
steers their jobs, `stop` stops one gracefully, and `serve` is the engine process itself.

People read stderr (progress bars, messages), programs read stdout (``--json`` events,
``ps``/``jobs list`` tables, generated text, converted TOML). A user mistake
(``engine.core.errors.UserError``: config, data, adapter folder, a request the engine refuses)
prints its message on stderr and exits with code 2, never a traceback; an engine that is
not running or does not answer exits with 3.

Nothing here imports torch: the engine runs in its own process, and only ``serve`` and
``generate`` import it, inside the command. ``mlora --help`` starts fast.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, NoReturn, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.core.errors import UserError

if TYPE_CHECKING:
    from engine.core.config import AdapterConfig, RunConfig
    from engine.core.runtime import EngineRecord
    from mlora_tui.client import EngineClient

EXIT_OK = 0
EXIT_JOB_FAILED = 1
EXIT_USER_ERROR = 2
EXIT_NO_ENGINE = 3       # no such engine running, or it does not answer
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what shells report for Ctrl-C

EXIT_CODES_HELP = (
    "[bold]Exit codes[/bold]: 0 success; 1 a job failed (or the engine crashed); 2 usage, "
    "config or data error, or a request the engine refused; 3 no such engine running, or it "
    "does not answer; 130 interrupted with Ctrl-C.")

app = typer.Typer(
    name="mlora",
    help="Train many LoRA adapters at once on one shared base model.\n\n"
         "Start with [bold]mlora validate CONFIG[/bold], then [bold]mlora run CONFIG[/bold]. "
         "Training runs in an engine process that survives the terminal: "
         "[bold]mlora attach[/bold], [bold]mlora ps[/bold], [bold]mlora jobs[/bold] and "
         "[bold]mlora stop[/bold] reach it again.\n\n" + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
jobs_app = typer.Typer(
    help="List and steer the jobs of a running engine (one adapter each).\n\n"
         "Commands are applied between two training steps, in the order they arrive. "
         "[bold]--engine NAME[/bold] picks the engine when several run (see mlora ps).\n\n"
         + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
)
app.add_typer(jobs_app, name="jobs")

stderr = Console(stderr=True, highlight=False)


def _fail(message: str, code: int = EXIT_USER_ERROR) -> NoReturn:
    """Print ``message`` (plain text: brackets in it are not markup) on stderr and exit."""
    stderr.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)
    raise typer.Exit(code)


def _say(message: str, style: str = "") -> None:
    stderr.print(Text(message, style=style), soft_wrap=True)


def _load_config(path: Path) -> "RunConfig":
    from engine.core.config import load_config

    try:
        return load_config(path)
    except UserError as e:
        _fail(str(e))


# -- talking to engines -------------------------------------------------------------------

def _run_client(coro: Awaitable[Any]) -> Any:
    """Run a client coroutine; engine and request errors become messages and exit codes."""
    from engine.core.runtime import EngineNotFound
    from mlora_tui.client import EngineUnavailable, RequestFailed, run_sync

    try:
        return run_sync(coro)
    except (EngineNotFound, EngineUnavailable) as e:
        _fail(str(e), EXIT_NO_ENGINE)
    except RequestFailed as e:
        if e.code == "user_error":
            _fail(e.message)
        _fail(f"the engine refused the request ({e.code}): {e.message}", EXIT_JOB_FAILED)
    except UserError as e:
        _fail(str(e))


def _target(name: Optional[str]) -> "EngineRecord":
    from engine.core.runtime import EngineNotFound
    from mlora_tui.launcher import attach_target

    try:
        return attach_target(name)
    except EngineNotFound as e:
        _fail(str(e), EXIT_NO_ENGINE)
    except UserError as e:
        _fail(str(e))


async def _with_client(record: "EngineRecord",
                       action: Callable[["EngineClient"], Awaitable[Any]]) -> Any:
    from mlora_tui.client import EngineClient

    client = await EngineClient.connect(record.socket, client="mlora")
    try:
        return await action(client)
    finally:
        await client.close()


def _engine_request(engine: Optional[str],
                    action: Callable[["EngineClient"], Awaitable[Any]]) -> Any:
    """Connect to the chosen engine, run ``action(client)``, and return its result."""
    record = _target(engine)
    return _run_client(_with_client(record, action))


EngineArgument = Annotated[Optional[str], typer.Argument(
    help="The engine's name or pid (see mlora ps); default: the only one running.",
    show_default=False)]
EngineOption = Annotated[Optional[str], typer.Option(
    "--engine", "-e", help="The engine's name or pid (see mlora ps); default: the only "
                           "one running.", show_default=False)]


# -- run, attach ----------------------------------------------------------------------------

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


# m-LoRA's command-line flags, as overrides of the config's [model] table.
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


def _model_overrides(base_model: Optional[str], fp16: bool, bf16: bool, tf32: bool,
                     load_4bit: bool, load_8bit: bool, attn_impl: Optional[str]) -> dict:
    """The [model] fields that m-LoRA's flags set; conflicting flags are a usage error."""
    if fp16 and bf16:
        _fail("--fp16 and --bf16 contradict each other; give one")
    if load_4bit and load_8bit:
        _fail("--load_4bit and --load_8bit contradict each other; give one")
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


@app.command(help=RUN_HELP)
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
    from engine.core.config import apply_model_overrides
    from mlora_tui.launcher import ensure_engine

    overrides = _model_overrides(base_model, fp16, bf16, tf32, load_4bit, load_8bit, attn_impl)
    run_config = _load_config(config)
    try:
        apply_model_overrides(run_config, overrides)
    except UserError as e:
        _fail(str(e))
    _check_data_files(run_config.adapters)
    _check_output_dir(run_config, overwrite, resume)
    asked = time.time()
    try:
        record = ensure_engine(config, max_steps=max_steps, model_overrides=overrides,
                               resume=resume)
    except UserError as e:
        _fail(str(e))
    except KeyboardInterrupt:
        _say("Interrupted while the engine started; it may be running: see mlora ps.")
        raise typer.Exit(EXIT_INTERRUPTED)
    if record.started < asked:
        _say(f"An engine already runs for {record.output_dir}: attaching to {record.name} "
             f"(pid {record.pid}, config {record.config}).", style="yellow")
        if max_steps is not None or overrides or overwrite or resume:
            _say("--max-steps, --resume, --overwrite and [model] flags apply only to a new "
                 "engine; ignored.", style="yellow")
    if detach:
        if json_lines:
            sys.stdout.write(json.dumps(record.to_json()) + "\n")
        _say(f"Engine {record.name} (pid {record.pid}) is training; its log: {record.log}")
        _say(f"  watch it:  mlora attach {record.name}   or   mlora-tui --attach {record.name}")
        _say(f"  steer it:  mlora jobs list -e {record.name}     stop it:  mlora stop {record.name}")
        raise typer.Exit(EXIT_OK)
    raise typer.Exit(_follow(record, json_lines, on_ctrl_c="stop"))


@app.command(help=ATTACH_HELP)
def attach(
    name: EngineArgument = None,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="Print every event as a JSON line on stdout instead of progress "
                       "bars.")] = False,
) -> None:
    record = _target(name)
    _say(f"Attached to engine {record.name} (pid {record.pid}, {record.output_dir}); "
         f"Ctrl-C detaches and leaves it training.", style="dim")
    raise typer.Exit(_follow(record, json_lines, on_ctrl_c="detach"))


def _follow(record: "EngineRecord", json_lines: bool, on_ctrl_c: str) -> int:
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
        outcome = _run_client(_watch(record, [summary.handle, show], on_ctrl_c, _say))
    else:
        with RunProgress(stderr) as progress:
            outcome = _run_client(_watch(record, [summary.handle, progress.handle],
                                         on_ctrl_c, progress.print))
    summary.render(stderr)
    if outcome == "detached":
        _say(f"Detached; engine {record.name} keeps running. Re-attach: mlora attach "
             f"{record.name}   or   mlora-tui --attach {record.name}")
        return EXIT_INTERRUPTED
    if outcome == "stopped":
        _say("Stopped by Ctrl-C; unfinished jobs saved checkpoints (see the summary).")
        return EXIT_INTERRUPTED
    if summary.any_failed:
        return EXIT_JOB_FAILED
    if summary.exit_code is None:
        _say(f"Lost the engine before it said it exited; see its log: {record.log}",
             style="bold red")
        return EXIT_JOB_FAILED
    if summary.exit_code == EXIT_USER_ERROR:
        return EXIT_USER_ERROR
    return EXIT_OK if summary.exit_code == 0 else EXIT_JOB_FAILED


async def _watch(record: "EngineRecord", sinks: list[Callable[[dict], None]], on_ctrl_c: str,
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


def _check_output_dir(run_config: "RunConfig", overwrite: bool, resume: bool) -> None:
    """Refuse an output_dir that holds another run (engine.core.outputs), before any engine
    starts, unless resuming it; with ``overwrite``, move that run aside. Skipped when an
    engine already runs for the folder: `run` attaches to it."""
    import os

    from engine.core.outputs import check_output_dir, set_aside_run
    from engine.core.runtime import find_engine

    output_dir = os.path.abspath(run_config.train.output_dir)
    try:
        if find_engine(output_dir=output_dir) is not None:
            return
        check_output_dir(run_config, resume=resume, overwrite=overwrite)
        if overwrite:
            moved = set_aside_run(output_dir)
            if moved is not None:
                _say(f"--overwrite: moved the previous run in {output_dir} to {moved}",
                     style="yellow")
    except UserError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"cannot set the previous run in {output_dir} aside: {e}")


def _check_data_files(adapters: list["AdapterConfig"]) -> list[tuple[int, str]]:
    """Read and check each adapter's data file before any model loads: (rows, kind) each."""
    from engine.core.data import load_data_file

    counts = []
    for adapter in adapters:
        try:
            data = load_data_file(adapter.data)
        except UserError as e:
            _fail(f"{e} (data of adapter {adapter.name!r})")
        counts.append((len(data.rows), data.kind))
    return counts


# -- ps, stop, serve ----------------------------------------------------------------------------

PS_HELP = "\n\n".join([
    "List the running engines: name, pid, uptime, base model, output folder, socket, and "
    "each job with its state and progress.",
    "Sockets and records of engines that died are cleaned up on the way. With "
    "[bold]--json[/bold], one JSON object per engine (its record, plus its jobs).",
    "[bold]Exit codes[/bold]: 0 listed (also when none runs).",
])
STOP_HELP = "\n\n".join([
    "Stop an engine gracefully: it finishes its current step, saves a checkpoint of every "
    "unfinished job, and exits. Waits until it has exited unless [bold]--no-wait[/bold].",
    "[bold]Exit codes[/bold]: 0 stopped (or asked to, with --no-wait); 3 no such engine "
    "running, or it does not answer.",
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


@app.command(help=PS_HELP)
def ps(
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per engine.")] = False,
) -> None:
    from engine.core.runtime import list_engines

    try:
        engines = list_engines()
    except UserError as e:
        _fail(str(e))
    if not engines:
        _say("No engine is running.", style="dim")
        return
    statuses = _run_client(_statuses(engines))
    out = Console(highlight=False, soft_wrap=True)
    for record, status in zip(engines, statuses):
        jobs = status.get("jobs") if isinstance(status, dict) else None
        if json_lines:
            sys.stdout.write(json.dumps({**record.to_json(), "state": (status or {}).get(
                "engine", {}).get("state"), "jobs": jobs}, default=str) + "\n")
            continue
        up = _duration(time.time() - record.started)
        state = (status or {}).get("engine", {}).get("state", "not answering")
        out.print(Text.assemble((record.name, "bold"), f"  pid {record.pid}  up {up}  {state}  "
                                f"{record.base_model}  {record.output_dir}"))
        out.print(Text(f"  socket {record.socket}   log {record.log}", style="dim"))
        _print_jobs(out, jobs or [], indent="  ")


async def _statuses(engines: list["EngineRecord"]) -> list[dict | None]:
    from mlora_tui.client import EngineClient

    async def one(record: "EngineRecord") -> dict | None:
        try:
            client = await EngineClient.connect(record.socket, client="mlora ps", timeout=5)
            try:
                return await asyncio.wait_for(client.status(), 10)
            finally:
                await client.close()
        except Exception:   # listed anyway, as not answering
            return None

    return list(await asyncio.gather(*(one(e) for e in engines)))


def _duration(seconds: float) -> str:
    from mlora_tui.progress import format_duration

    return format_duration(seconds)


def _print_jobs(out: Console, jobs: list[dict], indent: str = "") -> None:
    if not jobs:
        out.print(Text(f"{indent}(no jobs yet)", style="dim"))
        return
    from mlora_tui.progress import _STATE_STYLES, format_duration

    width = max(len(job["name"]) for job in jobs)
    for job in jobs:
        line = Text(indent)
        line.append(f"{job['name']:<{width}}  ")
        line.append(f"{job['state']:<9}", style=_STATE_STYLES.get(job["state"], ""))
        line.append(f" {job['step']:>5}/{job['total_steps']:<5}")
        if job.get("loss") is not None:
            line.append(f"  loss {job['loss']:.4f}")
        if job["state"] == "running" and job.get("eta_s") is not None:
            line.append(f"  ETA {format_duration(job['eta_s'])}")
        if job.get("reason"):
            line.append(f"  ({job['reason']})", style="dim")
        out.print(line)


@app.command(help=STOP_HELP)
def stop(
    name: EngineArgument = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Wait until the engine has saved its checkpoints and "
                                 "exited.")] = True,
) -> None:
    record = _target(name)

    async def stop_engine(client: "EngineClient") -> list[str]:
        if not wait:
            await client.stop()
            return []
        events = await client.subscribe(replay=False)
        await client.stop()
        return [f"{event['job']}: {event['path']}" async for event in events
                if event.get("type") == "checkpoint"]

    _say(f"Stopping engine {record.name} (pid {record.pid}) after its current step ...")
    saved = _run_client(_with_client(record, stop_engine))
    for line in saved:
        _say(f"  checkpoint {line}", style="dim")
    _say(f"Engine {record.name} stopped." if wait else f"Engine {record.name} is stopping.")


@app.command(help=SERVE_HELP)
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

    overrides = _model_overrides(base_model, fp16, bf16, tf32, load_4bit, load_8bit, attn_impl)
    if model_overrides_json:
        overrides = {**json.loads(model_overrides_json), **overrides}
    raise typer.Exit(serve_engine(config, max_steps=max_steps, log_path=log,
                                  model_overrides=overrides, resume=resume))


# -- jobs -------------------------------------------------------------------------------------

@jobs_app.command("list", help="The jobs of an engine: state, step, loss, ETA, reason.")
def jobs_list(
    engine: EngineOption = None,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="One JSON object per job (the engine's job summary).")] = False,
) -> None:
    status = _engine_request(engine, lambda client: client.status())
    jobs = status.get("jobs") or []
    if json_lines:
        for job in jobs:
            sys.stdout.write(json.dumps(job, default=str) + "\n")
        return
    _print_jobs(Console(highlight=False, soft_wrap=True), jobs)


@jobs_app.command("add", help="Add the \\[\\[adapter]] tables of a TOML file as new jobs; they "
                              "are validated as in a config file (relative paths from the "
                              "file's folder) and start queued.")
def jobs_add(
    file: Annotated[Path, typer.Argument(help="A TOML file of \\[\\[adapter]] tables.",
                                         show_default=False)],
    engine: EngineOption = None,
) -> None:
    try:
        text = file.read_text(encoding="utf-8-sig")
    except OSError as e:
        _fail(f"{file}: cannot read it: {e.strerror or e}")
    except UnicodeDecodeError:
        _fail(f"{file}: not UTF-8 text; save the file as UTF-8")
    source = str(file.resolve())
    result = _engine_request(engine, lambda client: client.add_jobs(text, source=source))
    _say(f"Added {', '.join(result.get('added', []))}.")


def _job_command(verb: str, help_text: str) -> None:
    def command(name: Annotated[str, typer.Argument(help="The job (adapter) name.",
                                                    show_default=False)],
                engine: EngineOption = None) -> None:
        result = _engine_request(engine, lambda client: getattr(client, verb)(name))
        _say(f"{result.get('job', name)}: {result.get('state')}")
    command.__name__ = f"jobs_{verb}"
    jobs_app.command(verb, help=help_text)(command)


_job_command("pause", "Pause a job: it leaves the batch after the current step and keeps "
                      "its progress (a half-accumulated batch included).")
_job_command("resume", "Resume a paused job: it is queued and runs again as soon as a slot "
                       "is free.")
_job_command("cancel", "Cancel a job for good: its adapter leaves the engine; checkpoints "
                       "already saved stay.")


@jobs_app.command("save", help="Save a checkpoint now, of one job or of every unfinished "
                               "job.")
def jobs_save(
    name: Annotated[Optional[str], typer.Argument(
        help="The job; default: every unfinished job.", show_default=False)] = None,
    engine: EngineOption = None,
) -> None:
    result = _engine_request(engine, lambda client: client.save(name))
    paths = result.get("paths") or []
    if not paths:
        _say("Nothing to save: no unfinished job has taken a step yet.")
    for path in paths:
        sys.stdout.write(path + "\n")


# -- validate, convert, generate ------------------------------------------------------------

VALIDATE_HELP = "\n\n".join([
    "Check CONFIG and its data files without loading a model; print what it would train.",
    "[bold]Exit codes[/bold]: 0 the config is valid; 2 it is not (the message names the file, "
    "the table, the field and what was expected).",
])
CONVERT_HELP = "\n\n".join([
    "Turn an m-LoRA JSON config into an mlora-tui TOML config.",
    "[bold]Exit codes[/bold]: 0 converted; 2 the file is missing or not an m-LoRA config.",
])
GENERATE_HELP = "\n\n".join([
    "Generate a reply to PROMPT with a trained adapter; prints only the generated text.",
    "The prompt is formatted with the adapter's prompt template, the way training formatted "
    "an instruction with no input. The base model is the one the adapter was trained on.",
    "[bold]Exit codes[/bold]: 0 generated; 2 bad adapter folder, base model or option.",
])


@app.command(help=VALIDATE_HELP)
def validate(
    config: Annotated[Path, typer.Argument(help="The TOML config to check.", show_default=False)],
) -> None:
    run_config = _load_config(config)
    data = _check_data_files(run_config.adapters)
    out = Console(highlight=False, soft_wrap=True)
    model = run_config.model
    out.print(Text(f"config     {run_config.source}"))
    out.print(Text(f"base model {model.base_model} ({model.dtype}, attention {model.attn_impl})"))
    out.print(Text(f"output     {run_config.train.output_dir}"))
    out.print(Text(f"adapters   {len(run_config.adapters)}"))
    width = max(len(a.name) for a in run_config.adapters)
    for adapter, (rows, kind) in zip(run_config.adapters, data):
        out.print(Text(f"  {adapter.name:<{width}}  r={adapter.r} alpha={adapter.lora_alpha:g} "
                       f"{_variant(adapter)}  lr={adapter.lr:g} epochs={adapter.num_epochs}  "
                       f"{rows} {kind} rows in {adapter.data}"))
    out.print(Text("config OK", style="bold green"))


def _variant(adapter: "AdapterConfig") -> str:
    parts = ["dora" if adapter.use_dora else "lora"]
    if adapter.use_rslora:
        parts.append("rslora")
    if adapter.loraplus_lr_ratio != 1:
        parts.append(f"lora+ x{adapter.loraplus_lr_ratio:g}")
    return "+".join(parts)


# -- convert ------------------------------------------------------------------------------

@app.command(help=CONVERT_HELP)
def convert(
    mlora_json: Annotated[Path, typer.Argument(help="An m-LoRA JSON config.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Write the TOML here instead of printing it.",
        show_default=False)] = None,
) -> None:
    from engine.tools.convert import convert_mlora_json

    try:
        toml_text = convert_mlora_json(mlora_json)
    except UserError as e:
        _fail(str(e))
    if output is None:
        sys.stdout.write(toml_text)
        return
    try:
        output.write_text(toml_text, encoding="utf-8")
    except OSError as e:
        _fail(f"{output}: cannot write it: {e.strerror or e}")
    stderr.print(Text(f"wrote {output}; check it with: mlora validate {output}"), soft_wrap=True)


# -- gen ----------------------------------------------------------------------------------

GEN_HELP = "\n\n".join([
    "Write a ready config from a template, one adapter per task file (m-LoRA's "
    "[bold]launch.py gen[/bold]).",
    "Templates ship in configs/templates (one per variant: lora, rslora, dora, loraplus); "
    "[bold]--list[/bold] shows them. Target modules are the base model family's defaults "
    "unless the template sets them. The written config is checked as `mlora validate` would.",
    "[bold]Exit codes[/bold]: 0 written; 2 a bad template, task file or option.",
])


@app.command("gen", help=GEN_HELP)
def gen(
    template: Annotated[Optional[str], typer.Option(
        "--template", help="A template name (see --list) or a .toml template file.",
        show_default=False)] = None,
    tasks: Annotated[Optional[str], typer.Option(
        "--tasks", help='Data files separated by ";" (e.g. "a.json;b.jsonl"): one adapter each.',
        show_default=False)] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", "--file_name", help="Where to write the config.")] = Path("mlora.toml"),
    list_only: Annotated[bool, typer.Option("--list", help="List the templates.")] = False,
    base_model: BaseModelOption = None,
    lr: Annotated[Optional[float], typer.Option(
        "--lr", "--learning_rate", help="Every adapter's lr.", show_default=False)] = None,
    r: Annotated[Optional[int], typer.Option("--r", "--rank", help="Every adapter's rank.",
                                             show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        "--batch_size", "--batch-size", show_default=False)] = None,
    micro_batch_size: Annotated[Optional[int], typer.Option(
        "--micro_batch_size", "--micro-batch-size", show_default=False)] = None,
    num_epochs: Annotated[Optional[int], typer.Option(
        "--num_epochs", "--num-epochs", show_default=False)] = None,
    cutoff_len: Annotated[Optional[int], typer.Option(
        "--cutoff_len", "--cutoff-len", show_default=False)] = None,
    output_dir: Annotated[Optional[str], typer.Option(
        "--output_dir", "--output-dir", help="[train] output_dir.", show_default=False)] = None,
) -> None:
    from engine.tools.scaffold import generate_config, list_templates

    if list_only:
        for name, description in list_templates().items():
            sys.stdout.write(f"{name:<10} {description}\n")
        return
    if not template or not tasks:
        _fail("give --template NAME and --tasks \"a.json;b.jsonl\" (or --list)")

    def given(**values):
        return {k: v for k, v in values.items() if v is not None}

    try:
        text = generate_config(
            template, [t.strip() for t in tasks.split(";") if t.strip()], out_path=output,
            model=given(base_model=base_model),
            train=given(cutoff_len=cutoff_len, output_dir=output_dir),
            adapter=given(lr=lr, r=r, batch_size=batch_size, micro_batch_size=micro_batch_size,
                          num_epochs=num_epochs))
    except UserError as e:
        _fail(str(e))
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        _fail(f"{output}: cannot write it: {e.strerror or e}")
    stderr.print(Text(f"wrote {output}; train with: mlora run {output}"), soft_wrap=True)


# -- generate -----------------------------------------------------------------------------

@app.command(help=GENERATE_HELP)
def generate(
    prompt: Annotated[str, typer.Argument(help="The instruction to send, as in a training row.",
                                          show_default=False)],
    adapter: Annotated[Path, typer.Option(
        "--adapter", help="A trained adapter folder (e.g. runs/demo/NAME, or one of its "
                          "checkpoints).", show_default=False)],
    input_text: Annotated[str, typer.Option(
        "--input", help="The row's input, for tasks trained on Alpaca rows with an input "
                        "(as in the demo).", show_default=False)] = "",
    base_only: Annotated[bool, typer.Option(
        "--base-only", help="Use the adapter's base model and prompt format, without the "
                            "adapter (to compare).")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="At most this many new tokens.")] = 64,
    temperature: Annotated[float, typer.Option(
        min=0.0, help="0 decodes greedily (repeatable); above 0 samples.")] = 0.0,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed for sampling (temperature > 0).", show_default=False)] = None,
    base_model: Annotated[Optional[str], typer.Option(
        help="Use this base model instead of the one recorded in the adapter folder.",
        show_default=False)] = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send PROMPT as is, without the adapter's prompt template (adapters "
                      "trained on text rows).")] = False,
) -> None:
    from engine.train.generate import generate as generate_text

    try:
        text = generate_text(adapter, prompt, input=input_text, base_only=base_only, max_new_tokens=max_new_tokens,
                             temperature=temperature, base_model=base_model, raw=raw, seed=seed,
                             log=lambda message: stderr.print(Text(message, style="dim")))
    except UserError as e:
        _fail(str(e))
    sys.stdout.write(text + "\n")


def main() -> None:
    """Entry point of the `mlora` console script."""
    app()


if __name__ == "__main__":
    main()
