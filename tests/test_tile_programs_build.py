"""The tile programs (schedules/cuda_tile_*.py) build for sm_90 on a machine with nvcc and no GPU, as CI does,
into tensor-core machine code: mma.sync in the PTX, with no local-memory stack frame and no spills at these
layers. Their numbers are checked on the GPU (tests/test_gpu.py through the ops, benchmarks/*)."""

import json
import subprocess
import sys

import pytest

from bla_tvm.cuda_toolchain import find_cuda_home

pytestmark = pytest.mark.skipif(find_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")

BUILD_AND_REPORT = """
import json, sys
from bla_tvm import build
from bla_tvm.layer import KernelSpec
spec = KernelSpec(**json.loads(sys.argv[1]))
module = build.compile_kernel(sys.argv[3], spec, "cuda", "sm_90")
module.export_library(sys.argv[2] + "/tile.so")
report = build.ptxas_report(module, "sm_90")
report["mma_sync"] = module.mod.imports[0].inspect_source().count("mma.sync.aligned.m16n8k16")
print(json.dumps(report))
"""


BENCH_BF16 = dict(window=512, resolution=63, num_slots=63, chunk_size=64, head_k=64, head_v=64, dtype="bfloat16")
SWA_GQA_FP16 = dict(window=16, resolution=16, num_slots=40, chunk_size=64, head_k=16, head_v=48, dtype="float16",
                    group_size=2)  # fmt: skip


@pytest.mark.parametrize(
    "kernel, spec",
    [
        ("chunk_output_tile", BENCH_BF16), ("chunk_output_tile", SWA_GQA_FP16), ("state_scan_tile", BENCH_BF16),
        ("state_scan_tile", SWA_GQA_FP16), ("chunk_backward_tile", SWA_GQA_FP16),  # the backward takes ~1 min
        ("state_scan_reverse_tile", BENCH_BF16), ("state_scan_reverse_tile", SWA_GQA_FP16),
    ],
    ids=["forward-bench-bf16", "forward-swa-gqa-fp16", "scan-bench-bf16", "scan-swa-gqa-fp16", "backward-swa-gqa-fp16",
         "reverse-scan-bench-bf16", "reverse-scan-swa-gqa-fp16"],
)  # fmt: skip
def test_tile_programs_build_into_tensor_core_code(kernel, spec, tmp_path):
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_REPORT, json.dumps(spec), str(tmp_path), kernel],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert b"sm_90" in (tmp_path / "tile.so").read_bytes(), "no sm_90 machine code embedded"
    assert report["mma_sync"] > 0, report
    # (the backward at the bench's layer, K = V = 64 and N = 63, still spills 60 B: benchmarks/NOTES.md)
    assert report["stack_frame"] == 0 and report["spill_stores"] == 0, report
