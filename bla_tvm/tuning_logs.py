"""Tuning logs: the format ``bla-tvm tune`` writes, and the index of the records that apply to one device.
Imports neither tvm nor torch: the device's identity (``runtime.device_identity``) and the folders to read are
arguments; ``dispatch`` chooses them (by default the user's folder, ``BLA_TVM_TUNING_DIR``, then the ``tuning_logs/``
folder shipped with the package, unless ``BLA_TVM_NO_TUNING=1``). The first record that matches wins, so a user's
own tuning overrides the shipped one.

Format (one file per device and tuning run; ``version`` 1)::

    {
      "format": "bla_tvm.tuning_log", "version": 1,
      "device": {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "target": "sm_90"},
      "created": "2026-11-28T14:50:00Z", "bla_tvm": "0.1.0",
      "tuning": {"candidates": 380, "built": 350, "verified": 340, "build_seconds": 900, "measure_seconds": 200,
                 "sources": "<runtime.source_digest() of the sources the candidates were built from>"},
      "records": [
        {"kernel": "chunk_output",                    # a forward or backward kernel of kernels.TABLE
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
Records match on every parameter (a parameter the record lacks must be at ``LayerSpec``'s default) and, for
kernels, on L; among those, the bucket nearest the running shape wins: distance |log2 T - log2 T'| +
|log2(B H) - log2(B' H')| (time per token is flat in T on these kernels, so the nearest measured T is a good
proxy). A file that cannot be read, is not this format, or holds malformed records is reported once (a warning)
and skipped, whole; a log for another device is reported once (info) and skipped; a layer with no record is
reported once (info) and runs the default schedule.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import logging
import math
import os
import tempfile
import threading
from pathlib import Path

from .layer import CHUNK_SIZES, LayerSpec

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


def _same_device(logged: dict, running: dict) -> bool:
    keys = ("kind", "name", "compute_capability") if running["kind"] == "cuda" else ("kind", "name")
    return all(logged.get(key) == running.get(key) for key in keys)


# --- reporting --------------------------------------------------------------------------------------------------

_REPORTED: set = set()
_REPORT_LOCK = threading.Lock()


def report_once(key, level: int, message: str) -> None:
    """Log ``message`` the first time ``key`` is reported (until ``reload``)."""
    with _REPORT_LOCK:
        if key in _REPORTED:
            return
        _REPORTED.add(key)
    log.log(level, message)


# --- reading and checking logs --------------------------------------------------------------------------------


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
    if not isinstance(record, dict):
        raise LogError(f"a record must be an object, got {type(record).__name__}")
    for key, kind in (("kernel", str), ("params", dict), ("bucket", dict), ("chunk_size", int)):
        if not isinstance(record.get(key), kind):
            raise LogError(f"record field {key!r} must be {kind.__name__}, got {record.get(key)!r}")
    scalars = {key: value for key, value in record["params"].items() if not isinstance(value, (int, str))}
    if scalars:  # LayerSpec's fields are ints and a dtype name
        raise LogError(f"record params must be ints or strings, got {scalars!r}")
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
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise LogError(f"unreadable: {str(error)[:200]}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise LogError(f"not a bla_tvm tuning log (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("version") != VERSION:
        raise LogError(f"version {data.get('version')!r}; this bla_tvm reads version {VERSION}")
    if not isinstance(data.get("device"), dict) or not isinstance(data.get("records"), list):
        raise LogError("needs a 'device' object and a 'records' list")
    if not isinstance(data.get("tuning", {}), dict):  # absent, or an object
        raise LogError(f"'tuning' must be an object, got {type(data['tuning']).__name__}")
    for record in data["records"]:
        check_record(record)
    return data


def _records_for(identity: dict, folders: tuple[str, ...], sources: str | None) -> list[dict]:
    """Every record of every readable log in ``folders`` for the device ``identity``, in search order."""
    records = []
    for folder in map(Path, folders):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.json")):
            try:
                data = read_log(path)
            except LogError as error:
                report_once(("corrupt", str(path)), logging.WARNING, f"skipping tuning log {path}: {error}")
                continue
            if not _same_device(data["device"], identity):
                report_once(
                    ("foreign", str(path), identity["name"]), logging.INFO,
                    f"skipping tuning log {path}: it is for {data['device'].get('name')!r} "
                    f"({data['device'].get('kind')}), this device is {identity['name']!r}",
                )  # fmt: skip
                continue
            tuned_for = (data.get("tuning") or {}).get("sources")
            if tuned_for and sources and tuned_for != sources:
                report_once(
                    ("stale", str(path)), logging.INFO,
                    f"tuning log {path} was measured with other kernel sources (compute/ and schedules/ have changed "
                    f"since); it is used, but re-run `bla-tvm tune` for schedules measured with these",
                )  # fmt: skip
            records.extend(data["records"])
    return records


def params_key(params: dict) -> tuple:
    """A layer's parameters (LayerSpec's fields; chunk_size left out), LayerSpec's defaults filled in, as a
    hashable key."""
    defaults = {f.name: f.default for f in dataclasses.fields(LayerSpec) if f.default is not dataclasses.MISSING}
    return tuple(sorted({**defaults, **{k: v for k, v in params.items() if k != "chunk_size"}}.items()))


def bucket_distance(bucket: dict, shape) -> float:
    """How far ``shape`` (B, T, H, ...) is from a logged bucket: log2 distance in T plus in B * H."""
    B, T, H = (max(int(x), 1) for x in shape[:3])
    return abs(math.log2(T / bucket["T"])) + abs(math.log2(B * H / (bucket["B"] * bucket["H"])))


class LogIndex:
    """The records of a set of logs that apply to one device, indexed by (kernel or "chunk_size:<mode>", L or 0,
    ``params_key``): the dispatch looks a kernel up on every call, so the matching is done once per set of logs."""

    def __init__(self, records: list[dict]):
        self.records = tuple(records)
        self._by_key: dict[tuple, list[dict]] = {}
        for record in self.records:
            if record["kernel"] == CHUNK_SIZE:
                key = (f"{CHUNK_SIZE}:{record['mode']}", 0, params_key(record["params"]))
            else:
                key = (record["kernel"], record["chunk_size"], params_key(record["params"]))
            self._by_key.setdefault(key, []).append(record)

    def has_chunk_sizes(self, mode: str) -> bool:
        """Whether any record chooses the chunk length of a layer in ``mode``."""
        return any(key[0] == f"{CHUNK_SIZE}:{mode}" for key in self._by_key)

    def chunk_sizes(self, mode: str, layer: dict) -> tuple[tuple[int, int, int, int], ...]:
        """(L, B, T, H) of every chunk-length record of ``layer`` (LayerSpec's fields) in ``mode``."""
        found = self._by_key.get((f"{CHUNK_SIZE}:{mode}", 0, params_key(layer)), [])
        return tuple((r["chunk_size"], r["bucket"]["B"], r["bucket"]["T"], r["bucket"]["H"]) for r in found)

    def config(self, kernel: str, spec: dict, shape) -> dict | None:
        """The logged config of ``kernel`` for ``spec`` (KernelSpec's fields, L included) whose bucket is nearest
        ``shape`` (B, T, H, ...), or None (the default schedule)."""
        found = self._by_key.get((kernel, spec["chunk_size"], params_key(spec)), [])
        record = min(found, key=lambda r: bucket_distance(r["bucket"], shape), default=None)
        return None if record is None else record["config"]


@functools.lru_cache(maxsize=16)
def index(identity_json: str, folders: tuple[str, ...], sources: str | None) -> LogIndex:
    """The records for the device ``identity_json`` (``runtime.device_identity`` as sorted JSON) in ``folders``
    (searched in order); logs measured with other ``sources`` (a ``runtime.source_digest``) are reported once."""
    return LogIndex(_records_for(json.loads(identity_json), folders, sources))


#: how many times the logs were reloaded (what was planned from the logs read before is stale)
_GENERATION = [0]


def generation() -> int:
    """A count that changes whenever ``reload`` forgets the logs read (part of a cached plan's key)."""
    return _GENERATION[0]


def reload() -> None:
    """Forget the logs read so far (and which problems were reported), e.g. after writing a new log."""
    index.cache_clear()
    _GENERATION[0] += 1
    with _REPORT_LOCK:
        _REPORTED.clear()


# --- writing -------------------------------------------------------------------------------------------------------


def new_log(identity: dict, records_: list[dict], tuning: dict) -> dict:
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
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / log_file_name(log_["device"], label)
    fd, staging = tempfile.mkstemp(suffix=".tmp", dir=folder)  # not *.json: readers skip it
    with os.fdopen(fd, "w") as out:
        json.dump(log_, out, indent=1)
    os.replace(staging, path)
    reload()
    return path
