"""Nothing lost: exact resume, one job's fault stays in that job, checkpoints survive faults.

The references are runs that were not interrupted and runs without the faulty job. Faults
that cannot happen on demand on this machine (a full disk, a device out of memory, a
lazily read data set) are injected at the boundary where the real ones surface: an
``OSError`` from the file writer, ``torch.OutOfMemoryError`` from the model's first layer,
a ``DataError`` from a job's examples.
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.train import adapters as adapters_module
from engine.core import checkpoints as ckpt
from engine.core.errors import DataError, UserError
from engine.train.engine import Engine
# The same tiny model and data files as the exactness tests (module-scoped fixtures).
from test_engine_exactness import (_run_config, _three_adapters, data_files,  # noqa: F401
                                   equal_rank_twin, tiny_llama)

REPO = Path(__file__).resolve().parent.parent


def _weights(engine: Engine, name: str) -> dict[str, torch.Tensor]:
    return adapters_module.adapter_state_dict(engine.model, name)


def _assert_identical(a: dict, b: dict, context: str = "") -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs {context}"


def _assert_close(a: dict, b: dict, rtol: float = 1e-5) -> None:
    """Each tensor within ``rtol`` of the reference, relative to the reference's norm."""
    assert a.keys() == b.keys() and a
    for key in a:
        error = float((a[key] - b[key]).norm() / b[key].norm().clamp_min(1e-12))
        assert error <= rtol, f"{key}: relative difference {error:.2e}"


def _config(tiny_llama, out, files, **train):
    config = _run_config(tiny_llama, out, _three_adapters(files))
    config.train = replace(config.train, **train)
    return config


# -- resume ------------------------------------------------------------------------------------

def test_resume_from_any_step_is_bit_identical(tiny_llama, data_files, tmp_path):
    """Stop after k steps (mid gradient accumulation too), resume in a new engine: the
    adapters are bit for bit those of a run that never stopped."""
    whole = Engine(_config(tiny_llama, tmp_path / "whole", data_files))
    whole.run()
    for k in (3, 8):
        out = tmp_path / f"stopped-{k}"
        first = Engine(_config(tiny_llama, out, data_files))
        first.run(max_steps=k)
        # Some job is mid-accumulation at the checkpoint: its gradients were saved.
        path = ckpt.latest_checkpoint(out)
        assert path.name == f"step-{k}"
        assert any(load_file(str(path / j / "grads.safetensors")) for j in first.jobs)
        events = []
        second = Engine(_config(tiny_llama, out, data_files), on_event=events.append,
                        resume=True)
        (resumed,) = [e for e in events if e["type"] == "resumed"]
        assert resumed["engine_step"] == k
        second.run()
        for name in whole.jobs:
            assert second.jobs[name].state == "done"
            _assert_identical(_weights(second, name), _weights(whole, name))
            assert second.jobs[name].history == whole.jobs[name].history


def test_resume_keeps_paused_and_cancelled_jobs_and_jobs_added_later(tiny_llama, data_files,
                                                                     tmp_path):
    config = _config(tiny_llama, tmp_path / "run", data_files)
    first = Engine(config)
    first.run(max_steps=2)
    first.pause("plain", reason="looking at it")
    first.cancel("rs")
    extra = replace(_three_adapters(data_files)[0], name="later", seed=11)
    first.add_job(extra, from_config=False)
    first._stop_requested = False
    first.run(max_steps=2)
    second = Engine(_config(tiny_llama, tmp_path / "run", data_files), resume=True)
    states = {name: (job.state, job.reason, job.step) for name, job in second.jobs.items()}
    assert states == {name: (job.state, job.reason, job.step)
                      for name, job in first.jobs.items()}
    assert states["plain"][:2] == ("paused", "looking at it")
    assert states["rs"][0] == "cancelled"
    assert second.jobs["later"].step == first.jobs["later"].step > 0
    _assert_identical(_weights(second, "later"), _weights(first, "later"))


