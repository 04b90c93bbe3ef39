"""Finding, building on demand, loading and launching compiled BLA kernels. Imports only tvm_ffi and torch.

A ``KernelLibrary`` finds a kernel, in order: in memory; in its prebuilt folder (a manifest written by
``bla-tvm build`` or the tuner's builder); in its on-disk cache under a key that hashes everything that changes
the code, if the module there matches its recorded digest (``kernel_cache``). If it is in neither, ``bla_tvm.build`` compiles it (the only place tvm is imported), unless the
library forbids building. ``default_library()`` is the one configured by ``BLA_TVM_PREBUILT_DIR``,
``BLA_TVM_CACHE_DIR`` and ``BLA_TVM_NO_BUILD``; the tuner builds its own.

Kernels are launched by argument name (``launch``; names from ``kernels.TABLE``), with tensors made
``kernel_ready`` (contiguous, aligned), on torch's current CUDA stream. ``record_launches`` lets a caller see
every launch of a block of code, in order.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import importlib.metadata
import importlib.util
import json
import platform
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import tvm_ffi

from . import env, kernel_cache, kernels
from .cuda_arch import device_arch
from .layer import KernelSpec

MANIFEST = "manifest.json"


def device_kind(device: torch.device) -> str:
    """'cpu' or 'cuda': which family of schedules serves tensors on ``device``."""
    if device.type in ("cpu", "cuda"):
        return device.type
    raise ValueError(f"q must be on a CPU or CUDA device, got {device}")


@functools.lru_cache(maxsize=None)
def host_cpu_id() -> str:
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
        return host_cpu_id()
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def device_identity(device: torch.device) -> dict:
    """What a tuning log is keyed by: kind, name and (CUDA) compute capability and target of ``device``."""
    if device_kind(device) == "cpu":
        return {"kind": "cpu", "name": target_id(device), "target": target_id(device)}
    major, minor = torch.cuda.get_device_capability(device)
    return {
        "kind": "cuda",
        "name": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "target": f"sm_{major}{minor}",
    }


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
    """Digest of the compute and schedule sources, the kernel table and the specs: editing any of them
    invalidates cached kernels (and marks tuning logs measured before as stale)."""
    digest = hashlib.sha256()
    package = Path(__file__).parent
    schedules = importlib.util.find_spec("bla_tvm.schedules")  # installed as bla_tvm.schedules from ./schedules
    schedule_dir = Path(schedules.submodule_search_locations[0]) if schedules else package.parent / "schedules"
    for folder in (package / "compute", schedule_dir):
        for path in sorted(folder.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    for name in ("layer.py", "kernels.py"):
        digest.update(Path(__file__).with_name(name).read_bytes())
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
            "sources": source_digest(),
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


@dataclass(frozen=True, eq=False)
class CompiledKernel:
    """A loaded kernel: its table entry, the spec and schedule config it was built for, and the function.
    Calling it passes positional arguments straight to the function (``launch`` passes them by name)."""

    kernel: kernels.Kernel
    spec: KernelSpec
    config: dict | None
    function: object

    def __call__(self, *args):
        return self.function(*args)


#: a manifest entry's fields and their types; the optional ones may be null or absent ("sha256": the module's digest)
MANIFEST_FIELDS = {"kernel": str, "spec": dict, "target": str, "file": str, "config": dict, "sha256": str}
OPTIONAL_FIELDS = ("config", "sha256")


def read_manifest(folder: Path) -> list[dict]:
    """The entries of ``folder/manifest.json`` (none where there is no manifest); ValueError naming the file
    where it is not a manifest."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return []
    try:
        entries = json.loads(path.read_text())["kernels"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError, TypeError, KeyError) as error:
        raise ValueError(f"prebuilt manifest {path} is unreadable ({type(error).__name__}: {str(error)[:200]})") from None
    if not isinstance(entries, list):
        raise ValueError(f"prebuilt manifest {path}: 'kernels' must be a list, got {type(entries).__name__}")
    for entry in entries:
        wrong = {"entry": entry} if not isinstance(entry, dict) else {
            field: entry.get(field) for field, kind in MANIFEST_FIELDS.items()
            if not isinstance(entry.get(field), kind) and not (field in OPTIONAL_FIELDS and entry.get(field) is None)
        }  # fmt: skip
        if wrong:
            raise ValueError(f"prebuilt manifest {path}: malformed entry, fields {wrong!r} (expected {MANIFEST_FIELDS})")
    return entries


