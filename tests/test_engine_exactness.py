"""The batched engine is exact: together = alone, engine = PEFT, saved adapters = engine.

References are independent of the code under test: a run of each adapter alone, a plain
PyTorch training loop over a PEFT model, and Hugging Face's own loss.
"""

from __future__ import annotations

import itertools
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from engine.core.config import AdapterConfig, ModelConfig, RunConfig, TrainConfig
from engine.train.engine import Engine
from tiny_models import build_tiny_model

peft = pytest.importorskip("peft")

WORDS = ("alpha beta gamma delta red green blue cat dog fox jumps over lazy quick brown "
         "one two three four five six seven").split()


def _rows(n: int, seed: int) -> list[dict]:
    """Alpaca rows of varied lengths (so padding differs between jobs and micro-batches)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=rng.randint(1, 9))
        row = {"instruction": rng.choice(["Repeat the words.", "Say it loud.", "Copy."]),
               "output": " ".join(w.upper() for w in words)}
        if i % 3:
            row["input"] = " ".join(words)
        rows.append(row)
    return rows


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("llama") / "model")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("data")
    files = {}
    for i, name in enumerate(("a", "b", "c")):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _rows(10 + 3 * i, seed=i)))
        files[name] = str(path)
    return files


def _run_config(model_dir: Path, out: Path, adapters: list[AdapterConfig],
                packing: str = "auto") -> RunConfig:
    return RunConfig(model=ModelConfig(base_model=str(model_dir), attn_impl="sdpa"),
                     train=TrainConfig(output_dir=str(out), seed=7, cutoff_len=128,
                                       save_step=1000, train_lora_simultaneously_num=8,
                                       packing=packing),
                     adapters=adapters)


# The engine's two layouts of a pass: examples packed into one row, or padded rows.
LAYOUTS = pytest.mark.parametrize("packing", ["on", "off"])


def _three_adapters(files: dict[str, str]) -> list[AdapterConfig]:
    return [
        AdapterConfig(prompt="alpaca_short", name="plain", data=files["a"], r=4, lora_alpha=8, lora_dropout=0.1,
                      target_modules=["q_proj", "v_proj"], batch_size=4, micro_batch_size=2,
                      num_epochs=2, lr=1e-2, scheduler_type="cosine", warmup_ratio=0.2,
                      max_grad_norm=1.0),
        AdapterConfig(prompt="alpaca_short", name="rs", data=files["b"], r=8, lora_alpha=4, lora_dropout=0.2,
                      use_rslora=True, target_modules=["q_proj", "o_proj", "down_proj"],
                      batch_size=3, micro_batch_size=3, num_epochs=1, lr=5e-3,
                      scheduler_type="linear", loraplus_lr_ratio=4.0, seed=3),
        AdapterConfig(prompt="alpaca_short", name="dora", data=files["c"], r=2, lora_alpha=4, lora_dropout=0.1,
                      use_dora=True, target_modules=["k_proj", "gate_proj", "up_proj"],
                      batch_size=6, micro_batch_size=2, num_epochs=2, lr=1e-2, optim="sgd",
                      momentum=0.9, group_by_length=True),
    ]


def equal_rank_twin(cfg: AdapterConfig, name: str, data: str, seed: int) -> AdapterConfig:
    """A plain-LoRA job of ``cfg``'s rank and micro-batch size (what `mlora gen` templates
    make): in a padded pass, their segments side by side are one batched matmul pair, where
    each must still meet only its own adapter's weights. Other data, seed (so other initial
    weights and masks) and learning rate."""
    return replace(cfg, name=name, data=data, seed=seed, lr=cfg.lr / 2, use_rslora=False,
                   use_dora=False, init_from=None)


def _weights(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    from engine.train.adapters import adapter_state_dict
    return adapter_state_dict(engine.model, name)


def _assert_same(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        diff = (actual[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert diff <= rtol, f"{key}: relative difference {diff:.3g} > {rtol}"


@LAYOUTS
def test_adapters_trained_together_equal_each_trained_alone(packing, tiny_llama, data_files,
                                                            tmp_path):
    adapters = _three_adapters(data_files)
    adapters.insert(1, equal_rank_twin(adapters[0], "twin", data_files["c"], seed=5))
    together = Engine(_run_config(tiny_llama, tmp_path / "together", adapters, packing))
    assert together.packing == (packing == "on")
    together.pass_overhead = 10**9    # padded: one pass a step, so "twin" sits beside "plain"
    together.run()
    assert {j.state for j in together.jobs.values()} == {"done"}
    # Training happened: B moved away from its zero init.
    assert all(v.abs().max() > 0 for k, v in _weights(together, "plain").items() if "lora_B" in k)

    for cfg in adapters:
        alone = Engine(_run_config(tiny_llama, tmp_path / f"alone-{cfg.name}", [cfg], packing))
        alone.run()
        _assert_same(_weights(together, cfg.name), _weights(alone, cfg.name), rtol=1e-5)


def test_simultaneous_limit_queues_jobs_without_changing_results(tiny_llama, data_files,
                                                                 tmp_path):
    adapters = _three_adapters(data_files)[:2]
    config = _run_config(tiny_llama, tmp_path / "one-at-a-time", adapters)
    config.train.train_lora_simultaneously_num = 1
    serial = Engine(config)
    events = []
    serial.on_event = events.append
    serial.run()
    steps = [e["job"] for e in events if e["type"] == "step"]
    # With one slot, the first job finishes before the second starts.
    assert steps == sorted(steps, key=lambda name: name != adapters[0].name)
    parallel = Engine(_run_config(tiny_llama, tmp_path / "parallel", adapters))
    parallel.run()
    for cfg in adapters:
        _assert_same(_weights(serial, cfg.name), _weights(parallel, cfg.name), rtol=1e-5)


# -- against PEFT ---------------------------------------------------------------------------


def peft_initial_adapter(model_dir: Path, folder: Path, **lora) -> Path:
    """A PEFT-initialised r=4 adapter on q, v and down_proj with non-zero B (so every term of
    the math is live), saved to ``folder``; ``lora``: more (or other) LoraConfig fields."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    fields = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
              "target_modules": ["q_proj", "v_proj", "down_proj"], **lora}
    config = peft.LoraConfig(task_type="CAUSAL_LM", **fields)
    torch.manual_seed(0)
    initial = peft.get_peft_model(base, config)
    with torch.no_grad():
        for n, p in initial.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    initial.save_pretrained(folder)
    return folder


