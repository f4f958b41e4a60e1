"""Training throughput on the demo config: this engine (batched and single) against PEFT.

Not a test: a measurement script. In one process, interleaved round by round, it times

  A3  this engine, every adapter of the config in one batched ``Engine.step``;
  A1  this engine, each adapter alone (``Engine.step([job])`` for each job in turn);
  B   PEFT (``bench.baseline``): one ``peft.get_peft_model`` model holding the same
      adapters (same LoraConfig: r, alpha, dropout, targets, rsLoRA, DoRA), trained one
      after another with a plain PyTorch loop (``set_adapter``, forward with ``labels=``
      so the loss is HF's mean over target tokens, backward, the engine job's optimizer
      and schedule), timed per optimizer step.

Every variant runs the same micro-batches of the same encoded examples (the engine's
``JobData``): each round restarts every adapter at micro-batch 0 of epoch 0, so step k is
the same rows in every variant and round, and step times pair up. Within a round the
variants alternate step by step (A3 and A1 each have their own Engine and base model copy),
in an order that rotates every step, so load from other processes hits them alike.
Reported (``bench.demo_report``): non-padding tokens per second (all adapters counted),
median and spread of the step time, padding fraction, and paired ratios against B. Peak
RSS of the whole process is reported at the end; ``--isolate`` also runs each variant
alone in a subprocess for its own peak RSS.

glibc's allocator settings from /work/shared/environment.md (MALLOC_MMAP_THRESHOLD_ etc.)
halve the step time and its noise on CPU; they must be in the environment when the process
starts, so the script re-executes itself with them when they are not set (say
``--no-malloc-env`` to measure without them).

    .venv/bin/python -m bench.demo_throughput --isolate --out /tmp/demo_bench.md

Each step also records how many cores other processes kept busy meanwhile (/proc/stat); a
step during which they used more than half a core is "disturbed", and the report gives
medians and paired ratios over all steps and over undisturbed steps (one busy core from
elsewhere slows a step here 3-30x, not 2x). See BENCHMARKS.md for how to read the table.
"""

from __future__ import annotations

import os
import sys

from bench.measure import MALLOC_ENV

_REEXEC_MARK = "MLORA_BENCH_MALLOC_REEXEC"


def _ensure_malloc_env() -> str:
    """Re-exec this script with MALLOC_ENV when any of it is unset; returns what happened."""
    if "--no-malloc-env" in sys.argv[1:]:
        return "not set (--no-malloc-env)"
    missing = [k for k in MALLOC_ENV if k not in os.environ]
    if not missing:
        if os.environ.get(_REEXEC_MARK):
            return "set by re-exec'ing this script with them"
        differ = [k for k, v in MALLOC_ENV.items() if os.environ[k] != v]
        if differ:
            return "already in the environment, with other values for " + ", ".join(
                f"{k}={os.environ[k]}" for k in differ)
        return "already in the environment"
    if os.environ.get(_REEXEC_MARK):  # pragma: no cover - the exec lost them; do not loop
        return "could not be set (re-exec did not keep them)"
    env = dict(os.environ)
    for key in missing:
        env[key] = MALLOC_ENV[key]
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)
    raise AssertionError("unreachable")


MALLOC_STATUS = _ensure_malloc_env() if __name__ == "__main__" else "n/a (imported)"

# ruff: noqa: E402  (the re-exec above must happen before torch is imported)
import argparse
import atexit
import gc
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.baseline import PeftBaseline
from bench.data import job_data, plan_micro_batches
from bench.demo_report import report
from bench.measure import Clock, Quiet, hwm_mib, log, maxrss_mib, rss_mib
from engine.core.config import RunConfig, load_config
from engine.train.engine import Engine
from engine.train.job import Job
from engine.train.models import load_base_model, select_device

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.toml"
VARIANTS = ("A3", "A1", "B")
# Jobs must never finish (evaluation, saving) or checkpoint while being timed.
NEVER = 10**9
BENCH_EPOCHS = 1000


@dataclass
class Sample:
    seconds: float
    cpu: float         # CPU seconds of this process (all threads) during the step
    others: float | None  # cores the rest of the machine kept busy during the step
    tokens: int        # non-padding tokens in the step (all adapters of the step)
    padded: int        # rows x width actually run
    round: int
    index: int         # measured step index within the round (same rows in every variant)

    @classmethod
    def summed(cls, group: tuple["Sample", ...]) -> "Sample":
        """One step of adapters trained one after another: their steps added up."""
        seconds = sum(x.seconds for x in group)
        others = (None if any(x.others is None for x in group)
                  else sum(x.others * x.seconds for x in group) / seconds)
        return cls(seconds, sum(x.cpu for x in group), others, sum(x.tokens for x in group),
                   sum(x.padded for x in group), group[0].round, group[0].index)


