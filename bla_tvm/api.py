"""The public entry point, ``blurry_window_attention``, with FLA's conventions."""

from __future__ import annotations

import torch

from . import ops
from .params import BLAParams, check_qkv, check_scale
from .runtime import chunk_size_for


def blurry_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int | None = None,
    scale: float | None = None,
    initial_state=None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
):
    """Blurry Window Attention (arXiv 2606.09862) through compiled TVM kernels.

    Args:
        q: queries `[B, T, H, K]`.
        k: keys `[B, T, H, K]`.
        v: values `[B, T, H, V]`.
        window: W, the window length in tokens (W >= 1).
        resolution: N, real Fourier components kept (1 <= N <= W; N odd or N == W).
        num_slots: M, slots the softmax runs over (M >= 1; default N).
        scale: softmax temperature; default `1 / sqrt(K)`.
        initial_state, output_final_state, cu_seqlens: FLA's meaning; not implemented yet (they raise).

    q, k and v share one dtype (float32, float16, bfloat16; float64 on the CPU) and one device (CPU or CUDA);
    accumulation and softmax run in float32 (float64 for float64 inputs); o has q's dtype.

    Returns:
        (o `[B, T, H, V]`, None).

    Example:
        >>> q = k = torch.randn(1, 128, 2, 64); v = torch.randn(1, 128, 2, 64)
        >>> o, _ = blurry_window_attention(q, k, v, window=64, resolution=15)
    """
    if initial_state is not None:
        raise NotImplementedError("initial_state is not implemented yet; pass None")
    if output_final_state:
        raise NotImplementedError("output_final_state=True is not implemented yet; pass False")
    if cu_seqlens is not None:
        raise NotImplementedError("cu_seqlens is not implemented yet; pass None")
    check_qkv(q, k, v)
    params = BLAParams.make(window, resolution, num_slots)
    scale = check_scale(scale, q.shape[-1])
    dtype = ops.dtype_name(q.dtype)
    backward = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    chunk_size = chunk_size_for(q.device, *params.__dict__.values(), q.shape[-1], v.shape[-1], dtype, backward)
    o, _ = torch.ops.bla_tvm.forward(
        q, k, v, params.window, params.resolution, params.num_slots, scale, chunk_size
    )
    return o, None
