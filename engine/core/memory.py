"""Peak memory of a LoRA training step, estimated from a model config and a job set. No torch.

``estimate_peak_bytes(model, jobs, ...)`` returns bytes; ``estimate_breakdown`` returns the
same estimate by component. ``model`` is a Hugging Face config (a ``config.json`` dict, a
``PretrainedConfig``, or anything with those attribute names) of a LLaMA-style decoder
(q/k/v/o projections, a gated MLP of gate/up/down, RMSNorm); ``jobs`` are ``JobLoad``s, one
per adapter in the step (its micro-batch rows, their padded length, rank, targets, target
tokens). It compares with ``torch.cuda.max_memory_allocated`` on CUDA and with the
process's peak resident set size (VmHWM) on CPU.

What is counted (bytes; ``b`` = bytes per base-weight element, 2 for bf16/fp16, 4 for fp32;
``h`` hidden size, ``q`` = heads x head_dim, ``kv`` = KV heads x head_dim, ``I`` MLP width,
``V`` vocabulary, ``L`` layers, ``P`` token positions run through the decoder in a pass):

* **weights**: every base parameter x ``b`` (tied embeddings counted once).
* **adapters**: LoRA parameters ``L x sum over targets of r x (in + out)``, fp32: weights 4,
  gradients 4, AdamW's two moments 8 bytes per parameter (SGD: momentum 4 or nothing).
  ``engine``: every job's gradients exist at once; ``peft``: all adapters' weights and
  optimizer states stay resident, the gradients of one adapter at a time.
* **activations** saved for the backward pass, per position per layer:
  - the two RMSNorms keep their fp32 upcast of the input: ``2 x 4h``;
  - SDPA keeps q, k, v and its output in the base dtype: ``b x (2q + 2kv')``, where
    ``kv' = q`` when the model has fewer KV heads than heads (transformers repeats k and v
    for SDPA whenever an attention mask is passed, as padded batches do) else ``kv``;
    eager attention also keeps the softmax probabilities: ``heads x width x (4 + b)``;
  - the gated MLP keeps gate and up outputs and SiLU(gate): ``3 x I x b``;
  - each targeted linear keeps the fp32 copy of its input for ``x @ A.T`` (``4 x in``)
    and, with dropout, the dropout mask: fp32 in the engine and in torch's CPU dropout
    (``8 x in`` in all), bool in CUDA's fused dropout (PEFT on CUDA: ``5 x in``);
  - frozen base linears keep nothing (their weight gradient is never needed);
  plus the 4-D boolean attention mask, ``rows x width^2``. Packed passes (``packed``) run
  only real tokens, with no mask and k, v not repeated.
  The engine pads the rows of a pass to the pass's longest row: ``P = rows x width``
  over the pass's jobs (``passes``: the engine may split a step into several passes,
  ``engine.train.planning.plan_passes``; the largest pass counts). PEFT runs one adapter at a time
  on its own rows and width (the largest counts). With gradient checkpointing only each
  block's input is kept (``b x h`` per position per layer), plus one recomputed block.
* **backward working set**: one more layer's activations (the gradients and temporaries
  alive while a block's backward runs).
* **head / loss**: ``engine`` (engine/train/loss.py) runs the LM head on target positions only,
  ``head_chunk`` positions at a time, computing the loss and its gradient at once: one
  chunk's logits, fp32 logits/log-softmax and bf16 gradient, ``(8 + b) x V x chunk``, plus
  the kept gradient and gathered hidden states, ``2b x h`` per target. ``peft`` (Hugging
  Face's ``labels=`` loss) computes logits for every position and keeps them (``b``) and
  their fp32 log-softmax (4) through the backward, which adds the loss gradient and the
  log-softmax gradient (4 + 4): ``(b + 12) x V x P``; and the final norm's upcast, ``4h``.
* **CPU only**: ``allocator`` = ``CPU_ALLOCATOR_FACTOR - 1`` times the step's tensors
  (activations, backward, head): what glibc's malloc keeps resident after tensors are
  freed; ``runtime`` = ``CPU_RUNTIME_BYTES``, the resident size of Python with torch,
  transformers, peft and the tokenizer. On CUDA both are 0: ``max_memory_allocated``
  leaves out the CUDA context (about 0.5 GiB per process more in ``nvidia-smi``) and the
  caching allocator's reserve (``max_memory_reserved``).

Not counted: quantized weights (4/8-bit), DoRA's weight-norm temporaries, optimizer
``foreach`` temporaries, MixLoRA experts.

Validation (2026-11-28, CPU, bf16, torch 2.13; no GPU yet): the tensor part
(activations + backward + head) against the growth of the resident set during a step with
malloc returning every freed block (``MALLOC_MMAP_THRESHOLD_=65536
MALLOC_TRIM_THRESHOLD_=0``), SmolLM2-135M shape, 2 rows of 178-256 tokens per adapter:
engine with 1 adapter 697/416 MiB measured vs 706/423 estimated, with 2 adapters
1257/801 vs 1265/812; PEFT with 2 adapters 884/616 vs 895/623 (within 2%). Whole-process
peak RSS in ``bench/bench.py`` runs with default malloc (tiny and SmolLM2 shapes, N = 1,
2, 4, 2 rows per adapter): engine -9% to +5%, N PEFT processes -3% to +3%, one PEFT
process holding N adapters -1% to -10% up to N = 2 but -10% (SmolLM2) and -25% (tiny) at
N = 4: such a process runs N differently shaped steps per step, and its resident set grows
by tens of MiB per step with new shapes (oneDNN's primitive cache is part of it), which
this estimate does not model. fp32 with gradient checkpointing and eager attention (tiny
shape): +5% to +18%. The CUDA figures follow the same counts (PEFT's dropout mask as bool)
and are unchecked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

CPU_RUNTIME_BYTES = 400 * 2**20
CPU_ALLOCATOR_FACTOR = 1.35
ENGINE_HEAD_CHUNK = 1024          # engine.train.loss.DEFAULT_CHUNK (not imported: that needs torch)
DTYPE_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass
class JobLoad:
    """One adapter's share of a training step."""
    rows: int                      # rows of its micro-batch
    seq_len: int                   # its longest row (its rows' padded width), in tokens
    r: int = 8
    target_modules: Sequence[str] = DEFAULT_TARGETS
    target_tokens: int | None = None   # positions with a label; None: half of rows x seq_len
    lora_dropout: float = 0.05
    optimizer: str = "adamw"       # adamw | sgd (with momentum) | sgd0 (no momentum)
    tokens: int | None = None      # its real (non-padding) tokens; None: rows x seq_len

    @property
    def real_tokens(self) -> int:
        return self.tokens if self.tokens is not None else self.rows * self.seq_len

    @property
    def targets(self) -> int:
        if self.target_tokens is not None:
            return self.target_tokens
        return self.rows * self.seq_len // 2


