"""Speed of ``mlora evaluate`` against lm-evaluation-harness's CLI (issue 12), whole processes.

Not a test: a measurement script. On the bundled demo model SmolLM2-135M (fp32, CPU) with
PEFT LoRA adapters (r=8 on q_proj, v_proj, lora_B filled with small random values so the
adapters differ) and a synthetic 4-choice task in ARC's column layout, it times, as a user
runs them:

  (a) ``mlora evaluate --adapter A1 .. --adapter A4 --task arc-e=FILE --json`` (one process);
  (b) lm_eval's CLI once per adapter (``--model hf --model_args pretrained=DIR,peft=Ai,
      dtype=float32`` on a task YAML that includes lm_eval's own arc_easy.yaml and swaps in
      the local file, offline: ``tests/lm_eval_reference.py``), the four wall times summed;

and prints the ratio b / a with both tools' acc and acc_norm per adapter (they must agree);
(a) runs once more at the end, so that the report shows how much the machine's load moved it.
Also: ``mlora evaluate`` with 1, 4 and 8 adapters in one call (how the time grows), each
tool's fixed cost (one item: process start, imports, model load), and in this process
``engine.train.scoring.choice_logliks`` for the compared adapters with and without the
shared-prefix cache on one loaded model.

Every subprocess, ours and lm_eval's alike, starts with the glibc malloc settings of
/work/shared/environment.md and OMP_NUM_THREADS / MKL_NUM_THREADS = --threads (default 2);
this process re-executes itself with them when they are unset and also sets torch's threads.

    .venv/bin/python -m bench.evaluate_speed --out /tmp/eval_speed.json
    .venv/bin/python -m bench.evaluate_speed --smoke      # tiny sizes, about a minute
"""

from __future__ import annotations

import os
import sys

from bench.measure import MALLOC_ENV

_REEXEC_MARK = "MLORA_BENCH_EVAL_REEXEC"


def _threads_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
    return "2"


