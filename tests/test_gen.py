"""`mlora gen`: configs from templates, one adapter per task file, that validate and train."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from engine.core.config import load_config
from engine.core.families import DEFAULT_TARGETS
from engine.tools.scaffold import list_templates
from mlora_tui.cli import app

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def tasks(tmp_path):
    paths = []
    for name in ("first task.jsonl", "second.json"):
        path = tmp_path / "data" / name
        path.parent.mkdir(exist_ok=True)
        rows = [{"instruction": "Say hi.", "output": "hi"}] * 3
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) if name.endswith("l")
                        else json.dumps(rows))
        paths.append(path)
    return paths


def test_every_variant_has_a_template_that_generates_a_valid_config(tasks, tmp_path):
    assert set(list_templates()) == {"lora", "rslora", "dora", "loraplus", "mixlora",
                                     "mixlora-switch", "mixlora-dynamic"}
    for template in list_templates():
        out = tmp_path / "configs" / f"{template}.toml"
        result = invoke("gen", "--template", template, "--tasks",
                        ";".join(str(p) for p in tasks), "-o", out, "--lr", "1e-3")
        assert result.exit_code == 0, result.output
        config = load_config(out)
        assert [a.name for a in config.adapters] == ["first_task", "second"]
        assert [a.data for a in config.adapters] == [str(p) for p in tasks]
        adapter = config.adapters[0]
        assert adapter.lr == 1e-3
        mixlora = template.startswith("mixlora")
        # The demo model's family; MixLoRA's experts also need the feed-forward projections.
        assert adapter.target_modules == DEFAULT_TARGETS["llama"] + (
            ["gate_proj", "up_proj", "down_proj"] if mixlora else [])
        assert adapter.routing_strategy == (template if mixlora else None)
        assert adapter.use_dora == (template == "dora")
        assert adapter.use_rslora == (template == "rslora")
        assert (adapter.loraplus_lr_ratio > 1) == (template == "loraplus")


def test_targets_follow_the_base_model_family(tasks, tmp_path):
    model = tmp_path / "phi3-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "phi3"}))
    out = tmp_path / "phi3.toml"
    result = invoke("gen", "--template", "lora", "--tasks", str(tasks[0]), "--base_model",
                    model, "-o", out)
    assert result.exit_code == 0, result.output
    assert load_config(out).adapters[0].target_modules == ["qkv_proj", "o_proj"]
    # Paths below the config's folder are written relative to it.
    data = tomllib.loads(out.read_text())["adapter"][0]["data"]
    assert data == str(Path("data") / "first task.jsonl")


def test_mixlora_templates_are_listed_and_target_the_fused_feed_forward(tasks, tmp_path):
    result = invoke("gen", "--list")
    assert result.exit_code == 0, result.output
    for name in ("mixlora", "mixlora-switch", "mixlora-dynamic"):
        assert name in result.output
    model = tmp_path / "glm4-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "glm4"}))
    out = tmp_path / "glm4.toml"
    result = invoke("gen", "--template", "mixlora-switch", "--tasks", str(tasks[0]),
                    "--base_model", model, "-o", out)
    assert result.exit_code == 0, result.output
    adapter = load_config(out).adapters[0]
    assert adapter.target_modules == DEFAULT_TARGETS["glm4"] + ["gate_up_proj", "down_proj"]
    assert (adapter.routing_strategy, adapter.expert_capacity) == ("mixlora-switch", 64)


@pytest.mark.parametrize("args, message", [
    (["--template", "dorra", "--tasks", "x.json"], 'did you mean "dora"?'),
    (["--template", "lora", "--tasks", "missing.json"], "missing.json: no such file"),
    (["--template", "lora"], "give --template NAME and --tasks"),
    (["--template", "lora", "--tasks", "TASK", "--r", "0"], "r: expected an integer from 1"),
])
def test_bad_gen_arguments_exit_2(args, message, tasks, tmp_path):
    args = [str(tasks[0]) if a == "TASK" else a for a in args]
    result = invoke("gen", *args, "-o", tmp_path / "out.toml")
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "out.toml").exists()


def test_a_generated_config_trains(tasks, tmp_path, tmp_path_factory):
    from engine.train.engine import Engine
    from tiny_models import tiny_model_dir

    out = tmp_path / "run.toml"
    result = invoke("gen", "--template", "rslora", "--tasks", ";".join(map(str, tasks)),
                    "--base_model", tiny_model_dir("llama", tmp_path_factory), "-o", out,
                    "--batch_size", "2", "--micro_batch_size", "1", "--num_epochs", "1",
                    "--output_dir", tmp_path / "runs")
    assert result.exit_code == 0, result.output
    engine = Engine(load_config(out))
    engine.run()
    assert {j.state for j in engine.jobs.values()} == {"done"}
    assert (tmp_path / "runs" / "first_task" / "adapter_model.safetensors").is_file()
