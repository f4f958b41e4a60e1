"""Facts about jobs that the engine and every front end share: states, the variant label of
an adapter, and the exit codes of the commands and the engine process. No torch.

Each fact lives here once; the engine (``engine.train``), the engine process, the CLI, the
progress bars and the TUI import it rather than spelling it again.
"""

from __future__ import annotations

from typing import Any, Mapping

# A job's states: queued -> running <-> paused -> done | failed | cancelled | pruned (a sweep
# trial its pruner stopped early: a normal ending, its adapter saved as it was).
QUEUED, RUNNING, PAUSED, DONE, FAILED, CANCELLED, PRUNED = (
    "queued", "running", "paused", "done", "failed", "cancelled", "pruned")
STATES = (QUEUED, RUNNING, PAUSED, DONE, FAILED, CANCELLED, PRUNED)
FINAL_STATES = (DONE, FAILED, CANCELLED, PRUNED)

# Exit codes of `mlora ...` and of the engine process (`mlora serve`).
EXIT_OK = 0
EXIT_FAILED = 1          # a job failed, or the engine crashed
EXIT_USER_ERROR = 2      # usage, config or data error, or a request the engine refused
EXIT_NO_ENGINE = 3       # no such engine running, or it does not answer
EXIT_INTERRUPTED = 130   # 128 + SIGINT, what shells report for Ctrl-C (also: aborted engine)

EXIT_CODES_HELP = (
    "[bold]Exit codes[/bold]: 0 success; 1 a job failed (or the engine crashed); 2 usage, "
    "config or data error, or a request the engine refused; 3 no such engine running, or it "
    "does not answer; 130 interrupted with Ctrl-C.")


def variant_label(adapter: Any) -> str:
    """The one name of an adapter's variant, shown by `mlora validate`, `mlora jobs list`,
    the progress bars and the TUI: the kind (``lora``, ``dora``, ``mixlora``,
    ``mixlora-switch``, ``mixlora-dynamic``), then ``+rslora`` and ``+loraplus`` when set,
    in that order (``dora+rslora+loraplus``).

    ``adapter`` is an ``AdapterConfig`` or a mapping with its fields (a job summary's
    ``adapter``, a PEFT ``adapter_config.json``).
    """
    get = adapter.get if isinstance(adapter, Mapping) else (
        lambda key, default=None: getattr(adapter, key, default))
    kind = get("routing_strategy") or ("dora" if get("use_dora") else "lora")
    ratio = get("loraplus_lr_ratio", 1.0)
    return (kind + ("+rslora" if get("use_rslora") else "")
            + ("+loraplus" if ratio not in (None, 1, 1.0) else ""))


def job_variant(job: Mapping[str, Any]) -> str:
    """The variant label of a job summary or ``job_added`` event: the ``variant`` the engine
    sent, else computed from its ``adapter`` settings (an engine that sends none)."""
    return job.get("variant") or variant_label(job.get("adapter") or {})
