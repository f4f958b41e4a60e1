"""The engine's socket protocol: every message, in one place. Imports no torch.

Transport: a Unix stream socket; each message is one JSON object on one line (UTF-8,
newline-terminated, at most ``MAX_LINE_BYTES``). Four kinds of message:

    request  client -> engine  {"kind": "request", "id": 7, "type": "pause", "job": "a"}
    reply    engine -> client  {"kind": "reply", "id": 7, "result": {...}}
    error    engine -> client  {"kind": "error", "id": 7 | null, "code": "...", "message": "..."}
    event    engine -> client  {"kind": "event", "seq": 42, "event": {"type": "step", ...}}
    stream   engine -> client  {"kind": "stream", "id": 7, "data": {...}}

A ``stream`` message goes to the client that made request ``id`` only, after its reply: the
answers of a ``generate`` request as they grow (never events, never in metrics.jsonl).

The first request on a connection must be ``hello`` with ``PROTOCOL_VERSION``; a wrong
version gets an error with code ``version_mismatch`` and the connection is closed, and so
does a connection that sends no hello within the engine's hello timeout (``hello_timeout``)
or that finds the engine at its client limit (``too_many_clients``). Requests
are applied by the engine between training steps, in the order they arrive. ``subscribe``
first replays every event since the engine started (so a late client draws the whole loss
curves), then streams new ones; ``seq`` numbers events from 1 without gaps.

Events are the engine's own event dicts (docs/architecture.md lists them). The engine
process adds ``resource`` events every ~2 s: {rss_bytes, cpu_percent, device,
device_memory_bytes, device_memory_total_bytes, device_utilization} (fields it cannot read
are null), and, as its very last event before it closes every connection, ``engine_exit``:
{code, reason, metrics_lost}, the process's exit code (``engine.core.jobs``: 0 ended or
stopped, 1 a job failed or the engine crashed, 2 a config/data/model error, 130 aborted),
why, and what ``metrics.jsonl`` lacks (phrases; empty when it holds every event).
"""

from __future__ import annotations

import json
from typing import Any

PROTOCOL_VERSION = 1
MAX_LINE_BYTES = 1 << 20
# An error's message is cut to this many characters: a message quoting what a client sent
# (a job name, a request type) must still fit in a line, whatever the client sent.
MAX_ERROR_CHARS = 4096

# Request types and their parameters: name -> (required params, optional params).
REQUESTS: dict[str, tuple[dict[str, type], dict[str, type]]] = {
    "hello": ({"version": int}, {"client": str}),
    # -> {"engine": engine_info}
    "status": ({}, {}),
    # -> {"engine": engine_info, "model": run_start fields, "jobs": [job_summary, ...]}
    "subscribe": ({}, {"replay": bool}),
    # -> {"last_seq": n}; then events (replayed ones first when replay is true, the default)
    "add_jobs": ({"toml": str}, {"source": str}),
    # TOML text of [[adapter]] tables, validated as in a config file -> {"added": [names]}
    "pause": ({"job": str}, {}),
    "resume": ({"job": str}, {}),
    "cancel": ({"job": str}, {}),
    # -> {"job": name, "state": new state}
    "fork": ({"job": str, "as": str}, {"set": dict}),
    # a new job "as" from job's state at this step boundary (weights, optimizer, schedule,
    # data position, dropout seeds), the "set" settings changed from here on (lr, schedule,
    # warm-up, clipping, dropout, num_epochs, eval; engine/train/fork.py) -> {"job": new,
    # "from": job, "step": k}
    "evaluate": ({"job": str}, {}),
    # evaluate the job at the next step boundary (its eval_tasks, or every [[eval]] task
    # when it lists none, and its validation loss) -> {"job": name, "tasks": [names],
    # "eval_loss": bool}; the results come as an "eval" event
    "save": ({}, {"job": str}),
    # checkpoint now: one job, or every unfinished job -> {"paths": [...]}
    "stop": ({}, {}),
    # graceful: checkpoint every unfinished job, then exit -> {} (then the connection closes)
    "generate": ({"prompt": str}, {"jobs": list, "base": bool, "input": str,
                                   "max_new_tokens": int, "temperature": float,
                                   "top_p": float, "seed": int, "raw": bool}),
    # the jobs' adapters (every unfinished job's when "jobs" is left out) and, with "base",
    # the base model answer the prompt, each job's weights as of this request ->
    # {"rows": [{"name", "step"}], "slice_tokens": n}; then stream messages
    # {"texts": {name: text so far}, "done": false}, ..., and a last one with "done": true
    # and "stops": {name: "eos" | "length"} (or "error": message). Between two training
    # steps each generation decodes at most slice_tokens tokens.
}
MAX_GENERATIONS = 4          # generations decoding at once in one engine
MAX_GENERATE_TOKENS = 1024   # a generate request's max_new_tokens at most

