"""What an output folder holds, and whether a new run may use it. Imports no torch.

An engine writes everything of a run under ``[train] output_dir``::

    <output_dir>/run.json          the run record (``write_run_record``): what was trained
    <output_dir>/metrics.jsonl     every event of the run, one JSON object a line
    <output_dir>/engine.log        the engine process's log
    <output_dir>/checkpoints/step-K/   engine checkpoints (engine.core.checkpoints)
    <output_dir>/<adapter>/        a finished adapter (adapter_model.safetensors, ...)

A folder **holds a run** when it holds trained output: checkpoints, a sub-folder with
adapter files (or checkpoints of its own, an older layout), or a metrics.jsonl with at
least one ``step`` event. A run that failed at start (a wrong target module, say) trained
nothing, so fixing the config and running again is never refused. ``check_output_dir``
refuses a folder that holds a run unless the user says what to do with it: ``resume``
(allowed when there is a checkpoint to resume from and the run record, if any, shows the
same settings for every adapter the config shares with the run; the engine then checks
the checkpoint itself) or ``overwrite`` (the CLI then calls ``set_aside_run``, which
moves the old run into ``<output_dir>/replaced-<time>/``; nothing is deleted).

The run record, ``run.json``, is written atomically (a temporary file, fsync, rename)::

    {
      "format": 1,
      "fingerprint": "<sha256 of the settings, see config_fingerprint>",
      "settings": {
        "model": {"base_model": ..., "dtype": ..., "quantize": ...},
        "adapters": {"<name>": {<every AdapterConfig field>, "data_sha256": "<hex>"}, ...}
      },
      "config": "<absolute path of the config file>",
      "version": "<mlora-tui version>",
      "written": <Unix time>
    }

The settings are what decides the trained weights: the base model, its dtype and
quantization, and each adapter's whole table (with the SHA-256 of its data file, so
edited data is noticed). Scheduling fields ([train] save_step,
train_lora_simultaneously_num, gradient_checkpointing; [model] attn_impl, tf32) are left
out: they do not change what is learnt. The fingerprint leaves out adapter fields at
their default value, so a field added to AdapterConfig in a later version (with a default
that keeps the old behaviour) does not change the fingerprint of an old run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.core.checkpoints import RESUME_FREE_FIELDS
from engine.core.errors import ConfigError, UserError

if TYPE_CHECKING:
    from engine.core.config import AdapterConfig, RunConfig

RUN_RECORD = "run.json"
RUN_RECORD_FORMAT = 1
METRICS = "metrics.jsonl"
ENGINE_LOG = "engine.log"
REPLACED_PREFIX = "replaced-"
MODEL_FIELDS = ("base_model", "dtype", "quantize")
CHECKPOINTS = "checkpoints"
# Adapter fields a resumed run may change (as engine.core.checkpoints.RESUME_FREE_FIELDS: where
# the data lives is free, what it holds is checked by the engine on its encoded examples).
RESUME_FREE = RESUME_FREE_FIELDS + ("data_sha256",)
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
# metrics.jsonl is scanned for a step event up to this many bytes; a longer file without
# one is taken to hold a run (it is not a failed start).
_METRICS_SCAN_BYTES = 64 << 20


@dataclass
class RunRecord:
    """``<output_dir>/run.json``: the settings a run was started with."""

    fingerprint: str
    settings: dict
    config: str
    version: str
    written: float
    format: int = RUN_RECORD_FORMAT

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


# -- settings and fingerprints ----------------------------------------------------------------

def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_settings(config: "RunConfig") -> dict:
    """What decides the trained weights of ``config`` (see the module docstring)."""
    model = {name: getattr(config.model, name) for name in MODEL_FIELDS}
    adapters = {}
    for adapter in config.adapters:
        settings = _jsonable(dataclasses.asdict(adapter))
        try:
            settings["data_sha256"] = file_sha256(adapter.data)
        except OSError as e:
            raise ConfigError(f"cannot read the data file {adapter.data}: {e.strerror or e}",
                              file=config.source, table=f'adapter "{adapter.name}"',
                              field="data") from None
        adapters[adapter.name] = settings
    return {"model": model, "adapters": adapters}


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, and so on)."""
    return json.loads(json.dumps(value, default=str))


