"""Finding, building on demand, loading and calling compiled BLA kernels. Imports only tvm_ffi and torch.

A kernel is found, in order: in memory; in the prebuilt folder (``BLA_TVM_PREBUILT_DIR``, a manifest written by
``bla_tvm.build``); in the on-disk cache under a key that hashes everything that changes the code. If it is in
neither, ``bla_tvm.build`` compiles it (that is the only place tvm is imported), unless BLA_TVM_NO_BUILD=1.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import threading
from pathlib import Path

import torch
import tvm_ffi

from . import env
from .spec import CHUNK_SIZES, CUDA_SHARED_MEMORY_LIMIT, KernelSpec, cuda_shared_memory_bound, entry_symbol

MANIFEST = "manifest.json"


def device_kind(device: torch.device) -> str:
    """'cpu' or 'cuda': which family of schedules serves tensors on ``device``."""
    if device.type in ("cpu", "cuda"):
        return device.type
    raise ValueError(f"q must be on a CPU or CUDA device, got {device}")


@functools.lru_cache(maxsize=None)
def _host_cpu_id() -> str:
    """Architecture plus a digest of the CPU's feature flags: a CPU kernel is compiled for the host's ISA."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def target_id(device: torch.device) -> str:
    """What a compiled kernel is specific to: the host CPU, or the GPU's architecture (sm_XY)."""
    if device_kind(device) == "cpu":
        return _host_cpu_id()
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


