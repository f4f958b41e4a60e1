"""Prompt templates: how an Alpaca row (instruction, input, output) becomes prompt text.

A template renders the *prompt* only; the response (the row's ``output``) is appended after
it by the encoder, which tokenizes the two separately (see ``engine.core.data.encode_row``).

Templates come from two places:

* built-in names (``BUILTIN_TEMPLATE_NAMES``): ``alpaca``, ``alpaca_short``, ``mlora``,
  ``none`` and ``chat``;
* a JSON file in the alpaca-lora / m-LoRA prompter format::

      {
        "description": "optional free text",
        "prompt_input": "... {instruction} ... {input} ...",
        "prompt_no_input": "... {instruction} ...",
        "response_split": "### Response:"
      }

  ``prompt_input`` is used when the row has a non-empty ``input``, ``prompt_no_input``
  otherwise. ``response_split`` is the marker after which a generated text is the answer.
  Placeholders use ``str.format`` syntax (``{{``/``}}`` for literal braces), but only the
  two names ``instruction`` and ``input`` are accepted, so a template cannot reach
  attributes or positional arguments.

The ``chat`` template is special: it renders the row as one user message with the
tokenizer's own chat template, and the response becomes the assistant turn.

This module never imports torch (the CLI validates configs without it).
"""

from __future__ import annotations

import json
import os
import string
from dataclasses import dataclass
from typing import Any, Optional

from engine.core.errors import ConfigError

# Placeholder names a template may use; anything else is a config mistake.
_ALLOWED_FIELDS = frozenset({"instruction", "input"})
_REQUIRED_KEYS = ("prompt_input", "prompt_no_input", "response_split")


@dataclass(frozen=True)
class PromptTemplate:
    """One prompt format. ``chat=True`` means "use the tokenizer's chat template"."""

    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = ""
    description: str = ""
    chat: bool = False

    def user_message(self, instruction: str, input: str = "") -> str:
        """The user turn for the ``chat`` template: instruction, then the input if any."""
        return f"{instruction}\n\n{input}" if input else instruction

    def render(self, instruction: str, input: str = "", tokenizer: Any = None) -> str:
        """The prompt text for one row; the response is appended after it, unrendered.

        For ``chat`` templates ``tokenizer`` must have a chat template; the result ends
        with the assistant generation prompt (e.g. ``<|im_start|>assistant\\n``).
        """
        if self.chat:
            if tokenizer is None or not getattr(tokenizer, "chat_template", None):
                raise ConfigError(
                    f"prompt template '{self.name}' needs a tokenizer with a chat template",
                    field="prompt")
            messages = [{"role": "user", "content": self.user_message(instruction, input)}]
            return tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True)
        # format_map with an explicit dict: only the two validated names are substituted.
        if input:
            return self.prompt_input.format_map({"instruction": instruction, "input": input})
        return self.prompt_no_input.format_map({"instruction": instruction})

    def split_response(self, generated: str) -> str:
        """The answer part of a generated text: what follows the last ``response_split``."""
        if self.response_split and self.response_split in generated:
            return generated.rsplit(self.response_split, 1)[1].strip()
        return generated.strip()


_BUILTINS: dict[str, PromptTemplate] = {
    "alpaca": PromptTemplate(
        name="alpaca",
        description="The classic Stanford Alpaca / alpaca-lora prompt.",
        prompt_input=(
            "Below is an instruction that describes a task, paired with an input that "
            "provides further context. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n"
            "### Response:\n"),
        prompt_no_input=(
            "Below is an instruction that describes a task. Write a response that "
            "appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
            "### Response:\n"),
        response_split="### Response:",
    ),
    "alpaca_short": PromptTemplate(
        name="alpaca_short",
        description="Alpaca without the preamble sentence: same sections, fewer tokens.",
        prompt_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
        prompt_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
        response_split="### Response:",
    ),
    "mlora": PromptTemplate(
        name="mlora",
        description="m-LoRA's default prompt: Alpaca sections with an '### Output:' marker.",
        prompt_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Output:\n",
        prompt_no_input="### Instruction:\n{instruction}\n\n### Output:\n",
        response_split="### Output:",
    ),
    "none": PromptTemplate(
        name="none",
        description="No decoration: the instruction, a newline and the input.",
        prompt_input="{instruction}\n{input}",
        prompt_no_input="{instruction}",
        response_split="",
    ),
    "chat": PromptTemplate(
        name="chat",
        description="The row as a user message in the tokenizer's chat template; the "
                    "output is the assistant turn.",
        chat=True,
    ),
}

