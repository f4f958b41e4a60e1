"""Hyperparameter sweeps (engine/train/sweeps.py, engine/core/config_sweep.py): Optuna's
trials trained as jobs, pruned losers, slots refilled, and a sweep killed with SIGKILL and
resumed ends exactly as one never killed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine.core.config import load_config
from engine.core.errors import ConfigError, UserError
from engine.train.engine import Engine
from tiny_models import tiny_model_dir

ROWS = [{"instruction": "Copy.", "input": "cat dog " * (1 + i % 4),
         "output": "CAT DOG " * (1 + i % 3)} for i in range(24)]
BASE = ('{ data = "d.jsonl", prompt = "none", r = 4, lora_alpha = 8, val_set_size = 4, '
        'num_epochs = 2, batch_size = 4, micro_batch_size = 4, lora_dropout = 0.1, '
        'target_modules = ["q_proj", "v_proj"] }')
GRID = "grid = { lr = [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1] }"
SAMPLE = ('sample = { lr = { log_uniform = [1e-4, 1e-1] }, lora_alpha = { choice = [4, 8, 16] } }'
          '\ntrials = 5\nsampler = "tpe"')


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory)


def write_sweep(folder: Path, model_dir: Path, search: str = GRID, extra: str = "",
                output: str = "out") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    path = folder / "sweep.toml"
    path.write_text(f'[model]\nbase_model = "{model_dir}"\n[train]\noutput_dir = '
                    f'"{folder / output}"\ncutoff_len = 64\nsave_step = 2\n\n'
                    f'[[sweep]]\nname = "lr"\nbase = {BASE}\n{search}\neval_steps = 1\n'
                    f'parallel = 2\nseed = 3\nprune = "asha"\n{extra}')
    return path


def _events(out: Path, type_: str | None = None) -> list[dict]:
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [e for e in events if type_ is None or e["type"] == type_]


def _trials(out: Path) -> list[dict]:
    summary = json.loads((out / "sweep-lr.json").read_text())
    return sorted(summary["trials"], key=lambda t: t["index"])


def test_a_grid_sweep_prunes_losers_and_never_trains_more_than_parallel(model_dir, tmp_path):
    config = write_sweep(tmp_path, model_dir)
    engine = Engine(load_config(config))
    engine.run()
    out = tmp_path / "out"
    states = {name: job.state for name, job in engine.jobs.items()}
    assert sorted(states) == [f"lr-{k}" for k in range(6)]
    assert "pruned" in states.values() and "done" in states.values()
    assert set(states.values()) <= {"done", "pruned"}
    # Never more than `parallel` trials running, from the job_state events in order.
    running, most = set(), 0
    for event in _events(out, "job_state"):
        (running.add if event["state"] == "running" else running.discard)(event["job"])
        most = max(most, len(running))
    assert most == 2
    # Each trial has the grid's parameters, in order; the summary ranks them, best first.
    summary = json.loads((out / "sweep-lr.json").read_text())
    assert [t["params"]["lr"] for t in _trials(out)] == [1e-4, 1e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    done = [t for t in summary["trials"] if t["state"] == "done"]
    assert done == sorted(done, key=lambda t: t["value"])
    assert summary["best"] == done[0]["job"]
    for trial in summary["trials"]:
        evals = [e for e in _events(out, "eval") if e["job"] == trial["job"]]
        assert trial["metric_history"] == [[e["step"], e["eval_loss"]] for e in evals]
        if trial["state"] == "pruned":
            assert "pruned by asha at step" in trial["reason"]
            assert (out / trial["job"] / "adapter_model.safetensors").is_file()
    # The study is Optuna's, in output_dir/sweeps.db.
    import optuna
    study = optuna.load_study(study_name="lr", storage=f"sqlite:///{out / 'sweeps.db'}")
    assert [t.state.name for t in study.trials] == [
        {"done": "COMPLETE", "pruned": "PRUNED"}[t["state"]] for t in _trials(out)]
    # A pruned trial does not resume.
    pruned = next(n for n, s in states.items() if s == "pruned")
    with pytest.raises(UserError, match="pruned"):
        engine.resume(pruned)
    # mlora sweep show: the table, best first, and the file as JSON.
    from typer.testing import CliRunner

    from mlora_tui.cli import app
    result = CliRunner().invoke(app, ["sweep", "show", "--dir", str(out)])
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if line.startswith("│ lr-")]
    assert rows[0].startswith(f"│ {summary['best']} *")
    assert "pruned by asha" in result.output
    result = CliRunner().invoke(app, ["sweep", "show", "lr", "--dir", str(out), "--json"])
    assert json.loads(result.stdout) == summary
    result = CliRunner().invoke(app, ["sweep", "show", "zz", "--dir", str(out)])
    assert result.exit_code == 2 and "no such sweep" in result.output


_KILLER = textwrap.dedent("""
    import os, signal, sys
    from engine.core.config import load_config
    from engine.train.engine import Engine
    engine = Engine(load_config(sys.argv[1]))
    def poll(wait):
        if engine.engine_step >= int(sys.argv[2]):
            os.kill(os.getpid(), signal.SIGKILL)
    engine.run(poll=poll)
