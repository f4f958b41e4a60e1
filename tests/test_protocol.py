"""The socket protocol: every message round-trips, and garbage never hurts a live engine.

The first half checks engine/core/protocol.py alone. The second throws each kind of malformed
input at a real engine process (a tiny Llama training for a long time) over raw sockets,
checks the error reply or the closed connection for each, and then that the engine is
still training (step events keep arriving) and that a client connected all along saw
nothing but events.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.core import protocol as p
from test_cli import CHILD_ENV, write_run
from tiny_models import tiny_model_dir

SAMPLE_PARAMS = {
    "hello": {"version": p.PROTOCOL_VERSION, "client": "test"},
    "status": {},
    "subscribe": {"replay": False},
    "add_jobs": {"toml": '[[adapter]]\nname = "x"\ndata = "d.jsonl"\n', "source": "/a/b.toml"},
    "pause": {"job": "a"},
    "resume": {"job": "a"},
    "cancel": {"job": "a"},
    "evaluate": {"job": "a"},
    "fork": {"job": "a", "as": "a-lr", "set": {"lr": 1e-4}},
    "save": {"job": "a"},
    "stop": {},
    "generate": {"prompt": "hi", "jobs": ["a"], "base": True, "input": "", "max_new_tokens": 8,
                 "temperature": 0.5, "top_p": 0.9, "seed": 1, "raw": False},
}


# -- the messages alone -----------------------------------------------------------------------

def test_every_request_type_has_a_sample():
    assert set(SAMPLE_PARAMS) == set(p.REQUESTS)


@pytest.mark.parametrize("type_", sorted(p.REQUESTS))
def test_request_round_trip(type_):
    line = p.encode(p.request(7, type_, **SAMPLE_PARAMS[type_]))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert p.parse_request(p.decode(line)) == (7, type_, SAMPLE_PARAMS[type_])
    # Optional parameters may be left out.
    required = {k: v for k, v in SAMPLE_PARAMS[type_].items() if k in p.REQUESTS[type_][0]}
    assert p.parse_request(p.decode(p.encode(p.request(8, type_, **required)))) == \
        (8, type_, required)


def test_reply_error_and_event_round_trip():
    result = {"engine": {"name": "demo", "pid": 1}, "jobs": [{"name": "a", "loss": 1.5}]}
    assert p.decode(p.encode(p.reply(3, result))) == {"kind": "reply", "id": 3, "result": result}
    assert p.decode(p.encode(p.reply(4))) == {"kind": "reply", "id": 4, "result": {}}
    for code in sorted(p.ERROR_CODES):
        assert p.decode(p.encode(p.error(code, "why", 5))) == \
            {"kind": "error", "id": 5, "code": code, "message": "why"}
    assert p.decode(p.encode(p.error(p.BAD_JSON, "no id")))["id"] is None
    payload = {"type": "step", "time": 1.0, "job": "a", "step": 3, "loss": 0.25,
               "text": "ünïcode \n newline"}
    assert p.decode(p.encode(p.event(42, payload))) == \
        {"kind": "event", "seq": 42, "event": payload}


@pytest.mark.parametrize("line, code", [
    (b"\xff\xfe\xfd\n", p.BAD_JSON),
    (b"not json\n", p.BAD_JSON),
    (b'{"kind": "request", "id": 1,\n', p.BAD_JSON),
    (b"[1, 2, 3]\n", p.BAD_MESSAGE),
    (b'"a string"\n', p.BAD_MESSAGE),
    (b"x" * (p.MAX_LINE_BYTES + 2), p.TOO_LONG),
])
def test_decode_refuses(line, code):
    with pytest.raises(p.ProtocolError) as info:
        p.decode(line)
    assert info.value.code == code


@pytest.mark.parametrize("message, code", [
    ({"kind": "request", "type": "status"}, p.BAD_MESSAGE),                      # no id
    ({"kind": "request", "id": True, "type": "status"}, p.BAD_MESSAGE),          # bool id
    ({"kind": "reply", "id": 1, "type": "status"}, p.BAD_MESSAGE),               # wrong kind
    ({"kind": "request", "id": 1, "type": "explode"}, p.UNKNOWN_TYPE),
    ({"kind": "request", "id": 1, "type": "pause"}, p.BAD_MESSAGE),              # missing
    ({"kind": "request", "id": 1, "type": "pause", "job": 3}, p.BAD_MESSAGE),    # mistyped
    ({"kind": "request", "id": 1, "type": "status", "x": 1}, p.BAD_MESSAGE),     # extra
    ({"kind": "request", "id": 1, "type": "hello", "version": True}, p.BAD_MESSAGE),
])
def test_parse_request_refuses(message, code):
    with pytest.raises(p.ProtocolError) as info:
        p.parse_request(message)
    assert info.value.code == code
    if "id" in message and not isinstance(message["id"], bool):
        assert info.value.request_id == 1


def test_encode_refuses_oversized_messages():
    with pytest.raises(p.ProtocolError) as info:
        p.encode(p.reply(1, {"blob": "x" * p.MAX_LINE_BYTES}))
    assert info.value.code == p.TOO_LONG


# -- garbage against a live engine ---------------------------------------------------------------

class Raw:
    """A bare connection to the engine: bytes in, protocol messages out."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(path)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, request_id: int, type_: str, **params) -> None:
        self.send(p.encode(p.request(request_id, type_, **params)))

    def read(self, timeout: float = 30) -> dict | None:
        """The next message, or None when the engine closed the connection."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)

    def answer(self) -> dict:
        """The next reply or error (events in between are skipped)."""
        while True:
            message = self.read()
            assert message is not None, "the engine closed the connection"
            if message["kind"] != "event":
                return message

    def hello(self) -> dict:
        self.request(1, "hello", version=p.PROTOCOL_VERSION, client="raw")
        return self.answer()

    def close(self) -> None:
        self.sock.close()


def start_engine(config: Path, runtime: str, extra_env: dict | None = None):
    """`mlora serve CONFIG` as a child of the test, and its record once it answers."""
    from mlora_tui.client import EngineUnavailable, hello_sync

    env = {**CHILD_ENV, "MLORA_RUNTIME_DIR": runtime, **(extra_env or {})}
    log = open(config.parent / "serve.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "mlora_tui.cli", "serve", str(config)],
                            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    record_file = Path(runtime) / f"{proc.pid}.json"
    while time.monotonic() < deadline:
        assert proc.poll() is None, (config.parent / "serve.log").read_text()[-3000:]
        if record_file.is_file():
            record = json.loads(record_file.read_text())
            try:
                hello_sync(record["socket"])
                return proc, record
            except EngineUnavailable:
                pass
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("the engine did not answer within 120 s")


def stop_engine(proc, record, timeout: float = 120) -> int:
    if proc.poll() is None:
        raw = Raw(record["socket"])
        raw.hello()
        raw.request(2, "stop")
        try:
            proc.wait(timeout)
        finally:
            raw.close()
            if proc.poll() is None:
                proc.kill()
    return proc.returncode


@pytest.fixture(scope="module")
def runtime():
    # Short: Unix socket paths hold about 107 bytes, and pytest's tmp paths can be long.
    with tempfile.TemporaryDirectory(prefix="mlr-", dir="/tmp") as path:
        yield path


@pytest.fixture(scope="module")
def engine(tmp_path_factory, runtime):
    folder = tmp_path_factory.mktemp("protocol")
    config = write_run(folder, tiny_model_dir("llama", tmp_path_factory), epochs=500,
                       save_step=100000)
    proc, record = start_engine(config, runtime)
    yield record
    stop_engine(proc, record)


def _steps_after(raw: Raw, count: int, timeout: float = 60) -> list[dict]:
    steps = []
    deadline = time.monotonic() + timeout
    while len(steps) < count:
        message = raw.read(max(0.1, deadline - time.monotonic()))
        assert message is not None, "the engine closed the watching connection"
        assert message["kind"] == "event", message
        if message["event"]["type"] == "step":
            steps.append(message["event"])
    return steps


GARBAGE = [
    # (what is sent, the error code, whether the engine closes the connection)
    (lambda: bytes(random.Random(0).randrange(256) for _ in range(300)).replace(b"\n", b"")
     + b"\n", p.BAD_JSON, False),
    (lambda: b"\xc3\x28\xa0\xa1 not utf-8\n", p.BAD_JSON, False),
    (lambda: b"this is not json\n", p.BAD_JSON, False),
    (lambda: b"[1, 2, 3]\n", p.BAD_MESSAGE, False),
    (lambda: b'{"kind": "request", "id": 1}\n', p.UNKNOWN_TYPE, False),
    (lambda: b"y" * (p.MAX_LINE_BYTES + 10), p.TOO_LONG, True),
]


def test_garbage_gets_errors_and_the_engine_trains_on(engine):
    # A client connected all along sees only events, whatever others send.
    watcher = Raw(engine["socket"])
    assert watcher.hello()["kind"] == "reply"
    watcher.request(2, "subscribe", replay=False)
    subscribed = watcher.answer()
    assert (subscribed["kind"], subscribed["id"]) == ("reply", 2)
    assert isinstance(subscribed["result"]["last_seq"], int)

    for make, code, closes in GARBAGE:
        raw = Raw(engine["socket"])
        raw.send(make())
        reply = raw.answer()
        assert reply["kind"] == "error" and reply["code"] == code, reply
        if closes:
            assert raw.read() is None
        else:
            assert raw.hello()["kind"] == "reply"   # the connection still works
        raw.close()

    # Requests that are JSON but wrong, after a proper hello.
    raw = Raw(engine["socket"])
    raw.request(1, "status")
    assert raw.answer()["code"] == p.NOT_HELLO     # a request before hello
    assert raw.hello()["kind"] == "reply"
    for request_id, params, code in [
        (10, {"type": "explode"}, p.UNKNOWN_TYPE),
        (11, {"type": "pause"}, p.BAD_MESSAGE),                  # missing job
        (12, {"type": "pause", "job": 5}, p.BAD_MESSAGE),        # mistyped
        (13, {"type": "status", "verbose": True}, p.BAD_MESSAGE),  # extra
        (14, {"type": "pause", "job": "no-such-job"}, p.USER_ERROR),
    ]:
        raw.send(p.encode({"kind": "request", "id": request_id, **params}))
        reply = raw.answer()
        assert (reply["kind"], reply["id"], reply["code"]) == ("error", request_id, code), reply
        assert reply["message"]
    # A well-formed request still works on the same connection.
    raw.request(20, "status")
    status = raw.answer()
    assert status["kind"] == "reply" and status["id"] == 20
    raw.close()

    # A wrong protocol version: an error, then the connection closes.
    raw = Raw(engine["socket"])
    raw.request(1, "hello", version=p.PROTOCOL_VERSION + 1)
    reply = raw.answer()
    assert reply["code"] == p.VERSION_MISMATCH and str(p.PROTOCOL_VERSION) in reply["message"]
    assert raw.read() is None
    raw.close()

    # A client that vanishes in the middle of a line.
    raw = Raw(engine["socket"])
    raw.send(b'{"kind": "request", "id": 1, "ty')
    raw.close()

    # The engine is still training, and the watcher got nothing but events.
    assert len(_steps_after(watcher, 3)) == 3
    fresh = Raw(engine["socket"])
    assert fresh.hello()["result"]["engine"]["pid"] == engine["pid"]
    fresh.close()
    watcher.close()


def test_a_float_parameter_takes_an_integer_but_not_a_boolean():
    _id, _type, params = p.parse_request(p.request(3, "generate", prompt="x", temperature=1))
    assert params["temperature"] == 1.0 and isinstance(params["temperature"], float)
    with pytest.raises(p.ProtocolError, match="temperature"):
        p.parse_request(p.request(3, "generate", prompt="x", temperature=True))
