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
from .layout import ChunkLayout, batch_layout, pack, packed_chunks, packed_layout, unpack
from . import tuning_logs
from .params import BLAParams
from .runtime import LIBRARY, device_kind
from .spec import BACKWARD_KERNELS, FINAL_STATE_KERNELS, FORWARD_KERNELS, KernelSpec

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


def kernel_spec(q, k, v, window, resolution, num_slots, chunk_size) -> KernelSpec:
    """The compiled kernels' spec for q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V] (group size HQ / H)."""
    group = q.shape[2] // k.shape[2] if k.shape[2] else 1
    return KernelSpec(
        window, resolution, num_slots, chunk_size, q.shape[-1], v.shape[-1], dtype_name(q.dtype), group
    )


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
        "final_map": put(cc.final_map),
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


def _kernels(names, spec, device, shape=None):
    """The compiled kernels ``names``, each with the schedule its tuning log gives for ``shape`` on this device
    (the default schedule where none does; see ``tuning_logs``)."""
    return [tuning_logs.kernel_function(name, spec, device, shape) for name in names]


def launch_forward(q, k, v, initial, o, layout: ChunkLayout, spec: KernelSpec, scale: float, final_state=True):
    """Run the forward kernels, writing o [B, T, HQ, V]; q, k, v, o contiguous, of ``spec``'s dtype, in the
    layout's chunk grid.

    initial [S, H, N, F]: each sequence's state before its first token (accumulation dtype).
    Returns (states, final): X | Y at every chunk start [B, NC, H, N, F] (what the backward needs), and, with
    ``final_state``, each sequence's state after its last token [S, H, N, F] (else None). U, the chunk-local
    state contributions, is a temporary.
    """
    states = _chunk_tensors(k, spec, spec.resolution, spec.state_width)
    if states.numel() == 0:
        return states, initial.clone() if final_state else None
    consts = device_constants(spec.params, spec.chunk_size, states.dtype, q.device, float(scale))
    names = [name for name in FORWARD_KERNELS if final_state or name not in FINAL_STATE_KERNELS]
    chunk_state, state_scan, chunk_output, *final_kernel = _kernels(names, spec, q.device, q.shape)
    contributions = torch.empty_like(states)
    _launch(chunk_state, k, v, consts["state_in"], contributions)
    _launch(state_scan, contributions, consts["state_decay"], initial, layout.starts, states)
    _launch(chunk_output, q, k, v, states, layout.positions, consts["scale"], *consts["output"], o)
    if not final_state:
        return states, None
    final = torch.empty_like(initial)
    ends = (layout.end_row, layout.end_chunk, layout.end_length)
    _launch(*final_kernel, states, k, v, *ends, consts["final_map"], final)
    return states, torch.where(layout.empty[:, None, None, None], initial, final)


def launch_backward(q, k, v, states, do, dfinal, dq, dk, dv, layout: ChunkLayout, spec: KernelSpec, scale: float):
    """Run the backward kernels (compute/backward.py, compute/final_state.py), writing dq, dk, dv; inputs as
    saved by the forward, dfinal [S, H, N, F] the gradient of the final states, or None where the forward
    returned none. Returns dinitial [S, H, N, F].

    Temporaries: grads [B, NC, HQ, L + N, F + K], the state gradients at chunk starts [B, NC, H, N, F] and the
    final states' gradient spread over the last chunks [S, H, L + N, F].
    """
    empty = layout.empty[:, None, None, None]
    S, H = layout.end_length.shape[0], k.shape[2]
    if states.numel() == 0:
        return states.new_zeros(S, H, spec.resolution, spec.state_width) if dfinal is None else dfinal.clone()
    consts = device_constants(spec.params, spec.chunk_size, states.dtype, q.device, float(scale))
    names = [name for name in BACKWARD_KERNELS if dfinal is not None or name not in FINAL_STATE_KERNELS]
    *final_backward, chunk_backward, reverse_scan, dq_kernel, dk_kernel, dv_kernel = _kernels(
        names, spec, q.device, q.shape
    )
    grads = _chunk_tensors(q, spec, spec.chunk_size + spec.resolution, spec.state_width + spec.head_k)
    _launch(chunk_backward, q, k, v, states, layout.positions, consts["scale"], *consts["output"], do, grads)
    if dfinal is not None:  # the final state reads the last chunk's tokens and start state
        dfinal_kept = torch.where(empty, 0.0, dfinal).contiguous()  # an empty sequence's passes straight through
        final_grads = dfinal.new_empty(S, H, spec.chunk_size + spec.resolution, spec.state_width)
        _launch(*final_backward, dfinal_kept, layout.end_length, consts["final_map"], final_grads)
        spread = grads.new_zeros(S, q.shape[2], *grads.shape[3:])  # to the first query head of each group
        spread[:, :: spec.group_size, :, : spec.state_width] = final_grads
        grads.index_put_((layout.end_row.long(), layout.end_chunk.long()), spread, accumulate=True)
    state_grads = torch.empty_like(states)
    _launch(reverse_scan, grads, consts["state_decay_t"], layout.starts, state_grads)
    for kernel, grad in zip((dq_kernel, dk_kernel, dv_kernel), (dq, dk, dv)):
        _launch(kernel, grads, state_grads, layout.starts, consts["state_in"], grad)
    dinitial = state_grads[layout.start_row.long(), layout.start_chunk.long()]
    return torch.where(empty, 0.0 if dfinal is None else dfinal, dinitial)


