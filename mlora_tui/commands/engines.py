"""`mlora ps`, `mlora stop` and `mlora jobs ...`: list running engines and steer their jobs
over their sockets. No torch.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Optional

import typer
from rich.console import Console
from rich.text import Text

from engine.core.errors import UserError
from engine.core.jobs import EXIT_CODES_HELP, RUNNING, job_variant
from mlora_tui.commands.common import (EngineArgument, EngineOption, engine_request, fail,
                                       run_client, say, target, with_client)

if TYPE_CHECKING:
    from engine.core.runtime import EngineRecord
    from mlora_tui.client import EngineClient

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

jobs_app = typer.Typer(
    help="List and steer the jobs of a running engine (one adapter each).\n\n"
         "Commands are applied between two training steps, in the order they arrive. "
         "[bold]--engine NAME[/bold] picks the engine when several run (see mlora ps).\n\n"
         + EXIT_CODES_HELP,
    no_args_is_help=True,
    rich_markup_mode="rich",
)


def ps(
    json_lines: Annotated[bool, typer.Option("--json", help="One JSON object per engine.")] = False,
) -> None:
    from engine.core.runtime import list_engines
    from mlora_tui.progress import format_duration

    try:
        engines = list_engines()
    except UserError as e:
        fail(str(e))
    if not engines:
        say("No engine is running.", style="dim")
        return
    statuses = run_client(_statuses(engines))
    out = Console(highlight=False, soft_wrap=True)
    for record, status in zip(engines, statuses):
        jobs = status.get("jobs") if isinstance(status, dict) else None
        if json_lines:
            sys.stdout.write(json.dumps({**record.to_json(), "state": (status or {}).get(
                "engine", {}).get("state"), "jobs": jobs}, default=str) + "\n")
            continue
        up = format_duration(time.time() - record.started)
        state = (status or {}).get("engine", {}).get("state", "not answering")
        out.print(Text.assemble((record.name, "bold"), f"  pid {record.pid}  up {up}  {state}  "
                                f"{record.base_model}  {record.output_dir}"))
        out.print(Text(f"  socket {record.socket}   log {record.log}", style="dim"))
        print_jobs(out, jobs or [], indent="  ")


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


def print_jobs(out: Console, jobs: list[dict], indent: str = "") -> None:
    """One line per job summary: name, variant, state, step, loss, validation loss, the
    first eval task's acc, ETA, reason."""
    if not jobs:
        out.print(Text(f"{indent}(no jobs yet)", style="dim"))
        return
    from mlora_tui.progress import STATE_STYLES, format_duration, headline_score, percent

    width = max(len(job["name"]) for job in jobs)
    variants = [job_variant(job) for job in jobs]
    variant_width = max(len(variant) for variant in variants)
    for job, variant in zip(jobs, variants):
        line = Text(indent)
        line.append(f"{job['name']:<{width}}  {variant:<{variant_width}}  ")
        line.append(f"{job['state']:<9}", style=STATE_STYLES.get(job["state"], ""))
        line.append(f" {job['step']:>5}/{job['total_steps']:<5}")
        if job.get("loss") is not None:
            line.append(f"  loss {job['loss']:.4f}")
        if job.get("eval_loss") is not None:
            line.append(f"  val {job['eval_loss']:.4f}")
        headline = headline_score(job.get("scores"))
        if headline is not None:        # the first [[eval]] task's acc
            line.append(f"  {headline[0]} {percent(headline[1])}")
        if job["state"] == RUNNING and job.get("eta_s") is not None:
            line.append(f"  ETA {format_duration(job['eta_s'])}")
        if job.get("reason"):
            line.append(f"  ({job['reason']})", style="dim")
        out.print(line)


def stop(
    name: EngineArgument = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Wait until the engine has saved its checkpoints and "
                                 "exited.")] = True,
) -> None:
    record = target(name)

    async def stop_engine(client: "EngineClient") -> list[str]:
        if not wait:
            await client.stop()
            return []
        events = await client.subscribe(replay=False)
        await client.stop()
        return [f"{event['job']}: {event['path']}" async for event in events
                if event.get("type") == "checkpoint"]

    say(f"Stopping engine {record.name} (pid {record.pid}) after its current step ...")
    saved = run_client(with_client(record, stop_engine))
    for line in saved:
        say(f"  checkpoint {line}", style="dim")
    say(f"Engine {record.name} stopped." if wait else f"Engine {record.name} is stopping.")


# -- jobs -------------------------------------------------------------------------------------

@jobs_app.command("list", help="The jobs of an engine: variant, state, step, loss, "
                               "validation loss, score (the first eval task's acc), ETA, "
                               "reason.")
