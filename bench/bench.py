"""Throughput, step time, peak memory and FLOP utilisation: this engine against PEFT.

Not a test: a measurement script. For each model shape (random weights from a config;
speed does not depend on the weights) and each number of adapters N it runs, each variant
in its own fresh subprocess (so every peak is that variant's alone):

  A  this engine: N adapters in one batched ``Engine.step`` per step (``Engine.run``,
     ``write_metrics=False``); step time and its breakdown from the engine's ``batch``
     events;
  B  PEFT (``bench.baseline``): one ``get_peft_model`` model on the same base holding the
     same N adapters, trained one after another with a plain PyTorch loop (``set_adapter``,
     forward with ``labels=``, backward, the engine job's optimizer step); one B step is
     one optimizer step of every adapter, the same rows as A's step;
  C  N separate PEFT processes at once, one adapter each, started together: the sum of
     their peak memory, and their aggregate tokens/s.

All variants read the same synthetic Alpaca rows (a jsonl per adapter, fixed seed, varied
lengths) through the engine's own data pipeline, so step k is the same micro-batch of the
same encoded rows everywhere. Reported per variant: tokens/s, step time (median,
p10-p90), the phase breakdown, padding, peak memory (CPU: the process's VmHWM; CUDA:
``torch.cuda.max_memory_allocated``) beside ``engine.core.memory``'s estimate, and model FLOP utilisation against a matmul rate measured in the same workers.
BENCHMARKS.md ("Engine vs PEFT by model and number of adapters") has the method and
the formulas.

From the repository root:

    .venv/bin/python -m bench.bench --model tiny --n 1,2 --steps 3 --out /tmp/b.md
    python -m bench.bench --model tinyllama --device cuda --dtype bf16 --n 1,4,8

Modules: ``bench.series`` runs the workers (``bench.workers``, one subprocess each; this
parent never imports torch), ``bench.report`` renders the results, ``bench.flops`` counts
FLOPs. Every worker has a timeout and dies with its parent; results and the report are
rewritten after every worker, so a killed run keeps what it had.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench.report import report
from bench.series import Series, write_atomically
from bench.spec import VARIANTS


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.bench", description=__doc__.split("\n\n")[0],
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.report_from:
        text = report(json.loads(Path(args.report_from).read_text()))
        if args.out:
            write_atomically(args.out, text)
        print(text)
        return 0
    if args.steps < 1 or args.warmup < 0 or args.rows < 1 or args.rounds < 1:
        p.error("--steps, --rows and --rounds must be >= 1, --warmup >= 0")
    if args.wait_quiet is None:
        args.wait_quiet = 30.0 if args.device == "cpu" else 0.0
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        p.error(f"--variants: unknown {bad}; choose from A,P,B,C")
    Series(args).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