BUILTIN_TEMPLATE_NAMES: frozenset[str] = frozenset(_BUILTINS)


def load_template(name_or_path: str, *, base_dir: Optional[str] = None) -> PromptTemplate:
    """A built-in template by name, or one read from a template JSON file.

    A relative path is taken relative to ``base_dir`` when given (e.g. the config file's
    folder). Unknown names and bad files raise ``ConfigError`` naming the file and key.
    """
    if name_or_path in _BUILTINS:
        return _BUILTINS[name_or_path]
    path = name_or_path
    if base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    if not os.path.isfile(path):
        if os.sep in name_or_path or "/" in name_or_path or name_or_path.endswith(".json"):
            raise ConfigError(f"prompt template file not found: {path}", field="prompt")
        raise ConfigError(
            f"unknown prompt template '{name_or_path}'; built-ins are "
            f"{', '.join(sorted(BUILTIN_TEMPLATE_NAMES))}, or give a path to a template "
            f"JSON file", field="prompt")
    return _read_template_file(path)


def _read_template_file(path: str) -> PromptTemplate:
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)   # templates are tiny; a huge file is a mistake
            if f.read(1):
                raise ConfigError("template file is larger than 1 MiB", file=path)
        obj = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"template file is not UTF-8 (byte offset {e.start})",
                          file=path) from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"template is not valid JSON: {e.msg} at line {e.lineno} "
                          f"column {e.colno}", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read template file: {e.strerror}", file=path) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"template must be a JSON object, got {type(obj).__name__}",
                          file=path)

    for key in _REQUIRED_KEYS:
        if key not in obj:
            hint = ""
            if key == "prompt_input" and "prompt" in obj:
                # The older m-LoRA format puts {output} inside "prompt"; say what to change.
                hint = (" (this looks like the older m-LoRA format with 'prompt' and an "
                        "{output} placeholder: rename 'prompt' to 'prompt_input', drop "
                        "{output} and what follows it from both prompts, and add "
                        "'response_split')")
            raise ConfigError(f"missing key '{key}'{hint}", file=path, field=key)
        if not isinstance(obj[key], str):
            raise ConfigError(f"'{key}' must be a string, got {type(obj[key]).__name__}",
                              file=path, field=key)
    description = obj.get("description", "")
    if not isinstance(description, str):
        raise ConfigError("'description' must be a string", file=path, field="description")

    _check_fields(obj["prompt_input"], path, "prompt_input", required={"instruction", "input"})
    _check_fields(obj["prompt_no_input"], path, "prompt_no_input", required={"instruction"},
                  forbidden={"input"})
    return PromptTemplate(
        name=os.path.basename(path),
        prompt_input=obj["prompt_input"],
        prompt_no_input=obj["prompt_no_input"],
        response_split=obj["response_split"],
        description=description,
    )


def _check_fields(text: str, path: str, key: str, *, required: set[str],
                  forbidden: frozenset[str] | set[str] = frozenset()) -> None:
    """Parse ``text`` as a format string and check which placeholders it uses."""
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:   # e.g. a lone '{' or '}'
        raise ConfigError(f"'{key}' is not a valid template ({e}); write a literal brace "
                          f"as '{{{{' or '}}}}'", file=path, field=key) from None
    used = set()
    for _literal, field_name, format_spec, conversion in parsed:
        if field_name is None:
            continue
        if field_name not in _ALLOWED_FIELDS or format_spec or conversion:
            raise ConfigError(
                f"'{key}' uses placeholder '{{{field_name}}}'; only {{instruction}} and "
                f"{{input}} are allowed (write literal braces as '{{{{' and '}}}}')",
                file=path, field=key)
        used.add(field_name)
    for name in sorted(required - used):
        raise ConfigError(f"'{key}' lacks the {{{name}}} placeholder", file=path, field=key)
    for name in sorted(used & set(forbidden)):
        raise ConfigError(f"'{key}' must not use {{{name}}} (it is used when the row has "
                          f"no input)", file=path, field=key)
