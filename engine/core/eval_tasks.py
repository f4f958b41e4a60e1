"""Evaluation tasks: what ``mlora evaluate`` and ``[[eval]]`` tables score, read from files.

A task is a FORMAT (m-LoRA's task names) applied to a file of rows in that dataset's
columns as it sits on disk (Hugging Face ``datasets`` layout), as JSON, JSONL or Parquet.

``method="loglik"`` (the default) gives ``ChoiceItem``s that are exactly
lm-evaluation-harness 0.4.13's requests for the corresponding task (``LM_EVAL_TASKS``):
each format's builder below mirrors that task's YAML (doc_to_text, doc_to_choice,
doc_to_target, target_delimiter " ") and its utils, 0-shot, no chat template.
``method="letter"`` gives ``LetterItem``s: m-LoRA's zero-shot prompts and label sets.
The ``perplexity`` format gives the rows themselves (text, Alpaca or messages rows).

No torch, no transformers, no lm_eval: this module is read by the CLI and the TUI.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from engine.core.data_files import RawRows, RowError, _json_type, load_data_file, read_raw_rows
from engine.core.errors import UserError

FORMAT_NAMES = ("arc-e", "arc-c", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande",
                "csqa", "mc", "perplexity")
LM_EVAL_TASKS = {"arc-e": "arc_easy", "arc-c": "arc_challenge", "boolq": "boolq",
                 "obqa": "openbookqa", "piqa": "piqa", "siqa": "social_iqa",
                 "hellaswag": "hellaswag", "winogrande": "winogrande", "csqa": "commonsense_qa"}
METHODS = ("loglik", "letter")

# The metrics lm-evaluation-harness 0.4.13 reports for each task (its metric_list); `mc`
# reports both like ARC. The letter method reports acc only (see metrics_for).
METRICS = {
    "arc-e": ("acc", "acc_norm"), "arc-c": ("acc", "acc_norm"), "boolq": ("acc",),
    "obqa": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm"), "siqa": ("acc",),
    "hellaswag": ("acc", "acc_norm"), "winogrande": ("acc",), "csqa": ("acc",),
    "mc": ("acc", "acc_norm"), "perplexity": ("loss", "perplexity"),
}

# The columns each format reads, for messages.
COLUMNS = {
    "arc-e": "question, choices {text, label}, answerKey",
    "arc-c": "question, choices {text, label}, answerKey",
    "boolq": "passage, question, label (0/1; or answer true/false)",
    "obqa": "question_stem, choices {text, label}, answerKey",
    "piqa": "goal, sol1, sol2, label (0/1)",
    "siqa": "context, question, answerA, answerB, answerC, label (\"1\"..\"3\")",
    "hellaswag": "activity_label, ctx_a, ctx_b, endings [...], label",
    "winogrande": "sentence (with one _), option1, option2, answer (\"1\"/\"2\")",
    "csqa": "question, choices {text: 5 answers, label}, answerKey (A-E)",
    "mc": "question, choices [...], answer (index)",
    "perplexity": "text, or instruction/input/output (Alpaca), or messages",
}

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*\Z")


# --------------------------------------------------------------------------------------
# Task specs
# --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSpec:
    """One ``--task`` or one ``[[eval]]`` table."""

    key: str               # NAME, default the format
    format: str
    path: str
    limit: Optional[int] = None
    method: str = "loglik"


def metrics_for(format: str, method: str = "loglik") -> tuple[str, ...]:
    """The metrics a task reports: lm_eval's for loglik, ``("acc",)`` for letter."""
    return ("acc",) if method == "letter" else METRICS[format]


def check_task_spec(spec: TaskSpec, where: str = "") -> None:
    """``UserError`` (prefixed by ``where``, e.g. ``--task X`` or a config table) for an
    unknown format or method, a bad limit or key, or letter on a format without a prompt."""
    pre = f"{where}: " if where else ""
    if spec.format not in FORMAT_NAMES:
        raise UserError(f"{pre}unknown task format {spec.format!r}; the formats are "
                        f"{', '.join(FORMAT_NAMES)}")
    if spec.method not in METHODS:
        raise UserError(f"{pre}unknown method {spec.method!r}; the methods are "
                        f"{', '.join(METHODS)}")
    if spec.limit is not None and (isinstance(spec.limit, bool)
                                   or not isinstance(spec.limit, int) or spec.limit < 1):
        raise UserError(f"{pre}limit must be a whole number of 1 or more, got {spec.limit!r}")
    if not isinstance(spec.key, str) or not _NAME.match(spec.key):
        raise UserError(f"{pre}task name {spec.key!r} must be letters, digits and _ . + - "
                        "(not starting with . + -)")
    if not spec.path:
        raise UserError(f"{pre}no task file given")
    if spec.method == "letter" and spec.format not in _LETTER:
        raise UserError(f"{pre}the letter method has no prompt for the {spec.format} format "
                        f"(m-LoRA's prompts cover {', '.join(_LETTER)}); use --method loglik")


