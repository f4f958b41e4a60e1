"""``bench.bench``'s markdown report, from the results JSON alone (``--report-from``
renders an earlier run's): per model, a table of step times, throughput and MFU per N and
variant, a table of peak memory against ``engine.core.memory``'s estimate, and notes."""

from __future__ import annotations

import statistics
from pathlib import Path

from bench.flops import lora_params, shape_of, step_flops
from bench.measure import DISTURBED_CORES, quantile
from bench.spec import ENGINE_VARIANTS, adapter_specs

PHASES = ("data", "forward", "backward", "optimizer")


# -- measurements to numbers ----------------------------------------------------------


def jobs_at(entry: dict, adapters: list[dict], k: int) -> list[dict]:
    """Each adapter's micro-batch of step ``k``: row lengths, target counts, LoRA size."""
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


def estimate_mib(model_entry: dict, jobs_by_step: list[list[dict]], settings: dict,
                 implementation: str, passes_by_step: list | None = None) -> float | None:
    """engine.core.memory's estimate (MiB), the max over the steps run; None if it fails.

    ``passes_by_step[k]``: the engine's passes of step k as recorded (adapter names per
    pass), so the estimate sees the same grouping.
    """
    from engine.core.memory import JobLoad, estimate_peak_bytes

    best = None
    for k, jobs in enumerate(jobs_by_step):
        loads = [JobLoad(rows=len(j["lengths"]), seq_len=max(j["lengths"]), r=j["r"],
                         target_modules=j["targets_modules"], target_tokens=sum(j["targets"]),
                         lora_dropout=settings["dropout"], tokens=sum(j["lengths"]))
                 for j in jobs]
        extra = {}
        if passes_by_step and k < len(passes_by_step) and passes_by_step[k]:
            if any(ps.get("packed") for ps in passes_by_step[k]):
                extra["packed"] = True
            index = {j["name"]: i for i, j in enumerate(jobs)}
            extra["passes"] = [[index[name] for name, _b, _e in ps["segments"] if name in index]
                               for ps in passes_by_step[k]]
        try:
            value = estimate_peak_bytes(model_entry["config"], loads, dtype=settings["dtype"],
                                        device=settings["device"],
                                        gradient_checkpointing=settings["gradient_checkpointing"],
                                        attn_impl=settings["attn"],
                                        implementation=implementation, **extra)
        except Exception:  # noqa: BLE001 - an estimate must not break the report
            return None
        best = value if best is None else max(best, value)
    return None if best is None else best / 2**20


def _peak_mib(r: dict, device: str) -> float | None:
    mem = r.get("mem_end") or r.get("mem_last") or r.get("mem_loaded") or {}
    if device == "cuda":
        return mem.get("cuda_peak_mib")
    return mem.get("hwm_mib") or mem.get("maxrss_mib")


def _calm(x: dict) -> bool:
    return x.get("others") is None or x["others"] <= DISTURBED_CORES


def _timing(samples: list[dict]) -> dict:
    """Step time, its phases, tokens and disturbance over pooled measured steps."""
    times = [x["total"] for x in samples]
    others = [x["others"] for x in samples if x.get("others") is not None]
    quiet = [x["total"] for x in samples if _calm(x)]
    out = {"steps": len(samples), "median": statistics.median(times),
           "p10": quantile(times, 0.1), "p90": quantile(times, 0.9),
           "phases": {p: statistics.median(x["seconds"].get(p, 0.0) for x in samples)
                      for p in PHASES},
           "tokens_per_s": statistics.median(x["tokens"] / x["total"] for x in samples),
           "tokens_per_step": statistics.median(x["tokens"] for x in samples),
           "disturbed": sum(1 for o in others if o > DISTURBED_CORES),
           "others_median": statistics.median(others) if others else None,
           "median_quiet": statistics.median(quiet) if quiet else None,
           "by_k": {}, "calm_by_k": {}}
    for x in samples:
        out["by_k"].setdefault(x["k"], []).append(x["total"])
        if _calm(x):
            out["calm_by_k"].setdefault(x["k"], []).append(x["total"])
    return out


def _flops(entry: dict, samples: list[dict], variant: str, adapters: list[dict],
           rate: float | None) -> dict:
    """Padding, passes and model FLOP utilisation of the pooled measured steps."""
    shape = shape_of(entry["config"])
    flops = {}
    for x in samples:   # the same k in several rounds: the same rows (and passes)
        flops[x["k"]] = step_flops(shape, jobs_at(entry, adapters, x["k"]), variant,
                                   x.get("passes"))
    passes = [len(x["passes"]) for x in samples if x.get("passes")]
    out = {"passes": statistics.median(passes) if passes else None,
           "packed": any(ps.get("packed") for x in samples for ps in x.get("passes") or []),
           "padding": 1 - sum(x["tokens"] for x in samples) / max(1, sum(
               flops[x["k"]]["positions"] for x in samples)),
           "token_mismatch": [x["k"] for x in samples if x["tokens"] != flops[x["k"]]["tokens"]]}
    for kind in ("useful", "executed"):
        out[f"flops_{kind}"] = statistics.median(flops[x["k"]][kind] for x in samples)
        if rate:
            out[f"mfu_{kind}"] = statistics.median(flops[x["k"]][kind] / x["total"] / rate
                                                   for x in samples)
    return out


