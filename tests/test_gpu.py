"""Every CUDA kernel of the GPU-test layers (``bla_tvm.testing.GPU_TEST_LAYERS``: fp32 and bf16, N == W, GQA)
against the float64 recurrent definition, on NaN-poisoned outputs: T not a multiple of L, a carried state,
packed sequences, the final state and every gradient; and the decode step over 512 tokens, eager and captured
in a CUDA graph. Then hostile inputs: NaN tokens and upstream gradients (non-finite exactly where the definition
is), |q|, |k| up to 1e6 (float32), T = 65,536 (float32) and a state that has seen 2^62 tokens.

The "cuda" cases are marked ``gpu`` and skipped without a GPU; on a GPU machine they run from prebuilt kernels
(README, "GPU tests"). The same code runs on the CPU for the first layers (the "cpu" cases), so its logic is
checked wherever the suite runs.
"""

from __future__ import annotations

import gc

import pytest
import torch

from helpers import BLACase, assert_within_float32_logit_bound
from small_models import assert_learns_lag_copy

from bla_tvm import BLAState, DecodeGraph, bla_recurrent, blurry_window_attention, decode_step
from bla_tvm.decode import decode_constants
from bla_tvm.runtime import current_stream_handle
from bla_tvm.testing import DECODE_BENCH_LAYER, GPU_DECODE_LAYERS, GPU_TEST_LAYERS, poisoned_allocations

TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
CPU_LAYERS = 2  # the CPU variant runs the first layers only (their kernels compile in seconds)

gpu = pytest.mark.gpu
no_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def devices_and_layers(layers, cpu_count):
    cases = [pytest.param("cuda", layer, marks=(gpu, no_gpu), id=f"cuda-{tag(layer)}") for layer in layers]
    return cases + [pytest.param("cpu", layer, id=f"cpu-{tag(layer)}") for layer in layers[:cpu_count]]


def tag(layer) -> str:
    return f"W{layer.window}N{layer.resolution}M{layer.num_slots}K{layer.head_k}V{layer.head_v}G{layer.group_size}" \
        f"-{layer.dtype}"


def relative_error(out: torch.Tensor, ref: torch.Tensor, floor: float = 0.0) -> float:
    """||out - ref|| / max(||ref||, floor), infinite where out holds a NaN or an infinity."""
    out = out.detach().double().cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref.detach()).norm() / max(ref.norm().item(), floor, 1e-300)).item()


