"""Compiling CUDA kernels where there is nvcc but no NVIDIA driver (this project's CI and build machines).

TVM keeps CUDA *source* in a module unless its CUDA runtime library loads, and that needs ``libcuda.so.1``.
``prepare_cuda_compiler`` (called before ``import tvm``) points TVM at nvcc and, when no driver is installed,
loads a stand-in libcuda whose every entry point reports "no device": kernels are then compiled to cubins and
embedded in the exported module. The stand-in is only ever loaded in a build process.
"""

from __future__ import annotations

import ctypes
import glob
import os
import shutil
import subprocess
import sys

from . import env

#: driver entry points that TVM's CUDA runtime (libtvm_runtime_cuda.so, apache-tvm 0.27) links against
DRIVER_SYMBOLS = (
    "cuDeviceGetName",
    "cuFuncSetAttribute",
    "cuGetErrorName",
    "cuGetErrorString",
    "cuLaunchKernelEx",
    "cuModuleGetFunction",
    "cuModuleLoadData",
    "cuModuleUnload",
    "cuTensorMapEncodeTiled",
)
CUDA_ERROR_NO_DEVICE = 100


def find_cuda_home() -> str | None:
    if os.environ.get("CUDA_PATH"):
        return os.environ["CUDA_PATH"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    candidates = sorted(glob.glob("/usr/local/cuda*/bin/nvcc"))
    return os.path.dirname(os.path.dirname(candidates[-1])) if candidates else None


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
        return True
    except OSError:
        return False


def _build_stub() -> str:
    folder = env.cache_dir() / "cuda_driver_stub"
    library = folder / "libcuda.so.1"
    if not library.exists():
        folder.mkdir(parents=True, exist_ok=True)
        source = folder / "stub.c"
        source.write_text(
            "/* stand-in libcuda.so.1 for building without a driver: every call reports no device */\n"
            + "".join(f"int {name}(void) {{ return {CUDA_ERROR_NO_DEVICE}; }}\n" for name in DRIVER_SYMBOLS)
        )
        staging = folder / f"libcuda.so.1.{os.getpid()}"
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(staging), str(source)], check=True
        )
        os.replace(staging, library)
    return str(library)


def prepare_cuda_compiler() -> None:
    """Make ``tvm.compile`` produce CUDA binaries with nvcc; a no-op where there is no CUDA toolkit."""
    cuda_home = find_cuda_home()
    if cuda_home is None:
        return
    os.environ.setdefault("CUDA_PATH", cuda_home)
    os.environ.setdefault("TVM_CUDA_COMPILE_MODE", "nvcc")
    if _driver_loads():
        return
    if "tvm" in sys.modules:
        raise RuntimeError("prepare_cuda_compiler must run before tvm is imported (no NVIDIA driver here)")
    ctypes.CDLL(_build_stub(), mode=ctypes.RTLD_GLOBAL)


def prepare_before_tvm_loads() -> None:
    """``prepare_cuda_compiler`` if tvm is not loaded yet (what a package that imports tvm, such as the schedules
    or the compute, runs first); else nothing: tvm was loaded by its importer, and the build layer, which
    compiles, checks then."""
    if "tvm" not in sys.modules:
        prepare_cuda_compiler()
