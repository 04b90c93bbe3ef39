"""Prefill then decode: ``generate`` runs a prompt through the chunked kernels, then decodes token by token with
the in-place step: one launch per token, written straight into the output (``decode.InPlaceSteps``), or through a
CUDA graph (``DecodeGraph``). Imports only torch and the package.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .api import blurry_window_attention
from .decode import REDUCED_STATE_KERNELS, InPlaceSteps
from .decode_graph import DecodeGraph
from .state import BLAState

NextToken = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def row_views(x: torch.Tensor, block: int = 1024):
    """x[0], x[1], ... made ``block`` at a time (one unbind for many views; none made far ahead of use)."""
    for start in range(0, x.shape[0], block):
        yield from x[start : start + block].unbind(0)


class _TokenCheck:
    """``next_token``'s (q, k, v) for new token i, each [B, heads, D] (a token axis of 1 removed): one token
    ([B, heads, D] or [B, 1, heads, D]) of the prompt's B, HQ, H, K, V, dtype and device each; else a TypeError /
    ValueError naming next_token and the tensor. Tokens of exactly the expected [B, heads, D] pass one
    comparison (generate's loop calls this every token)."""

    def __init__(self, q, k, v):
        self.expected = tuple(torch.Size((x.shape[0], x.shape[2], x.shape[3])) for x in (q, k, v))
        self.dtype, self.device = q.dtype, q.device

    def __call__(self, token, i: int):
        if type(token) is tuple and len(token) == 3:
            tq, tk, tv = token
            if (isinstance(tq, torch.Tensor) and isinstance(tk, torch.Tensor) and isinstance(tv, torch.Tensor)
                    and (tq.shape, tk.shape, tv.shape) == self.expected
                    and tq.dtype == tk.dtype == tv.dtype == self.dtype
                    and tq.device == tk.device == tv.device == self.device):  # fmt: skip
                return token
        return self.checked(token, i)

    def checked(self, token, i: int):
        where = f"next_token(o, {i})"
        if not isinstance(token, tuple) or len(token) != 3:
            raise TypeError(f"{where} must return (q, k, v), got {type(token).__name__}")
        for name, x, expected in zip("qkv", token, self.expected):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{where} returned {name} of type {type(x).__name__}; expected a torch.Tensor")
            one = tuple(x.shape[:1] + x.shape[2:]) if x.dim() == 4 and x.shape[1] == 1 else tuple(x.shape)
            if one != tuple(expected):
                raise ValueError(f"{where} returned {name} of shape {list(x.shape)}; expected {list(expected)} "
                                 "(or with a token axis of 1), the prompt's batch, heads and head dim")  # fmt: skip
            if x.dtype != self.dtype or x.device != self.device:
                raise TypeError(f"{where} returned {name} of dtype {x.dtype} on {x.device}; expected the prompt's "
                                f"{self.dtype} on {self.device}")  # fmt: skip
        return tuple(x[:, 0] if x.dim() == 4 else x for x in token)


def generate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int | None = None,
    scale: float | None = None,
    next_token: NextToken | None = None,
    max_new_tokens: int = 0,
    initial_state: BLAState | None = None,
    state_dtype: torch.dtype | None = None,
    cuda_graph: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor, BLAState]:
    """Prefill a prompt with the chunked kernels, then decode ``max_new_tokens`` tokens one at a time, the
    state updated in place (a copy of the prefill's: ``initial_state`` is never written).

    Args:
        q, k, v: the prompt, `[B, T, HQ, K]`, `[B, T, H, K]`, `[B, T, H, V]` (T >= 0).
        window, resolution, num_slots, scale: as in `blurry_window_attention`.
        next_token: `next_token(o, i) -> (q, k, v)`: given the attention output of the previous token `o`
            `[B, HQ, V]` (None after an empty prompt) and the index i of the token to produce (0 for the first
            new token), the next token's
            `[B, HQ, K]`, `[B, H, K]`, `[B, H, V]` (a model's layer would project them from its hidden state).
        max_new_tokens: how many tokens to decode after the prompt (needs `next_token` when > 0).
        initial_state: a `BLAState` to continue from (default: a fresh sequence), as in `blurry_window_attention`.
        state_dtype: dtype the decoded tokens' state is kept in (see `decode_step`); default the accumulation
            dtype. The prefill runs with the accumulation dtype and its final state is then converted.
        cuda_graph: True: run the step as a CUDA graph (`bla_tvm.DecodeGraph`): per token, `next_token`, one
            copy of its tensors into the graph's inputs, one replay (the kernel and seen + 1) and one copy of o
            out. None (default) or False: per token, `next_token` and one launch of the decode kernel, which
            reads the token where it is (copied first only if not contiguous) and writes o into the result.

    Returns:
        (o_prompt `[B, T, HQ, V]`, o_new `[B, max_new_tokens, HQ, V]`, the state after the last token).

    Example:
        >>> q = k = torch.randn(1, 100, 2, 64); v = torch.randn(1, 100, 2, 64)
        >>> step = lambda o, i: (torch.randn(1, 2, 64), torch.randn(1, 2, 64), o)
        >>> o, new, state = generate(q, k, v, 64, 15, next_token=step, max_new_tokens=8)
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens and not callable(next_token):
        raise TypeError(f"next_token must be callable when max_new_tokens > 0, got {type(next_token).__name__}")
    if cuda_graph not in (None, True, False):
        raise TypeError(f"cuda_graph must be None, True or False, got {cuda_graph!r}")
    if cuda_graph and not (isinstance(q, torch.Tensor) and q.is_cuda):
        raise ValueError(f"cuda_graph=True needs CUDA inputs, got q on {getattr(q, 'device', None)}")
    o_prompt, state = blurry_window_attention(
        q, k, v, window, resolution, num_slots, scale, initial_state=initial_state, output_final_state=True
    )
    acc = state.key_state.dtype
    dtype = acc if state_dtype is None else state_dtype
    if dtype not in (acc, *REDUCED_STATE_KERNELS):
        raise TypeError(f"state_dtype must be None, {acc}, torch.float16 or torch.bfloat16, got {state_dtype}")
    dtypes = (dtype, dtype, torch.int64)
    state = BLAState(*(x.detach().to(dt, copy=True).contiguous() for x, dt in zip(state, dtypes)), state.window)
    B, HQ, V = o_prompt.shape[0], o_prompt.shape[2], o_prompt.shape[3]
    outputs = o_prompt.new_empty(max_new_tokens, B, HQ, V)  # token-major: each token's o one contiguous block
    last = o_prompt[:, -1] if o_prompt.shape[1] else None
    check = _TokenCheck(q, k, v)
    if max_new_tokens and cuda_graph and B:
        graph = DecodeGraph(state, window, resolution, num_slots, scale, query_heads=HQ, dtype=q.dtype)
        for i in range(max_new_tokens):
            last = outputs[i].copy_(graph(*check(next_token(last, i), i)))
    elif max_new_tokens:
        step = InPlaceSteps(state, window, resolution, num_slots, scale, max_new_tokens)
        last = step(*check(next_token(last, 0), 0), outputs[0])  # the first step checks the token against the state
        rows = zip(row_views(outputs[1:]), row_views(outputs[1:].view(-1, *step.kernel_output_shape)))
        for i, (row, kernel_row) in enumerate(rows, start=1):  # the next ones: generate's own check (the prompt's)
            step.launch_token(*check(next_token(last, i), i), kernel_row)
            last = row
        step.finish()
    return o_prompt, outputs.transpose(0, 1).contiguous(), state
