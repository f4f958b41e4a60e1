"""[train] report_to: TensorBoard, wandb, MLflow and trackio receive every job's metrics.

One tiny run reports to all four; each tracker's own reader reads the result back: the
TensorBoard scalars are metrics.jsonl's numbers (to float32), MLflow's file store and
trackio's store hold a run per job with its settings and loss history, wandb's offline
folder a run per job with its config. A tracker that raises is turned off with one warning;
training goes on. Nothing touches the network or the user's home.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.core.config import ModelConfig, RunConfig, TrainConfig, resolve_mixlora
from engine.core.config_eval import EvalConfig
from engine.train import trackers
from engine.train.engine import Engine
from test_config import ADAPTER, load_error, workdir, write  # noqa: F401 (fixture)
from test_engine_control import _adapter, data_file, model_dir  # noqa: F401 (fixtures)

ALL = ["tensorboard", "wandb", "mlflow", "trackio"]


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Every tracker local and quiet; their caches and homes in tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY", "WANDB_BASE_URL",
                 "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "TRACKIO_DIR",
                 "TRACKIO_SPACE_ID", "TRACKIO_SERVER_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(home / name.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "")   # unset, and unset again afterwards:
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")       # the mlflow tracker sets it itself
    return home


@pytest.fixture(scope="module")
def mc_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("task") / "mc.jsonl"
    rows = [{"question": f"Which word means {w}?", "choices": ["cat dog", w.upper(), "x"],
             "answer": 1} for w in ("cat", "dog", "red")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _run(model_dir, out, adapters, report_to, evals=()) -> list[dict]:
    config = RunConfig(model=ModelConfig(base_model=str(model_dir)),
                       train=TrainConfig(output_dir=str(out), cutoff_len=64,
                                         report_to=report_to),
                       adapters=adapters, evals=list(evals))
    Engine(config).run()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _series(events, job, type_="step", field="loss"):
    return [(e["step"], e[field]) for e in events
            if e["type"] == type_ and e.get("job") == job and field in e]


def _same_f32(got, want):
    """(step, value) lists equal, values to float32 rounding (TensorBoard keeps float32)."""
    assert [s for s, _ in got] == [s for s, _ in want]
    assert np.array_equal(np.float32([v for _, v in got]), np.float32([v for _, v in want]))


def _wandb_records(path):
    """The records of a wandb run file (its LevelDB-log framing, wandb's protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, buf, out = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):     # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def test_every_tracker_gets_every_jobs_metrics_and_settings(model_dir, data_file, mc_file,
                                                            tmp_path, offline):
    mix = resolve_mixlora(dict(routing_strategy="mixlora", num_experts=2, top_k=1, r=4,
                               lora_alpha=8, lora_dropout=0.1, router_z_loss_coef=0.01))
    adapters = [_adapter("a", data_file, eval_tasks=["words"], eval_steps=2),
                _adapter("b", data_file, r=2, seed=9, val_set_size=2, eval_steps=1,
                         target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"], **mix)]
    out = tmp_path / "run"
    events = _run(model_dir, out, adapters, ALL,
                  [EvalConfig(name="words", format="mc", data=mc_file)])
    assert not [e for e in events if e["type"] == "log" and e["level"] != "info"], events
    assert [e["jobs"] for e in events if e["type"] == "run_end"][0]["a"]["state"] == "done"
    wanted = {
        "a": {"train/loss": _series(events, "a"), "train/lr": _series(events, "a", field="lr"),
              "eval/words/acc": [(e["step"], e["scores"]["words"]["acc"]) for e in events
                                 if e["type"] == "eval" and e["job"] == "a"]},
        "b": {"train/loss": _series(events, "b"),
              "train/grad_norm": _series(events, "b", field="grad_norm"),
              "eval/loss": _series(events, "b", "eval", "eval_loss"),
              "router/aux_loss": _series(events, "b", "router", "aux_loss")},
    }
    assert all(len(series) >= 2 for job in wanted.values() for series in job.values()), wanted

    # TensorBoard, read with its own reader: the same numbers at the same steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job, series in wanted.items():
        acc = EventAccumulator(str(out / "tensorboard" / job))
        acc.Reload()
        for name, want in series.items():
            _same_f32([(s.step, s.value) for s in acc.Scalars(name)], want)
        assert "settings/text_summary" in acc.Tags()["tensors"]

    # MLflow's file store: one run per job, its settings as params, the loss history.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    experiment = client.get_experiment_by_name("run")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"a", "b"}
    assert runs["b"].data.params["r"] == "2" and runs["b"].data.params["variant"].startswith("mix")
    assert runs["a"].data.params["eval_tasks"] == "words"
    for job, series in wanted.items():
        assert runs[job].info.status == "FINISHED"
        for name, want in series.items():
            history = client.get_metric_history(runs[job].info.run_id, name)
            assert sorted((m.step, m.value) for m in history) == want, (job, name)

    # wandb, offline: a run folder per job, its config, its history.
    folders = sorted(glob.glob(str(out / "wandb" / "offline-run-*")))
    assert len(folders) == 2
    seen = {}
    for folder in folders:
        (path,) = glob.glob(f"{folder}/run-*.wandb")
        records = _wandb_records(path)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        losses = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json)
                   for i in r.history.item} for r in records
                  if r.WhichOneof("record_type") == "history"]
        seen[run.display_name] = (config, [(h["_step"], h["train/loss"]) for h in losses
                                           if "train/loss" in h])
    assert set(seen) == {"a", "b"}
    for job in ("a", "b"):
        config, losses = seen[job]
        assert {"r", "lr", "lora_alpha", "variant", "total_steps"} <= set(config)
        assert losses == wanted[job]["train/loss"]
    assert seen["b"][0]["r"] == 2 and seen["b"][0]["expert_lora.r"] == 4

    # trackio's local store (under output_dir: trackio was first imported by this run).
    import trackio.utils
    from trackio.sqlite_storage import SQLiteStorage

    assert Path(trackio.utils.TRACKIO_DIR) == (out / "trackio").absolute()
    assert sorted(SQLiteStorage.get_runs("run")) == ["a", "b"]
    for job in ("a", "b"):
        logs = SQLiteStorage.get_logs("run", job)
        got = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
        assert got == wanted[job]["train/loss"]
    assert not (offline / ".cache").exists() and not (offline / "hf" / "trackio").exists()


