"""The public entry point, ``blurry_window_attention``, with FLA's conventions."""

from __future__ import annotations

import torch

from . import dispatch, ops, replay
from .layer import LayerSpec
from .params import check_qkv, check_scale, dtype_name
from .state import BLAState, check_seen, check_state, zero_initial


def check_cu_seqlens(cu_seqlens, q: torch.Tensor) -> torch.Tensor:
    """cu_seqlens [S + 1], int32 or int64 on q's device, with B = 1. Its values (0 = cu[0] <= ... <= cu[S] = T)
    are checked where the op reads them (``layout.packed_layout``), so that compiled graphs need no data."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor of sequence offsets, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D with at least 2 offsets [S + 1], got shape {list(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k and v must have batch size 1 (packed sequences), got {q.shape[0]}")
    return cu_seqlens


def blurry_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int | None = None,
    scale: float | None = None,
    initial_state: BLAState | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Blurry Window Attention (arXiv 2606.09862) through compiled TVM kernels.

    Args:
        q: queries `[B, T, HQ, K]`.
        k: keys `[B, T, H, K]`; HQ a multiple of H (GQA: query head hq uses key/value head hq // (HQ / H)).
        v: values `[B, T, H, V]`.
        window: W, the window length in tokens (W >= 1).
        resolution: N, real Fourier components kept (1 <= N <= W; N odd or N == W).
        num_slots: M, slots the softmax runs over (M >= 1; default N).
        scale: softmax temperature; default `1 / sqrt(K)`.
        initial_state: a `BLAState` (key_state `[S, H, N, K]`, value_state `[S, H, N, V]` in float32 (float64
            for float64 inputs), seen `[S]` int tokens already seen, window: the W it was built with, or None) to
            continue from; S = B, or the number of sequences with `cu_seqlens`. Default: a fresh start.
            Gradients flow into key_state and value_state.
        output_final_state: also return the state after the last token of each sequence.
        cu_seqlens: `[S + 1]` int32/int64 offsets of S sequences packed in one row (B = 1), FlashAttention's
            convention; each sequence starts from its own initial state. Empty sequences are allowed.

    q, k and v share one dtype (float32, float16, bfloat16; float64 on the CPU) and one device (CPU or CUDA);
    accumulation and softmax run in float32 (float64 for float64 inputs); o has q's dtype.

    Returns:
        (o `[B, T, HQ, V]`, the final `BLAState` or None). Splitting a sequence anywhere and passing the state
        on gives the same output as one call.

    Example:
        >>> q = k = torch.randn(1, 128, 2, 64); v = torch.randn(1, 128, 2, 64)
        >>> o, state = blurry_window_attention(q, k, v, window=64, resolution=15, output_final_state=True)
        >>> o2, state = blurry_window_attention(q, k, v, 64, 15, initial_state=state, output_final_state=True)
    """
    fresh = initial_state is None and cu_seqlens is None and output_final_state is False
    replay_key = replay.key(q, k, v, window, resolution, num_slots, scale) if fresh else None
    replayed = None if replay_key is None else replay.recorded(replay_key)
    if replayed is not None:
        return replayed(q, k, v), None
    check_qkv(q, k, v)
    B, T, H, K, V = k.shape[0], k.shape[1], k.shape[2], k.shape[3], v.shape[3]
    group = q.shape[2] // H if H else 1
    layer = LayerSpec.make(window, resolution, num_slots, int(K), int(V), dtype_name(q.dtype), int(group))
    scale = check_scale(scale, q.shape[-1])
    if not isinstance(output_final_state, bool):
        raise TypeError(f"output_final_state must be a bool, got {type(output_final_state).__name__}")
    state_dtype = getattr(torch, layer.acc_dtype)
    if cu_seqlens is not None:
        cu_seqlens = check_cu_seqlens(cu_seqlens, q)
    sequences = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    if initial_state is None:
        initial = zero_initial((sequences, H, layer.resolution, K + V), state_dtype, q.device)
        seen = None  # fresh sequences: the op's layout depends on the shapes alone
    else:
        state = check_state(
            initial_state, sequences, H, layer.resolution, K, V, (state_dtype,), q.device, layer.window
        )
        if state.seen.is_cuda and not torch.compiler.is_compiling():
            check_seen(state.seen, T)  # one wait for the device, only for a user's state (``layout.batch_layout``)
        initial = torch.cat([state.key_state, state.value_state], dim=-1)
        seen = state.seen.to(torch.int64)
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, initial))
    # eager inference runs the op's code without its dispatch (a third of a small call's host time)
    eager = not backward and not torch.compiler.is_compiling()
    chunk_size = dispatch.chunk_size(q.device, layer, tuple(q.shape), backward)
    args = (q, k, v, initial, seen, cu_seqlens, output_final_state, layer.window, layer.resolution,
            layer.num_slots, scale, chunk_size)  # fmt: skip
    if replay_key is not None:  # an eager call of fresh sequences: recorded, replayed by the next of its key
        o, final = replay.record(replay_key, lambda: ops.run_forward(*args)[0], q, v), None
    elif eager:
        o, final, _, _ = ops.run_forward(*args)
    elif backward and not torch.compiler.is_compiling():  # eager training: the op's autograd without its dispatch
        o, _, final, _ = ops.EagerForward.apply(*args)
    else:
        o, _, final, _ = torch.ops.bla_tvm.forward(*args)
    if not output_final_state:
        return o, None
    if cu_seqlens is None:
        lengths = torch.full((B,), T, dtype=torch.int64, device=q.device)
    else:
        lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    seen_after = lengths if seen is None else seen + lengths
    return o, BLAState(final[..., :K].contiguous(), final[..., K:].contiguous(), seen_after, layer.window)