def _adapter_defaults() -> dict[str, Any]:
    from engine.core.config import AdapterConfig

    defaults = {}
    for f in dataclasses.fields(AdapterConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            defaults[f.name] = _jsonable(f.default_factory())  # type: ignore[misc]
    return defaults


def _canonical(settings: dict) -> dict:
    """``settings`` without adapter fields at their default value."""
    defaults = _adapter_defaults()
    adapters = {name: {k: v for k, v in fields.items()
                       if not (k in defaults and v == defaults[k])}
                for name, fields in settings.get("adapters", {}).items()}
    return {"model": settings.get("model", {}), "adapters": adapters}


def fingerprint(settings: dict) -> str:
    text = json.dumps(_canonical(settings), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def config_fingerprint(config: "RunConfig") -> str:
    """The fingerprint ``write_run_record`` stores for ``config``."""
    return fingerprint(run_settings(config))


# -- the run record ----------------------------------------------------------------------------

def write_run_record(output_dir: str | os.PathLike, config: "RunConfig") -> Path:
    """Write ``<output_dir>/run.json`` for ``config`` atomically; its path.

    Adapters of an earlier record that ``config`` does not name (a resumed run whose
    config dropped some) keep their entry when the model settings are the same, so the
    record describes every adapter folder the run has made.
    """
    from engine import __version__

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = run_settings(config)
    try:
        previous = read_run_record(output_dir)
    except UserError:
        previous = None      # unreadable: replaced by this one
    if previous is not None and previous.settings.get("model") == settings["model"]:
        kept = {name: value for name, value in previous.settings.get("adapters", {}).items()
                if name not in settings["adapters"]}
        settings["adapters"] = {**kept, **settings["adapters"]}
    source = config.source
    record = RunRecord(fingerprint=fingerprint(settings), settings=settings,
                       config=os.path.abspath(source) if os.path.exists(source) else source,
                       version=__version__, written=time.time())
    path = output_dir / RUN_RECORD
    fd, tmp = tempfile.mkstemp(prefix=f".{RUN_RECORD}.", suffix=".tmp", dir=output_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record.to_json(), f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_run_record(output_dir: str | os.PathLike) -> RunRecord | None:
    """The run record of ``output_dir``, None when it has none; UserError when it is
    unreadable (not JSON, not UTF-8, fields missing)."""
    path = Path(output_dir) / RUN_RECORD
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path}: cannot read the run record ({e}); move it away or use "
                        f"--overwrite") from None
    fields = {f.name for f in dataclasses.fields(RunRecord)}
    if not isinstance(data, dict) or not {"fingerprint", "settings"} <= data.keys() \
            or not isinstance(data.get("settings"), dict):
        raise UserError(f"{path}: not a run record (expected an object with fingerprint "
                        f"and settings); move it away or use --overwrite")
    if data.get("format", RUN_RECORD_FORMAT) > RUN_RECORD_FORMAT:
        raise UserError(f"{path}: written by a newer mlora-tui (record format "
                        f"{data['format']}); update mlora-tui or use another output_dir")
    return RunRecord(**{"config": "", "version": "", "written": 0.0,
                        **{k: v for k, v in data.items() if k in fields}})


# -- what a folder holds ----------------------------------------------------------------------

def run_outputs(output_dir: str | os.PathLike) -> list[str]:
    """What in ``output_dir`` shows a run trained there, for messages; [] when nothing.

    Adapter sub-folders ("alpha/ (adapter files)", "beta/ (checkpoints)") and
    "metrics.jsonl (steps)". Folders an earlier --overwrite set aside do not count.
    """
    folder = Path(output_dir)
    found = []
    try:
        entries = sorted(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise UserError(f"cannot read the output folder {folder}: {e.strerror or e}") from None
    for entry in entries:
        if not entry.is_dir() or entry.name.startswith((".", REPLACED_PREFIX)):
            continue
        if entry.name == CHECKPOINTS and not any(
                (entry / name).is_file() for name in ADAPTER_FILES):
            steps = [p.name for p in entry.iterdir() if p.name.startswith("step-")]
            if steps:
                found.append(f"{CHECKPOINTS}/ ({len(steps)} checkpoint"
                             f"{'' if len(steps) == 1 else 's'})")
            continue
        if any((entry / name).is_file() for name in ADAPTER_FILES):
            found.append(f"{entry.name}/ (adapter files)")
        elif (entry / "checkpoints").is_dir():
            found.append(f"{entry.name}/ (checkpoints)")
    if _metrics_has_steps(folder / METRICS):
        found.append(f"{METRICS} (training steps)")
    return found


def _metrics_has_steps(path: Path) -> bool:
    try:
        f = open(path, "rb")
    except OSError:
        return False
    with f:
        read = 0
        while read < _METRICS_SCAN_BYTES:
            line = f.readline(1 << 20)
            if not line:
                return False
            read += len(line)
            if b'"step"' not in line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and event.get("type") == "step":
                return True
        return True


def settings_differences(recorded: dict, current: dict,
                         free: tuple[str, ...] = RESUME_FREE) -> list[str]:
    """How ``current`` settings differ from ``recorded`` ones, for the adapters both name
    (adapters new in ``current`` or gone from it are no difference), adapter fields in
    ``free`` skipped: one line each."""
    differences = []
    old_model, new_model = recorded.get("model", {}), current.get("model", {})
    for key in MODEL_FIELDS:
        if old_model.get(key) != new_model.get(key):
            differences.append(f"[model] {key}: {_show(old_model.get(key))} in the run, "
                               f"{_show(new_model.get(key))} now")
    defaults = _adapter_defaults()
    old_adapters = recorded.get("adapters", {})
    for name, new in current.get("adapters", {}).items():
        old = old_adapters.get(name)
        if old is None:
            continue
        for key in sorted(set(old) | set(new)):
            if key in free:
                continue
            before, after = old.get(key, defaults.get(key)), new.get(key, defaults.get(key))
            if before != after:
                what = "data file contents" if key == "data_sha256" else key
                if key == "data_sha256":
                    differences.append(f'[adapter "{name}"] {what} changed')
                else:
                    differences.append(f'[adapter "{name}"] {what}: {_show(before)} in the '
                                       f"run, {_show(after)} now")
    return differences


def _show(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def check_output_dir(config: "RunConfig", resume: bool, overwrite: bool) -> None:
    """Refuse an output folder that holds another run, unless told what to do with it.

    - nothing trained there yet (no folder, an empty one, a failed start): fine;
    - ``overwrite``: fine (the caller then moves the old run aside with ``set_aside_run``);
    - ``resume``: fine when there is a checkpoint to resume from and ``run.json`` (when
      there is one) shows the same settings for every adapter the config shares with the
      run; ConfigError naming each difference otherwise (the engine checks the checkpoint
      itself when it loads it);
    - neither: ConfigError naming the folder, what it holds, and the ways on.

    Errors name the config file, ``[train] output_dir`` and the folder.
    """
    output_dir = Path(os.path.abspath(config.train.output_dir))

    def error(message: str) -> ConfigError:
        return ConfigError(message, file=config.source, table="train", field="output_dir")

    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other; give one")
    if output_dir.exists() and not output_dir.is_dir():
        raise error(f"{output_dir} is a file, not a folder")
    outputs = run_outputs(output_dir)
    if not outputs:
        return
    if overwrite:
        return
    held = ", ".join(outputs)
    if resume:
        try:
            record = read_run_record(output_dir)
        except UserError as e:
            raise error(f"cannot resume the run in {output_dir}: {e}") from None
        from engine.core.checkpoints import complete_checkpoints

        if not complete_checkpoints(output_dir):
            raise error(f"{output_dir} holds a run ({held}) but no checkpoint to resume "
                        f"from (none in {output_dir / CHECKPOINTS}); start over with "
                        f"--overwrite (the old run is moved to "
                        f"{output_dir}/{REPLACED_PREFIX}<time>/) or set another output_dir")
        differences = (settings_differences(record.settings, run_settings(config))
                       if record is not None else [])
        if differences:
            raise error(f"cannot resume the run in {output_dir}: this config differs from "
                        f"the one it was started with ({record.config or 'unknown'}): "
                        + "; ".join(differences)
                        + ". Undo the changes to resume, or start over with --overwrite, "
                          "or set another output_dir")
        return
    raise error(f"{output_dir} already holds a run ({held}); continue it with --resume "
                f"(same config), start over with --overwrite (the old run is moved to "
                f"{output_dir}/{REPLACED_PREFIX}<time>/, nothing is deleted), or set "
                f"another output_dir")


def set_aside_run(output_dir: str | os.PathLike) -> Path | None:
    """Move the run in ``output_dir`` into ``<output_dir>/replaced-<UTC time>/``; that path.

    Moved: run.json, metrics.jsonl, engine.log, checkpoints/ and every adapter sub-folder
    (with adapter files or checkpoints). Other files stay. None when there was nothing to move. Never
    call it while an engine runs for ``output_dir``.
    """
    folder = Path(os.path.abspath(output_dir))
    if not folder.is_dir():
        return None
    items = [folder / name for name in (RUN_RECORD, METRICS, ENGINE_LOG)
             if (folder / name).is_file()]
    if (folder / CHECKPOINTS).is_dir():
        items.append(folder / CHECKPOINTS)
    for entry in sorted(folder.iterdir()):
        if entry.is_dir() and entry.name != CHECKPOINTS \
                and not entry.name.startswith((".", REPLACED_PREFIX)) and (
                any((entry / name).is_file() for name in ADAPTER_FILES)
                or (entry / "checkpoints").is_dir()):
            items.append(entry)
    if not items:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target = folder / f"{REPLACED_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = folder / f"{REPLACED_PREFIX}{stamp}-{n}"
    target.mkdir()
    for item in items:
        os.replace(item, target / item.name)   # same filesystem: a rename, nothing copied
    return target