@dataclass
class ModelShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    extra_params: int = 0          # anything else (biases, extra norms)
    linears: dict = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Any) -> "ModelShape":
        get = (config.get if isinstance(config, Mapping)
               else lambda key, default=None: getattr(config, key, default))
        hidden = get("hidden_size")
        heads = get("num_attention_heads")
        kv_heads = get("num_key_value_heads") or heads
        head_dim = get("head_dim") or hidden // heads
        shape = cls(hidden=hidden, layers=get("num_hidden_layers"), heads=heads,
                    kv_heads=kv_heads, head_dim=head_dim,
                    intermediate=get("intermediate_size"), vocab=get("vocab_size"),
                    tied=bool(get("tie_word_embeddings", False)))
        q, kv, h, i = heads * head_dim, kv_heads * head_dim, hidden, shape.intermediate
        shape.linears = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
            # fused or other families' names, for adapter sizes
            "qkv_proj": (h, q + 2 * kv), "gate_up_proj": (h, 2 * i), "dense": (q, h),
            "fc1": (h, i), "fc2": (i, h),
        }
        return shape

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def decoder_matmul_params(self) -> int:
        """Weights of the decoder's linear layers (all layers)."""
        names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
        return self.layers * sum(self.linears[n][0] * self.linears[n][1] for n in names)

    def num_params(self) -> int:
        embed = self.vocab * self.hidden
        norms = self.layers * 2 * self.hidden + self.hidden
        return (self.decoder_matmul_params() + embed * (1 if self.tied else 2) + norms
                + self.extra_params)

    def lora_params(self, r: int, targets: Iterable[str]) -> int:
        total = 0
        for name in targets:
            fan_in, fan_out = self.linears.get(name, (self.hidden, self.hidden))
            total += r * (fan_in + fan_out)
        return self.layers * total


