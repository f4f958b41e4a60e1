"""Where running engines are found: the private runtime folder and its registry. No torch.

Every engine process owns two files in the runtime folder, both named by its pid::

    <runtime_dir>/<pid>.sock    its Unix socket (mode 0600)
    <runtime_dir>/<pid>.json    its EngineRecord: name, config, output_dir, log, ...

The folder is ``$MLORA_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/mlora-tui``, else
``/tmp/mlora-tui-<uid>``; it must be ours and closed to everyone else (mode 0700), because
whoever can open a socket can steer the engine. Files are named by pid, not by engine
name, to keep socket paths short (AF_UNIX paths hold about 107 bytes) whatever the name.

A record is trusted only while its engine answers: ``list_engines`` keeps a record when its
pid is alive *and* its socket accepts a connection, and removes the files of any other
(an engine killed with SIGKILL, or a pid reused by an unrelated process). An engine writes
its record only after its socket listens, and removes it before the socket closes, so a
live engine never looks dead. ``registry_lock`` serialises the engines' own registration,
which keeps names unique and gives each output_dir at most one engine.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import socket
import stat
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

from engine.core.errors import UserError

RUNTIME_ENV = "MLORA_RUNTIME_DIR"
# sockaddr_un.sun_path is 108 bytes on Linux (104 on macOS) including the final NUL.
MAX_SOCKET_PATH = 103
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]+")


class EngineNotFound(UserError):
    """No live engine matches (the CLI exits with 3 for it)."""


@dataclass
class EngineRecord:
    """What the registry knows of one live engine; every path is absolute."""

    name: str
    pid: int
    socket: str
    config: str
    output_dir: str
    base_model: str
    started: float     # Unix time the engine process started listening
    log: str           # its log file, <output_dir>/engine.log unless started otherwise

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "EngineRecord":
        names = {f.name for f in fields(cls)}
        missing = names - data.keys()
        if missing:
            raise ValueError(f"record lacks {', '.join(sorted(missing))}")
        return cls(**{k: data[k] for k in names})


def runtime_dir() -> Path:
    """The private folder of sockets and records, created (mode 0700) when missing.

    Raises UserError when it exists but is not a folder of ours closed to group and
    others: a socket there could be opened, or replaced, by someone else.
    """
    configured = os.environ.get(RUNTIME_ENV)
    if configured:
        path = Path(configured).expanduser()
    elif os.environ.get("XDG_RUNTIME_DIR"):
        path = Path(os.environ["XDG_RUNTIME_DIR"]) / "mlora-tui"
    else:
        path = Path(tempfile.gettempdir()) / f"mlora-tui-{os.getuid()}"
    path = Path(os.path.abspath(path))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    except OSError as e:
        raise UserError(f"cannot create the runtime folder {path}: {e.strerror or e}; set "
                        f"{RUNTIME_ENV} to a folder of yours") from None
    # lstat: in a shared /tmp a symlink planted by someone else must not be followed.
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"the runtime folder {path} is not a folder (a symlink or file is in "
                        f"its place); remove it or set {RUNTIME_ENV}")
    if info.st_uid != os.getuid():
        raise UserError(f"the runtime folder {path} belongs to uid {info.st_uid}, not to you "
                        f"(uid {os.getuid()}); set {RUNTIME_ENV} to a folder of yours")
    if info.st_mode & 0o077:
        raise UserError(f"the runtime folder {path} has mode {stat.S_IMODE(info.st_mode):04o}; "
                        f"it must be private (0700): run  chmod 700 {path}")
    return path


def socket_path(pid: int | None = None) -> Path:
    """The socket of the engine with this pid (default: this process)."""
    path = runtime_dir() / f"{pid or os.getpid()}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UserError(f"the socket path {path} is longer than Unix sockets allow "
                        f"({MAX_SOCKET_PATH} bytes); set {RUNTIME_ENV} to a shorter folder")
    return path


def _record_path(pid: int) -> Path:
    return runtime_dir() / f"{pid}.json"


# -- reading the registry -------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is ours."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False    # someone else's process: our engine with that pid is gone
    return True


def socket_accepts(path: str | os.PathLike, timeout: float = 2.0) -> bool:
    """Whether something listens on the Unix socket ``path``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(os.fspath(path))
    except socket.timeout:
        # A full accept backlog: the engine lives but is slow to accept. Never call a
        # live engine dead.
        return True
    except OSError:
        return False
    finally:
        sock.close()
    return True