def inputs(layer, B, T, H, device, seed):
    """q [B, T, H G, K], k [B, T, H, K], v [B, T, H, V] in the layer's dtype, a carried state (X0, Y0, seen) in
    float32 and an upstream gradient of o, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layer.dtype)
    HQ = H * layer.group_size
    q, k = torch.randn(B, T, HQ, layer.head_k, generator=g), torch.randn(B, T, H, layer.head_k, generator=g)
    v, do = torch.randn(B, T, H, layer.head_v, generator=g), torch.randn(B, T, HQ, layer.head_v, generator=g)
    X0, Y0 = (torch.randn(B, H, layer.resolution, d, generator=g) for d in (layer.head_k, layer.head_v))
    seen = torch.tensor([3, 2 * layer.window][:B])
    tensors = [x.to(dtype) for x in (q, k, v)] + [X0, Y0]
    return [x.to(device).requires_grad_() for x in tensors], seen.to(device), do.to(device)


def layer_args(layer) -> dict:
    return dict(window=layer.window, resolution=layer.resolution, num_slots=layer.num_slots)


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_carried_state_forward_and_gradients(device, layer):
    """One call from a carried state, T = 130 (no multiple of any L): o, the final state and the gradients of
    q, k, v and the initial state against the float64 definition; every kernel output poisoned."""
    (q, k, v, X0, Y0), seen, do = inputs(layer, 2, 130, 2, device, seed=0)
    with poisoned_allocations() as poisoned:
        o, final = blurry_window_attention(q, k, v, **layer_args(layer), initial_state=BLAState(X0, Y0, seen),
                                           output_final_state=True)  # fmt: skip
        loss = (o.float() * do.float()).sum() + final.key_state.square().sum() + final.value_state.sum()
        grads = torch.autograd.grad(loss, (q, k, v, X0, Y0))
    assert poisoned, "no allocation was poisoned"
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, X0, Y0)]
    o_ref, (X, Y, _) = bla_recurrent(*refs[:3], **layer_args(layer), initial_state=(refs[3], refs[4], seen.cpu()),
                                     output_final_state=True)  # fmt: skip
    G = layer.group_size
    ref_loss = (o_ref * do.double().cpu()).sum() + X[:, ::G].square().sum() + Y[:, ::G].sum()
    ref_grads = torch.autograd.grad(ref_loss, refs)
    tol = TOLERANCE[layer.dtype]
    assert relative_error(o, o_ref) <= tol
    with torch.no_grad(), poisoned_allocations():  # inference: its own chunk length, no final-state kernel
        o_inference, _ = blurry_window_attention(q, k, v, **layer_args(layer), initial_state=BLAState(X0, Y0, seen))
    assert relative_error(o_inference, o_ref) <= tol
    assert relative_error(final.key_state, X[:, ::G]) <= tol and relative_error(final.value_state, Y[:, ::G]) <= tol
    assert final.seen.tolist() == (seen + 130).tolist()
    floor = do.double().norm().item()
    for name, grad, ref in zip(("dq", "dk", "dv", "dX0", "dY0"), grads, ref_grads):
        assert relative_error(grad, ref, floor) <= tol, name


@pytest.mark.parametrize("magnitude", [1e-7, 1e5])
@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_gradients_keep_their_precision_at_any_loss_scale(device, layer, magnitude):
    """dO of a mean loss (~1e-7) or a large one (1e5): the gradients of q, k, v and the initial state stay within
    the dtype's tolerance of the definition (16-bit CUDA kernels multiply float16 operands, whose normal range is
    6e-5 to 65504: the op scales dO by a power of two around them)."""
    (q, k, v, X0, Y0), seen, do = inputs(layer, 2, 130, 2, device, seed=5)
    do = (do.double() * magnitude).to(q.dtype)
    grads = torch.autograd.grad(
        blurry_window_attention(q, k, v, **layer_args(layer), initial_state=BLAState(X0, Y0, seen))[0],
        (q, k, v, X0, Y0), do)  # fmt: skip
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, X0, Y0)]
    o_ref = bla_recurrent(*refs[:3], **layer_args(layer), initial_state=(refs[3], refs[4], seen.cpu()))
    ref_grads = torch.autograd.grad(o_ref, refs, do.double().cpu())
    floor = do.double().norm().item()
    for name, grad, ref in zip(("dq", "dk", "dv", "dX0", "dY0"), grads, ref_grads):
        assert relative_error(grad, ref, floor) <= TOLERANCE[layer.dtype], name


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_packed_sequences_forward_and_gradients(device, layer):
    """Packed sequences (empty and one-token ones among them), each from a carried state: o, each final state and
    the gradients of q, k, v and the initial states against the definition run on each sequence alone."""
    lengths = [0, 37, 1, 70, 0, 5]
    (q, k, v, _, _), _, do = inputs(layer, 1, sum(lengths), 2, device, seed=1)
    g = torch.Generator().manual_seed(2)
    X0, Y0 = (torch.randn(len(lengths), 2, layer.resolution, d, generator=g).to(device).requires_grad_()
              for d in (layer.head_k, layer.head_v))  # fmt: skip
    seen = torch.tensor([5, 0, 2 * layer.window, 1, 7, 0])
    bounds = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    cu = bounds.to(device=device, dtype=torch.int32)
    with poisoned_allocations():
        carried = BLAState(X0, Y0, seen.to(device))
        o, final = blurry_window_attention(q, k, v, **layer_args(layer), initial_state=carried,
                                           output_final_state=True, cu_seqlens=cu)  # fmt: skip
        loss = (o.float() * do.float()).sum() + final.key_state.sum() + final.value_state.square().sum()
        grads = torch.autograd.grad(loss, (q, k, v, X0, Y0))
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, X0, Y0)]
    G, tol, floor = layer.group_size, TOLERANCE[layer.dtype], do.double().norm().item()
    pieces, loss = [], 0.0
    for s, (a, b) in enumerate(zip(bounds[:-1].tolist(), bounds[1:].tolist())):
        start = (refs[3][s : s + 1], refs[4][s : s + 1], seen[s : s + 1])
        o_s, (X, Y, _) = bla_recurrent(*(x[:, a:b] for x in refs[:3]), **layer_args(layer), initial_state=start,
                                       output_final_state=True)  # fmt: skip
        pieces.append(o_s)
        loss = loss + (o_s * do[:, a:b].double().cpu()).sum() + X[:, ::G].sum() + Y[:, ::G].square().sum()
        assert relative_error(final.key_state[s], X[0, ::G]) <= tol, f"sequence {s}"
        assert relative_error(final.value_state[s], Y[0, ::G]) <= tol, f"sequence {s}"
    ref_grads = torch.autograd.grad(loss, refs)
    assert relative_error(o, torch.cat(pieces, dim=1)) <= tol
    for name, grad, ref in zip(("dq", "dk", "dv", "dX0", "dY0"), grads, ref_grads):
        assert relative_error(grad, ref, floor) <= tol, name


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_DECODE_LAYERS, 1))
def test_decode_512_tokens(device, layer):
    """512 decode steps from a fresh state equal the definition over the same tokens, outputs and state."""
    T = 512
    (q, k, v, _, _), _, _ = inputs(layer, 2, T, 2, device, seed=2)
    q, k, v = (x.detach() for x in (q, k, v))
    state, outputs = None, []
    with torch.no_grad():
        for t in range(T):
            o, state = decode_step(q[:, t], k[:, t], v[:, t], state, **layer_args(layer))
            outputs.append(o)
    o_ref, (X, _, _) = bla_recurrent(*(x.double().cpu() for x in (q, k, v)), **layer_args(layer),
                                     output_final_state=True)  # fmt: skip
    tol = TOLERANCE[layer.dtype]
    assert relative_error(torch.stack(outputs, dim=1), o_ref) <= tol
    assert relative_error(state.key_state, X[:, :: layer.group_size]) <= tol
    assert state.seen.tolist() == [T, T]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize(
    "layer",
    [pytest.param(x, marks=(gpu, no_gpu), id=f"cuda-{tag(x)}") for x in (*GPU_DECODE_LAYERS, DECODE_BENCH_LAYER)],
)
def test_decode_a_batch_larger_than_the_grid(layer, state_dtype):
    """B H = 640 (b, h) pairs, more than the tile step's grid (``DecodeTileConfig.blocks``): its blocks take
    several in turn, each copying the next one's state in while computing one. 16 steps equal the definition."""
    T = 16
    (q, k, v, _, _), _, _ = inputs(layer, 320, T, 2, "cuda", seed=5)
    q, k, v = (x.detach() for x in (q, k, v))
    state, outputs = None, []
    with torch.no_grad():
        for t in range(T):
            fresh = state_dtype if state is None else None
            o, state = decode_step(q[:, t], k[:, t], v[:, t], state, **layer_args(layer), state_dtype=fresh)
            outputs.append(o)
    o_ref, (X, Y, _) = bla_recurrent(*(x.double().cpu() for x in (q, k, v)), **layer_args(layer),
                                     output_final_state=True)  # fmt: skip
    tol = TOLERANCE[layer.dtype] if state_dtype == torch.float32 else 1e-2
    assert relative_error(torch.stack(outputs, dim=1), o_ref) <= tol
    assert relative_error(state.key_state, X[:, :: layer.group_size]) <= tol
    assert relative_error(state.value_state, Y[:, :: layer.group_size]) <= tol


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "layer", [pytest.param(x, marks=(gpu, no_gpu), id=f"cuda-{tag(x)}") for x in GPU_DECODE_LAYERS]
)
def test_decode_512_tokens_with_a_16_bit_state(layer, state_dtype):
    """The 16-bit-state kernels: 512 steps from a fresh state kept in float16 / bfloat16 stay within 1e-2 / 2e-2
    of the definition (each step rounds the state, and the error grows like sqrt(W) ulp: bfloat16's 8-bit mantissa
    reached 1.04e-2 on the key state at W = 64 on the H200, as the TE kernel's does; W <= 100 here)."""
    (q, k, v, _, _), _, _ = inputs(layer, 2, 512, 2, "cuda", seed=4)
    q, k, v = (x.detach() for x in (q, k, v))
    state, outputs = None, []
    with torch.no_grad():
        for t in range(q.shape[1]):
            fresh = state_dtype if state is None else None  # the first step makes the state
            o, state = decode_step(q[:, t], k[:, t], v[:, t], state, **layer_args(layer), state_dtype=fresh)
            outputs.append(o)
    assert state.key_state.dtype == state.value_state.dtype == state_dtype
    o_ref, (X, Y, _) = bla_recurrent(*(x.double().cpu() for x in (q, k, v)), **layer_args(layer),
                                     output_final_state=True)  # fmt: skip
    tol = {torch.float16: 1e-2, torch.bfloat16: 2e-2}[state_dtype]
    assert relative_error(torch.stack(outputs, dim=1), o_ref) <= tol
    assert relative_error(state.key_state, X[:, :: layer.group_size]) <= tol
    assert relative_error(state.value_state, Y[:, :: layer.group_size]) <= tol


