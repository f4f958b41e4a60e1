"""Training examples: tokenizing rows into input_ids and labels, and each job's batch order.

Rows come from ``engine.core.data_files`` (which reads and checks the files):

* Alpaca rows are rendered with a prompt template (``engine.core.prompts``); the output
  plus EOS is the target.
* Text rows: every token is a target (plain language-model training).
* Messages rows are rendered with the tokenizer's chat template; only assistant turns are
  targets.

``JobData`` holds one adapter's encoded train/validation examples and decides which examples
form each optimizer step. The order depends only on (seed, epoch, data), never on which
other adapters share the run, so a job trained alone or with others sees exactly the same
batches and a resumed job recomputes them.

This module is pure Python and never imports torch: the CLI validates data without it.
The tokenizer is passed in (any Hugging Face tokenizer), never imported here.
"""

from __future__ import annotations

import math
import os
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from engine.core.data_files import RowError, load_data_file, row_kind
from engine.core.errors import ConfigError, DataError
from engine.core.prompts import PromptTemplate, load_template

IGNORE_INDEX = -100                 # label for tokens outside the loss (PyTorch's default)


# --------------------------------------------------------------------------------------
# Encoding
# --------------------------------------------------------------------------------------

@dataclass
class Encoded:
    """One tokenized example. ``labels[i]`` is ``input_ids[i]`` or ``IGNORE_INDEX``.

    Labels are aligned with ``input_ids`` (not shifted): the model shifts them, so the
    label at position 0 never enters the loss.
    """

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens that contribute to the loss (position 0 is never predicted)."""
        return sum(1 for t in self.labels[1:] if t != IGNORE_INDEX)


def encode_row(row: dict, tokenizer: Any, template: Optional[PromptTemplate], cutoff_len: int,
               train_on_inputs: bool = False, *, file: str = "<row>",
               line: Optional[int] = None) -> Encoded:
    """Tokenize one row into ``input_ids`` and ``labels``, truncated to ``cutoff_len``.

    Alpaca rows: prompt = ``tokenizer(template.render(...), add_special_tokens=True)``,
    response = ``tokenizer(output, add_special_tokens=False) + [eos]``; the two id lists
    are concatenated, so no token can straddle the prompt/response boundary. Prompt labels
    are ``IGNORE_INDEX`` unless ``train_on_inputs``. With the ``chat`` template the row is
    encoded as a user/assistant conversation (see messages rows).

    Text rows: ``tokenizer(text, add_special_tokens=True) + [eos]``, all targets.

    Messages rows: rendered with the tokenizer's chat template; each assistant turn's
    tokens are found by rendering conversation prefixes, and only the assistant content
    with its end-of-turn token is a target. The example ends with the final end-of-turn
    token (template text after it, such as ChatML's trailing newline, is dropped) so it
    ends, like every example, on a target end token.

    ``file`` and ``line`` only label ``DataError`` messages. Truncation keeps the start.
    """
    if cutoff_len < 1:
        raise ConfigError(f"cutoff_len must be at least 1, got {cutoff_len}", field="cutoff_len")
    try:
        kind = row_kind(row)
        if kind == "messages":
            ids, labels = _encode_messages(row["messages"], tokenizer, train_on_inputs)
        elif kind == "text":
            ids = _tokenize(tokenizer, row["text"], True) + [_eos_id(tokenizer)]
            labels = list(ids)
        elif template is None:
            raise RowError("an Alpaca row needs a prompt template")
        elif template.chat:
            messages = [
                {"role": "user",
                 "content": template.user_message(row["instruction"], row.get("input") or "")},
                {"role": "assistant", "content": row["output"]},
            ]
            ids, labels = _encode_messages(messages, tokenizer, train_on_inputs)
        else:
            ids, labels = _encode_alpaca(row, tokenizer, template, train_on_inputs)
    except RowError as e:
        raise DataError(str(e), file=file, line=line) from None
    truncated = len(ids) > cutoff_len
    return Encoded(input_ids=ids[:cutoff_len], labels=labels[:cutoff_len], truncated=truncated)


def _encode_alpaca(row: dict, tokenizer: Any, template: PromptTemplate,
                   train_on_inputs: bool) -> tuple[list[int], list[int]]:
    eos = _eos_id(tokenizer)
    prompt_text = template.render(row["instruction"], row.get("input") or "")
    prompt = _tokenize(tokenizer, prompt_text, True)
    # Tokenizers configured to append EOS to every encoding would put one mid-example.
    if prompt and prompt[-1] == eos and not prompt_text.endswith(str(tokenizer.eos_token)):
        prompt = prompt[:-1]
    response = _tokenize(tokenizer, row["output"], False) + [eos]
    ids = prompt + response
    labels = (list(prompt) if train_on_inputs else [IGNORE_INDEX] * len(prompt)) + response
    return ids, labels


def _encode_messages(messages: list[dict], tokenizer: Any,
                     train_on_inputs: bool) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise RowError("chat rows need a tokenizer with a chat template, and this one has none")
    full = _render_ids(tokenizer, messages, False)
    labels = list(full) if train_on_inputs else [IGNORE_INDEX] * len(full)
    specials = _special_ids(tokenizer)
    last_stop = len(full)
    last_has_end = True
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # The assistant span: what the conversation up to this turn adds to the prompt
        # "history + assistant header". Both renderings must be token prefixes of the full
        # conversation; a template that rewrites history (e.g. drops earlier reasoning)
        # breaks that, and we refuse rather than mislabel.
        start = _checked_prefix(tokenizer, messages[:i], True, full, i)
        end = _checked_prefix(tokenizer, messages[:i + 1], False, full, i + 1)
        # Targets run through the turn's last special token (its end-of-turn: <|im_end|>,
        # <|eot_id|>, </s>...). Template text after it (ChatML's "\n") is not the answer.
        stop = end
        last_has_end = False
        for j in range(end - 1, start - 1, -1):
            if full[j] in specials:
                stop, last_has_end = j + 1, True
                break
        labels[start:stop] = full[start:stop]
        last_stop = stop
    # The last message is the assistant's (validated): end the example on its end token.
    ids, labels = full[:last_stop], labels[:last_stop]
    if not last_has_end:
        # A template with no end-of-turn token: the model must still learn to stop.
        eos = _eos_id(tokenizer)
        ids, labels = ids + [eos], labels + [eos]
    return ids, labels


def _checked_prefix(tokenizer: Any, messages: list[dict], add_generation_prompt: bool,
                    full: list[int], count: int) -> int:
    ids = _render_ids(tokenizer, messages, add_generation_prompt)
    if full[:len(ids)] != ids:
        what = " plus the assistant header" if add_generation_prompt else ""
        raise RowError(
            f"the chat template's rendering of the first {count} message(s){what} is not "
            f"a token prefix of the whole conversation, so assistant turns cannot be "
            f"located; use a template that renders earlier turns unchanged")
    return len(ids)


def _render_ids(tokenizer: Any, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    # The template already holds any BOS the model wants: add no special tokens.
    return _tokenize(tokenizer, text, False)


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _eos_id(tokenizer: Any) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ConfigError("the tokenizer has no EOS token; examples could not end")
    return int(eos)


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    # Chat markers such as <|im_end|> are often added tokens, not named special tokens.
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, tok in decoder.items() if getattr(tok, "special", False))
    return ids


# --------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------

def micro_batches(batch: list[int], micro_batch_size: int) -> list[list[int]]:
    """Split one optimizer step's example indices into micro-batches (last may be shorter)."""
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be at least 1, got {micro_batch_size}")
    return [batch[i:i + micro_batch_size] for i in range(0, len(batch), micro_batch_size)]


@dataclass
class JobData:
    """One adapter's examples and its step-by-step batch order.

    ``train``/``val`` are encoded examples; examples left with no target token (after
    truncation) are dropped and counted in ``num_no_targets`` (``warnings()`` reports it).
    Build one with ``JobData.from_config``; the constructor takes ready examples.
    """

    train: list[Encoded]
    val: list[Encoded]
    batch_size: int
    micro_batch_size: int
    seed: int
    group_by_length: bool = False
    name: str = ""
    cutoff_len: Optional[int] = None
    num_truncated: int = 0
    num_no_targets: int = 0
    no_target_lines: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}",
                              table=self._table(), field="batch_size")
        if self.micro_batch_size < 1:
            raise ConfigError(f"micro_batch_size must be at least 1, got "
                              f"{self.micro_batch_size}", table=self._table(),
                              field="micro_batch_size")

    def _table(self) -> Optional[str]:
        return f"adapter '{self.name}'" if self.name else None

    @classmethod
    def from_config(cls, adapter: Any, tokenizer: Any, template: Optional[PromptTemplate],
                    default_cutoff_len: int, default_seed: int, *,
                    base_dir: Optional[str] = None) -> "JobData":
        """Load, split and encode the data of one ``AdapterConfig``-like object.

        Uses ``data``, ``prompt`` (when ``template`` is None), ``cutoff_len`` and ``seed``
        (None: the defaults given), ``train_on_inputs``, ``val_set_size``,
        ``group_by_length``, ``batch_size``, ``micro_batch_size`` and ``name``. A relative
        ``data`` path is resolved against ``base_dir`` when given.
        """
        name = getattr(adapter, "name", "")
        table = f"adapter '{name}'" if name else None
        cutoff = adapter.cutoff_len if getattr(adapter, "cutoff_len", None) is not None \
            else default_cutoff_len
        seed = adapter.seed if getattr(adapter, "seed", None) is not None else default_seed
        if template is None:
            template = load_template(getattr(adapter, "prompt", "alpaca"), base_dir=base_dir)
        path = adapter.data
        if base_dir and not os.path.isabs(path):
            path = os.path.join(base_dir, path)

        data = load_data_file(path)
        needs_chat = data.kind == "messages" or (data.kind == "alpaca" and template.chat)
        if needs_chat and not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"{data.path} needs the tokenizer's chat template ("
                              f"{'messages rows' if data.kind == 'messages' else 'prompt chat'}"
                              f"), but this tokenizer has none", table=table, field="prompt")
        _eos_id(tokenizer)

        val_size = int(getattr(adapter, "val_set_size", 0) or 0)
        n = len(data.rows)
        if val_size < 0:
            raise ConfigError(f"val_set_size must be 0 or more, got {val_size}",
                              table=table, field="val_set_size")
        if val_size >= n:
            raise ConfigError(f"val_set_size {val_size} leaves no training rows "
                              f"({data.path} has {n})", table=table, field="val_set_size")
        train_idx, val_idx = split_indices(n, val_size, seed)

        train_on_inputs = bool(getattr(adapter, "train_on_inputs", False))
        stats = {"num_truncated": 0, "num_no_targets": 0, "no_target_lines": []}

        def encode(indices: Iterable[int]) -> list[Encoded]:
            out = []
            for i in indices:
                enc = encode_row(data.rows[i], tokenizer, template, cutoff, train_on_inputs,
                                 file=data.path, line=data.lines[i])
                stats["num_truncated"] += enc.truncated
                if enc.num_targets == 0:
                    # Nothing to learn (e.g. the prompt alone fills cutoff_len); keeping it
                    # would only spend compute, and a micro-batch of such rows has no loss.
                    stats["num_no_targets"] += 1
                    stats["no_target_lines"].append(data.lines[i])
                    continue
                out.append(enc)
            return out

        train, val = encode(train_idx), encode(val_idx)
        if not train:
            raise DataError(f"no training example has a target token within cutoff_len "
                            f"{cutoff}; raise cutoff_len or shorten the prompts",
                            file=data.path)
        return cls(train=train, val=val, batch_size=adapter.batch_size,
                   micro_batch_size=adapter.micro_batch_size, seed=seed,
                   group_by_length=bool(getattr(adapter, "group_by_length", False)),
                   name=name, cutoff_len=cutoff, **stats)

    # -- order ---------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train) / self.batch_size)

    def total_steps(self, num_epochs: int) -> int:
        return self.steps_per_epoch * num_epochs

    def epoch_order(self, epoch: int) -> list[int]:
        """Every train index once, in this epoch's order."""
        n = len(self.train)
        if self.group_by_length:
            # As m-LoRA: longest first, the same every epoch; ties keep file order.
            return sorted(range(n), key=lambda i: (-len(self.train[i]), i))
        order = list(range(n))
        # A string seed is hashed with SHA-512 by random.Random: stable across processes
        # and PYTHONHASHSEED, and independent of every other adapter's random stream.
        random.Random(f"mlora-tui/epoch/{self.seed}/{epoch}").shuffle(order)
        return order

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The train indices of each optimizer step of ``epoch`` (0-based)."""
        order = self.epoch_order(epoch)
        return [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]

    def micro_batches(self, batch: list[int],
                      micro_batch_size: Optional[int] = None) -> list[list[int]]:
        return micro_batches(batch, micro_batch_size or self.micro_batch_size)

    def warnings(self) -> list[str]:
        """Things the engine should tell the user about this adapter's data."""
        who = f"adapter '{self.name}': " if self.name else ""
        out = []
        if self.num_truncated:
            out.append(f"{who}{self.num_truncated} example(s) were truncated to cutoff_len "
                       f"{self.cutoff_len}")
        if self.num_no_targets:
            lines = ", ".join(str(x) for x in self.no_target_lines[:5])
            more = ", ..." if len(self.no_target_lines) > 5 else ""
            out.append(f"{who}{self.num_no_targets} example(s) have no target token within "
                       f"cutoff_len {self.cutoff_len} and are skipped (lines {lines}{more})")
        return out


def split_indices(n: int, val_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Row indices for (train, val): ``val_size`` rows picked by a seeded shuffle.

    Both lists keep file order, so the train indices do not depend on the shuffle's
    internals beyond which rows were picked.
    """
    order = list(range(n))
    random.Random(f"mlora-tui/val/{seed}").shuffle(order)
    val = sorted(order[:val_size])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val
