"""CUDA kernels build for sm_90 on a machine with nvcc and no GPU, as CI does, into sound machine code: no
spills, no unguarded register write-backs, tensor cores (WMMA, ``mma.sync`` in the PTX) in fp16/bf16 kernels.

Each build runs in a subprocess: without a driver, the stand-in libcuda must be loaded before tvm is imported.
"""

import json
import re
import subprocess
import sys

import pytest

from bla_tvm.cuda_toolchain import find_cuda_home
from bla_tvm.kernels import BACKWARD, FORWARD

pytestmark = pytest.mark.skipif(find_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")

SPILL_ALLOWANCE = 128  # bytes per thread

BUILD_AND_REPORT = """
import json, sys
from bla_tvm import build
from bla_tvm.kernels import BACKWARD, FORWARD
from bla_tvm.layer import KernelSpec
spec = KernelSpec(**json.loads(sys.argv[1]))
out = {}
for kernel in FORWARD + BACKWARD:
    module = build.compile_kernel(kernel, spec, "cuda", "sm_90")
    module.export_library(sys.argv[2] + f"/{kernel}.so")
    out[kernel] = build.ptxas_report(module, "sm_90")
    out[kernel]["wmma"] = module.mod.imports[0].inspect_source().count("wmma::mma_sync") if module.mod.imports else 0
out["shared_memory"] = build.cuda_shared_memory(spec, "sm_90")
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "spec",
    [
        dict(window=512, resolution=63, num_slots=63, chunk_size=32, head_k=64, head_v=64, dtype="bfloat16"),
        dict(window=512, resolution=63, num_slots=512, chunk_size=16, head_k=64, head_v=64, dtype="float32"),
        dict(window=16, resolution=16, num_slots=16, chunk_size=64, head_k=40, head_v=72, dtype="float16"),
        dict(window=33, resolution=33, num_slots=33, chunk_size=32, head_k=16, head_v=72, dtype="float32"),
    ],
    ids=["bench-bf16", "fine-slots-fp32", "swa-fp16", "odd-sizes-fp32"],
)
def test_cuda_kernels_build_into_sound_machine_code(spec, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_REPORT, json.dumps(spec), str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel in FORWARD + BACKWARD:
        binary = (tmp_path / f"{kernel}.so").read_bytes()
        assert b"sm_90" in binary, f"{kernel}: no sm_90 machine code embedded (CUDA source kept instead?)"
        # A schedule that maps a per-thread cache wrongly compiles into kilobytes of per-thread stack (a wrong
        # kernel); a few spilled registers (seen: 24-88 bytes on odd sizes) only cost speed.
        assert report[kernel]["stack_frame"] <= SPILL_ALLOWANCE, f"{kernel}: {report[kernel]}"
        assert report[kernel]["spill_stores"] <= SPILL_ALLOWANCE, f"{kernel}: {report[kernel]}"
        assert 0 < report[kernel]["registers"] <= 255
    assert 0 < report["shared_memory"] <= 232448
    # fp16/bf16 kernels run their big per-chunk products on the tensor cores; fp32 kernels stay SIMT
    tensor_cores = spec["dtype"] in ("float16", "bfloat16")
    for kernel in ("chunk_output", "chunk_backward"):
        assert (report[kernel]["wmma"] > 0) == tensor_cores, f"{kernel}: {report[kernel]}"


TENSOR_CORE_SOURCES = """
import json, pathlib, subprocess, sys, tempfile
from bla_tvm import build
from bla_tvm.cuda_toolchain import find_cuda_home
from bla_tvm.layer import KernelSpec
spec = KernelSpec(**json.loads(sys.argv[1]))
out = {}
for kernel in ("chunk_output", "chunk_backward"):
    source = build.compile_kernel(kernel, spec, "cuda", "sm_90").mod.imports[0].inspect_source()
    folder = pathlib.Path(tempfile.mkdtemp())
    (folder / "k.cu").write_text(source)
    nvcc = str(pathlib.Path(find_cuda_home()) / "bin" / "nvcc")
    subprocess.run([nvcc, "-arch=sm_90", "-ptx", "-w", str(folder / "k.cu"), "-o", str(folder / "k.ptx")], check=True)
    out[kernel] = {"source": source, "ptx_mma": (folder / "k.ptx").read_text().count("mma.sync")}
print(json.dumps(out))
"""

FRAGMENT_ACCESS = re.compile(r"wmma::(?:load|store)_matrix_sync\((.*)\);")
SHARED_ADDRESS = re.compile(r"&\(\(\((half|float)\*\)buf_dyn_shmem_ptr\)\[([^\[\]]*)\]\)")
LEADING_DIMENSION = re.compile(r", (\d+)(?:$|, nvcuda::wmma::mem_)")


def misaligned_fragment_accesses(source: str) -> list[str]:
    """WMMA loads and stores whose shared-memory address is not provably 32-byte aligned (16 halves, 8 floats):
    every literal term of the index must be a multiple of that (operands of shifts, masks, divisions and
    remainders aside), and the leading dimension a multiple of 16 bytes."""
    bad = []
    for line in source.splitlines():
        access = FRAGMENT_ACCESS.search(line)
        if not access:
            continue
        address, ldm = SHARED_ADDRESS.search(access.group(1)), LEADING_DIMENSION.search(access.group(1))
        if address is None or ldm is None:
            bad.append(line.strip())
            continue
        unit = 16 if address.group(1) == "half" else 8
        index = re.sub(r"(>>|<<|&|/|%)\s*\d+", "", address.group(2).replace("(int)", ""))
        literals = [int(x) for x in re.findall(r"\b\d+\b", index)]
        if any(x % unit for x in literals) or int(ldm.group(1)) % (unit // 2):
            bad.append(line.strip())
    return bad


def test_tensor_cores_in_the_bf16_kernels_of_the_benchmark_shape():
    """The forward's products (kv_eff, qx, scores, w, g, o) and the backward's run on mma.sync at the shape of
    record, with every fragment access 32-byte aligned in shared memory."""
    spec = dict(window=512, resolution=63, num_slots=63, chunk_size=64, head_k=64, head_v=64, dtype="bfloat16")
    result = subprocess.run(
        [sys.executable, "-c", TENSOR_CORE_SOURCES, json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["chunk_output"]["ptx_mma"] >= 6, "chunk_output: its six einsum products should be on mma.sync"
    assert report["chunk_backward"]["ptx_mma"] >= 6
    for kernel, entry in report.items():
        assert entry["source"].count("wmma::mma_sync") >= 6, kernel
        assert misaligned_fragment_accesses(entry["source"]) == [], kernel


def test_the_alignment_check_flags_an_odd_offset():
    good = (
        "nvcuda::wmma::load_matrix_sync(a_ptr[0], (half*)(((half*)buf_dyn_shmem_ptr)[((x * 2048) + 128)], "
        "(&(((half*)buf_dyn_shmem_ptr)[(((x * 2048) + ((((int)threadIdx.y) >> 2) * 16)) + 128)]))), 128);"
    )
    store = (
        "nvcuda::wmma::store_matrix_sync((float*)(((float*)buf_dyn_shmem_ptr)[(x * 1024)], "
        "(&(((float*)buf_dyn_shmem_ptr)[((x * 1024) + 64)]))), c_ptr[0], 64, nvcuda::wmma::mem_row_major);"
    )
    assert misaligned_fragment_accesses(good + "\n" + store) == []
    assert misaligned_fragment_accesses(good.replace("+ 128)]))", "+ 136)]))")) != []
    assert misaligned_fragment_accesses(good.replace("128);", "100);")) != []
    assert misaligned_fragment_accesses(store.replace("+ 64)", "+ 68)")) != []


GUARD_CHECK = """
import json, sys
import tvm
from tvm import te
from bla_tvm import compute
from bla_tvm.layer import KernelSpec
from bla_tvm.schedules import schedule
from bla_tvm.schedules.common import unguarded_write_backs
from bla_tvm.schedules.cuda import CudaConfig, _tile_over_threads
out = {}
for fields in json.loads(sys.argv[1]):
    spec = KernelSpec(**fields)
    for kernel in ("chunk_state", "chunk_output", "chunk_backward"):
        mod = schedule(kernel, compute.prim_func(kernel, spec, "cuda"), spec, "cuda", CudaConfig(tensor_cores=False))
        (func,) = mod.functions.values()
        out[spec.tag() + " " + kernel] = unguarded_write_backs(func)
# the pattern that raced on the H200 (chunk_state at N = 33): 4 x 4 register tiles of a [33, 88] product
# written straight into the kernel's output
import bla_tvm.schedules.cuda as cuda
cuda._tile_shape = lambda rows, cols, threads, tile: tile
A = te.placeholder((33, 32), name="A")
B = te.placeholder((32, 88), name="B")
k = te.reduce_axis((0, 32), name="k")
C = te.compute((33, 88), lambda i, j: te.sum(A[i, k] * B[k, j], axis=k), name="C")
sch = tvm.s_tir.Schedule(te.create_prim_func([A, B, C]))
_tile_over_threads(sch, sch.get_sblock("C"), 256, (4, 4))
out["raw write-back"] = unguarded_write_backs(sch.mod["main"])
print(json.dumps(out))
"""


def test_register_write_backs_keep_their_bound_checks():
    """Partial register tiles (extents 33, 63, 127 against 4 x 4 tiles) are written back only under a bound
    check; the checker itself flags the unguarded write-back that TVM 0.27 makes into a kernel output."""
    specs = [
        dict(window=33, resolution=33, num_slots=33, chunk_size=32, head_k=16, head_v=72, dtype="float32"),
        dict(window=512, resolution=63, num_slots=63, chunk_size=64, head_k=64, head_v=64, dtype="float32"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", GUARD_CHECK, json.dumps(specs)], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report.pop("raw write-back"), "the checker missed a write-back past a 33-long output"
    assert all(found == [] for found in report.values()), report


BUILD_GPU_TEST_LAYER = """
import json, sys
from pathlib import Path
from bla_tvm.cli import build_kernels
from bla_tvm.testing import GPU_TEST_LAYERS, gpu_test_kernels
layer = GPU_TEST_LAYERS[int(sys.argv[1])]
specs = [(spec, names) for spec, names in gpu_test_kernels() if spec.layer == layer]
entries = build_kernels(specs, "cuda", "sm_90", Path(sys.argv[2]), jobs=2)
print(json.dumps({"wanted": [[n, spec.as_dict()] for spec, names in specs for n in names],
                  "built": [[e["kernel"], e["spec"]] for e in entries]}))
"""


@pytest.mark.parametrize("index", range(7), ids=lambda i: f"layer{i}")
def test_gpu_test_kernels_build(index, tmp_path):
    """The kernels tests/test_gpu.py loads on the GPU (``bla-tvm build --gpu-test-layers``, here one layer at a
    time) compile for sm_90, each into a module with machine code, listed in the manifest the GPU machine reads."""
    from bla_tvm.testing import GPU_TEST_LAYERS

    assert len(GPU_TEST_LAYERS) == 7, "parametrize this test over every GPU test layer"
    result = subprocess.run(
        [sys.executable, "-c", BUILD_GPU_TEST_LAYER, str(index), str(tmp_path)], capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert sorted(map(json.dumps, report["built"])) == sorted(map(json.dumps, report["wanted"]))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert len(manifest["kernels"]) == len(report["wanted"])
    for entry in manifest["kernels"]:
        assert entry["target"] == "sm_90" and entry["config"] is None
        assert b"sm_90" in (tmp_path / entry["file"]).read_bytes(), entry["file"]
