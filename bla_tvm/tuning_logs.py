"""Tuning logs: the format ``bla-tvm tune`` writes, and the lookup the ops do at dispatch. Imports only torch
(and, lazily, the runtime), never tvm.

Where logs are read: every ``*.json`` under ``BLA_TVM_TUNING_DIR`` (the user's; ``env.tuning_dir()``), then under
the ``tuning_logs/`` folder shipped with the package. The first record that matches wins, so a user's own tuning
overrides the shipped one. ``BLA_TVM_NO_TUNING=1`` ignores every log.

Format (one file per device and tuning run; ``version`` 1)::

    {
      "format": "bla_tvm.tuning_log", "version": 1,
      "device": {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "target": "sm_90"},
      "created": "2026-11-28T14:50:00Z", "bla_tvm": "0.1.0",
      "tuning": {"candidates": 380, "built": 350, "verified": 340, "build_seconds": 900, "measure_seconds": 200,
                 "sources": "<digest of compute/ and schedules/ the candidates were built from>"},
      "records": [
        {"kernel": "chunk_output",                    # one of spec.FORWARD_KERNELS + BACKWARD_KERNELS
         "params": {"window": 512, "resolution": 63, "num_slots": 63, "head_k": 64, "head_v": 64,
                    "dtype": "bfloat16", "group_size": 1},   # KernelSpec fields but chunk_size
         "chunk_size": 64,                            # the L this kernel was built for
         "bucket": {"B": 4, "T": 4096, "H": 16},      # the shape it was measured at
         "config": {"threads": 512, "tile": [4, 4], "cache_operands": true},   # CudaConfig / CpuConfig fields
         "ms": 9.1, "default_ms": 16.0, "candidates": 8},
        {"kernel": "chunk_size", "mode": "training",  # or "inference": the L of a layer (both its kernels')
         "params": {...}, "bucket": {...}, "chunk_size": 32, "ms": 30.2, "default_chunk_size": 32,
         "default_ms": 39.9}
      ]
    }

``device.kind`` is "cuda" or "cpu". A CUDA log applies to a GPU of the same name and compute capability; a CPU
log to a host whose ``runtime.target_id`` (architecture and CPU-feature digest) equals ``device.name``.
Records match on every parameter (a parameter the record lacks must be at ``KernelSpec``'s default) and, for
kernels, on L; among those, the bucket nearest the running shape wins: distance |log2 T - log2 T'| +
|log2(B H) - log2(B' H')| (time per token is flat in T on these kernels, so the nearest measured T is a good
proxy). A file that cannot be read, is not this format, or holds malformed records is reported once (a warning)
and skipped, whole; a log for another device is reported once (info) and skipped; a layer with no record is
reported once (info) and runs the default schedule.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import json
import logging
import math
import threading
from pathlib import Path

import torch

from . import env

FORMAT = "bla_tvm.tuning_log"
VERSION = 1
MODES = ("inference", "training")
#: the pseudo-kernel of records that choose the chunk length of a layer
CHUNK_SIZE = "chunk_size"

log = logging.getLogger("bla_tvm.tuning")


@functools.cache
def shipped_dir() -> Path:
    """The tuning logs shipped with the package: installed beside it, or the checkout's tuning_logs/."""
    package = Path(__file__).resolve().parent
    installed = package / "shipped_tuning_logs"  # pyproject.toml installs tuning_logs/ there
    return installed if installed.is_dir() else package.parent / "tuning_logs"


def log_dirs() -> list[Path]:
    return [env.tuning_dir(), shipped_dir()]


# --- the device a log is for ----------------------------------------------------------------------------------


def device_identity(device: torch.device) -> dict:
    """What a log is keyed by: kind, name and (CUDA) compute capability and target of ``device``."""
    from .runtime import device_kind, target_id

    kind = device_kind(device)
    if kind == "cpu":
        return {"kind": "cpu", "name": target_id(device), "target": target_id(device)}
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "kind": "cuda",
        "name": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "target": f"sm_{major}{minor}",
    }


def _same_device(logged: dict, running: dict) -> bool:
    keys = ("kind", "name", "compute_capability") if running["kind"] == "cuda" else ("kind", "name")
    return all(logged.get(key) == running.get(key) for key in keys)


# --- reading and checking logs --------------------------------------------------------------------------------

_REPORTED: set = set()
_REPORT_LOCK = threading.Lock()


def _report_once(key, level: int, message: str) -> None:
    with _REPORT_LOCK:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    log.log(level, message)


class LogError(ValueError):
    """A tuning log that is not of this format."""


