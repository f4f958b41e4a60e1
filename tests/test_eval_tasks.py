"""engine.core.eval_tasks: task formats read from files, checked against lm-evaluation-harness.

The reference for every lm_eval format is lm_eval 0.4.13 itself: its own task YAML (and
utils) is loaded, pointed at a local JSONL file (dataset_path json), and each doc's
construct_requests arguments, gold and doc_to_choice are compared with ours.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.core.data_files import load_data_file
from engine.core.errors import DataError, UserError
from engine.core.eval_tasks import (FORMAT_NAMES, LM_EVAL_TASKS, METHODS, METRICS, ChoiceItem,
                                    LetterItem, TaskSpec, check_task_keys, load_task,
                                    metrics_for, parse_task_arg)

# --------------------------------------------------------------------------------------
# Rows in each dataset's on-disk layout, chosen to reach the odd corners of each task
# (numeric ARC labels, 3 and 5 choices, OBQA's padded answerKey, HellaSwag's WikiHow
# brackets and capitalize(), CSQA's question.strip(), SIQA's string labels).
# --------------------------------------------------------------------------------------

ROWS = {
    "arc-e": [
        {"id": "a1", "question": "Which gas do plants take in?",
         "choices": {"text": ["oxygen", "carbon dioxide", "helium", "neon"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "a2", "question": "What melts ice fastest?",
         "choices": {"text": ["salt", "sand", "sugar"], "label": ["1", "2", "3"]},
         "answerKey": "1"},
        {"id": "a3", "question": "  Spaces  around?  ",
         "choices": {"text": ["a", "it's \"quoted\"", "café \\ ü", "{{ x }}", "e e"],
                     "label": ["A", "B", "C", "D", "E"]}, "answerKey": "E"},
    ],
    "boolq": [
        {"question": "is the sky blue", "passage": "The sky is blue on a clear day.",
         "idx": 0, "label": 1},
        {"question": "can fish fly", "passage": "Most fish swim.\nSome glide.", "idx": 1,
         "label": 0},
    ],
    "obqa": [
        {"id": "o1", "question_stem": "The sun is responsible for",
         "choices": {"text": ["puppies learning", "plants sprouting", "rocks", "tides only"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
        {"id": "o2", "question_stem": "A magnet attracts",
         "choices": {"text": ["wood", "iron", "glass", "paper"],
                     "label": ["A", "B", "C", "D"]}, "answerKey": " B"},
    ],
    "piqa": [
        {"goal": "To open a jar,", "sol1": "twist the lid.", "sol2": "bake the jar.",
         "label": 0},
        {"goal": "Keep bread fresh", "sol1": "leave it open", "sol2": "seal it in a bag",
         "label": 1},
    ],
    "siqa": [
        {"context": "Tracy gave Bailey a gift.", "question": "How would Bailey feel?",
         "answerA": "grateful", "answerB": "angry", "answerC": "bored", "label": "1"},
        {"context": "Sam ran late.", "question": "What will Sam do next?",
         "answerA": "sleep", "answerB": "sing", "answerC": "hurry", "label": "3"},
    ],
    "hellaswag": [
        {"ind": 1, "activity_label": "Removing ice from car",
         "ctx_a": "Then, the man writes over the snow covering the window of a car.",
         "ctx_b": "a woman wearing winter CLOTHES", "ctx": "unused",
         "endings": [", the man [title] continues.", "stands [header] still", " waves  ",
                     "drives away."], "source_id": "x", "split": "val",
         "split_type": "indomain", "label": "3"},
        {"ind": 2, "activity_label": "Baking cookies",
         "ctx_a": "[header] How to bake. [title] Preheat the oven.", "ctx_b": "",
         "ctx": "unused",
         "endings": ["Mix the dough.", "[step] Eat raw.", "Sleep.", "Paint it."],
         "source_id": "y", "split": "val", "split_type": "zeroshot", "label": "0"},
    ],
    "winogrande": [
        {"sentence": "The trophy didn't fit in the suitcase because _ was too big.",
         "option1": "the trophy", "option2": "the suitcase", "answer": "1"},
        {"sentence": "Sarah lent Maria a book because _ had two.", "option1": "Sarah",
         "option2": "Maria", "answer": "2"},
    ],
    "csqa": [
        {"id": "c1", "question": "Where do you keep milk?  ", "question_concept": "milk",
         "choices": {"label": ["A", "B", "C", "D", "E"],
                     "text": ["fridge", "oven", "garage", "roof", "shoe"]},
         "answerKey": "A"},
        {"id": "c2", "question": " What is cold?", "question_concept": "cold",
         "choices": {"label": ["A", "B", "C", "D", "E"],
                     "text": ["fire", "sun", "lava", "ice", "tea"]}, "answerKey": "D"},
    ],
}
ROWS["arc-c"] = ROWS["arc-e"]


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def items(tmp_path, fmt, rows, name=None, **kw):
    path = write_jsonl(tmp_path / (name or f"{fmt}.jsonl"), rows)
    return load_task(TaskSpec(key=fmt, format=fmt, path=path, **kw))


# --------------------------------------------------------------------------------------
# Equal to lm_eval 0.4.13, format by format
# --------------------------------------------------------------------------------------

def lm_eval_docs(fmt: str, data_file: str, cache_dir: str, monkeypatch):
    """(requests args, gold, doc_to_choice) per doc, from lm_eval's own task YAML."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    pytest.importorskip("lm_eval")
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_files = {"arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                  "boolq": "super_glue/boolq/default.yaml",
                  "openbookqa": "openbookqa/openbookqa.yaml", "piqa": "piqa/piqa.yaml",
                  "social_iqa": "siqa/siqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
                  "winogrande": "winogrande/default.yaml",
                  "commonsense_qa": "commonsense_qa/default.yaml"}
    root = Path(lm_eval.__file__).parent / "tasks"
    config = load_yaml(root / yaml_files[LM_EVAL_TASKS[fmt]])
    assert config["task"] == LM_EVAL_TASKS[fmt]
    config.update(dataset_path="json", dataset_name=None,
                  dataset_kwargs={"data_files": {"validation": data_file},
                                  "cache_dir": cache_dir},
                  training_split=None, validation_split="validation", test_split=None,
                  fewshot_split=None)
    task = ConfigurableTask(config=config)
    assert task.OUTPUT_TYPE == "multiple_choice"
    metrics = tuple(m["metric"] for m in config["metric_list"])
    out = []
    for doc in task.eval_docs:
        ctx = task.fewshot_context(doc, 0)
        requests = task.construct_requests(doc, ctx, metadata=(fmt, 0, 1))
        choices = task.doc_to_choice(doc)
        # process_results' gold: doc_to_text for multiple inputs, else doc_to_target (an
        # index, or a string looked up in the choices).
        gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
        if isinstance(gold, str):
            gold = choices.index(gold)
        out.append(([tuple(r.args) for r in requests], gold, choices))
    return out, metrics