# Error codes.
BAD_JSON = "bad_json"                  # the line is not JSON (or not UTF-8)
TOO_LONG = "too_long"                  # the line is longer than MAX_LINE_BYTES (connection closed)
BAD_MESSAGE = "bad_message"            # JSON, but not a well-formed request
UNKNOWN_TYPE = "unknown_type"          # a request type this engine does not know
VERSION_MISMATCH = "version_mismatch"  # hello with another protocol version (connection closed)
NOT_HELLO = "not_hello"                # a request before hello
USER_ERROR = "user_error"              # the request is valid but cannot be done (no such job, bad TOML)
INTERNAL = "internal"                  # the engine failed to handle it (a bug; the engine goes on)
HELLO_TIMEOUT = "hello_timeout"        # no hello soon enough after connecting (connection closed)
TOO_MANY_CLIENTS = "too_many_clients"  # the engine is at its client limit (connection closed)
ERROR_CODES = frozenset({BAD_JSON, TOO_LONG, BAD_MESSAGE, UNKNOWN_TYPE, VERSION_MISMATCH,
                         NOT_HELLO, USER_ERROR, INTERNAL, HELLO_TIMEOUT, TOO_MANY_CLIENTS})


class ProtocolError(Exception):
    """A message that breaks the protocol; ``code`` is one of ERROR_CODES."""

    def __init__(self, code: str, message: str, request_id: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id


def encode(message: dict[str, Any]) -> bytes:
    """One message as a line of bytes."""
    line = json.dumps(message, separators=(",", ":"), default=str).encode() + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(TOO_LONG, f"message of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    return line


def decode(line: bytes) -> dict[str, Any]:
    """A line (without or with its newline) as a message object; ProtocolError otherwise."""
    if len(line) > MAX_LINE_BYTES + 1:
        raise ProtocolError(TOO_LONG, f"line of {len(line)} bytes exceeds {MAX_LINE_BYTES}")
    try:
        message = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        raise ProtocolError(BAD_JSON, f"not JSON: {exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise ProtocolError(BAD_JSON, "not JSON this engine reads: nested too deeply") from None
    except ValueError as exc:   # e.g. an integer of more than 4300 digits
        raise ProtocolError(BAD_JSON, f"not JSON this engine reads: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(BAD_MESSAGE, f"a message must be a JSON object, got "
                                         f"{type(message).__name__}")
    return message


def parse_request(message: dict[str, Any]) -> tuple[int, str, dict[str, Any]]:
    """(id, type, params) of a request, checked against REQUESTS; ProtocolError otherwise."""
    request_id = message.get("id")
    if not isinstance(request_id, int) or isinstance(request_id, bool):
        raise ProtocolError(BAD_MESSAGE, "a request needs an integer 'id'")
    if message.get("kind") != "request":
        raise ProtocolError(BAD_MESSAGE, "clients send only messages of kind 'request'",
                            request_id)
    type_ = message.get("type")
    if type_ not in REQUESTS:
        known = ", ".join(sorted(REQUESTS))
        raise ProtocolError(UNKNOWN_TYPE, f"unknown request type {type_!r} (known: {known})",
                            request_id)
    required, optional = REQUESTS[type_]
    params = {k: v for k, v in message.items() if k not in ("kind", "id", "type")}
    for name, kind in required.items():
        if name not in params:
            raise ProtocolError(BAD_MESSAGE, f"{type_}: missing parameter {name!r}", request_id)
    for name, value in params.items():
        kind = required.get(name) or optional.get(name)
        if kind is None:
            raise ProtocolError(BAD_MESSAGE, f"{type_}: unknown parameter {name!r}", request_id)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            params[name] = value = float(value)        # JSON writes 1.0 as 1
        if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
            raise ProtocolError(BAD_MESSAGE, f"{type_}: parameter {name!r} must be "
                                             f"{kind.__name__}", request_id)
    return request_id, type_, params


def request(request_id: int, type_: str, **params: Any) -> dict[str, Any]:
    return {"kind": "request", "id": request_id, "type": type_, **params}


def reply(request_id: int, result: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"kind": "reply", "id": request_id, "result": result or {}}


def error(code: str, message: str, request_id: int | None = None) -> dict[str, Any]:
    if len(message) > MAX_ERROR_CHARS:
        message = (message[:MAX_ERROR_CHARS]
                   + f"... ({len(message) - MAX_ERROR_CHARS} more characters)")
    return {"kind": "error", "id": request_id, "code": code, "message": message}


def event(seq: int, payload: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "event", "seq": seq, "event": payload}


def stream(request_id: int, data: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "stream", "id": request_id, "data": data}
