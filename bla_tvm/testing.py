"""What the tests and the tuner share: NaN-poisoned allocation (an output element a kernel never writes shows up
as NaN), and the layers of the GPU tests with the kernels they load.

    with poisoned_allocations() as shapes:
        o, _ = blurry_window_attention(q, k, v, 64, 15)
    assert torch.isfinite(o).all()

Imports only torch, tvm_ffi and the package's runtime (never tvm): it runs on the GPU machine.
"""

from __future__ import annotations

import contextlib

import torch

from . import dispatch, kernels
from .cuda_arch import DEFAULT_ARCH, arch_named
from .layer import DECODE_CHUNK, KernelSpec, LayerSpec


@contextlib.contextmanager
def poisoned_allocations():
    """Within it, torch.empty, torch.empty_like and Tensor.new_empty return floating tensors full of NaN (meta
    tensors aside); yields the list of the poisoned allocations' shapes, in allocation order. Not thread safe:
    it replaces the three functions for the whole process while it is open."""
    originals = {"empty": torch.empty, "empty_like": torch.empty_like}
    new_empty = torch.Tensor.new_empty
    own_new_empty = "new_empty" in vars(torch.Tensor)  # else inherited from torch._C.TensorBase
    shapes: list[tuple[int, ...]] = []

    def fill(x):
        if x.dtype.is_floating_point and x.device.type != "meta":
            x.fill_(float("nan"))
            shapes.append(tuple(x.shape))
        return x

    torch.empty = lambda *a, **kw: fill(originals["empty"](*a, **kw))
    torch.empty_like = lambda *a, **kw: fill(originals["empty_like"](*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: fill(new_empty(self, *a, **kw))
    try:
        yield shapes
    finally:
        torch.empty, torch.empty_like = originals["empty"], originals["empty_like"]
        if own_new_empty:
            torch.Tensor.new_empty = new_empty
        else:
            del torch.Tensor.new_empty


# --- the layers of the GPU tests (tests/test_gpu.py) and the kernels they load ------------------------------

#: fp32 and bf16, M > N and M < N, N == W (sliding-window attention), GQA groups of 2 and 4, K != V
GPU_TEST_LAYERS = (
    LayerSpec(64, 15, 20, 32, 48, "float32"),
    LayerSpec(64, 15, 20, 32, 48, "bfloat16"),
    LayerSpec(16, 16, 16, 16, 16, "float32"),
    LayerSpec(33, 9, 7, 16, 24, "bfloat16", 2),
    LayerSpec(100, 31, 31, 64, 64, "float32", 4),
    LayerSpec(64, 15, 15, 8, 24, "bfloat16"),  # 16-bit with K, V not multiples of 16: the TE kernels, no tile scan
    LayerSpec(40, 9, 12, 16, 144, "bfloat16"),  # V > 128: the TE chunk kernels with the tile scans
)
#: the layers the GPU tests also decode with, token by token (fp32, bf16, N == W even, GQA with M < N)
GPU_DECODE_LAYERS = GPU_TEST_LAYERS[:4]
#: the decode benchmark's layer, decoded by a GPU test too: the tile step's 2-column vector accesses and 8 rows a
#: thread, which the small layers above do not reach
DECODE_BENCH_LAYER = LayerSpec(512, 63, 63, 64, 64, "bfloat16")


def gpu_test_kernels(arch: str = DEFAULT_ARCH) -> list[tuple[KernelSpec, tuple[str, ...]]]:
    """Every (spec, kernels) the GPU tests load on a GPU of ``arch`` without tuning logs (``BLA_TVM_NO_TUNING=1``):
    the forward kernels at the inference chunk length, forward and backward at the training one (final-state kernels
    included), and the decode steps of ``GPU_DECODE_LAYERS`` and ``DECODE_BENCH_LAYER`` (every stored state
    dtype). Read by ``bla-tvm build --gpu-test-layers``."""
    wanted = _cuda_kernels(GPU_TEST_LAYERS, arch)
    for layer in (*GPU_DECODE_LAYERS, DECODE_BENCH_LAYER):
        wanted.setdefault(layer.kernel(DECODE_CHUNK), set()).update(kernels.DECODE_STATE_DTYPES)
    return [(spec, tuple(sorted(names))) for spec, names in wanted.items()]


def layer_kernels(layers, arch: str = DEFAULT_ARCH) -> list[tuple[KernelSpec, tuple[str, ...]]]:
    """Every (spec, kernels) a forward and backward of ``layers`` load on a GPU of ``arch`` without tuning logs
    (final-state kernels included): what a benchmark's ``--list-specs`` gives ``bla-tvm build --specs``."""
    return [(spec, tuple(sorted(names))) for spec, names in _cuda_kernels(layers, arch).items()]


def _cuda_kernels(layers, arch: str) -> dict[KernelSpec, set[str]]:
    cuda, target = torch.device("cuda"), arch_named(arch)  # the device's kind is read, not its GPU: none needed
    wanted: dict[KernelSpec, set[str]] = {}
    for layer in layers:
        for backward in (False, True):
            spec = layer.kernel(dispatch.default_chunk_size(cuda, layer, backward, target))
            names = dispatch.phase_kernels(backward, final_state=True)
            wanted.setdefault(spec, set()).update(dispatch.implementations(names, spec, cuda, target).values())
    return wanted
