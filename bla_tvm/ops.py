"""BLA as a torch custom op, ``torch.ops.bla_tvm.forward``: the compiled kernels, launched from PyTorch.

The launchers (``launch_forward``, ``launch_backward``) run a ``dispatch.CallPlan``'s kernels by argument name;
the custom ops lay the sequences out in chunks (``layout``), plan the call and launch. Tensors reach the kernels
through DLPack with no copy when they are already contiguous and 64-byte aligned (``runtime.kernel_ready``).
The forward op returns its chunk layout as a tensor, which autograd saves for the backward. Imports only torch,
tvm_ffi and the package's runtime.
"""

from __future__ import annotations

import torch

from . import kernels
from .dispatch import CallPlan, phase_kernels, plan_call, states_dtype
from .layer import KernelSpec, check_index_range, layer_spec, num_chunks
from .layout import ChunkLayout, batch_layout, pack, packed_chunks, packed_layout, unpack
from .params import dtype_name
from .runtime import kernel_ready, launch


def chunk_tensors(q: torch.Tensor, spec: KernelSpec, rows: int, columns: int, dtype=None) -> torch.Tensor:
    """An empty [B, NC, H, rows, columns] tensor in ``dtype`` (None: the accumulation dtype), for q [B, T, H, ...]
    (sizes checked by ``check_call``)."""
    B, T, H, _ = q.shape
    chunks = num_chunks(T, spec.chunk_size)
    return torch.empty(B, chunks, H, rows, columns, dtype=dtype or getattr(torch, spec.acc_dtype), device=q.device)


def check_call(spec: KernelSpec, q, grid: tuple[int, int], packed: bool, sequences: int, backward: bool) -> None:
    """ValueError naming every buffer the call's kernels would index past 32 bits (``layer.check_index_range``)
    for q [B, T, HQ, K] on a chunk ``grid`` (rows, NC) of S = ``sequences``, from shapes alone: before anything
    is packed, allocated or compiled."""
    rows, chunks = grid
    tokens = chunks * spec.chunk_size if packed else q.shape[1]
    check_index_range(spec.buffers(rows, tokens, q.shape[2], sequences, spec.chunk_size, backward))


#: the temporaries ``launch_forward`` allocates, by the kernels' argument names: each written before it is read
FORWARD_TEMPORARIES = ("states", "contributions", "end_states", "final")


def launch_forward(plan: CallPlan, q, k, v, initial, o, layout: ChunkLayout, final_state=True):
    """Run the forward kernels of ``plan``, writing o [B, T, HQ, V]; q, k, v, o contiguous, of the spec's dtype,
    in the layout's chunk grid.

    initial [S, H, N, F]: each sequence's state before its first token (accumulation dtype).
    Returns (states, final): X | Y at every chunk start [B, NC, H, N, F] (what the backward needs; float16 where
    the tile scan writes them, ``dispatch.states_dtype``), and, with ``final_state``, each sequence's state after
    its last token [S, H, N, F] (else None). Temporaries: the chunk-local state contributions (none where the
    plan's scan computes them) and the states at the start of each sequence's last chunk [S, H, N, F] (the final
    state's input; the tile scan writes them, in float32, else they are gathered from the states).
    """
    spec, run = plan.spec, plan.kernels
    states = chunk_tensors(k, spec, spec.resolution, spec.state_width, states_dtype(spec, k.device))
    if states.numel() == 0:
        return states, initial.clone() if final_state else None
    shared = {**plan.constants, **layout_tables(layout), "q": q, "k": k, "v": v, "initial": initial,
              "states": states}  # fmt: skip
    if "chunk_state" in run:  # else the scan computes the contributions itself (``kernels.Kernel.absorbs``)
        shared["contributions"] = initial.new_empty(states.shape)  # the TE scan: states are float32 too
        launch(run["chunk_state"], shared)
    if "end_states" in run["state_scan"].kernel.args:
        shared["end_states"] = torch.empty_like(initial)
    launch(run["state_scan"], shared)
    launch(run["chunk_output"], shared, o=o)
    if not final_state:
        return states, None
    if "end_states" not in shared:
        shared["end_states"] = states[layout.end_row.long(), layout.end_chunk.long()]
    final = torch.empty_like(initial)
    launch(run["final_state"], shared, final=final)
    return states, torch.where(layout.empty[:, None, None, None], initial, final)


