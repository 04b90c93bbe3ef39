"""GPUs other than the H200: what each CUDA arch runs. The tile programs need sm_80 (cp.async, mma.sync m16n8k16 on
16-bit operands) and their blocks within the shared memory a block may opt in to there; elsewhere the TE kernels
run, at a chunk length that fits. Checked without a GPU: the dispatch and the build are asked for an arch, and the
kernels an sm_75 GPU runs are compiled for it."""

import pytest
import torch

from bla_tvm import dispatch, kernels
from bla_tvm.cuda_arch import DEFAULT_ARCH, CudaArch, arch_named, device_arch
from bla_tvm.layer import DECODE_CHUNK, KernelSpec, LayerSpec
from bla_tvm.testing import gpu_test_kernels
from bla_tvm.tile_constants import TILE_CHUNK, backward_shared_layout, forward_shared_layout, tile_programs_fit

BENCH = LayerSpec(512, 63, 63, 64, 64, "bfloat16")  # the benchmarks' layer
WIDE = LayerSpec(512, 63, 63, 128, 128, "bfloat16")  # K = V = 128: blocks of 137 KB (forward) and 173 KB (backward)
CUDA = torch.device("cuda")  # only its kind is read where an arch is given
TILE_NAMES = {runs for runs, _ in dispatch.TILE_PROGRAMS.values()}


@pytest.mark.parametrize("name, capability, shared", [
    ("sm_75", (7, 5), 65536), ("sm_80", (8, 0), 166912), ("sm_86", (8, 6), 101376), ("sm_89", (8, 9), 101376),
    ("sm_90", (9, 0), 232448), ("sm_90a", (9, 0), 232448),
    ("sm_103", (10, 3), 232448), ("sm_121", (12, 1), 101376),  # not listed: the newest listed one older than it
])  # fmt: skip
def test_arch_named_gives_the_shared_memory_a_block_may_opt_in_to(name, capability, shared):
    assert arch_named(name) == CudaArch(capability, shared)
    assert arch_named(name).runs_tile_programs == (capability >= (8, 0))


