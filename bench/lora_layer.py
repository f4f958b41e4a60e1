"""The batched multi-adapter layer: this engine's ``MultiLoraLinear`` against the previous
version of it and against PEFT's single-adapter LoRA layer. A measurement script, not a test.

At SmolLM2-135M's shapes (in 576; out 576 as q/o_proj, 1536 as gate/up_proj), with 4 jobs
x 2 rows x 128 tokens (1024 token rows; the jobs' own lengths 128, 96, 128, 64, so dropout
masks cover 13/16 of the rows' positions), r=8 plain LoRA, with and without dropout, on an fp32
and on a bf16 base, it times one forward + backward (gradients w.r.t. the input, as inside a
model, and w.r.t. every adapter) of:

  old   the previous layer (one delta per segment, Bernoulli masks, torch.cat of the rows),
        kept below verbatim as ``old_forward`` on the same module and weights;
  new   ``engine.train.lora.MultiLoraLinear`` as it is now;
  peft  PEFT's ``lora.Linear`` with one adapter over the same 1024 rows (what one job alone
        costs in PEFT: the bound for a batched layer is this, not 4 times it), configured
        by ``bench.baseline.lora_config``;
  base  the frozen base linear alone (what no adapter at all costs).

Each configuration first checks the new layer against its own math one segment at a time
(``LoraAdapter.delta``, the same dropout masks): "check" is the largest relative difference
of the output and the gradients. Variants alternate call by call (old, new, peft, base, then
rotated), so load from other processes hits them alike; reported: the median time of each
and the median of the paired ratios new/old, new/peft, and the adapters' own share (variant
minus base) new/old. ``--masks`` also times one job's dropout mask, old against new.
``--profile`` also prints torch.profiler op counts and self times of old and new.

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.lora_layer            # CPU
    .venv/bin/python -m bench.lora_layer --device cuda --rounds 200   # GPU
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
from torch import nn

from engine.core.config import AdapterConfig
from engine.train.lora import BatchLayout, LoraAdapter, MultiLoraLinear, Segment, mix_seed
from engine.train.variants.lora import lora_scaling


# -- the previous layer, verbatim (plain LoRA part) ------------------------------------------

def _old_dropout_mask(x, keep, generator, length):
    if length is None or x.dim() < 3 or length >= x.shape[1]:
        return torch.empty_like(x).bernoulli_(keep, generator=generator)
    drawn = torch.empty_like(x[:, :length]).bernoulli_(keep, generator=generator)
    rest = torch.ones_like(x[:, length:])
    return torch.cat([drawn, rest], dim=1)


def _old_delta(adapter: LoraAdapter, x, generator, length):
    x = x.float()
    if generator is not None and adapter.dropout_p > 0:
        keep = 1.0 - adapter.dropout_p
        x = x * _old_dropout_mask(x, keep, generator, length) / keep
    lora_out = (x @ adapter.lora_A.t()) @ adapter.lora_B.t()
    assert adapter.batched, "the benchmark's old layer is plain LoRA only"
    return lora_out * adapter.scaling


def old_forward(layer: MultiLoraLinear, x: torch.Tensor) -> torch.Tensor:
    base_out = layer.base(x)
    layout = layer.layout
    if not any(s.adapter in layer.adapters for s in layout.segments):
        return base_out
    pieces = []
    for seg in layout.segments:
        rows = base_out[seg.start:seg.end]
        adapter = layer.adapters[seg.adapter] if seg.adapter in layer.adapters else None
        if adapter is not None:
            generator = None
            if seg.dropout_seed is not None and adapter.dropout_p > 0:
                generator = torch.Generator(device=x.device).manual_seed(
                    mix_seed(seg.dropout_seed, layer.name_key))
            delta = _old_delta(adapter, x[seg.start:seg.end], generator, seg.length)
            rows = rows + delta.to(rows.dtype)
        pieces.append(rows)
    return torch.cat(pieces, dim=0)


# -- set-up --------------------------------------------------------------------------------

def build(in_f, out_f, jobs, rows_per_job, r, dropout, dtype, device, tokens=128):
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=False).to(device=device, dtype=dtype)
    base.weight.requires_grad_(False)
    layout = BatchLayout()
    layer = MultiLoraLinear(base, layout, "model.layers.0.mlp.up_proj")
    g = torch.Generator().manual_seed(1)
    for j in range(jobs):
        adapter = LoraAdapter(in_f, out_f, r, lora_scaling(r, 2.0 * r, False), dropout)
        adapter.reset(g, base.weight)
        with torch.no_grad():
            adapter.lora_B.normal_(0, 0.02, generator=g)
        layer.adapters[f"job{j}"] = adapter.to(device)
    # Jobs' own lengths differ (the batch is padded to the longest): masks are drawn for
    # each job's own positions only.
    lengths = [tokens, tokens * 3 // 4, tokens, tokens // 2]
    layout.set_segments([Segment(f"job{j}", j * rows_per_job, (j + 1) * rows_per_job,
                                 lengths[j % 4], mix_seed(7, j)) for j in range(jobs)])
    return layer


def build_peft(layer: MultiLoraLinear, r, dropout):
    import peft

    from bench.baseline import lora_config

    class Wrap(nn.Module):
        def __init__(self, lin):
            super().__init__()
            self.lin = lin

        def forward(self, x):
            return self.lin(x)

    base = nn.Linear(layer.in_features, layer.out_features, bias=False)
    base = base.to(device=layer.base.weight.device, dtype=layer.base.weight.dtype)
    base.weight.data.copy_(layer.base.weight.data)
    adapter = AdapterConfig(name="job", data="", r=r, lora_alpha=2.0 * r, lora_dropout=dropout)
    # A bare module, not a causal LM: no task type, so PEFT wraps it as it is.
    config = dataclasses.replace(lora_config(adapter, ["lin"]), task_type=None)
    model = peft.get_peft_model(Wrap(base), config).train()
    return model


def reference_forward(layer: MultiLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """The new layer's math one segment at a time (``LoraAdapter.delta``, same masks)."""
    base_out = layer.base(x)
    pieces = []
    for seg in layer.layout.segments:
        adapter = layer.adapters[seg.adapter]
        generator = None
        if seg.dropout_seed is not None and adapter.dropout_p > 0:
            generator = torch.Generator(device=x.device).manual_seed(
                mix_seed(seg.dropout_seed, layer.name_key))
        rows = base_out[seg.start:seg.end]
        delta = adapter.delta(x[seg.start:seg.end], rows, layer.base, generator, seg.length)
        pieces.append(rows + delta.to(rows.dtype))
    return torch.cat(pieces)