def launch_backward(
    plan: CallPlan, q, k, v, states, do, dfinal, dq, dk, dv, layout: ChunkLayout, gradient_scale=None
):  # fmt: skip
    """Run the backward kernels of ``plan``, writing dq, dk, dv; inputs as saved by the forward, dfinal
    [S, H, N, F] the gradient of the final states, or None where the forward returned none; ``gradient_scale``
    [1] the factor the tile kernels apply to dO (``gradient_scale``; None: 1). Returns
    dinitial [S, H, N, F].

    Temporaries: the chunk kernel's gradients (the tile backward's: grads [B, NC, HQ, N, F] and the local d(k | v)
    in float16, times the gradient scale, the latter in dk and dv themselves where G = 1 and there is no dfinal,
    else in [B, NC L, HQ, K | V]; the TE chunk_backward's: grads [B, NC, HQ, L + N, F (+ K where input_gradient_q
    runs)] float32), the final states' gradient spread over the last chunks [S, HQ, L + N, F] and, unless the
    reverse scan writes only those at the sequences' starts (``initial_grads``), the state gradients at every
    chunk start [B, NC, H, N, F].
    """
    spec, run = plan.spec, plan.kernels
    empty = layout.empty[:, None, None, None]
    S, H = layout.end_length.shape[0], k.shape[2]
    state_shape, acc = (S, H, spec.resolution, spec.state_width), getattr(torch, spec.acc_dtype)
    if states.numel() == 0:
        return torch.zeros(state_shape, dtype=acc, device=q.device) if dfinal is None else dfinal.clone()
    if gradient_scale is None:
        gradient_scale = torch.ones(1, device=q.device)  # for the kernels that take one
    shared = {**plan.constants, **layout_tables(layout), "q": q, "k": k, "v": v, "states": states,
              "gradient_scale": gradient_scale, "dq": dq, "dk": dk, "dv": dv}  # fmt: skip
    L, N, F = spec.chunk_size, spec.resolution, spec.state_width
    tile_grads = run["chunk_backward"].kernel.name == "chunk_backward_tile"
    if tile_grads:
        in_place = spec.group_size == 1 and dfinal is None
        shared["grads"] = chunk_tensors(q, spec, N, F, torch.float16)
        shared.update(local_gradients(q, spec, dk, dv) if in_place else local_gradients(q, spec))
    else:
        dq_columns = spec.head_k if "input_gradient_q" in run else 0
        shared["grads"] = chunk_tensors(q, spec, L + N, F + dq_columns)
    launch(run["chunk_backward"], shared, do=do)
    if dfinal is not None:  # the final state reads the last chunk's tokens and start state
        dfinal_kept = torch.where(empty, 0.0, dfinal).contiguous()  # an empty sequence's passes straight through
        final_grads = dfinal.new_empty(S, H, L + N, F)
        launch(run["final_state_backward"], shared, dfinal=dfinal_kept, final_grads=final_grads)
        add_final_gradients(shared, final_grads * (gradient_scale if tile_grads else 1), layout, spec)
    scan_reads = {}
    if "local_k" in run["state_scan_reverse"].kernel.args and not tile_grads:
        scan_reads = tile_scan_gradients(shared["grads"], spec)
    if "initial_grads" in run["state_scan_reverse"].kernel.args:
        dinitial = torch.empty(state_shape, dtype=acc, device=q.device)
        launch(run["state_scan_reverse"], shared, initial_grads=dinitial, **scan_reads)
    else:
        shared["state_grads"] = torch.empty(states.shape, dtype=acc, device=q.device)
        launch(run["state_scan_reverse"], shared)
        dinitial = shared["state_grads"][layout.start_row.long(), layout.start_chunk.long()]
    for part in "qkv":  # less those an implementation absorbs (``Kernel.absorbs``)
        if f"input_gradient_{part}" in run:
            launch(run[f"input_gradient_{part}"], shared)
    return torch.where(empty, 0.0 if dfinal is None else dfinal, dinitial)


def local_gradients(q, spec: KernelSpec, dk=None, dv=None) -> dict[str, torch.Tensor]:
    """local_k, local_v: where the tile backward writes the local d(k | v) (float16), for q [B, T, HQ, K] on the
    kernels' grid: dk and dv themselves viewed as float16 where given (the reverse scan then overwrites them in
    place), else [B, NC L, HQ, K | V]."""
    if dk is not None:
        return {"local_k": dk.view(torch.float16), "local_v": dv.view(torch.float16)}
    B, T, HQ, _ = q.shape
    rows = num_chunks(T, spec.chunk_size) * spec.chunk_size
    return {f"local_{part}": q.new_empty(B, rows, HQ, width, dtype=torch.float16)
            for part, width in (("k", spec.head_k), ("v", spec.head_v))}  # fmt: skip