@pytest.mark.parametrize("name, words", [("sm_70", "older than sm_75"), ("90", "CUDA arch name"), (None, "arch")])
def test_arch_named_refuses_what_it_cannot_serve(name, words):
    with pytest.raises(ValueError, match=words):
        arch_named(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU's arch is its own")
def test_a_machine_without_a_gpu_lists_kernels_for_the_default_arch():
    assert device_arch(CUDA) == arch_named(DEFAULT_ARCH)


@pytest.mark.parametrize("layer, fits_on", [
    (BENCH, {"sm_80", "sm_86", "sm_89", "sm_90", "sm_120"}),
    (WIDE, {"sm_90"}),  # the backward's block (173 KB) is past sm_80's 163 KB: all or none, the TE kernels there
])  # fmt: skip
def test_tile_programs_run_only_where_their_blocks_fit(layer, fits_on):
    spec = layer.kernel(TILE_CHUNK)
    for name in ("sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_120"):
        arch = arch_named(name)
        assert tile_programs_fit(spec, arch) == (name in fits_on), name
        for backward in (False, True):
            names = dispatch.phase_kernels(backward, final_state=True)
            runs = set(dispatch.implementations(names, spec, CUDA, arch).values())
            assert bool(runs & TILE_NAMES) == (name in fits_on), (name, backward)
            assert (dispatch.default_chunk_size(CUDA, layer, backward, arch) == TILE_CHUNK) == (name in fits_on)


def test_the_te_chunk_length_fits_the_arch():
    """Where no tile program runs, L is the longest whose blocks' bound fits the arch's shared memory (the
    shortest where none does): shorter on an sm_75 GPU's 64 KB than on the H200's 227 KB."""
    fp32 = LayerSpec(64, 15, 15, 32, 32, "float32")
    chosen = {name: dispatch.default_chunk_size(CUDA, fp32, False, arch_named(name)) for name in ("sm_90", "sm_89",
                                                                                                  "sm_75")}
    assert chosen == {"sm_90": 64, "sm_89": 32, "sm_75": 16}  # bounds 150 KB, 67 KB and 34 KB
    assert dispatch.default_chunk_size(CUDA, BENCH, True, arch_named("sm_75")) == 16


def test_the_gpu_test_kernels_of_an_sm_75_gpu_are_te_kernels():
    on_sm_75 = {name for _, names in gpu_test_kernels("sm_75") for name in names}
    assert on_sm_75 and not on_sm_75 & TILE_NAMES
    assert TILE_NAMES <= {name for _, names in gpu_test_kernels() for name in names}  # the H200's


@pytest.mark.parametrize("layer", [BENCH, WIDE, LayerSpec(512, 127, 127, 64, 64, "float16"),
                                   LayerSpec(64, 15, 20, 16, 48, "bfloat16", 2)])
def test_the_tile_programs_blocks_are_the_layouts_dispatch_counts(layer):
    """tile_programs_fit counts ForwardSharedLayout and BackwardSharedLayout: the pools the compiled programs
    allocate; the scans' pools stay under 48 KB (every arch)."""
    from bla_tvm import build

    spec = layer.kernel(TILE_CHUNK)
    expected = {"chunk_output_tile": forward_shared_layout(spec).bytes,
                "chunk_backward_tile": backward_shared_layout(spec).bytes}  # fmt: skip
    for runs in ("chunk_output_tile", "chunk_backward_tile", "state_scan_tile", "state_scan_reverse_tile"):
        if runs == "chunk_backward_tile" and not dispatch.tile_backward_serves(spec):
            continue
        module, _ = build.builder(runs, spec, "cuda")(runs, spec, "cuda")
        (pools,) = build.tvm.s_tir.analysis.calculate_allocated_bytes(module).values()
        assert int(pools["shared.dyn"]) == expected.get(runs, int(pools["shared.dyn"])), runs
        assert runs in expected or int(pools["shared.dyn"]) < 48 * 1024, runs


def test_decode_builds_the_te_step_below_sm_80_and_where_the_tile_pool_does_not_fit():
    from bla_tvm import build

    bench = BENCH.kernel(DECODE_CHUNK)
    large = LayerSpec(512, 191, 63, 64, 64, "bfloat16").kernel(DECODE_CHUNK)  # fp32 state: a 98-133 KB pool
    for kernel in kernels.DECODE:
        assert build.builder(kernel, bench, "cuda", "sm_75") is build.scheduled_module
        assert build.builder(kernel, bench, "cuda", "sm_80") is build.tile_decode_module
        assert build.builder(kernel, bench, "cuda") is build.tile_decode_module  # no arch: sm_90's
    assert build.builder("decode_step", large, "cuda", "sm_90") is build.tile_decode_module
    assert build.builder("decode_step", large, "cuda", "sm_89") is build.scheduled_module


@pytest.mark.parametrize("kernel, backward", [("decode_step_state_float16", None), ("chunk_output", False),
                                              ("chunk_backward", True)])  # fmt: skip
def test_an_sm_75_gpu_s_kernels_compile_for_it_and_fit_its_shared_memory(kernel, backward):
    """What a T4 runs for a small bf16 layer (the tile programs: ptxas refuses cp.async and the 16-bit mma below
    sm_80), at the chunk length the dispatch picks there, compiled for sm_75 within its 64 KB of shared memory.
    (The benchmarks' layer does not fit there: its TE blocks take 72-149 KB at any L.)"""
    from bla_tvm import build

    small, arch = LayerSpec(64, 15, 15, 32, 32, "bfloat16"), arch_named("sm_75")
    spec = small.kernel(DECODE_CHUNK if backward is None else dispatch.default_chunk_size(CUDA, small, backward, arch))
    assert dispatch.implementation(kernel, spec, CUDA, arch) == kernel
    module = build.compile_kernel(kernel, spec, "cuda", "sm_75")
    assert build.ptxas_report(module, "sm_75")["spill_stores"] == 0
    assert build.cuda_shared_memory(spec, "sm_75", (kernel,)) <= arch.shared_memory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_table_agrees_with_the_gpu():
    """The driver's shared memory for this GPU equals the table's for its arch (what a build without a GPU uses)."""
    properties = torch.cuda.get_device_properties(0)
    assert properties.shared_memory_per_block_optin > 0  # read from the driver, not the table's fallback
    arch = device_arch(torch.device("cuda", 0))
    assert arch == arch_named(arch.name)


def test_a_kernel_past_the_gpus_shared_memory_is_named_with_the_gpus_limit(monkeypatch):
    """TVM's refusal of a block's shared memory becomes an error naming the kernel, its spec and the GPU's limit;
    other errors pass unchanged."""
    from bla_tvm import runtime

    compiled = runtime.CompiledKernel(kernels.get("chunk_backward"), BENCH.kernel(16), None, None)
    refused = RuntimeError("CUDALaunch failed\n  Failed to set the allowed dynamic shared memory size to 125056 with "
                           "error: CUDA_ERROR_INVALID_VALUE")  # fmt: skip
    monkeypatch.setattr(runtime, "device_arch", lambda device: arch_named("sm_75"))
    explained = runtime.shared_memory_refused(refused, compiled, CUDA)
    for words in ("chunk_backward", "chunk_size=16", "sm_75", "65536 bytes", "125056"):
        assert words in str(explained), words
    assert runtime.shared_memory_refused(ValueError("some other failure"), compiled, CUDA) is None
    assert runtime.shared_memory_refused(refused, compiled, torch.device("cpu")) is None

    def launch_fails(function, args, device=None):
        raise refused

    monkeypatch.setattr(runtime, "call", launch_fails)  # launch raises the explained error in place of TVM's
    monkeypatch.setattr(runtime, "shared_memory_refused", lambda error, kernel, device: explained)
    with pytest.raises(RuntimeError, match="needs more shared memory per thread block") as caught:
        runtime.launch(compiled, **{name: torch.zeros(1) for name in compiled.kernel.args})
    assert caught.value.__cause__ is refused
