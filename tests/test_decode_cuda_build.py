"""The CUDA decode kernels build for sm_90 on a machine with nvcc and no GPU, as CI does, into sound machine code
(see test_cuda_build.py for the chunked kernels; each build runs in a subprocess for the stand-in libcuda): the
tile program (schedules/cuda_tile_decode.py) where it serves the spec, the TE schedule (cuda_decode.py) beyond."""

import json
import subprocess
import sys

import pytest

from bla_tvm import kernels
from bla_tvm.cuda_toolchain import find_cuda_home
from bla_tvm.kernels import DECODE

pytestmark = pytest.mark.skipif(find_cuda_home() is None, reason="no CUDA toolkit (nvcc) on this machine")

SPILL_ALLOWANCE = 128  # bytes per thread: a few spilled registers cost speed; kilobytes mean a wrong mapping

BUILD_AND_REPORT = """
import json, sys
from bla_tvm import build, kernels
from bla_tvm.layer import KernelSpec
spec = KernelSpec(**json.loads(sys.argv[1]))
out = {}
for kernel in json.loads(sys.argv[3]):
    module = build.compile_kernel(kernel, spec, "cuda", "sm_90")
    module.export_library(sys.argv[2] + f"/{kernel}.so")
    out[kernel] = dict(build.ptxas_report(module, "sm_90"), builder=build.builder(kernel, spec, "cuda").__name__,
                       exported=module.mod.implements_function(kernels.get(kernel).symbol))
print(json.dumps(out))
"""