def add_final_gradients(shared: dict, final_grads: torch.Tensor, layout: ChunkLayout, spec: KernelSpec) -> None:
    """Add the final states' gradient with respect to the last chunk of each sequence, final_grads
    [S, H, L + N, F] (the tile backward's: times the gradient scale), to that chunk's gradients in ``shared``,
    at the first query head of each group: the TE chunk_backward's grads, or the tile backward's grads and
    local_k, local_v."""
    L, K, G = spec.chunk_size, spec.head_k, spec.group_size
    grads, chunk = shared["grads"], (layout.end_row.long(), layout.end_chunk.long())
    S, H = final_grads.shape[:2]

    def add(target: torch.Tensor, part: torch.Tensor) -> None:  # target [rows, NC, HQ, ...] += part at heads 0, G..
        spread = target.new_zeros(S, H * G, *target.shape[3:])
        spread[:, ::G] = part
        target.index_put_(chunk, spread, accumulate=True)

    if "local_k" not in shared:
        return add(grads[..., : spec.state_width], final_grads)
    add(grads, final_grads[:, :, L:])
    for name, columns in (("local_k", slice(None, K)), ("local_v", slice(K, None))):
        local = shared[name]  # [rows, NC L, HQ, width] -> [rows, NC, HQ, L, width]
        add(local.view(local.shape[0], -1, L, *local.shape[2:]).transpose(2, 3), final_grads[:, :, :L, columns])


def tile_scan_gradients(grads: torch.Tensor, spec: KernelSpec) -> dict[str, torch.Tensor]:
    """The TE chunk_backward's grads [B, NC, HQ, L + N, >= F] (float32) as the tile reverse scan reads them
    (``cuda_tile_scan_reverse``): grads [B, NC, HQ, N, F], local_k [B, NC L, HQ, K], local_v, float16."""
    B, NC, HQ = grads.shape[:3]
    L, K, F = spec.chunk_size, spec.head_k, spec.state_width
    local = grads[:, :, :, :L, :F].to(torch.float16).transpose(2, 3).reshape(B, NC * L, HQ, F)
    return {"grads": grads[:, :, :, L:, :F].to(torch.float16).contiguous(),
            "local_k": local[..., :K].contiguous(), "local_v": local[..., K:].contiguous()}  # fmt: skip


def layout_tables(layout: ChunkLayout) -> dict[str, torch.Tensor]:
    """The layout's tables by the kernels' argument names."""
    names = ("positions", "starts", "ends", "end_row", "end_chunk", "end_length")
    return {name: getattr(layout, name) for name in names}


def chunk_layout(k, seen: torch.Tensor | None, cu_seqlens, chunk_size: int, window: int) -> ChunkLayout:
    """The layout of k [B, T, H, K]'s sequences: the batch's rows, or those of ``cu_seqlens`` packed (B = 1)."""
    if cu_seqlens is None:
        return batch_layout(k.shape[0], k.shape[1], chunk_size, window, seen, k.device)
    return packed_layout(cu_seqlens, k.shape[1], chunk_size, window, seen)


def kernel_spec(q, k, v, window: int, resolution: int, num_slots: int, chunk_size: int) -> KernelSpec:
    """The KernelSpec of a call the entry point validated: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V]."""
    group = q.shape[2] // k.shape[2] if k.shape[2] else 1
    layer = layer_spec(window, resolution, num_slots, q.shape[3], v.shape[3], dtype_name(q.dtype), group)
    return layer.kernel(chunk_size)


def _grid(k, chunk_size: int, cu_seqlens) -> tuple[int, int]:
    """(rows, NC) of the chunk grid of k [B, T, H, K]."""
    if cu_seqlens is None:
        return k.shape[0], num_chunks(k.shape[1], chunk_size)
    return 1, packed_chunks(k.shape[1], cu_seqlens.shape[0] - 1, chunk_size)


def run_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor,
    seen: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    output_final_state: bool,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, ChunkLayout]:
    """(o [B, T, HQ, V] in q's dtype, final [S, H, N, K + V] or None, states, layout) = BLA(q [B, T, HQ, K],
    k [B, T, H, K], v [B, T, H, V]) from the states ``initial`` [S, H, N, K + V] after ``seen`` [S] tokens (None:
    fresh sequences); S = B, or the sequences of ``cu_seqlens`` (B = 1). final only with ``output_final_state``.
    For the backward: states, the chunk-start states [rows, NC, H, N, K + V], and the chunk layout. Arguments
    validated by the caller (``bla_tvm.blurry_window_attention``)."""
    spec = kernel_spec(q, k, v, window, resolution, num_slots, chunk_size)
    check_call(spec, q, _grid(k, chunk_size, cu_seqlens), cu_seqlens is not None, initial.shape[0], backward=False)
    layout = chunk_layout(k, seen, cu_seqlens, chunk_size, window)
    q, k, v = (kernel_ready(pack(x, layout, chunk_size)) for x in (q, k, v))
    plan = plan_call(q.device, spec, q.shape, phase_kernels(False, output_final_state), scale)
    o = q.new_empty(*q.shape[:3], spec.head_v)
    states, final = launch_forward(plan, q, k, v, kernel_ready(initial), o, layout, output_final_state)
    return unpack(o, layout), final, states, layout