@pytest.mark.parametrize(
    "layer", [pytest.param(x, marks=(gpu, no_gpu), id=f"cuda-{tag(x)}") for x in GPU_DECODE_LAYERS]
)
def test_decode_graph_equals_the_eager_step(layer):
    """DecodeGraph (the in-place step captured in a CUDA graph) over 64 tokens from a carried state (one sequence
    with slots still masked, one past the window) gives the eager functional step's o at every token, bit for bit,
    and its state and seen after."""
    (q, k, v, X0, Y0), seen, _ = inputs(layer, 2, 64, 2, "cuda", seed=3)
    q, k, v, X0, Y0 = (x.detach() for x in (q, k, v, X0, Y0))
    state = BLAState(X0, Y0, seen)
    decoder = DecodeGraph(BLAState(X0.clone(), Y0.clone(), seen.clone()), **layer_args(layer), query_heads=q.shape[2],
                          dtype=q.dtype)  # fmt: skip
    with torch.no_grad():
        for t in range(q.shape[1]):
            o, state = decode_step(q[:, t], k[:, t], v[:, t], state, **layer_args(layer))
            assert torch.equal(decoder(q[:, t], k[:, t], v[:, t]), o), f"token {t}"
    assert torch.equal(decoder.state.key_state, state.key_state)
    assert torch.equal(decoder.state.value_state, state.value_state)
    assert decoder.state.seen.tolist() == state.seen.tolist() == (seen + 64).tolist()