@pytest.mark.parametrize("fmt", sorted(LM_EVAL_TASKS))
def test_items_equal_lm_eval_requests(tmp_path, monkeypatch, fmt):
    path = write_jsonl(tmp_path / f"{fmt}.jsonl", ROWS[fmt])
    reference, metrics = lm_eval_docs(fmt, path, str(tmp_path / "hf_cache"), monkeypatch)
    ours = load_task(TaskSpec(key=fmt, format=fmt, path=path))
    assert len(ours) == len(reference) == len(ROWS[fmt])
    for i, (item, (requests, gold, choices)) in enumerate(zip(ours, reference)):
        assert isinstance(item, ChoiceItem)
        assert item.requests == requests, (fmt, i)
        assert item.gold == gold, (fmt, i)
        assert item.choice_texts == choices, (fmt, i)
        assert item.where == f"{path}:{i + 1}"
    # The metrics lm_eval reports for the task (acc_norm only where it lists it).
    assert METRICS[fmt] == metrics


def test_hellaswag_preprocessing_spelled_out(tmp_path):
    # What lm_eval's process_docs does, written out once (the test above compares with
    # lm_eval itself; this one fails readably if the two ever disagree on purpose).
    first = items(tmp_path, "hellaswag", ROWS["hellaswag"])[0]
    ctx = ("Removing ice from car: Then, the man writes over the snow covering the window "
           "of a car. A woman wearing winter clothes")
    assert first.requests[0][0] == ctx
    assert first.choice_texts == [", the man. continues.", "stands still", "waves",
                                  "drives away."]
    assert first.gold == 3


def test_winogrande_one_continuation_after_two_contexts(tmp_path):
    item = items(tmp_path, "winogrande", ROWS["winogrande"])[0]
    assert item.requests == [("The trophy didn't fit in the suitcase because the trophy",
                              " was too big."),
                             ("The trophy didn't fit in the suitcase because the suitcase",
                              " was too big.")]
    assert item.gold == 0