def _memory(runs: list[dict], device: str) -> dict:
    peaks = [p for p in (_peak_mib(r, device) for r in runs) if p is not None]
    key = "cuda_alloc_mib" if device == "cuda" else "rss_mib"
    loaded = [(r.get("mem_loaded") or {}).get(key) for r in runs]
    loaded = [v for v in loaded if v is not None]
    starts = [(r.get("mem_start") or {}).get("rss_mib") for r in runs]
    starts = [v for v in starts if v is not None]
    return {"peak_mib": max(peaks) if peaks else None,
            "loaded_mib": max(loaded) if loaded else None,
            "start_rss_mib": min(starts) if starts else None}


def summarise(entry: dict, runs: list[dict], variant: str, adapters: list[dict],
              s: dict, rate: float | None) -> dict | None:
    """Pooled measured steps of one variant's runs (rounds) at one N."""
    samples = [st for r in runs for st in r.get("steps", []) if st["k"] >= s["warmup"]]
    if not samples:
        return None
    return {**_timing(samples), **_flops(entry, samples, variant, adapters, rate),
            **_memory(runs, s["device"]),
            "waited_s": sum(r.get("waited_s", 0.0) for r in runs),
            "first_loss": runs[0].get("first_loss", {}),
            "trainable": runs[0].get("trainable", {}),
            "errors": [r.get("error") for r in runs if r.get("error")]}


def summarise_c(procs: list[dict], s: dict) -> dict:
    """Variant C: the sum of the processes' peaks and their aggregate tokens/s."""
    out = {"procs": len(procs), "ok": sum(1 for p in procs if p.get("ok"))}
    peaks = [_peak_mib(p, s["device"]) for p in procs]
    out["peaks"] = peaks
    out["sum_peak_mib"] = sum(p for p in peaks if p is not None) if all(
        p is not None for p in peaks) else None
    windows, tokens = [], 0
    for p in procs:
        measured = [st for st in p.get("steps", []) if st["k"] >= s["warmup"]]
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


# -- formatting -----------------------------------------------------------------------


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


def _fmt_mib(v: float | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1024:.2f} GiB" if v >= 1024 else f"{v:.0f} MiB"


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


