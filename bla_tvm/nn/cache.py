"""What a stack of ``BlurryWindowAttention`` layers carries between calls (FLA's ``Cache``, without transformers).

Per layer (``layer_idx``), a ``LayerState``: the attention's ``BLAState`` (key_state `[S, H, N, K]`, value_state
`[S, H, N, V]`, seen `[S]`, window) and, for layers with a short convolution, its caches of q, k, v's last inputs
`[S, D, C - 1]` each. S is the batch size B, or the number of sequences with ``cu_seqlens`` / ``attention_mask``.
Its size does not grow with the tokens seen.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..state import BLAState


class LayerState(NamedTuple):
    attention: BLAState
    conv: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None


class BLACache:
    """Per-layer states, read by a layer's forward when it holds an entry for its ``layer_idx``, and written by a
    forward with ``use_cache=True``.

    Example:
        >>> cache = BLACache()
        >>> o, _, cache = layer(prompt, past_key_values=cache, use_cache=True)
        >>> o, _, cache = layer(next_token, past_key_values=cache, use_cache=True)
    """

    def __init__(self):
        self.layers: dict[int, LayerState] = {}

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, layer_idx: int) -> bool:
        return layer_idx in self.layers

    def get(self, layer_idx: int) -> LayerState | None:
        """The state layer ``layer_idx`` left, or None before its first cached call."""
        return self.layers.get(layer_idx)

    def update(self, layer_idx: int, state: LayerState) -> None:
        self.layers[layer_idx] = state

    def seen(self, layer_idx: int = 0) -> torch.Tensor | None:
        """Tokens each sequence has seen `[S]` (int64), or None before layer ``layer_idx``'s first cached call."""
        state = self.layers.get(layer_idx)
        return None if state is None else state.attention.seen
