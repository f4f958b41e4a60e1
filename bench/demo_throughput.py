#!/usr/bin/env python
"""Training throughput on the demo config: this engine (batched and single) against PEFT.

Not a test: a measurement script. In one process, interleaved round by round, it times

  A3  this engine, every adapter of the config in one batched ``Engine.step``;
  A1  this engine, each adapter alone (``Engine.step([job])`` for each job in turn);
  B   PEFT: one ``peft.get_peft_model`` model holding the same adapters (same LoraConfig:
      r, alpha, dropout, targets, rsLoRA, DoRA), trained one after another with a plain
      PyTorch loop (``set_adapter``, forward with ``labels=`` so the loss is HF's mean
      over target tokens, backward, AdamW step), timed per optimizer step.

Every variant runs the same micro-batches of the same encoded examples (the engine's
``JobData``): each round restarts every adapter at micro-batch 0 of epoch 0, so step k is
the same rows in every variant and round, and step times pair up. Within a round the
variants alternate step by step (A3 and A1 each have their own Engine and base model copy),
in an order that rotates every step, so load from other processes hits them alike.
Reported: non-padding tokens per second (all adapters counted), median and spread of the
step time, padding fraction, and paired ratios against B. Peak RSS of the whole process is
reported at the end; ``--isolate`` also runs each variant alone in a subprocess for its own
peak RSS.

glibc's allocator settings from /work/shared/environment.md (MALLOC_MMAP_THRESHOLD_ etc.)
halve the step time and its noise on CPU; they must be in the environment when the process
starts, so the script re-executes itself with them when they are not set (say
``--no-malloc-env`` to measure without them).

    .venv/bin/python bench/demo_throughput.py --isolate --out /tmp/demo_bench.md

Each step also records how many cores other processes kept busy meanwhile (/proc/stat); a
step during which they used more than half a core is "disturbed", and the report gives
medians and paired ratios over all steps and over undisturbed steps (one busy core from
elsewhere slows a step here 3-30x, not 2x). See BENCHMARKS.md for how to read the table.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
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
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)
    raise AssertionError("unreachable")


MALLOC_STATUS = _ensure_malloc_env() if __name__ == "__main__" else "n/a (imported)"

# ruff: noqa: E402  (the re-exec above must happen before torch is imported)
import argparse
import atexit
import gc
import json
import math
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from engine.core.config import RunConfig, load_config
from engine.core.data import JobData
from engine.train.models import default_targets, load_base_model, select_device
from engine.core.prompts import load_template
from engine.train.engine import Engine, Job
from engine.train.engine import collate as engine_collate

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "demo.toml"
VARIANTS = ("A3", "A1", "B")
# Jobs must never finish (evaluation, saving) or checkpoint while being timed.
NEVER = 10**9
BENCH_EPOCHS = 1000


# The measurements bench/bench.py makes too (this script's folder is on sys.path).
from bench import hwm_mib as hwm_rss_mib  # noqa: E402
from bench import log, machine_busy_seconds, rss_mib  # noqa: E402,F401
from bench import maxrss_mib as max_rss_mib  # noqa: E402,F401


class Clock:
    """Wall time, this process's CPU time, and the CPU others used meanwhile (in cores)."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self) -> "Clock":
        sync(self.device)
        self._busy = machine_busy_seconds()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.device)
        self.seconds = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu
        busy = machine_busy_seconds()
        self.others = (None if busy is None or self._busy is None
                       else max(0.0, (busy - self._busy - self.cpu) / self.seconds))


DISTURBED_CORES = 0.5   # a step during which other processes used more is "disturbed"


def wait_for_quiet(max_wait: float, window: float = 0.5) -> tuple[float, float | None]:
    """Wait (at most ``max_wait`` s) for a ``window`` in which other processes use under
    DISTURBED_CORES cores; returns (seconds waited, cores others used in the last window)."""
    start = time.perf_counter()
    others = None
    while max_wait > 0:
        b0, c0, t0 = machine_busy_seconds(), time.process_time(), time.perf_counter()
        if b0 is None:
            break
        time.sleep(window)
        others = (machine_busy_seconds() - b0 - (time.process_time() - c0)) / (
            time.perf_counter() - t0)
        if others < DISTURBED_CORES or time.perf_counter() - start >= max_wait:
            break
    return time.perf_counter() - start, others


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------------------
# Measurements