@functools.lru_cache(maxsize=None)
def _source_digest() -> str:
    """Digest of the compute and schedule sources: editing any of them invalidates cached kernels."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    schedules = importlib.util.find_spec("bla_tvm.schedules")  # installed as bla_tvm.schedules from ./schedules
    schedule_dir = Path(schedules.submodule_search_locations[0]) if schedules else package.parent / "schedules"
    for folder in (package / "compute", schedule_dir):
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    digest.update(Path(__file__).with_name("spec.py").read_bytes())
    return digest.hexdigest()


@functools.cache
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def kernel_key(kernel: str, spec: KernelSpec, target: str, config: dict | None) -> str:
    """Cache key: kernel, spec, target, schedule config, bla_tvm and TVM versions and the sources."""
    payload = json.dumps(
        {
            "kernel": kernel,
            "spec": spec.as_dict(),
            "target": target,
            "config": config,
            "bla_tvm": _version("bla_tvm"),
            "tvm": _version("apache-tvm"),
            "sources": _source_digest(),
        },
        sort_keys=True,
    )
    return f"{kernel}-{spec.tag()}-{target}-{hashlib.sha256(payload.encode()).hexdigest()[:16]}"


@functools.lru_cache(maxsize=None)
def load_tvm_runtime(kind: str) -> None:
    """Load libtvm_runtime.so (and libtvm_runtime_cuda.so for CUDA) globally, as the kernels need its thread
    pool and device API. From ``BLA_TVM_RUNTIME_DIR`` or the installed apache-tvm, found without importing it."""
    folder = env.runtime_dir()
    if folder is None:
        try:
            folder = Path(importlib.metadata.distribution("apache-tvm").locate_file("tvm/lib"))
        except importlib.metadata.PackageNotFoundError:
            raise RuntimeError(
                "no TVM runtime: install apache-tvm or set BLA_TVM_RUNTIME_DIR to a folder with libtvm_runtime.so"
            ) from None
    names = ["libtvm_runtime.so"] + (["libtvm_runtime_cuda.so"] if kind == "cuda" else [])
    for name in names:
        path = folder / name
        if not path.exists():
            raise RuntimeError(f"{path} is missing (BLA_TVM_RUNTIME_DIR={env.runtime_dir()})")
        ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)


class KernelLibrary:
    """Compiled kernels by (kernel, spec, target, config), loaded once per process; thread safe."""

    def __init__(self):
        self._functions: dict[str, object] = {}
        self._lock = threading.Lock()

    def function(self, kernel: str, spec: KernelSpec, device: torch.device, config: dict | None = None):
        key = kernel_key(kernel, spec, target_id(device), config)
        function = self._functions.get(key)
        if function is None:
            with self._lock:
                function = self._functions.get(key)
                if function is None:
                    load_tvm_runtime(device_kind(device))
                    module = tvm_ffi.load_module(str(self._module_path(key, kernel, spec, device, config)))
                    function = module[entry_symbol(kernel)]
                    self._functions[key] = function
        return function

    def _module_path(self, key, kernel, spec, device, config) -> Path:
        prebuilt = _find_prebuilt(kernel, spec, target_id(device), config)
        if prebuilt is not None:
            return prebuilt
        path = env.cache_dir() / f"{key}.so"
        if path.exists():
            return path
        if not env.build_allowed():
            raise RuntimeError(
                f"kernel {kernel} for {spec} on {target_id(device)} is not built, and BLA_TVM_NO_BUILD=1 forbids "
                f"compiling it (looked in {env.prebuilt_dir()} and {env.cache_dir()})"
            )
        from . import build  # imports tvm

        build.build_to_path(kernel, spec, device_kind(device), target_id(device), config, path)
        return path


def _find_prebuilt(kernel, spec, target, config) -> Path | None:
    folder = env.prebuilt_dir()
    if folder is None or not (folder / MANIFEST).exists():
        return None
    manifest = json.loads((folder / MANIFEST).read_text())
    for entry in manifest["kernels"]:
        if (
            entry["kernel"] == kernel
            and entry["spec"] == spec.as_dict()
            and entry["target"] == target
            and entry.get("config") == config
        ):
            return folder / entry["file"]
    return None


def chunk_size_for(
    device: torch.device, window, resolution, num_slots, head_k, head_v, dtype: str, backward: bool, shape=None,
    group_size: int = 1,
) -> int:
    """The chunk length L for a layer on ``device``: the tuning log's for this GPU and the bucket nearest
    ``shape`` (B, T, H, ...) if one has it (``tuning_logs.chunk_size``); else 64 on the CPU and on CUDA see
    ``cuda_chunk_size``. The forward and backward of one call must agree on L (the backward reads the states at
    chunk starts): training (``backward``) has its own records, measured over forward and backward together."""
    from . import tuning_logs

    params = {"window": window, "resolution": resolution, "num_slots": num_slots, "head_k": head_k, "head_v": head_v,
              "dtype": dtype}
    tuned = tuning_logs.chunk_size(device, params, shape, backward)
    if tuned is not None:
        return tuned
    if device_kind(device) == "cpu":
        return CHUNK_SIZES[0]
    return cuda_chunk_size(
        target_id(device), window, resolution, num_slots, head_k, head_v, dtype, backward, group_size
    )


@functools.lru_cache(maxsize=256)
def cuda_chunk_size(
    target: str, window, resolution, num_slots, head_k, head_v, dtype: str, backward: bool, group_size: int = 1
) -> int:
    """The longest chunk whose per-chunk blocks (the forward's, and the backward's when ``backward``) fit in
    shared memory: the longest among prebuilt kernels; else the longest that fits under
    ``cuda_shared_memory_bound`` or, where kernels may be built, in the compiled kernels (``bla_tvm.build``)."""
    kernels = ("chunk_output", "chunk_backward") if backward else ("chunk_output",)
    candidates = [
        KernelSpec(window, resolution, num_slots, L, head_k, head_v, dtype, group_size) for L in CHUNK_SIZES
    ]
    for spec in candidates:
        if all(_find_prebuilt(kernel, spec, target, None) is not None for kernel in kernels):
            return spec.chunk_size
    for spec in candidates:
        bound = cuda_shared_memory_bound(spec.chunk_size, resolution, num_slots, head_k, head_v, backward)
        if bound <= CUDA_SHARED_MEMORY_LIMIT:  # fits even with no buffer reuse: no need to compile to know
            return spec.chunk_size
        if env.build_allowed():
            from . import build

            if build.cuda_shared_memory(spec, target, kernels) <= CUDA_SHARED_MEMORY_LIMIT:
                return spec.chunk_size
    raise ValueError(
        f"num_slots={num_slots}, resolution={resolution}, K={head_k}, V={head_v} need more shared memory per "
        f"chunk than a CUDA block has, even at chunk length {CHUNK_SIZES[-1]}"
    )


LIBRARY = KernelLibrary()