def test_a_tracker_that_raises_is_turned_off_with_one_warning(model_dir, data_file, tmp_path,
                                                              offline, monkeypatch):
    calls = {"n": 0}
    real_log = trackers.TensorBoard.log

    def flaky(self, job, step, values):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError("disk full")
        real_log(self, job, step, values)

    monkeypatch.setattr(trackers.TensorBoard, "log", flaky)
    out = tmp_path / "run"
    events = _run(model_dir, out, [_adapter("a", data_file), _adapter("b", data_file, r=2)],
                  ["tensorboard", "mlflow"])
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert len(warnings) == 1 and "tensorboard failed" in warnings[0], warnings
    assert "disk full" in warnings[0]
    assert calls["n"] == 2                   # off after its failure
    end = [e for e in events if e["type"] == "run_end"][0]["jobs"]
    assert {job["state"] for job in end.values()} == {"done"}
    from mlflow.tracking import MlflowClient   # the other tracker went on

    client = MlflowClient(tracking_uri=(out / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("run").experiment_id])
    for run in runs:
        history = client.get_metric_history(run.info.run_id, "train/loss")
        assert [(m.step, m.value) for m in sorted(history, key=lambda m: m.step)] == \
            _series(events, run.info.run_name)


def test_report_to_names_known_trackers_whose_library_is_installed(workdir, monkeypatch):
    error = load_error(write(workdir, '[train]\nreport_to = ["tensorbord"]\n' + ADAPTER))
    assert (error.table, error.field) == ("train", "report_to")
    assert 'unknown tracker "tensorbord"' in str(error)
    assert 'did you mean "tensorboard"?' in str(error)
    error = load_error(write(workdir, '[train]\nreport_to = "wandb"\n' + ADAPTER))
    assert "expected a list of tracker names" in str(error)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    error = load_error(write(workdir, '[train]\nreport_to = ["mlflow", "wandb"]\n' + ADAPTER))
    assert "needs the wandb package" in str(error)
    assert "pip install 'mlora-tui[wandb]'" in str(error)


def test_without_report_to_no_tracker_starts(model_dir, data_file, tmp_path, monkeypatch):
    monkeypatch.setattr(trackers, "TRACKER_CLASSES", {})     # any use would raise KeyError
    out = tmp_path / "run"
    events = _run(model_dir, out, [replace(_adapter("a", data_file), num_epochs=1)], [])
    assert not any(e["type"] == "log" and "tracker" in e["message"] for e in events)
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["a"]