@dataclass
class Sample:
    seconds: float
    cpu: float         # CPU seconds of this process (all threads) during the step
    others: float | None  # cores the rest of the machine kept busy during the step
    tokens: int        # non-padding tokens in the step (all adapters of the step)
    padded: int        # rows x width actually run
    round: int
    index: int         # measured step index within the round (same rows in every variant)


@dataclass
class Series:
    key: str
    samples: list[Sample] = field(default_factory=list)

    def times(self) -> list[float]:
        return [s.seconds for s in self.samples]


def plan_micro_batches(data: JobData, micro_batch_size: int, count: int) -> list[list[int]]:
    """The first ``count`` micro-batches a fresh job draws (the engine's order)."""
    planned: list[list[int]] = []
    epoch = 0
    while len(planned) < count:
        batches = data.epoch_batches(epoch)
        if not batches:
            raise SystemExit("an adapter has no training examples")
        for batch in batches:
            planned.extend(data.micro_batches(batch, micro_batch_size))
        epoch += 1
    return planned[:count]


def collate(data: JobData, indices: list[int], pad_id: int):
    """Right-padded ids, labels and attention mask of one micro-batch (padded to its own max)."""
    return engine_collate([data.train[i] for i in indices], pad_id)


def token_counts(data_by_name: dict[str, JobData], micro: list[tuple[str, list[int]]],
                 shared_width: bool) -> tuple[int, int]:
    """(non-padding tokens, rows x width) of a step over ``micro`` [(adapter, indices)].

    ``shared_width``: every row is padded to the longest row of the whole step (the
    engine's batched step); otherwise each micro-batch is padded to its own longest row.
    """
    lengths = [[len(data_by_name[name].train[i].input_ids) for i in idx] for name, idx in micro]
    tokens = sum(sum(ls) for ls in lengths)
    if shared_width:
        width = max(max(ls) for ls in lengths)
        return tokens, width * sum(len(ls) for ls in lengths)
    return tokens, sum(max(ls) * len(ls) for ls in lengths)


class EngineBench:
    """A3 and A1 on one Engine holding every adapter of the config."""

    def __init__(self, config: RunConfig, plan: dict[str, list[list[int]]] | None):
        self.first_losses: dict[str, float] = {}
        self.engine = Engine(config, on_event=self._on_event, write_metrics=False)
        self.device = self.engine.device
        self.jobs: list[Job] = list(self.engine.jobs.values())
        self.drawn: dict[str, list[list[int]]] = {j.name: [] for j in self.jobs}
        for job in self.jobs:
            self._record_draws(job)
        self.plan = plan

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
    """B: one PEFT model with every adapter, trained one adapter at a time."""

    def __init__(self, config: RunConfig, device: torch.device,
                 data: dict[str, JobData], tokenizer=None):
        from peft import LoraConfig, get_peft_model

        model, tok, _info = load_base_model(config.model, device)
        self.tokenizer = tokenizer or tok
        self.pad_id = self.tokenizer.pad_token_id
        self.device = device
        self.data = data
        self.first_losses: dict[str, float] = {}
        torch.manual_seed(config.train.seed)
        self.lora_configs = {}
        for a in config.adapters:
            self.lora_configs[a.name] = LoraConfig(
                r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                target_modules=list(a.target_modules or default_targets(model)),
                use_rslora=a.use_rslora, use_dora=a.use_dora, bias="none",
                task_type="CAUSAL_LM")
        names = list(self.lora_configs)
        self.model = get_peft_model(model, self.lora_configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, self.lora_configs[name])
        self.model.train()  # lora_dropout is active only in train mode (the base's is 0)
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        for name in names:
            marker = f".{name}."
            self.params[name] = [p for n, p in self.model.named_parameters()
                                 if marker in n and "lora_" in n]
        lr = {a.name: a.lr for a in config.adapters}
        wd = {a.name: a.weight_decay for a in config.adapters}
        self.optimizers = {name: torch.optim.AdamW(self.params[name], lr=lr[name],
                                                   weight_decay=wd[name])
                           for name in names}

    def trainable_numel(self, name: str) -> int:
        return sum(p.numel() for p in self.params[name])

    def step(self, name: str, indices: list[int]) -> Clock:
        with Clock(self.device) as clock:
            self.model.set_adapter(name)
            ids, labels, attention = collate(self.data[name], indices, self.pad_id)
            out = self.model(input_ids=ids.to(self.device),
                             attention_mask=attention.to(self.device),
                             labels=labels.to(self.device), use_cache=False)
            out.loss.backward()
            optimizer = self.optimizers[name]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if name not in self.first_losses:
            self.first_losses[name] = float(out.loss.detach())
        return clock