def parse_task_arg(text: str, method: str = "loglik", limit: Optional[int] = None) -> TaskSpec:
    """A ``TaskSpec`` from ``[NAME:]FORMAT=FILE``; ``UserError`` on bad text."""
    where = f"--task {text!r}"
    head, eq, path = text.partition("=")
    if not eq or not head or not path:
        raise UserError(f"{where}: expected [NAME:]FORMAT=FILE, e.g. arc-e=arc_easy.jsonl "
                        "or easy:arc-e=arc_easy.parquet")
    name, colon, fmt = head.partition(":")
    if not colon:
        name, fmt = head, head
    spec = TaskSpec(key=name.strip(), format=fmt.strip(), path=path, limit=limit,
                    method=method)
    check_task_spec(spec, where)
    return spec


def check_task_keys(specs) -> None:
    """``UserError`` when two tasks have one key (their results would overwrite each other)."""
    seen: dict[str, TaskSpec] = {}
    for spec in specs:
        if spec.key in seen:
            raise UserError(
                f"two tasks are named {spec.key!r} ({seen[spec.key].format}={seen[spec.key].path} "
                f"and {spec.format}={spec.path}); give one a name of its own, "
                f"e.g. --task other:{spec.format}={spec.path}")
        seen[spec.key] = spec


# --------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------

@dataclass
class ChoiceItem:
    """One multiple-choice doc, exactly lm_eval 0.4.13's requests for it."""

    requests: list[tuple[str, str]]   # (context, continuation) per choice, as construct_requests
    gold: int                          # index of the right choice
    choice_texts: list[str]            # doc_to_choice (acc_norm divides by len() of these)
    where: str                         # "file:line" (or "file row N") for messages


@dataclass
class LetterItem:
    """m-LoRA's zero-shot prompt, for ``--method letter``."""

    prompt: str
    labels: list[str]       # scored by the logits of the last token of " " + label
    gold: int
    where: str


def load_task(spec: TaskSpec) -> list[ChoiceItem] | list[LetterItem] | list[dict]:
    """The items of a task, the first ``spec.limit`` rows (as lm_eval's ``--limit N``).

    Perplexity tasks give their rows (checked like training data). ``UserError`` (file and
    line, or row) for a missing file, a bad row, an empty task or a bad spec.
    """
    check_task_spec(spec, f"task {spec.key!r}")
    if spec.format == "perplexity":
        rows = load_data_file(spec.path).rows
        return rows[:spec.limit] if spec.limit else rows
    raw = read_raw_rows(spec.path)
    n = min(len(raw.rows), spec.limit) if spec.limit else len(raw.rows)
    build = (_LETTER if spec.method == "letter" else _LOGLIK)[spec.format]
    items = []
    for i in range(n):
        row = raw.rows[i]
        try:
            if not isinstance(row, dict):
                raise RowError(f"expected an object, got {_json_type(row)}")
            items.append(build(_Row(row), raw.where(i)))
        except RowError as e:
            raise raw.error(i, f"{e} (a {spec.format} row has {COLUMNS[spec.format]})") from None
    return items


