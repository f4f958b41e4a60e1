"""Config loading and validation (engine.core.config) and m-LoRA JSON conversion (engine.tools.convert).

Bad configs are a table: each case is TOML text written next to a small data file, with the
table and field the error must name and a fragment of its message.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

from engine.core.config import (AdapterConfig, ModelConfig, RunConfig, TrainConfig, load_adapter_file,
                                load_config, parse_adapter_tables, parse_config)
from engine.tools.convert import convert_mlora_json
from engine.core.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

ADAPTER = '[[adapter]]\nname = "a"\ndata = "data.jsonl"\n'


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """A config folder with the files the cases refer to."""
    (tmp_path / "data.jsonl").write_text('{"instruction": "hi", "output": "hello"}\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "template.json").write_text('{"prompt_no_input": "{instruction}"}')
    return tmp_path


def write(folder: Path, text: str, name: str = "run.toml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def load_error(path: Path) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value


# (id, TOML text, table, field, message fragment)
BAD_CONFIGS = [
    # [model]
    ("dtype", '[model]\ndtype = "fp8"\n' + ADAPTER, "model", "dtype",
     'expected one of "fp32", "bf16", "fp16", got "fp8"'),
    ("quantize", '[model]\nquantize = "3bit"\n' + ADAPTER, "model", "quantize",
     'one of "none", "4bit", "8bit"'),
    ("dtype_case", '[model]\ndtype = "BF16"\n' + ADAPTER, "model", "dtype",
     'got "BF16"; did you mean "bf16"?'),
    ("attn_impl", '[model]\nattn_impl = "flash"\n' + ADAPTER, "model", "attn_impl",
     'did you mean "flash_attn"?'),
    ("tf32_string", '[model]\ntf32 = "yes"\n' + ADAPTER, "model", "tf32",
     'expected true or false, got "yes" (a string)'),
    ("base_model_missing", '[model]\nbase_model = "no/such-model"\n' + ADAPTER, "model",
     "base_model", "no folder at"),
    ("base_model_no_config_json", '[model]\nbase_model = "somedir"\n' + ADAPTER, "model",
     "base_model", "no config.json there"),
    ("base_model_int", "[model]\nbase_model = 5\n" + ADAPTER, "model", "base_model",
     "expected a string, got 5 (an integer)"),
    ("model_unknown_key", '[model]\ndtyp = "bf16"\n' + ADAPTER, "model", "dtyp",
     'unknown key; did you mean "dtype"?'),
    ("model_array_of_tables", '[[model]]\ndtype = "bf16"\n' + ADAPTER, "model", None,
     "got an array of tables"),
    # [train]
    ("seed_negative", "[train]\nseed = -1\n" + ADAPTER, "train", "seed",
     "expected an integer from 0 to 4294967295, got -1"),
    ("train_cutoff_len", "[train]\ncutoff_len = 4\n" + ADAPTER, "train", "cutoff_len",
     "expected an integer >= 8, got 4"),
    ("save_step", "[train]\nsave_step = 0\n" + ADAPTER, "train", "save_step",
     "expected an integer >= 1, got 0"),
    ("simultaneous", "[train]\ntrain_lora_simultaneously_num = 0\n" + ADAPTER, "train",
     "train_lora_simultaneously_num", "expected an integer >= 1, got 0"),
    ("output_dir_empty", '[train]\noutput_dir = ""\n' + ADAPTER, "train", "output_dir",
     "expected a non-empty string"),
    ("lr_in_train", "[train]\nlr = 1e-4\n" + ADAPTER, "train", "lr",
     "unknown key; lr belongs in [[adapter]]"),
    # top level
    ("top_level_typo", "[trian]\nseed = 1\n" + ADAPTER, None, "trian",
     'unknown key; did you mean "train"?'),
    ("top_level_field", "cutoff_len = 256\n" + ADAPTER, None, "cutoff_len",
     "cutoff_len belongs in [train] or [[adapter]]"),
    ("no_adapter", '[train]\noutput_dir = "runs/x"\n', None, None, "no [[adapter]] table"),
    ("single_adapter_table", '[adapter]\nname = "a"\ndata = "data.jsonl"\n', "adapter", None,
     "got a single [adapter] table"),
    # [[adapter]]: names and required fields
    ("missing_name", '[[adapter]]\ndata = "data.jsonl"\n', "adapter[1]", "name", "missing"),
    ("misspelt_name", '[[adapter]]\nnmae = "a"\ndata = "data.jsonl"\n', "adapter[1]", "nmae",
     'did you mean "name"?'),
    ("missing_data", '[[adapter]]\nname = "a"\n', 'adapter "a"', "data", "missing"),
    ("bad_name", '[[adapter]]\nname = "my adapter"\ndata = "data.jsonl"\n', "adapter[1]",
     "name", 'got "my adapter"'),
    ("name_int", '[[adapter]]\nname = 3\ndata = "data.jsonl"\n', "adapter[1]", "name",
     "expected a string, got 3 (an integer)"),
    ("duplicate_name", ADAPTER + '[[adapter]]\nname = "b"\ndata = "data.jsonl"\n' + ADAPTER,
     "adapter[3]", "name", 'adapter[1] and adapter[3] are both named "a"'),
    ("name_reserved", '[[adapter]]\nname = "Checkpoints"\ndata = "data.jsonl"\n',
     'adapter "Checkpoints"', "name", "the name of a file or folder the run writes"),
    ("name_reserved_replaced", '[[adapter]]\nname = "replaced-1"\ndata = "data.jsonl"\n',
     'adapter "replaced-1"', "name", "choose another name"),
    ("duplicate_name_case", ADAPTER + '[[adapter]]\nname = "A"\ndata = "data.jsonl"\n',
     "adapter[2]", "name", "differ only in case"),
    ("adapter_not_table", 'adapter = [1]\n', "adapter[1]", None,
     "expected a table, got 1 (an integer)"),
    # [[adapter]]: LoRA shape
    ("r_zero", ADAPTER + "r = 0\n", 'adapter "a"', "r",
     "expected an integer from 1 to 1024, got 0"),
    ("r_huge", ADAPTER + "r = 2048\n", 'adapter "a"', "r", "got 2048"),
    ("r_float", ADAPTER + "r = 8.0\n", 'adapter "a"', "r",
     "expected an integer, got 8.0 (a float)"),
    ("r_bool", ADAPTER + "r = true\n", 'adapter "a"', "r",
     "expected an integer, got true (a boolean)"),
    ("lora_alpha_zero", ADAPTER + "lora_alpha = 0\n", 'adapter "a"', "lora_alpha",
     "expected a number > 0, got 0"),
    ("lora_alfa", ADAPTER + "lora_alfa = 16\n", 'adapter "a"', "lora_alfa",
     'unknown key; did you mean "lora_alpha"?'),
    ("mlora_alpha", ADAPTER + "alpha = 16\n", 'adapter "a"', "alpha",
     'did you mean "lora_alpha"?'),
    ("dropout_one", ADAPTER + "lora_dropout = 1.0\n", 'adapter "a"', "lora_dropout",
     "expected a number >= 0 and < 1, got 1.0"),
    ("loraplus_zero", ADAPTER + "loraplus_lr_ratio = 0\n", 'adapter "a"', "loraplus_lr_ratio",
     "expected a number > 0"),
    # target_modules
    ("targets_string", ADAPTER + 'target_modules = "q_proj"\n', 'adapter "a"', "target_modules",
     'got "q_proj" (a string)'),
    ("targets_empty", ADAPTER + "target_modules = []\n", 'adapter "a"', "target_modules",
     "expected a non-empty list"),
    ("targets_duplicate", ADAPTER + 'target_modules = ["q_proj", "q_proj"]\n', 'adapter "a"',
     "target_modules", 'got "q_proj" twice'),
    ("targets_lm_head", ADAPTER + 'target_modules = ["q_proj", "lm_head"]\n', 'adapter "a"',
     "target_modules", '"lm_head" cannot be a target'),
    ("targets_embed", ADAPTER + 'target_modules = {embed_tokens = true}\n', 'adapter "a"',
     "target_modules", '"embed_tokens" cannot be a target'),
    ("targets_map_all_false", ADAPTER + "target_modules = {q_proj = false}\n", 'adapter "a"',
     "target_modules", "at least one module set to true"),
    ("targets_map_not_bool", ADAPTER + "target_modules = {q_proj = 1}\n", 'adapter "a"',
     "target_modules", 'expected true or false for module "q_proj", got 1 (an integer)'),
    ("targets_list_of_int", ADAPTER + "target_modules = [1]\n", 'adapter "a"', "target_modules",
     "expected a list of strings"),
    # optimisation
    ("optim", ADAPTER + 'optim = "adam"\n', 'adapter "a"', "optim",
     'expected one of "adamw", "sgd", got "adam"; did you mean "adamw"?'),
    ("lr_ten", ADAPTER + "lr = 10\n", 'adapter "a"', "lr",
     "expected a number > 0 and <= 1, got 10"),
    ("lr_negative", ADAPTER + "lr = -1e-4\n", 'adapter "a"', "lr",
     "expected a number > 0 and <= 1"),
    ("lr_nan", ADAPTER + "lr = nan\n", 'adapter "a"', "lr", "expected a finite number, got nan"),
    ("lr_inf", ADAPTER + "lr = inf\n", 'adapter "a"', "lr", "expected a finite number, got inf"),
    ("lr_string", ADAPTER + 'lr = "3e-4"\n', 'adapter "a"', "lr",
     'expected a number, got "3e-4" (a string)'),
    ("momentum_with_adamw", ADAPTER + "momentum = 0.9\n", 'adapter "a"', "momentum",
     'only used with optim = "sgd"'),
    ("weight_decay_negative", ADAPTER + "weight_decay = -0.1\n", 'adapter "a"', "weight_decay",
     "expected a number >= 0 and <= 1"),
    ("batch_size_zero", ADAPTER + "batch_size = 0\n", 'adapter "a"', "batch_size",
     "expected an integer >= 1, got 0"),
    ("micro_bigger", ADAPTER + "batch_size = 4\nmicro_batch_size = 8\n", 'adapter "a"',
     "micro_batch_size", "expected an integer <= batch_size (4), got 8"),
    ("not_divisible", ADAPTER + "batch_size = 10\nmicro_batch_size = 4\n", 'adapter "a"',
     "batch_size", "gradient"),
    ("num_epochs_zero", ADAPTER + "num_epochs = 0\n", 'adapter "a"', "num_epochs",
     "expected an integer >= 1, got 0"),
    ("scheduler", ADAPTER + 'scheduler_type = "cosine_with_restarts"\n', 'adapter "a"',
     "scheduler_type", '"constant", "linear", "cosine"'),
    ("warmup_ratio_one", ADAPTER + "warmup_ratio = 1\n", 'adapter "a"', "warmup_ratio",
     "expected a number >= 0 and < 1, got 1"),
    ("warmup_both", ADAPTER + "warmup_ratio = 0.1\nwarmup_steps = 10\n", 'adapter "a"',
     "warmup_steps", "not both"),
    ("adapter_cutoff_len", ADAPTER + "cutoff_len = 2\n", 'adapter "a"', "cutoff_len",
     "expected an integer >= 8, got 2"),
    ("val_set_size", ADAPTER + "val_set_size = -1\n", 'adapter "a"', "val_set_size",
     "expected an integer >= 0, got -1"),
    ("max_grad_norm_zero", ADAPTER + "max_grad_norm = 0\n", 'adapter "a"', "max_grad_norm",
     "expected a number > 0, got 0"),
    ("dtype_in_adapter", ADAPTER + 'dtype = "bf16"\n', 'adapter "a"', "dtype",
     "dtype belongs in [model]"),
    # files
    ("data_missing_file", '[[adapter]]\nname = "a"\ndata = "nope.jsonl"\n', 'adapter "a"',
     "data", "file not found: nope.jsonl"),
    ("data_folder", '[[adapter]]\nname = "a"\ndata = "somedir"\n', 'adapter "a"', "data",
     "got a folder"),
    ("data_empty", '[[adapter]]\nname = "a"\ndata = "empty.jsonl"\n', 'adapter "a"', "data",
     "the data file is empty"),
    ("prompt_unknown", ADAPTER + 'prompt = "alpacca"\n', 'adapter "a"', "prompt",
     'did you mean "alpaca"?'),
    ("prompt_missing_file", ADAPTER + 'prompt = "missing.json"\n', 'adapter "a"', "prompt",
     "template file not found: missing.json"),
    ("init_from_not_adapter", ADAPTER + 'init_from = "somedir"\n', 'adapter "a"', "init_from",
     "no adapter_config.json there"),
    # TOML syntax
    ("malformed_toml", '[model]\ndtype = bf16\n' + ADAPTER, None, None,
     'invalid TOML at line 2, column 9: Invalid value; strings need double quotes, e.g. "bf16"'),
    ("toml_capital_bool", "[model]\ntf32 = True\n" + ADAPTER, None, None,
     "line 2, column 8: Invalid value; booleans are lower-case: true or false"),
    ("duplicate_key", ADAPTER + "r = 8\nr = 16\n", None, None, "invalid TOML at line 5"),
]


@pytest.mark.parametrize("text, table, field, fragment",
                         [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config(workdir, text, table, field, fragment):
    path = write(workdir, text)
    error = load_error(path)
    message = str(error)
    assert fragment in message
    assert error.file == str(path) and message.startswith(str(path))
    assert error.table == table
    assert error.field == field
    if table:
        assert f"[{table}]" in message
    if field:
        assert f"] {field}: " in message or message.startswith(f"{path} {field}: ")


def test_message_format_names_file_table_field(workdir):
    path = write(workdir, ADAPTER + "r = 0\n")
    expected = f'{path} [adapter "a"] r: expected an integer from 1 to 1024, got 0'
    assert str(load_error(path)) == expected


def test_not_utf8(workdir):
    path = workdir / "run.toml"
    path.write_bytes(ADAPTER.encode() + b'prompt = "caf\xe9"\n')
    message = str(load_error(path))
    assert "not UTF-8" in message and "line 4" in message and str(path) in message


def test_missing_file(tmp_path):
    assert "not found" in str(load_error(tmp_path / "nope.toml"))


def test_byte_order_mark_is_accepted(workdir):
    path = workdir / "run.toml"
    path.write_bytes(b"\xef\xbb\xbf" + ADAPTER.encode())
    assert load_config(path).adapters[0].name == "a"


# --- good configs ---------------------------------------------------------------------------

def test_minimal_config_fills_defaults(workdir):
    config = load_config(write(workdir, ADAPTER))
    assert config.model == ModelConfig()
    assert config.train == TrainConfig()
    assert config.source == str(workdir / "run.toml")
    (adapter,) = config.adapters
    expected = AdapterConfig(name="a", data=str(workdir / "data.jsonl"),
                             cutoff_len=TrainConfig().cutoff_len, seed=TrainConfig().seed)
    assert adapter == expected


def test_paths_resolve_against_the_config_folder(workdir, tmp_path_factory, monkeypatch):
    model = workdir / "models" / "tiny"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    adapter_dir = workdir / "previous"
    adapter_dir.mkdir()
    (adapter_dir / "adapter_config.json").write_text("{}")
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(write(workdir, """\
        [model]
        base_model = "models/tiny"
        [train]
        output_dir = "runs/x"
        [[adapter]]
        name = "a"
        data = "data.jsonl"
        prompt = "template.json"
        init_from = "previous"
    """))
    assert config.model.base_model == str(model)
    assert config.train.output_dir == "runs/x"   # relative to the current directory
    adapter = config.adapters[0]
    assert adapter.data == str(workdir / "data.jsonl")
    assert adapter.prompt == str(workdir / "template.json")
    assert adapter.init_from == str(adapter_dir)


def test_full_adapter(workdir):
    config = load_config(write(workdir, """\
        [model]
        dtype = "bf16"
        tf32 = true
        attn_impl = "sdpa"
        [train]
        seed = 7
        cutoff_len = 128
        [[adapter]]
        name = "sum.v2-x"
        data = "data.jsonl"
        prompt = "alpaca"
        r = 16
        lora_alpha = 32
        lora_dropout = 0
        target_modules = ["q_proj", "v_proj"]
        use_rslora = true
        use_dora = true
        loraplus_lr_ratio = 16
        optim = "sgd"
        lr = 1
        momentum = 0.9
        weight_decay = 0.01
        batch_size = 8
        micro_batch_size = 8
        num_epochs = 1
        scheduler_type = "cosine"
        warmup_steps = 10
        cutoff_len = 64
        train_on_inputs = true
        val_set_size = 5
        group_by_length = true
        max_grad_norm = 1
        seed = 3
    """))
    a = config.adapters[0]
    assert (config.model.dtype, config.model.tf32, config.model.attn_impl) == ("bf16", True, "sdpa")
    assert (a.name, a.prompt, a.r) == ("sum.v2-x", "alpaca", 16)
    assert a.target_modules == ["q_proj", "v_proj"]
    # Integers are accepted where a number is expected, and become floats.
    assert a.lora_alpha == 32.0 and isinstance(a.lora_alpha, float)
    assert isinstance(a.lr, float) and isinstance(a.max_grad_norm, float)
    assert (a.optim, a.momentum, a.warmup_steps, a.cutoff_len, a.seed) == ("sgd", 0.9, 10, 64, 3)


def test_target_map_keeps_the_true_ones_in_order(workdir):
    config = load_config(write(workdir, ADAPTER + """\
        target_modules = { q_proj = true, k_proj = false, v_proj = true, o_proj = true }
    """))
    assert config.adapters[0].target_modules == ["q_proj", "v_proj", "o_proj"]


def test_adapters_keep_file_order_and_inherit_train(workdir):
    config = load_config(write(workdir, """\
        [train]
        seed = 5
        cutoff_len = 99
        [[adapter]]
        name = "b"
        data = "data.jsonl"
        [[adapter]]
        name = "a"
        data = "data.jsonl"
        cutoff_len = 50
    """))
    assert [(a.name, a.cutoff_len, a.seed) for a in config.adapters] == [("b", 99, 5), ("a", 50, 5)]


def test_parse_config_takes_a_dict(workdir):
    data = {"adapter": [{"name": "x", "data": "data.jsonl"}]}
    config = parse_config(data, "inline", workdir)
    assert isinstance(config, RunConfig) and config.source == "inline"
    assert config.adapters[0].data == str(workdir / "data.jsonl")


def test_parse_adapter_tables(workdir):
    train = TrainConfig(cutoff_len=77)
    adapters = parse_adapter_tables([{"name": "x", "data": "data.jsonl", "r": 4}], "jobs",
                                    train, workdir)
    assert [(a.name, a.r, a.cutoff_len) for a in adapters] == [("x", 4, 77)]
    with pytest.raises(ConfigError, match=r"^jobs \[adapter\[1\]\] name: missing"):
        parse_adapter_tables([{"data": "data.jsonl"}], "jobs", train, workdir)
    with pytest.raises(ConfigError, match="no \\[\\[adapter\\]\\] table"):
        parse_adapter_tables([], "jobs", train, workdir)


def test_load_adapter_file(workdir):
    path = write(workdir, ADAPTER + '[[adapter]]\nname = "b"\ndata = "data.jsonl"\n', "jobs.toml")
    adapters = load_adapter_file(path, TrainConfig())
    assert [a.name for a in adapters] == ["a", "b"]
    path = write(workdir, "[train]\nseed = 1\n" + ADAPTER, "jobs.toml")
    with pytest.raises(ConfigError, match=r"\[train\].*only \[\[adapter\]\] tables"):
        load_adapter_file(path, TrainConfig())


def test_template_lists_every_field_with_its_default(tmp_path):
    from engine.core.prompts import BUILTIN_TEMPLATE_NAMES

    text = (REPO / "configs" / "template.toml").read_text()
    for cls in (ModelConfig, TrainConfig, AdapterConfig):
        for f in dataclasses.fields(cls):
            assert f"\n{f.name} = " in text or f"\n# {f.name} = " in text, f.name
    for name in BUILTIN_TEMPLATE_NAMES:
        assert f'"{name}"' in text, name
    # The template itself is a valid config that sets every default.
    shutil.copy(REPO / "configs" / "template.toml", tmp_path / "template.toml")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "sentiment.jsonl").write_text("{}\n")
    config = load_config(tmp_path / "template.toml")
    assert config.model == ModelConfig() and config.train == TrainConfig()
    adapter = config.adapters[0]
    defaults = AdapterConfig(name=adapter.name, data=adapter.data, cutoff_len=adapter.cutoff_len,
                             seed=adapter.seed)
    assert adapter == defaults
    assert (adapter.cutoff_len, adapter.seed) == (TrainConfig().cutoff_len, TrainConfig().seed)


def test_import_does_not_pull_in_torch():
    code = ("import sys, engine.core.config, engine.tools.convert; "
            "sys.exit(1 if {'torch', 'transformers'} & set(sys.modules) else 0)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# --- m-LoRA conversion ----------------------------------------------------------------------

MLORA = {
    "cutoff_len": 128,
    "save_step": 50,
    "early_stop_test_step": 2000,
    "train_lora_candidate_num": 2,
    "train_lora_simultaneously_num": 2,
    "train_strategy": "optim",
    "lora": [
        {
            "name": "lora_0", "optim": "sgd", "lr": 1e-2, "momentum": 0.9,
            "batch_size": 16, "micro_batch_size": 4, "test_batch_size": 64, "num_epochs": 3,
            "r": 8, "alpha": 32, "dropout": 0.2,
            "target_modules": {"q_proj": True, "k_proj": False, "v_proj": True,
                               "w1_proj": True, "w2_proj": False},
            "data": 'dätä "1".jsonl', "prompt": "template.json", "group_by_length": False,
            "expand_side": "right", "use_rslora": True, "loraplus_lr_ratio": 20,
        },
        {
            "name": "lora_1", "optim": "adamw", "lr": 3e-4, "weight_decay": 0.01,
            "batch_size": 8, "micro_batch_size": 2, "num_epochs": 1, "r": 4,
            "lora_alpha": 8, "lora_dropout": 0.1, "target_modules": ["q_proj", "o_proj"],
            "data": "data.jsonl", "scheduler_type": "cosine", "warmup_steps": 5,
            "val_set_size": 3, "cutoff_len": 64, "train_on_inputs": True, "use_dora": True,
            "routing_strategy": "mixlora", "num_experts": 8, "top_k": 2,
            "expert_lora": {"r": 4, "use_rslora": True},
        },
    ],
}


def test_convert_round_trip(workdir):
    (workdir / 'dätä "1".jsonl').write_text("{}\n")
    (workdir / "m.json").write_text(json.dumps(MLORA, indent=2))
    text = convert_mlora_json(workdir / "m.json")
    config = parse_config(tomllib.loads(text), "converted", workdir)

    assert (config.train.cutoff_len, config.train.save_step,
            config.train.train_lora_simultaneously_num) == (128, 50, 2)
    first, second = config.adapters
    assert first.name == "lora_0" and first.data == str(workdir / 'dätä "1".jsonl')
    assert (first.optim, first.lr, first.momentum, first.batch_size, first.micro_batch_size,
            first.num_epochs) == ("sgd", 1e-2, 0.9, 16, 4, 3)
    assert (first.r, first.lora_alpha, first.lora_dropout) == (8, 32, 0.2)
    assert first.target_modules == ["q_proj", "v_proj", "gate_proj"]
    assert (first.use_rslora, first.loraplus_lr_ratio, first.group_by_length) == (True, 20, False)
    assert first.prompt == str(workdir / "template.json")
    assert first.cutoff_len == 128   # inherited from the global cutoff_len

    assert (second.optim, second.lr, second.weight_decay, second.r, second.lora_alpha,
            second.lora_dropout) == ("adamw", 3e-4, 0.01, 4, 8, 0.1)
    assert second.target_modules == ["q_proj", "o_proj"]
    assert (second.scheduler_type, second.warmup_steps, second.val_set_size, second.cutoff_len,
            second.train_on_inputs, second.use_dora) == ("cosine", 5, 3, 64, True, True)
    # MixLoRA fields carry over (the strategy's defaults fill what m-LoRA left out).
    assert (second.routing_strategy, second.num_experts, second.top_k) == ("mixlora", 8, 2)
    assert second.expert_lora == {"r": 4, "use_rslora": True}
    assert second.router_aux_loss_coef == 0.001 and second.top_p is None

    # What has no equivalent stays visible as comments.
    for fragment in ("# train_lora_candidate_num = 2", "# train_strategy = \"optim\"",
                     "# test_batch_size = 64", "# expand_side = \"right\"",
                     "\nrouting_strategy = \"mixlora\"", "\nnum_experts = 8", "\ntop_k = 2",
                     "\nexpert_lora = { r = 4, use_rslora = true }"):
        assert fragment in text, fragment


def test_convert_comments_out_momentum_without_sgd(workdir):
    lora = {"name": "x", "optim": "adamw", "lr": 1e-4, "momentum": 0.9, "data": "data.jsonl",
            "warmup_steps": 0}
    (workdir / "m.json").write_text(json.dumps({"lora": [lora]}))
    text = convert_mlora_json(workdir / "m.json")
    assert "\n# momentum = 0.9" in text and "\nmomentum" not in text
    assert "warmup_steps" not in text   # m-LoRA templates write 0: the same as leaving it out
    assert parse_config(tomllib.loads(text), "c", workdir).adapters[0].momentum == 0


def test_convert_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{\n  "cutoff_len": 256,\n  "lora": [\n    {"name": "a",}\n  ]\n}\n')
    with pytest.raises(ConfigError) as info:
        convert_mlora_json(path)
    assert str(info.value).startswith(f"{path}: invalid JSON at line 4")


def test_convert_rejects_non_mlora_json(tmp_path):
    path = tmp_path / "m.json"
    path.write_text('{"adapters": [], "tasks": []}')
    with pytest.raises(ConfigError, match="not an m-LoRA config"):
        convert_mlora_json(path)


def test_convert_writes_valid_toml_for_odd_values(tmp_path):
    odd = ['quote " backslash \\ tab \t newline \n', "ünï", "\x01", [1, 2.5, True], {"a b": 1}]
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"odd": odd, "big": 1e300, "lora": []}))
    text = convert_mlora_json(path)
    commented = next(line for line in text.splitlines() if line.startswith("# odd = "))
    assert tomllib.loads(commented[2:])["odd"] == odd
    big = next(line for line in text.splitlines() if line.startswith("# big = "))
    assert math.isclose(tomllib.loads(big[2:])["big"], 1e300)


@pytest.mark.parametrize("text, table, field, fragment",
                         [case[1:] for case in BAD_CONFIGS], ids=[case[0] for case in BAD_CONFIGS])
def test_bad_config_through_the_cli_exits_2_without_traceback(workdir, text, table, field,
                                                              fragment):
    """`mlora validate` on each bad config: exit code 2, the same message, no traceback."""
    from typer.testing import CliRunner

    from mlora_tui.cli import app

    path = write(workdir, text)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    output = " ".join(result.output.split())
    assert " ".join(fragment.split()) in output
    assert "Traceback" not in output
