"""What the engine knows of model families without loading a model. No torch.

The default LoRA targets per ``model_type`` (the attention projections, as PEFT and m-LoRA
choose by default), and reading a model folder's ``model_type`` from its config.json.
"""

from __future__ import annotations

import json
from pathlib import Path

from engine.core.config import DEMO_MODEL

_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
DEFAULT_TARGETS: dict[str, list[str]] = {
    **{t: _QKVO for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                          "gemma3_text", "gemma3", "glm", "glm4")},
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    # Fused projections: one linear computes q, k and v.
    "phi3": ["qkv_proj", "o_proj"],
}
# The bundled SmolLM2-135M-Instruct is a LLaMA-architecture model.
DEMO_MODEL_TYPE = "llama"


def model_type_of(base_model: str) -> str | None:
    """The ``model_type`` of the demo model or of a model folder; None when unknown."""
    if base_model == DEMO_MODEL:
        return DEMO_MODEL_TYPE
    try:
        config = json.loads((Path(base_model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    return model_type if isinstance(model_type, str) else None