@dataclass
class Series:
    key: str
    samples: list[Sample] = field(default_factory=list)


def token_counts(data: dict, micro: list[tuple[str, list[int]]],
                 shared_width: bool) -> tuple[int, int]:
    """(non-padding tokens, rows x width) of a step over ``micro`` [(adapter, indices)].

    ``shared_width``: every row is padded to the longest row of the whole step (the
    engine's batched step); otherwise each micro-batch is padded to its own longest row.
    """
    lengths = [[len(data[name].train[i].input_ids) for i in idx] for name, idx in micro]
    tokens = sum(sum(ls) for ls in lengths)
    if shared_width:
        width = max(max(ls) for ls in lengths)
        return tokens, width * sum(len(ls) for ls in lengths)
    return tokens, sum(max(ls) * len(ls) for ls in lengths)


class EngineBench:
    """A3 and A1 on one Engine holding every adapter of the config."""

    def __init__(self, config: RunConfig):
        self.first_losses: dict[str, float] = {}
        self.engine = Engine(config, on_event=self._on_event, write_metrics=False)
        self.device = self.engine.device
        self.jobs: list[Job] = list(self.engine.jobs.values())
        self.drawn: dict[str, list[list[int]]] = {j.name: [] for j in self.jobs}
        for job in self.jobs:
            self._record_draws(job)
        self.plan: dict[str, list[list[int]]] | None = None

    def _on_event(self, event: dict) -> None:
        if event.get("type") == "step" and event["job"] not in self.first_losses:
            self.first_losses[event["job"]] = event["loss"]

    def _record_draws(self, job: Job) -> None:
        original = job.next_micro_batch

        def next_micro_batch() -> list[int]:
            indices = original()
            self.drawn[job.name].append(indices)
            return indices
        job.next_micro_batch = next_micro_batch  # instance attribute: Engine.step calls it

    def restart(self) -> None:
        """Every job back to micro-batch 0 of epoch 0 (weights and optimizer state kept)."""
        for job in self.jobs:
            job._batches, job._pending, job.epoch = [], [], 0
            self.drawn[job.name] = []

    def step(self, jobs: list[Job]) -> Clock:
        with Clock(self.device) as clock:
            self.engine.step(jobs)
        return clock

    def check_draw(self, job: Job, k: int) -> list[int]:
        indices = self.drawn[job.name][k]
        if self.plan is not None and indices != self.plan[job.name][k]:
            raise AssertionError(f"{job.name}: engine drew {indices} at step {k}, "
                                 f"planned {self.plan[job.name][k]}")
        return indices


class PeftBench:
    """B: the PEFT baseline on its own copy of the base model, timed per optimizer step.
    ``data`` None: the adapters' data encoded with this model's tokenizer."""

    def __init__(self, config: RunConfig, device: torch.device, data: dict | None):
        model, tokenizer, _info = load_base_model(config.model, device)
        self.data = data or job_data(config, tokenizer)
        self.baseline = PeftBaseline(model, config.adapters, self.data,
                                     tokenizer.pad_token_id, device, config.train.seed)
        self.first_losses: dict[str, float] = {}

    def step(self, name: str, indices: list[int]) -> Clock:
        with Clock(self.baseline.device) as clock:
            loss, _attention = self.baseline.train_step(name, indices)
        self.first_losses.setdefault(name, loss)
        return clock


def bench_config(args) -> RunConfig:
    config = load_config(args.config)
    if args.dtype:
        config.model.dtype = args.dtype
    config.train.save_step = NEVER
    # Nothing is written there (no metrics file, no checkpoints); removed at exit.
    config.train.output_dir = tempfile.mkdtemp(prefix="mlora-bench-")
    atexit.register(shutil.rmtree, config.train.output_dir, True)
    config.train.train_lora_simultaneously_num = max(len(config.adapters), 1)
    for a in config.adapters:
        if a.micro_batch_size != a.batch_size:
            raise SystemExit(f"adapter {a.name!r}: batch_size {a.batch_size} != "
                             f"micro_batch_size {a.micro_batch_size}; this benchmark times one "
                             f"optimizer step per micro-batch and needs them equal")
        a.num_epochs = BENCH_EPOCHS   # so no job finishes (evaluates, saves) while timed
        a.init_from = ""
    return config


