#!/usr/bin/env python
"""Throughput, step time, peak memory and FLOP utilisation: this engine against PEFT.

Not a test: a measurement script. For each model shape (random weights from a config;
speed does not depend on the weights) and each number of adapters N it runs, each variant
in its own fresh subprocess (so every peak is that variant's alone):

  A  this engine: N adapters in one batched ``Engine.step`` per step (``Engine.run``,
     ``write_metrics=False``); step time and its breakdown from the engine's ``batch``
     events;
  B  PEFT: one ``get_peft_model`` model on the same base holding the same N adapters (r,
     alpha, dropout, targets), trained one after another with a plain PyTorch loop
     (``set_adapter``, forward with ``labels=``, backward, AdamW step); one B step is one
     optimizer step of every adapter, the same rows as A's step;
  C  N separate PEFT processes at once, one adapter each, started together: the sum of
     their peak memory, and their aggregate tokens/s.

All variants read the same synthetic Alpaca rows (a jsonl per adapter, fixed seed, varied
lengths) through the engine's own data pipeline, so step k is the same micro-batch of the
same encoded rows everywhere. Reported per variant: tokens/s, step time (median,
p10-p90), the phase breakdown, padding, peak memory (CPU: the process's VmHWM; CUDA:
``torch.cuda.max_memory_allocated``) beside ``engine.core.memory``'s estimate when that module
exists, and model FLOP utilisation against a matmul rate measured in the same workers.
BENCHMARKS.md ("Engine vs PEFT by model and number of adapters") has the method and
the formulas.

    .venv/bin/python bench/bench.py --model tiny --n 1,2 --steps 3 --out /tmp/b.md
    python bench/bench.py --model tinyllama --device cuda --dtype bf16 --n 1,4,8

Internals: the script is its own worker (``--worker prepare|A|B|C --spec FILE --result
FILE``); the parent never imports torch. Every worker has a timeout and dies with its
parent; results and the report are rewritten after every worker, so a killed run keeps
what it had.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Model shapes (LLaMA architecture). Token ids match the tiny test tokenizer (pad 0, bos 1,
# eos 2); the vocabulary is the shape's, only its first few hundred ids ever occur.
SHAPES = {
    "tiny": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=768, vocab_size=32000,
                 tie_word_embeddings=False, max_position_embeddings=2048,
                 rope_theta=10000.0),
    # SmolLM2-135M's config
    "smollm2": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5),
    # TinyLlama-1.1B's config
    "tinyllama": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                      num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                      tie_word_embeddings=False, max_position_embeddings=2048,
                      rope_theta=10000.0, rms_norm_eps=1e-5),
}
TOKEN_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
# The rows' prompt template. With the tiny test tokenizer (a 320-word BPE) the full alpaca
# preamble costs 66-114 tokens, two to three times what it costs with a real 32k-49k
# vocabulary; alpaca_short's 13-23 tokens plus the longer fields below give rows of the
# lengths a real tokenizer makes of Alpaca data.
PROMPT = "alpaca_short"
VARIANTS = ("A", "P", "B", "C")
ENGINE_VARIANTS = ("A", "P")   # P: the engine with [train] packing = "off" (padded rows)
MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
    "MALLOC_TOP_PAD_": "1073741824",
}
# Phases of the engine's batch event left out of the step time (saving is not training;
# the benchmark's save_step never comes, but the engine may save for other reasons).
UNTIMED_PHASES = ("checkpoint",)
DISTURBED_CORES = 0.5     # a step during which other processes used more is "disturbed"
NEVER = 10**9


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ======================================================================================
# Small measurements shared by the workers (no torch at import)


def rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return None


def hwm_mib() -> float | None:
    """Peak RSS of this process image (VmHWM). Unlike getrusage's maxrss it does not carry
    the parent's high-water mark over fork and exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def maxrss_mib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have been busy (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return (sum(fields) - fields[3] - fields[4]) / _CLK_TCK


class Mark:
    """Wall time, own CPU time and machine-wide busy time at a moment."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()
        self.busy = machine_busy_seconds()

    def since(self) -> dict:
        """Seconds since the mark, own CPU seconds, and the cores others kept busy."""
        now = Mark()
        seconds = now.wall - self.wall
        cpu = now.cpu - self.cpu
        others = None
        if now.busy is not None and self.busy is not None and seconds > 0:
            others = max(0.0, (now.busy - self.busy - cpu) / seconds)
        return {"wall": seconds, "cpu": cpu, "others": others}


class Quiet:
    """Waits (within a budget) until other processes leave the CPUs alone for a moment."""

    def __init__(self, budget: float):
        self.left = budget
        self.waited = 0.0

    def wait(self, window: float = 0.25) -> None:
        while self.left > 0:
            mark = Mark()
            time.sleep(window)
            others = mark.since()["others"]
            self.left -= window
            self.waited += window
            if others is None or others < DISTURBED_CORES:
                return


# ======================================================================================
# Data


def _text(rng: random.Random, words: list[str], n: int) -> str:
    return " ".join(rng.choice(words) for _ in range(n))


def make_rows(n: int, seed: int, words: list[str], scale: float) -> list[dict]:
    """Alpaca rows whose fields have realistic, varied lengths in tokens.

    ``words`` are one token each (with their leading space) in the tokenizer used, so a
    field of k words is about k tokens. Instruction 6-30 tokens; an input in 60% of rows,
    log-normal with median 40 tokens; output log-normal with median 80 tokens (clipped at
    400), about what a LLaMA tokenizer makes of Alpaca; ``scale`` multiplies every length.
    """
    rng = random.Random(f"mlora-bench/{seed}")
    rows = []

    def length(median: float, sigma: float, low: int, high: int) -> int:
        value = rng.lognormvariate(math.log(median), sigma)
        return max(1, int(round(scale * min(high, max(low, value)))))

    for _ in range(n):
        row = {"instruction": _text(rng, words, max(1, int(scale * rng.randint(6, 30))))}
        if rng.random() < 0.6:
            row["input"] = _text(rng, words, length(40, 0.8, 4, 300))
        row["output"] = _text(rng, words, length(80, 0.9, 2, 400))
        rows.append(row)
    return rows


def one_token_words(tokenizer) -> list[str]:
    """Alphabetic vocabulary entries that are one token with a leading space."""
    words = sorted(k[1:] for k in tokenizer.get_vocab()
                   if k.startswith("\u0120") and k[1:].isalpha() and len(k) > 2)
    good = [w for w in words if len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) == 1]
    return good or ["the", "an", "is", "that"]


# ======================================================================================
# Configs shared by the workers


def adapter_tables(spec: dict) -> list[dict]:
    return [{"name": a["name"], "data": a["data"], "prompt": PROMPT, "r": a["r"],
             "lora_alpha": a["alpha"], "lora_dropout": a["dropout"],
             "target_modules": list(a["targets"]), "lr": a["lr"],
             "batch_size": a["rows"], "micro_batch_size": a["rows"],
             "num_epochs": 1000, "cutoff_len": spec["cutoff"]}
            for a in spec["adapters"]]


def run_config(spec: dict, out_dir: str):
    """The RunConfig for ``spec``'s adapters, validated by the engine's own parser."""
    from engine.core.config import parse_config

    doc = {"model": {"base_model": spec["model_dir"], "dtype": spec["dtype"],
                     "attn_impl": spec["attn_impl"]},
           "train": {"output_dir": out_dir, "seed": spec["seed"], "cutoff_len": spec["cutoff"],
                     "save_step": NEVER,
                     "train_lora_simultaneously_num": max(1, len(spec["adapters"])),
                     "gradient_checkpointing": spec["gradient_checkpointing"],
                     "packing": spec.get("packing") or "auto"},
           "adapter": adapter_tables(spec)}
    return parse_config(doc, "<bench>", Path(spec["model_dir"]).parent)


def plan_micro_batches(data, count: int) -> list[list[int]]:
    """The first ``count`` micro-batches a fresh job draws (the engine's order)."""
    planned: list[list[int]] = []
    epoch = 0
    while len(planned) < count:
        for batch in data.epoch_batches(epoch):
            planned.extend(data.micro_batches(batch))
        epoch += 1
    return planned[:count]


def _count_targets(labels: list[int]) -> int:
    return sum(1 for t in labels[1:] if t != -100)


# ======================================================================================
# Workers (run in subprocesses; these import torch)


class Laps:
    """Wall time of a step's phases, synchronising the GPU at each boundary."""

    def __init__(self, device):
        import torch
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self._sync()
        self._last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        self._sync()
        now = time.perf_counter()
        self.laps[phase] = self.laps.get(phase, 0.0) + now - self._last
        self._last = now


def mem_snapshot(device=None) -> dict:
    snap = {"rss_mib": rss_mib(), "hwm_mib": hwm_mib(), "maxrss_mib": maxrss_mib()}
    if device is not None and device.type == "cuda":
        import torch
        snap.update(cuda_alloc_mib=torch.cuda.memory_allocated() / 2**20,
                    cuda_peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                    cuda_reserved_peak_mib=torch.cuda.max_memory_reserved() / 2**20)
    return snap


def matmul_rate(tokens: int, hidden: int, dtype: str, device, trials: int = 5) -> dict:
    """FLOP/s of a (tokens x hidden) @ (hidden x hidden) matmul in ``dtype`` on ``device``."""
    import torch
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(tokens, hidden, dtype=dt, device=device)
    b = torch.randn(hidden, hidden, dtype=dt, device=device)
    with torch.no_grad():
        for _ in range(3):
            a @ b
        sync()
        n = 1
        while True:
            t0 = time.perf_counter()
            for _ in range(n):
                a @ b
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed > 0.05 or n >= 2**16:
                break
            n *= 2
        rates = []
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(n):
                a @ b
            sync()
            rates.append(2.0 * tokens * hidden * hidden * n / (time.perf_counter() - t0))
    return {"tokens": tokens, "hidden": hidden, "dtype": dtype, "median": statistics.median(rates),
            "max": max(rates), "trials": rates}


def _die_with_parent() -> None:
    """End this worker if the parent dies (a killed run must not leave it on the GPU)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)
    threading.Thread(target=watch, daemon=True).start()


class ResultFile:
    """The worker's result JSON, rewritten atomically as it grows (a timed-out worker's
    partial steps still count)."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.data: dict = {"ok": False, "partial": True}

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, default=str))
        os.replace(tmp, self.path)


