"""Run lm-evaluation-harness (0.4.13) offline on a local data file and return its per-item results.

A test helper, not a test: the reference that ``mlora evaluate``'s numbers are compared with.

It works the way a user would: a task YAML written into ``work_dir`` ``include``s lm_eval's own
task YAML (so the prompt, choices, target, delimiter, preprocessing and metrics are lm_eval's)
and only swaps the dataset for a local JSON/JSONL/Parquet file, then lm_eval's CLI runs as a
subprocess (``python -m lm_eval run --model hf ... --log_samples``) and the ``samples_*.jsonl`` /
``results_*.json`` it writes are parsed.

Offline, and loudly so: the subprocess gets ``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` /
``TRANSFORMERS_OFFLINE``, its ``HF_HOME`` and ``HF_DATASETS_CACHE`` live in ``work_dir`` (the
user's cache is never read or written), and a ``sitecustomize`` put first on its ``PYTHONPATH``
refuses every internet socket connection and DNS lookup and logs it; after the run the helper
raises if anything was logged. (lm_eval itself makes one hub call per run,
``HfApi().model_info(repo_id=<model dir>)`` for the results' ``model_sha``; with a local path
huggingface_hub rejects the repo id before any connection, so nothing is logged.)

    result = run_lm_eval(model_dir, "arc_easy", Path("arc.jsonl"), tmp_path / "lm_eval",
                         adapter_dir=adapter, limit=200)
    result["acc"], result["acc_norm"]
    result["samples"][0] == {"doc_id": 0, "logliks": [...], "is_greedy": [...], "gold": 2,
                             "acc": 1.0, "acc_norm": 0.0, "requests": [(context, continuation), ...]}
    result["wall_s"]   # the whole subprocess, import cost included (~11 s on 2 cores for a tiny model)

All nine tasks of TASK_YAMLS run through it (hellaswag's and winogrande's ``!function``s resolve
next to the included YAML); tests/test_lm_eval_reference.py checks arc_easy and boolq against a
plain forward.

``run_lm_eval_many`` runs several tasks in one subprocess (``--tasks a,b``), saving the several
seconds that each lm_eval start costs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lm_eval

LM_EVAL_TASKS_DIR = Path(lm_eval.__file__).parent / "tasks"

# lm_eval task name -> its YAML inside lm_eval/tasks (0.4.13's layout).
TASK_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "openbookqa": "openbookqa/openbookqa.yaml",
    "piqa": "piqa/piqa.yaml",
    "social_iqa": "siqa/siqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}

_GUARD = '''\
"""Written by tests/lm_eval_reference.py: no internet access from this offline lm_eval run."""
import os as _os
import socket as _socket
import traceback as _traceback

_LOG = _os.environ.get("MLORA_NET_GUARD_LOG")


def _refuse(what):
    if _LOG:
        with open(_LOG, "a", encoding="utf-8") as fh:
            fh.write(f"{what}\\n" + "".join(_traceback.format_stack(limit=12)) + "\\n")
    raise OSError(101, f"network access refused in an offline lm_eval run: {what}")


_connect = _socket.socket.connect
_connect_ex = _socket.socket.connect_ex
_getaddrinfo = _socket.getaddrinfo


def _is_inet(sock):
    return sock.family in (_socket.AF_INET, _socket.AF_INET6)


def connect(self, address):
    if _is_inet(self):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if _is_inet(self):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if host not in (None, "localhost", "127.0.0.1", "::1"):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


_socket.socket.connect = connect
_socket.socket.connect_ex = connect_ex
_socket.getaddrinfo = getaddrinfo
'''


class LmEvalError(RuntimeError):
    """lm_eval failed, or tried to reach the network."""


def _task_yaml(name: str, task: str, data_file: Path) -> str:
    if task not in TASK_YAMLS:
        raise ValueError(f"unknown lm_eval task {task!r}; known: {', '.join(TASK_YAMLS)}")
    base = LM_EVAL_TASKS_DIR / TASK_YAMLS[task]
    data_file = Path(data_file).resolve()
    builder = "parquet" if data_file.suffix == ".parquet" else "json"
    # json.dumps gives YAML-valid double-quoted strings for the paths.
    # tag: [] so that our copy does not join the included task's group tag (e.g. ai2_arc).
    return textwrap.dedent(f"""\
        include: {json.dumps(str(base))}
        task: {name}
        tag: []
        dataset_path: {builder}
        dataset_name: null
        dataset_kwargs:
          data_files:
            test: {json.dumps(str(data_file))}
        training_split: null
        validation_split: null
        test_split: test
        fewshot_split: null
        """)


def _offline_env(work_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_CACHE"}
    guard_dir = work_dir / "net_guard"
    guard_dir.mkdir(parents=True, exist_ok=True)
    (guard_dir / "sitecustomize.py").write_text(_GUARD)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(work_dir / "hf_home"),
        HF_DATASETS_CACHE=str(work_dir / "hf_datasets_cache"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        DO_NOT_TRACK="1",
        TOKENIZERS_PARALLELISM="false",
        MLORA_NET_GUARD_LOG=str(work_dir / "network_attempts.log"),
        PYTHONPATH=os.pathsep.join([str(guard_dir)] + [p for p in [env.get("PYTHONPATH")] if p]),
    )
    return env


def _as_bool(value) -> bool:
    if isinstance(value, str):
        if value not in ("True", "False"):
            raise LmEvalError(f"unexpected is_greedy {value!r} in lm_eval's samples")
        return value == "True"
    return bool(value)


def _requests(arguments) -> list[tuple[str, str]]:
    """lm_eval's logged request arguments as (context, continuation) pairs, one per choice.

    0.4.13 logs ``{"gen_args_0": {"arg_0": context, "arg_1": continuation}, ...}``; older
    versions a list of ``[context, continuation]``.
    """
    if not arguments:
        return []
    if isinstance(arguments, dict):
        arguments = [arguments[k] for k in sorted(arguments, key=lambda k: int(k.rsplit("_", 1)[1]))]
    return [(a["arg_0"], a["arg_1"]) if isinstance(a, dict) else (a[0], a[1]) for a in arguments]


def _parse_samples(path: Path) -> list[dict]:
    samples = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if not line.strip():
                continue
            row = json.loads(line)
            # multiple_choice: filtered_resps (filter "none" = take_first) is one
            # [loglik, is_greedy] per choice; resps is the same with one more list level.
            pairs = row["filtered_resps"]
            if pairs and isinstance(pairs[0][0], list):  # not filtered: [[[ll, greedy]], ...]
                pairs = [p[0] for p in pairs]
            # lm_eval 0.4.13 logs them as strings ("-23.78", "False"): bool("False") is True.
            logliks = [float(p[0]) for p in pairs]
            is_greedy = [_as_bool(p[1]) for p in pairs]
            requests = _requests(row.get("arguments"))
            # lm_eval's target is doc_to_target: an index, or a choice string (commonsense_qa's
            # answerKey letter), which lm_eval looks up among the choices.
            target = row["target"]
            if isinstance(target, str) and not target.strip().lstrip("-").isdigit():
                conts = [cont.strip() for _, cont in requests]
                gold = conts.index(target.strip()) if target.strip() in conts else target
            else:
                gold = int(target)
            samples.append({
                "doc_id": int(row["doc_id"]),
                "logliks": logliks,
                "is_greedy": is_greedy,
                "gold": gold,
                "acc": float(row["acc"]),
                "acc_norm": float(row["acc_norm"]) if "acc_norm" in row else None,
                "requests": requests,
            })
    samples.sort(key=lambda s: s["doc_id"])
    return samples


def run_lm_eval_many(model_dir: Path, tasks: dict[str, tuple[str, Path]], work_dir: Path, *,
                     adapter_dir: Path | None = None, limit: int | None = None,
                     batch_size: int = 4, timeout: float = 900) -> dict[str, dict]:
    """Run several tasks in one lm_eval subprocess.

    ``tasks`` maps a key (letters, digits, ``_``) to ``(lm_eval task, data file)``; the result
    maps each key to what ``run_lm_eval`` returns, each carrying the one run's ``wall_s``.
    """
    work_dir = Path(work_dir).resolve()
    work_dir.mkdir(parents=True, exist_ok=True)
    task_dir = work_dir / "tasks"
    task_dir.mkdir(exist_ok=True)
    names = {}
    for key, (task, data_file) in tasks.items():
        if not key.replace("_", "").isalnum():
            raise ValueError(f"task key {key!r}: use letters, digits and _")
        name = f"mlora_ref_{key}"
        names[key] = name
        (task_dir / f"{name}.yaml").write_text(_task_yaml(name, task, data_file))

    out_dir = work_dir / "out"
    model_args = f"pretrained={Path(model_dir).resolve()}"
    if adapter_dir is not None:
        model_args += f",peft={Path(adapter_dir).resolve()}"
    model_args += ",dtype=float32"
    cmd = [sys.executable, "-m", "lm_eval", "run",
           "--model", "hf", "--model_args", model_args,
           "--tasks", ",".join(names.values()), "--include_path", str(task_dir),
           "--device", "cpu", "--batch_size", str(batch_size),
           "--log_samples", "--output_path", str(out_dir), "--seed", "0"]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    env = _offline_env(work_dir)
    net_log = Path(env["MLORA_NET_GUARD_LOG"])
    net_log.unlink(missing_ok=True)

    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work_dir, capture_output=True, text=True,
                          timeout=timeout)
    wall_s = time.perf_counter() - start
    (work_dir / "lm_eval.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if net_log.exists() and net_log.read_text().strip():
        raise LmEvalError(f"lm_eval tried to reach the network (offline run):\n{net_log.read_text()}")
    if proc.returncode != 0:
        raise LmEvalError(f"lm_eval exited {proc.returncode}: {' '.join(cmd)}\n"
                          f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")

    results_files = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results_files:
        raise LmEvalError(f"lm_eval wrote no results_*.json under {out_dir}\n{proc.stderr[-3000:]}")
    results = json.loads(results_files[-1].read_text())["results"]

    out = {}
    for key, name in names.items():
        found = sorted(out_dir.rglob(f"samples_{name}_*.jsonl"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise LmEvalError(f"lm_eval wrote no samples_{name}_*.jsonl under {out_dir}")
        metrics = results[name]
        out[key] = {
            "acc": float(metrics["acc,none"]),
            "acc_norm": float(metrics["acc_norm,none"]) if "acc_norm,none" in metrics else None,
            "samples": _parse_samples(found[-1]),
            "wall_s": wall_s,
            "command": cmd,
        }
    return out


def run_lm_eval(model_dir: Path, task: str, data_file: Path, work_dir: Path, *,
                adapter_dir: Path | None = None, limit: int | None = None,
                batch_size: int = 4) -> dict:
    """lm_eval's ``task`` on the rows of ``data_file`` (its dataset's column layout), offline.

    Returns ``{"acc", "acc_norm" (None where lm_eval does not report it), "samples": [{"doc_id",
    "logliks" (one summed log-likelihood per choice), "is_greedy", "gold", "acc", "acc_norm",
    "requests" (lm_eval's (context, continuation) per choice)}], "wall_s" (the subprocess, start
    to exit), "command"}``.
    """
    return run_lm_eval_many(model_dir, {"task": (task, data_file)}, work_dir,
                            adapter_dir=adapter_dir, limit=limit, batch_size=batch_size)["task"]
