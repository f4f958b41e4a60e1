"""`mlora export --merge`: the merged model equals PEFT's merge_and_unload, MixLoRA is refused,
the output folder is written atomically, and bad input is a message with exit 2.

Relative error here is max |ours - PEFT's| / max |PEFT's| over the logits of a batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from engine.core.errors import UserError
from engine.train.export import export_merged
from mlora_tui.cli import app
from test_engine_exactness import peft_initial_adapter
from test_evaluate import _mixlora_folder
from tiny_models import tiny_model_dir

IDS = torch.tensor([[1, 45, 77, 12, 9, 100, 3, 55], [1, 250, 17, 8, 90, 33, 12, 5]])
FP32_TOL = 1e-4
# Measured: 4.9e-3 .. 5.7e-3 (LoRA, rsLoRA, DoRA; tiny llama, CPU) for the bf16 export
# against the fp32 one: bf16's rounding of weights and activations (2**-8 = 3.9e-3).
BF16_TOL = 2e-2


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("export_adapters")
    return {name: peft_initial_adapter(tiny_llama, root / name, **fields)
            for name, fields in [("lora", {}), ("rslora", {"use_rslora": True}),
                                 ("dora", {"use_dora": True})]}


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _peft_merged_logits(model_dir: Path, folder: Path) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return _logits(peft.PeftModel.from_pretrained(base, folder).merge_and_unload())


def _exported_logits(out: Path) -> torch.Tensor:
    return _logits(AutoModelForCausalLM.from_pretrained(out))


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def _export(*args: str):
    return CliRunner().invoke(app, ["export", *args])


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_the_merged_model_equals_peft_merge_and_unload(variant, adapters, tiny_llama, tmp_path):
    out = tmp_path / "merged"
    result = _export("--adapter", str(adapters[variant]), "--merge", "-o", str(out))
    assert result.exit_code == 0, result.output
    for name in ("config.json", "model.safetensors", "generation_config.json",
                 "tokenizer_config.json"):
        assert (out / name).is_file(), name
    assert not (out / "adapter_config.json").exists()
    ref = _peft_merged_logits(tiny_llama, adapters[variant])
    ours = _exported_logits(out)
    print(f"export vs PEFT merge_and_unload, {variant} (fp32): max relative error "
          f"{_rel(ours, ref):.2e}")
    assert _rel(ours, ref) < FP32_TOL
    from transformers import AutoTokenizer
    text = "hello there"
    assert (AutoTokenizer.from_pretrained(out)(text).input_ids
            == AutoTokenizer.from_pretrained(tiny_llama)(text).input_ids)
    # The adapter mattered: the merged model is not the base model.
    base = _logits(AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32))
    assert _rel(base, ref) > 1e-3
    # No temporary folder is left beside it.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora"])
def test_a_bf16_export_is_within_bf16_rounding_of_the_fp32_merge(variant, adapters, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    export_merged(adapters[variant], fp32)
    export_merged(adapters[variant], bf16, dtype="bf16")
    model = AutoModelForCausalLM.from_pretrained(bf16)
    assert model.dtype == torch.bfloat16
    error = _rel(_logits(model), _exported_logits(fp32))
    print(f"bf16 vs fp32 merge, {variant}: max relative error {error:.2e}")
    assert error < BF16_TOL


def test_a_regex_target_modules_adapter_merges(adapters, tiny_llama, tmp_path):
    folder = tmp_path / "regex"
    shutil.copytree(adapters["dora"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = r".*\.(q_proj|v_proj|down_proj)"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    export_merged(folder, out)
    assert _rel(_exported_logits(out), _peft_merged_logits(tiny_llama, folder)) < FP32_TOL


def test_an_adapter_written_by_the_engine_trained_on_4bit_merges_unquantized(tiny_llama,
                                                                             tmp_path):
    """Written by engine.train.adapters.adapter_files as the engine saves a job; its
    mlora_adapter.json says 4-bit and bf16: the export says why it differs, takes the
    recorded dtype by default, and equals PEFT's merge in fp32."""
    from engine.core.config import ModelConfig
    from engine.train.adapters import (adapter_files, attach_adapter, peft_config,
                                       write_folder_atomically)
    from engine.train.lora import BatchLayout
    from engine.train.models import find_target_linears, load_base_model

    model, _tok, _info = load_base_model(ModelConfig(base_model=str(tiny_llama)), "cpu")
    targets = ["q_proj", "k_proj", "o_proj", "up_proj"]
    attach_adapter(model, BatchLayout(), "job", list(find_target_linears(model, targets)),
                   r=8, alpha=16, dropout=0.05, use_rslora=True, use_dora=True, init_seed=1,
                   device=torch.device("cpu"))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.add_(torch.randn_like(p) * 0.05)
    config = peft_config(r=8, alpha=16, dropout=0.05, target_modules=targets, use_rslora=True,
                         use_dora=True, base_model=str(tiny_llama))
    meta = {"base_model": str(tiny_llama), "dtype": "bf16", "quantize": "4bit",
            "prompt": "alpaca"}
    folder = tmp_path / "job"
    write_folder_atomically(folder, adapter_files(model, "job", config, meta))

    logs: list[str] = []
    out = export_merged(folder, tmp_path / "default", log=logs.append).out
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    note = [line for line in logs if "4bit" in line]
    assert len(note) == 1 and "unquantized" in note[0] and "differs slightly" in note[0]

    result = _export("--adapter", str(folder), "--merge", "-o", str(tmp_path / "fp32"),
                     "--dtype", "fp32")
    assert result.exit_code == 0, result.output
    assert "unquantized" in result.output
    ref = _peft_merged_logits(tiny_llama, folder)
    error = _rel(_exported_logits(tmp_path / "fp32"), ref)
    print(f"engine-written DoRA+rsLoRA (4bit meta) vs PEFT merge (fp32): {error:.2e}")
    assert error < FP32_TOL