def worker_main(kind: str, spec_path: str, result_path: str) -> int:
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    res = ResultFile(result_path)
    res.data.update(variant=kind, pid=os.getpid())
    start = time.perf_counter()
    try:
        import torch
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        res.data["threads"] = torch.get_num_threads()
        res.data["mem_start"] = mem_snapshot()
        fn = {"prepare": work_prepare, "A": work_engine, "P": work_engine, "B": work_peft,
              "C": work_peft}[kind]
        if kind == "P":
            spec = {**spec, "packing": "off"}
        fn(spec, res)
        res.data["ok"] = True
        res.data["partial"] = False
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        res.data["error"] = traceback.format_exc()
        print(res.data["error"], file=sys.stderr, flush=True)
    res.data["wall_s"] = time.perf_counter() - start
    res.save()
    return 0 if res.data["ok"] else 1


def work_prepare(spec: dict, res: ResultFile) -> None:
    """Write the data files, build the model folder, and plan every adapter's micro-batches."""
    import platform

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, LlamaConfig

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_tokenizer import build_tiny_tokenizer

    from engine.core.data import JobData
    from engine.core.prompts import load_template

    tokenizer = build_tiny_tokenizer()
    words = one_token_words(tokenizer)
    for a in spec["adapters"]:
        path = Path(a["data"])
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = make_rows(spec["rows_per_file"], a["data_seed"], words, spec["length_scale"])
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, path)

    model_dir = Path(spec["model_dir"])
    config = LlamaConfig(**{**spec["shape"], **TOKEN_IDS})
    if not (model_dir / "config.json").is_file():
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16,
                 "fp16": torch.float16}[spec["dtype"]]
        where = "cuda" if spec["device"] == "cuda" and torch.cuda.is_available() else "cpu"
        t0 = time.perf_counter()
        torch.manual_seed(spec["seed"])
        # Initialised on the GPU when there is one (seconds instead of a minute for 1B).
        with torch.device(where):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        tmp_dir = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        del model
        os.replace(tmp_dir, model_dir)
        res.data["build_s"] = time.perf_counter() - t0
    res.data["config"] = json.loads((model_dir / "config.json").read_text())

    template = load_template(PROMPT)
    total = spec["warmup"] + spec["steps"]
    lengths, targets, plans, warnings = {}, {}, {}, []
    from engine.core.config import AdapterConfig
    for a in spec["adapters"]:
        cfg = AdapterConfig(name=a["name"], data=a["data"], prompt=PROMPT, r=a["r"],
                            batch_size=a["rows"], micro_batch_size=a["rows"],
                            cutoff_len=spec["cutoff"], seed=spec["seed"])
        data = JobData.from_config(cfg, tokenizer, template, default_cutoff_len=spec["cutoff"],
                                   default_seed=spec["seed"])
        warnings += data.warnings()
        lengths[a["name"]] = [len(e.input_ids) for e in data.train]
        targets[a["name"]] = [_count_targets(e.labels) for e in data.train]
        plans[a["name"]] = plan_micro_batches(data, total)
    res.data.update(lengths=lengths, targets=targets, plan=plans, data_warnings=warnings,
                    words=len(words))
    import peft
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    res.data["env"] = env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _step_record(k: int, laps: dict, tokens: int, positions: int, rows: int,
                 since: dict) -> dict:
    return {"k": k, "seconds": {p: round(v, 6) for p, v in laps.items()},
            "total": sum(v for p, v in laps.items() if p not in UNTIMED_PHASES),
            "tokens": tokens, "positions": positions,
            "rows": rows, "cpu": since["cpu"], "others": since["others"],
            "wall": since["wall"], "end": time.time()}


