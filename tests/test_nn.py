"""``bla_tvm.nn.BlurryWindowAttention`` on the CPU: the layer against a float64 reference written here with plain
torch (F.conv1d, an RMSNorm formula) and ``bla_quadratic``; gradients; the cache (prefill + steps == one call);
GQA; packed sequences and padding masks against separate calls; torch.compile(fullgraph=True); bad arguments.

One BLA shape throughout (W = 8, N = M = 5, K = V = 16; float32 and float64, GQA group 1 and 2), so that the
module compiles few kernels.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import max_rel_err

from bla_tvm import BLAState, bla_quadratic
from bla_tvm.nn import BLACache, BlurryWindowAttention, LayerState, ShortConvolution

BLA = dict(window=8, resolution=5)
PLAIN = dict(hidden_size=32, num_heads=2, **BLA)  # K = V = 16
FULL = dict(PLAIN, use_short_conv=True, conv_size=3, conv_bias=True, feature_map="swish", use_output_gate=True,
            use_norm=True)  # fmt: skip
GQA = dict(FULL, num_heads=4, num_kv_heads=2, head_dim=16)  # HQ = 4 over H = 2, K = V = 16
LAYERS = {"plain": PLAIN, "full": FULL, "gqa": GQA}


def make_layer(config: dict, seed: int = 0, dtype=torch.float32, **overrides) -> BlurryWindowAttention:
    """The layer with its RMSNorm weight and conv taps drawn at random too (not left at ones), so every
    parameter changes the output."""
    torch.manual_seed(seed)
    layer = BlurryWindowAttention(**{**config, "layer_idx": 0, **overrides})
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return layer.to(dtype)


def hidden(B: int, T: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)


FEATURE_MAPS = {None: lambda x: x, "swish": lambda x: x * torch.sigmoid(x), "relu": F.relu,
                "elu": lambda x: torch.where(x > 0, x + 1, torch.exp(x))}  # fmt: skip


def reference(layer: BlurryWindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The layer's output for x [B, T, D] from its parameters, in float64: projections, causal convolutions by
    F.conv1d on left-padded inputs, the feature map, ``bla_quadratic`` (the slot-kernel form), RMSNorm, gate, output
    projection."""
    L, x = copy.deepcopy(layer).double(), x.double()

    def conv(module, y):
        C, D = module.kernel_size, y.shape[-1]
        w = module.weight.flip(-1)[:, None, :]  # conv1d's tap C - 1 is the current token; ours is tap 0
        out = F.conv1d(F.pad(y.transpose(1, 2), (C - 1, 0)), w, module.bias, groups=D)
        return F.silu(out).transpose(1, 2)

    q, k, v = L.q_proj(x), L.k_proj(x), L.v_proj(x)
    if L.use_short_conv:
        q, k, v = conv(L.q_conv1d, q), conv(L.k_conv1d, k), conv(L.v_conv1d, v)
    q, k = (FEATURE_MAPS[L.feature_map](y.unflatten(-1, (-1, L.head_k_dim))) for y in (q, k))
    v = v.unflatten(-1, (-1, L.head_v_dim))
    p = L.params
    o = bla_quadratic(q, k, v, p.window, p.resolution, p.num_slots, L.scale)
    if L.use_norm:
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + L.o_norm.eps) * L.o_norm.weight
    if L.use_output_gate:
        o = o * F.silu(L.g_proj(x)).unflatten(-1, (-1, L.head_v_dim))
    return L.o_proj(o.flatten(-2))


@pytest.mark.parametrize("name", LAYERS)
def test_layer_matches_reference(name):
    """Output shape [B, T, D], no attention weights, no cache without use_cache; float32 output within 2e-5 of
    the float64 reference (T = 37 spans several windows)."""
    layer = make_layer(LAYERS[name])
    x = hidden(2, 37)
    o, weights, cache = layer(x)
    assert o.shape == (2, 37, 32) and o.dtype == torch.float32
    assert weights is None and cache is None
    assert max_rel_err(o, reference(layer, x)) <= 2e-5


@pytest.mark.parametrize("feature_map", ["relu", "elu"])
def test_feature_maps(feature_map):
    layer = make_layer(PLAIN, feature_map=feature_map)
    x = hidden(1, 20)
    assert max_rel_err(layer(x)[0], reference(layer, x)) <= 2e-5