class _Row:
    """A row's columns, each checked for its type with a message naming the column."""

    def __init__(self, row: dict):
        self.row = row

    def has(self, col: str) -> bool:
        return col in self.row and self.row[col] is not None

    def get(self, col: str) -> Any:
        if col not in self.row:
            raise RowError(f"missing column '{col}'")
        return self.row[col]

    def string(self, col: str) -> str:
        value = self.get(col)
        if not isinstance(value, str):
            raise RowError(f"column '{col}' must be a string, got {_json_type(value)}")
        return value

    def str_list(self, col: str, value: Any = None, min_len: int = 2) -> list[str]:
        value = self.get(col) if value is None else value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RowError(f"column '{col}' must be a list of strings, got {_json_type(value)}")
        if len(value) < min_len:
            raise RowError(f"column '{col}' has {len(value)} choice"
                           f"{'' if len(value) == 1 else 's'}; a task needs at least two")
        return value

    def index(self, col: str, value: Any = None) -> int:
        """A whole number: an int, or a string of digits (HF keeps some labels as strings)."""
        value = self.get(col) if value is None else value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        raise RowError(f"column '{col}' must be a whole number, got {value!r}")

    def labelled_choices(self) -> tuple[list[str], list[str]]:
        """ARC/OBQA/CSQA's ``choices``: ``{"text": [...], "label": [...]}`` of one length."""
        choices = self.get("choices")
        if not isinstance(choices, dict) or "text" not in choices or "label" not in choices:
            raise RowError("column 'choices' must be an object with 'text' and 'label' lists, "
                           f"got {_json_type(choices)}")
        text = self.str_list("choices.text", choices["text"])
        label = self.str_list("choices.label", choices["label"])
        if len(text) != len(label):
            raise RowError(f"choices.text has {len(text)} entries but choices.label has "
                           f"{len(label)}")
        return text, label


def _gold_in(gold: int, n: int, col: str) -> int:
    if not 0 <= gold < n:
        raise RowError(f"column '{col}' gives answer {gold}, outside the {n} choices "
                       f"(0..{n - 1})")
    return gold


def _key_index(key: str, labels: list[str], col: str) -> int:
    if key not in labels:
        raise RowError(f"column '{col}' is {key!r}, not one of the labels "
                       f"{', '.join(map(repr, labels))}")
    return labels.index(key)


def _choice(ctx: str, choices: list[str], gold: int, where: str) -> ChoiceItem:
    # construct_requests: one (ctx, target_delimiter + choice) per choice; delimiter " ".
    return ChoiceItem(requests=[(ctx, " " + c) for c in choices], gold=gold,
                      choice_texts=list(choices), where=where)


# --------------------------------------------------------------------------------------
# loglik: lm-evaluation-harness 0.4.13's tasks (lm_eval/tasks/<task>/*.yaml, utils)
# --------------------------------------------------------------------------------------

def _arc(r: _Row, where: str) -> ChoiceItem:
    # arc/arc_easy.yaml (arc_challenge includes it): "Question: {{question}}\nAnswer:",
    # choices {{choices.text}}, target {{choices.label.index(answerKey)}}.
    text, label = r.labelled_choices()
    gold = _key_index(r.string("answerKey"), label, "answerKey")
    return _choice(f"Question: {r.string('question')}\nAnswer:", text, gold, where)


def _boolq(r: _Row, where: str) -> ChoiceItem:
    # super_glue/boolq/default.yaml: "{{passage}}\nQuestion: {{question}}?\nAnswer:",
    # choices ["no", "yes"], target label. google/boolq's `answer` (bool) read as the label.
    if r.has("label"):
        gold = _gold_in(r.index("label"), 2, "label")
    elif r.has("answer"):
        answer = r.get("answer")
        if not isinstance(answer, bool):
            raise RowError(f"column 'answer' must be true or false, got {_json_type(answer)}")
        gold = int(answer)
    else:
        raise RowError("missing column 'label' (or google/boolq's 'answer')")
    ctx = f"{r.string('passage')}\nQuestion: {r.string('question')}?\nAnswer:"
    return _choice(ctx, ["no", "yes"], gold, where)


def _obqa(r: _Row, where: str) -> ChoiceItem:
    # openbookqa/openbookqa.yaml: text question_stem, choices {{choices.text}},
    # target {{choices.label.index(answerKey.lstrip())}}.
    text, label = r.labelled_choices()
    gold = _key_index(r.string("answerKey").lstrip(), label, "answerKey")
    return _choice(r.string("question_stem"), text, gold, where)


def _piqa(r: _Row, where: str) -> ChoiceItem:
    # piqa/piqa.yaml: "Question: {{goal}}\nAnswer:", choices [sol1, sol2], target label.
    choices = [r.string("sol1"), r.string("sol2")]
    gold = _gold_in(r.index("label"), 2, "label")
    return _choice(f"Question: {r.string('goal')}\nAnswer:", choices, gold, where)


def _siqa(r: _Row, where: str) -> ChoiceItem:
    # siqa/siqa.yaml: "Q: {{context}} {{question}}\nA:", choices [answerA, answerB,
    # answerC], target (label|int) - 1.
    choices = [r.string("answerA"), r.string("answerB"), r.string("answerC")]
    gold = _gold_in(r.index("label") - 1, 3, "label")
    return _choice(f"Q: {r.string('context')} {r.string('question')}\nA:", choices, gold, where)