def jobs_list(
    engine: EngineOption = None,
    json_lines: Annotated[bool, typer.Option(
        "--json", help="One JSON object per job (the engine's job summary, with its "
                        "latest eval scores).")] = False,
) -> None:
    status = engine_request(engine, lambda client: client.status())
    jobs = status.get("jobs") or []
    if json_lines:
        for job in jobs:
            sys.stdout.write(json.dumps(job, default=str) + "\n")
        return
    print_jobs(Console(highlight=False, soft_wrap=True), jobs)


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
        fail(f"{file}: cannot read it: {e.strerror or e}")
    except UnicodeDecodeError:
        fail(f"{file}: not UTF-8 text; save the file as UTF-8")
    source = str(file.resolve())
    result = engine_request(engine, lambda client: client.add_jobs(text, source=source))
    say(f"Added {', '.join(result.get('added', []))}.")


def _job_command(verb: str, help_text: str) -> None:
    def command(name: Annotated[str, typer.Argument(help="The job (adapter) name.",
                                                    show_default=False)],
                engine: EngineOption = None) -> None:
        result = engine_request(engine, lambda client: getattr(client, verb)(name))
        say(f"{result.get('job', name)}: {result.get('state')}")
    command.__name__ = f"jobs_{verb}"
    jobs_app.command(verb, help=help_text)(command)


_job_command("pause", "Pause a job: it leaves the batch after the current step and keeps "
                      "its progress (a half-accumulated batch included).")
_job_command("resume", "Resume a paused job: it is queued and runs again as soon as a slot "
                       "is free.")
_job_command("cancel", "Cancel a job for good: its adapter leaves the engine; checkpoints "
                       "already saved stay.")


@jobs_app.command("evaluate", help="Evaluate a job now (at the next step boundary): its "
                                   "eval_tasks, or every [[eval]] task, and its validation loss.")
def jobs_evaluate(
    name: Annotated[str, typer.Argument(help="The job (adapter) name.", show_default=False)],
    engine: EngineOption = None,
) -> None:
    result = engine_request(engine, lambda client: client.evaluate_job(name))
    parts = list(result.get("tasks") or []) + (["validation loss"] if result.get("eval_loss")
                                                else [])
    say(f"{name}: evaluating ({', '.join(parts)}); the results come as an eval event "
        "(mlora jobs list shows them)")


@jobs_app.command("fork", help="Fork a job at the next step boundary: a new job (--as) starts "
                              "from its weights, optimizer state, schedule position, data "
                              "position and dropout seeds, with the --set settings changed "
                              "from there on (lr, scheduler_type, warmup_ratio, warmup_steps, "
                              "max_grad_norm, lora_dropout, num_epochs, eval_steps, "
                              "eval_tasks, weight_decay, momentum, loraplus_lr_ratio). The "
                              "schedule does not restart. Both jobs go on.")
def jobs_fork(
    name: Annotated[str, typer.Argument(help="The job (adapter) to fork.", show_default=False)],
    new: Annotated[str, typer.Option("--as", help="The new job's (adapter's) name.",
                                     show_default=False)],
    settings: Annotated[Optional[list[str]], typer.Option(
        "--set", help="FIELD=VALUE, the value as in TOML (lr=1e-4, eval_tasks=[\"arc\"]; "
                      "a bare word is a string: scheduler_type=cosine). Repeatable.",
        show_default=False)] = None,
    engine: EngineOption = None,
) -> None:
    changes = parse_settings(settings or [])
    result = engine_request(engine, lambda client: client.fork_job(name, new, changes))
    say(f"{result.get('job', new)}: forked from {result.get('from', name)} at step "
        f"{result.get('step')}" + (f" with {', '.join(settings or [])}" if settings else ""))


def parse_settings(settings: list[str]) -> dict:
    """``--set FIELD=VALUE`` options as {field: value}, each value read as a TOML value."""
    import re

    from engine.core.config_file import tomllib

    changes: dict = {}
    for setting in settings:
        field, sep, text = setting.partition("=")
        field, text = field.strip(), text.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", field) or not text:
            fail(f"--set {setting!r}: expected FIELD=VALUE, such as lr=1e-4")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", text):
                fail(f"--set {setting!r}: {text!r} is not a TOML value (a number, true/false, "
                     "a \"string\" or a [list])")
            value = text            # a bare word: scheduler_type=cosine
        if field in changes:
            fail(f"--set {field} is given twice")
        changes[field] = value
    return changes


@jobs_app.command("save", help="Save a checkpoint now, of one job or of every unfinished "
                               "job.")
def jobs_save(
    name: Annotated[Optional[str], typer.Argument(
        help="The job; default: every unfinished job.", show_default=False)] = None,
    engine: EngineOption = None,
) -> None:
    result = engine_request(engine, lambda client: client.save(name))
    paths = result.get("paths") or []
    if not paths:
        say("Nothing to save: no unfinished job has taken a step yet.")
    for path in paths:
        sys.stdout.write(path + "\n")
