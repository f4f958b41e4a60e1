"""The PEFT baseline every benchmark compares this engine with.

One ``peft.get_peft_model`` model on the base holds the adapters, each built from its
``AdapterConfig`` through the LoraConfig fields the engine itself saves for PEFT
(``engine.train.adapters.peft_config``: r, alpha, dropout, targets, rsLoRA, DoRA), and each
trained one after another with a plain PyTorch loop and the settings of the engine's job:
AdamW or SGD with momentum, weight decay, the LoRA+ learning-rate ratio on B and DoRA's
magnitude, clipping at ``max_grad_norm``, and the job's schedule (transformers', chosen
by ``engine.train.schedules``). The loss is transformers' own (forward with ``labels=``:
the mean over the micro-batch's target tokens), so one optimizer step per micro-batch:
the benchmarks set ``micro_batch_size = batch_size``. PEFT has no MixLoRA; such an adapter is refused.
"""

from __future__ import annotations

from typing import Callable

import torch
from peft import LoraConfig, get_peft_model

from engine.core.config import AdapterConfig
from engine.core.data import JobData
from engine.train.adapters import peft_config
from engine.train.models import default_targets
from engine.train.planning import collate
from engine.train.schedules import make_scheduler


def lora_config(adapter: AdapterConfig, targets: list[str], base_model: str = "") -> LoraConfig:
    """The trainable PEFT LoraConfig of ``adapter`` on the modules ``targets``."""
    if adapter.routing_strategy:
        raise SystemExit(f"adapter {adapter.name!r}: routing_strategy "
                         f"{adapter.routing_strategy!r} is MixLoRA, which PEFT does not have; "
                         "the PEFT baseline runs LoRA, rsLoRA and DoRA adapters only")
    fields = peft_config(r=adapter.r, alpha=adapter.lora_alpha, dropout=adapter.lora_dropout,
                         target_modules=targets, use_rslora=adapter.use_rslora,
                         use_dora=adapter.use_dora, base_model=base_model)
    del fields["peft_type"]   # implied by the class
    return LoraConfig(**{**fields, "inference_mode": False})


def param_groups(model: torch.nn.Module, name: str) -> dict[str, list[torch.nn.Parameter]]:
    """Adapter ``name``'s tensors as the engine's job groups them: A, B, DoRA magnitude."""
    kinds = {"lora_A": "A", "lora_B": "B", "lora_magnitude_vector": "magnitude"}
    groups: dict[str, list[torch.nn.Parameter]] = {"A": [], "B": [], "magnitude": []}
    for key, param in model.named_parameters():
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if part in kinds and parts[i + 1] == name:
                groups[kinds[part]].append(param)
    return groups


def make_optimizer(adapter: AdapterConfig, groups: dict[str, list]) -> torch.optim.Optimizer:
    """The engine job's optimizer: LoRA+ gives B and the magnitude ``loraplus_lr_ratio``
    times the rate of A (as PEFT's ``create_loraplus_optimizer`` does)."""
    ratio = {"A": 1.0, "B": adapter.loraplus_lr_ratio, "magnitude": adapter.loraplus_lr_ratio}
    param_groups = [{"params": params, "lr": adapter.lr * ratio[kind]}
                    for kind, params in groups.items() if params]
    if adapter.optim == "sgd":
        return torch.optim.SGD(param_groups, lr=adapter.lr, momentum=adapter.momentum,
                               weight_decay=adapter.weight_decay)
    return torch.optim.AdamW(param_groups, lr=adapter.lr, weight_decay=adapter.weight_decay)


class PeftBaseline:
    """``model`` (the loaded base, on ``device``) wrapped by PEFT with every adapter, and
    per adapter its optimizer and schedule; ``data`` gives each adapter's encoded rows."""

    def __init__(self, model: torch.nn.Module, adapters: list[AdapterConfig],
                 data: dict[str, JobData], pad_id: int, device: torch.device, seed: int,
                 gradient_checkpointing: bool = False):
        torch.manual_seed(seed)   # PEFT's initialisation of A
        default = default_targets(model)
        configs = {a.name: lora_config(a, list(a.target_modules or default), model.name_or_path)
                   for a in adapters}
        names = list(configs)
        self.model = get_peft_model(model, configs[names[0]], adapter_name=names[0])
        for name in names[1:]:
            self.model.add_adapter(name, configs[name])
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()   # lora_dropout is active in train mode only (the base's is 0)
        self.adapters = {a.name: a for a in adapters}
        self.data, self.pad_id, self.device = data, pad_id, device
        self.params: dict[str, list[torch.nn.Parameter]] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict = {}
        for a in adapters:
            groups = param_groups(self.model, a.name)
            self.params[a.name] = [p for params in groups.values() for p in params]
            self.optimizers[a.name] = make_optimizer(a, groups)
            self.schedulers[a.name] = make_scheduler(
                self.optimizers[a.name], a, data[a.name].total_steps(a.num_epochs))

    def trainable(self, name: str) -> int:
        return sum(p.numel() for p in self.params[name])

    def batch(self, name: str, indices: list[int]) -> dict[str, torch.Tensor]:
        """Adapter ``name`` made active, and its micro-batch ``indices`` on the device, padded
        as the engine pads a micro-batch (``engine.train.planning.collate``)."""
        self.model.set_adapter(name)
        examples = [self.data[name].train[i] for i in indices]
        ids, labels, attention = collate(examples, self.pad_id)
        return {"input_ids": ids.to(self.device), "labels": labels.to(self.device),
                "attention_mask": attention.to(self.device)}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss

    def optimizer_step(self, name: str) -> None:
        """Clip (the job's ``max_grad_norm``), step, schedule, clear the gradients."""
        clip = self.adapters[name].max_grad_norm
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params[name], clip)
        self.optimizers[name].step()
        self.schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def train_step(self, name: str, indices: list[int],
                   lap: Callable[[str], None] = lambda phase: None):
        """One optimizer step of ``name`` on one micro-batch; ``lap`` is called at the end of
        each phase (data, forward, backward, optimizer). Returns (loss, attention mask)."""
        batch = self.batch(name, indices)
        lap("data")
        loss = self.loss(batch)
        lap("forward")
        loss.backward()
        lap("backward")
        self.optimizer_step(name)
        lap("optimizer")
        return float(loss.detach()), batch["attention_mask"]