def _hellaswag_preprocess(text: str) -> str:
    # hellaswag/utils.py preprocess: brackets are artifacts of the WikiHow part.
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(r: _Row, where: str) -> ChoiceItem:
    # hellaswag/utils.py process_docs: query = preprocess(activity_label + ": " + ctx_a
    # + " " + ctx_b.capitalize()), choices = preprocess(each ending); target {{label}}.
    ctx = r.string("ctx_a") + " " + r.string("ctx_b").capitalize()
    query = _hellaswag_preprocess(r.string("activity_label") + ": " + ctx)
    choices = [_hellaswag_preprocess(e) for e in r.str_list("endings")]
    gold = _gold_in(r.index("label"), len(choices), "label")
    return _choice(query, choices, gold, where)


def _winogrande(r: _Row, where: str) -> ChoiceItem:
    # winogrande/preprocess_winogrande.py: doc_to_text is the gold index ("1"/"2" -> 0/1),
    # so lm_eval takes multiple inputs: one context per option (the sentence up to "_"
    # with the option put in), one continuation (the rest after "_", stripped).
    sentence = r.string("sentence")
    if "_" not in sentence:
        raise RowError("column 'sentence' has no '_' to fill in")
    idx = sentence.index("_")
    contexts = [sentence[:idx] + r.string("option1"), sentence[:idx] + r.string("option2")]
    target = " " + sentence[idx + 1:].strip()
    answer = r.get("answer")
    if str(answer) not in ("1", "2") or isinstance(answer, bool):
        raise RowError(f"column 'answer' must be \"1\" or \"2\", got {answer!r}")
    return ChoiceItem(requests=[(c, target) for c in contexts], gold=int(answer) - 1,
                      choice_texts=contexts, where=where)


_CSQA_LETTERS = ["A", "B", "C", "D", "E"]


def _csqa(r: _Row, where: str) -> ChoiceItem:
    # commonsense_qa/default.yaml: "Question: {{ question.strip() }}\nA. {{choices['text'][0]}}
    # ...\nE. {{choices['text'][4]}}\nAnswer:", choices ['A'..'E'], target answerKey.
    text, _ = r.labelled_choices()
    if len(text) != 5:
        raise RowError(f"choices.text has {len(text)} answers; commonsense_qa has 5")
    lines = "".join(f"\n{letter}. {t}" for letter, t in zip(_CSQA_LETTERS, text))
    ctx = f"Question: {r.string('question').strip()}{lines}\nAnswer:"
    gold = _key_index(r.string("answerKey"), _CSQA_LETTERS, "answerKey")
    return _choice(ctx, _CSQA_LETTERS, gold, where)


def _mc(r: _Row, where: str) -> ChoiceItem:
    # One's own multiple-choice set, asked like ARC.
    choices = r.str_list("choices")
    gold = _gold_in(r.index("answer"), len(choices), "answer")
    return _choice(f"Question: {r.string('question')}\nAnswer:", choices, gold, where)


_LOGLIK: dict[str, Callable[[_Row, str], ChoiceItem]] = {
    "arc-e": _arc, "arc-c": _arc, "boolq": _boolq, "obqa": _obqa, "piqa": _piqa,
    "siqa": _siqa, "hellaswag": _hellaswag, "winogrande": _winogrande, "csqa": _csqa,
    "mc": _mc,
}


# --------------------------------------------------------------------------------------
# letter: m-LoRA's zero-shot prompts and label sets, task by task, as written in
# TUDB-Labs/mLoRA mlora/tasks/qa_tasks.py (the prompt strings are the same, so that
# numbers compare with m-LoRA's tables). The gold is the answer's index in `labels`.
# --------------------------------------------------------------------------------------

_ARC_LABELS = ["1", "2", "3", "4", "A", "B", "C", "D", "E"]    # m-LoRA's ARC label set


def _listed(question: str, text: list[str], label: list[str]) -> str:
    # ARC, OpenBookQA, CommonSenseQA: the choices inline, " (label) text" each.
    return ("Please choose the correct answer to the question: " + question
            + "".join(f" ({lb}) {t}" for lb, t in zip(label, text)) + "\nAnswer:")