@gpu
@no_gpu
def test_decode_graph_outlives_the_constants_cache():
    """The graph holds every tensor its kernels read: with the constants' cache emptied and freed memory handed
    out again (filled with NaN), a replay still gives the eager step's o."""
    layer = GPU_DECODE_LAYERS[0]
    (q, k, v, X0, Y0), seen, _ = inputs(layer, 2, 2, 2, "cuda", seed=6)
    q, k, v, X0, Y0 = (x.detach() for x in (q, k, v, X0, Y0))
    decoder = DecodeGraph(BLAState(X0.clone(), Y0.clone(), seen.clone()), **layer_args(layer), query_heads=q.shape[2],
                          dtype=q.dtype)  # fmt: skip
    decode_constants.cache_clear()
    gc.collect()
    reused = [torch.full((n,), float("nan"), device="cuda") for n in (64, 256, 1024, 4096) for _ in range(8)]
    with torch.no_grad():
        o, _ = decode_step(q[:, 0], k[:, 0], v[:, 0], BLAState(X0, Y0, seen), **layer_args(layer))
        assert torch.equal(decoder(q[:, 0], k[:, 0], v[:, 0]), o)
    del reused


# --- hostile inputs: non-finite tokens, large magnitudes, long sequences, a huge token count ----------------

FP32_LAYERS = tuple(layer for layer in GPU_TEST_LAYERS if layer.dtype == "float32")


def assert_non_finite_like(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str, floor: float = 0.0):
    """out is non-finite exactly where the float64 reference is, and within ``relative_error`` tol elsewhere."""
    out = out.detach().double().cpu()
    finite = torch.isfinite(ref)
    differ = torch.isfinite(out) != finite
    assert not differ.any(), f"{what}: {differ.sum().item()} elements finite in one and not the other"
    assert relative_error(out[finite], ref[finite], floor) <= tol, what


def poison(x: torch.Tensor, batch: int, token: int, head: int, column: int) -> torch.Tensor:
    x = x.detach().clone()
    x[batch, token, head, column] = float("nan")
    return x


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_nan_tokens_reach_only_later_outputs(device, layer):
    """A NaN in k of one sequence and in v of the other, mid-chunk, from a carried state: o (inference and training
    chunk lengths; on CUDA, 16-bit inference runs the tile forward ``chunk_output_tile``) is non-finite exactly
    where the float64 definition's is, and equal to it elsewhere."""
    (q, k, v, X0, Y0), seen, _ = inputs(layer, 2, 130, 2, device, seed=3)
    k, v = poison(k, 1, 37, 0, 1), poison(v, 0, 100, 1, 2)
    start = BLAState(X0.detach(), Y0.detach(), seen)
    o_ref = bla_recurrent(*(x.detach().double().cpu() for x in (q, k, v)), **layer_args(layer),
                          initial_state=(X0.double().cpu(), Y0.double().cpu(), seen.cpu()))  # fmt: skip
    assert not torch.isfinite(o_ref[1, 37:]).all() and torch.isfinite(o_ref[1, :37]).all()
    with torch.no_grad(), poisoned_allocations():
        o, _ = blurry_window_attention(q.detach(), k, v, **layer_args(layer), initial_state=start)
    assert_non_finite_like(o, o_ref, TOLERANCE[layer.dtype], "o, inference")


