"""The build layer (imports tvm): compute + schedule + target -> an exported kernel module on disk.

Which code compiles kernel X for a spec, device kind and CUDA arch is one lookup, ``builder``: the builders
registered for (X, device kind) whose predicate accepts the spec and arch, newest first, else
``scheduled_module`` (the TE / TVMScript compute of ``bla_tvm.compute`` scheduled by the rules of
``bla_tvm.schedules``). An alternative implementation of a kernel takes the same named arguments
(``kernels.TABLE``) and is one ``register_builder`` call.

Safe under concurrency: a build holds the lock of its path and writes the module with its digest through
``kernel_cache``, so a reader never sees half a module and two processes never compile the same key twice.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from .cuda_toolchain import prepare_cuda_compiler

prepare_cuda_compiler()  # before tvm loads its CUDA runtime

import tvm  # noqa: E402

from . import compute, kernel_cache, kernels  # noqa: E402
from .cuda_arch import DEFAULT_ARCH, arch_named  # noqa: E402
from .layer import KernelSpec  # noqa: E402

#: builder(kernel, spec, device_kind, config) -> the IRModule to compile (``config``: the schedule's config
#: object, None for the default), and the keyword arguments of ``tvm.compile`` it needs (``pass_config``, if
#: given, is the PassContext configuration the compile runs under)
Builder = Callable[..., tuple]
#: applies(spec, arch) -> whether a registered builder compiles ``spec`` for the CUDA ``arch`` ('sm_90'; None on
#: the CPU)
Applies = Callable[[KernelSpec, "str | None"], bool]
_BUILDERS: dict[tuple[str, str], list[tuple[Applies, Builder]]] = {}


def target_for(device_kind: str, arch: str | None = None) -> tvm.target.Target:
    """The TVM target for a device kind: the host CPU through LLVM, or CUDA for ``arch`` (e.g. 'sm_90')."""
    if device_kind == "cpu":
        cpu = tvm.target.codegen.llvm_get_system_cpu()
        return tvm.target.Target({"kind": "llvm", "mcpu": cpu, "num-cores": os.cpu_count() or 1})
    if device_kind == "cuda":
        if arch is None:
            raise ValueError("arch must name the CUDA architecture (e.g. 'sm_90') for device_kind 'cuda'")
        return tvm.target.Target({"kind": "cuda", "arch": arch}, host={"kind": "llvm"})
    raise ValueError(f"device_kind must be 'cpu' or 'cuda', got {device_kind!r}")


def scheduled_module(kernel: str, spec: KernelSpec, device_kind: str, config=None) -> tuple:
    """The default builder: ``compute.prim_func`` scheduled by ``schedules.schedule``; compiled with TVM's
    default pipeline."""
    from bla_tvm import schedules

    return schedules.schedule(kernel, compute.prim_func(kernel, spec, device_kind), spec, device_kind, config), {}


def register_builder(kernel: str, device_kind: str, applies: Applies, builder: Builder) -> None:
    """Let ``builder`` compile ``kernel`` on ``device_kind`` for the specs and archs ``applies`` accepts (before
    any builder registered earlier), e.g. ``register_builder("chunk_output", "cuda", lambda spec, arch: spec.dtype
    in ("float16", "bfloat16"), tile_chunk_output)``."""
    kernels.get(kernel)
    _BUILDERS.setdefault((kernel, device_kind), []).insert(0, (applies, builder))


def _tile_options() -> dict:
    """How a tile program compiles: the tirx pipeline, every loop over register arrays unrolled (an array
    indexed at run time would live in local memory)."""
    return {"tir_pipeline": "tirx", "pass_config": {"tirx.UnrollLoop": {"auto_max_step": 512, "explicit_unroll": True}}}


def tile_program_module(kernel: str, spec: KernelSpec, device_kind: str, config=None) -> tuple:
    """The builder of the tile programs (``schedules/cuda_tile_forward.py``, ``cuda_tile_scan.py``,
    ``cuda_tile_backward.py``, ``cuda_tile_scan_reverse.py``): TVMScript TIRx."""
    from bla_tvm.schedules import cuda_tile_backward, cuda_tile_forward, cuda_tile_scan, cuda_tile_scan_reverse

    if device_kind != "cuda":
        raise ValueError(f"{kernel} is a CUDA tile program; device_kind must be 'cuda', got {device_kind!r}")
    programs = {
        "chunk_output_tile": cuda_tile_forward.chunk_output_tile,
        "state_scan_tile": cuda_tile_scan.state_scan_tile,
        "chunk_backward_tile": cuda_tile_backward.chunk_backward_tile,
        "state_scan_reverse_tile": cuda_tile_scan_reverse.state_scan_reverse_tile,
    }
    func = programs[kernel](spec)
    return tvm.IRModule({kernels.get(kernel).symbol: func}), _tile_options()


def tile_decode_module(kernel: str, spec: KernelSpec, device_kind: str, config=None) -> tuple:
    """The builder of the CUDA decode step as a tile program (``schedules/cuda_tile_decode.py``), for each
    stored state dtype; ``config``: a ``DecodeTileConfig`` (anything else: the state dtype's default)."""
    from bla_tvm.schedules import cuda_tile_decode

    if device_kind != "cuda":
        raise ValueError(f"{kernel} is a CUDA tile program; device_kind must be 'cuda', got {device_kind!r}")
    state_dtype = kernels.DECODE_STATE_DTYPES[kernel]
    if not isinstance(config, cuda_tile_decode.DecodeTileConfig):
        config = cuda_tile_decode.default_config(spec, state_dtype)
    symbol = kernels.get(kernel).symbol
    func = cuda_tile_decode.decode_step_tile(spec, state_dtype, config)
    return tvm.IRModule({symbol: func.with_attr("global_symbol", symbol)}), _tile_options()


def _decode_tile_serves(state_dtype: str | None) -> Applies:
    """Where the tile decode step builds: sm_80 and newer (``arch`` None: ``cuda_arch.DEFAULT_ARCH``), its shared
    pool within what a block may opt in to there; elsewhere the TE schedule (``schedules/cuda_decode.py``)."""

    def serves(spec: KernelSpec, arch: str | None) -> bool:
        from bla_tvm.schedules.cuda_tile_decode import decode_tile_serves

        target = arch_named(arch or DEFAULT_ARCH)
        return target.runs_tile_programs and decode_tile_serves(spec, state_dtype, shared_memory=target.shared_memory)

    return serves


def builder(kernel: str, spec: KernelSpec, device_kind: str, arch: str | None = None) -> Builder:
    """The builder that compiles ``kernel`` for ``spec`` on ``device_kind`` (CUDA: for ``arch``, default
    ``cuda_arch.DEFAULT_ARCH``; see the module docstring)."""
    for applies, registered in _BUILDERS.get((kernel, device_kind), ()):
        if applies(spec, arch):
            return registered
    return scheduled_module


def config_object(device_kind: str, config):
    """A schedule config as its dataclass (None: the default), from a dict such as a tuning log holds."""
    from bla_tvm import schedules

    default = schedules.default_config(device_kind)
    if config is None or not isinstance(config, dict):
        return default if config is None else config
    return type(default)(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})