def _check_bucket(bucket) -> dict:
    if not isinstance(bucket, dict) or set(bucket) != {"B", "T", "H"}:
        raise LogError(f"bucket must be {{'B', 'T', 'H'}}, got {bucket!r}")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in bucket.values()):
        raise LogError(f"bucket sizes must be positive ints, got {bucket!r}")
    return bucket


def check_record(record) -> dict:
    """``record`` if it is well formed, else LogError."""
    from .spec import CHUNK_SIZES

    if not isinstance(record, dict):
        raise LogError(f"a record must be an object, got {type(record).__name__}")
    for key, kind in (("kernel", str), ("params", dict), ("bucket", dict), ("chunk_size", int)):
        if not isinstance(record.get(key), kind):
            raise LogError(f"record field {key!r} must be {kind.__name__}, got {record.get(key)!r}")
    if record["chunk_size"] not in CHUNK_SIZES:
        raise LogError(f"chunk_size must be one of {CHUNK_SIZES}, got {record['chunk_size']}")
    _check_bucket(record["bucket"])
    if record["kernel"] == CHUNK_SIZE:
        if record.get("mode") not in MODES:
            raise LogError(f"a chunk_size record needs mode in {MODES}, got {record.get('mode')!r}")
    elif not isinstance(record.get("config"), dict):
        raise LogError(f"a kernel record needs a config object, got {record.get('config')!r}")
    return record


def read_log(path: Path) -> dict:
    """The parsed log at ``path``; LogError if it is not a version-1 tuning log with well-formed records."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LogError(f"unreadable: {error}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LogError(f"not a bla_tvm tuning log (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != VERSION:
        raise LogError(f"version {data.get('version')!r}; this bla_tvm reads version {VERSION}")
    if not isinstance(data.get("device"), dict) or not isinstance(data.get("records"), list):
        raise LogError("needs a 'device' object and a 'records' list")
    for record in data["records"]:
        check_record(record)
    return data


@functools.lru_cache(maxsize=16)
def _records_for(identity_json: str, folders: tuple[str, ...]) -> tuple[dict, ...]:
    """Every record of every readable log in ``folders`` for the device ``identity_json``, in search order."""
    identity = json.loads(identity_json)
    records = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.json")):
            try:
                data = read_log(path)
            except LogError as error:
                _report_once(("corrupt", str(path)), logging.WARNING, f"skipping tuning log {path}: {error}")
                continue
            if not _same_device(data["device"], identity):
                _report_once(
                    ("foreign", str(path), identity_json), logging.INFO,
                    f"skipping tuning log {path}: it is for {data['device'].get('name')!r} "
                    f"({data['device'].get('kind')}), this device is {identity['name']!r}",
                )  # fmt: skip
                continue
            tuned_for = (data.get("tuning") or {}).get("sources")
            if tuned_for and tuned_for != _sources():
                _report_once(
                    ("stale", str(path)), logging.INFO,
                    f"tuning log {path} was measured with other kernel sources (compute/ and schedules/ have changed "
                    f"since); it is used, but re-run `bla-tvm tune` for schedules measured with these",
                )  # fmt: skip
            records.extend(data["records"])
    return tuple(records)


@functools.lru_cache(maxsize=64)
def _identity_json(kind: str, index) -> str:
    return json.dumps(device_identity(torch.device(kind, index) if index is not None else torch.device(kind)),
                      sort_keys=True)  # fmt: skip


def _sources() -> str | None:
    from .runtime import _source_digest

    try:
        return _source_digest()
    except OSError:
        return None


def records(device: torch.device) -> tuple[dict, ...]:
    """The records that apply to ``device`` (none when tuning is off)."""
    return _index(device)[0]


def _index(device: torch.device) -> tuple[tuple[dict, ...], dict]:
    """(records, {(kernel or "chunk_size:<mode>", L or 0, params key): [records]}) for ``device``: the ops
    look a kernel up on every call, so the matching is done once per set of logs."""
    if not env.tuning_enabled():
        return (), {}
    return _indexed(_identity_json(device.type, device.index), tuple(map(str, log_dirs())))


@functools.lru_cache(maxsize=16)
def _indexed(identity_json: str, folders: tuple[str, ...]):
    found = _records_for(identity_json, folders)
    index = {}
    for record in found:
        if record["kernel"] == CHUNK_SIZE:
            key = (f"{CHUNK_SIZE}:{record['mode']}", 0, _params_key(record["params"]))
        else:
            key = (record["kernel"], record["chunk_size"], _params_key(record["params"]))
        index.setdefault(key, []).append(record)
    return found, index


@functools.lru_cache(maxsize=1024)
def _spec_key(spec) -> tuple:
    return _params_key({k: v for k, v in spec.as_dict().items() if k != "chunk_size"})


def _params_key(params: dict) -> tuple:
    """Parameters with KernelSpec's defaults filled in, as a hashable key (chunk_size left out)."""
    from .spec import KernelSpec

    defaults = {f.name: f.default for f in dataclasses.fields(KernelSpec)
                if f.default is not dataclasses.MISSING and f.name != "chunk_size"}  # fmt: skip
    return tuple(sorted({**defaults, **params}.items(), key=lambda item: item[0]))