def test_a_mixlora_adapter_is_refused(tiny_llama, tmp_path):
    mix = _mixlora_folder(tiny_llama, tmp_path / "mix")
    result = _export("--adapter", str(mix), "--merge", "-o", str(tmp_path / "out"))
    assert result.exit_code == 2
    text = " ".join(result.output.split())
    assert "MixLoRA" in text and "cannot be merged" in text and "router" in text
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_non_empty_output_is_refused_unless_overwrite(adapters, tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--adapter", str(adapters["lora"]), "--merge", "-o", str(out)]
    result = _export(*args)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = _export(*args, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # An empty folder is simply filled.
    (tmp_path / "empty").mkdir()
    assert _export("--adapter", str(adapters["lora"]), "--merge", "-o",
                   str(tmp_path / "empty")).exit_code == 0


def test_a_failed_write_leaves_nothing_half_written(adapters, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")

    def broken_save(self, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", broken_save)
    for target in (out, tmp_path / "new"):
        result = _export("--adapter", str(adapters["lora"]), "--merge", "-o", str(target),
                         "--overwrite")
        assert result.exit_code == 2, result.output
        assert "No space left" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "old"

    # Any other failure too: no temporary folder left, OUT untouched.
    def crash(self, folder, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", crash)
    with pytest.raises(RuntimeError):
        export_merged(adapters["lora"], out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "old"


def test_bad_input_is_a_message_with_exit_2(adapters, tmp_path):
    not_adapter = tmp_path / "not_adapter"
    not_adapter.mkdir()
    (not_adapter / "notes.txt").write_text("x")
    cases = [
        (["--adapter", str(tmp_path / "missing"), "--merge", "-o", str(tmp_path / "o")],
         "no such adapter folder"),
        (["--adapter", str(not_adapter), "--merge", "-o", str(tmp_path / "o")],
         "not an adapter folder"),
        (["--adapter", str(adapters["lora"]), "-o", str(tmp_path / "o")], "--merge"),
        (["--adapter", str(adapters["lora"]), "--merge", "-o", str(tmp_path / "o"),
          "--dtype", "int4"], "fp32, bf16 or fp16"),
        (["--adapter", str(adapters["lora"]), "--merge", "-o", str(tmp_path / "o"),
          "--base-model", str(tmp_path / "nowhere")], "not a folder"),
    ]
    for args, message in cases:
        result = _export(*args)
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), (args, result.output)
        assert "Traceback" not in result.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match="not a folder"):
        (tmp_path / "file").write_text("x")
        export_merged(adapters["lora"], tmp_path / "file")


def test_the_command_is_listed():
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "export" in result.output