class KernelLibrary:
    """Compiled kernels by (kernel, spec, target, config), loaded once per library; thread safe.

    prebuilt_dir: a folder of kernels built elsewhere, with manifest.json, searched first (None: none);
    cache_dir: where kernels built on demand are kept; build_allowed: whether a kernel found in neither may be
    compiled here (needs TVM) or is an error.
    """

    def __init__(self, prebuilt_dir: Path | None, cache_dir: Path, build_allowed: bool):
        self.prebuilt_dir = None if prebuilt_dir is None else Path(prebuilt_dir)
        self.cache_dir = Path(cache_dir)
        self.build_allowed = build_allowed
        self._prebuilt = {
            self._manifest_key(e["kernel"], e["spec"], e["target"], e.get("config")):
                (self.prebuilt_dir / e["file"], e.get("sha256"))
            for e in (read_manifest(self.prebuilt_dir) if self.prebuilt_dir else [])
        }  # fmt: skip
        self._loaded: dict[str, CompiledKernel] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _manifest_key(kernel: str, spec: dict, target: str, config: dict | None) -> str:
        return json.dumps([kernel, spec, target, config], sort_keys=True)

    def function(self, kernel: str, spec: KernelSpec, device: torch.device, config: dict | None = None):
        """The loaded ``kernel`` for ``spec`` on ``device``'s target, scheduled with ``config`` (None: the
        default schedule)."""
        key = kernel_key(kernel, spec, target_id(device), config)
        loaded = self._loaded.get(key)
        if loaded is None:
            with self._lock:
                loaded = self._loaded.get(key)
                if loaded is None:
                    entry = kernels.get(kernel)
                    load_tvm_runtime(device_kind(device))
                    module = tvm_ffi.load_module(str(self._module_path(key, kernel, spec, device, config)))
                    loaded = CompiledKernel(entry, spec, config, module[entry.symbol])
                    self._loaded[key] = loaded
        return loaded

    def prebuilt(self, kernel: str, spec: KernelSpec, target: str, config: dict | None = None) -> Path | None:
        """The prebuilt module of ``kernel`` for ``spec``, ``target`` and ``config``, if the manifest lists one;
        RuntimeError naming it where it does not match the digest the manifest records."""
        path, digest = self._prebuilt.get(self._manifest_key(kernel, spec.as_dict(), target, config), (None, None))
        if path is not None and digest is not None and not kernel_cache.intact(path, digest):
            raise RuntimeError(f"prebuilt kernel {path} does not match its digest in {self.prebuilt_dir / MANIFEST}: "
                               "it is damaged; copy or build it again")  # fmt: skip
        return path

    def _module_path(self, key, kernel, spec, device, config) -> Path:
        """The module to load: prebuilt, else cached and intact (``kernel_cache``), else built now."""
        prebuilt = self.prebuilt(kernel, spec, target_id(device), config)
        if prebuilt is not None:
            return prebuilt
        path = self.cache_dir / f"{key}.so"
        if kernel_cache.intact(path):
            return path
        if not self.build_allowed:
            found = (f"{path} does not match its digest ({kernel_cache.digest_path(path)}): it is damaged"
                     if path.exists() else f"it is not built (looked in {self.prebuilt_dir} and {self.cache_dir})")  # fmt: skip
            raise RuntimeError(
                f"kernel {kernel} for {spec} on {target_id(device)} (config {config}): {found}, and this library may "
                "not compile it (BLA_TVM_NO_BUILD=1)"
            )
        from . import build  # imports tvm

        build.build_to_path(kernel, spec, device_kind(device), target_id(device), config, path)
        return path


