"""The short convolution of FLA's layers: a causal depthwise convolution over a few tokens, then SiLU, on packed
or batched sequences, with a cache of the last inputs so that a sequence can be continued in a later call.

Token t at offset p from the start of its sequence s, C taps:

    y_t = silu(bias + sum_{j < C} w[:, j] * x_{t - j})

where x_{t - j} with p - j < 0 comes from before the call: column C - 1 + (p - j) of the sequence's cache
[D, C - 1] (its last C - 1 inputs, oldest first; zeros for a fresh sequence). Sequences never read each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..params import check_int


def sequence_offsets(batch: int, length: int, cu_seqlens: torch.Tensor | None, device) -> torch.Tensor:
    """cu_seqlens [S + 1] of the sequences in x [B, T, ...]: the given offsets (B = 1), else B rows of T."""
    if cu_seqlens is not None:
        return cu_seqlens.to(torch.int64)
    return torch.arange(batch + 1, device=device, dtype=torch.int64) * length


class ShortConvolution(nn.Module):
    """Causal depthwise convolution of ``kernel_size`` taps over ``hidden_size`` channels, then SiLU.

    weight `[D, C]`: column j multiplies the input j tokens back (j = 0 is the current token); initialised as
    torch's ``nn.Conv1d`` (uniform in +-1/sqrt(C)).
    """

    def __init__(self, hidden_size: int, kernel_size: int, bias: bool = False):
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, 1)
        self.kernel_size = check_int("kernel_size", kernel_size, 1)
        bound = 1.0 / math.sqrt(kernel_size)
        self.weight = nn.Parameter(torch.empty(hidden_size, kernel_size).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(hidden_size).uniform_(-bound, bound)) if bias else None

    def extra_repr(self) -> str:
        return f"hidden_size={self.hidden_size}, kernel_size={self.kernel_size}, bias={self.bias is not None}"

    def forward(
        self,
        x: torch.Tensor,
        cache: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        output_final_state: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x `[B, T, D]` (B = 1 with `cu_seqlens` `[S + 1]`; else S = B sequences of T tokens), cache `[S, D, C - 1]`
        or None (fresh sequences). Returns (y `[B, T, D]`, the cache after the last token of each sequence, or
        None without ``output_final_state``)."""
        if cu_seqlens is None and x.shape[1] > 0:  # conv1d needs at least C inputs; T = 0 takes the gather
            return self._batched(x, cache, output_final_state)
        B, T, D = x.shape
        C = self.kernel_size
        offsets = sequence_offsets(B, T, cu_seqlens, x.device)
        S = offsets.shape[0] - 1
        if cache is None:
            cache = x.new_zeros(S, D, C - 1)
        # one table to read from: every sequence's cache (S blocks of C - 1 rows), then the tokens
        source = torch.cat([cache.transpose(1, 2).reshape(S * (C - 1), D), x.reshape(B * T, D)])
        starts = offsets[:-1]

        def rows(sequence, position):
            """Row of ``source`` holding the input at ``position`` (relative to its sequence's start, >= 1 - C)."""
            from_cache = sequence * (C - 1) + (C - 1) + position
            from_tokens = S * (C - 1) + starts[sequence] + position
            return torch.where(position >= 0, from_tokens, from_cache)

        t = torch.arange(B * T, device=x.device)
        sequence = torch.searchsorted(offsets[1:], t, right=True)  # the sequence of each token
        lag = torch.arange(C, device=x.device)
        taps = source[rows(sequence[:, None], (t - starts[sequence])[:, None] - lag)]  # [B T, C, D]
        y = torch.einsum("tcd,dc->td", taps, self.weight)
        if self.bias is not None:
            y = y + self.bias
        y = F.silu(y).view(B, T, D)
        if not output_final_state:
            return y, None
        lengths = offsets[1:] - starts
        last = lengths[:, None] - (C - 1) + torch.arange(C - 1, device=x.device)  # the last C - 1 positions
        final = source[rows(torch.arange(S, device=x.device)[:, None], last)]  # [S, C - 1, D]
        return y, final.transpose(1, 2)

    def _batched(self, x, cache, output_final_state):
        """B sequences of T tokens: each row's cache then its tokens, [B, D, C - 1 + T], through one depthwise
        ``F.conv1d`` (a few launches, where the packed gather above takes some twenty with its backward)."""
        B, T, D = x.shape
        C = self.kernel_size
        if cache is None:
            cache = x.new_zeros(B, D, C - 1)
        padded = torch.cat([cache, x.transpose(1, 2)], dim=2)
        taps = self.weight.flip(-1)[:, None, :]  # conv1d's tap C - 1 multiplies the current token; ours is tap 0
        y = F.silu(F.conv1d(padded, taps, self.bias, groups=D)).transpose(1, 2).contiguous()
        return y, (padded[:, :, T:] if output_final_state else None)
