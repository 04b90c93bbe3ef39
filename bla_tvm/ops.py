"""BLA as a torch custom op, ``torch.ops.bla_tvm.forward``: the compiled kernels, launched from PyTorch.

Tensors reach the kernels through DLPack with no copy when they are already contiguous and 64-byte aligned
(inputs that are not are copied once). CPU tensors run the LLVM kernels, CUDA tensors the CUDA kernels on torch's
current stream. Imports only torch, tvm_ffi and the package's runtime.
"""

from __future__ import annotations

import functools

import torch
import tvm_ffi

from .constants import chunk_constants
from .params import BLAParams
from .runtime import LIBRARY, device_kind
from .spec import FORWARD_KERNELS, KernelSpec

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {dtype}")
    return DTYPE_NAMES[dtype]


def kernel_spec(q, v, window, resolution, num_slots, chunk_size) -> KernelSpec:
    return KernelSpec(window, resolution, num_slots, chunk_size, q.shape[-1], v.shape[-1], dtype_name(q.dtype))


@functools.lru_cache(maxsize=128)
def device_constants(params: BLAParams, chunk_size: int, dtype: torch.dtype, device: torch.device, scale: float):
    """The chunk constants as the kernels take them (contiguous, accumulation dtype, on ``device``)."""
    cc = chunk_constants(params, chunk_size)

    def put(x):
        return x.to(device=device, dtype=dtype).contiguous()

    return {
        "state_in": put(cc.state_in),
        "state_decay": put(cc.state_decay),
        "output": [put(x) for x in (cc.input_map, cc.lag_basis, cc.base.C, cc.rot_diag, cc.rot_off)],
        "scale": torch.tensor([scale], dtype=dtype, device=device),
    }


#: compiled kernels assume their tensors' data is aligned to this many bytes (TVM's default buffer
#: data_alignment) and do not check it: an unaligned vector load segfaults.
KERNEL_ALIGNMENT = 64


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x itself when contiguous and aligned (no copy), else a contiguous, aligned copy."""
    x = x.contiguous()
    if x.data_ptr() % KERNEL_ALIGNMENT:
        x = x.clone()
    return x


def _launch(function, *args):
    if args[0].is_cuda:
        with tvm_ffi.use_torch_stream():
            function(*args)
    else:
        function(*args)


def launch_forward(q, k, v, o, spec: KernelSpec, scale: float) -> None:
    """Run the three forward kernels, writing o [B, T, H, V]; q, k, v, o contiguous, of ``spec``'s dtype.

    U [B, NC, H, N, K + V] (chunk-local state contributions) and the states at every chunk start are
    temporaries in the accumulation dtype.
    """
    B, T, H, _ = q.shape
    if T == 0 or B == 0 or H == 0:
        return
    acc = getattr(torch, spec.acc_dtype)
    consts = device_constants(spec.params, spec.chunk_size, acc, q.device, float(scale))
    chunk_state, state_scan, chunk_output = (LIBRARY.function(name, spec, q.device) for name in FORWARD_KERNELS)
    num_chunks = (T + spec.chunk_size - 1) // spec.chunk_size
    contributions = torch.empty(B, num_chunks, H, spec.resolution, spec.state_width, dtype=acc, device=q.device)
    states = torch.empty_like(contributions)
    _launch(chunk_state, k, v, consts["state_in"], contributions)
    _launch(state_scan, contributions, consts["state_decay"], states)
    _launch(chunk_output, q, k, v, states, consts["scale"], *consts["output"], o)


@torch.library.custom_op("bla_tvm::forward", mutates_args=())
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> torch.Tensor:
    """o [B, T, H, V] = BLA(q [B, T, H, K], k [B, T, H, K], v [B, T, H, V]) in q's dtype; arguments validated
    by the caller (``bla_tvm.blurry_window_attention``)."""
    spec = kernel_spec(q, v, window, resolution, num_slots, chunk_size)
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    o = q.new_empty(*q.shape[:3], spec.head_v)
    launch_forward(q, k, v, o, spec, scale)
    return o


@forward.register_fake
def _(q, k, v, window, resolution, num_slots, scale, chunk_size):
    return q.new_empty(*q.shape[:3], v.shape[-1])


__all__ = ["forward", "device_kind"]