_LIBRARIES: dict[tuple, KernelLibrary] = {}
_LIBRARIES_LOCK = threading.Lock()
#: the library of each environment snapshot (``env.snapshot``)
_CONFIGURED: dict[tuple, KernelLibrary] = {}


def default_library(environment: tuple | None = None) -> KernelLibrary:
    """The library the environment configures (``bla_tvm.env``; ``environment``: its ``env.snapshot()``, if the
    caller took one), one per configuration (thread safe: threads share it, hence its lock against building a
    kernel twice)."""
    environment = env.snapshot() if environment is None else environment
    configured = _CONFIGURED.get(environment)  # building the paths costs more than a call's launches
    if configured is not None:
        return configured
    key = (env.prebuilt_dir(), env.cache_dir(), env.build_allowed())
    with _LIBRARIES_LOCK:
        if key not in _LIBRARIES:
            _LIBRARIES[key] = KernelLibrary(*key)
        _CONFIGURED[environment] = _LIBRARIES[key]
        return _LIBRARIES[key]


# --- launching -----------------------------------------------------------------------------------------------

#: compiled kernels assume their tensors' data is aligned to this many bytes (TVM's default buffer
#: data_alignment) and do not check it: an unaligned vector load segfaults.
KERNEL_ALIGNMENT = 64


def kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous and aligned (no copy), else a contiguous, aligned copy."""
    x = x.contiguous()
    if x.data_ptr() % KERNEL_ALIGNMENT:
        x = x.clone()
    return x


@functools.lru_cache(maxsize=None)
def _ffi_cuda_device(index: int) -> tvm_ffi.Device:
    return tvm_ffi.device("cuda", index)


#: torch's C accessor of the current stream's raw handle (CUDA builds; the one Triton's launcher calls)
_current_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def current_stream_handle(device: torch.device) -> int:
    """The cudaStream_t of torch's current stream on ``device`` (an indexed CUDA device), through the C accessor
    where the build has it (no Stream object built per launch), else ``torch.cuda.current_stream``."""
    if _current_raw_stream is not None:
        return _current_raw_stream(device.index)
    return torch.cuda.current_stream(device).cuda_stream


def call(function, args: tuple, device: torch.device | None = None) -> None:
    """Run ``function(*args)``; on a CUDA ``device`` (default: the first argument's, a torch tensor), on torch's
    current stream of that device (also while a CUDA graph is being captured: the capture's stream)."""
    device = args[0].device if device is None else device
    if device.type == "cuda":
        stream = current_stream_handle(device)
        with tvm_ffi.use_raw_stream(_ffi_cuda_device(device.index), stream):
            function(*args)
    else:
        function(*args)


@dataclass(frozen=True)
class Launch:
    """One recorded launch: the kernel and its arguments, in the kernel's order."""

    kernel: CompiledKernel
    args: tuple


_RECORDERS: contextvars.ContextVar[tuple[list, ...]] = contextvars.ContextVar("bla_tvm_recorders", default=())


def launch(compiled: CompiledKernel, shared: Mapping[str, torch.Tensor] = {}, **tensors) -> None:  # noqa: B006
    """Launch ``compiled`` with its arguments by name (``kernels.TABLE``): each taken from ``tensors``, else from
    ``shared`` (what several kernels of a call read: device constants, layout tables, inputs; a kernel takes the
    names it has). A keyword that is not an argument of the kernel, or an argument given by neither, is a
    TypeError."""
    entry = compiled.kernel
    unknown = set(tensors) - set(entry.args)
    if unknown:
        raise TypeError(f"{entry.name} takes no argument {sorted(unknown)}; its arguments are {entry.args}")
    try:
        args = tuple(tensors[name] if name in tensors else shared[name] for name in entry.args)
    except KeyError as missing:
        raise TypeError(f"{entry.name}: argument {missing} is missing; its arguments are {entry.args}") from None
    for recorder in _RECORDERS.get():
        recorder.append(Launch(compiled, args))
    try:
        call(compiled.function, args)
    except Exception as error:
        explained = shared_memory_refused(error, compiled, args[0].device)
        if explained is None:
            raise
        raise explained from error


#: what TVM's CUDA runtime says when a kernel asks for more dynamic shared memory than the GPU lets a block have
SHARED_MEMORY_REFUSED = "Failed to set the allowed dynamic shared memory size"


def shared_memory_refused(error: Exception, compiled: CompiledKernel, device: torch.device) -> RuntimeError | None:
    """The error to raise in place of ``error`` where the GPU refused ``compiled``'s shared memory (a kernel of a
    layer too large for it: ``README.md``, "Which GPUs"), naming the kernel, its spec and the GPU's limit; None
    for any other error."""
    if device.type != "cuda" or SHARED_MEMORY_REFUSED not in str(error):
        return None
    arch = device_arch(device)
    said = next((line.strip() for line in str(error).splitlines() if SHARED_MEMORY_REFUSED in line), "")
    return RuntimeError(
        f"kernel {compiled.kernel.name} for {compiled.spec} needs more shared memory per thread block than this GPU "
        f"({arch.name}) allows, {arch.shared_memory} bytes (TVM: {said}). A layer with a smaller resolution, head "
        "dims or chunk length fits; on sm_80 and newer the tile programs run 16-bit layers in less shared memory"
    )


@dataclass(frozen=True)
class BoundLaunch:
    """A recorded launch (``Launch``) with the arguments that stay the same from call to call bound: converted
    to tvm_ffi tensors once (a torch tensor is converted at every call, ~0.25 us each on the H200's host), the
    others taken by name at each call (``per_call``: (position, argument name)). The bound tensors are kept
    alive by it."""

    compiled: CompiledKernel
    fixed: tuple  # torch tensors in the kernel's order; None at the per-call positions
    converted: tuple  # the same as tvm_ffi tensors
    per_call: tuple[tuple[int, str], ...]

    @classmethod
    def bind(cls, launch: Launch, per_call_names) -> "BoundLaunch":
        """``launch`` with every argument but those named in ``per_call_names`` bound."""
        names = launch.kernel.kernel.args
        per_call = tuple((i, name) for i, name in enumerate(names) if name in per_call_names)
        fixed = tuple(None if name in per_call_names else x for name, x in zip(names, launch.args))
        converted = tuple(None if x is None else tvm_ffi.from_dlpack(x) for x in fixed)
        return cls(launch.kernel, fixed, converted, per_call)

    def __call__(self, tensors: Mapping[str, torch.Tensor], device: torch.device) -> None:
        """Launch on ``device`` with the per-call arguments from ``tensors`` (by name; contiguous, aligned)."""
        passed = list(self.converted)
        for i, name in self.per_call:
            passed[i] = tensors[name]
        recorders = _RECORDERS.get()
        if recorders:
            args = list(self.fixed)
            for i, name in self.per_call:
                args[i] = tensors[name]
            for recorder in recorders:
                recorder.append(Launch(self.compiled, tuple(args)))
        call(self.compiled.function, tuple(passed), device)


@contextlib.contextmanager
def record_launches():
    """Within the block, every ``launch`` (in this thread or task) is appended, as a ``Launch``, to the list
    this yields, in launch order."""
    launches: list[Launch] = []
    token = _RECORDERS.set((*_RECORDERS.get(), launches))
    try:
        yield launches
    finally:
        _RECORDERS.reset(token)
