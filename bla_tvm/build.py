"""The build layer (imports tvm): compute + schedule + target -> an exported kernel module on disk.

Safe under concurrency: a build holds an exclusive file lock on ``<path>.lock``, writes to a temporary file in
the same folder and renames it into place, so a reader never sees half a module and two processes never
compile the same key twice.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import tempfile
from pathlib import Path

from .cuda_toolchain import prepare_cuda_compiler

prepare_cuda_compiler()  # before tvm loads its CUDA runtime

import tvm  # noqa: E402

from . import compute  # noqa: E402
from .spec import KernelSpec  # noqa: E402


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


def compile_kernel(kernel: str, spec: KernelSpec, device_kind: str, arch: str | None = None, config=None):
    """Compile one kernel; returns the runtime module (not yet exported)."""
    from bla_tvm import schedules

    if isinstance(config, dict):
        config = type(schedules.default_config(device_kind))(**config)
    target = target_for(device_kind, arch)
    mod = schedules.schedule(kernel, compute.prim_func(kernel, spec, device_kind), spec, device_kind, config)
    with target:
        return tvm.compile(mod, target=target)


def cuda_shared_memory(spec: KernelSpec, arch: str, kernels=("chunk_output", "chunk_backward")) -> int:
    """Bytes of dynamic shared memory a block of the per-chunk ``kernels`` uses at most, read off the lowered
    kernels."""
    from bla_tvm import schedules

    target = target_for("cuda", arch)
    lower = tvm.s_tir.pipeline.default_s_tir_pipeline()[0]
    largest = 0
    for kernel in kernels:
        mod = schedules.schedule(kernel, compute.prim_func(kernel, spec, "cuda"), spec, "cuda")
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
    numbers = {
        "registers": r"Used (\d+) registers",
        "stack_frame": r"(\d+) bytes stack frame",
        "spill_stores": r"(\d+) bytes spill stores",
        "spill_loads": r"(\d+) bytes spill loads",
    }
    return {key: max(map(int, re.findall(pattern, result.stderr)), default=0) for key, pattern in numbers.items()}


def build_to_path(
    kernel: str, spec: KernelSpec, device_kind: str, target_id: str, config: dict | None, path: Path
) -> Path:
    """Compile ``kernel`` and export it to ``path`` atomically, unless another builder got there first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return path
        arch = target_id if device_kind == "cuda" else None
        module = compile_kernel(kernel, spec, device_kind, arch, config)
        fd, staging = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            module.export_library(staging)
            os.replace(staging, path)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    return path
