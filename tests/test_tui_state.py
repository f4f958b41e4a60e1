"""The TUI's torch-free, Textual-free parts: the buffered engine state, NVML sampling and
the braille loss plot. Expected values are written out by hand from the events fed in."""

from __future__ import annotations

import math
import sys
from array import array

import pytest

from mlora_tui.gpu import GpuSampler
from mlora_tui.state import (CONNECTED, CONNECTING, DISCONNECTED, EngineState, JobView,
                             best_jobs)
from mlora_tui.widgets.loss_chart import (EVAL_MARK, LossChart, Series, chosen_jobs, ema, legend,
                                         plot, shorten)

ENGINE = {"name": "demo", "pid": 100}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_events(n_steps: int = 3) -> list[dict]:
    """What an engine with one job sends: start, job added, running, steps, eval."""
    adapter = {"name": "a", "data": "d.jsonl", "r": 4, "lora_alpha": 8, "use_dora": True,
               "use_rslora": False, "loraplus_lr_ratio": 4.0, "target_modules": None}
    events = [
        {"type": "run_start", "time": 1.0, "device": "cpu", "dtype": "fp32", "attn_impl": "sdpa",
         "model_type": "llama", "num_params": 1000, "base_model": "/m", "quantize": None,
         "config": "c.toml", "output_dir": "/out"},
        {"type": "job_added", "time": 2.0, "job": "a", "adapter": adapter, "total_steps": 10,
         "train_examples": 40, "val_examples": 4, "targets": ["q_proj", "v_proj"]},
        {"type": "job_state", "time": 2.0, "job": "a", "state": "queued", "reason": None,
         "step": 0, "total_steps": 10},
        {"type": "job_state", "time": 3.0, "job": "a", "state": "running", "reason": None,
         "step": 0, "total_steps": 10},
    ]
    for step in range(1, n_steps + 1):
        events.append({"type": "step", "time": 3.0 + step, "job": "a", "step": step,
                       "total_steps": 10, "epoch": step / 5, "loss": 3.0 - 0.5 * step,
                       "lr": 1e-3, "grad_norm": 0.5, "tokens": 64, "tokens_per_s": 640.0,
                       "eta_s": 10.0 - step})
    return events


def feed(state: EngineState, events: list[dict], first_seq: int = 1) -> int:
    """Apply events with seq numbers as the client gives them (in the event dict)."""
    applied = 0
    for seq, event in enumerate(events, first_seq):
        applied += state.apply_event({**event, "seq": seq})
    return applied


def test_events_build_jobs_with_their_history_and_settings():
    state = EngineState(clock=Clock())
    state.connected(ENGINE)
    feed(state, run_events(3) + [{"type": "eval", "time": 9.0, "job": "a", "step": 3,
                                  "eval_loss": 1.25}])
    assert state.model == {"device": "cpu", "dtype": "fp32", "quantize": None,
                           "attn_impl": "sdpa", "model_type": "llama", "num_params": 1000,
                           "base_model": "/m"}
    job = state.jobs["a"]
    assert (job.state, job.step, job.total_steps, job.r) == ("running", 3, 10, 4)
    assert job.variant == "dora+loraplus"
    assert job.loss == 1.5 and job.eta_s == 7.0 and job.epoch == 0.6
    assert job.history == [(1, 2.5), (2, 2.0), (3, 1.5)]
    assert job.eval_loss == 1.25 and job.eval_points == [(3, 1.25)]
    assert job.targets == ["q_proj", "v_proj"] and job.train_examples == 40
    messages = [line.message for line in state.logs]
    assert "a: running" in messages
    assert "a: eval loss 1.25 at step 3" in messages


def test_job_state_changes_are_logged_with_reason_and_failures_as_errors():
    state = EngineState(clock=Clock())
    feed(state, run_events(1) + [
        {"type": "job_state", "time": 9, "job": "a", "state": "paused", "reason": "paused by user",
         "step": 1, "total_steps": 10},
        {"type": "job_state", "time": 10, "job": "a", "state": "failed", "reason": "NaN loss",
         "step": 1, "total_steps": 10},
    ])
    lines = [(line.level, line.message) for line in state.logs][-2:]
    assert lines == [("info", "a: paused (paused by user)"), ("error", "a: failed (NaN loss)")]
    assert state.jobs["a"].finished and state.jobs["a"].eta_s is None


