"""FLOPs of a training step, by arithmetic on the model's shape and the step's rows (the
formulas are in BENCHMARKS.md: "Engine vs PEFT by model and number of adapters")."""

from __future__ import annotations

from bench.spec import ENGINE_VARIANTS


def shape_of(config: dict) -> dict:
    """The matmul shapes of a LLaMA-like model config (config.json's fields)."""
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


def pass_positions(ps: dict) -> int:
    """Positions a recorded pass ran: rows x width, or a packed pass's tokens."""
    return ps["positions"] if ps.get("packed") else ps["rows"] * ps["width"]


def lora_params(shape: dict, r: int, targets: list[str]) -> int:
    return shape["layers"] * sum(r * sum(shape["linears"][t]) for t in targets)


class _Cost:
    """Frozen matmul weights cost 4 FLOPs per weight per position (forward 2, backward to
    the input 2), LoRA weights 6 (their weight gradients too), attention 12 x layers x
    heads x head_dim per pair of positions (QK^T and AV: forward 4, backward 8; no saving
    for the causal mask)."""

    def __init__(self, shape: dict):
        self.dec, self.head = shape["decoder_params"], shape["head_params"]
        self.att = 12 * shape["layers"] * shape["q"]

    def __call__(self, positions: int, lora_flops: float, head_positions: int,
                 attention: int) -> float:
        return (4.0 * self.dec * positions + lora_flops + 4.0 * self.head * head_positions
                + self.att * attention)


def _one_pass(jobs: list[dict]) -> list[dict]:
    """The engine's step as one pass padded to its longest row (no passes recorded)."""
    start, segments = 0, []
    for j in jobs:
        segments.append([j["name"], start, start + len(j["lengths"])])
        start += len(j["lengths"])
    width = max(n for j in jobs for n in j["lengths"])
    return [{"rows": start, "width": width, "segments": segments}]


def _engine_executed(cost: _Cost, jobs: list[dict], passes: list[dict]) -> tuple[float, int]:
    """(FLOPs, positions) of the engine's passes; lm_head on target positions only."""
    lora = {j["name"]: j["lora"] for j in jobs}
    executed = 4.0 * cost.head * sum(sum(j["targets"]) for j in jobs)
    positions = 0
    for ps in passes:
        if ps.get("packed"):   # segments are token ranges; attention per example
            lora_flops = sum(6.0 * lora.get(name, 0) * (end - begin)
                             for name, begin, end in ps["segments"])
            executed += cost(ps["positions"], lora_flops, 0, sum(n * n for n in ps["lengths"]))
        else:
            rows, width = ps["rows"], ps["width"]
            lora_flops = sum(6.0 * lora.get(name, 0) * (end - begin) * width
                             for name, begin, end in ps["segments"])
            executed += cost(rows * width, lora_flops, 0, rows * width * width)
        positions += pass_positions(ps)
    return executed, positions


def step_flops(shape: dict, jobs: list[dict], variant: str,
               passes: list[dict] | None = None) -> dict:
    """FLOPs of one step; ``jobs``: [{"name", "lengths": [...], "targets": [...], "lora":
    LoRA parameters}], the adapters' micro-batches of this step.

    executed: what the variant computes. A/P: the decoder over every pass's rows x width
    (``passes`` as the engine ran them; without, one pass padded to the step's longest
    row), lm_head on target positions only. B/C: each adapter's rows padded to their own
    longest row, lm_head on every position. useful: non-padding positions only, lm_head on
    target positions.
    """
    cost = _Cost(shape)
    tokens = sum(sum(j["lengths"]) for j in jobs)
    targets = sum(sum(j["targets"]) for j in jobs)
    useful = cost(tokens, sum(6.0 * j["lora"] * sum(j["lengths"]) for j in jobs), targets,
                  sum(n * n for j in jobs for n in j["lengths"]))
    if variant in ENGINE_VARIANTS:
        executed, positions = _engine_executed(cost, jobs, passes or _one_pass(jobs))
    else:
        executed, positions = 0.0, 0
        for j in jobs:
            width, rows = max(j["lengths"]), len(j["lengths"])
            executed += cost(rows * width, 6.0 * j["lora"] * rows * width, rows * width,
                             rows * width * width)
            positions += rows * width
    return {"useful": useful, "executed": executed, "tokens": tokens, "targets": targets,
            "positions": positions}