def chunk_layout(k, seen, cu_seqlens, spec: KernelSpec) -> ChunkLayout:
    if cu_seqlens is None:
        return batch_layout(k.shape[0], k.shape[1], spec.chunk_size, spec.window, seen)
    return packed_layout(cu_seqlens, k.shape[1], spec.chunk_size, spec.window, seen)


def _fake_states(k, v, chunk_size, resolution, cu_seqlens):
    B, T, H, K = k.shape
    acc = torch.float64 if k.dtype == torch.float64 else torch.float32
    if cu_seqlens is None:
        rows, chunks = B, (T + chunk_size - 1) // chunk_size
    else:
        rows, chunks = 1, packed_chunks(T, cu_seqlens.shape[0] - 1, chunk_size)
    return k.new_empty(rows, chunks, H, resolution, K + v.shape[-1], dtype=acc)


@torch.library.custom_op("bla_tvm::forward", mutates_args=())
def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor,
    seen: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    output_final_state: bool,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, T, HQ, V] in q's dtype, states [rows, NC, H, N, K + V], final [S, H, N, K + V]) = BLA(q [B, T, HQ, K],
    k [B, T, H, K], v [B, T, H, V]) from the states ``initial`` [S, H, N, K + V] after ``seen`` [S] tokens;
    S = B, or the sequences of ``cu_seqlens`` (B = 1). Without ``output_final_state`` final is empty,
    [0, H, N, K + V], and not computed. Arguments validated by the caller (``bla_tvm.blurry_window_attention``)."""
    spec = kernel_spec(q, k, v, window, resolution, num_slots, chunk_size)
    layout = chunk_layout(k, seen, cu_seqlens, spec)
    q, k, v = (_kernel_ready(pack(x, layout, chunk_size)) for x in (q, k, v))
    o = q.new_empty(*q.shape[:3], spec.head_v)
    states, final = launch_forward(q, k, v, _kernel_ready(initial), o, layout, spec, scale, output_final_state)
    return unpack(o, layout), states, initial.new_empty(0, *initial.shape[1:]) if final is None else final


@forward.register_fake
def _(q, k, v, initial, seen, cu_seqlens, output_final_state, window, resolution, num_slots, scale, chunk_size):
    states = _fake_states(k, v, chunk_size, resolution, cu_seqlens)
    final = torch.empty_like(initial) if output_final_state else initial.new_empty(0, *initial.shape[1:])
    return q.new_empty(*q.shape[:3], v.shape[-1]), states, final


@torch.library.custom_op("bla_tvm::backward", mutates_args=())
def backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: torch.Tensor,
    do: torch.Tensor,
    dfinal: torch.Tensor,
    seen: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv in q's dtype, dinitial [S, H, N, K + V]) of BLA given dO [B, T, HQ, V], the final states'
    gradient dfinal [S, H, N, K + V] (empty, [0, H, N, K + V], where the forward returned no final states) and
    the forward's saved states."""
    spec = kernel_spec(q, k, v, window, resolution, num_slots, chunk_size)
    layout = chunk_layout(k, seen, cu_seqlens, spec)
    q, k, v, do = (_kernel_ready(pack(x.to(q.dtype), layout, chunk_size)) for x in (q, k, v, do))
    # new_empty, not empty_like: gradients always have the standard contiguous strides (empty_like would keep
    # the odd strides of size-1 dims), which is what the fake implementation promises
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
    dfinal = _kernel_ready(dfinal) if dfinal.shape[0] else None
    dinitial = launch_backward(q, k, v, states.contiguous(), do, dfinal, dq, dk, dv, layout, spec, scale)
    return unpack(dq, layout), unpack(dk, layout), unpack(dv, layout), dinitial


@backward.register_fake
def _(q, k, v, states, do, dfinal, seen, cu_seqlens, window, resolution, num_slots, scale, chunk_size):
    # contiguous whatever the inputs' strides: the real implementation writes into fresh contiguous tensors
    return (*(q.new_empty(x.shape) for x in (q, k, v)), dfinal.new_empty(seen.shape[0], *dfinal.shape[1:]))


def _setup_context(ctx, inputs, output):
    q, k, v, initial, seen, cu_seqlens, *layer = inputs
    _, states, _ = output
    ctx.mark_non_differentiable(states)
    ctx.save_for_backward(q, k, v, states, seen, cu_seqlens)
    ctx.final_shape = output[2].shape
    ctx.layer = layer[1:]  # less output_final_state


def _backward(ctx, do, _unused_dstates, dfinal):
    q, k, v, states, seen, cu_seqlens = ctx.saved_tensors
    if dfinal is None:  # the final states were not used (or not computed)
        dfinal = states.new_zeros(ctx.final_shape)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, dinitial = torch.ops.bla_tvm.backward(q, k, v, states, do, dfinal, seen, cu_seqlens, *ctx.layer)
    return dq, dk, dv, dinitial, *[None] * 8


torch.library.register_autograd("bla_tvm::forward", _backward, setup_context=_setup_context)


__all__ = ["backward", "forward", "device_kind"]
