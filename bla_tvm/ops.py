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
from .spec import BACKWARD_KERNELS, FORWARD_KERNELS, KernelSpec

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
        "state_decay_t": put(cc.state_decay.T),
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


#: the kernels index with 32-bit integers
MAX_ELEMENTS = 2**31 - 1


def _chunk_tensors(q, spec: KernelSpec, rows: int, columns: int) -> torch.Tensor:
    """An empty [B, NC, H, rows, columns] tensor in the accumulation dtype."""
    B, T, H, _ = q.shape
    num_chunks = (T + spec.chunk_size - 1) // spec.chunk_size
    elements = B * num_chunks * H * rows * columns
    if max(elements, q.numel()) > MAX_ELEMENTS:
        raise ValueError(
            f"q of shape {tuple(q.shape)} needs a [B, NC, H, {rows}, {columns}] buffer of {elements} elements; the "
            f"kernels index with 32 bits (at most {MAX_ELEMENTS}): split the batch or the sequence"
        )
    return torch.empty(B, num_chunks, H, rows, columns, dtype=getattr(torch, spec.acc_dtype), device=q.device)


def _kernels(names, spec, device):
    return [LIBRARY.function(name, spec, device) for name in names]


def launch_forward(q, k, v, o, spec: KernelSpec, scale: float) -> torch.Tensor:
    """Run the three forward kernels, writing o [B, T, H, V]; q, k, v, o contiguous, of ``spec``'s dtype.

    Returns the states at every chunk start, X | Y [B, NC, H, N, K + V] in the accumulation dtype (what the
    backward needs); U, the chunk-local state contributions, is a temporary of the same shape.
    """
    states = _chunk_tensors(q, spec, spec.resolution, spec.state_width)
    if states.numel() == 0:
        return states
    consts = device_constants(spec.params, spec.chunk_size, states.dtype, q.device, float(scale))
    chunk_state, state_scan, chunk_output = _kernels(FORWARD_KERNELS, spec, q.device)
    contributions = torch.empty_like(states)
    _launch(chunk_state, k, v, consts["state_in"], contributions)
    _launch(state_scan, contributions, consts["state_decay"], states)
    _launch(chunk_output, q, k, v, states, consts["scale"], *consts["output"], o)
    return states


def launch_backward(q, k, v, states, do, dq, dk, dv, spec: KernelSpec, scale: float) -> None:
    """Run the backward kernels (compute/backward.py), writing dq, dk, dv; inputs as saved by the forward.

    Temporaries: grads [B, NC, H, L + N, F + K] and the carried state gradients [B, NC, H, N, F].
    """
    if states.numel() == 0:
        return
    consts = device_constants(spec.params, spec.chunk_size, states.dtype, q.device, float(scale))
    chunk_backward, reverse_scan, *input_gradients = _kernels(BACKWARD_KERNELS, spec, q.device)
    grads = _chunk_tensors(q, spec, spec.chunk_size + spec.resolution, spec.state_width + spec.head_k)
    carried = torch.empty_like(states)
    _launch(chunk_backward, q, k, v, states, consts["scale"], *consts["output"], do, grads)
    _launch(reverse_scan, grads, consts["state_decay_t"], carried)
    for kernel, grad in zip(input_gradients, (dq, dk, dv)):
        _launch(kernel, grads, carried, consts["state_in"], grad)


def _fake_states(q, v, chunk_size, resolution):
    B, T, H, K = q.shape
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty(B, (T + chunk_size - 1) // chunk_size, H, resolution, K + v.shape[-1], dtype=acc)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o [B, T, H, V] in q's dtype, states [B, NC, H, N, K + V]) = BLA(q [B, T, H, K], k [B, T, H, K],
    v [B, T, H, V]); arguments validated by the caller (``bla_tvm.blurry_window_attention``)."""
    spec = kernel_spec(q, v, window, resolution, num_slots, chunk_size)
    q, k, v = (_kernel_ready(x) for x in (q, k, v))
    o = q.new_empty(*q.shape[:3], spec.head_v)
    states = launch_forward(q, k, v, o, spec, scale)
    return o, states


@forward.register_fake
def _(q, k, v, window, resolution, num_slots, scale, chunk_size):
    return q.new_empty(*q.shape[:3], v.shape[-1]), _fake_states(q, v, chunk_size, resolution)


@torch.library.custom_op("bla_tvm::backward", mutates_args=())
def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: torch.Tensor,
    do: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of BLA given dO [B, T, H, V] and the forward's saved states; in q's dtype."""
    spec = kernel_spec(q, v, window, resolution, num_slots, chunk_size)
    q, k, v, do = (_kernel_ready(x.to(q.dtype)) for x in (q, k, v, do))
    # new_empty, not empty_like: gradients always have the standard contiguous strides (empty_like would keep
    # the odd strides of size-1 dims), which is what the fake implementation promises
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
    launch_backward(q, k, v, states.contiguous(), do, dq, dk, dv, spec, scale)
    return dq, dk, dv


@backward.register_fake
def _(q, k, v, states, do, window, resolution, num_slots, scale, chunk_size):
    # contiguous whatever the inputs' strides: the real implementation writes into fresh contiguous tensors
    return tuple(q.new_empty(x.shape) for x in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, window, resolution, num_slots, scale, chunk_size = inputs
    _, states = output
    ctx.mark_non_differentiable(states)
    ctx.save_for_backward(q, k, v, states)
    ctx.layer = (window, resolution, num_slots, scale, chunk_size)


def _backward(ctx, do, _unused_dstates):
    q, k, v, states = ctx.saved_tensors
    dq, dk, dv = torch.ops.bla_tvm.backward(q, k, v, states, do, *ctx.layer)
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd("bla_tvm::forward", _backward, setup_context=_setup_context)


__all__ = ["backward", "forward", "device_kind"]