def forward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    initial: torch.Tensor,
    seen: torch.Tensor | None,
    cu_seqlens: torch.Tensor | None,
    output_final_state: bool,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op: ``run_forward``'s results as tensors, (o, states, final, layout). final is empty, [0, H, N, K + V],
    without ``output_final_state``; states are flattened (a dimension NC that may be 1 would make a dynamic-shape
    graph specialise on NC == 1, and recompile when T first passes L); layout is ``ChunkLayout.as_tensor``."""
    o, final, states, layout = run_forward(
        q, k, v, initial, seen, cu_seqlens, output_final_state, window, resolution, num_slots, scale, chunk_size
    )
    final = initial.new_empty(0, *initial.shape[1:]) if final is None else final
    return o, states.view(-1), final, layout.as_tensor()


#: the op (autograd, torch.compile, torch.library tooling); eager inference calls ``run_forward`` directly
forward = torch.library.custom_op("bla_tvm::forward", forward_impl, mutates_args=())


@forward.register_fake
def _(q, k, v, initial, seen, cu_seqlens, output_final_state, window, resolution, num_slots, scale, chunk_size):
    rows, chunks = _grid(k, chunk_size, cu_seqlens)
    dtype = initial.dtype  # the accumulation dtype, or float16 where the CUDA tile scan writes the states
    if q.device.type == "cuda":
        dtype = states_dtype(kernel_spec(q, k, v, window, resolution, num_slots, chunk_size), q.device)
    states = k.new_empty(rows * chunks * k.shape[2] * resolution * (k.shape[3] + v.shape[3]), dtype=dtype)
    final = torch.empty_like(initial) if output_final_state else initial.new_empty(0, *initial.shape[1:])
    packed = None if cu_seqlens is None else k.shape[1]
    tables = q.new_empty(ChunkLayout.tensor_size(rows, chunks, initial.shape[0], packed), dtype=torch.int32)
    return q.new_empty(*q.shape[:3], v.shape[-1]), states, final, tables


def backward_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    states: torch.Tensor,
    layout: torch.Tensor,
    do: torch.Tensor,
    dfinal: torch.Tensor,
    packed: bool,
    chunks: int,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv in q's dtype, dinitial [S, H, N, K + V]) of BLA given dO [B, T, HQ, V], the final states'
    gradient dfinal [S, H, N, K + V] (empty, [0, H, N, K + V], where the forward returned no final states), the
    forward's saved states (flat) and layout on its grid of rows x ``chunks`` (``packed``: laid out from
    ``cu_seqlens``, one row)."""
    spec = kernel_spec(q, k, v, window, resolution, num_slots, chunk_size)
    grid = (1 if packed else q.shape[0], chunks)
    tables = ChunkLayout.from_tensor(layout, *grid, q.shape[1] if packed else None)
    check_call(spec, q, grid, packed, tables.end_length.shape[0], backward=True)
    states = states.view(*grid, k.shape[2], resolution, k.shape[3] + v.shape[3])
    q, k, v, do = (kernel_ready(pack(x.to(q.dtype), tables, chunk_size)) for x in (q, k, v, do))
    plan = plan_call(q.device, spec, q.shape, kernels.names("backward", dfinal.shape[0] > 0), scale)
    # new_empty, not empty_like: gradients always have the standard contiguous strides (empty_like would keep
    # the odd strides of size-1 dims), which is what the fake implementation promises
    dq, dk, dv = (x.new_empty(x.shape) for x in (q, k, v))
    # the CUDA kernels' float16 operands: dO scaled by a power of two, undone exactly (in the tile kernels, which
    # take the factor; around the others)
    factor = gradient_scale(do) if q.is_cuda and q.dtype != torch.float32 else None
    in_kernels = "gradient_scale" in plan.kernels["chunk_backward"].kernel.args
    if factor is not None and not in_kernels:
        do, dfinal = kernel_ready(do * factor), dfinal * factor
    dfinal = kernel_ready(dfinal) if dfinal.shape[0] else None
    dinitial = launch_backward(plan, q, k, v, states.contiguous(), do, dfinal, dq, dk, dv, tables,
                               factor.view(1) if in_kernels else None)  # fmt: skip
    if factor is not None and not in_kernels:
        dq, dk, dv, dinitial = (x.div_(factor) for x in (dq, dk, dv, dinitial))
    return unpack(dq, tables), unpack(dk, tables), unpack(dv, tables), dinitial