def test_boolq_reads_google_boolq_answer(tmp_path):
    rows = [{"question": "is it", "passage": "It is.", "answer": True},
            {"question": "is it not", "passage": "It is.", "answer": False}]
    got = items(tmp_path, "boolq", rows)
    assert [i.gold for i in got] == [1, 0]
    assert got[0].requests == [("It is.\nQuestion: is it?\nAnswer:", " no"),
                               ("It is.\nQuestion: is it?\nAnswer:", " yes")]


def test_mc_format(tmp_path):
    rows = [{"question": "2+2?", "choices": ["3", "4", "five"], "answer": 1}]
    (item,) = items(tmp_path, "mc", rows)
    assert item.requests == [("Question: 2+2?\nAnswer:", " 3"),
                             ("Question: 2+2?\nAnswer:", " 4"),
                             ("Question: 2+2?\nAnswer:", " five")]
    assert item.gold == 1 and item.choice_texts == ["3", "4", "five"]
    assert metrics_for("mc") == ("acc", "acc_norm")
    assert metrics_for("arc-e", "letter") == ("acc",)


def test_perplexity_rows(tmp_path):
    rows = [{"text": "one"}, {"text": "two"}, {"text": "three"}]
    assert items(tmp_path, "perplexity", rows) == rows
    assert items(tmp_path, "perplexity", rows, limit=2) == rows[:2]
    alpaca = [{"instruction": "say hi", "output": "hi"}]
    assert items(tmp_path, "perplexity", alpaca, name="a.jsonl") == alpaca
    with pytest.raises(DataError, match=r"p\.jsonl:2: .*'text'"):
        items(tmp_path, "perplexity", [{"text": "ok"}, {"txt": "no"}], name="p.jsonl")


def test_limit_takes_the_first_rows_and_ignores_the_rest(tmp_path):
    rows = ROWS["piqa"] + [{"goal": "broken row after the limit"}]
    got = items(tmp_path, "piqa", rows, limit=2)
    assert [i.gold for i in got] == [0, 1]
    assert len(items(tmp_path, "piqa", ROWS["piqa"], limit=100)) == 2


def test_json_array_file_names_lines(tmp_path):
    path = tmp_path / "t.json"
    path.write_text('[\n  {"question": "q", "choices": ["a", "b"], "answer": 0},\n'
                    '  {"question": "q2", "choices": ["a", "b"]}\n]\n')
    with pytest.raises(DataError) as e:
        load_task(TaskSpec(key="mc", format="mc", path=str(path)))
    assert str(e.value).startswith(f"{path}:3: missing column 'answer'")
    assert "mc row" in str(e.value)


# --------------------------------------------------------------------------------------
# Bad rows and bad tasks: file and line, the column, the format
# --------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, row, line_has", [
    ("arc-e", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}},
     "missing column 'answerKey'"),
    ("arc-e", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
               "answerKey": "C"}, "column 'answerKey' is 'C', not one of the labels"),
    ("arc-c", {"question": "q", "choices": ["a", "b"], "answerKey": "A"},
     "column 'choices' must be an object with 'text' and 'label'"),
    ("boolq", {"question": "q", "passage": "p"}, "missing column 'label'"),
    ("boolq", {"question": "q", "passage": "p", "label": 2}, "outside the 2 choices"),
    ("obqa", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
              "answerKey": "A"}, "missing column 'question_stem'"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": 3, "label": 0},
     "column 'sol2' must be a string, got a number"),
    ("siqa", {"context": "c", "question": "q", "answerA": "a", "answerB": "b",
              "answerC": "c", "label": "4"}, "column 'label' gives answer 3, outside"),
    ("hellaswag", {"activity_label": "a", "ctx_a": "x", "ctx_b": "y", "endings": ["only"],
                   "label": "0"}, "column 'endings' has 1 choice; a task needs at least two"),
    ("winogrande", {"sentence": "no blank", "option1": "a", "option2": "b", "answer": "1"},
     "column 'sentence' has no '_'"),
    ("winogrande", {"sentence": "a _ b", "option1": "a", "option2": "b", "answer": ""},
     "column 'answer' must be \"1\" or \"2\""),
    ("csqa", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]},
              "answerKey": "A"}, "choices.text has 2 answers; commonsense_qa has 5"),
    ("mc", {"question": "q", "choices": ["only one"], "answer": 0},
     "column 'choices' has 1 choice; a task needs at least two"),
    ("mc", {"question": "q", "choices": ["a", "b"], "answer": 2},
     "column 'answer' gives answer 2, outside the 2 choices"),
    ("mc", {"question": "q", "choices": ["a", "b"], "answer": "b"},
     "column 'answer' must be a whole number"),
])
def test_bad_row_names_file_line_column_and_format(tmp_path, fmt, row, line_has):
    good = ({"question": "q", "choices": ["a", "b"], "answer": 0} if fmt == "mc"
            else ROWS[fmt][0])
    path = write_jsonl(tmp_path / "t.jsonl", [good, row])
    with pytest.raises(DataError) as e:
        load_task(TaskSpec(key=fmt, format=fmt, path=path))
    message = str(e.value)
    assert message.startswith(f"{path}:2: "), message
    assert line_has in message
    assert f"(a {fmt} row has " in message
    assert e.value.line == 2


