"""``bench.bench``'s parent: runs the series of workers (``bench.workers``, one subprocess
each, with timeouts, dying with the parent) and rewrites the results and the report after
every worker, so a killed run keeps what it had. Never imports torch.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench.measure import MALLOC_ENV, loadavg, log, mem_available_mib
from bench.report import estimate_mib, jobs_at, report
from bench.spec import ENGINE_VARIANTS, SHAPES, VARIANTS, adapter_specs, model_shape

ROOT = Path(__file__).resolve().parents[1]


class Interrupted(Exception):
    """SIGTERM or SIGINT arrived (raised by the parent's signal handler)."""


class Runner:
    """Starts workers and collects their results, within the series' deadline."""

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
        barrier = None
        if kind == "C":
            self.counter += 1
            barrier = self.workdir / f"go-{self.counter}"
        files = [self._write_spec(kind, spec, barrier, budget) for spec in specs]
        t0 = time.monotonic()
        procs = [self._start(kind, base) for base in files]
        timed_out = False
        try:
            if barrier is not None:
                self._release(files, procs, barrier, budget)
            timed_out = self._wait(procs, t0 + budget)
        except Interrupted:
            # SIGTERM/SIGINT: stop the workers, keep what they wrote, end the series.
            self.interrupted = True
            for p in procs:
                _kill_group(p)
                p.wait()
        for p in procs:
            if p in self.live:
                self.live.remove(p)
        results = [self._result(base, p, timed_out, budget, label)
                   for base, p in zip(files, procs)]
        log(f"{label}: {time.monotonic() - t0:.0f} s")
        return results

    def _write_spec(self, kind: str, spec: dict, barrier: Path | None, budget: float) -> Path:
        self.counter += 1
        base = self.workdir / f"w{self.counter:03d}-{kind}"
        if barrier is not None:
            spec["barrier"] = {"ready": str(base) + ".ready", "go": str(barrier),
                               "timeout": budget}
        Path(str(base) + ".spec.json").write_text(json.dumps(spec))
        return base

    def _start(self, kind: str, base: Path) -> subprocess.Popen:
        with open(str(base) + ".log", "w") as logf:
            p = subprocess.Popen([sys.executable, "-m", "bench.workers", kind,
                                  str(base) + ".spec.json", str(base) + ".result.json"],
                                 cwd=ROOT, stdout=logf, stderr=subprocess.STDOUT,
                                 env=self.env(), start_new_session=True)
        self.live.append(p)
        return p

    @staticmethod
    def _release(files: list[Path], procs: list[subprocess.Popen], barrier: Path,
                 budget: float) -> None:
        """Variant C: once every worker is ready (or one has ended), let all of them start."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < budget:
            ready = all(Path(str(b) + ".ready").exists() for b in files)
            if ready or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.05)
        barrier.touch()

    @staticmethod
    def _wait(procs: list[subprocess.Popen], deadline: float) -> bool:
        """Wait for the workers until ``deadline``; kill those still running. True if any was."""
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(p)
                p.wait()
        return timed_out

    def _result(self, base: Path, p: subprocess.Popen, timed_out: bool, budget: float,
                label: str) -> dict:
        try:
            r = json.loads(Path(str(base) + ".result.json").read_text())
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
        return r


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


def write_atomically(path: str, text: str) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, p)


class Series:
    """Every model of ``--model``, every N of ``--n``, every variant; results as they come."""

    def __init__(self, args):
        self.args = args
        self.runner = Runner(args)
        self.ns = sorted({int(n) for n in args.n.split(",")})
        self.models = (list(SHAPES) if args.model == "all"
                       else [m.strip() for m in args.model.split(",")])
        for m in self.models:
            if m not in SHAPES:
                raise SystemExit(f"--model: unknown {m!r}; choose from {', '.join(SHAPES)} or all")
        self.variants = [v for v in VARIANTS if v in args.variants.split(",")]
        self.adapters = adapter_specs(vars(args), self.runner.workdir, max(self.ns))
        self.threads = args.threads or (os.cpu_count() or 1)
        self.results = {"settings": {**vars(args), "ns": self.ns, "variants": self.variants},
                        "models": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                        "threads": self.threads, "loadavg_before": loadavg()}

    def save(self) -> str:
        """Rewrite --json and --out with what is measured so far; the report's text."""
        self.results["elapsed_s"] = time.monotonic() - self.runner.started
        self.results["loadavg_after"] = loadavg()
        if self.args.json:
            write_atomically(self.args.json, json.dumps(self.results, indent=1, default=str))
        try:
            text = report(self.results)
        except Exception:  # noqa: BLE001 - the measurements (--json) matter more
            text = "report failed:\n" + traceback.format_exc()
            log(text)
        if self.args.out:
            write_atomically(self.args.out, text)
        return text

    def on_term(self, signum, frame) -> None:
        self.results["interrupted"] = f"signal {signum}"
        if self.runner.live:
            raise Interrupted()   # Runner.run stops its workers and keeps their results
        raise SystemExit(128 + signum)

    def checkpoint(self) -> None:
        self.save()
        if self.runner.interrupted:
            log("interrupted: the report holds what was measured")
            raise SystemExit(143)

    def run(self) -> dict:
        signal.signal(signal.SIGTERM, self.on_term)
        signal.signal(signal.SIGINT, self.on_term)
        try:
            for name in self.models:
                self.run_model(name)
            text = self.save()
        except SystemExit:
            self.save()
            raise
        finally:
            self.runner.kill_all()
            if not self.args.workdir:
                shutil.rmtree(self.runner.workdir, ignore_errors=True)
        if not self.args.quiet:
            print(text)
        return self.results

    def run_model(self, name: str) -> None:
        args = self.args
        shape = model_shape(name, args.layers)
        tag = f"{name}-L{shape['num_hidden_layers']}-{args.dtype}"
        base = {"model_dir": str(self.runner.cache / tag), "shape": shape, "dtype": args.dtype,
                "device": args.device, "attn_impl": args.attn, "seed": args.seed,
                "cutoff": args.cutoff, "warmup": args.warmup, "steps": args.steps,
                "gradient_checkpointing": args.gradient_checkpointing, "threads": self.threads,
                "rows_per_file": args.rows_per_file, "length_scale": args.length_scale,
                "wait_quiet": args.wait_quiet, "packing": args.packing}
        entry = {"shape": shape, "runs": {}}
        self.results["models"][name] = entry
        log(f"{name}: building the model folder and planning the data ({tag})")
        prep = self.runner.run("prepare", [{**base, "adapters": self.adapters}],
                               f"{name} prepare")[0]
        entry["prepare"] = {k: v for k, v in prep.items()
                            if k not in ("lengths", "targets", "plan")}
        if not prep.get("ok"):
            self.checkpoint()
            return
        entry["data"] = {k: prep[k] for k in ("lengths", "targets", "plan")}
        self.results.setdefault("env", prep.get("env"))
        entry["config"] = prep["config"]
        entry["matmul_tokens"] = self.matmul_tokens(prep)
        self.checkpoint()
        for n in self.ns:
            self.run_n(name, entry, base, n)

    def run_n(self, name: str, entry: dict, base: dict, n: int) -> None:
        """Every round of A, P and B at N adapters (each variant first in turn), then C."""
        run = entry["runs"].setdefault(str(n), {})
        adapters = self.adapters[:n]
        spec = {**base, "adapters": adapters, "matmul_tokens": entry["matmul_tokens"]}
        for rnd in range(self.args.rounds):
            order = [v for v in ("A", "P", "B") if v in self.variants]
            shift = (rnd + self.ns.index(n)) % max(1, len(order))
            for v in order[shift:] + order[:shift]:
                log(f"{name} N={n} {v} (round {rnd + 1}/{self.args.rounds})")
                too_big = self.too_big(entry, adapters, v)
                r = (self.runner.run(v, [dict(spec)], f"{name} N={n} {v}")[0] if not too_big
                     else {"ok": False, "skipped": True, "error": too_big})
                run.setdefault(v, []).append(r)
                self.checkpoint()
        if "C" in self.variants:
            log(f"{name} N={n} C: {n} PEFT processes at once")
            per = max(1, self.threads // n)   # the processes share the cores
            specs = [{**base, "adapters": [a], "threads": per, "matmul_tokens": 0,
                      "wait_quiet": 0} for a in adapters]
            too_big = self.too_big(entry, adapters, "C")
            run["C"] = (self.runner.run("C", specs, f"{name} N={n} C") if not too_big else
                        [{"ok": False, "skipped": True, "error": too_big}] * n)
            self.checkpoint()

    def too_big(self, entry: dict, adapters: list[dict], variant: str) -> str | None:
        """On CPU, why a run would not fit in the machine's available memory (by
        engine.core.memory's estimate, the engine's step taken as one pass); None when it fits."""
        args = self.args
        if args.device != "cpu" or args.no_memory_check:
            return None
        avail = mem_available_mib()
        steps = [jobs_at(entry, adapters, k) for k in range(args.warmup + args.steps)]
        settings = self.results["settings"]
        if variant == "C":
            parts = [estimate_mib(entry, [[jobs[i]] for jobs in steps], settings, "peft")
                     for i in range(len(adapters))]
            est = sum(parts) if all(p is not None for p in parts) else None
        else:
            est = estimate_mib(entry, steps, settings,
                               "engine" if variant in ENGINE_VARIANTS else "peft")
        if est is None or avail is None or est <= 0.85 * avail:
            return None
        return (f"skipped: estimated peak {est / 1024:.1f} GiB > 85% of the memory available "
                f"now ({avail / 1024:.1f} GiB); --no-memory-check runs it anyway")

    def matmul_tokens(self, prep: dict) -> int:
        """Positions of the median batched step at the largest N (rounded up to 64)."""
        args = self.args
        if args.matmul_tokens:
            return args.matmul_tokens
        sizes = []
        for k in range(args.warmup + args.steps):
            lengths = [prep["lengths"][a["name"]][i]
                       for a in self.adapters for i in prep["plan"][a["name"]][k]]
            sizes.append(len(lengths) * max(lengths))
        t = int(statistics.median(sizes))
        return max(64, min(32768, (t + 63) // 64 * 64))
