"""Tests for engine.core.prompts and engine.core.data: templates, file reading, encoding, batch order.

All offline and small: the tokenizer is tests/tiny_tokenizer.py's byte-level BPE.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from engine.core.data import (IGNORE_INDEX, Encoded, JobData, encode_row, micro_batches,
                              split_indices)
from engine.core.data_files import load_data_file, load_rows
from engine.core.errors import ConfigError, DataError
from engine.core.prompts import BUILTIN_TEMPLATE_NAMES, load_template
from tiny_tokenizer import build_tiny_tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_DIR = os.path.join(REPO, "configs", "data")


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def targets(enc: Encoded) -> list[int]:
    return [t for t in enc.labels if t != IGNORE_INDEX]


def write(tmp_path, name: str, content) -> str:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return str(path)


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


ALPACA = {"instruction": "say hi", "input": "world", "output": "hello there"}
CHAT = {"messages": [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine"},
]}


@dataclass
class Adapter:
    """The AdapterConfig fields JobData reads."""
    data: str
    name: str = "a"
    prompt: str = "alpaca"
    cutoff_len: Optional[int] = None
    train_on_inputs: bool = False
    val_set_size: int = 0
    group_by_length: bool = False
    batch_size: int = 4
    micro_batch_size: int = 2
    seed: Optional[int] = None


def alpaca_rows(n: int) -> list[dict]:
    # Varying lengths, so group_by_length has something to sort.
    return [{"instruction": f"task {i}", "input": "x " * (i % 7),
             "output": "answer " * (1 + i % 5)} for i in range(n)]


# ---------------------------------------------------------------------------- prompts

def test_builtin_templates():
    for name in ("alpaca", "alpaca_short", "none", "chat"):
        assert name in BUILTIN_TEMPLATE_NAMES
        assert load_template(name).name == name
    alpaca = load_template("alpaca")
    with_input = alpaca.render("Do it.", "some input")
    assert "### Instruction:\nDo it.\n\n### Input:\nsome input\n\n" in with_input
    assert with_input.endswith("### Response:\n")
    no_input = alpaca.render("Do it.")
    assert "### Input:" not in no_input and no_input.endswith("### Response:\n")
    assert load_template("none").render("Do it.", "in") == "Do it.\nin"
    assert load_template("none").render("Do it.") == "Do it."
    assert alpaca.split_response(with_input + "ok!") == "ok!"


def test_template_file_roundtrip():
    t = load_template(os.path.join(REPO, "configs", "prompts", "alpaca_mlora.json"))
    assert t.render("A", "B") == "### Instruction:\nA\n\n### Input:\nB\n\n### Output:\n"
    assert t.render("A") == "### Instruction:\nA\n\n### Output:\n"
    assert t.response_split == "### Output:"


@pytest.mark.parametrize("missing", ["prompt_input", "prompt_no_input", "response_split"])
def test_template_missing_key(tmp_path, missing):
    obj = {"prompt_input": "{instruction} {input}", "prompt_no_input": "{instruction}",
           "response_split": ">"}
    del obj[missing]
    path = write(tmp_path, "t.json", json.dumps(obj))
    with pytest.raises(ConfigError) as e:
        load_template(path)
    assert path in str(e.value) and missing in str(e.value)


@pytest.mark.parametrize("content, needle", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    (json.dumps({"prompt_input": "{instruction} {input} {output}",
                 "prompt_no_input": "{instruction}", "response_split": ""}), "{output}"),
    (json.dumps({"prompt_input": "{instruction} {input}",
                 "prompt_no_input": "{instruction} {input}", "response_split": ""}),
     "must not use {input}"),
    (json.dumps({"prompt_input": "{instruction}", "prompt_no_input": "{instruction}",
                 "response_split": ""}), "lacks the {input}"),
    (json.dumps({"prompt_input": 3, "prompt_no_input": "{instruction}",
                 "response_split": ""}), "must be a string"),
])
def test_template_bad_files(tmp_path, content, needle):
    path = write(tmp_path, "t.json", content)
    with pytest.raises(ConfigError) as e:
        load_template(path)
    assert path in str(e.value) and needle in str(e.value)


def test_template_unknown_name():
    with pytest.raises(ConfigError, match="unknown prompt template 'nope'"):
        load_template("nope")
    with pytest.raises(ConfigError, match="not found"):
        load_template("missing/template.json")


# ---------------------------------------------------------------------------- encoding

def test_alpaca_masking_and_eos(tok):
    template = load_template("alpaca")
    enc = encode_row(ALPACA, tok, template, 512, train_on_inputs=False)
    prompt = tok(template.render("say hi", "world"), add_special_tokens=True)["input_ids"]
    response = ids(tok, "hello there") + [tok.eos_token_id]
    assert enc.input_ids == prompt + response
    assert enc.labels == [IGNORE_INDEX] * len(prompt) + response
    assert enc.input_ids[-1] == enc.labels[-1] == tok.eos_token_id
    assert enc.num_targets == len(response) and not enc.truncated


def test_train_on_inputs_targets_everything(tok):
    enc = encode_row(ALPACA, tok, load_template("alpaca"), 512, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_truncation_keeps_beginning(tok):
    full = encode_row(ALPACA, tok, load_template("alpaca_short"), 512, False)
    cut = encode_row(ALPACA, tok, load_template("alpaca_short"), len(full) - 3, False)
    assert cut.truncated and len(cut) == len(cut.labels) == len(full) - 3
    assert cut.input_ids == full.input_ids[:-3] and cut.labels == full.labels[:-3]
    # Cut inside the prompt: no targets left, but no crash either.
    tiny = encode_row(ALPACA, tok, load_template("alpaca"), 5, False)
    assert len(tiny) == 5 and tiny.num_targets == 0


def test_text_rows_all_targets(tok):
    enc = encode_row({"text": "the quick brown fox"}, tok, None, 512, False)
    assert enc.input_ids == ids(tok, "the quick brown fox") + [tok.eos_token_id]
    assert enc.labels == enc.input_ids


def test_messages_only_assistant_turns(tok):
    enc = encode_row(CHAT, tok, None, 512, False)
    assert len(enc.input_ids) == len(enc.labels)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    # Exactly the two assistant contents, each with its end-of-turn token.
    assert targets(enc) == ids(tok, "hello") + [im_end] + ids(tok, "fine") + [im_end]
    text = tok.decode(enc.input_ids)
    assert text.startswith("<|im_start|>system\nbe nice<|im_end|>")
    assert "how are you" in text
    # The example ends on the final end-of-turn token, and it is a target.
    assert enc.input_ids[-1] == enc.labels[-1] == im_end
    # Spans line up: each target position holds the same id in input_ids.
    for i, t in enumerate(enc.labels):
        assert t in (IGNORE_INDEX, enc.input_ids[i])
    # System and user tokens are masked.
    masked = tok.decode([i for i, t in zip(enc.input_ids, enc.labels) if t == IGNORE_INDEX])
    assert "be nice" in masked and "how are you" in masked and "hello" not in masked


def test_messages_train_on_inputs(tok):
    enc = encode_row(CHAT, tok, None, 512, True)
    assert enc.labels == enc.input_ids


def test_chat_template_for_alpaca_rows(tok):
    enc = encode_row(ALPACA, tok, load_template("chat"), 512, False)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert targets(enc) == ids(tok, "hello there") + [im_end]
    assert "<|im_start|>user\nsay hi\n\nworld<|im_end|>" in tok.decode(enc.input_ids)


def test_messages_prefix_mismatch_is_reported(tok):
    # A template that shortens earlier assistant turns: prefix renderings differ.
    odd = copy.deepcopy(tok)
    odd.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n...<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    with pytest.raises(DataError, match="not a token prefix") as e:
        encode_row(CHAT, odd, None, 512, False, file="chat.jsonl", line=7)
    assert str(e.value).startswith("chat.jsonl:7:")


def test_messages_need_chat_template(tok, tmp_path):
    plain = copy.deepcopy(tok)
    plain.chat_template = None
    path = write(tmp_path, "c.jsonl", jsonl([CHAT]))
    with pytest.raises(ConfigError, match="chat template"):
        JobData.from_config(Adapter(data=path), plain, None, 256, 1)


# ---------------------------------------------------------------------------- reading

def test_json_and_jsonl_agree(tmp_path):
    rows = alpaca_rows(5)
    a = load_data_file(write(tmp_path, "a.jsonl", "\n" + jsonl(rows[:2]) + "\n  \n"
                             + jsonl(rows[2:])))
    b = load_data_file(write(tmp_path, "b.json", json.dumps(rows, indent=2)))
    assert a.rows == b.rows == rows and a.kind == b.kind == "alpaca"
    assert a.lines == [2, 3, 6, 7, 8]        # blank lines skipped, still counted
    # Pretty-printed array: each row's line is where its object starts.
    text = json.dumps(rows, indent=2).splitlines()
    assert [text[n - 1].strip() for n in b.lines] == ["{"] * 5
    assert b.lines[0] == 2
    assert load_rows(write(tmp_path, "bom.jsonl", b"\xef\xbb\xbf" + jsonl(rows).encode())) == rows


def test_row_kinds(tmp_path):
    assert load_data_file(write(tmp_path, "t.jsonl", jsonl([{"text": "a"}]))).kind == "text"
    assert load_data_file(write(tmp_path, "m.jsonl", jsonl([CHAT]))).kind == "messages"
    null_input = {"instruction": "a", "input": None, "output": "b"}
    assert load_rows(write(tmp_path, "n.jsonl", jsonl([null_input]))) == [null_input]


def _error(path) -> DataError:
    with pytest.raises(DataError) as e:
        load_data_file(path)
    return e.value


@pytest.mark.parametrize("lines, line, needle", [
    (['{"text": "a"}', '{"text": "b"}', '{"text": "c"', '{"text": "d"}'], 3, "invalid JSON"),
    (['{"text": "a"}', '[1, 2]'], 2, "expected a JSON object, got an array"),
    (['{"text": "a"}', '"just a string"'], 2, "got a string"),
    (['{"instruction": "a", "output": "b"}', '{"instruction": "a"}'], 2,
     "missing field 'output'"),
    (['{"instruction": "a", "output": 5}'], 1, "'output' must be a string"),
    (['{"instruction": "a", "input": ["x"], "output": "b"}'], 1, "'input' must be a string"),
    (['{"prompt": "a", "completion": "b"}'], 1, "none of the fields"),
    (['{"text": "a", "output": "b"}'], 1, "mixes"),
    (['{"text": "a"}', '', '{"instruction": "a", "output": "b"}'], 3,
     "may not mix row kinds"),
    (['{"text": ""}'], 1, "'text' is empty"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], 1,
     "last message must be from the assistant"),
    (['{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "x"}]}'],
     1, "role is 'bot'"),
    (['{"messages": [{"role": "assistant", "content": "hi"}]}'], 1, "start with a user"),
    (['{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}'], 1,
     "missing field 'content'"),
    (['{"messages": []}'], 1, "'messages' is empty"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, line, needle):
    path = write(tmp_path, "bad.jsonl", "\n".join(lines) + "\n")
    err = _error(path)
    assert err.file == path and err.line == line
    assert str(err).startswith(f"{path}:{line}: ") and needle in str(err)


def test_non_utf8_reports_line_and_offset(tmp_path):
    good = b'{"text": "a"}\n'
    path = write(tmp_path, "bin.jsonl", good + good + b'{"text": "caf\xe9"}\n')
    err = _error(path)
    assert err.line == 3 and "UTF-8" in str(err)
    assert f"byte offset {2 * len(good) + 13}" in str(err) and "0xe9" in str(err)


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_empty_file(tmp_path, content):
    err = _error(write(tmp_path, "empty.jsonl", content))
    assert err.line is None and "empty" in str(err)


def test_empty_json_array(tmp_path):
    assert "no rows" in str(_error(write(tmp_path, "e.json", "[ ]")))


def test_missing_file(tmp_path):
    assert "not found" in str(_error(str(tmp_path / "nope.jsonl")))


def test_oversized_line(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "wb") as f:
        f.write(b'{"text": "ok"}\n')
        f.write(b'{"text": "' + b"x" * (3 << 20) + b'"}\n')
        f.write(b'{"text": "ok"}\n')
    err = _error(str(path))
    assert err.line == 2 and "longer than the limit of 1 MiB" in str(err)
    # The limit is configurable and exact: a line of exactly the limit passes.
    row = b'{"text": "abc"}'
    path.write_bytes(row + b"\n" + row)
    assert len(load_data_file(str(path), max_row_bytes=len(row)).rows) == 2
    assert _line_limit_error(str(path), len(row) - 1).line == 1


def _line_limit_error(path, limit) -> DataError:
    with pytest.raises(DataError) as e:
        load_data_file(path, max_row_bytes=limit)
    return e.value


def test_oversized_json_array_row(tmp_path):
    rows = [{"text": "a"}, {"text": "y" * 200}]
    path = write(tmp_path, "big.json", json.dumps(rows, indent=1))
    err = _line_limit_error(path, 100)
    assert err.line == 5 and "row 2 is larger" in str(err)


@pytest.mark.parametrize("content, line, needle", [
    ('[\n {"text": "a"},\n {"text": "b",}\n]', 3, "row 2: invalid JSON"),
    ('[\n {"text": "a"},\n 7\n]', 3, "row 2: expected a JSON object, got a number"),
    ('[\n {"text": "a"},\n {"output": "b"}\n]', 3, "missing field 'instruction'"),
    ('[\n {"text": "a"}\n', 3, "not closed"),
    ('[\n {"text": "a"}\n {"text": "b"}]', 3, "expected ',' or ']'"),
    ('[{"text": "a"}]\n{"text": "b"}', 2, "after the end of the JSON array"),
    ('[{"text": "a"},\n{"text": "b"},]', 2, "invalid JSON"),
])
def test_malformed_json_array(tmp_path, content, line, needle):
    path = write(tmp_path, "bad.json", content)
    err = _error(path)
    assert err.line == line and needle in str(err), str(err)


def test_json_array_non_utf8(tmp_path):
    path = write(tmp_path, "bin.json", b'[\n{"text": "a"},\n{"text": "\xff"}\n]')
    err = _error(path)
    assert err.line == 3 and "UTF-8" in str(err)


# ---------------------------------------------------------------------------- JobData

def make_job(tmp_path, tok, n=23, **kw) -> JobData:
    path = write(tmp_path, "d.jsonl", jsonl(alpaca_rows(n)))
    return JobData.from_config(Adapter(data=path, **kw), tok, None, 256, 7)


def test_val_split(tmp_path, tok):
    job = make_job(tmp_path, tok, n=20, val_set_size=5)
    assert len(job.train) == 15 and len(job.val) == 5
    train, val = split_indices(20, 5, 7)
    assert sorted(train + val) == list(range(20)) and not set(train) & set(val)
    assert split_indices(20, 5, 7) == (train, val)
    assert split_indices(20, 5, 8)[1] != val
    # Val examples are the encodings of exactly those rows.
    rows = alpaca_rows(20)
    expected = [encode_row(rows[i], tok, load_template("alpaca"), 256, False) for i in val]
    assert [e.input_ids for e in job.val] == [e.input_ids for e in expected]
    with pytest.raises(ConfigError, match="val_set_size"):
        make_job(tmp_path, tok, n=5, val_set_size=5)


def test_epoch_order_deterministic(tmp_path, tok):
    a = make_job(tmp_path, tok, batch_size=4)
    b = make_job(tmp_path, tok, batch_size=4)
    assert a.epoch_batches(0) == b.epoch_batches(0)
    assert a.epoch_batches(0) != a.epoch_batches(1)
    assert make_job(tmp_path, tok, seed=99).epoch_batches(0) != a.epoch_batches(0)
    for epoch in range(3):
        batches = a.epoch_batches(epoch)
        assert [len(x) for x in batches] == [4, 4, 4, 4, 4, 3]
        assert sorted(i for x in batches for i in x) == list(range(23))
    assert a.steps_per_epoch == 6 and a.total_steps(3) == 18


def test_group_by_length(tmp_path, tok):
    job = make_job(tmp_path, tok, group_by_length=True, batch_size=5)
    order = [i for batch in job.epoch_batches(0) for i in batch]
    lengths = [len(job.train[i]) for i in order]
    assert lengths == sorted(lengths, reverse=True)
    assert job.epoch_batches(0) == job.epoch_batches(1)
    # Ties keep file order, so the order is fully determined.
    for x, y in zip(order, order[1:]):
        if len(job.train[x]) == len(job.train[y]):
            assert x < y


def test_micro_batches():
    assert micro_batches(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert micro_batches([3, 1], 4) == [[3, 1]]
    job = JobData(train=[Encoded([1, 2], [1, 2])] * 5, val=[], batch_size=4,
                  micro_batch_size=3, seed=0)
    assert [len(m) for m in job.micro_batches(job.epoch_batches(0)[0])] == [3, 1]
    with pytest.raises(ValueError):
        micro_batches([1], 0)
    with pytest.raises(ConfigError, match="batch_size"):
        JobData(train=[], val=[], batch_size=0, micro_batch_size=1, seed=0)


def test_adapter_overrides_and_no_target_rows(tmp_path, tok):
    rows = alpaca_rows(6)
    template = load_template("alpaca")
    # Room for every normal row but the last two tokens of the longest one.
    cutoff = max(len(encode_row(r, tok, template, 10_000, False)) for r in rows) - 2
    rows[2] = {"instruction": "long " * 200, "output": "x"}   # prompt alone fills cutoff
    path = write(tmp_path, "d.jsonl", jsonl(rows))
    job = JobData.from_config(Adapter(data=path, cutoff_len=cutoff, seed=5), tok, None, 256, 7)
    assert job.cutoff_len == cutoff and job.seed == 5
    assert max(len(e) for e in job.train) == cutoff
    assert len(job.train) == 5 and job.num_no_targets == 1 and job.no_target_lines == [3]
    assert job.num_truncated >= 1
    warnings = " ".join(job.warnings())
    assert "no target token" in warnings and "lines 3" in warnings
    # Nothing trainable at all: a clear error rather than an empty job.
    with pytest.raises(DataError, match="no training example"):
        JobData.from_config(Adapter(data=path, cutoff_len=4), tok, None, 256, 7)


def test_encode_errors_name_file_and_line(tmp_path, tok):
    path = write(tmp_path, "c.jsonl", jsonl([CHAT]))
    odd = copy.deepcopy(tok)
    odd.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
                        "{% if add_generation_prompt %}{{ '>' }}{% endif %}"
    with pytest.raises(DataError) as e:
        JobData.from_config(Adapter(data=path), odd, None, 256, 1)
    assert e.value.file == path and e.value.line == 1


def test_no_torch_and_hash_seed_independent_order():
    code = (
        "import sys, json\n"
        "import engine.core.data, engine.core.prompts\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'transformers' not in sys.modules, 'transformers imported'\n"
        "from engine.core.data import JobData, Encoded\n"
        "job = JobData(train=[Encoded([1] * (i % 5 + 1), [1] * (i % 5 + 1)) for i in range(30)],"
        " val=[], batch_size=8, micro_batch_size=2, seed=3)\n"
        "print(json.dumps([job.epoch_batches(e) for e in range(2)]))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        outputs.append(proc.stdout)
    assert outputs[0] == outputs[1]


# ---------------------------------------------------------------------------- demo data

def test_demo_data_is_generated_and_valid(tok):
    sys.path.insert(0, DEMO_DIR)
    try:
        import make_demo_data
    finally:
        sys.path.remove(DEMO_DIR)
    generated = make_demo_data.generate()
    assert set(generated) == {"uppercase.jsonl", "sentiment.jsonl", "extract_json.jsonl",
                              "sentiment_choice.jsonl"}
    # The evaluation task: balanced, held out from the training reviews, valid mc items.
    choice_text = generated.pop("sentiment_choice.jsonl")
    with open(os.path.join(DEMO_DIR, "sentiment_choice.jsonl"), encoding="utf-8",
              newline="") as f:
        assert f.read() == choice_text
    items = [json.loads(line) for line in choice_text.splitlines()]
    trained = {json.loads(line)["input"] for line in generated["sentiment.jsonl"].splitlines()}
    assert sorted(i["answer"] for i in items) == [0] * 20 + [1] * 20
    assert not any(i["question"].split("? ", 1)[1] in trained for i in items)
    template = load_template("alpaca_short")
    for name, text in generated.items():
        path = os.path.join(DEMO_DIR, name)
        with open(path, encoding="utf-8", newline="") as f:
            assert f.read() == text, f"{name} differs from make_demo_data.py's output"
        data = load_data_file(path)
        assert data.kind == "alpaca" and 200 <= len(data.rows) <= 400
        assert len({r["input"] for r in data.rows}) == len(data.rows)   # no duplicates
        for row in data.rows:
            if name == "uppercase.jsonl":
                assert row["output"] == row["input"].upper()
            elif name == "sentiment.jsonl":
                assert row["output"] in ("positive", "negative")
            else:
                obj = json.loads(row["output"])
                assert list(obj) == ["name", "age", "city"]
                assert obj["name"] in row["input"] and obj["city"] in row["input"]
                assert str(obj["age"]) in row["input"]
        # Short examples: even this tiny tokenizer's long byte-level encoding stays small.
        longest = max(len(encode_row(r, tok, template, 10_000, False)) for r in data.rows)
        assert longest < 200, (name, longest)
    labels = [json.loads(line)["output"] for line in generated["sentiment.jsonl"].splitlines()]
    assert labels.count("positive") == labels.count("negative")