def work_engine(spec: dict, res: ResultFile) -> None:
    """Variant A: every adapter of the spec in one Engine, one batched step per step."""
    import torch

    from engine.train.engine import Engine

    out_dir = tempfile.mkdtemp(prefix="mlora-bench-engine-")
    config = run_config(spec, out_dir)
    total = spec["warmup"] + spec["steps"]
    steps: list[dict] = []
    res.data["steps"] = steps
    res.data["first_loss"] = {}
    res.data["warnings"] = []
    state: dict = {"mark": None}

    quiet = Quiet(spec.get("wait_quiet", 0))

    def poll(wait: bool) -> None:
        if wait:
            time.sleep(0.05)
            return
        if len(steps) >= spec["warmup"]:
            quiet.wait()
            res.data["waited_s"] = quiet.waited
        state["mark"] = Mark()

    def on_event(event: dict) -> None:
        kind = event.get("type")
        if kind == "batch":
            since = state["mark"].since() if state["mark"] else {"cpu": None, "others": None,
                                                                 "wall": None}
            positions = sum(_pass_positions(ps) for ps in passes)
            record = _step_record(len(steps), event["seconds"], event["tokens"], positions,
                                  event["rows"], since)
            record["passes"] = list(passes)
            passes.clear()
            steps.append(record)
            res.data["mem_last"] = mem_snapshot(device)
            res.save()
        elif kind == "step" and event["job"] not in res.data["first_loss"]:
            res.data["first_loss"][event["job"]] = event["loss"]
        elif kind == "log" and event.get("level") == "warning":
            res.data["warnings"].append(event["message"])

    device = None
    engine = Engine(config, on_event=on_event, write_metrics=False)
    device = engine.device

    def before_decoder(module, args, kwargs):
        """Each forward pass of a step: its (rows, width) and which rows are whose."""
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None or not torch.is_grad_enabled():
            return None
        try:   # engine internals: without them the FLOP count assumes one pass per step
            segments = [[sg.adapter, sg.start, sg.end] for sg in engine.layout.segments]
            if getattr(engine.layout, "packed", False):
                # One row of examples back to back: segments are token ranges, and each
                # example (its positions restart at 0) attends to itself only.
                starts = (kwargs["position_ids"][0] == 0).nonzero().flatten().tolist()
                ends = starts[1:] + [int(ids.shape[1])]
                passes.append({"packed": True, "rows": len(starts), "width": None,
                               "positions": int(ids.shape[1]), "segments": segments,
                               "lengths": [e - b for b, e in zip(starts, ends)]})
            else:
                passes.append({"rows": int(ids.shape[0]), "width": int(ids.shape[1]),
                               "segments": segments})
        except Exception:  # noqa: BLE001 - measuring must not break the step
            pass
        return None
    passes: list[dict] = []
    engine.decoder.register_forward_pre_hook(before_decoder, with_kwargs=True)
    res.data["info"] = {k: v for k, v in engine.model_info.items()}
    res.data["trainable"] = {n: sum(p.numel() for p in j.parameters)
                             for n, j in engine.jobs.items()}
    res.data["mem_loaded"] = mem_snapshot(device)
    if spec.get("matmul_tokens"):
        res.data["matmul"] = matmul_rate(spec["matmul_tokens"], spec["shape"]["hidden_size"],
                                         spec["dtype"], device)
    res.save()
    engine.run(max_steps=total, poll=poll)
    res.data["mem_end"] = mem_snapshot(device)
    del engine
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)


def work_peft(spec: dict, res: ResultFile) -> None:
    """Variants B and C: a PEFT model with the spec's adapters, trained one after another."""
    import torch
    from peft import LoraConfig, get_peft_model

    from engine.core.data import JobData
    from engine.train.models import load_base_model, select_device
    from engine.core.prompts import load_template
    from engine.train.engine import collate

    out_dir = tempfile.mkdtemp(prefix="mlora-bench-peft-")
    config = run_config(spec, out_dir)
    device = select_device()
    model, tokenizer, info = load_base_model(config.model, device)
    res.data["info"] = info
    names = [a.name for a in config.adapters]
    data = {a.name: JobData.from_config(a, tokenizer, load_template(a.prompt),
                                        default_cutoff_len=config.train.cutoff_len,
                                        default_seed=config.train.seed)
            for a in config.adapters}
    total = spec["warmup"] + spec["steps"]
    plan = {n: plan_micro_batches(data[n], total) for n in names}

    torch.manual_seed(spec["seed"])
    lora = {a.name: LoraConfig(r=a.r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                               target_modules=list(a.target_modules), bias="none",
                               task_type="CAUSAL_LM")
            for a in config.adapters}
    pm = get_peft_model(model, lora[names[0]], adapter_name=names[0])
    for name in names[1:]:
        pm.add_adapter(name, lora[name])
    if spec["gradient_checkpointing"]:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm.train()   # lora_dropout is active in train mode only (the base's own dropout is 0)
    params = {n: [p for pn, p in pm.named_parameters() if f".{n}." in pn and "lora_" in pn]
              for n in names}
    lrs = {a.name: a.lr for a in config.adapters}
    optimizers = {n: torch.optim.AdamW(params[n], lr=lrs[n], weight_decay=0.0) for n in names}
    res.data["trainable"] = {n: sum(p.numel() for p in params[n]) for n in names}
    res.data["mem_loaded"] = mem_snapshot(device)
    if spec.get("matmul_tokens"):
        res.data["matmul"] = matmul_rate(spec["matmul_tokens"], spec["shape"]["hidden_size"],
                                         spec["dtype"], device)
    steps: list[dict] = []
    res.data["steps"] = steps
    res.data["first_loss"] = {}
    res.save()

    barrier = spec.get("barrier")
    if barrier:   # variant C: all processes start their steps together
        Path(barrier["ready"]).touch()
        deadline = time.monotonic() + barrier["timeout"]
        while not Path(barrier["go"]).exists():
            if time.monotonic() > deadline:
                raise TimeoutError("no start signal from the parent")
            time.sleep(0.02)
        res.data["go_time"] = time.time()

    pad = tokenizer.pad_token_id
    quiet = Quiet(spec.get("wait_quiet", 0))
    for k in range(total):
        if k >= spec["warmup"]:
            quiet.wait()
            res.data["waited_s"] = quiet.waited
        mark = Mark()
        laps = Laps(device)
        tokens = positions = rows = 0
        for name in names:
            pm.set_adapter(name)
            ids, labels, attention = collate([data[name].train[i] for i in plan[name][k]], pad)
            ids, labels = ids.to(device), labels.to(device)
            attention = attention.to(device)
            laps.lap("data")
            out = pm(input_ids=ids, attention_mask=attention, labels=labels, use_cache=False)
            laps.lap("forward")
            out.loss.backward()
            laps.lap("backward")
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            laps.lap("optimizer")
            if name not in res.data["first_loss"]:
                res.data["first_loss"][name] = float(out.loss.detach())
            tokens += int(attention.sum())
            positions += attention.numel()
            rows += attention.shape[0]
            del out
        steps.append(_step_record(k, laps.laps, tokens, positions, rows, mark.since()))
        res.data["mem_last"] = mem_snapshot(device)
        res.save()
    res.data["mem_end"] = mem_snapshot(device)
    import shutil
    shutil.rmtree(out_dir, ignore_errors=True)


# ======================================================================================
# FLOPs (pure arithmetic; see BENCHMARKS.md)


def shape_of(config: dict) -> dict:
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or h // heads
    kv = (config.get("num_key_value_heads") or heads) * head_dim
    q = heads * head_dim
    inter = config["intermediate_size"]
    layers = config["num_hidden_layers"]
    linears = {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
               "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    return {"h": h, "q": q, "kv": kv, "layers": layers, "vocab": config["vocab_size"],
            "linears": linears,
            "decoder_params": layers * sum(i * o for i, o in linears.values()),
            "head_params": h * config["vocab_size"]}


def _pass_positions(ps: dict) -> int:
    """Positions a recorded pass ran: rows x width, or a packed pass's tokens."""
    return ps["positions"] if ps.get("packed") else ps["rows"] * ps["width"]


def lora_params(shape: dict, r: int, targets: list[str]) -> int:
    return shape["layers"] * sum(r * sum(shape["linears"][t]) for t in targets)


