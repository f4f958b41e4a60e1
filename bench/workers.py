"""``bench.bench``'s workers, one subprocess each: ``prepare`` (data files, the model folder,
the micro-batch plan), ``A``/``P`` (this engine, packed / padded rows), ``B``/``C`` (the
PEFT baseline; C is one of N such processes started together).

    python -m bench.workers KIND SPEC.json RESULT.json

The result JSON is rewritten as the worker goes, so a killed worker's steps still count.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

from bench.baseline import PeftBaseline
from bench.data import job_data, make_rows, one_token_words, plan_micro_batches
from bench.fixtures import build_tiny_tokenizer
from bench.flops import pass_positions
from bench.measure import Mark, Quiet, hwm_mib, maxrss_mib, rss_mib
from bench.spec import NEVER, PROMPT, TOKEN_IDS
from engine.core.config import AdapterConfig, parse_config
from engine.core.data import JobData
from engine.core.prompts import load_template
from engine.train.engine import Engine
from engine.train.models import load_base_model, select_device
from engine.train.passes import StepClock

# Phases of the engine's batch event left out of the step time (saving is not training;
# the benchmark's save_step never comes, but the engine may save for other reasons).
UNTIMED_PHASES = ("checkpoint",)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def mem_snapshot(device=None) -> dict:
    snap = {"rss_mib": rss_mib(), "hwm_mib": hwm_mib(), "maxrss_mib": maxrss_mib()}
    if device is not None and device.type == "cuda":
        snap.update(cuda_alloc_mib=torch.cuda.memory_allocated() / 2**20,
                    cuda_peak_mib=torch.cuda.max_memory_allocated() / 2**20,
                    cuda_reserved_peak_mib=torch.cuda.max_memory_reserved() / 2**20)
    return snap


def matmul_rate(tokens: int, hidden: int, dtype: str, device, trials: int = 5) -> dict:
    """FLOP/s of a (tokens x hidden) @ (hidden x hidden) matmul in ``dtype`` on ``device``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a = torch.randn(tokens, hidden, dtype=DTYPES[dtype], device=device)
    b = torch.randn(hidden, hidden, dtype=DTYPES[dtype], device=device)

    def seconds(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            a @ b
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        seconds(3)
        n = 1
        while seconds(n) <= 0.05 and n < 2**16:   # enough calls for 50 ms a trial
            n *= 2
        rates = [2.0 * tokens * hidden * hidden * n / seconds(n) for _ in range(trials)]
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


def run_config(spec: dict, out_dir: str):
    """The RunConfig for ``spec``'s adapters, validated by the engine's own parser."""
    adapters = [{"name": a["name"], "data": a["data"], "prompt": PROMPT, "r": a["r"],
                 "lora_alpha": a["alpha"], "lora_dropout": a["dropout"],
                 "target_modules": list(a["targets"]), "lr": a["lr"],
                 "batch_size": a["rows"], "micro_batch_size": a["rows"],
                 "num_epochs": 1000, "cutoff_len": spec["cutoff"]}
                for a in spec["adapters"]]
    doc = {"model": {"base_model": spec["model_dir"], "dtype": spec["dtype"],
                     "attn_impl": spec["attn_impl"]},
           "train": {"output_dir": out_dir, "seed": spec["seed"], "cutoff_len": spec["cutoff"],
                     "save_step": NEVER,
                     "train_lora_simultaneously_num": max(1, len(spec["adapters"])),
                     "gradient_checkpointing": spec["gradient_checkpointing"],
                     "packing": spec.get("packing") or "auto"},
           "adapter": adapters}
    return parse_config(doc, "<bench>", Path(spec["model_dir"]).parent)


def step_record(k: int, laps: dict, tokens: int, positions: int, rows: int,
                since: dict) -> dict:
    return {"k": k, "seconds": {p: round(v, 6) for p, v in laps.items()},
            "total": sum(v for p, v in laps.items() if p not in UNTIMED_PHASES),
            "tokens": tokens, "positions": positions,
            "rows": rows, "cpu": since["cpu"], "others": since["others"],
            "wall": since["wall"], "end": time.time()}


# -- prepare --------------------------------------------------------------------------


def work_prepare(spec: dict, res: ResultFile) -> None:
    """Write the data files, build the model folder, and plan every adapter's micro-batches."""
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
    if not (model_dir / "config.json").is_file():
        res.data["build_s"] = build_model(spec, tokenizer, model_dir)
    res.data["config"] = json.loads((model_dir / "config.json").read_text())
    res.data.update(plan_data(spec, tokenizer), words=len(words), env=environment())


def build_model(spec: dict, tokenizer, model_dir: Path) -> float:
    """A random model of ``spec``'s shape saved to ``model_dir``; returns the seconds taken."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**{**spec["shape"], **TOKEN_IDS})
    where = "cuda" if spec["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    # Initialised on the GPU when there is one (seconds instead of a minute for 1B).
    with torch.device(where):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[spec["dtype"]])
    tmp_dir = model_dir.with_name(model_dir.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    del model
    os.replace(tmp_dir, model_dir)
    return time.perf_counter() - t0


def plan_data(spec: dict, tokenizer) -> dict:
    """Every adapter's row lengths and target counts, and its first micro-batches."""
    template = load_template(PROMPT)
    total = spec["warmup"] + spec["steps"]
    lengths, targets, plans, warnings = {}, {}, {}, []
    for a in spec["adapters"]:
        cfg = AdapterConfig(name=a["name"], data=a["data"], prompt=PROMPT, r=a["r"],
                            batch_size=a["rows"], micro_batch_size=a["rows"],
                            cutoff_len=spec["cutoff"], seed=spec["seed"])
        data = JobData.from_config(cfg, tokenizer, template, default_cutoff_len=spec["cutoff"],
                                   default_seed=spec["seed"])
        warnings += data.warnings()
        lengths[a["name"]] = [len(e.input_ids) for e in data.train]
        targets[a["name"]] = [e.num_targets for e in data.train]
        plans[a["name"]] = plan_micro_batches(data, total)
    return {"lengths": lengths, "targets": targets, "plan": plans, "data_warnings": warnings}


def environment() -> dict:
    import peft
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "peft": peft.__version__,
           "cpu": _cpu_model(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# -- A and P: this engine -------------------------------------------------------------


class EngineRecorder:
    """Variant A (or P): every adapter of the spec in one Engine, one batched step per step;
    records each step from the engine's events and each forward pass from a hook."""

    def __init__(self, spec: dict, res: ResultFile, out_dir: str):
        self.spec, self.res = spec, res
        self.steps: list[dict] = []
        self.passes: list[dict] = []
        self.mark: Mark | None = None
        self.quiet = Quiet(spec.get("wait_quiet", 0))
        res.data.update(steps=self.steps, first_loss={}, warnings=[])
        self.engine = Engine(run_config(spec, out_dir), on_event=self.on_event,
                             write_metrics=False)
        self.engine.decoder.register_forward_pre_hook(self.before_decoder, with_kwargs=True)

    def poll(self, wait: bool) -> None:
        if wait:
            time.sleep(0.05)
            return
        if len(self.steps) >= self.spec["warmup"]:
            self.quiet.wait()
            self.res.data["waited_s"] = self.quiet.waited
        self.mark = Mark()

    def on_event(self, event: dict) -> None:
        kind, data = event.get("type"), self.res.data
        if kind == "batch":
            since = self.mark.since() if self.mark else {"cpu": None, "others": None,
                                                         "wall": None}
            positions = sum(pass_positions(ps) for ps in self.passes)
            record = step_record(len(self.steps), event["seconds"], event["tokens"],
                                 positions, event["rows"], since)
            record["passes"] = list(self.passes)
            self.passes.clear()
            self.steps.append(record)
            data["mem_last"] = mem_snapshot(self.engine.device)
            self.res.save()
        elif kind == "step" and event["job"] not in data["first_loss"]:
            data["first_loss"][event["job"]] = event["loss"]
        elif kind == "log" and event.get("level") == "warning":
            data["warnings"].append(event["message"])

    def before_decoder(self, module, args, kwargs):
        """Each forward pass of a step: its (rows, width) and which rows are whose."""
        ids = kwargs.get("input_ids")
        if ids is None and args:
            ids = args[0]
        if ids is None or not torch.is_grad_enabled():
            return None
        try:   # engine internals: without them the FLOP count assumes one pass per step
            layout = self.engine.layout
            segments = [[sg.adapter, sg.start, sg.end] for sg in layout.segments]
            if getattr(layout, "packed", False):
                # One row of examples back to back: segments are token ranges, and each
                # example (its positions restart at 0) attends to itself only.
                starts = (kwargs["position_ids"][0] == 0).nonzero().flatten().tolist()
                ends = starts[1:] + [int(ids.shape[1])]
                self.passes.append({"packed": True, "rows": len(starts), "width": None,
                                    "positions": int(ids.shape[1]), "segments": segments,
                                    "lengths": [e - b for b, e in zip(starts, ends)]})
            else:
                self.passes.append({"rows": int(ids.shape[0]), "width": int(ids.shape[1]),
                                    "segments": segments})
        except Exception:  # noqa: BLE001 - measuring must not break the step
            pass
        return None


def work_engine(spec: dict, res: ResultFile) -> None:
    out_dir = tempfile.mkdtemp(prefix="mlora-bench-engine-")
    recorder = EngineRecorder(spec, res, out_dir)
    engine = recorder.engine
    res.data["info"] = dict(engine.model_info)
    res.data["trainable"] = {n: sum(p.numel() for p in j.parameters)
                             for n, j in engine.jobs.items()}
    res.data["mem_loaded"] = mem_snapshot(engine.device)
    if spec.get("matmul_tokens"):
        res.data["matmul"] = matmul_rate(spec["matmul_tokens"], spec["shape"]["hidden_size"],
                                         spec["dtype"], engine.device)
    res.save()
    engine.run(max_steps=spec["warmup"] + spec["steps"], poll=recorder.poll)
    res.data["mem_end"] = mem_snapshot(engine.device)
    shutil.rmtree(out_dir, ignore_errors=True)


# -- B and C: the PEFT baseline -------------------------------------------------------


def wait_for_go(barrier: dict, res: ResultFile) -> None:
    """Variant C: say ready, then wait for the parent's start signal (all start together)."""
    Path(barrier["ready"]).touch()
    deadline = time.monotonic() + barrier["timeout"]
    while not Path(barrier["go"]).exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no start signal from the parent")
        time.sleep(0.02)
    res.data["go_time"] = time.time()


def peft_baseline(spec: dict, res: ResultFile, out_dir: str) -> tuple[PeftBaseline, dict]:
    """The baseline on the spec's adapters and data; with each adapter's micro-batch plan."""
    config = run_config(spec, out_dir)
    device = select_device()
    model, tokenizer, res.data["info"] = load_base_model(config.model, device)
    data = job_data(config, tokenizer)
    total = spec["warmup"] + spec["steps"]
    plan = {name: plan_micro_batches(d, total) for name, d in data.items()}
    baseline = PeftBaseline(model, config.adapters, data, tokenizer.pad_token_id, device,
                            spec["seed"], spec["gradient_checkpointing"])
    return baseline, plan


def work_peft(spec: dict, res: ResultFile) -> None:
    """Variants B and C: the PEFT baseline with the spec's adapters, one after another."""
    out_dir = tempfile.mkdtemp(prefix="mlora-bench-peft-")
    baseline, plan = peft_baseline(spec, res, out_dir)
    device = baseline.device
    res.data["trainable"] = {n: baseline.trainable(n) for n in plan}
    res.data["mem_loaded"] = mem_snapshot(device)
    if spec.get("matmul_tokens"):
        res.data["matmul"] = matmul_rate(spec["matmul_tokens"], spec["shape"]["hidden_size"],
                                         spec["dtype"], device)
    steps: list[dict] = []
    res.data.update(steps=steps, first_loss={})
    res.save()
    if spec.get("barrier"):
        wait_for_go(spec["barrier"], res)
    quiet = Quiet(spec.get("wait_quiet", 0))
    for k in range(spec["warmup"] + spec["steps"]):
        if k >= spec["warmup"]:
            quiet.wait()
            res.data["waited_s"] = quiet.waited
        mark = Mark()
        clock = StepClock(device)   # the engine's own phase clock
        tokens = positions = rows = 0
        for name in plan:
            loss, attention = baseline.train_step(name, plan[name][k], clock.lap)
            res.data["first_loss"].setdefault(name, loss)
            tokens += int(attention.sum())
            positions += attention.numel()
            rows += attention.shape[0]
        steps.append(step_record(k, clock.laps, tokens, positions, rows, mark.since()))
        res.data["mem_last"] = mem_snapshot(device)
        res.save()
    res.data["mem_end"] = mem_snapshot(device)
    shutil.rmtree(out_dir, ignore_errors=True)


WORKERS = {"prepare": work_prepare, "A": work_engine, "P": work_engine, "B": work_peft,
           "C": work_peft}


def worker_main(kind: str, spec_path: str, result_path: str) -> int:
    _die_with_parent()
    spec = json.loads(Path(spec_path).read_text())
    res = ResultFile(result_path)
    res.data.update(variant=kind, pid=os.getpid())
    start = time.perf_counter()
    try:
        if spec.get("threads"):
            torch.set_num_threads(int(spec["threads"]))
        res.data["threads"] = torch.get_num_threads()
        res.data["mem_start"] = mem_snapshot()
        if kind == "P":
            spec = {**spec, "packing": "off"}
        WORKERS[kind](spec, res)
        res.data["ok"] = True
        res.data["partial"] = False
    except BaseException:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        res.data["error"] = traceback.format_exc()
        print(res.data["error"], file=sys.stderr, flush=True)
    res.data["wall_s"] = time.perf_counter() - start
    res.save()
    return 0 if res.data["ok"] else 1


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in WORKERS:
        sys.exit(f"usage: python -m bench.workers {{{','.join(WORKERS)}}} SPEC.json RESULT.json")
    sys.exit(worker_main(*sys.argv[1:]))