def test_row_that_is_not_an_object(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"t\.jsonl:2: expected an object, got an array"):
        load_task(TaskSpec(key="mc", format="mc", path=str(path)))


def test_missing_file_empty_task_and_bad_json(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: data file not found"):
        load_task(TaskSpec(key="mc", format="mc", path=str(tmp_path / "nope.jsonl")))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: data file is empty"):
        load_task(TaskSpec(key="mc", format="mc", path=str(empty)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question":\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid JSON"):
        load_task(TaskSpec(key="mc", format="mc", path=str(bad)))


def test_bad_specs_refused(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS["piqa"])
    with pytest.raises(UserError, match="limit must be a whole number of 1 or more, got 0"):
        load_task(TaskSpec(key="piqa", format="piqa", path=path, limit=0))
    with pytest.raises(UserError) as e:
        load_task(TaskSpec(key="x", format="arc_easy", path=path))
    assert "unknown task format 'arc_easy'" in str(e.value)
    assert ", ".join(FORMAT_NAMES) in str(e.value)
    with pytest.raises(UserError, match="unknown method 'mean'"):
        load_task(TaskSpec(key="piqa", format="piqa", path=path, method="mean"))
    for fmt in ("mc", "perplexity"):
        with pytest.raises(UserError, match=f"no prompt for the {fmt} format"):
            load_task(TaskSpec(key=fmt, format=fmt, path=path, method="letter"))


# --------------------------------------------------------------------------------------
# --task parsing and keys
# --------------------------------------------------------------------------------------

def test_parse_task_arg():
    assert parse_task_arg("arc-e=data/arc.jsonl") == TaskSpec("arc-e", "arc-e", "data/arc.jsonl")
    assert parse_task_arg("easy:arc-e=a=b.parquet", method="letter", limit=5) == TaskSpec(
        "easy", "arc-e", "a=b.parquet", limit=5, method="letter")
    assert parse_task_arg("ppl:perplexity=C:\\d\\x.jsonl").path == "C:\\d\\x.jsonl"
    for text, words in [("arc-e", "expected [NAME:]FORMAT=FILE"),
                        ("=x.jsonl", "expected [NAME:]FORMAT=FILE"),
                        ("arc-e=", "expected [NAME:]FORMAT=FILE"),
                        ("arce=x.jsonl", "unknown task format 'arce'"),
                        (":arc-e=x.jsonl", "task name ''"),
                        ("a b:arc-e=x.jsonl", "task name 'a b'")]:
        with pytest.raises(UserError, match=None) as e:
            parse_task_arg(text)
        assert words in str(e.value) and repr(text) in str(e.value), str(e.value)
    with pytest.raises(UserError, match="limit must be"):
        parse_task_arg("piqa=p.jsonl", limit=0)
    with pytest.raises(UserError, match="unknown method"):
        parse_task_arg("piqa=p.jsonl", method="gen")
    with pytest.raises(UserError, match="letter method has no prompt for the mc format"):
        parse_task_arg("mc=p.jsonl", method="letter")
    assert METHODS == ("loglik", "letter")


def test_check_task_keys():
    a = parse_task_arg("arc-e=one.jsonl")
    b = parse_task_arg("arc-e=two.jsonl")
    check_task_keys([a, parse_task_arg("two:arc-e=two.jsonl")])
    with pytest.raises(UserError) as e:
        check_task_keys([a, b])
    assert "two tasks are named 'arc-e'" in str(e.value)
    assert "one.jsonl" in str(e.value) and "two.jsonl" in str(e.value)


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------

def test_parquet_task_equals_jsonl_and_names_rows(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = ROWS["arc-e"]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "arc.parquet")
    path = str(tmp_path / "arc.parquet")
    got = load_task(TaskSpec(key="arc-e", format="arc-e", path=path))
    want = items(tmp_path, "arc-e", rows)
    assert [(i.requests, i.gold, i.choice_texts) for i in got] == \
        [(i.requests, i.gold, i.choice_texts) for i in want]
    assert got[1].where == f"{path} row 2"

    broken = [dict(rows[0]), {k: v for k, v in rows[1].items() if k != "answerKey"}]
    broken[1]["answerKey"] = None       # Parquet fills a missing value with null
    pq.write_table(pa.Table.from_pylist(broken), tmp_path / "broken.parquet")
    with pytest.raises(DataError) as e:
        load_task(TaskSpec(key="arc-e", format="arc-e", path=str(tmp_path / "broken.parquet")))
    assert str(e.value).startswith(f"{tmp_path / 'broken.parquet'}: row 2: column "
                                   "'answerKey' must be a string, got null")

    # Training data may be Parquet too.
    pq.write_table(pa.Table.from_pylist([{"text": "a"}, {"text": "b"}]), tmp_path / "t.parquet")
    data = load_data_file(tmp_path / "t.parquet")
    assert data.kind == "text" and data.rows == [{"text": "a"}, {"text": "b"}]
    assert data.lines == [1, 2]

    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        load_task(TaskSpec(key="mc", format="mc", path=str(tmp_path / "fake.parquet")))
    with pytest.raises(DataError, match="data file not found"):
        load_task(TaskSpec(key="mc", format="mc", path=str(tmp_path / "none.parquet")))


# --------------------------------------------------------------------------------------
# letter: m-LoRA's prompts (TUDB-Labs/mLoRA mlora/tasks/qa_tasks.py)
# --------------------------------------------------------------------------------------

def test_letter_prompts_arc_and_piqa(tmp_path):
    arc = items(tmp_path, "arc-c", ROWS["arc-e"][:2], method="letter")
    assert isinstance(arc[0], LetterItem)
    assert arc[0].prompt == ("Please choose the correct answer to the question: Which gas do "
                             "plants take in? (A) oxygen (B) carbon dioxide (C) helium "
                             "(D) neon\nAnswer:")
    assert arc[0].labels == ["1", "2", "3", "4", "A", "B", "C", "D", "E"]
    assert arc[0].gold == 5 and arc[1].gold == 0        # "B" and "1" in m-LoRA's label set

    piqa = items(tmp_path, "piqa", ROWS["piqa"], method="letter")
    assert piqa[1].prompt == (
        "Below is a common task along with two possible solutions labeled (A) and (B). "
        "Please select the appropriate solution to achieve the task:\nKeep bread fresh\n"
        "\n(A) leave it open\n(B) seal it in a bag\n\nCorrect solution:")
    assert piqa[1].labels == ["A", "B"] and piqa[1].gold == 1


def test_letter_prompts_boolq_siqa_winogrande_hellaswag(tmp_path):
    boolq = items(tmp_path, "boolq", ROWS["boolq"], method="letter")
    # m-LoRA asks without the passage; super_glue's label 1 is "true" (index 0).
    assert boolq[0].prompt == ("Please answer the following question with true or false: "
                               "is the sky blue?\nAnswer:")
    assert boolq[0].labels == ["true", "false"]
    assert [b.gold for b in boolq] == [0, 1]

    siqa = items(tmp_path, "siqa", ROWS["siqa"], method="letter")
    assert siqa[1].prompt == ("Please choose the correct answer to the question.\nQuestion: "
                              "Sam ran late. What will Sam do next?\n(A) sleep\n(B) sing\n"
                              "(C) hurry\nAnswer:")
    assert siqa[1].gold == 2

    wino = items(tmp_path, "winogrande", ROWS["winogrande"], method="letter")
    assert wino[1].prompt == (
        "Please choose the correct answer to fill in the blank to complete the given "
        "sentence.\nSentence: Sarah lent Maria a book because _ had two.\n(A) Sarah\n"
        "(B) Maria\nAnswer:")
    assert wino[1].gold == 1

    row = dict(ROWS["hellaswag"][1], ctx="[header] How to bake.")
    (hs,) = items(tmp_path, "hellaswag", [row], method="letter")
    assert hs.prompt == ("Please choose the correct ending to complete the given sentence.\n"
                         "Sentence: Baking cookies. [header] How to bake.\n(A) Mix the dough."
                         "\n(B) [step] Eat raw.\n(C) Sleep.\n(D) Paint it.\nAnswer:")
    assert hs.labels == ["A", "B", "C", "D"] and hs.gold == 0
