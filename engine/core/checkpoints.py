"""Engine-wide checkpoints: every job's whole state at one batched step, for exact resume.

```
<output_dir>/checkpoints/step-<K>/       K: batched steps the engine had taken
    engine.json                          format, K, the model and train settings, the
                                         layout (packed), the schedules' source, each job's
                                         config, data fingerprint, state and data position
    rng.pt                               torch's random number generator states
    <job>/adapter_config.json            PEFT format: the folder loads as an adapter
    <job>/adapter_model.safetensors
    <job>/mlora_adapter.json
    <job>/optimizer.pt  scheduler.pt     the job's optimizer and schedule
    <job>/grads.safetensors              gradients of an optimizer step in progress (or none)
```

One checkpoint holds every job at the same step, so a resumed engine batches the same jobs
together as the run it continues and takes the same steps bit for bit. The folder is
written beside its final name, fsynced and renamed: a crash at any instant leaves the
previous checkpoint whole, and a reader only ever sees complete ``step-K`` folders.

This module (no torch) names, lists and prunes the folders; engine/train/resume.py writes
their contents and checks a resume against them.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

from engine.core.errors import UserError

FORMAT = 1
ENGINE_FILE = "engine.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Adapter settings a resumed job may change without changing what it computes (evaluation
# during training reads the weights, never changes them).
RESUME_FREE_FIELDS = ("data", "init_from", "prompt", "eval_tasks", "eval_steps")


def checkpoints_dir(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Whole checkpoints (their engine.json written last), oldest first."""
    folder = checkpoints_dir(output_dir)
    found = []
    if folder.is_dir():
        for entry in folder.iterdir():
            match = _STEP_DIR.match(entry.name)
            if match and (entry / ENGINE_FILE).is_file():
                found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def prune(output_dir: Path, keep: int) -> list[Path]:
    """Remove all but the newest ``keep`` checkpoints (0: keep all); returns those removed."""
    if keep <= 0:
        return []
    removed = []
    for _step, path in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def read_manifest(path: Path) -> dict:
    manifest_path = Path(path) / ENGINE_FILE
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{manifest_path}: cannot read this checkpoint ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{manifest_path}: not a checkpoint of this version of mlora "
                        f"(format {manifest.get('format') if isinstance(manifest, dict) else '?'},"
                        f" expected {FORMAT})")
    return manifest


def data_fingerprint(train: list, val: list) -> str:
    """A hash of a job's encoded examples: resuming on changed data is refused."""
    digest = hashlib.sha256()
    for part in (train, val):
        digest.update(b"|")
        for example in part:
            digest.update(json.dumps([example.input_ids, example.labels]).encode())
    return digest.hexdigest()[:32]


def config_changes(saved: dict, now: dict, free: tuple[str, ...] = ()) -> list[str]:
    """'field: saved -> now' for each setting that differs (fields in ``free`` skipped)."""
    changes = []
    for key in sorted(set(saved) | set(now)):
        if key in free:
            continue
        if saved.get(key) != now.get(key):
            changes.append(f"{key}: {saved.get(key)!r} -> {now.get(key)!r}")
    return changes

# [train] settings a resumed run must keep (others, like save_step, may change).
RESUME_TRAIN_FIELDS = ("seed", "cutoff_len")