def test_resume_refuses_a_config_that_changed_and_says_what(tiny_llama, data_files, tmp_path):
    out = tmp_path / "run"
    Engine(_config(tiny_llama, out, data_files)).run(max_steps=2)
    changed = _config(tiny_llama, out, data_files)
    changed.adapters[1] = replace(changed.adapters[1], lr=1e-3)
    changed.adapters.pop(2)
    with pytest.raises(UserError) as caught:
        Engine(changed, resume=True)
    message = str(caught.value)
    assert "step-2" in message
    assert '"rs": lr: 0.005 -> 0.001' in message
    assert '"dora" is in the checkpoint but no longer in the config' in message
    # Changed data is caught too (its content, not its path).
    rows = Path(data_files["a"]).read_text().splitlines()
    edited = tmp_path / "a-edited.jsonl"
    edited.write_text("\n".join(rows[:-1]) + "\n")
    config = _config(tiny_llama, out, data_files)
    config.adapters[0] = replace(config.adapters[0], data=str(edited))
    with pytest.raises(UserError, match="training data of adapter 'plain'.*changed"):
        Engine(config, resume=True)


def test_resume_refuses_another_packing_layout(tiny_llama, data_files, tmp_path):
    """Packed and padded passes draw different dropout masks: a run resumes in the layout
    it trained in ("auto" packs on a CPU; "on" is the same layout and resumes)."""
    out = tmp_path / "run"
    Engine(_config(tiny_llama, out, data_files, packing="auto")).run(max_steps=2)
    with pytest.raises(UserError) as caught:
        Engine(_config(tiny_llama, out, data_files, packing="off"), resume=True)
    message = str(caught.value)
    assert "[train] packing" in message and "step-2" in message
    assert 'set packing = "on" to resume' in message
    resumed = Engine(_config(tiny_llama, out, data_files, packing="on"), resume=True)
    assert resumed.engine_step == 2


def test_resume_without_a_checkpoint_starts_over_and_says_so(tiny_llama, data_files, tmp_path):
    events = []
    engine = Engine(_config(tiny_llama, tmp_path / "fresh", data_files), on_event=events.append,
                    resume=True)
    assert any(e["type"] == "log" and "nothing to resume" in e["message"] for e in events)
    assert all(job.step == 0 for job in engine.jobs.values())


def test_only_the_newest_checkpoints_are_kept(tiny_llama, data_files, tmp_path):
    out = tmp_path / "run"
    Engine(_config(tiny_llama, out, data_files, save_step=1, save_total_limit=2)).run(
        max_steps=5)
    kept = [path.name for _step, path in ckpt.complete_checkpoints(out)]
    assert kept == ["step-4", "step-5"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == kept


def _engine_process(config_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLORA_BACKEND_TYPE": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "mlora_tui.cli", "serve", str(config_path),
                             *extra], cwd=config_path.parent, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _write_config(folder: Path, tiny_llama: Path, files: dict, output: str) -> Path:
    adapters = _three_adapters(files)
    lines = ["[model]", f'base_model = "{tiny_llama}"', 'attn_impl = "sdpa"', "",
             "[train]", f'output_dir = "{output}"', "seed = 7", "cutoff_len = 128",
             "save_step = 1", "save_total_limit = 2", ""]
    for cfg in adapters:
        lines.append("[[adapter]]")
        for key, value in vars(cfg).items():
            if value is None:
                continue
            lines.append(f"{key} = {json.dumps(value)}")
        lines.append("")
    path = folder / f"{output}.toml"
    path.write_text("\n".join(lines))
    return path


def _steps_logged(metrics: Path) -> int:
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines()
               if line.endswith("}") and json.loads(line)["type"] == "batch")


def test_sigkill_at_a_random_step_then_resume_is_bit_identical(tiny_llama, data_files,
                                                               tmp_path):
    """A real engine process killed with SIGKILL mid-training, resumed with --resume."""
    whole_cfg = _write_config(tmp_path, tiny_llama, data_files, "whole")
    killed_cfg = _write_config(tmp_path, tiny_llama, data_files, "killed")
    # Replay a failure with MLORA_TEST_SEED=<the seed printed>.
    seed = int(os.environ.get("MLORA_TEST_SEED") or random.randrange(2**32))
    print(f"MLORA_TEST_SEED={seed}")
    kill_at = random.Random(seed).randint(2, 9)
    whole = _engine_process(whole_cfg)
    killed = _engine_process(killed_cfg)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 200
    while _steps_logged(metrics) < kill_at:
        assert killed.poll() is None, killed.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert whole.wait(timeout=200) == 0, whole.stderr.read()
    assert not (tmp_path / "killed" / "dora" / "adapter_model.safetensors").exists(), \
        f"killed at step {kill_at} (MLORA_TEST_SEED={seed}), after the run had ended"
    resumed = _engine_process(killed_cfg, "--resume")
    assert resumed.wait(timeout=200) == 0, resumed.stderr.read()
    lines = metrics.read_text().splitlines()
    # The kill may cut the last line short; the resumed engine starts on a new line.
    events = [json.loads(line) for line in lines if line.endswith("}")]
    assert sum(1 for line in lines if not line.endswith("}")) <= 1
    (event,) = [e for e in events if e["type"] == "resumed"]
    assert 0 < event["engine_step"] <= kill_at
    for name in ("plain", "rs", "dora"):
        a = load_file(str(tmp_path / "whole" / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / "killed" / name / "adapter_model.safetensors"))
        _assert_identical(a, b, f"killed at step {kill_at} (MLORA_TEST_SEED={seed})")


