"""``bench.demo_throughput``'s markdown report: per variant the step time, its spread and
noise, tokens/s, paired ratios against PEFT (B), and notes on noise, the same work, the
parameters and memory (BENCHMARKS.md says how to read it)."""

from __future__ import annotations

import statistics

from bench.measure import DISTURBED_CORES, quantile


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


def _calm(samples: list[dict]) -> list[dict]:
    return [x for x in samples if not _disturbed(x)]


def _describe(key: str, names: list[str]) -> tuple[str, str, str | None]:
    """(label, what one step is, the B series it compares with) of a series key."""
    if key == "A3":
        return ("A3 engine, batched", f"{len(names)} adapters in one `Engine.step`", "B:all")
    variant, _, name = key.partition(":")
    if variant == "A1":
        if name == "all":
            return ("A1 engine, one at a time", f"{len(names)} single-adapter steps, summed",
                    "B:all")
        return (f"A1 engine, {name} alone", "1 adapter", f"B:{name}")
    if name == "all":
        return ("B PEFT, one at a time", f"{len(names)} single-adapter steps, summed", None)
    return (f"B PEFT, {name}", "1 adapter", None)


def _order(names: list[str]) -> list[str]:
    return (["A3"] + [f"A1:{n}" for n in names] + ["A1:all"] + [f"B:{n}" for n in names]
            + ["B:all"])


def _ratios(key: str, against: str | None, series: dict) -> tuple[str, str]:
    """Throughput against B, paired by step: all steps, and undisturbed steps."""
    if key.startswith("B"):
        return "1 (reference)", "1 (reference)"
    if against not in series:
        return "–", "–"
    samples = series[key]
    pairs = _paired_ratios(_calm(series[against]), _calm(samples))
    return (_fmt_ratio(_paired_ratios(series[against], samples)),
            f"**{statistics.median(pairs):.2f}x** ({len(pairs)})" if pairs else "– (0)")


def _table(series: dict, names: list[str], rounds: int) -> list[str]:
    rows = ["| Variant | One step is | Padding | Steps: all (undisturbed) | Median step, all "
            "(s) | IQR, all (s) | Min–max (s) | Median per round (s) | Median step, "
            "undisturbed (s) | Tokens/s: all steps / median undisturbed step | Throughput vs "
            "B, paired, all steps: median (range) | vs B, paired, undisturbed: median (pairs) |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for key in _order(names):
        if key not in series:
            continue
        samples = series[key]
        quiet = _calm(samples)
        times = [x["seconds"] for x in samples]
        tokens = sum(x["tokens"] for x in samples)
        padded = sum(x["padded"] for x in samples)
        label, what, against = _describe(key, names)
        per_round = []
        for r in range(rounds):
            rt = [x["seconds"] for x in samples if x["round"] == r]
            if rt:
                per_round.append(f"{statistics.median(rt):.2f}")
        ratio, calm_ratio = _ratios(key, against, series)
        quiet_median = f"{statistics.median(x['seconds'] for x in quiet):.3f}" if quiet else "–"
        quiet_rate = (f"{statistics.median(x['tokens'] / x['seconds'] for x in quiet):,.0f}"
                      if quiet else "–")
        rows.append(
            f"| {label} | {what} | {1 - tokens / padded:.0%} | {len(times)} ({len(quiet)}) | "
            f"{statistics.median(times):.3f} | {quantile(times, .25):.2f}–"
            f"{quantile(times, .75):.2f} | {min(times):.2f}–{max(times):.2f} | "
            f"{' / '.join(per_round)} | {quiet_median} | {tokens / sum(times):,.0f} / "
            f"{quiet_rate} | {ratio} | {calm_ratio} |")
    return rows


def _noise(result: dict, singles: list[str]) -> str:
    """How much other processes disturbed the single-adapter steps, and the waits."""
    series, threads = result["series"], max(1, result["settings"]["threads"])
    all_samples = [x for k in singles for x in series[k]]
    spreads = [(max(t) - min(t)) / statistics.median(t)
               for t in ([x["seconds"] for x in series[k]] for k in singles)]
    others = [x["others"] for x in all_samples if x.get("others") is not None]
    shares = [x["cpu"] / (x["seconds"] * threads) for x in all_samples]
    calm_shares = [x["cpu"] / (x["seconds"] * threads) for x in _calm(all_samples)]
    busy = (f"other processes kept a median {statistics.median(others):.2f} cores "
            f"(max {max(others):.2f}) busy during the timed steps, and more than "
            f"{DISTURBED_CORES} cores during {sum(1 for x in all_samples if _disturbed(x))} "
            f"of the {len(all_samples)} single steps (those are \"disturbed\"; a summed "
            f"or batched step is disturbed when other processes averaged more than "
            f"{DISTURBED_CORES} cores over it); "
            if others else "")
    waits = result.get("quiet_waits_s", [])
    return (f"- Noise: {busy}(max−min)/median of step time per variant {min(spreads):.0%}–"
            f"{max(spreads):.0%}; this process's CPU time / (wall time x {threads} threads): "
            f"median {statistics.median(shares):.0%}"
            + (f" (undisturbed steps {statistics.median(calm_shares):.0%})" if calm_shares
               else "")
            + f"; waited for quiet {' / '.join(f'{w:.0f}' for w in waits)} s per round; "
            f"load average (1 min) {result['loadavg']['before'][0]:.2f} before, "
            f"{result['loadavg']['after'][0]:.2f} after (this run alone adds about "
            f"{threads}). Paired ratios compare the same step (the same rows) of two variants, "
            f"run seconds apart.")


def _work_and_memory(result: dict, iso: dict | None) -> list[str]:
    """The same-work check, the parameter counts, memory and the settings."""
    s, names = result["settings"], result["settings"]["adapters"]
    lines = []
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
    return lines


def report(result: dict, iso: dict | None = None) -> str:
    s, series = result["settings"], result["series"]
    names = s["adapters"]
    lines = ["\n".join(_table(series, names, s["rounds"])), ""]
    if "A3" in series and "A1:all" in series:
        pairs = _paired_ratios(_calm(series["A1:all"]), _calm(series["A3"]))
        lines.append(f"- Batching inside this engine, A3 vs A1 (the same adapters one at a time, "
                     f"paired), all steps: "
                     f"{_fmt_ratio(_paired_ratios(series['A1:all'], series['A3']))}; "
                     f"undisturbed: " + (f"**{statistics.median(pairs):.2f}x** "
                                         f"({len(pairs)} pairs)." if pairs else "no pairs."))
    singles = [k for k in _order(names) if k in series and not k.endswith(":all")]
    if singles:
        lines.append(_noise(result, singles))
    lines += _work_and_memory(result, iso)
    return "\n".join(lines) + "\n"