# --------------------------------------------------------------------------------------
# Running


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


def run(args) -> dict:
    wall_start = time.perf_counter()
    config = bench_config(args)
    variants = [v for v in VARIANTS if v in args.variants]
    names = [a.name for a in config.adapters]
    a1_names = names if args.a1 == "all" else names[:1]
    steps_per_round = args.warmup + args.steps
    result: dict = {"rss_mib": {"start": rss_mib()}}
    load_before = os.getloadavg()

    # A3 and A1 each get their own Engine (own base model copy, jobs, optimizers, data
    # cursors), so the variants can alternate step by step.
    engines: dict[str, EngineBench] = {}
    for variant in ("A3", "A1"):
        if variant in variants:
            log(f"loading an engine for {variant} ({config.model.base_model}, "
                f"{config.model.dtype}, {len(names)} adapters)")
            engines[variant] = EngineBench(config, plan=None)
            result["rss_mib"][f"after {variant} engine"] = rss_mib()
    data: dict[str, JobData]
    if engines:
        first = next(iter(engines.values()))
        data = {job.name: job.data for job in first.jobs}
        device, tokenizer = first.device, first.engine.tokenizer
        for other in engines.values():
            for job in other.jobs:
                if [e.input_ids for e in job.data.train] != [e.input_ids for e in data[job.name].train]:
                    raise AssertionError(f"{job.name}: the engines encoded different examples")
    else:
        device = select_device()
        _m, tokenizer, _i = load_base_model(config.model, device)
        del _m
        data = {a.name: JobData.from_config(
                    a, tokenizer, load_template(a.prompt),
                    default_cutoff_len=config.train.cutoff_len, default_seed=config.train.seed)
                for a in config.adapters}
    plan = {a.name: plan_micro_batches(data[a.name], a.micro_batch_size, steps_per_round)
            for a in config.adapters}
    for eb in engines.values():
        eb.plan = plan

    peft_bench = None
    if "B" in variants:
        log("loading a base model for PEFT and adding the same adapters")
        peft_bench = PeftBench(config, device, data, tokenizer)
        result["rss_mib"]["after PEFT model"] = rss_mib()

    params = {}
    for name in names:
        row = {}
        if engines:
            row["engine"] = sum(p.numel() for p in first.engine.jobs[name].parameters)
        if peft_bench is not None:
            row["peft"] = peft_bench.trainable_numel(name)
        params[name] = row
    result["trainable_params"] = params

    series: dict[str, Series] = {}

    def add(key: str, sample: Sample) -> None:
        series.setdefault(key, Series(key)).samples.append(sample)

    def one_step(variant: str, k: int, rnd: int) -> None:
        """Step ``k`` of ``variant`` (every adapter once, or all at once for A3)."""
        measured = k >= args.warmup
        index = k - args.warmup
        if variant == "A3":
            eb = engines["A3"]
            clock = eb.step(eb.jobs)
            micro = [(job.name, eb.check_draw(job, k)) for job in eb.jobs]
            tokens, padded = token_counts(data, micro, shared_width=True)
            if measured:
                add("A3", Sample(clock.seconds, clock.cpu, clock.others, tokens, padded,
                                 rnd, index))
            return
        for n in (a1_names if variant == "A1" else names):
            if variant == "A1":
                eb = engines["A1"]
                job = eb.engine.jobs[n]
                clock = eb.step([job])
                indices = eb.check_draw(job, k)
            else:
                indices = plan[n][k]
                clock = peft_bench.step(n, indices)
            tokens, padded = token_counts(data, [(n, indices)], shared_width=False)
            if measured:
                add(f"{variant}:{n}", Sample(clock.seconds, clock.cpu, clock.others, tokens,
                                             padded, rnd, index))

    waits: list[float] = []
    for rnd in range(args.rounds):
        # Each round restarts every adapter at micro-batch 0, so step k is the same rows in
        # every variant and round; the variants alternate step by step, in an order that
        # rotates each step, so a burst of load from elsewhere hits them alike.
        gc.collect()
        t0 = time.perf_counter()
        for eb in engines.values():
            eb.restart()
        waited = 0.0
        for k in range(steps_per_round):
            # Let a burst of work from elsewhere pass before the next group of steps, within
            # this round's waiting budget (bursts that start mid-step are caught afterwards:
            # each step records how many cores other processes used during it).
            seconds, _others = wait_for_quiet(args.wait_quiet - waited)
            waited += seconds
            shift = (k + rnd) % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                one_step(variant, k, rnd)
        med = {key: statistics.median(x.seconds for x in ser.samples if x.round == rnd)
               for key, ser in series.items()}
        waits.append(waited)
        log(f"round {rnd + 1}/{args.rounds} ({time.perf_counter() - t0:.0f} s, {waited:.0f} s "
            f"of it waiting for quiet), median step: "
            + ", ".join(f"{key} {v:.2f} s" for key, v in med.items()))

    # Sums over adapters trained one after another: one "step" = every adapter once.
    for variant, members in (("A1", a1_names), ("B", names)):
        # (A1 with --a1 first has nothing to sum.)
        if variant not in variants or len(members) != len(names) or len(members) < 2:
            continue
        parts = [series[f"{variant}:{n}"].samples for n in members]
        summed = Series(f"{variant}:all")
        for group in zip(*parts):
            summed.samples.append(Sample(sum(x.seconds for x in group),
                                         sum(x.cpu for x in group),
                                         (None if any(x.others is None for x in group) else
                                          sum(x.others * x.seconds for x in group)
                                          / sum(x.seconds for x in group)),
                                         sum(x.tokens for x in group),
                                         sum(x.padded for x in group),
                                         group[0].round, group[0].index))
        series[summed.key] = summed

    result["series"] = {k: [vars(x) for x in v.samples] for k, v in series.items()}
    result["first_losses"] = {v: eb.first_losses for v, eb in engines.items()}
    if peft_bench is not None:
        result["first_losses"]["B"] = peft_bench.first_losses
    result["rss_mib"]["end"] = rss_mib()
    result["max_rss_mib"] = max_rss_mib()
    result["hwm_rss_mib"] = hwm_rss_mib()
    result["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    result["wall_s"] = time.perf_counter() - wall_start
    result["quiet_waits_s"] = waits
    result["settings"] = {
        "config": str(args.config), "dtype": config.model.dtype, "device": str(device),
        "threads": torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
        "rounds": args.rounds, "variants": variants, "a1": a1_names, "adapters": names,
        "malloc": MALLOC_STATUS,
        "attn_impl": (first.engine.model_info["attn_impl"] if engines
                      else peft_bench.model.config._attn_implementation),
    }
    return result


def isolate(args) -> dict[str, dict]:
    """Each variant alone in a fresh subprocess: its own peak RSS (model loading included)."""
    out = {}
    for variant in [v for v in VARIANTS if v in args.variants]:
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
            path = f.name
        cmd = [sys.executable, os.path.abspath(__file__), "--config", str(args.config),
               "--variants", variant, "--rounds", "1", "--warmup", str(args.warmup),
               "--steps", str(args.isolate_steps), "--a1", args.a1, "--json", path,
               "--wait-quiet", str(args.wait_quiet),
               "--quiet"]
        if args.dtype:
            cmd += ["--dtype", args.dtype]
        if args.no_malloc_env:
            cmd.append("--no-malloc-env")
        log(f"isolated run of {variant}: {' '.join(cmd[2:])}")
        try:
            subprocess.run(cmd, check=True)
            child = json.loads(Path(path).read_text())
        except (subprocess.CalledProcessError, OSError, ValueError) as exc:
            log(f"isolated run of {variant} failed: {exc}")
            continue
        finally:
            Path(path).unlink(missing_ok=True)
        out[variant] = {"hwm_rss_mib": child["hwm_rss_mib"], "rss_mib": child["rss_mib"],
                        "wall_s": child["wall_s"]}
    return out


# --------------------------------------------------------------------------------------
# Report


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _paired_ratios(slow: list[dict], fast: list[dict]) -> list[float]:
    """time(slow) / time(fast) per (round, index): the throughput ratio fast/slow."""
    by_key = {(s["round"], s["index"]): s["seconds"] for s in fast}
    return [s["seconds"] / by_key[(s["round"], s["index"])] for s in slow
            if (s["round"], s["index"]) in by_key]


def _disturbed(x: dict) -> bool:
    return x.get("others") is not None and x["others"] > DISTURBED_CORES


def _fmt_ratio(ratios: list[float]) -> str:
    if not ratios:
        return "–"
    return (f"**{statistics.median(ratios):.2f}x** "
            f"({min(ratios):.2f}–{max(ratios):.2f})")


def report(result: dict, iso: dict | None = None) -> str:
    s = result["settings"]
    series = result["series"]
    names = s["adapters"]
    rounds = s["rounds"]

    def describe(key: str) -> tuple[str, str, str | None]:
        """(label, what one step is, the B series it compares with)"""
        if key == "A3":
            return ("A3 engine, batched", f"{len(names)} adapters in one `Engine.step`",
                    "B:all")
        variant, _, name = key.partition(":")
        if variant == "A1":
            if name == "all":
                return ("A1 engine, one at a time", f"{len(names)} single-adapter steps, summed",
                        "B:all")
            return (f"A1 engine, {name} alone", "1 adapter", f"B:{name}")
        if name == "all":
            return ("B PEFT, one at a time", f"{len(names)} single-adapter steps, summed", None)
        return (f"B PEFT, {name}", "1 adapter", None)

    order = ["A3"] + [f"A1:{n}" for n in names] + ["A1:all"] + [f"B:{n}" for n in names] + ["B:all"]
    threads = max(1, s["threads"])

    def calm(samples: list[dict]) -> list[dict]:
        return [x for x in samples if not _disturbed(x)]

    rows = []
    header = ("| Variant | One step is | Padding | Steps: all (undisturbed) | Median step, all "
              "(s) | IQR, all (s) | Min–max (s) | Median per round (s) | Median step, "
              "undisturbed (s) | Tokens/s: all steps / median undisturbed step | Throughput vs "
              "B, paired, all steps: median (range) | vs B, paired, undisturbed: median (pairs) |")
    rows.append(header)
    rows.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|")
    for key in order:
        if key not in series:
            continue
        samples = series[key]
        quiet = calm(samples)
        times = [x["seconds"] for x in samples]
        tokens = sum(x["tokens"] for x in samples)
        padded = sum(x["padded"] for x in samples)
        label, what, against = describe(key)
        per_round = []
        for r in range(rounds):
            rt = [x["seconds"] for x in samples if x["round"] == r]
            if rt:
                per_round.append(f"{statistics.median(rt):.2f}")
        if key.startswith("B"):
            ratio = calm_ratio = "1 (reference)"
        elif against in series:
            ratio = _fmt_ratio(_paired_ratios(series[against], samples))
            pairs = _paired_ratios(calm(series[against]), quiet)
            calm_ratio = (f"**{statistics.median(pairs):.2f}x** ({len(pairs)})" if pairs
                          else "– (0)")
        else:
            ratio = calm_ratio = "–"
        quiet_median = f"{statistics.median(x['seconds'] for x in quiet):.3f}" if quiet else "–"
        quiet_rate = (f"{statistics.median(x['tokens'] / x['seconds'] for x in quiet):,.0f}"
                      if quiet else "–")
        rows.append(
            f"| {label} | {what} | {1 - tokens / padded:.0%} | {len(times)} ({len(quiet)}) | "
            f"{statistics.median(times):.3f} | {_quantile(times, .25):.2f}–"
            f"{_quantile(times, .75):.2f} | {min(times):.2f}–{max(times):.2f} | "
            f"{' / '.join(per_round)} | {quiet_median} | {tokens / sum(times):,.0f} / "
            f"{quiet_rate} | {ratio} | {calm_ratio} |")

    lines = ["\n".join(rows), ""]
    if "A3" in series and "A1:all" in series:
        pairs = _paired_ratios(calm(series["A1:all"]), calm(series["A3"]))
        lines.append(f"- Batching inside this engine, A3 vs A1 (the same adapters one at a time, "
                     f"paired), all steps: "
                     f"{_fmt_ratio(_paired_ratios(series['A1:all'], series['A3']))}; "
                     f"undisturbed: " + (f"**{statistics.median(pairs):.2f}x** "
                                         f"({len(pairs)} pairs)." if pairs else "no pairs."))
    singles = [k for k in order if k in series and not k.endswith(":all")]
    if singles:
        all_samples = [x for k in singles for x in series[k]]
        spreads = [(max(t) - min(t)) / statistics.median(t)
                   for t in ([x["seconds"] for x in series[k]] for k in singles)]
        others = [x["others"] for x in all_samples if x.get("others") is not None]
        shares = [x["cpu"] / (x["seconds"] * threads) for x in all_samples]
        calm_shares = [x["cpu"] / (x["seconds"] * threads) for x in calm(all_samples)]
        busy = (f"other processes kept a median {statistics.median(others):.2f} cores "
                f"(max {max(others):.2f}) busy during the timed steps, and more than "
                f"{DISTURBED_CORES} cores during {sum(1 for x in all_samples if _disturbed(x))} "
                f"of the {len(all_samples)} single steps (those are \"disturbed\"; a summed "
                f"or batched step is disturbed when other processes averaged more than "
                f"{DISTURBED_CORES} cores over it); "
                if others else "")
        waits = result.get("quiet_waits_s", [])
        lines.append(
            f"- Noise: {busy}(max−min)/median of step time per variant {min(spreads):.0%}–"
            f"{max(spreads):.0%}; this process's CPU time / (wall time x {threads} threads): "
            f"median {statistics.median(shares):.0%}"
            + (f" (undisturbed steps {statistics.median(calm_shares):.0%})" if calm_shares
               else "")
            + f"; waited for quiet {' / '.join(f'{w:.0f}' for w in waits)} s per round; "
            f"load average (1 min) {result['loadavg']['before'][0]:.2f} before, "
            f"{result['loadavg']['after'][0]:.2f} after (this run alone adds about "
            f"{threads}). Paired ratios compare the same step (the same rows) of two variants, "
            f"run seconds apart.")
    fl = result["first_losses"]
    if len(fl) > 1:
        parts = [f"{n} " + " / ".join(f"{fl[v][n]:.4f}" for v in fl if n in fl[v])
                 for n in names]
        lines.append("- Same work check: loss of each adapter's first step (B = 0, so the base "
                     "model's loss on micro-batch 0), " + " / ".join(fl) + ": "
                     + "; ".join(parts) + ".")
    tp = result["trainable_params"]
    lines.append("- Trainable parameters per adapter (engine / PEFT): " + "; ".join(
        f"{n} " + " / ".join(f"{tp[n][k]:,}" if k in tp[n] else "–" for k in ("engine", "peft"))
        for n in names) + ".")
    rss = result["rss_mib"]
    hwm = result.get("hwm_rss_mib")
    lines.append(f"- Memory: peak RSS of the whole process (every variant and a base model copy "
                 f"per variant in it): `getrusage` maxrss {result['max_rss_mib']:,.0f} MiB"
                 + (f" (VmHWM {hwm:,.0f} MiB)" if hwm else "") + "; current RSS "
                 + ", ".join(f"{k.replace('_', ' ')} {v:,.0f}" for k, v in rss.items())
                 + " MiB.")
    if iso:
        lines.append("- Peak RSS of each variant alone in a fresh process (`--isolate`: VmHWM, "
                     "its own model and tokenizer loading included; getrusage would report the "
                     "parent's RSS, which survives fork and exec): " + "; ".join(
                         f"{v} {d['hwm_rss_mib']:,.0f} MiB" for v, d in iso.items()) + ".")
    lines.append(f"- Settings: dtype {s['dtype']} base (adapters fp32), device {s['device']}, "
                 f"attention {s['attn_impl']}, {s['threads']} torch threads, warm-up "
                 f"{s['warmup']} + {s['steps']} measured steps per variant per round, "
                 f"{s['rounds']} rounds, variants alternating step by step (order rotating), A1 = "
                 f"{'each adapter alone' if len(s['a1']) > 1 else s['a1'][0] + ' alone'}; "
                 f"malloc settings {s['malloc']}; in-process run {result['wall_s']:.0f} s "
                 f"(loading included, `--isolate` runs not).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
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