def _reference_optimizer(model, cfg: AdapterConfig) -> torch.optim.Optimizer:
    """torch's optimizer for ``cfg`` over the PEFT model's trainable parameters (LoRA+: PEFT's)."""
    if cfg.loraplus_lr_ratio != 1.0:
        from peft.optimizers import create_loraplus_optimizer
        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=cfg.lr,
                                         loraplus_lr_ratio=cfg.loraplus_lr_ratio,
                                         weight_decay=cfg.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _reference_scheduler(optimizer, cfg: AdapterConfig, total_steps: int):
    """transformers' schedule for ``cfg``: our "constant" with warm-up is its
    constant_with_warmup (its "constant" has no warm-up)."""
    import transformers

    warmup = (cfg.warmup_steps if cfg.warmup_steps is not None
              else math.ceil(cfg.warmup_ratio * total_steps))
    if cfg.scheduler_type == "constant":
        return transformers.get_constant_schedule_with_warmup(optimizer, warmup)
    schedule = {"linear": transformers.get_linear_schedule_with_warmup,
                "cosine": transformers.get_cosine_schedule_with_warmup}[cfg.scheduler_type]
    return schedule(optimizer, warmup, total_steps)


def reference_batches(data, micro_batch_size: int, pad: int):
    """A job's optimizer batches in its own order, epoch after epoch, for reference loops:
    each as (its target count, its padded micro-batches as (input_ids, attention_mask,
    labels, target count)). HF's loss is a mean over a micro-batch's targets; the batch-wide
    mean needs the batch's target count, so each micro-batch loss is re-weighted by its
    share."""
    epoch = 0
    while True:
        for batch in data.epoch_batches(epoch):
            examples = [data.train[i] for i in batch]
            batch_targets = sum(sum(1 for t in e.labels[1:] if t != -100) for e in examples)
            micro_batches = []
            for micro in data.micro_batches(batch, micro_batch_size):
                rows = [data.train[i] for i in micro]
                width = max(len(r.input_ids) for r in rows)
                ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rows])
                labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in rows])
                mask = torch.tensor([[1] * len(r.input_ids) + [0] * (width - len(r.input_ids))
                                     for r in rows])
                micro_batches.append((ids, mask, labels, int((labels[:, 1:] != -100).sum())))
            yield batch_targets, micro_batches
        epoch += 1


