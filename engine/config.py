"""The run configuration: dataclasses for the TOML file and its validation.

One file holds ``[model]``, ``[train]`` and a list of ``[[adapter]]`` tables. Field names
follow m-LoRA's where one exists. ``load_config`` validates everything that can be checked
without loading a model and raises ``ConfigError`` naming file, table and field.
This module never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class ModelConfig:
    base_model: str = "smollm2-135m"   # bundled demo model, or a local HF model folder
    dtype: str = "fp32"                # fp32 | bf16 | fp16
    tf32: bool = False
    attn_impl: str = "auto"            # auto | eager | sdpa | flash_attn
    trust_remote_code: bool = False


@dataclass
class TrainConfig:
    output_dir: str = "runs/demo"
    seed: int = 42
    cutoff_len: int = 256
    save_step: int = 100
    train_lora_simultaneously_num: int = 4
    log_every: int = 1


@dataclass
class AdapterConfig:
    name: str
    data: str
    prompt: str = "alpaca"            # built-in template name, or an m-LoRA template JSON path
    r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: Optional[list[str]] = None   # None: the model family's default targets
    use_rslora: bool = False
    use_dora: bool = False
    loraplus_lr_ratio: float = 1.0
    optim: str = "adamw"              # adamw | sgd
    lr: float = 3e-4
    momentum: float = 0.0             # sgd only
    weight_decay: float = 0.0
    batch_size: int = 16
    micro_batch_size: int = 4
    num_epochs: int = 2
    scheduler_type: str = "constant"  # constant | linear | cosine
    warmup_ratio: float = 0.0
    warmup_steps: Optional[int] = None
    cutoff_len: Optional[int] = None  # None: [train] cutoff_len
    train_on_inputs: bool = False
    val_set_size: int = 0
    group_by_length: bool = False
    max_grad_norm: Optional[float] = None
    init_from: str = ""               # a PEFT adapter folder to continue training from
    seed: Optional[int] = None        # None: [train] seed


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapters: list[AdapterConfig] = field(default_factory=list)
    source: str = "<config>"          # the file the config came from (for messages)