def reload() -> None:
    """Forget the logs read so far (and which problems were reported), e.g. after writing a new log."""
    _records_for.cache_clear()
    _indexed.cache_clear()
    _identity_json.cache_clear()
    with _REPORT_LOCK:
        _REPORTED.clear()


# --- matching ---------------------------------------------------------------------------------------------------


def bucket_distance(bucket: dict, shape) -> float:
    """How far ``shape`` (B, T, H, ...) is from a logged bucket: log2 distance in T plus in B * H."""
    B, T, H = (max(int(x), 1) for x in shape[:3])
    return abs(math.log2(T / bucket["T"])) + abs(math.log2(B * H / (bucket["B"] * bucket["H"])))


def _nearest(candidates: list[dict], shape) -> dict | None:
    return min(candidates, key=lambda r: bucket_distance(r["bucket"], shape), default=None)


def _describe(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in params.items())


def chunk_size(device: torch.device, params: dict, shape, backward: bool) -> int | None:
    """The logged chunk length for a layer of ``params`` (KernelSpec fields but chunk_size) at ``shape`` on
    ``device``, for training (``backward``) or inference; None when no log has one.

    Runs where the public function runs, so also under torch.compile: the log lookup is one call dynamo treats as
    a constant (``_layer_chunk_sizes``), and the shape is read only where the records disagree between buckets
    (which then specialises a dynamic-shape graph on B, T, H)."""
    if not _any_chunk_sizes(str(device), bool(backward)):
        return None  # the common case, decided without reading the layer's (possibly symbolic) sizes
    params = tuple((key, value if isinstance(value, str) else int(value)) for key, value in params.items())
    found = _layer_chunk_sizes(str(device), params, bool(backward))
    if not found:
        return None
    if found[0][1] == 0:  # forced
        return found[0][0]
    if len({L for L, *_ in found}) == 1 and (shape is None or not all(isinstance(x, int) for x in shape[:3])):
        return found[0][0]  # no need to read a symbolic shape
    if shape is None:
        return None
    B, T, H = (int(x) for x in shape[:3])
    L = min(found, key=lambda f: bucket_distance(dict(zip("BTH", f[1:])), (B, T, H)))[0]
    if not _indexable(L, dict(params), (B, T, H), backward):
        return None  # a shorter L means more chunks: never refuse a shape the default L can run
    return L


