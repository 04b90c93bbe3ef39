"""``BlurryWindowAttention``: a BLA attention layer with FLA's layer conventions (fla/layers: projections, GQA,
optional short convolution, feature map, output normalisation and gate; forward(hidden_states, attention_mask,
past_key_values, use_cache, cu_seqlens) -> (o, None, past_key_values)).

With x the layer's input `[B, T, hidden_size]`, HQ query heads and H key/value heads:

    q = phi(conv_q(x Wq))  [B, T, HQ, K]     k = phi(conv_k(x Wk))  [B, T, H, K]     v = conv_v(x Wv)  [B, T, H, V]
    o = BLA(q, k, v; window W, resolution N, slots M)                                    [B, T, HQ, V]
    o = rmsnorm(o) * silu(x Wg)      (per head: each factor only where enabled)
    y = o.flatten(-2) Wo                                                                  [B, T, hidden_size]

conv_* are the optional short convolutions (``ShortConvolution``: causal, depthwise, SiLU) and phi the optional
feature map. Prefill and training run ``bla_tvm.blurry_window_attention`` (chunked kernels, autograd); a single
token per sequence outside autograd runs ``bla_tvm.decode_step`` (the recurrent kernel). Both read and write the
same state, so any split of a sequence into calls gives the output of one call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..api import blurry_window_attention
from ..decode import decode_step
from ..params import BLAParams, check_bool, check_int, check_positive, check_scale
from ..state import check_state
from .cache import BLACache, LayerState
from .conv import ShortConvolution
from .padding import check_attention_mask, pad, unpad


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """1 + elu(x): positive, linear above 0 (linear attention's feature map, Katharopoulos et al. 2020)."""
    return F.elu(x) + 1.0


#: dtypes a cached attention state may have (the kernels check which one a call takes)
STATE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

#: feature maps applied to q and k (after the short convolution); None: none
FEATURE_MAPS = {"swish": F.silu, "relu": F.relu, "elu": elu_plus_one}


def per_head(name: str, total: float, heads: int, of: str) -> int:
    """``total`` channels split over ``heads`` heads, or a ValueError naming ``name`` where that is no whole
    number >= 1 (``of`` says what ``total`` is)."""
    if total != int(total) or int(total) < heads or int(total) % heads:
        raise ValueError(f"{name} must make {of} (= {total}) a positive multiple of {heads}")
    return int(total) // heads


class BlurryWindowAttention(nn.Module):
    """Blurry Window Attention (arXiv 2606.09862) as a layer, in FLA's conventions.

    Args:
        hidden_size: D, the input and output width.
        num_heads: HQ, query heads.
        num_kv_heads: H, key/value heads (GQA: HQ a multiple of H; query head hq reads kv head hq // (HQ / H)).
            Default HQ.
        head_dim: K, the query/key head dim; the value head dim is V = head_dim * expand_v. Default: FLA's
            ratios, K = hidden_size * expand_k / HQ and V = hidden_size * expand_v / HQ.
        expand_k, expand_v: those ratios (expand_k only without head_dim).
        window, resolution, num_slots: BLA's W, N, M (`bla_tvm.blurry_window_attention`; M defaults to N). The
            state per sequence and kv head is N x (K + V) floats.
        scale: the softmax temperature; default 1 / sqrt(K).
        use_short_conv: causal depthwise convolutions of `conv_size` taps (then SiLU) on q, k and v's
            projections, as FLA's layers (`conv_bias`: with a bias).
        feature_map: applied to q and k after the convolution: None (the default), "swish" (x sigmoid(x)),
            "relu", or "elu" (1 + elu(x), positive).
        use_output_gate: multiply the attention output by silu(x Wg), per head (FLA's swish gate).
        use_norm: RMSNorm of each head's output (over V, `norm_eps`, learnable weight unless
            `elementwise_affine=False`) before the gate and the output projection, as GSA's output norm.
        layer_idx: this layer's index in a ``BLACache``; needed with `past_key_values` or `use_cache`.

    The defaults (no convolution, feature map, gate or norm) make a plain attention layer: q, k, v projections,
    BLA, output projection; at N = W = M that is sliding-window softmax attention of window W.

    Example:
        >>> layer = BlurryWindowAttention(hidden_size=256, num_heads=4, window=128, resolution=31, layer_idx=0)
        >>> o, _, cache = layer(torch.randn(2, 100, 256), use_cache=True)          # prefill
        >>> o, _, cache = layer(torch.randn(2, 1, 256), past_key_values=cache, use_cache=True)  # one more token
    """

    def __init__(
        self,
        hidden_size: int = 1024,
        num_heads: int = 4,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        expand_k: float = 1.0,
        expand_v: float = 1.0,
        window: int = 512,
        resolution: int = 63,
        num_slots: int | None = None,
        scale: float | None = None,
        use_short_conv: bool = False,
        conv_size: int = 4,
        conv_bias: bool = False,
        feature_map: str | None = None,
        use_output_gate: bool = False,
        use_norm: bool = False,
        elementwise_affine: bool = True,
        norm_eps: float = 1e-5,
        layer_idx: int | None = None,
    ):
        super().__init__()
        self.hidden_size = check_int("hidden_size", hidden_size, 1)
        self.num_heads = check_int("num_heads", num_heads, 1)
        self.num_kv_heads = num_heads if num_kv_heads is None else check_int("num_kv_heads", num_kv_heads, 1)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads must divide num_heads ({num_heads}) (GQA), got {num_kv_heads}")
        expand_k, expand_v = check_positive("expand_k", expand_k), check_positive("expand_v", expand_v)
        if head_dim is None:
            self.head_k_dim = per_head("expand_k", hidden_size * expand_k, num_heads, "hidden_size * expand_k")
            self.head_v_dim = per_head("expand_v", hidden_size * expand_v, num_heads, "hidden_size * expand_v")
        else:
            if expand_k != 1.0:
                raise ValueError(f"expand_k must be left at 1.0 when head_dim is given, got {expand_k}")
            self.head_k_dim = check_int("head_dim", head_dim, 1)
            self.head_v_dim = per_head("expand_v", head_dim * expand_v, 1, "head_dim * expand_v")
        self.params = BLAParams.make(window, resolution, num_slots)
        self.scale = check_scale(scale, self.head_k_dim)
        self.use_short_conv = check_bool("use_short_conv", use_short_conv)
        self.conv_size = check_int("conv_size", conv_size, 1)
        check_bool("conv_bias", conv_bias)
        if feature_map is not None and feature_map not in FEATURE_MAPS:
            raise ValueError(f"feature_map must be None or one of {sorted(FEATURE_MAPS)}, got {feature_map!r}")
        self.feature_map = feature_map
        self.use_output_gate = check_bool("use_output_gate", use_output_gate)
        self.use_norm = check_bool("use_norm", use_norm)
        check_bool("elementwise_affine", elementwise_affine)
        norm_eps = check_positive("norm_eps", norm_eps)
        if layer_idx is not None:
            check_int("layer_idx", layer_idx, 0)
        self.layer_idx = layer_idx

        key_dim, value_dim = self.num_heads * self.head_k_dim, self.num_heads * self.head_v_dim
        kv_key_dim, kv_value_dim = self.num_kv_heads * self.head_k_dim, self.num_kv_heads * self.head_v_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, kv_key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, kv_value_dim, bias=False)
        if use_short_conv:
            self.q_conv1d = ShortConvolution(key_dim, conv_size, conv_bias)
            self.k_conv1d = ShortConvolution(kv_key_dim, conv_size, conv_bias)
            self.v_conv1d = ShortConvolution(kv_value_dim, conv_size, conv_bias)
        if use_output_gate:
            self.g_proj = nn.Linear(hidden_size, value_dim, bias=False)
        if use_norm:
            self.o_norm = nn.RMSNorm(self.head_v_dim, eps=norm_eps, elementwise_affine=elementwise_affine)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

    def extra_repr(self) -> str:
        p = self.params
        return (f"window={p.window}, resolution={p.resolution}, num_slots={p.num_slots}, "
                f"heads={self.num_heads}/{self.num_kv_heads}, head_dims=({self.head_k_dim}, {self.head_v_dim}), "
                f"feature_map={self.feature_map}, layer_idx={self.layer_idx}")  # fmt: skip

    def state_floats(self) -> int:
        """Floats of attention state per sequence and key/value head: N (K + V) (the short convolutions add
        (C - 1) channels per sequence)."""
        return self.params.resolution * (self.head_k_dim + self.head_v_dim)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values: BLACache | None = None,
        use_cache: bool = False,
        cu_seqlens: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, None, BLACache | None]:
        """Args:
            hidden_states: x `[B, T, hidden_size]`.
            attention_mask: `[B, T']` 0/1 padding mask (T' >= T, its last T columns for these tokens; FLA's
                left padding): each row's tokens where it is 1 form that row's sequence (``padding``); the
                output is 0 at padding. Runs as packed sequences (not inside ``fullgraph`` compilation).
            past_key_values: a ``BLACache`` whose entry for ``layer_idx``, if any, these tokens continue.
            use_cache: write the state after these tokens into `past_key_values` (a new ``BLACache`` if None).
            cu_seqlens: `[S + 1]` offsets of S sequences packed in one row (B = 1), instead of a mask.

        Returns:
            (o `[B, T, hidden_size]`, None (no attention weights), the cache: `past_key_values`, updated with
            `use_cache`). The cache's state has one row per sequence: B, or S with `cu_seqlens`.
        """
        x = self._check_inputs(hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens)
        B, T, _ = x.shape
        if attention_mask is not None:
            x, indices, cu_seqlens = unpad(x, check_attention_mask(attention_mask, B, T, x.device))
        last = past_key_values.get(self.layer_idx) if past_key_values is not None else None
        if last is not None:
            last = self._check_cached(last, B if cu_seqlens is None else cu_seqlens.shape[0] - 1, x.device)

        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv_state = None
        if self.use_short_conv:
            caches = (None, None, None) if last is None else last.conv
            convs = (self.q_conv1d, self.k_conv1d, self.v_conv1d)
            outputs = [conv(y, c, cu_seqlens, use_cache) for conv, y, c in zip(convs, (q, k, v), caches)]
            (q, k, v), conv_state = (y for y, _ in outputs), tuple(c for _, c in outputs)
        q = q.unflatten(-1, (self.num_heads, self.head_k_dim))
        k = k.unflatten(-1, (self.num_kv_heads, self.head_k_dim))
        v = v.unflatten(-1, (self.num_kv_heads, self.head_v_dim))
        if self.feature_map is not None:
            q, k = FEATURE_MAPS[self.feature_map](q), FEATURE_MAPS[self.feature_map](k)

        o, state = self._attend(q, k, v, None if last is None else last.attention, use_cache, cu_seqlens)
        if self.use_norm:
            o = self.o_norm(o)
        if self.use_output_gate:
            o = o * F.silu(self.g_proj(x)).unflatten(-1, (self.num_heads, self.head_v_dim))
        o = self.o_proj(o.flatten(-2))
        if attention_mask is not None:
            o = pad(o, indices, B, T)
        if use_cache:
            past_key_values = BLACache() if past_key_values is None else past_key_values
            past_key_values.update(self.layer_idx, LayerState(state, conv_state))
        return o, None, past_key_values

    def _attend(self, q, k, v, initial, use_cache: bool, cu_seqlens):
        """(o `[B, T, HQ, V]`, the final BLAState or None): one token per sequence outside autograd through the
        decode kernel, anything else through the chunked op."""
        p = self.params
        needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
        if q.shape[1] == 1 and cu_seqlens is None and not needs_grad:
            return decode_step(q, k, v, initial, p.window, p.resolution, p.num_slots, self.scale)
        return blurry_window_attention(q, k, v, p.window, p.resolution, p.num_slots, self.scale,
                                       initial_state=initial, output_final_state=use_cache, cu_seqlens=cu_seqlens)

    def _check_cached(self, last, sequences: int, device: torch.device) -> LayerState:
        """The cache's entry for this layer, or a TypeError / ValueError naming it and what does not fit: a
        LayerState for ``sequences`` sequences of this layer's heads, dims, window and short convolutions."""
        where = f"past_key_values.get({self.layer_idx})"
        if not isinstance(last, LayerState):
            raise TypeError(f"{where} must be a LayerState, got {type(last).__name__}")
        p = self.params
        try:
            check_state(last.attention, sequences, self.num_kv_heads, p.resolution, self.head_k_dim, self.head_v_dim,
                        STATE_DTYPES, device, p.window)  # fmt: skip
        except (TypeError, ValueError) as error:
            raise type(error)(str(error).replace("initial_state", f"{where}.attention")) from None
        if not self.use_short_conv:
            if last.conv is not None:
                raise ValueError(f"{where}.conv must be None: this layer has no short convolution")
            return last
        channels = (self.num_heads * self.head_k_dim, self.num_kv_heads * self.head_k_dim,
                    self.num_kv_heads * self.head_v_dim)  # fmt: skip
        if not isinstance(last.conv, tuple) or len(last.conv) != 3:
            raise TypeError(f"{where}.conv must be the q, k, v convolution caches (a tuple of 3 tensors)")
        for name, cache, D in zip("qkv", last.conv, channels):
            shape = (sequences, D, self.conv_size - 1)
            if not isinstance(cache, torch.Tensor) or tuple(cache.shape) != shape:
                raise ValueError(f"{where}.conv's {name} cache must be a tensor of shape {list(shape)}, got "
                                 f"{list(getattr(cache, 'shape', [type(cache).__name__]))}")  # fmt: skip
        return last

    def _check_inputs(self, hidden_states, attention_mask, past_key_values, use_cache, cu_seqlens) -> torch.Tensor:
        """hidden_states, or a TypeError / ValueError naming the argument that does not fit."""
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states must be a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states must have shape [B, T, hidden_size={self.hidden_size}], got "
                             f"{list(hidden_states.shape)}")  # fmt: skip
        if not hidden_states.dtype.is_floating_point:
            raise TypeError(f"hidden_states must have a floating dtype, got {hidden_states.dtype}")
        check_bool("use_cache", use_cache)
        if past_key_values is not None and not isinstance(past_key_values, BLACache):
            raise TypeError(f"past_key_values must be a BLACache or None, got {type(past_key_values).__name__}")
        if (use_cache or past_key_values is not None) and self.layer_idx is None:
            raise ValueError("layer_idx must be set (BlurryWindowAttention(..., layer_idx=i)) to use "
                             "past_key_values or use_cache: it names this layer's entry in the cache")  # fmt: skip
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("attention_mask and cu_seqlens both given: pass one (a mask is packed into cu_seqlens)")
        return hidden_states