# -- one job's fault stays in that job -------------------------------------------------------

def _nan_adapter(engine_dir: Path, tiny_llama, data_files, tmp_path) -> Path:
    """An adapter folder for "rs" whose weights are NaN."""
    out = tmp_path / "nan-source"
    engine = Engine(_config(tiny_llama, out, data_files))
    folder = out / "rs-nan"
    state = {k: torch.full_like(v, float("nan"))
             for k, v in _weights(engine, "rs").items()}
    folder.mkdir(parents=True)
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    return folder


@pytest.mark.parametrize("packing", ["on", "off"])
def test_a_nan_job_pauses_and_the_others_are_unchanged(packing, tiny_llama, data_files,
                                                       tmp_path):
    adapters = _three_adapters(data_files)
    # "twin" has the NaN job's rank and micro-batch size: in a padded pass the two are one
    # batched matmul pair, where the NaN must stay in its own job's rows.
    twin = equal_rank_twin(adapters[1], "twin", data_files["b"], seed=9)
    clean = Engine(_run_config(tiny_llama, tmp_path / "clean", [adapters[0], twin, adapters[2]],
                               packing))
    clean.run()
    nan_folder = _nan_adapter(tmp_path, tiny_llama, data_files, tmp_path)
    adapters[1] = replace(adapters[1], init_from=str(nan_folder))
    adapters.insert(2, twin)
    events = []
    faulty = Engine(_run_config(tiny_llama, tmp_path / "faulty", adapters, packing),
                    on_event=events.append)
    faulty.pass_overhead = 10**9          # padded: every job in one pass, "twin" beside "rs"
    faulty.run()
    job = faulty.jobs["rs"]
    assert job.state == "paused" and job.step == 1
    assert job.reason.startswith("non-finite loss (nan) at step 1: the step was not applied")
    # The bad step was not applied: the weights are still those it was given.
    assert all(torch.isnan(t).all() for t in _weights(faulty, "rs").values())
    assert not [e for e in events if e["type"] == "step" and e["job"] == "rs"]
    paused = [e for e in events if e["type"] == "job_state" and e["job"] == "rs"]
    assert paused[-1]["state"] == "paused" and "non-finite" in paused[-1]["reason"]
    for name in ("plain", "twin", "dora"):
        assert faulty.jobs[name].state == "done", faulty.jobs[name].reason
        _assert_close(_weights(faulty, name), _weights(clean, name))


def test_a_non_finite_gradient_pauses_only_its_job(tiny_llama, data_files, tmp_path):
    adapters = _three_adapters(data_files)
    engine = Engine(_run_config(tiny_llama, tmp_path / "run", adapters))
    before = _weights(engine, "dora")
    # An overflow in one of dora's gradients (as a too-large learning rate would cause).
    engine.jobs["dora"].parameters[0].register_hook(lambda g: g * float("inf"))
    engine.run()
    job = engine.jobs["dora"]
    assert job.state == "paused" and "non-finite gradient" in job.reason
    _assert_identical(_weights(engine, "dora"), before)
    assert all(torch.isfinite(p.grad).all() for p in job.parameters if p.grad is not None)
    assert engine.jobs["plain"].state == engine.jobs["rs"].state == "done"


class _BrokenRows(list):
    """A job's examples where one row cannot be read (as a lazily read file would fail)."""

    def __init__(self, rows, bad_index, path):
        super().__init__(rows)
        self.bad_index, self.path = bad_index, path

    def __getitem__(self, index):
        if index == self.bad_index:
            raise DataError("expected a JSON object", file=self.path, line=index + 1)
        return super().__getitem__(index)


