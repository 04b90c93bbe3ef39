"""Padding masks to packed sequences and back, as FLA's layers take them: ``attention_mask`` `[B, T]` is 1 at
the tokens of each row's sequence and 0 at padding (left padding in FLA's generation, but any 0/1 pattern is
read the same way: the row's sequence is its tokens where the mask is 1, in order).

``unpad`` packs those tokens into one row with ``cu_seqlens`` (B sequences, empty ones allowed); ``pad`` puts a
packed row back, with zeros at the padding. Packing selects tokens by the mask's values, so a masked call
leaves ``torch.compile``'s graph there (a graph break; ``fullgraph=True`` needs ``cu_seqlens`` or no mask).
"""

from __future__ import annotations

import torch


def check_attention_mask(attention_mask, batch: int, length: int, device) -> torch.Tensor:
    """The mask's last ``length`` columns as bool `[B, T]`, or a TypeError / ValueError naming attention_mask."""
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor [B, T] of 0/1, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch or attention_mask.shape[1] < length:
        raise ValueError(
            f"attention_mask must be a [B, T] padding mask (B = {batch}, at least T = {length} columns, the last T "
            f"for these tokens), got shape {list(attention_mask.shape)}; [B, T, T] attention masks are not supported"
        )
    if attention_mask.device != device:
        raise ValueError(f"attention_mask must be on hidden_states' device {device}, got {attention_mask.device}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer (0/1), got {attention_mask.dtype}")
    mask = attention_mask[:, attention_mask.shape[1] - length :]
    if mask.dtype != torch.bool:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (tokens)")
        mask = mask != 0
    return mask


def unpad(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x `[B, T, D]`, mask bool `[B, T]` -> (packed `[1, P, D]`, indices `[P]` of the tokens in x.flatten(0, 1),
    cu_seqlens `[B + 1]` int32), P = mask.sum()."""
    indices = mask.flatten().nonzero().squeeze(1)
    lengths = mask.sum(1, dtype=torch.int32)
    cu_seqlens = torch.cat([lengths.new_zeros(1), lengths.cumsum(0, dtype=torch.int32)])
    return x.flatten(0, 1)[indices].unsqueeze(0), indices, cu_seqlens


def pad(packed: torch.Tensor, indices: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """packed `[1, P, D]` -> `[B, T, D]`: token i at flat position indices[i], zeros elsewhere."""
    out = packed.new_zeros(batch * length, packed.shape[-1])
    return out.index_copy(0, indices, packed[0]).view(batch, length, -1)