def _read_record(path: Path) -> EngineRecord | None:
    try:
        return EngineRecord.from_json(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        return None   # half-written or foreign: treated as stale


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def list_engines() -> list[EngineRecord]:
    """Every live engine, oldest first; files of dead engines are removed on the way."""
    folder = runtime_dir()
    live = []
    for path in sorted(folder.glob("*.json")):
        record = _read_record(path)
        if record is None or not path.stem.isdigit() or int(path.stem) != record.pid:
            if path.stem.isdigit() and not pid_alive(int(path.stem)):
                _remove(path, folder / f"{path.stem}.sock")
            continue
        if pid_alive(record.pid) and socket_accepts(record.socket):
            live.append(record)
        else:
            _remove(path, Path(record.socket))
    # A socket left without a record: an engine that died between bind and registration.
    for path in folder.glob("*.sock"):
        if path.stem.isdigit() and not pid_alive(int(path.stem)):
            _remove(path)
    return sorted(live, key=lambda r: (r.started, r.pid))


def find_engine(name: str | None = None,
                output_dir: str | os.PathLike | None = None) -> EngineRecord | None:
    """The live engine called ``name`` (or with that pid) and/or serving ``output_dir``.

    With neither given: the only live engine, or None when there are none or several.
    """
    engines = list_engines()
    if name is not None:
        engines = [e for e in engines if name in (e.name, str(e.pid))]
    if output_dir is not None:
        wanted = os.path.realpath(output_dir)
        engines = [e for e in engines if os.path.realpath(e.output_dir) == wanted]
    if name is None and output_dir is None and len(engines) != 1:
        return None
    return engines[0] if engines else None


def describe(engines: list[EngineRecord]) -> str:
    """One line naming each engine, for messages."""
    return "; ".join(f"{e.name} (pid {e.pid}, {e.output_dir})" for e in engines) or "none"


# -- registering an engine (used by the engine process) ----------------------------------------

@contextlib.contextmanager
def registry_lock() -> Iterator[None]:
    """Held while an engine checks the registry, binds its socket and writes its record."""
    fd = os.open(runtime_dir() / "registry.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def claim_name(output_dir: str | os.PathLike) -> str:
    """The name for a new engine on ``output_dir`` (hold ``registry_lock``).

    The basename of the resolved output_dir, with -2, -3, ... when a live engine already
    has it. Raises UserError when a live engine already serves this output_dir: two
    engines would write the same adapters and metrics.
    """
    engines = list_engines()
    real = os.path.realpath(output_dir)
    for engine in engines:
        if os.path.realpath(engine.output_dir) == real:
            raise UserError(f"engine {engine.name!r} (pid {engine.pid}) already runs for "
                            f"{engine.output_dir}; watch it with  mlora attach {engine.name}  "
                            f"or stop it with  mlora stop {engine.name}")
    base = _NAME_CHARS.sub("-", os.path.basename(real)).strip("-.") or "engine"
    taken = {e.name for e in engines}
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}-{n}"
    return name


def write_record(record: EngineRecord) -> None:
    """Write the record atomically: readers see the whole file or none."""
    path = _record_path(record.pid)
    fd, tmp = tempfile.mkstemp(prefix=f".{record.pid}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record.to_json(), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(Path(tmp))
        raise


def remove_record(pid: int) -> None:
    _remove(_record_path(pid))


def bind_socket(path: Path) -> socket.socket:
    """A listening, non-blocking Unix socket at ``path`` that only its owner can open."""
    # A file left there belongs to a dead process that had our pid: safe to replace.
    _remove(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask makes the socket 0600 from the moment it exists, not only after the chmod.
    old_umask = os.umask(0o177)
    try:
        sock.bind(os.fspath(path))
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"the socket {path} is in use") from None
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock
