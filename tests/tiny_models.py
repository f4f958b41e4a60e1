"""Tiny random models of every supported family, built offline in about a second, for tests.

Each folder holds a normal Hugging Face model (config.json + safetensors, fp32) and the tiny
tokenizer from ``tiny_tokenizer``, so ``engine.train.models.load_base_model`` loads it exactly like a
real model folder. ``tiny_model_dir`` builds each family once per test session.
"""

from __future__ import annotations

from pathlib import Path

from tiny_tokenizer import build_tiny_tokenizer

FAMILIES = [
    "llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
    "mistral", "phi", "phi3", "glm", "glm4",
]

# Shared by every family. head_dim is explicit because several configs default to a large
# one (gemma 256, glm 128) instead of hidden_size / num_attention_heads. The token ids match
# the tiny tokenizer (<pad>=0, <s>=1, </s>=2); Phi3/Glm/Glm4 fail to build without a
# pad_token_id inside the small vocabulary.
_COMMON = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    vocab_size=320,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Per-family additions. gemma3_text gets a logit softcap (the library default is None) so
# that tests exercise softcapping in both Gemma code paths, as gemma2 does by default.
_EXTRA = {
    "gemma2": dict(sliding_window=64),
    "gemma3_text": dict(sliding_window=64, final_logit_softcapping=30.0),
}


def _config_class(family: str):
    import transformers

    names = {
        "llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
        "gemma": "GemmaConfig", "gemma2": "Gemma2Config", "gemma3_text": "Gemma3TextConfig",
        "mistral": "MistralConfig", "phi": "PhiConfig", "phi3": "Phi3Config",
        "glm": "GlmConfig", "glm4": "Glm4Config",
    }
    if family not in names:
        raise ValueError(f"unknown tiny model family {family!r}; known: {', '.join(FAMILIES)}")
    return getattr(transformers, names[family])


def build_tiny_model(family: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Write a tiny randomly initialised ``family`` model plus the tiny tokenizer to ``path``.

    ``overrides`` change config fields (e.g. ``initializer_range``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = _config_class(family)(**{**_COMMON, **_EXTRA.get(family, {}), **overrides})
    assert config.vocab_size == len(tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


_built: dict[str, Path] = {}


def tiny_model_dir(family: str, tmp_path_factory) -> Path:
    """The folder of a tiny ``family`` model, built on first use in this test session.

    Pass pytest's session-scoped ``tmp_path_factory`` fixture. Tests must not modify the folder.
    """
    path = _built.get(family)
    if path is None or not (path / "config.json").is_file():
        path = build_tiny_model(family, tmp_path_factory.mktemp(f"tiny-{family}"))
        _built[family] = path
    return path