def test_a_data_error_mid_run_fails_only_that_job(tiny_llama, data_files, tmp_path):
    adapters = _three_adapters(data_files)
    engine = Engine(_run_config(tiny_llama, tmp_path / "run", adapters))
    job = engine.jobs["plain"]
    bad = job.data.epoch_batches(0)[2][0]       # read in the job's third optimizer step
    job.data.train = _BrokenRows(job.data.train, bad, data_files["a"])
    engine.run()
    assert job.state == "failed"
    assert f"{data_files['a']}:{bad + 1}: expected a JSON object" in job.reason
    assert job.step == 2
    assert engine.jobs["rs"].state == engine.jobs["dora"].state == "done"
    assert (tmp_path / "run" / "rs" / "adapter_model.safetensors").is_file()


def _fail_when(engine: Engine, too_big) -> None:
    """Make the model's first layer raise out-of-memory in every pass for which
    ``too_big(names of the pass's jobs)`` is true (the engine's layout says who is in it)."""
    layer = engine.decoder.layers[0]

    def hook(_module, _args, _kwargs):
        if too_big([seg.adapter for seg in engine.layout.segments]):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
    layer.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("packing", ["on", "off"])
def test_out_of_memory_retries_one_job_at_a_time(packing, tiny_llama, data_files, tmp_path):
    adapters = _three_adapters(data_files)
    reference = Engine(_run_config(tiny_llama, tmp_path / "ref", adapters, packing))
    reference.run()
    events = []
    engine = Engine(_run_config(tiny_llama, tmp_path / "oom", adapters, packing),
                    on_event=events.append)
    engine.pass_overhead = 10**9          # all jobs in one pass, until memory runs out
    _fail_when(engine, lambda jobs: len(jobs) > 1)
    engine.run()
    warnings = [e["message"] for e in events if e["type"] == "log" and e["level"] == "warning"]
    assert any("out of memory with 3 jobs in one pass; running one pass per job" in w
               for w in warnings)
    assert all(e["passes"] == 3 for e in events if e["type"] == "batch" and len(e["jobs"]) == 3)
    for name in reference.jobs:
        assert engine.jobs[name].state == "done"
        _assert_close(_weights(engine, name), _weights(reference, name))


@pytest.mark.parametrize("packing", ["on", "off"])
def test_a_job_too_big_for_memory_alone_pauses_and_others_go_on(packing, tiny_llama,
                                                                data_files, tmp_path):
    adapters = _three_adapters(data_files)
    long_rows = tmp_path / "long.jsonl"
    long_rows.write_text(json.dumps({"text": " ".join(["word"] * 100)}) + "\n")
    adapters.append(replace(adapters[0], name="huge", data=str(long_rows), batch_size=1,
                            micro_batch_size=1))
    engine = Engine(_run_config(tiny_llama, tmp_path / "oom", adapters, packing))
    _fail_when(engine, lambda jobs: "huge" in jobs)   # it does not fit, even alone
    engine.run()
    huge = engine.jobs["huge"]
    assert huge.state == "paused" and huge.reason.startswith("out of memory")
    assert huge.step == 0 and huge.micro_batches_drawn == 0
    assert {n: engine.jobs[n].state for n in ("plain", "rs", "dora")} == dict.fromkeys(
        ("plain", "rs", "dora"), "done"), {n: j.reason for n, j in engine.jobs.items()}


# -- the file system ---------------------------------------------------------------------------

def test_a_full_disk_during_a_checkpoint_loses_nothing(tiny_llama, data_files, tmp_path,
                                                       monkeypatch):
    out = tmp_path / "run"
    events = []
    engine = Engine(_config(tiny_llama, out, data_files, save_step=1), on_event=events.append)
    engine.run(max_steps=2)
    before = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*")
              if p.is_file()}
    real_write = adapters_module._write_file
    written = []

    def write_until_full(path, content):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(path)
        real_write(path, content)
    monkeypatch.setattr(adapters_module, "_write_file", write_until_full)
    engine._stop_requested = False
    engine.run(max_steps=1)
    errors = [e["message"] for e in events if e["type"] == "log" and e["level"] == "error"]
    assert any("checkpoint of step 3 failed" in m and "No space left on device" in m
               and "previous checkpoint is whole" in m for m in errors)
    # The previous checkpoints are as they were, and no half-written folder is left.
    after = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*")
             if p.is_file()}
    assert after == before
    assert ckpt.latest_checkpoint(out).name == "step-2"
    # Once there is room again, training and checkpoints go on.
    monkeypatch.setattr(adapters_module, "_write_file", real_write)
    engine._stop_requested = False
    engine.run(max_steps=1)
    assert ckpt.latest_checkpoint(out).name == "step-4"