def _dtype_bytes(dtype: str) -> int:
    try:
        return DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp32, bf16 or fp16") from None


def _lora_saved_per_position(shape: ModelShape, job: JobLoad, implementation: str,
                             device: str) -> int:
    """Bytes the targeted linears keep per position per layer, summed over targets."""
    if job.lora_dropout <= 0:
        per_in = 4
    elif implementation == "engine" or device == "cpu":
        per_in = 8      # fp32 input copy + fp32 mask (torch's CPU dropout keeps a float mask)
    else:
        per_in = 5      # fp32 input copy + bool mask (CUDA's fused dropout)
    return sum(per_in * shape.linears.get(t, (shape.hidden, shape.hidden))[0]
               for t in job.target_modules)


def _base_saved_per_position(shape: ModelShape, b: int, seq_len: int, attn_impl: str,
                             repeat_kv: bool = True) -> int:
    """Bytes a decoder layer keeps per position for backward, adapters aside."""
    kv_saved = shape.q_dim if repeat_kv and shape.kv_heads < shape.heads else shape.kv_dim
    saved = 2 * 4 * shape.hidden                       # RMSNorm fp32 upcasts
    saved += b * (2 * shape.q_dim + 2 * kv_saved)      # SDPA: q, k, v, output
    saved += 3 * shape.intermediate * b                # gate, up, silu(gate)
    if attn_impl == "eager":
        saved += shape.heads * seq_len * (4 + b)       # softmax probabilities
    return saved


def estimate_breakdown(model: Any, jobs: Sequence[JobLoad], *, dtype: str = "bf16",
                       device: str = "cpu", gradient_checkpointing: bool = False,
                       attn_impl: str = "sdpa", implementation: str = "engine",
                       passes: Sequence[Sequence[int]] | None = None,
                       head_chunk: int = ENGINE_HEAD_CHUNK,
                       runtime_bytes: int | None = None,
                       packed: bool = False) -> dict[str, int]:
    """The estimate by component (bytes): weights, adapters, activations, backward, head,
    runtime, and their sum under ``total``.

    ``implementation``: ``"engine"`` (this engine: the jobs' micro-batches concatenated in
    one forward/backward pass, or in the ``passes`` given as lists of job indices, one pass
    after another, as the engine's ``plan_passes`` may group them) or ``"peft"`` (one PEFT
    model holding every job's adapter, trained one adapter at a time; a single PEFT process
    is ``"peft"`` with one job). ``head_chunk``: the engine's LM-head loss chunk in tokens
    (``engine.train.loss.DEFAULT_CHUNK``; 0: unchunked). ``packed``: the engine's passes hold
    their examples back to back (engine/train/packing.py): ``P`` is their real tokens, with no
    attention mask and k, v not repeated (SDPA per example, with grouped-query support).
    """
    if implementation not in ("engine", "peft"):
        raise ValueError(f"implementation must be 'engine' or 'peft', got {implementation!r}")
    if not jobs:
        raise ValueError("no jobs")
    shape = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    b = _dtype_bytes(dtype)
    out: dict[str, int] = {"weights": shape.num_params() * b}
    lora = [shape.lora_params(j.r, j.target_modules) for j in jobs]
    resident = sum(p * (4 + _optimizer_state_bytes(j)) for p, j in zip(lora, jobs))
    grads = 4 * (sum(lora) if implementation == "engine" else max(lora))
    out["adapters"] = resident + grads

    cost = _PassCost(shape, b, device, attn_impl, head_chunk)
    if implementation == "engine":
        groups = [[jobs[i] for i in g] for g in passes] if passes else [list(jobs)]
        costs = [cost.packed(g) if packed else cost.padded(g) for g in groups if g]
    else:
        costs = [cost.peft(j) for j in jobs]

    def activations(c: tuple[int, int, int, int]) -> int:
        layer, _head, positions, mask = c
        kept = (shape.layers * b * shape.hidden * positions + layer if gradient_checkpointing
                else shape.layers * layer)
        return kept + mask                              # mask: the 4-D boolean attention mask

    worst = max(costs, key=lambda c: activations(c) + c[0] + c[1])
    out["activations"] = activations(worst)
    out["backward"] = worst[0]
    out["head"] = worst[1]
    if device == "cpu":
        # What glibc keeps resident beyond the step's live tensors (freed blocks it does
        # not hand back), in proportion to what the step allocates and frees.
        step = out["activations"] + out["backward"] + out["head"]
        out["allocator"] = int(step * (CPU_ALLOCATOR_FACTOR - 1))
    if runtime_bytes is None:
        runtime_bytes = CPU_RUNTIME_BYTES if device == "cpu" else 0
    out["runtime"] = runtime_bytes
    out["total"] = sum(out.values())
    return out