def step_flops(shape: dict, jobs: list[dict], variant: str,
               passes: list[dict] | None = None) -> dict:
    """FLOPs of one step; ``jobs``: [{"name", "lengths": [...], "targets": [...], "lora":
    LoRA parameters}], the adapters' micro-batches of this step.

    executed: what the variant computes. A: the decoder over every pass's rows x width
    (``passes`` as the engine ran them; without, one pass padded to the step's longest
    row), lm_head on target positions only. B/C: each adapter's rows padded to their own
    longest row, lm_head on every position. useful: non-padding positions only, lm_head on
    target positions. Frozen matmul weights cost 4 FLOPs per weight per position (forward
    2, backward to the input 2), LoRA weights 6 (their weight gradients too), attention 12
    x layers x heads x head_dim x width^2 per row (QK^T and AV: forward 4, backward 8; no
    saving for the causal mask).
    """
    dec, head = shape["decoder_params"], shape["head_params"]
    att = 12 * shape["layers"] * shape["q"]
    lora = {j["name"]: j["lora"] for j in jobs}

    def cost(positions: int, lora_flops: float, head_positions: int, attention: int) -> float:
        return 4.0 * dec * positions + lora_flops + 4.0 * head * head_positions + att * attention

    tokens = sum(sum(j["lengths"]) for j in jobs)
    targets = sum(sum(j["targets"]) for j in jobs)
    useful = cost(tokens, sum(6.0 * j["lora"] * sum(j["lengths"]) for j in jobs), targets,
                  sum(n * n for j in jobs for n in j["lengths"]))
    if variant in ENGINE_VARIANTS:
        if not passes:
            width = max(n for j in jobs for n in j["lengths"])
            rows = sum(len(j["lengths"]) for j in jobs)
            start, segments = 0, []
            for j in jobs:
                segments.append([j["name"], start, start + len(j["lengths"])])
                start += len(j["lengths"])
            passes = [{"rows": rows, "width": width, "segments": segments}]
        executed, positions = 4.0 * head * targets, 0
        for ps in passes:
            if ps.get("packed"):   # segments are token ranges; attention per example
                lora_flops = sum(6.0 * lora.get(name, 0) * (end - begin)
                                 for name, begin, end in ps["segments"])
                executed += cost(ps["positions"], lora_flops, 0,
                                 sum(n * n for n in ps["lengths"]))
                positions += ps["positions"]
                continue
            rows, width = ps["rows"], ps["width"]
            lora_flops = sum(6.0 * lora.get(name, 0) * (end - begin) * width
                             for name, begin, end in ps["segments"])
            executed += cost(rows * width, lora_flops, 0, rows * width * width)
            positions += rows * width
    else:
        executed, positions = 0.0, 0
        for j in jobs:
            width, rows = max(j["lengths"]), len(j["lengths"])
            executed += cost(rows * width, 6.0 * j["lora"] * rows * width, rows * width,
                             rows * width * width)
            positions += rows * width
    return {"useful": useful, "executed": executed, "tokens": tokens, "targets": targets,
            "positions": positions}


# ======================================================================================
# The parent: run the series


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived (raised by the parent's signal handler)."""


class Runner:
    def __init__(self, args):
        self.args = args
        self.started = time.monotonic()
        self.live: list[subprocess.Popen] = []
        self.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="mlora-bench-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.cache = Path(args.model_cache) if args.model_cache else self.workdir / "models"
        self.counter = 0
        self.interrupted = False

    def remaining(self) -> float:
        if not self.args.deadline:
            return float("inf")
        return self.args.deadline - (time.monotonic() - self.started)

    def env(self) -> dict:
        env = dict(os.environ)
        extra = env.get("PYTHONPATH")
        env["PYTHONPATH"] = str(ROOT) + (os.pathsep + extra if extra else "")
        env["MLORA_BACKEND_TYPE"] = self.args.device
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("TRANSFORMERS_OFFLINE", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.setdefault("PYTHONUNBUFFERED", "1")
        if self.args.device == "cpu" and self.args.malloc_env:
            for k, v in MALLOC_ENV.items():
                env.setdefault(k, v)
        return env

    def kill_all(self) -> None:
        for p in list(self.live):
            _kill_group(p)

    def run(self, kind: str, specs: list[dict], label: str) -> list[dict]:
        """Run one worker per spec at once (C: behind a start barrier); their results."""
        if self.remaining() < 5:
            log(f"{label}: skipped, the deadline is reached")
            return [{"ok": False, "skipped": True, "error": "skipped: deadline"} for _ in specs]
        budget = min(self.args.worker_timeout, self.remaining())
        files = []
        barrier = None
        if kind == "C":
            self.counter += 1
            go = self.workdir / f"go-{self.counter}"
            barrier = go
        for i, spec in enumerate(specs):
            self.counter += 1
            base = self.workdir / f"w{self.counter:03d}-{kind}"
            if barrier is not None:
                spec["barrier"] = {"ready": str(base) + ".ready", "go": str(barrier),
                                   "timeout": budget}
            Path(str(base) + ".spec.json").write_text(json.dumps(spec))
            files.append(base)
        procs = []
        t0 = time.monotonic()
        for base in files:
            logf = open(str(base) + ".log", "w")
            p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", kind,
                                  "--spec", str(base) + ".spec.json",
                                  "--result", str(base) + ".result.json"],
                                 stdout=logf, stderr=subprocess.STDOUT, env=self.env(),
                                 start_new_session=True)
            logf.close()
            procs.append(p)
            self.live.append(p)
        timed_out = False
        try:
            if barrier is not None:
                while time.monotonic() - t0 < budget:
                    ready = all(Path(str(b) + ".ready").exists() for b in files)
                    if ready or any(p.poll() is not None for p in procs):
                        break
                    time.sleep(0.05)
                barrier.touch()
            for p in procs:
                left = budget - (time.monotonic() - t0)
                try:
                    p.wait(timeout=max(0.1, left))
                except subprocess.TimeoutExpired:
                    timed_out = True
                    _kill_group(p)
                    p.wait()
        except Interrupted:
            # SIGTERM/SIGINT: stop the workers, keep what they wrote, end the series.
            self.interrupted = True
            for p in procs:
                _kill_group(p)
                p.wait()
        for p in procs:
            if p in self.live:
                self.live.remove(p)
        results = []
        for base, p in zip(files, procs):
            path = Path(str(base) + ".result.json")
            try:
                r = json.loads(path.read_text())
            except (OSError, ValueError):
                r = {"ok": False, "error": f"no result (exit code {p.returncode})"}
            if timed_out and not r.get("ok"):
                r["error"] = "; ".join(filter(None, [r.get("error"),
                                                     f"timed out after {budget:.0f} s"]))
            if self.interrupted and not r.get("ok"):
                r["error"] = "; ".join(filter(None, [r.get("error"), "interrupted"]))
            r["returncode"] = p.returncode
            r["log"] = str(base) + ".log"
            if not r.get("ok"):
                tail = _tail(str(base) + ".log", 25)
                log(f"{label}: worker failed (exit {p.returncode}); log {base}.log:\n{tail}")
            results.append(r)
        log(f"{label}: {time.monotonic() - t0:.0f} s")
        return results