def test_replay_after_a_reconnect_applies_nothing_twice():
    clock = Clock()
    state = EngineState(clock=clock)
    state.connected(ENGINE)
    events = run_events(5)
    assert feed(state, events[:7]) == 7              # up to step 3
    logs_before = state.log_count
    state.disconnected("connection closed")
    state.connected(ENGINE)                          # same engine: seq numbers carry on
    # subscribe(replay=True) sends everything again from seq 1, then the new events.
    assert feed(state, events) == 2                  # only steps 4 and 5 are new
    job = state.jobs["a"]
    assert [step for step, _ in job.history] == [1, 2, 3, 4, 5]
    assert job.step == 5
    # No log line of the replayed part came twice ("a: running" once).
    assert sum(line.message == "a: running" for line in state.logs) == 1
    assert state.log_count == logs_before + 2        # "disconnected" and "reconnected" notes


def test_another_engine_behind_the_socket_starts_afresh():
    state = EngineState(clock=Clock())
    state.connected(ENGINE)
    feed(state, run_events(3))
    generation = state.generation
    assert state.connected({"name": "demo", "pid": 200}) is True
    assert state.jobs == {} and state.last_seq == 0 and state.generation == generation + 1
    feed(state, run_events(1))                       # its seq numbers start again at 1
    assert state.jobs["a"].history == [(1, 2.5)]


def test_disconnect_keeps_the_time_of_the_last_update_and_logs_once():
    clock = Clock(1000.0)
    state = EngineState(clock=clock)
    assert state.connection == CONNECTING and state.last_update is None
    state.connected(ENGINE)
    clock.now = 1005.0
    feed(state, run_events(2))
    assert state.connection == CONNECTED and state.last_update == 1005.0
    clock.now = 1010.0
    state.disconnected("connection closed")
    version = state.version
    for _ in range(3):                               # failed reconnect attempts
        state.disconnected("connection closed")
    assert state.connection == DISCONNECTED
    assert state.last_update == 1005.0               # staleness shows the last real update
    assert state.version == version                  # nothing to redraw
    warnings = [line.message for line in state.logs if line.level == "warning"]
    assert warnings == ["engine disconnected: connection closed"]


def test_engine_exit_is_remembered_until_the_next_connection():
    state = EngineState(clock=Clock())
    state.connected(ENGINE)
    feed(state, [{"type": "engine_exit", "time": 5, "code": 0, "reason": "every job finished"}])
    state.disconnected()
    assert state.exit_reason == "every job finished"
    state.connected({"name": "demo", "pid": 300})
    assert state.exit_reason is None


def test_status_reply_fills_jobs_even_while_the_model_loads():
    state = EngineState(clock=Clock())
    state.connected(ENGINE)
    state.apply_status({"engine": {**ENGINE, "state": "loading"}, "model": None,
                        "output_dir": "/out", "jobs": []})
    assert state.model == {} and state.engine["state"] == "loading"
    state.apply_status({"model": {"device": "cuda:0", "dtype": "bf16"}, "jobs": [
        {"name": "b", "state": "paused", "reason": "paused by user", "step": 4,
         "total_steps": 8, "epoch": 1.0, "variant": "lora+rslora", "r": 16, "loss": 0.7,
         "eval_loss": None, "lr": 2e-4, "grad_norm": 1.0, "tokens_per_s": 100.0,
         "eta_s": 12.0, "adapter": {"name": "b", "r": 16, "use_rslora": True}}]})
    job = state.jobs["b"]
    assert (job.state, job.step, job.r, job.loss) == ("paused", 4, 16, 0.7)
    assert job.variant == "lora+rslora"
    assert job.adapter["use_rslora"] is True
    assert job.history == []          # history comes from step events only
    assert state.model["device"] == "cuda:0"