@pytest.mark.parametrize("name", ["q", "do"])
@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_nan_gradients_reach_only_earlier_tokens(device, layer, name):
    """A NaN in q or in dO at one token: the training forward and every gradient are non-finite exactly where the
    float64 definition's autograd is (the gradients of the other tokens' q, of the later tokens' k and v stay
    finite), and equal to it elsewhere."""
    (q, k, v, X0, Y0), seen, do = inputs(layer, 2, 130, 2, device, seed=4)
    if name == "q":
        q = poison(q, 1, 37, 0, 1).requires_grad_()
    else:
        do = poison(do, 1, 37, 0, 1)
    with poisoned_allocations():
        o, _ = blurry_window_attention(q, k, v, **layer_args(layer), initial_state=BLAState(X0, Y0, seen))
        grads = torch.autograd.grad(o, (q, k, v, X0, Y0), do)
    refs = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, X0, Y0)]
    o_ref = bla_recurrent(*refs[:3], **layer_args(layer), initial_state=(refs[3], refs[4], seen.cpu()))
    ref_grads = torch.autograd.grad(o_ref, refs, do.double().cpu())
    tol, floor = TOLERANCE[layer.dtype], torch.nan_to_num(do.double(), nan=0.0).norm().item()
    assert_non_finite_like(o, o_ref, tol, "o, training")
    for part, grad, ref in zip(("dq", "dk", "dv", "dX0", "dY0"), grads, ref_grads):
        assert_non_finite_like(grad, ref, tol, part, floor)


@pytest.mark.parametrize("device, layer", devices_and_layers(FP32_LAYERS, 1))
def test_large_magnitudes_stay_finite_and_accurate(device, layer):
    """|q|, |k| scaled to 1e2, 1e4 and 1e6 (logits to ~1e13), float32: o is finite and within what float32 logits
    allow of the float64 definition (``helpers.assert_within_float32_logit_bound``), and every gradient is finite.
    16-bit inputs are left out: their tensor-core operands are float16, whose range (65504) such inputs exceed."""
    G = layer.group_size
    for magnitude in (1e2, 1e4, 1e6):
        (q, k, v, _, _), _, do = inputs(layer, 2, 150, 2, device, seed=5)
        q, k = (x.detach().mul(magnitude).requires_grad_() for x in (q, k))
        o, _ = blurry_window_attention(q, k, v, **layer_args(layer), scale=0.3)
        grads = torch.autograd.grad(o, (q, k, v), do)
        assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads), f"magnitude {magnitude:g}"
        case = BLACase(W=layer.window, N=layer.resolution, M=layer.num_slots, T=150, L=0, B=2, H=2 * G,
                       K=layer.head_k, V=layer.head_v, scale=0.3, seed=5)  # fmt: skip
        q_ref, k_ref, v_ref = (x.detach().cpu() for x in (q, k.repeat_interleave(G, 2), v.repeat_interleave(G, 2)))
        assert_within_float32_logit_bound(o.detach().cpu(), q_ref, k_ref, v_ref, case, TOLERANCE[layer.dtype])


