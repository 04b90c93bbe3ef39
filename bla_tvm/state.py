"""The recurrent state a BLA layer carries between calls (bla-math.md, "Edge cases": X, Y and t0).

``BLAState(key_state [B, H, N, K], value_state [B, H, N, V], seen [B], window)``: X and Y after the last token
seen (float32, float64 for float64 inputs), how many tokens each sequence has seen (int64), which the slot mask
needs while fewer than W tokens have been seen (slot i is masked while i W / M > t), and the window W the state
was built with (the shift it holds; None where not recorded, e.g. a state assembled by hand). A fresh sequence
is ``BLAState.zeros``. H counts key/value heads (with GQA, q has more). With ``cu_seqlens`` B is the number of
sequences.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


#: the most tokens a sequence can have seen (seen is int64)
MAX_SEEN = 2**63 - 1


class BLAState(NamedTuple):
    key_state: torch.Tensor
    value_state: torch.Tensor
    seen: torch.Tensor
    window: int | None = None

    @staticmethod
    def zeros(batch: int, heads: int, resolution: int, head_k: int, head_v: int, dtype=torch.float32, device=None,
              window: int | None = None):  # fmt: skip
        """The state before any token: X = Y = 0, seen = 0 (for ``window``, if given)."""
        return BLAState(
            torch.zeros(batch, heads, resolution, head_k, dtype=dtype, device=device),
            torch.zeros(batch, heads, resolution, head_v, dtype=dtype, device=device),
            torch.zeros(batch, dtype=torch.int64, device=device),
            window,
        )


#: a read-only zero buffer per (device, dtype), grown to the largest fresh state asked for (``zero_initial``)
_ZERO_BUFFERS: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def zero_initial(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The initial X | Y of fresh sequences, zeros of ``shape`` [S, H, N, F], for the kernels to read (never
    written). Eager calls get a view of one shared zero buffer per (device, dtype), kept at the largest size asked
    for: no allocation and no fill kernel per call (the zero fill was ~24 us of a T = 1k call's host time on the
    H200). Under torch.compile and during CUDA-graph capture (whose memory the graph owns): a new tensor.
    ``device`` as ``q.device`` gives it (the buffer's key)."""
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    if torch.compiler.is_compiling() or capturing:
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    buffer = _ZERO_BUFFERS.get((device, dtype))
    if buffer is None or buffer.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, also when first asked for under inference mode
            buffer = _ZERO_BUFFERS[(device, dtype)] = torch.zeros(numel, dtype=dtype, device=device)
    return buffer[:numel].view(shape)


def check_state(
    state, batch: int, heads: int, resolution: int, head_k: int, head_v: int, dtypes, device, window: int
) -> BLAState:
    """``state`` as a BLAState, or a TypeError/ValueError naming ``initial_state`` and what was expected.

    ``dtypes``: the floating dtypes accepted for key_state and value_state; ``window``: the call's W, which a
    recorded window must equal.
    """
    if not isinstance(state, tuple) or len(state) not in (3, 4):
        raise TypeError(
            "initial_state must be a BLAState (key_state, value_state, seen[, window]), got "
            f"{type(state).__name__}{'' if not isinstance(state, tuple) else f' of length {len(state)}'}"
        )
    state = BLAState(*state)
    if state.window is not None and (isinstance(state.window, bool) or state.window != window):
        raise ValueError(
            f"initial_state.window must be this call's window ({window}) or None, got {state.window!r}: the state "
            "holds the keys and values of another window"
        )
    expected = {
        "key_state": (batch, heads, resolution, head_k),
        "value_state": (batch, heads, resolution, head_v),
        "seen": (batch,),
    }
    for name, shape in expected.items():
        x = getattr(state, name)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"initial_state.{name} must be a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"initial_state.{name} must have shape {list(shape)}, got {list(x.shape)}")
        if x.device != device:
            raise ValueError(f"initial_state.{name} must be on {device}, got {x.device}")
    for name in ("key_state", "value_state"):
        if getattr(state, name).dtype not in dtypes:
            raise TypeError(f"initial_state.{name} must have dtype in {list(dtypes)}, got {getattr(state, name).dtype}")
    if state.seen.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"initial_state.seen must be int32 or int64, got {state.seen.dtype}")
    return state


def check_seen(seen: torch.Tensor, tokens: int, name: str = "initial_state.seen") -> None:
    """Every sequence has seen >= 0 tokens, and can see ``tokens`` more within int64; checked where the op reads
    the values (not while tracing a graph). ValueError naming ``name`` otherwise."""
    if seen.numel() and bool((seen < 0).any()):
        raise ValueError(f"{name} must be >= 0 (tokens already seen per sequence), got {seen.tolist()}")
    if seen.numel() and bool((seen > MAX_SEEN - tokens).any()):
        raise ValueError(f"{name} must be <= 2^63 - 1 - {tokens} (the tokens seen after these {tokens} must fit "
                         f"int64), got {seen.tolist()}")  # fmt: skip