def test_a_read_only_folder_for_the_final_adapter_pauses_the_job_until_fixed(
        tiny_llama, data_files, tmp_path, monkeypatch):
    adapters = _three_adapters(data_files)
    engine = Engine(_run_config(tiny_llama, tmp_path / "run", adapters[1:2]))
    real_write = adapters_module._write_file

    def read_only(path, content):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(adapters_module, "_write_file", read_only)
    engine.run()
    job = engine.jobs["rs"]
    assert job.state == "paused" and "could not be saved" in job.reason
    assert "Read-only file system" in job.reason
    weights = _weights(engine, "rs")
    monkeypatch.setattr(adapters_module, "_write_file", real_write)
    engine.resume("rs")
    engine._stop_requested = False
    engine.run()
    assert job.state == "done"
    saved = load_file(str(tmp_path / "run" / "rs" / "adapter_model.safetensors"))
    _assert_identical({k: v for k, v in saved.items()}, weights)


def test_a_deleted_output_folder_mid_run_is_recreated(tiny_llama, data_files, tmp_path):
    import shutil

    out = tmp_path / "run"
    engine = Engine(_config(tiny_llama, out, data_files, save_step=2))
    steps = []

    def poll(_wait):
        steps.append(1)
        if len(steps) == 3:
            shutil.rmtree(out)
    engine.run(poll=poll)
    assert all(job.state == "done" for job in engine.jobs.values())
    for name in engine.jobs:
        assert (out / name / "adapter_model.safetensors").is_file()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert "disappeared" in json.loads(lines[0])["message"]
    assert json.loads(lines[-1])["type"] == "run_end"


# -- admission control -----------------------------------------------------------------------

def test_a_job_that_would_not_fit_waits_in_the_queue(tiny_llama, data_files, tmp_path):
    """With a memory limit that holds two of the jobs but not three, the third waits (and
    says why) until one ends; every job still ends as it would have alone."""
    adapters = _three_adapters(data_files)
    probe = Engine(_run_config(tiny_llama, tmp_path / "probe", adapters))
    jobs = list(probe.jobs.values())
    two, three = probe.estimate_peak_bytes(jobs[:2]), probe.estimate_peak_bytes(jobs)
    assert two < three
    config = _run_config(tiny_llama, tmp_path / "limited", adapters)
    config.train = replace(config.train, memory_limit_gb=(two + three) / 2 / 2**30)
    events = []
    limited = Engine(config, on_event=events.append)
    limited.run()
    (waiting,) = {e["reason"] for e in events if e["type"] == "job_state" and e["job"] == "dora"
                  and e["state"] == "queued" and e["reason"]}
    assert waiting.startswith("waiting for memory: a step with it and the 2 running job(s)")
    batches = [set(e["jobs"]) for e in events if e["type"] == "batch"]
    assert all(len(jobs) <= 2 for jobs in batches) and {"dora"} <= batches[-1]
    probe.run()
    for name in probe.jobs:
        assert limited.jobs[name].state == "done"
        _assert_close(_weights(limited, name), _weights(probe, name))


def test_a_job_that_cannot_be_added_leaves_nothing_behind(tiny_llama, data_files, tmp_path):
    adapters = _three_adapters(data_files)
    engine = Engine(_run_config(tiny_llama, tmp_path / "run", adapters[:1]))
    engine.run(max_steps=1)
    first = _weights(engine, "plain")
    folder = tmp_path / "plain-r4"
    folder.mkdir()
    save_file(first, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    wrong = replace(adapters[0], name="other", r=2, init_from=str(folder))
    with pytest.raises(UserError, match="shape"):
        engine.add_job(wrong)
    assert "other" not in engine.jobs and not adapters_module.adapter_modules(engine.model,
                                                                               "other")
    engine.add_job(replace(wrong, r=4))
    _assert_identical(_weights(engine, "other"), {k: v for k, v in first.items()})
    missing = replace(adapters[0], name="third", target_modules=["nope_proj"])
    with pytest.raises(UserError, match=r'\[adapter "third"\] target_modules: target .*'
                                        r"nope_proj.* not found"):
        engine.add_job(missing)