def _indexable(L: int, params: dict, shape, backward: bool) -> bool:
    """Whether the per-chunk buffers of the op at chunk length L stay within 32-bit indexing (``ops.
    _chunk_tensors``): the states [B, NC, H, N, K + V] and, for training, the gradients [B, NC, HQ, L + N,
    K + V + K]. ``shape`` is q's (B, T, HQ)."""
    B, T, HQ = shape
    N, K, V, G = params["resolution"], params["head_k"], params["head_v"], params.get("group_size", 1)
    chunks = -(-T // L)
    largest = B * chunks * max(HQ // G, 1) * N * (K + V)
    if backward:
        largest = max(largest, B * chunks * HQ * (L + N) * (2 * K + V))
    return largest <= 2**31 - 1


@torch.compiler.assume_constant_result
def _any_chunk_sizes(device: str, backward: bool) -> bool:
    """Whether any log has a chunk length for this device and mode (or ``forced`` sets one)."""
    if _FORCED_CHUNK.get() is not None:
        return True
    mode = MODES[backward]
    if any(key[0] == f"{CHUNK_SIZE}:{mode}" for key in _index(torch.device(device))[1]):
        return True
    if env.tuning_enabled():
        _report_once(
            ("no-log", device, mode), logging.INFO,
            f"no tuning log has {mode} chunk lengths for {device}: default chunk lengths and schedules (run "
            f"`bla-tvm tune` to tune them)",
        )  # fmt: skip
    return False


@torch.compiler.assume_constant_result
def _layer_chunk_sizes(device: str, params: tuple, backward: bool) -> tuple[tuple[int, int, int, int], ...]:
    """(L, B, T, H) of every matching chunk-length record (``forced``'s L alone inside that block)."""
    forced_L = _FORCED_CHUNK.get()
    if forced_L is not None:
        return ((forced_L, 0, 0, 0),)  # B = 0 marks it
    device_, params_, mode = torch.device(device), dict(params), MODES[backward]
    found = tuple(
        (r["chunk_size"], r["bucket"]["B"], r["bucket"]["T"], r["bucket"]["H"])
        for r in _index(device_)[1].get((f"{CHUNK_SIZE}:{mode}", 0, _params_key(params_)), [])
    )
    if not found and env.tuning_enabled():
        _report_once(
            ("no-chunk", device, mode, params), logging.INFO,
            f"no tuning record for the {mode} chunk length of {_describe(params_)} on {device}: default chunk "
            f"length and schedules (run `bla-tvm tune` to tune them)",
        )  # fmt: skip
    return found


def kernel_config(kernel: str, spec, device: torch.device, shape) -> dict | None:
    """The logged schedule config of ``kernel`` for ``spec`` (L included) nearest to ``shape``, or None (the
    default schedule). Inside ``forced`` the forced config wins."""
    forced = _FORCED.get() or {}
    if kernel in forced:
        return forced[kernel]
    if shape is None:
        return None
    found = _index(device)[1].get((kernel, spec.chunk_size, _spec_key(spec)), [])
    record = _nearest(found, shape)
    return None if record is None else record["config"]


def kernel_function(kernel: str, spec, device: torch.device, shape):
    """The loaded kernel with its tuned schedule for ``shape`` (``kernel_config``); if that config cannot be
    loaded or built, the failure is reported once and the default schedule is used."""
    from .runtime import LIBRARY

    config = kernel_config(kernel, spec, device, shape)
    if config is not None:
        try:
            return LIBRARY.function(kernel, spec, device, config)
        except Exception as error:
            if kernel in (_FORCED.get() or {}):
                raise
            _report_once(
                ("unloadable", kernel, spec, json.dumps(config, sort_keys=True)), logging.WARNING,
                f"tuned schedule {config} of {kernel} for {spec.tag()} is unusable ({error}); using the default",
            )  # fmt: skip
    return LIBRARY.function(kernel, spec, device)


# --- the tuner's hook --------------------------------------------------------------------------------------------

_FORCED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("bla_tvm_forced_configs", default=None)
_FORCED_CHUNK: contextvars.ContextVar[int | None] = contextvars.ContextVar("bla_tvm_forced_chunk", default=None)


@contextlib.contextmanager
def forced(configs: dict, chunk_size: int | None = None):
    """Within the block, ``kernel_config`` returns ``configs[kernel]`` for the kernels it names (None: the
    default schedule) and ``chunk_size`` returns ``chunk_size`` (if given), whatever the logs say: the tuner
    runs the public op with a candidate schedule and chunk length this way."""
    token = _FORCED.set({**(_FORCED.get() or {}), **configs})
    chunk_token = _FORCED_CHUNK.set(chunk_size if chunk_size is not None else _FORCED_CHUNK.get())
    try:
        yield
    finally:
        _FORCED_CHUNK.reset(chunk_token)
        _FORCED.reset(token)


# --- writing -------------------------------------------------------------------------------------------------------


def new_log(identity: dict, records_: list[dict], tuning: dict) -> dict:
    import datetime
    import importlib.metadata

    try:
        version = importlib.metadata.version("bla_tvm")
    except importlib.metadata.PackageNotFoundError:
        version = "source"
    log_ = {
        "format": FORMAT,
        "version": VERSION,
        "device": identity,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "bla_tvm": version,
        "tuning": tuning,
        "records": records_,
    }
    for record in records_:
        check_record(record)
    return log_


def log_file_name(identity: dict, label: str) -> str:
    """``<device>-<target>-<label>.json``, in file-name-safe characters."""
    name = f"{identity['name']}-{identity['target']}-{label}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip("_") + ".json"


def write_log(folder: Path, log_: dict, label: str) -> Path:
    """Write ``log_`` into ``folder`` atomically; returns the path."""
    import os
    import tempfile

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / log_file_name(log_["device"], label)
    fd, staging = tempfile.mkstemp(suffix=".tmp", dir=folder)  # not *.json: readers skip it
    with os.fdopen(fd, "w") as out:
        json.dump(log_, out, indent=1)
    os.replace(staging, path)
    reload()
    return path