class DemoRun:
    """The in-process run: load every variant, time the rounds, gather the result."""

    def __init__(self, args):
        self.args = args
        self.wall_start = time.perf_counter()
        self.config = bench_config(args)
        self.variants = [v for v in VARIANTS if v in args.variants]
        self.names = [a.name for a in self.config.adapters]
        self.a1_names = self.names if args.a1 == "all" else self.names[:1]
        self.rss = {"start": rss_mib()}
        self.load_before = os.getloadavg()
        self.series: dict[str, Series] = {}
        self.waits: list[float] = []
        self.load()

    def load(self) -> None:
        """An Engine each for A3 and A1 (own base model copy, jobs, optimizers, data
        cursors, so the variants can alternate step by step), and the baseline for B."""
        config = self.config
        self.engines: dict[str, EngineBench] = {}
        for variant in ("A3", "A1"):
            if variant in self.variants:
                log(f"loading an engine for {variant} ({config.model.base_model}, "
                    f"{config.model.dtype}, {len(self.names)} adapters)")
                self.engines[variant] = EngineBench(config)
                self.rss[f"after {variant} engine"] = rss_mib()
        self.first = next(iter(self.engines.values()), None)
        self.data = {job.name: job.data for job in self.first.jobs} if self.first else None
        for other in self.engines.values():
            for job in other.jobs:
                if ([e.input_ids for e in job.data.train]
                        != [e.input_ids for e in self.data[job.name].train]):
                    raise AssertionError(f"{job.name}: the engines encoded different examples")
        self.device = self.first.device if self.first else select_device()
        self.peft = None
        if "B" in self.variants:
            log("loading a base model for PEFT and adding the same adapters")
            self.peft = PeftBench(config, self.device, self.data)
            self.data = self.peft.data
            self.rss["after PEFT model"] = rss_mib()
        steps = self.args.warmup + self.args.steps
        self.plan = {name: plan_micro_batches(d, steps) for name, d in self.data.items()}
        for eb in self.engines.values():
            eb.plan = self.plan

    def add(self, key: str, clock: Clock, tokens: int, padded: int, rnd: int, k: int) -> None:
        if k >= self.args.warmup:
            sample = Sample(clock.seconds, clock.cpu, clock.others, tokens, padded, rnd,
                            k - self.args.warmup)
            self.series.setdefault(key, Series(key)).samples.append(sample)

    def one_step(self, variant: str, k: int, rnd: int) -> None:
        """Step ``k`` of ``variant`` (every adapter once, or all at once for A3)."""
        if variant == "A3":
            eb = self.engines["A3"]
            clock = eb.step(eb.jobs)
            micro = [(job.name, eb.check_draw(job, k)) for job in eb.jobs]
            self.add("A3", clock, *token_counts(self.data, micro, shared_width=True), rnd, k)
            return
        for n in (self.a1_names if variant == "A1" else self.names):
            if variant == "A1":
                eb = self.engines["A1"]
                job = eb.engine.jobs[n]
                clock = eb.step([job])
                indices = eb.check_draw(job, k)
            else:
                indices = self.plan[n][k]
                clock = self.peft.step(n, indices)
            counts = token_counts(self.data, [(n, indices)], shared_width=False)
            self.add(f"{variant}:{n}", clock, *counts, rnd, k)

    def round(self, rnd: int) -> None:
        """Each round restarts every adapter at micro-batch 0, so step k is the same rows
        in every variant and round; the variants alternate step by step, in an order that
        rotates each step, so a burst of load from elsewhere hits them alike."""
        gc.collect()
        t0 = time.perf_counter()
        for eb in self.engines.values():
            eb.restart()
        # Within the round's waiting budget, let a burst of work from elsewhere pass before
        # each group of steps (bursts that start mid-step are caught afterwards: each step
        # records how many cores other processes used during it).
        quiet = Quiet(self.args.wait_quiet)
        for k in range(self.args.warmup + self.args.steps):
            quiet.wait(0.5)
            shift = (k + rnd) % len(self.variants)
            for variant in self.variants[shift:] + self.variants[:shift]:
                self.one_step(variant, k, rnd)
        self.waits.append(quiet.waited)
        med = {key: statistics.median(x.seconds for x in ser.samples if x.round == rnd)
               for key, ser in self.series.items()}
        log(f"round {rnd + 1}/{self.args.rounds} ({time.perf_counter() - t0:.0f} s, "
            f"{quiet.waited:.0f} s of it waiting for quiet), median step: "
            + ", ".join(f"{key} {v:.2f} s" for key, v in med.items()))

    def sum_series(self) -> None:
        """A1 and B over every adapter: one "step" = every adapter once, added up."""
        for variant, members in (("A1", self.a1_names), ("B", self.names)):
            # (A1 with --a1 first has nothing to sum.)
            if (variant not in self.variants or len(members) != len(self.names)
                    or len(members) < 2):
                continue
            parts = [self.series[f"{variant}:{n}"].samples for n in members]
            self.series[f"{variant}:all"] = Series(f"{variant}:all",
                                                   [Sample.summed(g) for g in zip(*parts)])

    def result(self) -> dict:
        args = self.args
        first_losses = {v: eb.first_losses for v, eb in self.engines.items()}
        if self.peft is not None:
            first_losses["B"] = self.peft.first_losses
        trainable = {n: {} for n in self.names}
        for n, row in trainable.items():
            if self.first:
                row["engine"] = sum(p.numel() for p in self.first.engine.jobs[n].parameters)
            if self.peft:
                row["peft"] = self.peft.baseline.trainable(n)
        attn = (self.first.engine.model_info["attn_impl"] if self.first
                else self.peft.baseline.model.config._attn_implementation)
        return {
            "rss_mib": {**self.rss, "end": rss_mib()},
            "trainable_params": trainable,
            "series": {k: [vars(x) for x in v.samples] for k, v in self.series.items()},
            "first_losses": first_losses, "max_rss_mib": maxrss_mib(),
            "hwm_rss_mib": hwm_mib(),
            "loadavg": {"before": self.load_before, "after": os.getloadavg()},
            "wall_s": time.perf_counter() - self.wall_start, "quiet_waits_s": self.waits,
            "settings": {
                "config": str(args.config), "dtype": self.config.model.dtype,
                "device": str(self.device), "threads": torch.get_num_threads(),
                "warmup": args.warmup, "steps": args.steps, "rounds": args.rounds,
                "variants": self.variants, "a1": self.a1_names, "adapters": self.names,
                "malloc": MALLOC_STATUS, "attn_impl": attn,
            },
        }