def _kill_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _tail(path: str, n: int) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def adapter_specs(args, workdir: Path, count: int) -> list[dict]:
    ranks = [int(r) for r in args.ranks.split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    folder = workdir / f"data-x{args.length_scale:g}-{args.rows_per_file}-s{args.seed}"
    return [{"name": f"a{i}", "data": str(folder / f"adapter{i}.jsonl"),
             "data_seed": args.seed + i, "r": ranks[i % len(ranks)],
             "alpha": 2 * ranks[i % len(ranks)], "dropout": args.dropout, "targets": targets,
             "lr": 1e-4, "rows": args.rows}
            for i in range(count)]


def model_shape(args, name: str) -> dict:
    shape = dict(SHAPES[name])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    return shape


def run_series(args) -> dict:
    runner = Runner(args)
    ns = sorted({int(n) for n in args.n.split(",")})
    models = list(SHAPES) if args.model == "all" else [m.strip() for m in args.model.split(",")]
    for m in models:
        if m not in SHAPES:
            raise SystemExit(f"--model: unknown {m!r}; choose from {', '.join(SHAPES)} or all")
    variants = [v for v in VARIANTS if v in args.variants.split(",")]
    adapters = adapter_specs(args, runner.workdir, max(ns))
    threads = args.threads or (os.cpu_count() or 1)
    results = {"settings": {k: v for k, v in vars(args).items()}, "models": {},
               "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "threads": threads,
               "loadavg_before": _loadavg()}
    results["settings"]["ns"] = ns
    results["settings"]["variants"] = variants

    def save():
        results["elapsed_s"] = time.monotonic() - runner.started
        results["loadavg_after"] = _loadavg()
        if args.json:
            _write(args.json, json.dumps(results, indent=1, default=str))
        try:
            text = report(results)
        except Exception:  # noqa: BLE001 - the measurements (--json) matter more
            text = "report failed:\n" + traceback.format_exc()
            log(text)
        if args.out:
            _write(args.out, text)
        return text

    def on_term(signum, frame):
        results["interrupted"] = f"signal {signum}"
        if runner.live:
            raise Interrupted()   # Runner.run stops its workers and keeps their results
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)

    def checkpoint():
        save()
        if runner.interrupted:
            log("interrupted: the report holds what was measured")
            raise SystemExit(143)

    def run_models() -> None:
        for name in models:
            shape = model_shape(args, name)
            tag = f"{name}-L{shape['num_hidden_layers']}-{args.dtype}"
            base = {"model_dir": str(runner.cache / tag), "shape": shape, "dtype": args.dtype,
                    "device": args.device, "attn_impl": args.attn, "seed": args.seed,
                    "cutoff": args.cutoff, "warmup": args.warmup, "steps": args.steps,
                    "gradient_checkpointing": args.gradient_checkpointing, "threads": threads,
                    "rows_per_file": args.rows_per_file, "length_scale": args.length_scale,
                    "wait_quiet": args.wait_quiet, "packing": args.packing}
            entry = {"shape": shape, "runs": {}}
            results["models"][name] = entry
            log(f"{name}: building the model folder and planning the data ({tag})")
            prep = runner.run("prepare", [{**base, "adapters": adapters}], f"{name} prepare")[0]
            entry["prepare"] = {k: v for k, v in prep.items()
                                if k not in ("lengths", "targets", "plan")}
            if not prep.get("ok"):
                checkpoint()
                continue
            entry["data"] = {k: prep[k] for k in ("lengths", "targets", "plan")}
            results.setdefault("env", prep.get("env"))
            entry["config"] = prep["config"]
            entry["matmul_tokens"] = _matmul_tokens(prep, adapters[:max(ns)], args)
            checkpoint()
            for n in ns:
                run = entry["runs"].setdefault(str(n), {})
                spec = {**base, "adapters": adapters[:n], "matmul_tokens": entry["matmul_tokens"]}
                for rnd in range(args.rounds):
                    order = [v for v in ("A", "P", "B") if v in variants]
                    shift = (rnd + ns.index(n)) % max(1, len(order))
                    order = order[shift:] + order[:shift]   # each variant first in turn
                    for v in order:
                        log(f"{name} N={n} {v} (round {rnd + 1}/{args.rounds})")
                        too_big = _too_big(args, entry, adapters[:n], v)
                        r = (runner.run(v, [dict(spec)], f"{name} N={n} {v}")[0] if not too_big
                             else {"ok": False, "skipped": True, "error": too_big})
                        run.setdefault(v, []).append(r)
                        checkpoint()
                if "C" in variants:
                    log(f"{name} N={n} C: {n} PEFT processes at once")
                    per = max(1, threads // n)   # the processes share the cores
                    specs = [{**base, "adapters": [a], "threads": per, "matmul_tokens": 0,
                              "wait_quiet": 0}
                             for a in adapters[:n]]
                    too_big = _too_big(args, entry, adapters[:n], "C")
                    run["C"] = (runner.run("C", specs, f"{name} N={n} C") if not too_big else
                                [{"ok": False, "skipped": True, "error": too_big}] * n)
                    checkpoint()
    try:
        run_models()
        text = save()
    except SystemExit:
        save()
        raise
    finally:
        runner.kill_all()
        if not args.workdir:
            import shutil
            shutil.rmtree(runner.workdir, ignore_errors=True)
    if not args.quiet:
        print(text)
    return results


def _loadavg() -> list[float]:
    try:
        return list(os.getloadavg())
    except OSError:
        return [float("nan")] * 3


def _mem_available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def _too_big(args, entry: dict, adapters: list[dict], variant: str) -> str | None:
    """On CPU, why a run would not fit in the machine's available memory (by
    engine.core.memory's estimate, the engine's step taken as one pass); None when it fits."""
    if args.device != "cpu" or args.no_memory_check:
        return None
    avail = _mem_available_mib()
    s = {"dtype": args.dtype, "device": args.device, "attn": args.attn,
         "gradient_checkpointing": args.gradient_checkpointing, "dropout": args.dropout}
    steps = [_jobs_at(entry, adapters, k) for k in range(args.warmup + args.steps)]
    if variant == "C":
        parts = [_estimate(entry, [[jobs[i]] for jobs in steps], s, "peft")
                 for i in range(len(adapters))]
        est = sum(parts) if all(p is not None for p in parts) else None
    else:
        est = _estimate(entry, steps, s, "engine" if variant in ENGINE_VARIANTS else "peft")
    if est is None or avail is None or est <= 0.85 * avail:
        return None
    return (f"skipped: estimated peak {est / 1024:.1f} GiB > 85% of the memory available "
            f"now ({avail / 1024:.1f} GiB); --no-memory-check runs it anyway")


def _matmul_tokens(prep: dict, adapters: list[dict], args) -> int:
    """Positions of the median batched step at the largest N (rounded up to 64)."""
    if args.matmul_tokens:
        return args.matmul_tokens
    sizes = []
    for k in range(args.warmup + args.steps):
        lengths = [prep["lengths"][a["name"]][i]
                   for a in adapters for i in prep["plan"][a["name"]][k]]
        sizes.append(len(lengths) * max(lengths))
    t = int(statistics.median(sizes))
    return max(64, min(32768, (t + 63) // 64 * 64))


def _write(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


# ======================================================================================
# Report


def _q(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _peak_mib(r: dict, device: str) -> float | None:
    mem = r.get("mem_end") or r.get("mem_last") or r.get("mem_loaded") or {}
    if device == "cuda":
        return mem.get("cuda_peak_mib")
    return mem.get("hwm_mib") or mem.get("maxrss_mib")


def _fmt_mib(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


def _estimate(model_entry: dict, jobs_by_step: list[list[dict]], args_s: dict,
              implementation: str, passes_by_step: list | None = None) -> float | None:
    """engine.core.memory's estimate (MiB), the max over the steps run; None without the module.

    ``passes_by_step[k]``: the engine's passes of step k as recorded (adapter names per
    pass), so the estimate sees the same grouping.
    """
    try:
        from engine.core.memory import JobLoad, estimate_peak_bytes
    except ImportError:
        return None
    best = None
    for k, jobs in enumerate(jobs_by_step):
        loads = [JobLoad(rows=len(j["lengths"]), seq_len=max(j["lengths"]), r=j["r"],
                         target_modules=j["targets_modules"], target_tokens=sum(j["targets"]),
                         lora_dropout=args_s["dropout"], tokens=sum(j["lengths"]))
                 for j in jobs]
        extra = {}
        if passes_by_step and k < len(passes_by_step) and passes_by_step[k]:
            if any(ps.get("packed") for ps in passes_by_step[k]):
                extra["packed"] = True
            index = {j["name"]: i for i, j in enumerate(jobs)}
            extra["passes"] = [[index[name] for name, _b, _e in ps["segments"] if name in index]
                               for ps in passes_by_step[k]]
        try:
            value = estimate_peak_bytes(model_entry["config"], loads, dtype=args_s["dtype"],
                                        device=args_s["device"],
                                        gradient_checkpointing=args_s["gradient_checkpointing"],
                                        attn_impl=args_s["attn"],
                                        implementation=implementation, **extra)
        except TypeError:   # another signature: fall back to the plainest call
            try:
                value = estimate_peak_bytes(model_entry["config"], loads)
            except Exception:  # noqa: BLE001 - an optional hook must not break the report
                return None
        except Exception:  # noqa: BLE001
            return None
        best = value if best is None else max(best, value)
    return None if best is None else best / 2**20


def _jobs_at(entry: dict, adapters: list[dict], k: int) -> list[dict]:
    shape = shape_of(entry["config"])
    data = entry["data"]
    jobs = []
    for a in adapters:
        idx = data["plan"][a["name"]][k]
        jobs.append({"name": a["name"],
                     "lengths": [data["lengths"][a["name"]][i] for i in idx],
                     "targets": [data["targets"][a["name"]][i] for i in idx],
                     "lora": lora_params(shape, a["r"], a["targets"]), "r": a["r"],
                     "targets_modules": a["targets"]})
    return jobs


def summarise(entry: dict, results_runs: list[dict], variant: str, adapters: list[dict],
              s: dict, rate: float | None) -> dict | None:
    """Pooled measured steps of one variant's runs (rounds) at one N."""
    shape = shape_of(entry["config"])
    warm = s["warmup"]
    samples = []
    for r in results_runs:
        for st in r.get("steps", []):
            if st["k"] >= warm:
                samples.append(st)
    if not samples:
        return None
    out = {"steps": len(samples)}
    times = [x["total"] for x in samples]
    out["median"] = statistics.median(times)
    out["p10"], out["p90"] = _q(times, 0.1), _q(times, 0.9)
    out["phases"] = {p: statistics.median(x["seconds"].get(p, 0.0) for x in samples)
                     for p in ("data", "forward", "backward", "optimizer")}
    out["tokens_per_s"] = statistics.median(x["tokens"] / x["total"] for x in samples)
    out["tokens_per_step"] = statistics.median(x["tokens"] for x in samples)
    flops = {}
    for x in samples:   # the same k in several rounds: the same rows (and passes)
        flops[x["k"]] = step_flops(shape, _jobs_at(entry, adapters, x["k"]), variant,
                                   x.get("passes"))
    passes = [len(x["passes"]) for x in samples if x.get("passes")]
    out["passes"] = statistics.median(passes) if passes else None
    out["packed"] = any(ps.get("packed") for x in samples for ps in x.get("passes") or [])
    out["padding"] = 1 - sum(x["tokens"] for x in samples) / max(1, sum(
        flops[x["k"]]["positions"] for x in samples))
    mismatched = [x["k"] for x in samples if x["tokens"] != flops[x["k"]]["tokens"]]
    out["token_mismatch"] = mismatched
    out["flops_useful"] = statistics.median(flops[x["k"]]["useful"] for x in samples)
    out["flops_executed"] = statistics.median(flops[x["k"]]["executed"] for x in samples)
    if rate:
        out["mfu_useful"] = statistics.median(flops[x["k"]]["useful"] / x["total"] / rate
                                              for x in samples)
        out["mfu_executed"] = statistics.median(flops[x["k"]]["executed"] / x["total"] / rate
                                                for x in samples)
    others = [x["others"] for x in samples if x.get("others") is not None]
    out["disturbed"] = sum(1 for o in others if o > DISTURBED_CORES)
    out["others_median"] = statistics.median(others) if others else None
    quiet = [x["total"] for x in samples
             if x.get("others") is None or x["others"] <= DISTURBED_CORES]
    out["median_quiet"] = statistics.median(quiet) if quiet else None
    out["by_k"], out["calm_by_k"] = {}, {}
    for x in samples:
        out["by_k"].setdefault(x["k"], []).append(x["total"])
        if x.get("others") is None or x["others"] <= DISTURBED_CORES:
            out["calm_by_k"].setdefault(x["k"], []).append(x["total"])
    waits = [r.get("waited_s", 0.0) for r in results_runs]
    out["waited_s"] = sum(waits)
    peaks = [p for p in (_peak_mib(r, s["device"]) for r in results_runs) if p is not None]
    out["peak_mib"] = max(peaks) if peaks else None
    loaded = [(r.get("mem_loaded") or {}) for r in results_runs]
    key = "cuda_alloc_mib" if s["device"] == "cuda" else "rss_mib"
    vals = [m.get(key) for m in loaded if m.get(key) is not None]
    out["loaded_mib"] = max(vals) if vals else None
    starts = [(r.get("mem_start") or {}).get("rss_mib") for r in results_runs]
    starts = [v for v in starts if v is not None]
    out["start_rss_mib"] = min(starts) if starts else None
    out["first_loss"] = results_runs[0].get("first_loss", {})
    out["trainable"] = results_runs[0].get("trainable", {})
    out["errors"] = [r.get("error") for r in results_runs if r.get("error")]
    return out


def summarise_c(entry: dict, procs: list[dict], adapters: list[dict], s: dict) -> dict:
    out = {"procs": len(procs), "ok": sum(1 for p in procs if p.get("ok"))}
    peaks = [_peak_mib(p, s["device"]) for p in procs]
    out["peaks"] = peaks
    out["sum_peak_mib"] = sum(p for p in peaks if p is not None) if all(
        p is not None for p in peaks) else None
    warm = s["warmup"]
    windows, tokens = [], 0
    for p in procs:
        measured = [st for st in p.get("steps", []) if st["k"] >= warm]
        if not measured:
            continue
        tokens += sum(st["tokens"] for st in measured)
        first = measured[0]
        windows.append((first["end"] - first["total"], measured[-1]["end"]))
    if windows and len(windows) == len(procs):
        span = max(e for _, e in windows) - min(b for b, _ in windows)
        out["aggregate_tokens_per_s"] = tokens / span if span > 0 else None
    out["errors"] = [p.get("error") for p in procs if p.get("error")]
    return out


def report(results: dict) -> str:
    s = results["settings"]
    env = results.get("env") or {}
    lines = ["# mlora-tui benchmark: this engine (A) vs PEFT one adapter after another (B) "
             "vs N PEFT processes (C)", ""]
    where = env.get("gpu") if s["device"] == "cuda" else env.get("cpu")
    lines.append(f"- Started {results['started']}; device {s['device']} ({where or '?'}); "
                 f"dtype {s['dtype']} base (adapters fp32); attention {s['attn']}; "
                 f"{results['threads']} torch threads"
                 + " per worker (C: split between its processes)"
                 + f"; gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}"
                 + (f"; glibc malloc settings {'set' if s.get('malloc_env') else 'default'}; "
                    f"waiting for quiet up to {s.get('wait_quiet') or 0:g} s per worker"
                    if s["device"] == "cpu" else "") + ".")
    if env:
        lines.append(f"- Python {env.get('python')}, torch {env.get('torch')}, transformers "
                     f"{env.get('transformers')}, peft {env.get('peft')}"
                     + (f", CUDA {env['cuda']}" if env.get("cuda") else "") + ".")
    lines.append(f"- Per adapter and step: {s['rows']} row{'s' if s['rows'] != 1 else ''} "
                 f"(micro-batch = batch, one AdamW "
                 f"step per step), ranks {s['ranks']} (alpha = 2r) cycling over the adapters, "
                 f"targets {s['targets']}, dropout {s['dropout']}, cutoff {s['cutoff']}; "
                 f"warm-up {s['warmup']} + {s['steps']} measured steps per run, "
                 f"{s['rounds']} round(s).")
    lines.append(f"- Elapsed {results.get('elapsed_s', 0):.0f} s; load average (1 min) "
                 f"{results['loadavg_before'][0]:.2f} before, "
                 f"{results.get('loadavg_after', [0])[0]:.2f} at the last update."
                 + (f" **Interrupted** ({results['interrupted']})." if results.get("interrupted")
                    else ""))
    lines.append("")
    for name, entry in results["models"].items():
        lines += report_model(name, entry, s)
    return "\n".join(lines) + "\n"


def report_model(name: str, entry: dict, s: dict) -> list[str]:
    lines = [f"## {name}", ""]
    prep = entry.get("prepare", {})
    if "config" not in entry:
        lines.append(f"Preparation failed: {_short(prep.get('error')) or '?'}")
        return lines + [""]
    cfg = entry["config"]
    shape = shape_of(cfg)
    from_mem = None
    try:
        from engine.core.memory import ModelShape
        from_mem = ModelShape.from_config(cfg).num_params()
    except ImportError:
        pass
    layers = cfg["num_hidden_layers"]
    lines.append(f"- Shape: hidden {cfg['hidden_size']}, "
                 f"{layers} layer{'s' if layers != 1 else ''}, "
                 f"{cfg['num_attention_heads']} heads / {cfg.get('num_key_value_heads')} KV "
                 f"heads, MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}, "
                 f"tied embeddings {cfg.get('tie_word_embeddings')}; random weights. Decoder "
                 f"matmul weights {shape['decoder_params'] / 1e6:.1f} M, lm_head "
                 f"{shape['head_params'] / 1e6:.1f} M"
                 + (f", all parameters {from_mem / 1e6:.1f} M" if from_mem else "") + ".")
    lengths = [n for v in entry["data"]["lengths"].values() for n in v]
    targets = [n for v in entry["data"]["targets"].values() for n in v]
    lines.append(f"- Rows (tokens, prompt template included): mean {statistics.mean(lengths):.0f}, "
                 f"p10 {_q(lengths, .1):.0f}, median {_q(lengths, .5):.0f}, p90 "
                 f"{_q(lengths, .9):.0f}, max {max(lengths)}; target tokens "
                 f"{sum(targets) / sum(lengths):.0%} of all tokens.")
    rates = []
    for run in entry["runs"].values():
        for v in ("A", "P", "B"):
            for r in run.get(v, []):
                if r.get("matmul"):
                    rates.append(r["matmul"]["max"])
    rate = max(rates) if rates else None
    if rate:
        lines.append(f"- Matmul rate ({entry['matmul_tokens']} x {cfg['hidden_size']} @ "
                     f"{cfg['hidden_size']} x {cfg['hidden_size']}, {s['dtype']}, timed in "
                     f"each A and B worker, best of 5 trials each): {rate / 1e12:.3g} TFLOP/s, "
                     f"the best worker's, is the MFU denominator (workers' bests: "
                     f"{min(rates) / 1e12:.3g}–{max(rates) / 1e12:.3g}, median "
                     f"{statistics.median(rates) / 1e12:.3g}).")
    lines.append("")
    header = ("| N | Variant | One step is | Tokens / step | Padding | Step (s): median "
              "(p10–p90) | Undisturbed steps: median (s), count | Forward / backward / "
              "optimizer (s) | Tokens/s | Speed vs B, paired: all (undisturbed) | MFU useful | "
              "MFU executed |")
    lines += [header, "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    mem_rows = []
    notes = []
    adapters_all = adapter_specs_from_settings(s)
    for n_str, run in entry["runs"].items():
        n = int(n_str)
        adapters = adapters_all[:n]
        summ = {v: summarise(entry, run[v], v, adapters, s, rate) for v in ("A", "P", "B")
                if run.get(v)}
        for v in ("A", "P", "B"):
            if v not in run:
                continue
            x = summ.get(v)
            if x is None:
                err = next((r.get("error") for r in run[v] if r.get("error")), "no steps")
                lines.append(f"| {n} | {v} | failed: {_short(err)} | | | | | | | | | |")
                continue
            if v in ENGINE_VARIANTS:
                what = f"{n} adapter{'s' if n > 1 else ''} in one `Engine.step`"
                if x.get("passes") and x["passes"] != 1:
                    what += f" ({x['passes']:g} passes)"
                what += ", padded rows" if v == "P" else (", packed" if x.get("packed") else "")
            else:
                what = f"{n} PEFT steps, one per adapter" if n > 1 else "1 PEFT step"
            paired = "1 (reference)" if v == "B" else "–"
            if v in ENGINE_VARIANTS and summ.get("B"):
                paired = _paired(x, summ["B"])
            ph = x["phases"]
            quiet = (f"{x['median_quiet']:.3f}, {x['steps'] - x['disturbed']} of {x['steps']}"
                     if x.get("median_quiet") is not None else f"–, 0 of {x['steps']}")
            lines.append(
                f"| {n} | {v} | {what} | {x['tokens_per_step']:,.0f} | {x['padding']:.0%} | "
                f"{x['median']:.3f} ({x['p10']:.3f}–{x['p90']:.3f}) | {quiet} | "
                f"{ph['forward']:.3f} / {ph['backward']:.3f} / {ph['optimizer']:.3f} | "
                f"{x['tokens_per_s']:,.0f} | {paired} | {_pct(x.get('mfu_useful'))} | "
                f"{_pct(x.get('mfu_executed'))} |")
            if x["token_mismatch"]:
                notes.append(f"N={n} {v}: tokens of steps {x['token_mismatch']} differ from "
                             "the planned micro-batches")
            for err in x["errors"]:
                notes.append(f"N={n} {v}: {_short(err)}")
        c = summarise_c(entry, run["C"], adapters, s) if run.get("C") else None
        jobs_by_step = [_jobs_at(entry, adapters, k) for k in range(s["warmup"] + s["steps"])]
        recorded = {}
        for r in run.get("A", []):
            for st in r.get("steps", []):
                recorded.setdefault(st["k"], st.get("passes"))
        passes_by_step = [recorded.get(k) for k in range(len(jobs_by_step))]
        est_a = _estimate(entry, jobs_by_step, s, "engine", passes_by_step)
        est_b = _estimate(entry, jobs_by_step, s, "peft")
        est_c = None
        if c is not None:
            parts = [_estimate(entry, [[jobs[i]] for jobs in jobs_by_step], s, "peft")
                     for i in range(n)]
            est_c = sum(parts) if all(p is not None for p in parts) else None
        mem_rows.append((n, summ.get("A"), est_a, summ.get("B"), est_b, c, est_c))
        if summ.get("A") and summ.get("P"):
            notes.append(f"N={n}: packing, A (packed) vs P (padded rows), paired by step: "
                         f"{_paired(summ['A'], summ['P'])}; peak memory A "
                         f"{_fmt_mib(summ['A']['peak_mib'])}, P {_fmt_mib(summ['P']['peak_mib'])}")
        if summ.get("A") and summ.get("B"):
            la, lb = summ["A"]["first_loss"], summ["B"]["first_loss"]
            if la and lb:
                diffs = [abs(la[k] - lb[k]) / max(1e-12, abs(lb[k])) for k in la if k in lb]
                if diffs:
                    notes.append(f"N={n}: first-step losses (B = 0, so the base model's loss) "
                                 f"A vs B agree within {max(diffs):.2e} relative "
                                 f"(a0: {la.get('a0', float('nan')):.4f} / "
                                 f"{lb.get('a0', float('nan')):.4f})")
            ta, tb = summ["A"]["trainable"], summ["B"]["trainable"]
            if ta and tb and ta != tb:
                notes.append(f"N={n}: trainable parameters differ: engine {ta}, PEFT {tb}")
        if c is not None:
            for err in c["errors"]:
                notes.append(f"N={n} C: {_short(err)}")
    lines.append("")
    unit = "`torch.cuda.max_memory_allocated`" if s["device"] == "cuda" else "peak RSS (VmHWM)"
    lines.append(f"Peak memory per run, {unit}, each variant in its own process; estimate = "
                 "`engine.core.memory.estimate_peak_bytes` (– where that module is missing):")
    lines.append("")
    lines += ["| N | A engine: measured | A: estimate | B PEFT: measured | B: estimate | "
              "C N PEFT processes: sum of peaks | C: estimate | C: tokens/s, all processes |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, a, ea, b, eb, c, ec in mem_rows:
        lines.append(
            f"| {n} | {_fmt_mib(a and a['peak_mib'])} | {_fmt_est(ea, a and a['peak_mib'])} | "
            f"{_fmt_mib(b and b['peak_mib'])} | {_fmt_est(eb, b and b['peak_mib'])} | "
            f"{_fmt_mib(c and c['sum_peak_mib'])}"
            + (f" ({c['ok']}/{c['procs']} ok)" if c and c['ok'] < c['procs'] else "")
            + f" | {_fmt_est(ec, c and c['sum_peak_mib'])} | "
            f"{_fmt_rate(c)} |")
    lines.append("")
    if notes:
        lines += [f"- {n}" for n in notes]
        lines.append("")
    return lines


def _paired(a: dict, b: dict) -> str:
    """Median over steps k of time_B(k) / time_A(k) (the same rows): all steps, and steps
    that neither variant ran disturbed."""
    all_r = [statistics.median(b["by_k"][k]) / statistics.median(t)
             for k, t in a["by_k"].items() if k in b["by_k"]]
    calm_r = [statistics.median(b["calm_by_k"][k]) / statistics.median(t)
              for k, t in a["calm_by_k"].items() if k in b["calm_by_k"]]
    if not all_r:
        return "–"
    text = f"**{statistics.median(all_r):.2f}x**"
    text += f" ({statistics.median(calm_r):.2f}x, {len(calm_r)})" if calm_r else " (–)"
    return text


def adapter_specs_from_settings(s: dict) -> list[dict]:
    class A:
        pass
    a = A()
    for k, v in s.items():
        setattr(a, k, v)
    return adapter_specs(a, Path("/"), max(s["ns"]))


def _fmt_est(est: float | None, measured: float | None) -> str:
    if est is None:
        return "–"
    if measured:
        return f"{_fmt_mib(est)} ({est / measured - 1:+.0%})"
    return _fmt_mib(est)


def _fmt_rate(c: dict | None) -> str:
    rate = c and c.get("aggregate_tokens_per_s")
    return f"{rate:,.0f}" if rate else "–"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1%}"


def _short(err: str | None) -> str:
    if not err:
        return ""
    last = [line for line in err.strip().splitlines() if line.strip()]
    return (last[-1] if last else err)[:160].replace("|", "/")


# ======================================================================================


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="tiny | smollm2 | tinyllama | all, or a comma-separated list")
    p.add_argument("--n", default="1,2,4,8", help="numbers of adapters (default 1,2,4,8)")
    p.add_argument("--steps", type=int, default=8, help="measured steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up steps per run (default 2)")
    p.add_argument("--rounds", type=int, default=1,
                   help="A and B runs per N, alternating their order (default 1)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="bf16",
                   help="base model dtype (adapters are fp32 in every variant)")
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--variants", default="A,B,C",
                   help="subset of A,P,B,C (A: the engine, packed where [train] packing = "
                        "\"auto\" packs; P: the engine with padded rows; B: PEFT one adapter "
                        "after another; C: N PEFT processes)")
    p.add_argument("--rows", type=int, default=4, help="rows per adapter per step (default 4)")
    p.add_argument("--cutoff", type=int, default=256, help="cutoff_len in tokens (default 256)")
    p.add_argument("--length-scale", type=float, default=1.0,
                   help="multiply the synthetic rows' field lengths (default 1)")
    p.add_argument("--rows-per-file", type=int, default=256)
    p.add_argument("--ranks", default="8,16", help="LoRA ranks, cycled over the adapters")
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--layers", type=int, default=0,
                   help="override the number of layers of every shape (smoke runs)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--packing", choices=("auto", "on", "off"), default="auto",
                   help="[train] packing of variant A (P always runs padded rows)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per worker (default: all cores; C splits them)")
    p.add_argument("--matmul-tokens", type=int, default=0,
                   help="rows of the timed matmul (default: positions of the median batched "
                        "step at the largest N)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", help="write the markdown report here (rewritten as results come)")
    p.add_argument("--json", help="write all measurements here (rewritten as results come)")
    p.add_argument("--workdir", help="keep data, models, specs and worker logs here")
    p.add_argument("--model-cache", help="reuse model folders built here")
    p.add_argument("--deadline", type=float, default=0,
                   help="seconds for the whole series; later workers are skipped")
    p.add_argument("--worker-timeout", type=float, default=3600,
                   help="seconds per worker (default 3600)")
    p.add_argument("--malloc-env", action="store_true",
                   help="CPU: give workers the glibc malloc settings of shared/environment.md "
                        "(the engine does not set them, so by default neither does this)")
    p.add_argument("--wait-quiet", type=float, default=None, metavar="SECONDS",
                   help="per worker, at most this many seconds of waiting before steps for "
                        "other processes to use under half a core (default: 30 on CPU, 0 "
                        "on CUDA)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="CPU: run variants even where engine.core.memory estimates they would not "
                        "fit in the available memory")
    p.add_argument("--quiet", action="store_true", help="no report on stdout")
    p.add_argument("--report-from", metavar="JSON",
                   help="only render the report of an earlier run's --json file")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    if args.report_from:
        text = report(json.loads(Path(args.report_from).read_text()))
        if args.out:
            _write(args.out, text)
        print(text)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.rows < 1 or args.rounds < 1:
        p.error("--steps, --rows and --rounds must be >= 1, --warmup >= 0")
    if args.wait_quiet is None:
        args.wait_quiet = 30.0 if args.device == "cpu" else 0.0
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from A,P,B,C")
    run_series(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