def compile_kernel(kernel: str, spec: KernelSpec, device_kind: str, arch: str | None = None, config=None):
    """Compile one kernel; returns the runtime module (not yet exported)."""
    target = target_for(device_kind, arch)
    build_module = builder(kernel, spec, device_kind, arch)
    mod, options = build_module(kernel, spec, device_kind, config_object(device_kind, config))
    pass_config = options.pop("pass_config", {})
    with target, tvm.transform.PassContext(config=pass_config):
        return tvm.compile(mod, target=target, **options)


def cuda_shared_memory(spec: KernelSpec, arch: str, names=("chunk_output", "chunk_backward"), config=None) -> int:
    """Bytes of dynamic shared memory a block of the kernels ``names`` (scheduled with ``config``) uses at most,
    read off the lowered kernels."""
    target = target_for("cuda", arch)
    lower = tvm.s_tir.pipeline.default_s_tir_pipeline()[0]
    largest = 0
    for kernel in names:
        mod, _ = builder(kernel, spec, "cuda", arch)(kernel, spec, "cuda", config_object("cuda", config))
        with target:
            mod = lower(tvm.tirx.transform.BindTarget(target)(mod))
        for scopes in tvm.s_tir.analysis.calculate_allocated_bytes(mod).values():
            largest = max(largest, int(scopes.get("shared.dyn", 0)))
    return largest


def ptxas_report(module, arch: str) -> dict:
    """Registers, spills and stack frame of a compiled CUDA module's kernels, from ``ptxas -v`` on its source
    (TVM's nvcc call drops the report). Any spill or stack frame means arrays went to local memory."""
    from .cuda_toolchain import find_cuda_home

    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.cu"
        source.write_text(module.mod.imports[0].inspect_source())
        nvcc = Path(find_cuda_home()) / "bin" / "nvcc"
        result = subprocess.run(
            [str(nvcc), f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-w", str(source), "-o", str(source) + ".cubin"],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    return parse_ptxas(result.stderr)


def parse_ptxas(text: str) -> dict:
    """Registers, stack frame and spills (the largest over the kernels) from ptxas's -v report."""
    numbers = {
        "registers": r"Used (\d+) registers",
        "stack_frame": r"(\d+) bytes stack frame",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
    }
    return {key: max(map(int, re.findall(pattern, text)), default=0) for key, pattern in numbers.items()}


def build_to_path(
    kernel: str, spec: KernelSpec, device_kind: str, target_id: str, config: dict | None, path: Path
) -> Path:
    """Compile ``kernel`` and export it to ``path`` with its digest (``kernel_cache``), unless another builder got
    there first; a module at ``path`` that does not match its digest is replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with kernel_cache.locked(path):
        if not kernel_cache.intact(path):
            arch = target_id if device_kind == "cuda" else None
            kernel_cache.write_module(path, compile_kernel(kernel, spec, device_kind, arch, config).export_library)
    return path


# the tile programs: built wherever asked (``dispatch`` asks for them only where they run, ``tile_programs_fit``)
for _tile in ("chunk_output_tile", "state_scan_tile", "chunk_backward_tile", "state_scan_reverse_tile"):
    register_builder(_tile, "cuda", lambda spec, arch: True, tile_program_module)
for _decode, _state in kernels.DECODE_STATE_DTYPES.items():  # every stored state dtype's step
    register_builder(_decode, "cuda", _decode_tile_serves(_state), tile_decode_module)