def test_logs_are_bounded_and_new_lines_are_found_by_count():
    state = EngineState(max_logs=5, clock=Clock())
    for i in range(12):
        state.apply_event({"type": "log", "time": i, "level": "info", "message": f"m{i}"},
                          seq=i + 1)
    assert [line.message for line in state.logs] == ["m7", "m8", "m9", "m10", "m11"]
    assert [line.message for line in state.new_logs(10)] == ["m10", "m11"]
    assert len(state.new_logs(0)) == 5               # older ones fell off the bounded log
    assert state.new_logs(12) == []


def test_unknown_events_are_skipped_but_counted_and_resources_kept():
    state = EngineState(clock=Clock())
    assert state.apply_event({"type": "from_the_future", "x": 1}, seq=1)
    state.apply_event({"type": "resource", "time": 3, "rss_bytes": 5 << 20, "cpu_percent": 50.0,
                       "device": "cpu", "device_memory_bytes": None}, seq=2)
    assert state.last_seq == 2
    assert state.resource["rss_bytes"] == 5 << 20 and state.resource["cpu_percent"] == 50.0


def test_run_end_summarises_where_the_jobs_ended():
    state = EngineState(clock=Clock())
    state.apply_event({"type": "run_end", "time": 1, "jobs": {
        "a": {"state": "done"}, "b": {"state": "paused"}, "c": {"state": "done"}}}, seq=1)
    assert state.logs[-1].message == "run ended (2 done, 1 paused)"


# -- NVML ----------------------------------------------------------------------------------

class FakeNVMLError(Exception):
    pass