@pytest.mark.parametrize(
    "spec, kernels, builder",
    [
        (dict(window=512, resolution=63, num_slots=63, head_k=64, head_v=64, dtype="bfloat16"), DECODE,
         {"decode_step": "tile_decode_module", "decode_step_state_float16": "tile_decode_module",
          "decode_step_state_bfloat16": "tile_decode_module"}),
        (dict(window=512, resolution=63, num_slots=512, head_k=64, head_v=64, dtype="float32", group_size=4),
         ("decode_step",), {"decode_step": "scheduled_module"}),
        (dict(window=16, resolution=16, num_slots=16, head_k=40, head_v=130, dtype="float16", group_size=3),
         ("decode_step",), {"decode_step": "tile_decode_module"}),
        (dict(window=33, resolution=9, num_slots=7, head_k=15, head_v=24, dtype="bfloat16"),
         ("decode_step_state_float16",), {"decode_step_state_float16": "scheduled_module"}),
    ],
    ids=["bench-bf16", "fine-slots-gqa-fp32", "swa-odd-dims-fp16", "odd-head-k-fp16-state"],
)  # fmt: skip
def test_cuda_decode_kernels_build_into_sound_machine_code(spec, kernels, builder, tmp_path):
    spec = dict(spec, chunk_size=1)
    result = subprocess.run(
        [sys.executable, "-c", BUILD_AND_REPORT, json.dumps(spec), str(tmp_path), json.dumps(kernels)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for kernel in kernels:
        binary = (tmp_path / f"{kernel}.so").read_bytes()
        assert b"sm_90" in binary, f"{kernel}: no sm_90 machine code embedded (CUDA source kept instead?)"
        assert report[kernel]["stack_frame"] <= SPILL_ALLOWANCE, f"{kernel}: {report[kernel]}"
        assert report[kernel]["spill_stores"] <= SPILL_ALLOWANCE, f"{kernel}: {report[kernel]}"
        assert 0 < report[kernel]["registers"] <= 255
        assert report[kernel]["builder"] == builder[kernel]
        assert report[kernel]["exported"], f"{kernel}: the module does not export {kernels.get(kernel).symbol}"


MIN_BLOCKS_REPORT = """
import json, re, sys
from bla_tvm import build
from bla_tvm.layer import KernelSpec
from bla_tvm.schedules.cuda_tile_decode import DecodeTileConfig
kernel, config = sys.argv[1], json.loads(sys.argv[2])
spec = KernelSpec(512, 63, 63, 64, 64, "bfloat16", 1, chunk_size=1)
module = build.compile_kernel(kernel, spec, "cuda", "sm_90", DecodeTileConfig(**config))
source = module.mod.imports[0].inspect_source()
print(json.dumps(dict(build.ptxas_report(module, "sm_90"), bounds=re.findall(r"__launch_bounds__\\([^)]*\\)", source))))
"""


@pytest.mark.parametrize(
    "kernel, config, spill_allowance",
    [
        ("decode_step", {"warps": 8, "min_blocks_per_sm": 4}, SPILL_ALLOWANCE),
        # the slots' readout in shared memory frees its registers: 4 blocks fit with no spill
        ("decode_step_state_float16", {"blocks": 528, "min_blocks_per_sm": 4, "readout_in_shared": True}, 0),
    ],
)
def test_min_blocks_per_sm_reaches_the_launch_bounds(kernel, config, spill_allowance):
    """DecodeTileConfig.min_blocks_per_sm (``cuda_launch_bounds``) puts its count into the kernel's launch bounds,
    and ptxas then fits 4 blocks of 256 threads per SM (<= 64 registers) with few spills (none with the readout in
    shared memory)."""
    command = [sys.executable, "-c", MIN_BLOCKS_REPORT, kernel, json.dumps(config)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["bounds"] and set(report["bounds"]) == {"__launch_bounds__(256, 4)"}, report
    assert report["registers"] <= 64 and report["spill_stores"] <= spill_allowance, report
    assert report["stack_frame"] <= spill_allowance, report


@pytest.mark.parametrize(
    "shape, kernel, builder",
    [
        ((512, 63, 63, 64, 64), "decode_step", "tile_decode_module"),
        ((512, 511, 63, 64, 64), "decode_step", "scheduled_module"),  # a float32 stage of 262 KB
        ((512, 511, 63, 64, 64), "decode_step_state_float16", "tile_decode_module"),  # 131 KB
        ((512, 255, 63, 128, 128), "decode_step", "scheduled_module"),
        ((33, 9, 7, 15, 24), "decode_step", "tile_decode_module"),  # float32 rows: whole 4-byte copies
        ((33, 9, 7, 15, 24), "decode_step_state_bfloat16", "scheduled_module"),  # 30-byte rows
    ],
)
def test_decode_builder_routing(shape, kernel, builder):
    """The tile decode step builds only what it can launch: its shared pool (the stage of one (b, h)'s state)
    within a block's 227 KB, and 16-bit state rows of whole 4-byte copies; the TE schedule builds the rest."""
    from bla_tvm import build
    from bla_tvm.layer import KernelSpec

    spec = KernelSpec(*shape, dtype="bfloat16", group_size=1, chunk_size=1)
    assert build.builder(kernel, spec, "cuda").__name__ == builder


def test_decode_tile_serves_counts_the_shared_readout():
    """With the slots' readout in shared memory, a large N's pool (the stage and C [rows, M]) passes a block's 227 KB,
    so such a config is refused; the default (C in registers) still serves the spec."""
    from bla_tvm.layer import KernelSpec
    from bla_tvm.schedules.cuda_tile_decode import DecodeTileConfig, decode_tile_serves

    large_n = KernelSpec(512, 511, 63, 64, 64, dtype="bfloat16", group_size=1, chunk_size=1)
    assert decode_tile_serves(large_n, "float16")
    assert not decode_tile_serves(large_n, "float16", DecodeTileConfig(readout_in_shared=True))
    bench = KernelSpec(512, 63, 63, 64, 64, dtype="bfloat16", group_size=1, chunk_size=1)
    four_per_sm = DecodeTileConfig(blocks=528, min_blocks_per_sm=4, readout_in_shared=True)
    assert decode_tile_serves(bench, "float16", four_per_sm)
