"""The MQAR model: token and learned position embeddings, ``layers`` pre-norm blocks [RMSNorm, attention,
RMSNorm, MLP] with residuals, a final RMSNorm and the LM head. The attention is BLA
(``bla_tvm.nn.BlurryWindowAttention``) or sliding-window softmax attention (``SlidingWindowAttention``), both
[B, T, D] -> (o [B, T, D], None, None) in FLA's convention.

A method is a dict (it is stored with each run's results): {"name": "swa", "window": W, "kernel": "sdpa" |
"flex" (absent: "flex", the first GPU sweeps'), "short_conv" (absent: False)} or {"name": "bla",
"window": W, "resolution": N, "slots": "N" | "W" | M, "short_conv", "feature_map", "output_gate", "norm"}.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from bla_tvm.nn import BlurryWindowAttention, ShortConvolution


@functools.lru_cache(maxsize=None)
def _flex():
    """torch's FlexAttention (compiled: its eager form materialises the scores), or None before torch 2.5."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None
    return torch.compile(flex_attention), create_block_mask


@functools.lru_cache(maxsize=16)
def _block_mask(length: int, window: int, device: str):
    """FlexAttention's block mask of causal attention to the last ``window`` tokens, for ``length`` tokens."""
    _, create_block_mask = _flex()

    def sliding_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    return create_block_mask(sliding_window, None, None, length, length, device=device)


def sliding_window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int,
                             kernel: str = "sdpa") -> torch.Tensor:  # fmt: skip
    """Softmax attention of token t to tokens t - W < s <= t: q, k, v [B, H, T, D] -> [B, H, T, D]; through SDPA
    with a boolean [T, T] mask (``kernel`` "sdpa"), or compiled FlexAttention with a block mask ("flex"; the GPU
    sweeps that trained through it stayed near chance where SDPA's learned, README "MQAR")."""
    T = q.shape[2]
    if kernel == "flex":
        flex_attention, _ = _flex()
        return flex_attention(q, k, v, block_mask=_block_mask(T, window, str(q.device)))
    t = torch.arange(T, device=q.device)
    lag = t[:, None] - t[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=(lag >= 0) & (lag < window))


class SlidingWindowAttention(nn.Module):
    """q, k, v projections, ``sliding_window_attention`` per head, output projection: the BLA layer's plain
    configuration with exact attention over the window (state: the window's keys and values, 2 W head_dim
    floats per head). ``short_conv``: the BLA layer's short convolutions (4 taps, then SiLU) on q, k and v."""

    def __init__(self, hidden_size: int, num_heads: int, window: int, kernel: str = "sdpa", short_conv=False):
        super().__init__()
        if kernel not in ("sdpa", "flex"):
            raise ValueError(f"kernel must be 'sdpa' or 'flex', got {kernel!r}")
        self.num_heads, self.window, self.kernel = num_heads, window, kernel
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.convs = nn.ModuleList(ShortConvolution(hidden_size, 4) for _ in range(3)) if short_conv else None

    def forward(self, x: torch.Tensor):
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [B, T, hidden]
        if self.convs is not None:
            q, k, v = (conv(y)[0] for conv, y in zip(self.convs, (q, k, v)))
        q, k, v = (y.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for y in (q, k, v))  # 3 x [B, H, T, D]
        o = sliding_window_attention(q, k, v, self.window, self.kernel)
        return self.o_proj(o.transpose(1, 2).flatten(2)), None, None


def num_slots(method: dict) -> int:
    """M of a BLA method: N ("N"), W ("W") or the number given."""
    return {"N": method["resolution"], "W": method["window"]}.get(method["slots"], method["slots"])


def make_attention(method: dict, hidden_size: int, num_heads: int, layer_idx: int) -> nn.Module:
    if method["name"] == "swa":
        return SlidingWindowAttention(hidden_size, num_heads, method["window"], method.get("kernel", "flex"),
                                      method.get("short_conv", False))  # fmt: skip
    if method["name"] == "bla":
        return BlurryWindowAttention(
            hidden_size, num_heads, window=method["window"], resolution=method["resolution"],
            num_slots=num_slots(method), use_short_conv=method["short_conv"], feature_map=method["feature_map"],
            use_output_gate=method["output_gate"], use_norm=method["norm"], layer_idx=layer_idx,
        )  # fmt: skip
    raise ValueError(f"method name must be 'swa' or 'bla', got {method['name']!r}")


def state_floats(method: dict, head_dim: int) -> int:
    """Floats of attention state per layer and head: the window's keys and values for SWA (2 W head_dim), the
    frequency window's for BLA (2 N head_dim, whatever M)."""
    size = method["window"] if method["name"] == "swa" else method["resolution"]
    return 2 * size * head_dim


class Block(nn.Module):
    """x + attention(norm(x)), then + MLP(norm(x)) (4 x width, GELU)."""

    def __init__(self, attention: nn.Module, hidden_size: int):
        super().__init__()
        self.attention_norm, self.attention = nn.RMSNorm(hidden_size), attention
        self.mlp_norm = nn.RMSNorm(hidden_size)
        width = 4 * hidden_size
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width), nn.GELU(), nn.Linear(width, hidden_size))

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))[0]
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    """tokens [B, T] -> logits [B, T, vocab_size]."""

    def __init__(self, method: dict, vocab_size: int, seq_len: int, d_model: int, layers: int, heads: int):
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model ({d_model}) must be a multiple of heads ({heads})")
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(torch.randn(seq_len, d_model) / math.sqrt(d_model))
        self.blocks = nn.ModuleList(Block(make_attention(method, d_model, heads, i), d_model) for i in range(layers))
        self.norm = nn.RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T] -> the final norm's output [B, T, d_model]."""
        x = self.embedding(tokens) + self.positions[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, where: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab_size], or [B, P, vocab_size] at the positions ``where`` [B, P] (int64) alone (MQAR
        scores 16 of 256: the head over every position was most of a step)."""
        hidden = self.hidden(tokens)
        if where is not None:
            hidden = hidden.gather(1, where[..., None].expand(-1, -1, hidden.shape[-1]))
        return self.head(hidden)