class FakeNvml:
    """pynvml's surface, with one GPU that supports everything and one that supports
    almost nothing (as on many datacenter or virtual GPUs)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.shutdown = False

    def nvmlInit(self):
        if self.fail_init:
            raise FakeNVMLError("Driver Not Loaded")

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlDeviceGetCount(self):
        return 2

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def _only_first(self, handle, value):
        if handle != 0:
            raise FakeNVMLError("Not Supported")
        return value

    def nvmlDeviceGetName(self, h):
        return b"Fake GPU" if h == 0 else "Other GPU"

    def nvmlDeviceGetUtilizationRates(self, h):
        return self._only_first(h, type("U", (), {"gpu": 42})())

    def nvmlDeviceGetMemoryInfo(self, h):
        return type("M", (), {"used": 1 << 30, "total": 8 << 30})()

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._only_first(h, 61)

    def nvmlDeviceGetPowerUsage(self, h):
        return self._only_first(h, 123_000)

    def nvmlDeviceGetEnforcedPowerLimit(self, h):
        raise FakeNVMLError("Not Supported")


def test_gpu_fields_are_read_one_by_one_and_missing_ones_are_none():
    nvml = FakeNvml()
    sampler = GpuSampler(nvml)
    report = sampler.sample()
    first, second = report.gpus
    assert (first.name, first.utilization, first.temperature, first.power) == (
        "Fake GPU", 42, 61, 123.0)
    assert first.memory_used == 1 << 30 and first.memory_total == 8 << 30
    assert first.power_limit is None
    assert (second.name, second.utilization, second.temperature, second.power) == (
        "Other GPU", None, None, None)
    assert second.memory_used == 1 << 30
    sampler.close()
    assert nvml.shutdown


def test_no_nvml_or_no_driver_reads_as_no_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)     # import pynvml fails
    report = GpuSampler().sample()
    assert not report.available and report.note == "no GPU"
    report = GpuSampler(FakeNvml(fail_init=True)).sample()
    assert not report.available and report.note == "no GPU (NVML: Driver Not Loaded)"


# -- the loss plot ------------------------------------------------------------------------

def _cells(lines, margin):
    return [line.plain[margin:] for line in lines[:-1]]


def test_plot_draws_a_falling_line_from_top_left_to_bottom_right():
    steps = list(range(0, 101))
    losses = [2.0 - 0.01 * s for s in steps]         # 2.0 at step 0 down to 1.0 at 100
    lines = plot([Series("a", steps, losses, "red")], width=25, height=6, x_max=100)
    assert len(lines) == 6
    margin = len("1.5") + 1                          # the widest label, then the axis
    assert lines[0].plain[:margin] == "  2┤" and lines[4].plain[:margin] == "  1┤"
    cells = _cells(lines, margin)
    assert cells[0][0] != " " and cells[-1][-1] != " "      # both ends are drawn
    assert cells[0][-1] == " " and cells[-1][0] == " "      # the other corners are empty
    for row in cells:                                # a line, so one short run per row
        drawn = [i for i, c in enumerate(row) if c != " "]
        assert drawn and drawn[-1] - drawn[0] < 8
    assert lines[-1].plain.rstrip().endswith("step 100")


def test_plot_x_axis_runs_to_total_steps_so_a_young_run_fills_the_left():
    lines = plot([Series("a", [1, 2, 3], [3.0, 2.0, 1.0], "red")], width=40, height=5, x_max=300)
    cells = _cells(lines, len(lines[0].plain) - 36)      # 36 columns of dots
    assert all(c == " " for row in cells for c in row[4:])   # steps 1-3 of 300: the first


def test_plot_overlay_gives_each_series_its_cells_and_style():
    a = Series("a", [0, 10], [1.0, 1.0], "red")
    b = Series("b", [0, 10], [3.0, 3.0], "blue")
    lines = plot([a, b], width=20, height=5, x_max=10)
    styles = {str(span.style) for line in lines for span in line.spans}
    assert {"red", "blue"} <= styles
    assert plot([], width=20, height=5, x_max=10)[0].plain.strip() == "no loss yet"


def test_a_long_noisy_curve_fills_each_column_from_its_lowest_to_its_highest_loss():
    # 1000 steps over 21 columns of dots: ~24 steps a pixel column, alternating 1 and 2,
    # so every column spans the whole height even though only its first, lowest, highest
    # and last points are looked at; a NaN (a diverged step) is left out, nothing else.
    losses = array("d", [1.0 + step % 2 for step in range(1000)])
    for curve in (losses, array("d", [*losses[:500], math.nan, *losses[501:]])):
        lines = plot([Series("a", array("q", range(1000)), curve, "red")], width=25,
                     height=6, x_max=999)
        cells = _cells(lines, len("1.5") + 1)
        assert all(c == "⣿" for row in cells for c in row), cells


def test_log_scale_spans_whole_decades_and_places_each_decade_on_its_row():
    steps = [0, 50, 100]
    lines = plot([Series("a", steps, [5.0, 0.5, 0.02], "red")], width=30, height=10,
                 x_max=100, log_scale=True)
    # 0.02 to 5 needs the decades 0.01 to 10: three decades over 9 rows (36 dots), so
    # 10 on row 0, 1 at dot 12 (row 3), 0.1 at dot 23 (row 5), 0.01 on the last row.
    labels = {i: line.plain.split("┤")[0].strip() for i, line in enumerate(lines[:-1])
              if "┤" in line.plain}
    assert labels == {0: "10", 3: "1", 5: "0.1", 8: "0.01"}
    margin = len("0.01") + 1
    cells = _cells(lines, margin)
    # 5.0 is log10 0.7: dot (1 - 0.7) / 3 * 35 = 3.5 -> row 0 or 1; 0.5 sits just under 1.
    assert cells[0][0] != " " or cells[1][0] != " "
    assert cells[3][12:14].strip() or cells[4][12:14].strip()
    # 0.02 is log10 -1.7: dot 2.7 / 3 * 35 = 31.5, row 7, at the end; nothing under it.
    assert cells[7][-1] != " " and not cells[8].strip()
    # Losses of 0 cannot be drawn on a log axis: left out, not a crash.
    lines = plot([Series("a", [1, 2], [0.0, 1.0], "red")], width=20, height=5, x_max=2,
                 log_scale=True)
    assert [line.plain.split("┤")[0].strip() for line in lines if "┤" in line.plain] == [
        "10", "1"]


def test_the_y_range_follows_what_is_drawn_eval_marks_included():
    flat = Series("a", [0, 10], [1.0, 2.0], "red")
    assert plot([flat], width=20, height=5, x_max=10)[0].plain.startswith("  2┤")
    marked = Series("a", [0, 10], [1.0, 2.0], "red", marks=[(5, 3.0)])
    lines = plot([marked], width=20, height=5, x_max=10)
    assert lines[0].plain.startswith("3┤") and lines[-2].plain.startswith("1┤")
    # The mark sits at step 5 of 10 on the top row (dot 17.5 of 36, cell 9), in the
    # series' style.
    assert lines[0].plain[2:].index(EVAL_MARK) == 9
    assert any(str(span.style) == "red" for span in lines[0].spans)
    # A smoothed curve draws less than the raw one spans: the axis shrinks with it.
    raw = [1.0, 4.0, 1.0, 4.0, 1.0, 4.0]
    smooth = ema(raw)
    lines = plot([Series("a", range(6), smooth, "red")], width=20, height=5, x_max=5)
    assert lines[0].plain.split("┤")[0].strip() == f"{max(smooth):.3g}" != "4"


def test_ema_is_debiased_and_skips_non_finite_losses():
    assert ema([2.0]) == [2.0]                        # not 0.1 x 2.0
    values = ema([2.0, 0.0], weight=0.5)
    assert values == [2.0, pytest.approx((0.5 * 1.0 + 0.0) / 0.75)]
    smoothed = ema([1.0, float("nan"), 1.0])
    assert smoothed[0] == smoothed[2] == pytest.approx(1.0) and smoothed[1] != smoothed[1]


def test_the_chart_smooths_a_growing_curve_as_a_whole_one_would_be():
    chart, job = LossChart(), JobView("a")
    for step in range(1, 31):
        job.record_loss(step, 2.0 / step + 0.1 * (step % 3))
        if step in (1, 2, 17, 30):
            assert chart._ema(job) == pytest.approx(ema(job.losses))
    again = JobView("a")                 # another engine's job of the same name
    for step in range(1, 40):
        again.record_loss(step, 1.0)
    assert chart._ema(again) == pytest.approx([1.0] * 39)


def _job(name, loss=None, eval_loss=None):
    job = JobView(name)
    job.loss, job.eval_loss = loss, eval_loss
    return job


def test_best_jobs_rank_by_eval_loss_then_training_loss_then_neither():
    jobs = [_job("none"), _job("train-low", loss=0.1), _job("eval-high", 2.0, eval_loss=0.9),
            _job("nan", loss=float("nan"), eval_loss=float("nan")),
            _job("eval-low", 3.0, eval_loss=0.5), _job("train-high", loss=0.8)]
    assert [job.name for job in best_jobs(jobs, 10)] == [
        "eval-low", "eval-high", "train-low", "train-high", "nan", "none"]
    assert [job.name for job in best_jobs(jobs, 2)] == ["eval-low", "eval-high"]


def test_the_overlay_draws_every_job_when_few_else_the_five_best_and_the_selected():
    few = [_job(f"j{i}", loss=1.0 + i) for i in range(6)]
    assert chosen_jobs(few, "j5") == few
    many = [_job(f"j{i:02d}", loss=1.0 + i, eval_loss=(10.0 - i) if i % 2 else None)
            for i in range(50)]
    # The odd jobs have eval losses, lowest for j49: the best five are j49 ... j41.
    assert [job.name for job in chosen_jobs(many, "j00")] == [
        "j49", "j47", "j45", "j43", "j41", "j00"]
    assert [job.name for job in chosen_jobs(many, "j45")] == [
        "j49", "j47", "j45", "j43", "j41"]


def test_the_legend_fits_any_width_cutting_names_then_values_then_entries():
    names = [f"sweep-lr{i}e-4-rank-{r}" for i, r in zip(range(1, 7), (4, 8, 16, 32, 64, 8))]
    entries = [(name, f"0.{i}123", f"color({i})") for i, name in enumerate(names)]

    def plain(width, lines=1):
        return [line.plain for line in legend(entries, width, lines)]

    assert plain(200)[0].startswith(
        "● sweep-lr1e-4-rank-4 0.0123  ● sweep-lr2e-4-rank-8 0.1123")
    for lines in (1, 2):
        for width in range(0, 200):
            assert len(legend(entries, width, lines)) <= lines, (width, lines)
            assert all(len(line) <= width for line in plain(width, lines)), (width, lines)
    # At 100 columns every entry stays, names cut where they do not differ: the start they
    # share, then the middle.
    middle = plain(100)[0]
    assert middle.startswith("● …1e…-4 0.0123  ● …2e…-8 0.1123  ● …3e…16 0.2123")
    assert middle.count("●") == 6 and "0.5123" in middle
    assert shorten("sweep-lr1e-4-rank-4", 9) == "swee…nk-4"
    # Narrower: the values go, then entries, counted at the end.
    narrow = plain(30)[0]
    assert "0.0123" not in narrow and narrow.endswith(f"+{6 - narrow.count('●')}")
    # Two lines hold what one cannot: at 90 columns, every whole name with its value.
    assert "…" in plain(90)[0]
    two = plain(90, 2)
    assert len(two) == 2 and "".join(two).count("●") == 6 and "0.5123" in two[1]
    assert all(name in "".join(two) for name in names)
    styles = {str(span.style) for line in legend(entries, 100) for span in line.spans}
    assert {f"color({i})" for i in range(6)} <= styles


def test_the_last_batch_shows_where_the_step_time_went():
    from mlora_tui.widgets.backend_pane import attention_text, phase_shares, step_summary

    state = EngineState()
    state.apply_event({"type": "batch", "seq": 1, "jobs": ["a", "b", "c"], "rows": 6,
                       "tokens": 412, "padding": 0.123, "passes": 2,
                       "seconds": {"data": 0.01, "forward": 0.3, "backward": 0.5,
                                   "optimizer": 0.19, "events": 0.0}})
    batch = state.last_batch
    assert step_summary(batch) == "1.00 s · 3 jobs · 412 tok · 12% pad · 2 passes"
    state.apply_event({"type": "run_start", "seq": 2, "attn_impl": "sdpa", "packing": True})
    assert attention_text(state.model) == "sdpa, sequences packed"
    assert attention_text({"attn_impl": "eager", "packing": False}) == "eager"
    # Every pass packed: no padding to speak of; one of two packed: the padding counts.
    packed = {**batch, "padding": 0.0, "passes": 1, "packed": 1}
    assert step_summary(packed) == "1.00 s · 3 jobs · 412 tok · packed"
    assert step_summary({**batch, "packed": 1}) == (
        "1.00 s · 3 jobs · 412 tok · 12% pad · 2 passes")
    assert phase_shares(batch["seconds"]) == "bwd 50% fwd 30% opt 19% data 1%"
    assert phase_shares({}) == "N/A"


# -- evaluation scores (issue 12): an eval event carries eval_loss, scores or both ----------

ARC = {"acc": 0.612, "acc_stderr": 0.02, "acc_norm": 0.63, "acc_norm_stderr": 0.02, "n": 500}
WIKI = {"loss": 2.5, "perplexity": 12.18, "tokens": 2048}


def test_eval_events_keep_the_latest_of_each_field_and_a_scores_only_one_keeps_the_loss():
    state = EngineState(clock=Clock())
    feed(state, run_events(3) + [
        {"type": "eval", "time": 9.0, "job": "a", "step": 1, "eval_loss": 1.5},
        {"type": "eval", "time": 9.5, "job": "a", "step": 2, "scores": {"arc": ARC}},
    ])
    job = state.jobs["a"]
    # The scores-only event left the eval loss (and the chart's eval points) as they were.
    assert job.eval_loss == 1.5 and job.eval_points == [(1, 1.5)]
    assert job.scores == {"arc": ARC} and job.scores_step == 2
    assert job.headline_score == ("arc", 0.612)

    # Both at once; a task the event lacks keeps its latest scores.
    arc2 = {**ARC, "acc": 0.65}
    feed(state, [{"type": "eval", "time": 10.0, "job": "a", "step": 3, "eval_loss": 1.25,
                  "scores": {"wiki": WIKI}},
                 {"type": "eval", "time": 10.5, "job": "a", "step": 3, "scores": {"arc": arc2}},
                 {"type": "eval", "time": 11.0, "job": "a", "step": 3, "eval_loss": 1.0}],
         first_seq=100)
    assert job.eval_loss == 1.0 and job.eval_points == [(1, 1.5), (3, 1.25), (3, 1.0)]
    assert job.scores == {"arc": arc2, "wiki": WIKI}
    assert list(job.scores) == ["arc", "wiki"]          # first seen first: arc stays first
    assert job.headline_score == ("arc", 0.65)

    messages = [line.message for line in state.logs]
    assert "a: arc acc 61.2%, acc_norm 63.0%, n 500 at step 2" in messages
    assert "a: eval loss 1.25; wiki ppl 12.18, 2,048 tokens at step 3" in messages
    assert "a: eval loss 1 at step 3" in messages


def test_a_loss_only_eval_event_leaves_the_scores():
    state = EngineState(clock=Clock())
    feed(state, run_events(2) + [
        {"type": "eval", "time": 9.0, "job": "a", "step": 1, "scores": {"arc": ARC}},
        {"type": "eval", "time": 9.5, "job": "a", "step": 2, "eval_loss": 0.75},
        {"type": "eval", "time": 9.6, "job": "a", "step": 2},     # neither: nothing changes
    ])
    job = state.jobs["a"]
    assert job.scores == {"arc": ARC} and job.scores_step == 1 and job.eval_loss == 0.75


def test_the_headline_score_is_the_first_task_with_an_accuracy():
    job = JobView("a")
    assert job.headline_score is None
    job.scores = {"wiki": WIKI}
    assert job.headline_score is None               # perplexity only: no accuracy
    job.scores = {"wiki": WIKI, "piqa": {"acc": 0.7, "n": 10}, "arc": ARC}
    assert job.headline_score == ("piqa", 0.7)


def test_status_reply_jobs_carry_their_latest_scores():
    state = EngineState(clock=Clock())
    state.apply_status({"jobs": [{"name": "a", "state": "running", "step": 5,
                                  "total_steps": 10, "eval_loss": 0.9,
                                  "scores": {"arc": ARC, "wiki": WIKI}},
                                 {"name": "b", "state": "queued", "step": 0,
                                  "total_steps": 10, "eval_loss": None, "scores": {}}]})
    assert state.jobs["a"].scores == {"arc": ARC, "wiki": WIKI}
    assert state.jobs["a"].eval_loss == 0.9 and state.jobs["b"].scores == {}
    # An older engine's reply has no "scores": what is known stays.
    state.apply_status({"jobs": [{"name": "a", "state": "running", "step": 6}]})
    assert state.jobs["a"].scores == {"arc": ARC, "wiki": WIKI}


def test_run_progress_and_summary_show_scores_and_keep_the_eval_loss():
    import io

    from rich.console import Console

    from mlora_tui.progress import RunProgress, RunSummary

    out = io.StringIO()
    console = Console(file=out, width=200, force_terminal=False, color_system=None)
    events = run_events(2) + [
        {"type": "eval", "job": "a", "step": 1, "eval_loss": 1.5},
        {"type": "eval", "job": "a", "step": 2, "scores": {"wiki": WIKI, "arc": ARC}},
    ]
    summary = RunSummary()
    with RunProgress(console) as progress:
        for event in events:
            progress.handle(event)
            summary.handle(event)
    text = out.getvalue()
    assert "a: validation loss 1.5000 at step 1" in text
    assert ("a: wiki ppl 12.18, 2,048 tokens; arc acc 61.2%, acc_norm 63.0%, n 500 at step 2"
            in text)
    assert "None" not in text
    job = summary.jobs["a"]
    assert job.eval_loss == 1.5 and job.scores == {"wiki": WIKI, "arc": ARC}
    out.truncate(0)
    summary.render(console)
    line = next(line for line in out.getvalue().splitlines() if line.startswith("  a "))
    assert "val 1.5000  arc 61.2%" in line