def _peft_reference_training(model_dir: Path, init_dir: Path, engine: Engine, name: str,
                             steps: int, log: list | None = None) -> dict[str, torch.Tensor]:
    """Train the adapter saved in ``init_dir`` with PEFT and a plain loop, same batches:
    torch's optimizer, transformers' schedule and torch's clip_grad_norm_ as ``name``'s
    config asks. Returns the adapter's weights; appends each step's lr and pre-clip norm
    to ``log``."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="sdpa")
    model = peft.PeftModel.from_pretrained(base, init_dir, is_trainable=True)
    cfg = engine.jobs[name].cfg
    optimizer = _reference_optimizer(model, cfg)
    scheduler = _reference_scheduler(optimizer, cfg, steps)
    params = [p for p in model.parameters() if p.requires_grad]
    log = [] if log is None else log
    batches = reference_batches(engine.jobs[name].data, cfg.micro_batch_size,
                                engine.tokenizer.pad_token_id)
    for batch_targets, micro_batches in itertools.islice(batches, steps):
        for ids, mask, labels, micro_targets in micro_batches:
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            (loss * micro_targets / batch_targets).backward()
        # No max_grad_norm: an infinite one, which scales by exactly 1.
        norm = torch.nn.utils.clip_grad_norm_(
            params, cfg.max_grad_norm if cfg.max_grad_norm is not None else math.inf)
        log.append({"lr": scheduler.get_last_lr()[0], "grad_norm": float(norm)})
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    state = peft.get_peft_model_state_dict(model)
    return {k: v.detach().clone() for k, v in state.items()}


@pytest.mark.parametrize("variant,packing", [
    ("lora", "on"), ("rslora", "on"), ("dora", "on"), ("loraplus", "on"),
    ("dora+loraplus", "on"), ("lora", "off"), ("dora", "off")])
def test_engine_training_equals_peft_training(variant, packing, tiny_llama, data_files,
                                              tmp_path):
    init_dir = peft_initial_adapter(tiny_llama, tmp_path / "init", use_rslora=variant == "rslora",
                                    use_dora="dora" in variant)
    cfg = AdapterConfig(prompt="alpaca_short", name="job", data=data_files["a"], r=4, lora_alpha=8, lora_dropout=0.0,
                        use_rslora=variant == "rslora", use_dora="dora" in variant,
                        loraplus_lr_ratio=8.0 if "loraplus" in variant else 1.0,
                        target_modules=["q_proj", "v_proj", "down_proj"], batch_size=4,
                        micro_batch_size=2, num_epochs=1, lr=3e-3, init_from=str(init_dir))
    engine = Engine(_run_config(tiny_llama, tmp_path / "out", [cfg], packing))
    engine.run()
    steps = engine.jobs["job"].step
    assert steps == 3
    reference = _peft_reference_training(tiny_llama, init_dir, engine, "job", steps)
    _assert_same(_weights(engine, "job"), reference, rtol=2e-5)


def test_saved_adapters_load_in_peft_and_reproduce_engine_logits(tiny_llama, data_files,
                                                                  tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    adapters = _three_adapters(data_files)
    for cfg in adapters:
        cfg.num_epochs = 1
    engine = Engine(_run_config(tiny_llama, tmp_path / "out", adapters))
    engine.run()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 11]])
    for cfg in adapters:
        folder = tmp_path / "out" / cfg.name
        engine.layout.set_single(cfg.name)
        with torch.no_grad():
            ours = engine.model(input_ids=ids).logits

        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        config = peft.LoraConfig.from_pretrained(folder)
        fresh = peft.get_peft_model(base, config)
        result = peft.set_peft_model_state_dict(fresh, load_file(folder / "adapter_model.safetensors"))
        assert not result.unexpected_keys
        assert not [k for k in result.missing_keys if "lora_" in k]

        base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        loaded = peft.PeftModel.from_pretrained(base, folder).eval()
        with torch.no_grad():
            theirs = loaded(input_ids=ids).logits
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


# -- loss masking ---------------------------------------------------------------------------


def _first_step_loss(model_dir, data_file, out, **overrides) -> float:
    cfg = AdapterConfig(prompt="alpaca_short", name="m", data=data_file, r=2, lora_alpha=4, lora_dropout=0.0,
                        batch_size=4, micro_batch_size=4, num_epochs=1, lr=1e-3,
                        target_modules=["q_proj"], **overrides)
    events = []
    engine = Engine(_run_config(model_dir, out, [cfg]), on_event=events.append)
    engine.run(max_steps=1)
    first = next(e for e in events if e["type"] == "step")
    return first["loss"], engine


@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_loss_counts_only_targets_and_equals_hf_loss(train_on_inputs, tiny_llama, data_files,
                                                     tmp_path):
    """At step 0 (B = 0) the engine's loss is the base model's HF loss over the same targets."""
    from transformers import AutoModelForCausalLM

    loss, engine = _first_step_loss(tiny_llama, data_files["b"], tmp_path / "o",
                                    train_on_inputs=train_on_inputs)
    job = engine.jobs["m"]
    batch = job.data.epoch_batches(0)[0]
    rows = [job.data.train[i] for i in batch]
    n_prompt = sum(1 for r in rows for t in r.labels if t == -100)
    assert (n_prompt > 0) != train_on_inputs
    pad = engine.tokenizer.pad_token_id
    width = max(len(r.input_ids) for r in rows)
    ids = torch.tensor([r.input_ids + [pad] * (width - len(r.input_ids)) for r in rows])
    mask = (torch.arange(width)[None, :] < torch.tensor([len(r.input_ids) for r in rows])[:, None])
    # The independent reference builds its labels from the raw ids: everything that is not
    # padding (train_on_inputs) or only the positions the data pipeline marked as response.
    if train_on_inputs:
        labels = ids.masked_fill(~mask, -100)
    else:
        labels = torch.tensor([r.labels + [-100] * (width - len(r.labels)) for r in rows])
        assert all(t == -100 for r in rows for t in r.labels[:1])
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32,
                                                attn_implementation="sdpa")
    with torch.no_grad():
        expected = base(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
    assert loss == pytest.approx(float(expected), rel=1e-5)


def test_padding_from_other_jobs_does_not_change_a_jobs_gradients(tiny_llama, data_files,
                                                                 tmp_path):
    """A job's gradient is the same when another job's long rows widen the batch."""
    short = AdapterConfig(prompt="alpaca_short", name="short", data=data_files["a"], r=2, lora_alpha=4,
                          lora_dropout=0.0, batch_size=2, micro_batch_size=2, num_epochs=1,
                          target_modules=["q_proj", "v_proj"], lr=1e-3)
    long_path = tmp_path / "long.jsonl"
    long_path.write_text(json.dumps({"text": " ".join(WORDS * 2)}) + "\n")
    wide = replace(short, name="wide", data=str(long_path), batch_size=1, micro_batch_size=1)

    def grads(adapters, out):
        events = []
        engine = Engine(_run_config(tiny_llama, tmp_path / out, adapters, packing="off"),
                        on_event=events.append)
        engine.pass_overhead = 10**9      # one forward pass, however uneven the lengths
        job = engine.jobs["short"]
        for j in engine.jobs.values():
            j.state = "running"
        # Run the forward/backward of one step without the optimizer step.
        job_step = job.optimizer_step
        captured = {}

        def capture(*args):
            captured.update({id(p): p.grad.clone() for p in job.parameters if p.grad is not None})
            return job_step(*args)
        job.optimizer_step = capture
        engine.step(list(engine.jobs.values()))
        (batch,) = [e for e in events if e["type"] == "batch"]
        assert batch["passes"] == 1 and batch["rows"] == len(adapters) + 1
        return [captured[id(p)] for p in job.parameters if id(p) in captured]

    alone = grads([short], "alone")
    together = grads([short, wide], "together")
    assert len(alone) == len(together) > 0
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _count_calls(engine: Engine) -> tuple[list, list]:
    """(forward calls of the first adapted layer, batched steps) as the engine runs."""
    from engine.train.lora import MultiLoraLinear

    calls, steps = [], []
    layer = next(m for m in engine.model.modules() if isinstance(m, MultiLoraLinear))
    layer.register_forward_hook(lambda *_: calls.append(1))
    step = engine.step
    engine.step = lambda jobs: (steps.append(1), step(jobs))
    return calls, steps


@LAYOUTS
def test_gradient_checkpointing_recomputes_and_gives_the_same_adapters(packing, tiny_llama,
                                                                       data_files, tmp_path):
    adapters = _three_adapters(data_files)
    for cfg in adapters:
        cfg.num_epochs = 1
    plain = Engine(_run_config(tiny_llama, tmp_path / "plain", adapters, packing))
    plain.pass_overhead = 10**9       # one forward pass per step: calls count steps
    plain_calls, plain_steps = _count_calls(plain)
    plain.run()
    config = _run_config(tiny_llama, tmp_path / "checkpointed", adapters, packing)
    config.train.gradient_checkpointing = True
    checkpointed = Engine(config)
    checkpointed.pass_overhead = 10**9
    calls, steps = _count_calls(checkpointed)
    checkpointed.run()
    # Every block runs once per step, and once more in the backward pass when checkpointed.
    assert len(plain_calls) == len(plain_steps) == len(steps) > 0
    assert len(calls) == 2 * len(steps)
    for cfg in adapters:
        _assert_same(_weights(checkpointed, cfg.name), _weights(plain, cfg.name), rtol=1e-5)


def test_bf16_base_trains_like_fp32_within_bf16_tolerance(tiny_llama, data_files, tmp_path):
    """The base in bf16, adapters and optimizer in fp32: close to the all-fp32 run."""
    adapters = _three_adapters(data_files)[:1]
    adapters[0].num_epochs = 1
    results = {}
    for dtype in ("fp32", "bf16"):
        config = _run_config(tiny_llama, tmp_path / dtype, adapters)
        config.model.dtype = dtype
        engine = Engine(config)
        engine.run()
        results[dtype] = _weights(engine, "plain")
        assert all(v.dtype == torch.float32 for v in results[dtype].values())
    for key, reference in results["fp32"].items():
        diff = (results["bf16"][key] - reference).norm() / reference.norm()
        assert diff < 0.05, f"{key}: {diff:.3g}"
    # ...and bf16 is not secretly fp32: the runs differ.
    assert any(not torch.equal(results["bf16"][k], v) for k, v in results["fp32"].items())


@LAYOUTS
def test_steps_split_into_passes_equal_one_pass(packing, tiny_llama, data_files, tmp_path):
    """A token budget (or length-aware grouping) runs a step as several forward passes;
    every adapter ends as with one pass per step."""
    adapters = _three_adapters(data_files)
    one = Engine(_run_config(tiny_llama, tmp_path / "one", adapters, packing))
    one.pass_overhead = 10**9
    one.run()
    config = _run_config(tiny_llama, tmp_path / "split", adapters, packing)
    config.train = replace(config.train, max_tokens_per_step=200)
    events = []
    split = Engine(config, on_event=events.append)
    split.run()
    passes = [e["passes"] for e in events if e["type"] == "batch"]
    assert max(passes) >= 3
    for cfg in adapters:
        _assert_same(_weights(split, cfg.name), _weights(one, cfg.name), rtol=1e-5)
