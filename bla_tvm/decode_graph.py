"""One decode step captured in a CUDA graph, so that a decoding loop costs one graph replay per token.

``DecodeGraph`` owns the token's input buffers (q, k, v) and its output o, captures the in-place step
(``decode_step(..., in_place=True)``: the kernel, then seen + 1) over a state it updates in place, and replays
it. Two ways to drive it from a loop of one's own:

    decoder = DecodeGraph(state, window=512, resolution=63, query_heads=16, dtype=torch.bfloat16)
    for t in range(n):
        q, k, v = project(hidden)             # [B, HQ, K], [B, H, K], [B, H, V]
        o = decoder(q, k, v)                  # copies the token in, replays; o is decoder.o
        hidden = mix(o)                       # o is overwritten by the next call: clone what you keep

or write the token straight into ``decoder.q``, ``decoder.k``, ``decoder.v`` (e.g. as the ``out=`` of the
projection) and call ``decoder.replay()``. A model that captures its own step in a CUDA graph (or compiles it
with ``torch.compile(mode="reduce-overhead")``) calls ``decode_step(..., in_place=True)`` inside it instead.
"""

from __future__ import annotations

import torch

from .decode import check_in_place, decode_step
from .runtime import record_launches
from .state import BLAState


class DecodeGraph:
    """The in-place decode step of ``state`` as a CUDA graph.

    Args:
        state: a `BLAState` on a CUDA device (key_state `[B, H, N, K]`, value_state `[B, H, N, V]` in float32,
            float16 or bfloat16, contiguous; seen `[B]` int64), updated in place by every call.
        window, resolution, num_slots, scale: as in `decode_step`.
        query_heads: HQ, the query heads (a multiple of H; default H).
        dtype: the tokens' dtype (float32, float16, bfloat16).

    Attributes: q `[B, HQ, K]`, k `[B, H, K]`, v `[B, H, V]` (the inputs the graph reads), o `[B, HQ, V]` (the
    output it writes), state.
    """

    def __init__(
        self,
        state: BLAState,
        window: int,
        resolution: int,
        num_slots: int | None = None,
        scale: float | None = None,
        query_heads: int | None = None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        if not isinstance(state, BLAState):
            raise TypeError(f"state must be a BLAState, got {type(state).__name__}")
        if not state.key_state.is_cuda:
            raise ValueError(f"DecodeGraph needs a state on a CUDA device, got {state.key_state.device}")
        B, H, _, K = state.key_state.shape
        V = state.value_state.shape[-1]
        HQ = H if query_heads is None else query_heads
        device = state.key_state.device
        self.q = torch.zeros(B, HQ, K, dtype=dtype, device=device)
        self.k = torch.zeros(B, H, K, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, V, dtype=dtype, device=device)
        self.state = state
        args = (window, resolution, num_slots, scale)
        # an out-of-place step first: it validates every argument, loads the kernel onto the device and fills
        # the constants' cache (neither may happen while a graph is being captured); the state is left as is
        decode_step(self.q, self.k, self.v, state, *args)
        check_in_place(state)
        self.graph = torch.cuda.CUDAGraph()
        with record_launches() as launches, torch.cuda.graph(self.graph):
            self.o, _ = decode_step(self.q, self.k, self.v, state, *args, in_place=True)
        # the graph keeps only addresses: every tensor its kernels read or write (the constants among them, which
        # a cache could drop) lives as long as the graph
        self._captured = launches

    def replay(self) -> torch.Tensor:
        """One token from what ``q``, ``k``, ``v`` hold: the state advanced in place; returns ``o``."""
        self.graph.replay()
        return self.o

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Copy the token (q `[B, HQ, K]`, k `[B, H, K]`, v `[B, H, V]`, the graph's dtype and device) into the
        graph's inputs and replay it; returns ``o`` `[B, HQ, V]` (overwritten by the next call)."""
        for name, x, buffer in (("q", q, self.q), ("k", k, self.k), ("v", v, self.v)):
            if not isinstance(x, torch.Tensor) or x.shape != buffer.shape or x.dtype != buffer.dtype:
                raise ValueError(
                    f"{name} must be a tensor of shape {list(buffer.shape)} and dtype {buffer.dtype}, got "
                    + (f"{list(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__)
                )
        torch._foreach_copy_((self.q, self.k, self.v), (q, k, v))
        return self.replay()