def _ensure_env() -> None:
    """Re-exec with MALLOC_ENV and the thread counts in the environment, so that this
    process and every subprocess it starts (which inherit it) run alike."""
    threads = _threads_arg(sys.argv[1:])
    want = dict(MALLOC_ENV, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    if all(os.environ.get(k) == v for k, v in want.items()):
        return
    if os.environ.get(_REEXEC_MARK):  # pragma: no cover - the exec lost them; do not loop
        raise SystemExit("could not set the malloc/thread environment by re-exec")
    env = dict(os.environ, **want)
    env[_REEXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", __spec__.name, *sys.argv[1:]], env)


if __name__ == "__main__":
    _ensure_env()

# ruff: noqa: E402  (the re-exec above must happen before torch is imported)
import argparse
import json
import platform
import random
import resource
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MLORA = ROOT / ".venv" / "bin" / "mlora"
if str(ROOT) not in sys.path:  # tests.lm_eval_reference is imported from the repository
    sys.path.insert(0, str(ROOT))


def log(message: str) -> None:
    print(f"[evaluate_speed {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# --------------------------------------------------------------------------------------
# Setup: the task file and the adapters
# --------------------------------------------------------------------------------------

_LEADS = [
    "", "", "",
    "A student is studying {topic} in science class.",
    "During a field trip, a class observes {topic}.",
    "Mr. Lee asks his students to think about {topic}.",
    "A group of scientists wants to learn more about {topic} over several years.",
    "While reading a book about {topic}, Maria finds a question she cannot answer at first.",
]
_TOPICS = ["the water cycle", "plant growth", "weather patterns", "magnets", "the solar system",
           "food chains", "rocks and minerals", "sound waves", "electric circuits", "erosion",
           "animal habitats", "the human body", "states of matter", "light and shadows",
           "simple machines", "fossils", "the moon's phases", "ocean tides", "recycling"]
_QUESTIONS = [
    "Which of these is most likely to happen when {event}?",
    "What is the main reason that {event}?",
    "Which tool would be best for measuring how {quantity} changes?",
    "Which statement best explains why {event}?",
    "What would most likely happen to {thing} if {event}?",
    "Which of the following is an example of {concept}?",
    "Which property of {thing} can be observed without any tools?",
    "Why do scientists repeat an experiment about {thing} many times?",
]
_EVENTS = ["ice is left out in the sun", "a plant is kept in a dark closet",
           "warm air rises over the ocean", "a magnet is brought near an iron nail",
           "the Earth rotates on its axis", "a river flows quickly down a steep hill",
           "a light is shone through a glass prism", "salt is stirred into warm water",
           "a ball is dropped from the top of a tall building",
           "leaves fall from the trees in autumn", "a battery runs out of energy",
           "the temperature drops below freezing at night"]
_QUANTITIES = ["the temperature of a cup of water", "the length of a shadow", "the mass of a rock",
               "the height of a bean plant", "the speed of a toy car", "the volume of a liquid"]
_THINGS = ["a puddle", "a seed", "a rabbit population", "a metal spoon", "a rubber band",
           "a sample of sand", "a glass of milk", "an oak tree", "a small pond", "a candle"]
_CONCEPTS = ["a physical change", "a chemical change", "a renewable resource", "an inherited trait",
             "a learned behavior", "condensation", "friction", "pollination", "camouflage"]
_ANSWERS = [
    "evaporation", "condensation", "a thermometer", "a ruler", "a balance", "a stopwatch",
    "It melts into water.", "It grows toward the light.", "It stays the same.",
    "The plant turns yellow and stops growing.", "The nail is pulled toward the magnet.",
    "gravity", "friction", "sunlight", "the wind", "to make sure the results are reliable",
    "because heat energy moves from warmer objects to cooler objects",
    "Its color", "Its shape", "Its mass", "rusting iron", "melting butter", "burning wood",
    "a bird building a nest", "a dog learning to sit", "eye color",
    "The water level in the pond goes down.", "more rabbits survive the winter",
    "The shadow gets shorter at noon.", "solar energy", "coal", "day and night",
    "the seasons", "the tides", "It sinks to the bottom.", "It floats on the surface.",
]


def make_task(path: Path, n_items: int, seed: int = 0) -> None:
    """``n_items`` rows of ARC's layout (question, choices {text, label}, answerKey), JSONL."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as fh:
        for i in range(n_items):
            lead = rng.choice(_LEADS).format(topic=rng.choice(_TOPICS))
            q = rng.choice(_QUESTIONS).format(event=rng.choice(_EVENTS),
                                              quantity=rng.choice(_QUANTITIES),
                                              thing=rng.choice(_THINGS),
                                              concept=rng.choice(_CONCEPTS))
            question = f"{lead} {q}".strip()
            texts = rng.sample(_ANSWERS, 4)
            labels = ["1", "2", "3", "4"] if rng.random() < 0.05 else ["A", "B", "C", "D"]
            row = {"id": f"synth-{i}", "question": question,
                   "choices": {"text": texts, "label": labels},
                   "answerKey": labels[rng.randrange(4)]}
            fh.write(json.dumps(row) + "\n")


def make_adapters(model_dir: Path, out_dir: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` PEFT LoRA adapters (r=8, q_proj and v_proj) saved with save_pretrained."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"],
                                                  task_type="CAUSAL_LM"))
    folders = []
    gen = torch.Generator().manual_seed(seed)
    for k in range(n):
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
        folder = out_dir / f"A{k + 1}"
        peft_model.save_pretrained(str(folder))
        folders.append(folder)
    del peft_model, model
    return folders


# --------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------

def run_mlora(adapters: list[Path], task_file: Path, limit: int | None = None) -> dict:
    cmd = [str(MLORA), "evaluate"]
    for a in adapters:
        cmd += ["--adapter", str(a)]
    cmd += ["--task", f"arc-e={task_file}", "--dtype", "fp32", "--json"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    load0, cpu0 = loadavg(), children_cpu()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=task_file.parent)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mlora evaluate exited {proc.returncode}: {' '.join(cmd)}\n"
                         f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    doc = json.loads(proc.stdout)
    accs = {row: {m: v.get(m) for m in ("acc", "acc_norm")}
            for row, tasks in doc["results"].items() for v in [tasks["arc-e"]]}
    return {"wall_s": wall, "cpu_s": children_cpu() - cpu0, "load_before": load0,
            "load_after": loadavg(), "n_adapters": len(adapters), "acc": accs,
            "command": cmd}


def run_lm_eval_one(model_dir: Path, adapter: Path, task_file: Path, work: Path,
                    batch_size: int, limit: int | None = None) -> dict:
    """One lm_eval CLI run. Every run shares ``work`` (its HF_HOME and datasets cache, as a
    user's ~/.cache): the fixed-cost run goes first and builds the datasets cache of the task
    file, so the timed runs do not pay for it; each run reads its own newest results."""
    from tests.lm_eval_reference import run_lm_eval  # reused, not copied (see its docstring)
    load0, cpu0 = loadavg(), children_cpu()
    r = run_lm_eval(model_dir, "arc_easy", task_file, work, adapter_dir=adapter,
                    limit=limit, batch_size=batch_size)
    return {"wall_s": r["wall_s"], "cpu_s": children_cpu() - cpu0, "load_before": load0,
            "load_after": loadavg(), "acc": {"acc": r["acc"], "acc_norm": r["acc_norm"]},
            "command": r["command"]}


def in_process_prefix(adapters: list[Path], task_file: Path, threads: int,
                      batch_size: int) -> dict:
    import torch
    from engine.core.eval_tasks import load_task, parse_task_arg
    from engine.train.adapter_set import load_adapter_set
    from engine.train.scoring import choice_logliks

    torch.set_num_threads(threads)
    items = load_task(parse_task_arg(f"arc-e={task_file}"))
    aset = load_adapter_set([str(a) for a in adapters], dtype="fp32")
    requests = [item.requests for item in items]
    out = {}
    for share in (True, False):
        start = time.perf_counter()
        cpu0 = time.process_time()
        scores = choice_logliks(aset, requests, batch_size=batch_size, share_prefix=share)
        out["shared" if share else "unshared"] = {
            "seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu0}
        out.setdefault("_scores", []).append(scores)
    a, b = out.pop("_scores")
    out["max_abs_diff"] = max(abs(x[0] - y[0]) for k in a for ia, ib in zip(a[k], b[k])
                              for x, y in zip(ia, ib))
    out["n_adapters"] = len(adapters)
    out["batch_size"] = batch_size
    return out


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------

def _acc(d: dict | None, m: str) -> str:
    v = (d or {}).get(m)
    return "-" if v is None else f"{v:.3f}"


def markdown(res: dict) -> str:
    n_cmp = res["n_compare"]
    a, b = res["mlora_compare"], res["lm_eval"]
    b_total = sum(x["wall_s"] for x in b)
    lines = [
        f"{res['items']} items of a synthetic 4-choice ARC-layout task, SmolLM2-135M fp32 on CPU, "
        f"PEFT LoRA adapters r=8 (q_proj, v_proj), {res['threads']} torch threads, malloc "
        f"settings of environment.md in every process.",
        "",
        "| run | wall s | CPU s (children) | load avg before/after |",
        "|---|---:|---:|---:|",
        f"| (a) `mlora evaluate`, {n_cmp} adapters in one call | {a['wall_s']:.1f} | "
        f"{a['cpu_s']:.1f} | {a['load_before']:.1f}/{a['load_after']:.1f} |",
    ]
    a2 = res.get("mlora_compare_again")
    if a2:
        lines.append(f"| (a) again, after all the runs below | {a2['wall_s']:.1f} | "
                     f"{a2['cpu_s']:.1f} | {a2['load_before']:.1f}/{a2['load_after']:.1f} |")
    for i, x in enumerate(b):
        lines.append(f"| (b) lm_eval CLI, adapter A{i + 1} (batch {res['lm_eval_batch_size']}) | "
                     f"{x['wall_s']:.1f} | {x['cpu_s']:.1f} | "
                     f"{x['load_before']:.1f}/{x['load_after']:.1f} |")
    lines.append(f"| (b) lm_eval CLI, {n_cmp} runs in all | {b_total:.1f} | "
                 f"{sum(x['cpu_s'] for x in b):.1f} | |")
    fixed = res.get("fixed")
    if fixed:
        lines.append(f"| fixed cost: `mlora evaluate`, 1 adapter, `--limit 1` | "
                     f"{fixed['mlora']['wall_s']:.1f} | {fixed['mlora']['cpu_s']:.1f} | |")
        lines.append(f"| fixed cost: lm_eval CLI, 1 adapter, `--limit 1` | "
                     f"{fixed['lm_eval']['wall_s']:.1f} | {fixed['lm_eval']['cpu_s']:.1f} | |")
    lines += ["", f"**Ratio b / a (wall): {b_total / a['wall_s']:.2f}x** (target: at least 3x); "
              f"CPU seconds: {sum(x['cpu_s'] for x in b) / a['cpu_s']:.2f}x."
              + (f" Against (a) run again: {b_total / a2['wall_s']:.2f}x wall, "
                 f"{sum(x['cpu_s'] for x in b) / a2['cpu_s']:.2f}x CPU." if a2 else ""), "",
              "Agreement (acc / acc_norm):", "",
              "| adapter | mlora acc | lm_eval acc | mlora acc_norm | lm_eval acc_norm |",
              "|---|---:|---:|---:|---:|"]
    for i, x in enumerate(b):
        name = f"A{i + 1}"
        mine = a["acc"].get(name)
        lines.append(f"| {name} | {_acc(mine, 'acc')} | {_acc(x['acc'], 'acc')} | "
                     f"{_acc(mine, 'acc_norm')} | {_acc(x['acc'], 'acc_norm')} |")
    lines += ["", "Scaling, `mlora evaluate` with N adapters in one call:", "",
              "| N adapters | wall s | s per adapter | CPU s | load avg before/after |",
              "|---:|---:|---:|---:|---:|"]
    for x in res["scaling"]:
        lines.append(f"| {x['n_adapters']} | {x['wall_s']:.1f} | "
                     f"{x['wall_s'] / x['n_adapters']:.1f} | {x['cpu_s']:.1f} | "
                     f"{x['load_before']:.1f}/{x['load_after']:.1f} |")
    lines += ["", "Shared by the adapters of one call: the process start and imports, the base "
              "model's load (once), reading and tokenizing the task, and each forward pass's "
              "batching (all adapters' rows in one pass through the base linear layers). Not "
              "shared on a CPU: each adapter's rows cost their own pass through the base, so the "
              "scoring compute grows about linearly with N. Within an adapter, each item's context "
              "prefix is computed once and its KV cache reused for the 4 choices."]
    p = res.get("prefix")
    if p:
        lines += ["", f"In process, `choice_logliks`, {p['n_adapters']} adapters, one loaded "
                  f"model, batch {p['batch_size']}:", "",
                  "| share_prefix | seconds | CPU s |", "|---|---:|---:|",
                  f"| True (prefix once per adapter and item) | {p['shared']['seconds']:.1f} | "
                  f"{p['shared']['cpu_s']:.1f} |",
                  f"| False (every choice's whole sequence) | {p['unshared']['seconds']:.1f} | "
                  f"{p['unshared']['cpu_s']:.1f} |", "",
                  f"Prefix cache gain: {p['unshared']['seconds'] / p['shared']['seconds']:.2f}x; "
                  f"largest loglik difference between the two: {p['max_abs_diff']:.2e}."]
    return "\n".join(lines)


def measure(res: dict, args, model_dir: Path, adapters: list, task_file: Path, lm_work: Path,
            n_cmp: int, counts: list[int]) -> None:
    """The timed runs, in order, into ``res``: fixed costs, (a), (b), scaling, (a) again,
    and the in-process prefix comparison."""
    # First (it also warms lm_eval's datasets cache of the task file for the timed runs).
    log("fixed costs (--limit 1): lm_eval CLI, then mlora evaluate")
    fixed = {"lm_eval": run_lm_eval_one(model_dir, adapters[0], task_file, lm_work,
                                        args.lm_eval_batch_size, limit=1)}
    fixed["mlora"] = run_mlora(adapters[:1], task_file, limit=1)
    if not args.no_fixed:
        res["fixed"] = fixed
    log(f"(a) mlora evaluate, {n_cmp} adapters")
    res["mlora_compare"] = run_mlora(adapters[:n_cmp], task_file)
    log(f"    {res['mlora_compare']['wall_s']:.1f} s")
    res["lm_eval"] = []
    for i, adapter in enumerate(adapters[:n_cmp]):
        log(f"(b) lm_eval CLI, adapter {adapter.name}")
        res["lm_eval"].append(run_lm_eval_one(model_dir, adapter, task_file,
                                              lm_work,
                                              args.lm_eval_batch_size))
        log(f"    {res['lm_eval'][-1]['wall_s']:.1f} s")
    res["scaling"] = []
    for n in counts:
        if n == n_cmp:
            res["scaling"].append(res["mlora_compare"])
            continue
        log(f"scaling: mlora evaluate, {n} adapters")
        res["scaling"].append(run_mlora(adapters[:n], task_file))
        log(f"    {res['scaling'][-1]['wall_s']:.1f} s")
    log(f"(a) again, after the others: mlora evaluate, {n_cmp} adapters (the noise)")
    res["mlora_compare_again"] = run_mlora(adapters[:n_cmp], task_file)
    log(f"    {res['mlora_compare_again']['wall_s']:.1f} s")
    if not args.no_prefix:
        log(f"in process: choice_logliks, {n_cmp} adapters, share_prefix True / False")
        res["prefix"] = in_process_prefix(adapters[:n_cmp], task_file, args.threads,
                                          args.batch_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--adapters-max", type=int, default=8,
                    help="most adapters in the scaling runs (1, 4, 8 capped by this)")
    ap.add_argument("--compare", type=int, default=4, help="adapters in the (a)/(b) comparison")
    ap.add_argument("--lm-eval-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=64,
                    help="choice_logliks batch in the in-process prefix comparison "
                         "(mlora evaluate's default)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script")
    ap.add_argument("--no-prefix", action="store_true", help="skip the in-process comparison")
    ap.add_argument("--no-fixed", action="store_true",
                    help="leave the --limit 1 fixed-cost runs out of the report (they still run "
                         "first, warming lm_eval's datasets cache)")
    ap.add_argument("--work-dir", type=Path, help="keep the files here (default: a temp dir)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args(argv)
    if args.smoke:
        args.items, args.adapters_max, args.compare = 6, 2, 2
    n_cmp = min(args.compare, args.adapters_max)
    counts = sorted({n for n in (1, 4, 8) if n <= args.adapters_max} | {n_cmp, args.adapters_max})

    import torch
    torch.set_num_threads(args.threads)
    from engine.train.models import resolve_base_model

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="mlora_eval_speed_"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work dir {work}; load average {loadavg():.2f}")
    model_dir = resolve_base_model("smollm2-135m", log=log)
    task_file = work / "arc_synth.jsonl"
    make_task(task_file, args.items)
    adapters = make_adapters(model_dir, work / "adapters", args.adapters_max)
    log(f"{args.items} items, {len(adapters)} adapters in {work}")

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = "?"
    res: dict = {"date": time.strftime("%Y-%m-%d"), "commit": commit,
                 "machine": f"{platform.processor() or platform.machine()}, "
                            f"{os.cpu_count()} CPUs",
                 "python": platform.python_version(), "torch": torch.__version__,
                 "items": args.items, "threads": args.threads, "n_compare": n_cmp,
                 "lm_eval_batch_size": args.lm_eval_batch_size,
                 "command": " ".join([".venv/bin/python -m bench.evaluate_speed",
                                      *(argv if argv is not None else sys.argv[1:])]),
                 "env": {k: os.environ.get(k) for k in
                         [*MALLOC_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"]}}

    measure(res, args, model_dir, adapters, task_file, work / "lm_eval", n_cmp, counts)
    res["load_end"] = loadavg()

    text = markdown(res)
    print(f"Date {res['date']}, commit {commit}, {res['machine']}, Python {res['python']}, "
          f"torch {res['torch']}; load average at the end {res['load_end']:.2f}")
    print(f"Command: {res['command']}\n")
    print(text)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
        log(f"wrote {args.out}")
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