def run(args) -> dict:
    demo = DemoRun(args)
    for rnd in range(args.rounds):
        demo.round(rnd)
    demo.sum_series()
    return demo.result()


def isolate(args) -> dict[str, dict]:
    """Each variant alone in a fresh subprocess: its own peak RSS (model loading included)."""
    out = {}
    for variant in [v for v in VARIANTS if v in args.variants]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, "-m", "bench.demo_throughput", "--config", str(args.config),
               "--variants", variant, "--rounds", "1", "--warmup", str(args.warmup),
               "--steps", str(args.isolate_steps), "--a1", args.a1, "--json", path,
               "--wait-quiet", str(args.wait_quiet), "--quiet"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.no_malloc_env:
            cmd.append("--no-malloc-env")
        log(f"isolated run of {variant}: {' '.join(cmd[3:])}")
        try:
            subprocess.run(cmd, check=True, cwd=ROOT)
            child = json.loads(Path(path).read_text())
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            log(f"isolated run of {variant} failed: {exc}")
            continue
        finally:
            Path(path).unlink(missing_ok=True)
        out[variant] = {"hwm_rss_mib": child["hwm_rss_mib"], "rss_mib": child["rss_mib"],
                        "wall_s": child["wall_s"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.demo_throughput", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="run config (default: configs/demo.toml)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None,
                   help="base model dtype (default: the config's, bf16 for the demo)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per variant per round")
    p.add_argument("--steps", type=int, default=8, help="measured steps per variant per round")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    p.add_argument("--variants", default="A3,A1,B",
                   help="comma-separated subset of A3,A1,B (default: all)")
    p.add_argument("--a1", choices=("all", "first"), default="all",
                   help="A1: each adapter alone (all) or only the first adapter")
    p.add_argument("--out", type=Path, help="also write the markdown report here")
    p.add_argument("--json", type=Path, help="write the raw measurements here")
    p.add_argument("--isolate", action="store_true",
                   help="then run each variant alone in a subprocess for its own peak RSS")
    p.add_argument("--isolate-steps", type=int, default=3,
                   help="measured steps of each isolated run (default 3)")
    p.add_argument("--wait-quiet", type=float, default=60, metavar="SECONDS",
                   help="per round, at most this many seconds of waiting, before a group of "
                        "steps, for other processes to use under half a core (default 60; "
                        "0: never wait)")
    p.add_argument("--no-malloc-env", action="store_true",
                   help="do not re-exec with the glibc malloc settings")
    p.add_argument("--quiet", action="store_true", help="no report on stdout")
    args = p.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown or not args.variants:
        p.error(f"--variants: unknown {unknown}; choose from {','.join(VARIANTS)}")
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        p.error("--warmup must be >= 0, --steps and --rounds >= 1")
    try:
        import peft  # noqa: F401
    except ImportError:
        if "B" in args.variants:
            p.error("variant B needs PEFT: pip install peft (or pass --variants A3,A1)")

    log(f"malloc settings: {MALLOC_STATUS}")
    result = run(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    iso = isolate(args) if args.isolate else None
    if iso:
        result["isolated"] = iso
        if args.json:
            args.json.write_text(json.dumps(result, indent=1, default=str))
    if args.quiet and not args.out:
        return 0
    text = report(result, iso)
    if not args.quiet:
        print(text)
    if args.out:
        args.out.write_text(text)
        log(f"report written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