@pytest.mark.parametrize("device, layer", devices_and_layers(FP32_LAYERS, 1))
def test_long_sequence_against_float64(device, layer):
    """T = 65,536 (4,096 on the CPU) in float32 from a carried state: o and the final state within 1e-4 of the
    float64 definition (relative, Frobenius)."""
    T = 65536 if device == "cuda" else 4096
    (q, k, v, X0, Y0), seen, _ = inputs(layer, 1, T, 2, device, seed=6)
    q, k, v, X0, Y0 = (x.detach() for x in (q, k, v, X0, Y0))
    with torch.no_grad():
        o, final = blurry_window_attention(q, k, v, **layer_args(layer), initial_state=BLAState(X0, Y0, seen),
                                           output_final_state=True)  # fmt: skip
    o_ref, (X, Y, _) = bla_recurrent(*(x.double().cpu() for x in (q, k, v)), **layer_args(layer),
                                     initial_state=(X0.double().cpu(), Y0.double().cpu(), seen.cpu()),
                                     output_final_state=True)  # fmt: skip
    G = layer.group_size
    assert relative_error(o, o_ref) <= 1e-4
    assert relative_error(final.key_state, X[:, ::G]) <= 1e-4 and relative_error(final.value_state, Y[:, ::G]) <= 1e-4


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_DECODE_LAYERS, 1))
def test_decode_after_2_pow_62_tokens(device, layer):
    """A state that has seen 2^62 tokens decodes exactly like one that has seen W (the slot mask compares
    min(seen, W), never an int64 product that could overflow)."""
    (q, k, v, X0, Y0), _, _ = inputs(layer, 2, 1, 2, device, seed=7)
    q, k, v, X0, Y0 = (x.detach() for x in (q, k, v, X0, Y0))
    huge, window = (torch.tensor(x, device=device) for x in ([2**62, 2**62], [layer.window] * 2))
    with torch.no_grad():
        o, state = decode_step(q[:, 0], k[:, 0], v[:, 0], BLAState(X0, Y0, huge), **layer_args(layer))
        o_window, _ = decode_step(q[:, 0], k[:, 0], v[:, 0], BLAState(X0, Y0, window), **layer_args(layer))
    assert torch.isfinite(o).all() and torch.equal(o, o_window)
    assert state.seen.tolist() == [2**62 + 1] * 2


@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS[1:2], 1))
def test_small_model_learns_with_16_bit_inputs(device, layer):
    """The lag-copy model of test_training.py, with bf16 inputs to the op (on CUDA: the tile programs' forward
    and backward), learns to name the previous token within 100 Adam steps, as the float32 model does."""
    dims = (layer.window, layer.resolution, layer.num_slots, layer.head_k, layer.head_v)
    print(assert_learns_lag_copy(dims, getattr(torch, layer.dtype), device))


@gpu
@no_gpu
def test_kernels_launch_on_the_current_stream():
    """The launcher's stream handle (``runtime.current_stream_handle``, torch's C accessor) is torch's current
    stream: the default one, and a side stream inside ``torch.cuda.stream``; a forward there equals one on the
    default stream."""
    device = torch.device("cuda", torch.cuda.current_device())
    assert current_stream_handle(device) == torch.cuda.current_stream(device).cuda_stream
    layer = GPU_TEST_LAYERS[1]
    (q, k, v, _, _), _, _ = inputs(layer, 2, 100, 2, "cuda", seed=9)
    with torch.no_grad():
        expected, _ = blurry_window_attention(q, k, v, **layer_args(layer))
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            assert current_stream_handle(device) == side.cuda_stream != torch.cuda.default_stream(device).cuda_stream
            o, _ = blurry_window_attention(q, k, v, **layer_args(layer))
        torch.cuda.current_stream(device).wait_stream(side)
    assert torch.equal(o, expected)



@pytest.mark.parametrize("device, layer", devices_and_layers(GPU_TEST_LAYERS, CPU_LAYERS))
def test_replayed_inference_computes_each_calls_own_inputs(device, layer):
    """Eager inference of fresh sequences is replayed from its first call's recording (``bla_tvm.replay``): a
    replayed call on new inputs, its temporaries NaN-poisoned and on a side stream, equals the float64 definition,
    and a replay of the first inputs equals the first call bit for bit."""
    from bla_tvm import replay

    (q, k, v, _, _), _, _ = inputs(layer, 2, 150, 2, device, seed=11)
    (q2, k2, v2, _, _), _, _ = inputs(layer, 2, 150, 2, device, seed=12)
    args = layer_args(layer)
    with torch.no_grad():
        first, _ = blurry_window_attention(q, k, v, **args)
        key = replay.key(q, k, v, *args.values(), None)
        assert replay.recorded(key) is not None
        stream = torch.cuda.Stream(device) if device == "cuda" else None
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(device))
        with poisoned_allocations(), torch.cuda.stream(stream):
            second, _ = blurry_window_attention(q2, k2, v2, **args)
        if stream is not None:
            torch.cuda.current_stream(device).wait_stream(stream)
        again, _ = blurry_window_attention(q, k, v, **args)
    ref = bla_recurrent(*(x.detach().double().cpu() for x in (q2, k2, v2)), **args)
    assert relative_error(second, ref) <= TOLERANCE[layer.dtype]
    assert torch.equal(again, first)