""")


def _adapters(out: Path) -> dict[str, bytes]:
    return {p.parent.name: p.read_bytes() for p in out.glob("lr-*/adapter_model.safetensors")}


@pytest.mark.parametrize("search", [GRID, SAMPLE], ids=["grid", "tpe"])
def test_a_sweep_killed_with_sigkill_and_resumed_ends_as_one_never_killed(model_dir, tmp_path,
                                                                           search):
    whole = write_sweep(tmp_path / "whole", model_dir, search)
    Engine(load_config(whole)).run()
    cut = write_sweep(tmp_path / "cut", model_dir, search)
    proc = subprocess.run([sys.executable, "-c", _KILLER, str(cut), "7"],
                          cwd=Path(__file__).parent.parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    assert proc.returncode == -9, proc.stderr[-2000:]
    killed = _trials(tmp_path / "cut" / "out")
    assert any(t["state"] == "running" for t in killed)     # it was killed mid-way
    Engine(load_config(cut), resume=True).run()
    expected, got = _trials(tmp_path / "whole" / "out"), _trials(tmp_path / "cut" / "out")
    strip = ("reason",)
    assert [{k: v for k, v in t.items() if k not in strip} for t in got] == \
        [{k: v for k, v in t.items() if k not in strip} for t in expected]
    assert [t["reason"] for t in got] == [t["reason"] for t in expected]
    assert _adapters(tmp_path / "cut" / "out") == _adapters(tmp_path / "whole" / "out")
    assert any(t["state"] == "pruned" for t in expected)


def test_a_sampled_sweep_is_reproducible_from_its_seed(model_dir, tmp_path):
    params = []
    for run in ("one", "two"):
        config = write_sweep(tmp_path / run, model_dir, SAMPLE)
        Engine(load_config(config)).run()
        params.append([t["params"] for t in _trials(tmp_path / run / "out")])
    assert params[0] == params[1] and len(params[0]) == 5
    assert len({t["lr"] for t in params[0]}) == 5           # sampled, not repeated
    other = write_sweep(tmp_path / "three", model_dir, SAMPLE.replace("trials = 5", "trials = 2"),
                        extra="")
    text = other.read_text().replace("seed = 3", "seed = 4")
    other.write_text(text)
    Engine(load_config(other)).run()
    assert [t["params"] for t in _trials(tmp_path / "three" / "out")] != params[0][:2]


@pytest.mark.parametrize("change, fragment", [
    (("grid = { lr", "grid = { lrr"), "grid.lrr: not an [[adapter]] field"),
    (("grid = { lr = [", 'grid = { name = ["a"], lr = ['), "grid.name: name is set by the sweep"),
    ((GRID, "grid = {}"), "grid: expected a table"),
    ((GRID, 'sample = { lr = { log_uniform = [1e-4, 1e-1] } }'), "trials: missing"),
    ((GRID, 'sample = { lr = { log_uniform = [0, 1e-1] } }\ntrials = 2'), "low must be > 0"),
    (("parallel = 2", "parallel = 0"), "parallel: expected an integer >= 1"),
    (("prune = \"asha\"", "prune = \"sha\""), "prune: expected one of"),
    (("val_set_size = 4, ", ""), "eval_loss needs a validation set"),
    (("eval_steps = 1", 'eval_steps = 1\nmetric = "arc.acc"'), "[[eval]] name"),
    (("base = {", "base = { seed = 1,"), "base.seed: seed is set by the sweep"),
    (("base = {", "base = { rr = 1,"), "base.rr: not an [[adapter]] field"),
    (("r = 4", "r = 0"), "trial lr-0"),
])
def test_bad_sweeps_name_the_sweep_and_the_field(model_dir, tmp_path, change, fragment):
    config = write_sweep(tmp_path, model_dir)
    text = config.read_text()
    assert change[0] in text
    config.write_text(text.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert '[sweep "lr"]' in str(info.value) or "[sweep[1]]" in str(info.value)
    assert fragment in str(info.value)


def test_resuming_with_a_changed_sweep_is_refused(model_dir, tmp_path):
    config = write_sweep(tmp_path, model_dir)
    Engine(load_config(config)).run(max_steps=3)
    config.write_text(config.read_text().replace("parallel = 2", "parallel = 3"))
    with pytest.raises(UserError, match='sweep\\]\\] "lr" is not the one'):
        Engine(load_config(config), resume=True)


def test_the_example_sweep_config_is_valid():
    config = load_config(Path(__file__).parent.parent / "configs" / "sweep.toml")
    (sweep,) = config.sweeps
    assert sweep.n_trials == 6 and sweep.task == "sentiment" and not config.adapters
    assert Path(sweep.base["data"]).is_file()


def test_mlora_run_of_a_sweep_with_pruned_trials_exits_0(model_dir, tmp_path):
    import tempfile

    config = write_sweep(tmp_path, model_dir)
    with tempfile.TemporaryDirectory(prefix="mls-", dir="/tmp") as runtime:
        env = {**os.environ, "MLORA_RUNTIME_DIR": runtime, "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "mlora_tui.cli", "run", "--json",
                               str(config)], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    states = {e["job"]: e["state"] for e in map(json.loads, proc.stdout.splitlines())
              if e["type"] == "job_state"}
    assert "pruned" in states.values() and set(states.values()) <= {"done", "pruned"}
    exit_event = [json.loads(line) for line in proc.stdout.splitlines()][-1]
    assert exit_event["type"] == "engine_exit" and exit_event["code"] == 0