def _optimizer_state_bytes(job: JobLoad) -> int:
    return {"adamw": 8, "sgd": 4, "sgd0": 0}.get(job.optimizer, 8)


@dataclass
class _PassCost:
    """One forward/backward pass's (per-layer activations, head, positions, mask) bytes."""

    shape: ModelShape
    b: int                  # bytes per base-model element
    device: str
    attn_impl: str
    head_chunk: int

    def _head_chunk(self, group: Sequence[JobLoad]) -> int:
        biggest = max(j.targets for j in group)
        return min(self.head_chunk, biggest) if self.head_chunk else biggest

    def padded(self, group: Sequence[JobLoad]) -> tuple[int, int, int, int]:
        """An engine pass of padded rows."""
        shape, b = self.shape, self.b
        width = max(j.seq_len for j in group)
        base = _base_saved_per_position(shape, b, width, self.attn_impl)
        rows = sum(j.rows for j in group)
        layer = sum(j.rows * width
                    * (base + _lora_saved_per_position(shape, j, "engine", self.device))
                    for j in group)
        targets = sum(j.targets for j in group)
        # Each job's gradient w.r.t. its target hidden states is kept (and its gathered
        # hidden states); one chunk's logits, log-softmax and gradient exist at a time.
        head = 2 * b * shape.hidden * targets + (8 + b) * shape.vocab * self._head_chunk(group)
        head += 4 * shape.hidden * rows * width            # final norm's fp32 upcast
        return layer, head, rows * width, rows * width * width

    def packed(self, group: Sequence[JobLoad]) -> tuple[int, int, int, int]:
        """An engine pass of examples back to back in one row: no mask, k/v not repeated."""
        shape, b = self.shape, self.b
        base = _base_saved_per_position(shape, b, 0, "sdpa", repeat_kv=False)
        positions = sum(j.real_tokens for j in group)
        layer = sum(j.real_tokens
                    * (base + _lora_saved_per_position(shape, j, "engine", self.device))
                    for j in group)
        head = 2 * b * shape.hidden * sum(j.targets for j in group)
        head += (8 + b) * shape.vocab * self._head_chunk(group) + 4 * shape.hidden * positions
        return layer, head, positions, 0

    def peft(self, j: JobLoad) -> tuple[int, int, int, int]:
        """PEFT's pass of one adapter: full logits for every position."""
        shape, b = self.shape, self.b
        base = _base_saved_per_position(shape, b, j.seq_len, self.attn_impl)
        positions = j.rows * j.seq_len
        layer = positions * (base + _lora_saved_per_position(shape, j, "peft", self.device))
        head = ((b + 12) * shape.vocab + 4 * shape.hidden) * positions
        return layer, head, positions, positions * j.seq_len


def estimate_peak_bytes(model: Any, jobs: Sequence[JobLoad], *, dtype: str = "bf16",
                        device: str = "cpu", gradient_checkpointing: bool = False,
                        attn_impl: str = "sdpa", implementation: str = "engine",
                        passes: Sequence[Sequence[int]] | None = None,
                        head_chunk: int = ENGINE_HEAD_CHUNK,
                        runtime_bytes: int | None = None, packed: bool = False) -> int:
    """Estimated peak memory (bytes) of training ``jobs`` in one step on ``model``.

    On CPU it compares with the process's peak resident set size (VmHWM), on CUDA with
    ``torch.cuda.max_memory_allocated``. See the module docstring for what is counted.
    """
    return estimate_breakdown(model, jobs, dtype=dtype, device=device,
                              gradient_checkpointing=gradient_checkpointing,
                              attn_impl=attn_impl, implementation=implementation,
                              passes=passes, head_chunk=head_chunk,
                              runtime_bytes=runtime_bytes, packed=packed)["total"]