def test_gradients_reach_every_parameter_and_match_float64():
    """A loss with random weights, float32 against the same layer in float64: every parameter gets a finite,
    nonzero gradient, within 1e-4 (relative to its largest entry) of float64's, and so does the input."""
    layers = {dt: make_layer(FULL, dtype=dt) for dt in (torch.float32, torch.float64)}
    weights = torch.randn(2, 30, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = {}
    for dtype, layer in layers.items():
        x = hidden(2, 30, dtype=dtype).requires_grad_()
        (layer(x)[0] * weights.to(dtype)).sum().backward()
        grads[dtype] = {"input": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}
    assert set(grads[torch.float32]) == {"input", *(n for n, _ in layers[torch.float32].named_parameters())}
    for name, g32 in grads[torch.float32].items():
        g64 = grads[torch.float64][name]
        assert g32 is not None and torch.isfinite(g32).all() and g64.abs().max() > 0, name
        assert max_rel_err(g32, g64) <= 1e-4, name


def test_gradcheck_float64():
    """torch.autograd.gradcheck (float64, finite differences; fast mode: along random directions) of the layer's
    output with respect to its input and every parameter, on a tiny problem."""
    layer = make_layer(FULL, dtype=torch.float64)
    names, values = zip(*((n, p.detach().clone().requires_grad_()) for n, p in layer.named_parameters()))
    x = hidden(1, 10, dtype=torch.float64).requires_grad_()

    def f(x, *params):
        return torch.func.functional_call(layer, dict(zip(names, params)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *values), fast_mode=True)


def run_in_pieces(layer, x, lengths, **kwargs):
    """x [B, T, D] through the layer in consecutive calls of ``lengths`` tokens, carrying a BLACache."""
    outputs, cache, start = [], None, 0
    for n in lengths:
        o, _, cache = layer(x[:, start : start + n], past_key_values=cache, use_cache=True, **kwargs)
        outputs.append(o)
        start += n
    return torch.cat(outputs, dim=1), cache


@pytest.mark.parametrize("name", ["full", "gqa"])
@pytest.mark.parametrize("lengths", [(13, 9) + (1,) * 8, (1, 1, 2, 1, 25)], ids=["prefill-steps", "steps-prefill"])
def test_cache_continues_a_sequence(name, lengths):
    """Prefill then single-token steps (the decode kernel, outside autograd), and steps then a prefill, give one
    call's output; the cache has seen every token."""
    layer = make_layer(LAYERS[name])
    x = hidden(2, sum(lengths))
    with torch.no_grad():
        whole = layer(x)[0]
        pieces, cache = run_in_pieces(layer, x, lengths)
    assert max_rel_err(pieces, whole) <= 1e-5
    assert cache.seen().tolist() == [sum(lengths)] * 2 and len(cache) == 1


def test_cache_carries_gradients_through_single_token_calls():
    """With autograd on, single-token calls run the chunked op (the decode kernel has no backward): the same
    outputs, and gradients flow back through the carried state into the earlier tokens."""
    layer = make_layer(FULL)
    x = hidden(2, 12).requires_grad_()
    pieces, _ = run_in_pieces(layer, x, (10, 1, 1))
    assert max_rel_err(pieces, layer(x)[0]) <= 1e-5
    pieces[:, -1].sum().backward()
    assert x.grad[:, :10].abs().amax(dim=(1, 2)).min() > 0


def test_gqa_equals_repeated_key_value_heads():
    """A GQA layer (HQ = 4 over H = 2) gives the output of a layer with 4 key/value heads whose key and value
    projections and convolutions repeat each of the GQA layer's heads twice."""
    gqa = make_layer(GQA)
    full = make_layer(GQA, num_kv_heads=4)
    state = gqa.state_dict()
    for name in ("k_proj.weight", "v_proj.weight", "k_conv1d.weight", "k_conv1d.bias", "v_conv1d.weight",
                 "v_conv1d.bias"):  # fmt: skip
        state[name] = state[name].unflatten(0, (2, 16)).repeat_interleave(2, dim=0).flatten(0, 1)
    full.load_state_dict(state)
    x = hidden(2, 30)
    assert max_rel_err(gqa(x)[0], full(x)[0]) <= 1e-6


def test_packed_sequences_equal_separate_calls():
    """cu_seqlens [0, 7, 7, 25, 40] (an empty sequence among them): outputs and cached states equal separate
    calls on each sequence, and a packed continuation from the cache equals separate continuations."""
    layer = make_layer(FULL)
    cu = torch.tensor([0, 7, 7, 25, 40])
    x, more = hidden(1, 40), hidden(1, 8, seed=2)
    more_cu = torch.tensor([0, 2, 3, 5, 8])
    with torch.no_grad():
        o, _, cache = layer(x, cu_seqlens=cu, use_cache=True)
        o2, _, cache = layer(more, cu_seqlens=more_cu, past_key_values=cache, use_cache=True)
        for s in range(4):
            a, b = cu[s].item(), cu[s + 1].item()
            c, d = more_cu[s].item(), more_cu[s + 1].item()
            alone, cached = run_in_pieces(layer, torch.cat([x[:, a:b], more[:, c:d]], dim=1), (b - a, d - c))
            assert max_rel_err(o[:, a:b], alone[:, : b - a]) <= 1e-5, f"sequence {s}"
            assert max_rel_err(o2[:, c:d], alone[:, b - a :]) <= 1e-5, f"sequence {s}, continued"
            entry, mine = cached.get(0), cache.get(0)
            assert mine.attention.seen[s] == entry.attention.seen[0] == b - a + d - c
            assert max_rel_err(mine.attention.key_state[s], entry.attention.key_state[0]) <= 1e-5
            for ours, theirs in zip(mine.conv, entry.conv):
                assert max_rel_err(ours[s], theirs[0]) <= 1e-6, f"sequence {s}: short-convolution cache"


def test_short_convolution_batched_equals_packed():
    """The short convolution's two paths, batched rows through F.conv1d and packed sequences through the gather,
    give the same outputs, final caches and gradients (float64, 3 taps with bias, a cache coming in)."""
    torch.manual_seed(0)
    conv = ShortConvolution(8, 3, bias=True).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    cache = torch.randn(3, 8, 2, dtype=torch.float64)
    batched, batched_final = conv(x, cache, output_final_state=True)
    packed, packed_final = conv(x.reshape(1, 15, 8), cache, torch.tensor([0, 5, 10, 15]), output_final_state=True)
    assert max_rel_err(batched, packed.view(3, 5, 8)) <= 1e-12
    assert max_rel_err(batched_final, packed_final) <= 1e-12
    weights = torch.randn(3, 5, 8, dtype=torch.float64)
    grads = [torch.autograd.grad((y.view(3, 5, 8) * weights).sum(), (x, conv.weight, conv.bias))
             for y in (batched, packed)]  # fmt: skip
    for ours, theirs in zip(*grads):
        assert max_rel_err(ours, theirs) <= 1e-12


def test_attention_mask_equals_unpadded_calls():
    """Left padding (rows of 12, 5 and 0 tokens): each row's outputs equal a call on its tokens alone, zeros at
    padding; then single-token steps with the mask extended by ones continue each row's sequence."""
    layer = make_layer(FULL)
    lengths, T, steps = [12, 5, 0], 12, 3
    mask = torch.stack([torch.arange(T) >= T - n for n in lengths]).long()
    x, new = hidden(3, T), hidden(3, steps, seed=2)
    with torch.no_grad():
        o, _, cache = layer(x, attention_mask=mask, use_cache=True)
        stepped = []
        for t in range(steps):
            mask = torch.cat([mask, torch.ones(3, 1, dtype=mask.dtype)], dim=1)
            o_t, _, cache = layer(new[:, t : t + 1], attention_mask=mask, past_key_values=cache, use_cache=True)
            stepped.append(o_t)
        stepped = torch.cat(stepped, dim=1)
        assert cache.seen().tolist() == [n + steps for n in lengths]
        for row, n in enumerate(lengths):
            alone = layer(torch.cat([x[row : row + 1, T - n :], new[row : row + 1]], dim=1))[0][0]
            assert (o[row, : T - n] == 0).all()
            assert max_rel_err(o[row, T - n :], alone[:n]) <= 1e-5, f"row {row}"
            assert max_rel_err(stepped[row], alone[n:]) <= 1e-5, f"row {row}, steps"


@pytest.fixture
def fresh_compile():
    """A clean dynamo state, and inductor's on-disk caches off (see test_training.py)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


def test_compiled_forward_matches_eager(fresh_compile):
    """torch.compile(fullgraph=True) of the layer (aot_eager: the graph and its autograd without inductor's
    minutes of codegen on two cores): the same output and gradients as eager, for packed sequences; and a
    cached prefill and decode step, compiled, continue the sequence as eager does."""
    layer = make_layer(FULL)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x, cu = hidden(1, 30), torch.tensor([0, 11, 30])
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, graph = layer(eager_x, cu_seqlens=cu)[0], compiled(compiled_x, cu_seqlens=cu)[0]
    assert max_rel_err(graph, eager) <= 1e-6
    eager.sum().backward()
    graph.sum().backward()
    assert max_rel_err(compiled_x.grad, eager_x.grad) <= 1e-6
    with torch.no_grad():
        expected = layer(x)[0]
        prefill, _, cache = compiled(x[:, :29], use_cache=True)
        step, _, cache = compiled(x[:, 29:], past_key_values=cache, use_cache=True)
    assert max_rel_err(torch.cat([prefill, step], dim=1), expected) <= 1e-5
    assert cache.seen().tolist() == [30]


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(hidden_size=0), ValueError, "hidden_size"),
        (dict(hidden_size=32.0), TypeError, "hidden_size"),
        (dict(num_heads=0), ValueError, "num_heads"),
        (dict(num_heads=3), ValueError, "expand_k"),
        (dict(num_kv_heads=3), ValueError, "num_kv_heads"),
        (dict(expand_k=-1.0), ValueError, "expand_k"),
        (dict(expand_v=0.3), ValueError, "expand_v"),
        (dict(expand_v="1"), TypeError, "expand_v"),
        (dict(head_dim=0), ValueError, "head_dim"),
        (dict(head_dim=16, expand_k=2.0), ValueError, "expand_k"),
        (dict(window=0), ValueError, "window"),
        (dict(resolution=4), ValueError, "resolution"),
        (dict(resolution=9), ValueError, "resolution"),
        (dict(num_slots=0), ValueError, "num_slots"),
        (dict(scale=float("nan")), ValueError, "scale"),
        (dict(use_short_conv="yes"), TypeError, "use_short_conv"),
        (dict(conv_size=0), ValueError, "conv_size"),
        (dict(conv_bias=1), TypeError, "conv_bias"),
        (dict(feature_map="tanh"), ValueError, "feature_map"),
        (dict(use_output_gate=1), TypeError, "use_output_gate"),
        (dict(use_norm=None), TypeError, "use_norm"),
        (dict(elementwise_affine="no"), TypeError, "elementwise_affine"),
        (dict(norm_eps=0.0), ValueError, "norm_eps"),
        (dict(layer_idx=-1), ValueError, "layer_idx"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_constructor_arguments_are_named(kwargs, error, name):
    with pytest.raises(error, match=name):
        BlurryWindowAttention(**{**PLAIN, **kwargs})


def cache_of(state: BLAState) -> BLACache:
    cache = BLACache()
    cache.update(0, LayerState(state))
    return cache


def forward_errors():
    """(description, call(layer) that must fail, error type, the argument its message names)."""
    x = hidden(2, 5)
    other_window = cache_of(BLAState.zeros(2, 2, 5, 16, 16, window=16))
    one_sequence = cache_of(BLAState.zeros(1, 2, 5, 16, 16, window=8))
    return [
        ("list", lambda m: m([[0.0] * 32]), TypeError, "hidden_states"),
        ("width", lambda m: m(torch.zeros(2, 5, 31)), ValueError, "hidden_states"),
        ("integer", lambda m: m(torch.zeros(2, 5, 32, dtype=torch.long)), TypeError, "hidden_states"),
        ("mask-shape", lambda m: m(x, attention_mask=torch.ones(2, 3)), ValueError, "attention_mask"),
        ("mask-3d", lambda m: m(x, attention_mask=torch.ones(2, 5, 5, dtype=torch.long)), ValueError,
         "attention_mask"),
        ("mask-values", lambda m: m(x, attention_mask=torch.full((2, 5), 2)), ValueError, "attention_mask"),
        ("mask-float", lambda m: m(x, attention_mask=torch.ones(2, 5)), TypeError, "attention_mask"),
        ("mask-and-cu", lambda m: m(x[:1], attention_mask=torch.ones(1, 5, dtype=torch.long),
                                    cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
        ("cu-batch", lambda m: m(x, cu_seqlens=torch.tensor([0, 5])), ValueError, "cu_seqlens"),
        ("cache-type", lambda m: m(x, past_key_values={}), TypeError, "past_key_values"),
        ("use-cache", lambda m: m(x, use_cache="yes"), TypeError, "use_cache"),
        ("no-layer-idx", lambda m: BlurryWindowAttention(**PLAIN)(x, use_cache=True), ValueError, "layer_idx"),
        ("cache-window", lambda m: m(x, past_key_values=other_window), ValueError,
         r"past_key_values\.get\(0\)\.attention\.window"),
        ("cache-batch", lambda m: m(x, past_key_values=one_sequence), ValueError,
         r"past_key_values\.get\(0\)\.attention\.key_state"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", forward_errors(), ids=lambda case: case[0])
def test_bad_forward_arguments_are_named(case):
    _, call, error, name = case
    with pytest.raises(error, match=name):
        call(make_layer(PLAIN))


def test_cache_entry_must_fit_the_layer():
    """A cache written by a layer with short convolutions, read by one without (and the reverse)."""
    x = hidden(2, 5)
    _, _, with_conv = make_layer(FULL)(x, use_cache=True)
    _, _, without = make_layer(PLAIN)(x, use_cache=True)
    with pytest.raises(ValueError, match=r"past_key_values\.get\(0\)\.conv"):
        make_layer(PLAIN)(x, past_key_values=with_conv)
    with pytest.raises(TypeError, match=r"past_key_values\.get\(0\)\.conv"):
        make_layer(FULL)(x, past_key_values=without)
    cache = BLACache()
    cache.update(0, LayerState(without.get(0).attention, (torch.zeros(2, 32, 1),) * 3))
    with pytest.raises(ValueError, match=r"conv's q cache must be a tensor of shape \[2, 32, 2\]"):
        make_layer(FULL)(x, past_key_values=cache)