def _letter_arc(r: _Row, where: str) -> LetterItem:
    text, label = r.labelled_choices()
    gold = _key_index(r.string("answerKey"), _ARC_LABELS, "answerKey")
    return LetterItem(_listed(r.string("question"), text, label), list(_ARC_LABELS), gold, where)


def _letter_boolq(r: _Row, where: str) -> LetterItem:
    # m-LoRA reads google/boolq (answer: bool) and asks without the passage.
    if r.has("answer"):
        answer = r.get("answer")
        if not isinstance(answer, bool):
            raise RowError(f"column 'answer' must be true or false, got {_json_type(answer)}")
    elif r.has("label"):
        answer = bool(_gold_in(r.index("label"), 2, "label"))   # super_glue: 1 is true
    else:
        raise RowError("missing column 'answer' (or super_glue's 'label')")
    prompt = ("Please answer the following question with true or false: "
              f"{r.string('question')}?\nAnswer:")
    return LetterItem(prompt, ["true", "false"], 0 if answer else 1, where)


def _letter_obqa(r: _Row, where: str) -> LetterItem:
    text, label = r.labelled_choices()
    labels = ["A", "B", "C", "D"]
    gold = _key_index(r.string("answerKey").strip(), labels, "answerKey")
    return LetterItem(_listed(r.string("question_stem"), text, label), labels, gold, where)


def _letter_piqa(r: _Row, where: str) -> LetterItem:
    prompt = ("Below is a common task along with two possible solutions labeled (A) and (B)."
              " Please select the appropriate solution to achieve the task:\n"
              f"{r.string('goal')}\n\n(A) {r.string('sol1')}\n(B) {r.string('sol2')}\n"
              "\nCorrect solution:")
    return LetterItem(prompt, ["A", "B"], _gold_in(r.index("label"), 2, "label"), where)


def _letter_siqa(r: _Row, where: str) -> LetterItem:
    prompt = ("Please choose the correct answer to the question.\n"
              f"Question: {r.string('context')} {r.string('question')}"
              f"\n(A) {r.string('answerA')}\n(B) {r.string('answerB')}\n(C) {r.string('answerC')}"
              "\nAnswer:")
    gold = _gold_in(r.index("label") - 1, 3, "label")
    return LetterItem(prompt, ["A", "B", "C"], gold, where)


def _letter_hellaswag(r: _Row, where: str) -> LetterItem:
    labels = ["A", "B", "C", "D"]
    endings = r.str_list("endings")
    if len(endings) > len(labels):
        raise RowError(f"column 'endings' has {len(endings)} endings; m-LoRA's prompt "
                       "letters at most 4")
    # m-LoRA uses the dataset's `ctx` column (ctx_a and ctx_b joined by a space).
    ctx = r.string("ctx") if r.has("ctx") else (r.string("ctx_a") + " " + r.string("ctx_b")).strip()
    prompt = ("Please choose the correct ending to complete the given sentence.\n"
              f"Sentence: {r.string('activity_label')}. {ctx}"
              + "".join(f"\n({lb}) {e}" for lb, e in zip(labels, endings)) + "\nAnswer:")
    gold = _gold_in(r.index("label"), len(endings), "label")
    return LetterItem(prompt, labels, gold, where)


def _letter_winogrande(r: _Row, where: str) -> LetterItem:
    answer = r.get("answer")
    if str(answer) not in ("1", "2") or isinstance(answer, bool):
        raise RowError(f"column 'answer' must be \"1\" or \"2\", got {answer!r}")
    prompt = ("Please choose the correct answer to fill in the blank to complete the given "
              f"sentence.\nSentence: {r.string('sentence')}"
              f"\n(A) {r.string('option1')}\n(B) {r.string('option2')}\nAnswer:")
    return LetterItem(prompt, ["A", "B"], int(answer) - 1, where)


def _letter_csqa(r: _Row, where: str) -> LetterItem:
    text, label = r.labelled_choices()
    labels = list(_CSQA_LETTERS)
    gold = _key_index(r.string("answerKey"), labels, "answerKey")
    return LetterItem(_listed(r.string("question"), text, label), labels, gold, where)


_LETTER: dict[str, Callable[[_Row, str], LetterItem]] = {
    "arc-e": _letter_arc, "arc-c": _letter_arc, "boolq": _letter_boolq, "obqa": _letter_obqa,
    "piqa": _letter_piqa, "siqa": _letter_siqa, "hellaswag": _letter_hellaswag,
    "winogrande": _letter_winogrande, "csqa": _letter_csqa,
}
