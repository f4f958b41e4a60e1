"""What ``bench.bench`` runs: the model shapes, the variants, each adapter's spec.

Read by the parent (torch-free) and by the workers: a worker gets its spec as JSON.
"""

from __future__ import annotations

from pathlib import Path

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
# vocabulary; alpaca_short's 13-23 tokens plus the longer fields of bench.data.make_rows
# give rows of the lengths a real tokenizer makes of Alpaca data.
PROMPT = "alpaca_short"
VARIANTS = ("A", "P", "B", "C")
ENGINE_VARIANTS = ("A", "P")   # P: the engine with [train] packing = "off" (padded rows)
NEVER = 10**9


def adapter_specs(settings: dict, workdir: Path, count: int) -> list[dict]:
    """The first ``count`` adapters of a series with ``settings`` (the parsed options)."""
    ranks = [int(r) for r in settings["ranks"].split(",")]
    targets = [t.strip() for t in settings["targets"].split(",") if t.strip()]
    folder = (workdir / f"data-x{settings['length_scale']:g}-{settings['rows_per_file']}"
              f"-s{settings['seed']}")
    return [{"name": f"a{i}", "data": str(folder / f"adapter{i}.jsonl"),
             "data_seed": settings["seed"] + i, "r": ranks[i % len(ranks)],
             "alpha": 2 * ranks[i % len(ranks)], "dropout": settings["dropout"],
             "targets": targets, "lr": 1e-4, "rows": settings["rows"]}
            for i in range(count)]


def model_shape(name: str, layers: int) -> dict:
    """The shape ``name``, with ``layers`` decoder layers where that is not 0."""
    shape = dict(SHAPES[name])
    if layers:
        shape["num_hidden_layers"] = layers
    return shape
