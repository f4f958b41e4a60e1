"""Generation while the engine trains (engine/train/playground.py): each job answers with its
weights as of the request, a slice of tokens between two steps, the answers stream to the
asker only, and training stays bit-identical to a run without generations."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine.core import protocol as p
from engine.core.errors import UserError
from engine.train.adapter_set import load_adapter_set
from engine.train.adapters import adapter_state_dict, write_folder_atomically
from engine.train.decode import BatchedDecoder, DecodeRow, SamplingSettings
from engine.train.generate import prompt_ids, stop_ids
from engine.train.playground import SLICE_TOKENS
from test_engine_control import _adapter, _engine, data_file, model_dir, reference  # noqa: F401


def _expected(engine, folders: dict[str, Path], prompt: str, settings: SamplingSettings):
    """The same prompt decoded alone from the adapters saved at the request's step."""
    aset = load_adapter_set([folders["a"], folders["b"]], include_base=True)
    rows = [DecodeRow(row.adapter, prompt_ids(prompt, aset.tokenizer, None), key=row.name)
            for row in aset.rows]
    BatchedDecoder(aset, rows, settings, stop_ids(aset.model, aset.tokenizer)).run()
    return {row.name: aset.tokenizer.decode(r.tokens, skip_special_tokens=True).strip()
            for row, r in zip(aset.rows, rows)}


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "sampled"])
def test_generations_mid_training_use_the_requests_weights_and_change_no_training(
        model_dir, data_file, reference, tmp_path, temperature):
    engine = _engine(model_dir, tmp_path / "run",
                     [_adapter("a", data_file), _adapter("b", data_file, r=2, seed=9)])
    sent: list[tuple[int, dict, int]] = []
    asked: dict = {}
    polls = [0]

    def send(client_id: int, message: dict) -> None:
        sent.append((client_id, message, engine.engine_step))

    def poll(wait: bool) -> None:
        polls[0] += 1
        if polls[0] == 4:         # a few steps in: snapshot both jobs as they are now
            for job in ("a", "b"):
                folder = tmp_path / "snap" / job
                write_folder_atomically(folder, engine._adapter_files(engine.jobs[job]))
                asked[job] = folder
            asked["steps"] = {job: engine.jobs[job].step for job in ("a", "b")}
            asked["reply"] = engine.playground.start(
                7, 41, send, "Copy.", jobs=["a", "b"], base=True, max_new_tokens=20,
                temperature=temperature, seed=5)

    engine.run(poll=poll)
    for name in ("a", "b"):       # training exactly as without the generation
        got = adapter_state_dict(engine.model, name)
        assert all(torch.equal(got[k], reference[name][k]) for k in reference[name]), name

    assert asked["reply"] == {"rows": [{"name": "base", "step": None},
                                       {"name": "a", "step": asked["steps"]["a"]},
                                       {"name": "b", "step": asked["steps"]["b"]}],
                              "slice_tokens": SLICE_TOKENS}
    assert all(client == 7 and m["kind"] == "stream" and m["id"] == 41 for client, m, _ in sent)
    datas = [m["data"] for _, m, _ in sent]
    assert [d["done"] for d in datas] == [False] * (len(datas) - 1) + [True]
    assert len(datas) >= 2                          # 20 tokens take more than one slice
    steps = [step for *_, step in sent]
    assert steps[-1] > steps[0]                     # training went on between the slices
    assert asked["steps"]["a"] >= 1
    settings = SamplingSettings(20, temperature, 1.0, 5)
    assert datas[-1]["texts"] == _expected(engine, asked, "Copy.", settings)
    assert set(datas[-1]["stops"]) == {"base", "a", "b"}
    for earlier, later in zip(datas, datas[1:]):    # the texts only grow
        for name, text in earlier["texts"].items():
            assert later["texts"][name].startswith(text[: max(0, len(text) - 2)])
    # The snapshots left the model with the generation.
    assert not [n for n, _ in engine.model.named_parameters() if "playground" in n]


def test_bad_generate_requests_are_refused(model_dir, data_file, tmp_path):
    engine = _engine(model_dir, tmp_path / "run", [_adapter("a", data_file)])
    start = engine.playground.start
    with pytest.raises(UserError, match="no job named 'zz'"):
        start(1, 1, lambda *_: None, "hi", jobs=["zz"])
    with pytest.raises(UserError, match="empty"):
        start(1, 1, lambda *_: None, "  ")
    with pytest.raises(UserError, match="max_new_tokens"):
        start(1, 1, lambda *_: None, "hi", max_new_tokens=p.MAX_GENERATE_TOKENS + 1)
    with pytest.raises(UserError, match="context"):
        start(1, 1, lambda *_: None, "hi " * 200, max_new_tokens=200)
    for _ in range(p.MAX_GENERATIONS):
        start(1, 1, lambda *_: None, "hi", jobs=["a"])
    with pytest.raises(UserError, match="already answering"):
        start(1, 1, lambda *_: None, "hi", jobs=["a"])
    engine.playground.close_all("stopping")
    assert not engine.playground.active
    assert not [n for n, _ in engine.model.named_parameters() if "playground" in n]


def test_generate_over_the_socket_and_the_cli(tmp_path, model_dir, monkeypatch):  # noqa: F811
    import asyncio
    import json
    import tempfile

    from typer.testing import CliRunner

    from mlora_tui.cli import app
    from mlora_tui.client import EngineClient, RequestFailed
    from test_protocol import start_engine, stop_engine
    from test_server import write_config

    config = write_config(tmp_path, model_dir, names=("a", "b"))
    with tempfile.TemporaryDirectory(prefix="mlg-", dir="/tmp") as runtime:
        proc, record = start_engine(config, runtime)
        try:
            async def main():
                client = await EngineClient.connect(record["socket"], client="test")
                other = await EngineClient.connect(record["socket"], client="other")
                seen_by_other = []
                events = await other.subscribe(replay=False)

                async def watch():
                    async for event in events:
                        seen_by_other.append(event)

                watcher = asyncio.get_running_loop().create_task(watch())
                updates, replies = [], []
                result = await client.generate("Copy.", jobs=["a", "b"], base=True,
                                               max_new_tokens=12, on_reply=replies.append,
                                               on_update=updates.append)
                assert [r["name"] for r in replies[0]["rows"]] == ["base", "a", "b"]
                assert result["done"] and set(result["texts"]) == {"base", "a", "b"}
                assert updates[-1] == {k: v for k, v in result.items() if k != "rows"}
                with pytest.raises(RequestFailed, match="no job named 'zz'"):
                    await client.generate("x", jobs=["zz"])
                watcher.cancel()
                # Answers go to the asker only: never an event.
                assert not [e for e in seen_by_other if "texts" in e]
                await client.close()
                await other.close()
            asyncio.run(asyncio.wait_for(main(), 120))
            monkeypatch.setenv("MLORA_RUNTIME_DIR", runtime)
            result = CliRunner().invoke(app, ["generate", "--job", "a", "--max-new-tokens", "6",
                                              "--json", "Copy."])
            assert result.exit_code == 0, result.output
            assert list(json.loads(result.stdout)["outputs"]) == ["a"]
            result = CliRunner().invoke(app, ["generate", "--job", "zz", "x"])
            assert result.exit_code == 2 and "no job named 'zz'" in result.output
        finally:
            stop_engine(proc, record)
    metrics = (tmp_path / "out" / "metrics.jsonl").read_text()
    assert '"type": "step"' in metrics.replace('"type":"step"', '"type": "step"')
    assert "texts" not in metrics and "Copy." not in metrics