def check(layer: MultiLoraLinear, x: torch.Tensor) -> float:
    """Largest relative difference, output and gradients, of the layer vs reference_forward."""
    weights = torch.randn(x.shape[:-1] + (layer.out_features,), device=x.device,
                          generator=torch.Generator(device=x.device).manual_seed(0))
    results = []
    for fn in (layer, lambda t: reference_forward(layer, t)):
        xx = x.detach().clone().requires_grad_(True)
        params = [p for p in layer.parameters() if p.requires_grad]
        out = fn(xx)
        grads = torch.autograd.grad((out.float() * weights).sum(), [xx] + params)
        results.append([out.detach()] + list(grads))
    worst = 0.0
    for a, b in zip(*results):
        a, b = a.float(), b.float()
        worst = max(worst, ((a - b).norm() / b.norm().clamp_min(1e-12)).item())
    return worst


def step(fn, x, sync):
    t0 = time.perf_counter()
    out = fn(x)
    out.backward(torch.ones_like(out))
    sync()
    return time.perf_counter() - t0


def measure(args, out_f, dropout, dtype):
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows_per_job = args.rows_per_job
    layer = build(576, out_f, args.jobs, rows_per_job, args.r, dropout, dtype, device,
                  args.tokens)
    x = torch.randn(args.jobs * rows_per_job, args.tokens, 576, device=device, dtype=dtype,
                    requires_grad=True)
    variants = {"old": lambda t: old_forward(layer, t), "new": layer,
                "base": layer.base}
    try:
        variants["peft"] = build_peft(layer, args.r, dropout)
    except ImportError:
        pass

    # The same results: without dropout the new layer equals the old one.
    if dropout == 0:
        with torch.no_grad():
            diff = (layer(x) - old_forward(layer, x)).float().abs().max().item()
        assert diff < (1e-4 if dtype == torch.float32 else 0.1), diff

    difference = check(layer, x)
    assert difference < (1e-5 if dtype == torch.float32 else 1e-2), difference

    names = list(variants)
    times = {n: [] for n in names}
    for i in range(args.warmup + args.rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        for n in order:
            x.grad = None
            t = step(variants[n], x, sync)
            if i >= args.warmup:
                times[n].append(t)
    med = {n: statistics.median(v) for n, v in times.items()}
    ratio = lambda a, b: statistics.median([p / q for p, q in zip(times[a], times[b])])
    own = lambda n: statistics.median([p - q for p, q in zip(times[n], times["base"])])
    row = {"out": out_f, "dropout": dropout, "dtype": str(dtype).split(".")[-1],
           **{f"{n}_ms": med[n] * 1e3 for n in names},
           "new/old": ratio("new", "old"),
           "adapter share new/old": own("new") / own("old") if own("old") > 0 else float("nan"),
           "check": difference}
    if "peft" in times:
        row["new/peft"] = ratio("new", "peft")
    return row, layer, x


def mask_costs(device: torch.device, rounds: int) -> None:
    """One job's dropout mask (2 x 128 x 576, own length 96), its generator's creation
    included: the previous Bernoulli mask against the new draws."""
    from engine.train.lora import _dropout_mask

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    x = torch.zeros(2, 128, 576, device=device)
    fns = {
        "old mask (bernoulli_ + cat)": lambda: _old_dropout_mask(
            x, 0.95, torch.Generator(device=device).manual_seed(3), 96),
        "new mask": lambda: _dropout_mask(
            x, 0.95, torch.Generator(device=device).manual_seed(3), 96),
    }
    times = {n: [] for n in fns}
    for i in range(rounds + 5):
        for n, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            if i >= 5:
                times[n].append(time.perf_counter() - t0)
    print("\n" + ", ".join(f"{n}: {statistics.median(t) * 1e6:.1f} us" for n, t in times.items()))


def profile(layer, x, label):
    from torch.profiler import ProfilerActivity, profile as torch_profile
    fns = {"old": lambda t: old_forward(layer, t), "new": layer}
    for name, fn in fns.items():
        for _ in range(3):
            fn(x).sum().backward()
        activities = [ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if x.device.type == "cuda" else [])
        with torch_profile(activities=activities) as prof:
            for _ in range(5):
                x.grad = None
                fn(x).sum().backward()
        events = prof.key_averages()
        ops = sum(e.count for e in events if e.key.startswith("aten::")) / 5
        print(f"\n## profile {label} {name}: {ops:.0f} aten ops per forward+backward")
        print(events.table(sort_by="self_cpu_time_total", row_limit=12))


def main():
    parser = argparse.ArgumentParser(prog="python -m bench.lora_layer", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--rows-per-job", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--masks", action="store_true", help="also time one job's mask")
    parser.add_argument("--only", default=None,
                        help="run one configuration: OUT,DROPOUT,DTYPE e.g. 1536,0.05,fp32")
    args = parser.parse_args()
    configs = [(out_f, p, dt) for dt in ("fp32", "bf16") for p in (0.0, 0.05)
               for out_f in (576, 1536)]
    if args.only:
        o, p, dt = args.only.split(",")
        configs = [(int(o), float(p), dt)]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, "
          f"{args.jobs} jobs x {args.rows_per_job} x {args.tokens} tokens, r={args.r}, "
          f"{args.rounds} rounds")
    header = None
    for out_f, p, dt in configs:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
        row, layer, x = measure(args, out_f, p, dtype)
        if header is None:
            header = list(row)
            print("| " + " | ".join(header) + " |")
            print("|" + "---|" * len(header))
        print("| " + " | ".join((f"{row[k]:.1e}" if k == "check" else f"{row[k]:.3f}")
                                if isinstance(row.get(k), float)
                                else str(row.get(k)) for k in header) + " |", flush=True)
        if args.profile:
            profile(layer, x, f"out={out_f} dropout={p} {dt}")
    if args.masks:
        mask_costs(torch.device(args.device), 4 * args.rounds)


if __name__ == "__main__":
    main()