#: the backward op (autograd of ``forward`` and torch.compile); eager training calls ``backward_impl`` directly
backward = torch.library.custom_op("bla_tvm::backward", backward_impl, mutates_args=())


def gradient_scale(do: torch.Tensor) -> torch.Tensor:
    """s, a power of two (float32, 0-d, on do's device) with max |s dO| in [1, 2) (1 where dO is all zeros or holds
    a non-finite value). The CUDA backward multiplies 16-bit operands as float16, whose normal range
    starts at 6e-5: a mean loss's dO (~1e-7) would keep a few bits; s dO keeps all of them, and as s is a power
    of two, dividing the gradients by it is exact."""
    largest = torch.linalg.vector_norm(do, float("inf"), dtype=torch.float32)  # one pass; NaN if dO has one
    scale = torch.exp2(-torch.floor(torch.log2(largest)))
    return torch.where(torch.isfinite(scale) & (scale > 0), scale, 1.0)


@backward.register_fake
def _(q, k, v, states, layout, do, dfinal, packed, chunks, window, resolution, num_slots, scale, chunk_size):
    # contiguous whatever the inputs' strides: the real implementation writes into fresh contiguous tensors
    rows, tokens = (1, q.shape[1]) if packed else (q.shape[0], None)
    sequences = ChunkLayout.sequences(layout.shape[0], rows, chunks, tokens)
    return (*(q.new_empty(x.shape) for x in (q, k, v)), dfinal.new_empty(sequences, *dfinal.shape[1:]))


def _setup_context(ctx, inputs, output):
    q, k, v, initial, seen, cu_seqlens, output_final_state, *layer = inputs
    _, states, final, layout = output
    ctx.mark_non_differentiable(states, layout)
    ctx.set_materialize_grads(False)  # else autograd passes the backward zeros the size of states (63 MiB at 4 x 4k)
    ctx.save_for_backward(q, k, v, states, layout)
    ctx.final_shape, ctx.final_dtype = final.shape, final.dtype
    ctx.packed = cu_seqlens is not None
    ctx.chunks = _grid(k, layer[-1], cu_seqlens)[1]
    ctx.layer = layer


def _gradients(ctx, do, dfinal, run_backward):
    """The gradients of the forward's 12 inputs (q, k, v, initial, then none) from those of o and the final
    states, through ``run_backward`` (the backward op, or its implementation)."""
    q, k, v, states, layout = ctx.saved_tensors
    if dfinal is None:  # the final states were not used (or not computed)
        dfinal = q.new_zeros(ctx.final_shape, dtype=ctx.final_dtype)
    if do is None:
        do = q.new_zeros(*q.shape[:3], v.shape[-1])
    dq, dk, dv, dinitial = run_backward(q, k, v, states, layout, do, dfinal, ctx.packed, ctx.chunks, *ctx.layer)
    return dq, dk, dv, dinitial, *[None] * 8


def _backward(ctx, do, _unused_dstates, dfinal, _unused_dlayout):
    return _gradients(ctx, do, dfinal, torch.ops.bla_tvm.backward)


torch.library.register_autograd("bla_tvm::forward", _backward, setup_context=_setup_context)


class EagerForward(torch.autograd.Function):
    """The forward op with its autograd, for eager training (``EagerForward.apply`` takes the op's arguments and
    returns its outputs): the same implementation, saved context and gradients, without torch.library's dispatch
    around the forward and the backward, which took ~0.5 ms of host time per call on the H200's host (torch 2.11),
    more than all the rest of a call. torch.compile traces the op itself (``api.blurry_window_attention``). Tools
    that look for ``torch.ops.bla_tvm.forward`` at the dispatcher (profiler op names, dispatch modes, activation
    checkpointing policies keyed on the op) see an eager training call only under torch.compile."""

    @staticmethod
    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        _setup_context(ctx, inputs, outputs)
        return outputs

    @staticmethod
    def backward(ctx, do, _unused_dstates, dfinal, _unused_dlayout):
        # with create_graph (grad mode on here), through the op: its gradients then refuse to be differentiated
        # again, naming the op, as the op's own autograd does
        return _gradients(ctx, do, dfinal, torch.ops.bla_tvm.backward if torch.is_grad_enabled() else backward_impl)