# -- the report -----------------------------------------------------------------------


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
    if "config" not in entry:
        error = entry.get("prepare", {}).get("error")
        return lines + [f"Preparation failed: {_short(error) or '?'}", ""]
    rates = [r["matmul"]["max"] for run in entry["runs"].values()
             for v in ("A", "P", "B") for r in run.get(v, []) if r.get("matmul")]
    rate = max(rates) if rates else None
    lines += _model_lines(entry, s, rates)
    lines += ["", "| N | Variant | One step is | Tokens / step | Padding | Step (s): median "
              "(p10–p90) | Undisturbed steps: median (s), count | Forward / backward / "
              "optimizer (s) | Tokens/s | Speed vs B, paired: all (undisturbed) | MFU useful | "
              "MFU executed |", "|---:|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    mem_rows, notes = [], []
    adapters_all = adapter_specs(s, Path("/"), max(s["ns"]))  # data paths unread
    for n_str, run in entry["runs"].items():
        n = int(n_str)
        adapters = adapters_all[:n]
        summ = {v: summarise(entry, run[v], v, adapters, s, rate) for v in ("A", "P", "B")
                if run.get(v)}
        lines += _step_rows(n, run, summ, notes)
        c = summarise_c(run["C"], s) if run.get("C") else None
        mem_rows.append(_memory_row(entry, run, summ, c, adapters, s))
        notes += _comparison_notes(n, summ, c)
    unit = "`torch.cuda.max_memory_allocated`" if s["device"] == "cuda" else "peak RSS (VmHWM)"
    lines += ["", f"Peak memory per run, {unit}, each variant in its own process; estimate = "
              "`engine.core.memory.estimate_peak_bytes` (– where it fails):", "",
              "| N | A engine: measured | A: estimate | B PEFT: measured | B: estimate | "
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
        lines += [f"- {n}" for n in notes] + [""]
    return lines


def _model_lines(entry: dict, s: dict, rates: list[float]) -> list[str]:
    """The model's shape, the rows' lengths and the matmul rate (the MFU denominator)."""
    from engine.core.memory import ModelShape

    cfg = entry["config"]
    shape = shape_of(cfg)
    all_params = ModelShape.from_config(cfg).num_params()
    layers = cfg["num_hidden_layers"]
    lines = [f"- Shape: hidden {cfg['hidden_size']}, "
             f"{layers} layer{'s' if layers != 1 else ''}, "
             f"{cfg['num_attention_heads']} heads / {cfg.get('num_key_value_heads')} KV "
             f"heads, MLP {cfg['intermediate_size']}, vocabulary {cfg['vocab_size']}, "
             f"tied embeddings {cfg.get('tie_word_embeddings')}; random weights. Decoder "
             f"matmul weights {shape['decoder_params'] / 1e6:.1f} M, lm_head "
             f"{shape['head_params'] / 1e6:.1f} M, all parameters {all_params / 1e6:.1f} M."]
    lengths = [n for v in entry["data"]["lengths"].values() for n in v]
    targets = [n for v in entry["data"]["targets"].values() for n in v]
    lines.append(f"- Rows (tokens, prompt template included): mean {statistics.mean(lengths):.0f}, "
                 f"p10 {quantile(lengths, .1):.0f}, median {quantile(lengths, .5):.0f}, p90 "
                 f"{quantile(lengths, .9):.0f}, max {max(lengths)}; target tokens "
                 f"{sum(targets) / sum(lengths):.0%} of all tokens.")
    if rates:
        lines.append(f"- Matmul rate ({entry['matmul_tokens']} x {cfg['hidden_size']} @ "
                     f"{cfg['hidden_size']} x {cfg['hidden_size']}, {s['dtype']}, timed in "
                     f"each A and B worker, best of 5 trials each): {max(rates) / 1e12:.3g} "
                     f"TFLOP/s, the best worker's, is the MFU denominator (workers' bests: "
                     f"{min(rates) / 1e12:.3g}–{max(rates) / 1e12:.3g}, median "
                     f"{statistics.median(rates) / 1e12:.3g}).")
    return lines


def _step_rows(n: int, run: dict, summ: dict, notes: list[str]) -> list[str]:
    """The step table's rows of A, P and B at N adapters; their problems go to ``notes``."""
    rows = []
    for v in ("A", "P", "B"):
        if v not in run:
            continue
        x = summ.get(v)
        if x is None:
            err = next((r.get("error") for r in run[v] if r.get("error")), "no steps")
            rows.append(f"| {n} | {v} | failed: {_short(err)} | | | | | | | | | |")
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
        rows.append(
            f"| {n} | {v} | {what} | {x['tokens_per_step']:,.0f} | {x['padding']:.0%} | "
            f"{x['median']:.3f} ({x['p10']:.3f}–{x['p90']:.3f}) | {quiet} | "
            f"{ph['forward']:.3f} / {ph['backward']:.3f} / {ph['optimizer']:.3f} | "
            f"{x['tokens_per_s']:,.0f} | {paired} | {_pct(x.get('mfu_useful'))} | "
            f"{_pct(x.get('mfu_executed'))} |")
        if x["token_mismatch"]:
            notes.append(f"N={n} {v}: tokens of steps {x['token_mismatch']} differ from "
                         "the planned micro-batches")
        notes += [f"N={n} {v}: {_short(err)}" for err in x["errors"]]
    return rows


def _memory_row(entry: dict, run: dict, summ: dict, c: dict | None, adapters: list[dict],
                s: dict) -> tuple:
    """(N, A, A's estimate, B, B's estimate, C, C's estimate) for the memory table."""
    jobs_by_step = [jobs_at(entry, adapters, k) for k in range(s["warmup"] + s["steps"])]
    recorded = {}
    for r in run.get("A", []):
        for st in r.get("steps", []):
            recorded.setdefault(st["k"], st.get("passes"))
    passes_by_step = [recorded.get(k) for k in range(len(jobs_by_step))]
    est_a = estimate_mib(entry, jobs_by_step, s, "engine", passes_by_step)
    est_b = estimate_mib(entry, jobs_by_step, s, "peft")
    est_c = None
    if c is not None:
        parts = [estimate_mib(entry, [[jobs[i]] for jobs in jobs_by_step], s, "peft")
                 for i in range(len(adapters))]
        est_c = sum(parts) if all(p is not None for p in parts) else None
    return len(adapters), summ.get("A"), est_a, summ.get("B"), est_b, c, est_c


def _comparison_notes(n: int, summ: dict, c: dict | None) -> list[str]:
    """A against P (packing) and against B (the same first losses and parameter counts)."""
    notes = []
    a, p, b = summ.get("A"), summ.get("P"), summ.get("B")
    if a and p:
        notes.append(f"N={n}: packing, A (packed) vs P (padded rows), paired by step: "
                     f"{_paired(a, p)}; peak memory A {_fmt_mib(a['peak_mib'])}, "
                     f"P {_fmt_mib(p['peak_mib'])}")
    if a and b:
        la, lb = a["first_loss"], b["first_loss"]
        diffs = [abs(la[k] - lb[k]) / max(1e-12, abs(lb[k])) for k in la if k in lb]
        if diffs:
            notes.append(f"N={n}: first-step losses (B = 0, so the base model's loss) "
                         f"A vs B agree within {max(diffs):.2e} relative "
                         f"(a0: {la.get('a0', float('nan')):.4f} / "
                         f"{lb.get('a0', float('nan')):.4f})")
        if a["trainable"] and b["trainable"] and a["trainable"] != b["trainable"]:
            notes.append(f"N={n}: trainable parameters differ: engine {a['trainable']}, "
                         f"PEFT {b['trainable']}")
    if c is not None:
        notes += [f"N={n} C: {_short(err)}" for err in c["errors"]]
    return notes
