"""Operators dispatched by one training step: this engine against PEFT. A measurement
script, not a test.

On a GPU every operator is at least one kernel launch, each costing the host some
microseconds of Python, dispatch and launch whatever its size; a step of small kernels is
bound by their number, not by the GPU's arithmetic. This script counts them on the CPU (the
count does not depend on the device or on the model's width), for TinyLlama-1.1B's
structure (22 layers, 32 / 4 heads, gated MLP, untied head) at width 64, N adapters of
ranks 8/16 on q, k, v, o with dropout 0.05, ``--rows`` rows of ``--length`` tokens per
adapter and step:

  A  the engine, one batched step (``[train] packing = "on"``: one packed pass);
  P  the engine with padded rows (``packing = "off"``), its passes planned as on CUDA
     (``--pass-overhead``);
  B  PEFT, one adapter after another (``set_adapter``, forward with ``labels=``,
     backward, AdamW step, ``zero_grad``), N optimizer steps.

Counted: every ATen operator of the forward and backward passes that reaches a kernel
(``TorchDispatchMode``, after autograd, so the backward's operators too), views and other
metadata-only operators left out, and the optimizer's left out (device-dependent: torch's
AdamW is a few multi-tensor kernels on a GPU, a loop over the tensors on a CPU).
Dividing a GPU run's measured step time by the count gives the host's time per operator.

    .venv/bin/python -m bench.op_count --n 1,4
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from collections import Counter
from pathlib import Path

from torch.utils._python_dispatch import TorchDispatchMode

from bench.baseline import PeftBaseline
from bench.fixtures import build_tiny_model
from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.train.engine import Engine
from engine.train.models import load_base_model

SHAPE = dict(hidden_size=64, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, head_dim=2, intermediate_size=176,
             tie_word_embeddings=False)
# Operators that only make views or read metadata: no kernel on a GPU.
METADATA = {"view", "_unsafe_view", "as_strided", "t", "transpose", "permute", "expand",
            "unsqueeze", "squeeze", "reshape", "slice", "select", "split",
            "split_with_sizes", "narrow", "alias", "detach", "unbind", "view_as_real",
            "_reshape_alias", "lift_fresh", "resolve_conj", "resolve_neg", "chunk",
            "is_nonzero", "sym_size", "sym_stride", "sym_numel", "empty", "empty_strided",
            "empty_like", "_local_scalar_dense", "set_", "result_type"}


class Count(TorchDispatchMode):
    """Counts operators while active and not ``paused`` (the optimizer's are left out:
    they depend on the device, torch's AdamW runs as a few multi-tensor kernels on a GPU
    and as a loop over tensors on a CPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and name not in METADATA and not getattr(func, "is_view", False):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _uncounted(counter: Count, fn):
    def call(*args, **kwargs):
        counter.paused = True
        try:
            return fn(*args, **kwargs)
        finally:
            counter.paused = False
    return call


def _data(folder: Path, n: int, rows: int, length: int) -> list[str]:
    words = "red green blue cat dog fox jumps over the lazy quick brown".split()
    files = []
    for i in range(n):
        rng = random.Random(i)
        lines = []
        for _ in range(rows * 4):
            k = max(4, int(rng.gauss(length / 3, length / 8)))
            lines.append(json.dumps({"instruction": " ".join(rng.choices(words, k=k // 3)),
                                     "output": " ".join(rng.choices(words, k=k))}))
        path = folder / f"a{i}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files.append(str(path))
    return files


def _adapters(files: list[str], rows: int) -> list[AdapterConfig]:
    return [AdapterConfig(name=f"a{i}", data=f, prompt="alpaca_short", r=8 if i % 2 == 0 else 16,
                          lora_alpha=16 if i % 2 == 0 else 32, lora_dropout=0.05,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                          batch_size=rows, micro_batch_size=rows, num_epochs=4)
            for i, f in enumerate(files)]


def count_engine(model_dir: Path, files: list[str], rows: int, packing: str,
                 out: Path, pass_overhead: int) -> tuple[int, Counter, int]:
    config = RunConfig(model=ModelConfig(base_model=str(model_dir), attn_impl="sdpa"),
                       train=TrainConfig(output_dir=str(out), cutoff_len=256, save_step=10**9,
                                         train_lora_simultaneously_num=64, packing=packing),
                       adapters=_adapters(files, rows))
    passes = []
    engine = Engine(config, write_metrics=False,
                    on_event=lambda e: passes.append(e["passes"]) if e["type"] == "batch"
                    else None)
    engine.pass_overhead = pass_overhead   # padded rows: passes as the device plans them
    jobs = list(engine.jobs.values())
    for job in jobs:
        job.state = "running"
    engine.step(jobs)                  # warm-up: first-call work stays out of the count
    counter = Count()
    for job in jobs:                   # the optimizer (clipping, AdamW) is not counted
        job.optimizer_step = _uncounted(counter, job.optimizer_step)
        job.grad_norm = _uncounted(counter, job.grad_norm)
    with counter:
        engine.step(jobs)
    return sum(counter.ops.values()), counter.ops, passes[-1]


def count_peft(model_dir: Path, files: list[str], rows: int, out: Path) -> tuple[int, Counter]:
    config = RunConfig(model=ModelConfig(base_model=str(model_dir), attn_impl="sdpa"),
                       train=TrainConfig(output_dir=str(out), cutoff_len=256),
                       adapters=_adapters(files, rows))
    engine = Engine(config, write_metrics=False)   # for its tokenised data only
    model, tokenizer, _info = load_base_model(config.model, engine.device)
    data = {name: job.data for name, job in engine.jobs.items()}
    baseline = PeftBaseline(model, config.adapters, data, tokenizer.pad_token_id,
                            engine.device, config.train.seed)
    counter = Count()

    def step():
        for name in data:
            baseline.loss(baseline.batch(name, list(range(rows)))).backward()
            _uncounted(counter, baseline.optimizer_step)(name)
    step()
    with counter:
        step()
    return sum(counter.ops.values()), counter.ops


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.op_count", description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", default="1,4", help="numbers of adapters")
    parser.add_argument("--rows", type=int, default=4, help="rows per adapter and step")
    parser.add_argument("--length", type=int, default=160, help="mean tokens per row")
    parser.add_argument("--top", type=int, default=8, help="most frequent operators listed")
    parser.add_argument("--pass-overhead", type=int, default=1024,
                        help="the engine's pass cost for padded rows (1024: CUDA's, as in "
                             "engine.train.planning.PASS_OVERHEAD_TOKENS; 16: a CPU's)")
    parser.add_argument("--variants", default="A,P,B", help="subset of A,P,B")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlora-opcount-"))
    model_dir = build_tiny_model("llama", work / "model", **SHAPE)
    print("| N | variant | passes | forward + backward operators per step | per adapter | "
          "most frequent |")
    print("|---:|---|---:|---:|---:|---|")
    for n in [int(x) for x in args.n.split(",")]:
        files = _data(work, n, args.rows, args.length)
        rows = []
        for variant, packing in (("A, packed", "on"), ("P, padded rows", "off")):
            if variant[0] in args.variants.split(","):
                total, ops, passes = count_engine(model_dir, files, args.rows, packing,
                                                  work / f"{variant[0]}{n}", args.pass_overhead)
                rows.append((variant, passes, total, ops))
        if "B" in args.variants.split(","):
            total, ops = count_peft(model_dir, files, args.rows, work / f"B{n}")
            rows.append(("B, PEFT", n, total, ops))
        for variant, passes, total, ops in rows:
            top = ", ".join(f"{name} {count}" for name, count in ops.most_common(args.top))
            print(f"| {n} | {variant} | {passes} | {total:,} | {total / n:,.0f} | {top} |")


if __name__ == "__main__":
    main()
