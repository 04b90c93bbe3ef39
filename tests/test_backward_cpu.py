"""Gradients of the compiled op on the CPU: ``bla_tvm.blurry_window_attention`` is differentiable through
``torch.library.register_autograd`` on ``bla_tvm::forward``, whose backward is the op ``bla_tvm::backward``
(the backward kernels, reading the chunk-start states the forward saved).

Error measure: for each of dq, dk, dv, relative error = max |g - ref| / max |ref| (``helpers.max_rel_err``),
with ref the gradient of ``bla_quadratic`` (float64 autograd) at the same inputs and upstream gradient, both
first rounded to the tested dtype. Bounds: 1e-5 for float32, 1e-2 for bfloat16 and float16, 1e-10 for float64.
A gradient that is exactly zero in the reference (dq and dk when W = 1: one slot, softmax identically 1) is
measured against the largest of the three reference gradients instead.

W, N, M, K and V come from ``helpers.KERNEL_POOL`` (the forward tests compile the same specs' forward
kernels; each (shape, dtype) adds the backward's five); hypothesis varies B, T, H, the scale and the data.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    F64,
    BLACase,
    KERNEL_POOL,
    assert_non_finite_where,
    make_qkv,
    max_abs_err,
    max_rel_err,
    pooled_cases,
    swa_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bla_tvm.testing import poisoned_allocations
from bla_tvm import bla_quadratic, bla_recurrent, blurry_window_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
POOL = {s.id: s for s in KERNEL_POOL}


def shape_param(shapes):
    return pytest.mark.parametrize("shape", shapes, ids=[s.id for s in shapes])


def upstream_gradient(case, dtype):
    """A random dO [B, T, H, V], from a seed derived from the case's."""
    gen = torch.Generator().manual_seed(case.seed ^ 0x5EED)
    return torch.randn(case.B, case.T, case.H, case.V, generator=gen, dtype=F64).to(dtype)


def op_grads(q, k, v, do, kwargs):
    """(o, (dq, dk, dv)) through the compiled op; q, k, v are leaves made here from the given values."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o, state = blurry_window_attention(*leaves, **kwargs)
    assert state is None
    grads = torch.autograd.grad(o, leaves, do)
    return o, grads


def reference_grads(q, k, v, do, kwargs):
    """(dq, dk, dv) of bla_quadratic in float64, at q, k, v, do (already rounded to the tested dtype)."""
    leaves = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    o = bla_quadratic(*leaves, **kwargs)
    return torch.autograd.grad(o, leaves, do.to(F64))


def check_grads(grads, refs, inputs, tol, what=""):
    """Shapes, dtypes, finiteness, then the relative error of each gradient (see the module docstring)."""
    floor = max((r.abs().max().item() for r in refs if r.numel()), default=0.0)
    for name, g, ref, x in zip("qkv", grads, refs, inputs):
        assert g.shape == x.shape and g.dtype == x.dtype and g.device == x.device, f"d{name}: {g.shape} {g.dtype}"
        assert torch.isfinite(g).all(), f"d{name}: {(~torch.isfinite(g)).sum().item()} non-finite entries {what}"
        if not ref.numel():
            continue
        denom = ref.abs().max().item() or floor
        err = max_abs_err(g, ref) / denom if denom else max_abs_err(g, ref)
        assert err <= tol, f"d{name} relative error {err:.3e} > {tol:.0e} {what}"


# --- gradcheck ---------------------------------------------------------------------------------------------


GRADCHECK_CASES = [
    # (shape id, B, T, H, scale, fast_mode); full mode costs two forward calls per input element
    ("W7N7M7K5V3", 1, 67, 1, None, False),  # N == W == M (SWA); T = 67: a partial second chunk; full Jacobian
    ("W9N5M3K6V6", 2, 1, 2, 0.7, False),  # T = 1
    ("W9N5M3K6V6", 2, 131, 2, None, True),  # M < N; three chunks, the last of 3 tokens
    ("W1N1M1K4V6", 1, 67, 2, None, True),  # W = 1
    ("W12N5M12K16V24", 2, 65, 2, 0.4, True),  # M == W > N; bigger heads
    ("W80N80M80K16V16", 1, 100, 1, None, True),  # SWA with a window spanning chunks
]


@pytest.mark.parametrize(
    "shape_id,B,T,H,scale,fast_mode", GRADCHECK_CASES, ids=[f"{c[0]}-T{c[2]}" for c in GRADCHECK_CASES]
)
def test_gradcheck(shape_id, B, T, H, scale, fast_mode):
    """torch.autograd.gradcheck in float64: the backward kernels against finite differences of the forward."""
    shape = POOL[shape_id]
    gen = torch.Generator().manual_seed(T)
    q, k = (torch.randn(B, T, H, shape.K, generator=gen, dtype=F64, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, shape.V, generator=gen, dtype=F64, requires_grad=True)

    def fn(q, k, v):
        return blurry_window_attention(q, k, v, shape.W, shape.N, shape.M, scale)[0]

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-8, rtol=1e-6, fast_mode=fast_mode)


# --- against autograd through the float64 reference ---------------------------------------------------------


@shape_param(KERNEL_POOL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_grads_match_reference(shape, dtype, data):
    """Includes N == W (SWA gradients), T == 1, T < W and T around multiples of the chunk length. T <= 140
    (two full chunks and a partial one) and B, H <= 2: bla_quadratic's cost grows as B H T^2 M K."""
    case = data.draw(pooled_cases(shape, max_T=140, max_B=2, max_H=2), label="case")
    q, k, v = make_qkv(case, dtype)
    do = upstream_gradient(case, dtype)
    _, grads = op_grads(q, k, v, do, case.kwargs())
    check_grads(grads, reference_grads(q, k, v, do, case.kwargs()), (q, k, v), TOL[dtype], str(case))


@pytest.mark.parametrize("shape", [POOL["W16N16M16K8V8"], POOL["W16N7M9K40V72"]], ids=lambda s: s.id)
@pytest.mark.parametrize("T", [1, 63, 64, 65, 130])
def test_grads_float16(shape, T):
    """float16 on two shapes (SWA and M > N), at chunk boundaries."""
    case = BLACase(W=shape.W, N=shape.N, M=shape.M, T=T, L=64, B=2, H=2, K=shape.K, V=shape.V, scale=None, seed=T)
    q, k, v = make_qkv(case, torch.float16)
    do = upstream_gradient(case, torch.float16)
    _, grads = op_grads(q, k, v, do, case.kwargs())
    check_grads(grads, reference_grads(q, k, v, do, case.kwargs()), (q, k, v), TOL[torch.float16], str(case))


@pytest.mark.parametrize("shape_id,reference", [("W9N5M3K6V6", "quadratic"), ("W80N80M80K16V16", "swa")])
def test_grads_of_long_sequences(shape_id, reference):
    """T = 600: ten chunks (the last partial), so state gradients are carried back through a long reverse
    scan; the window of W80 spans chunk boundaries. Against bla_quadratic where its O(T^2 M K) intermediate
    stays small; for W80 (N == W == M) against sliding-window attention (helpers.swa_reference; float64
    autograd both)."""
    shape = POOL[shape_id]
    case = BLACase(W=shape.W, N=shape.N, M=shape.M, T=600, L=64, B=1, H=1, K=shape.K, V=shape.V, scale=None, seed=7)
    q, k, v = make_qkv(case, torch.float32)
    do = upstream_gradient(case, torch.float32)
    _, grads = op_grads(q, k, v, do, case.kwargs())
    leaves = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    if reference == "quadratic":
        o_ref = bla_quadratic(*leaves, **case.kwargs())
    else:
        o_ref = swa_reference(*leaves, case.W, case.scale)
    refs = torch.autograd.grad(o_ref, leaves, do.to(F64))
    check_grads(grads, refs, (q, k, v), TOL[torch.float32], str(case))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("B,T,H", [(2, 0, 3), (0, 5, 3), (2, 5, 0)])
def test_empty_inputs_give_empty_grads(dtype, B, T, H):
    """T == 0 (and B == 0, H == 0): zero-size gradients of the inputs' shapes, no error."""
    q, k = (torch.randn(B, T, H, 8, dtype=dtype, requires_grad=True) for _ in range(2))
    v = torch.randn(B, T, H, 8, dtype=dtype, requires_grad=True)
    o, _ = blurry_window_attention(q, k, v, window=16, resolution=16)
    o.sum().backward()
    for x in (q, k, v):
        assert x.grad is not None and x.grad.shape == x.shape and x.grad.dtype == dtype


# --- how gradients are computed ------------------------------------------------------------------------------


SHAPE = POOL["W16N7M9K40V72"]


def qkv_leaves(B=2, T=70, H=3, layout="bthd", dtype=torch.float32, seed=0):
    """q, k, v leaves requiring grad in [B, T, H, D] ("bthd") or [B, H, T, D] ("bhtd") layout."""
    gen = torch.Generator().manual_seed(seed)
    dims = (SHAPE.K, SHAPE.K, SHAPE.V)
    xs = [torch.randn(B, T, H, D, generator=gen).to(dtype) for D in dims]
    if layout == "bhtd":
        xs = [x.transpose(1, 2).contiguous() for x in xs]
    return [x.requires_grad_() for x in xs]


def bthd(x, layout):
    return x.transpose(1, 2) if layout == "bhtd" else x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_give_the_same_grads(dtype):
    """Inputs that are transposed views of [B, H, T, D] leaves (and a non-contiguous upstream gradient): the
    same gradient values, bit for bit, as for contiguous inputs."""
    contiguous = qkv_leaves(dtype=dtype)
    transposed = qkv_leaves(layout="bhtd", dtype=dtype)
    for a, b in zip(contiguous, transposed):
        assert torch.equal(a, b.transpose(1, 2))
    weight = torch.linspace(-1, 1, SHAPE.V, dtype=dtype)

    o, _ = blurry_window_attention(*contiguous, SHAPE.W, SHAPE.N, SHAPE.M)
    (o * weight).sum().backward()
    views = [bthd(x, "bhtd") for x in transposed]
    assert not any(x.is_contiguous() for x in views)
    o_t, _ = blurry_window_attention(*views, SHAPE.W, SHAPE.N, SHAPE.M)
    # the gradient reaching o_t is the transpose of a contiguous [B, H, T, V] tensor: non-contiguous
    (o_t.transpose(1, 2) * weight).sum().backward()
    for name, a, b in zip("qkv", contiguous, transposed):
        assert torch.equal(a.grad, b.grad.transpose(1, 2)), f"d{name} differs"


def test_grads_of_some_inputs_only():
    """Only q (then only v) requires grad: the others get none, the one that does gets the full result."""
    q, k, v = qkv_leaves()
    o, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    expected = torch.autograd.grad(o.square().sum(), (q, k, v))
    for i in range(3):
        xs = [x.detach().requires_grad_(j == i) for j, x in enumerate((q, k, v))]
        o, _ = blurry_window_attention(*xs, SHAPE.W, SHAPE.N, SHAPE.M)
        o.square().sum().backward()
        assert torch.equal(xs[i].grad, expected[i])
        assert all(x.grad is None for j, x in enumerate(xs) if j != i)


def test_backward_is_deterministic_and_repeatable():
    """Two backward passes through one graph (retain_graph) and a fresh graph give the same bits."""
    q, k, v = qkv_leaves(T=200)
    o, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    do = torch.randn_like(o)
    first = torch.autograd.grad(o, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(o, (q, k, v), do)
    o2, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    third = torch.autograd.grad(o2, (q, k, v), do)
    for a, b, c in zip(first, second, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_grads_accumulate_across_calls():
    """Two calls sharing inputs: their gradients add up in .grad (the op's gradients are ordinary tensors)."""
    q, k, v = qkv_leaves(T=90)
    o1, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    o2, _ = blurry_window_attention(q * 2.0, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    (o1.sum() + o2.square().sum()).backward()
    g1 = torch.autograd.grad(blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)[0].sum(), (q, k, v))
    g2 = torch.autograd.grad(
        blurry_window_attention(q * 2.0, k, v, SHAPE.W, SHAPE.N, SHAPE.M)[0].square().sum(), (q, k, v)
    )
    for x, a, b in zip((q, k, v), g1, g2):
        assert max_rel_err(x.grad, a + b) <= 1e-6


@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_every_gradient_element_is_written(data):
    """With every torch.empty / empty_like / new_empty pre-filled with NaN, a gradient element (or a scratch
    buffer) that no backward kernel writes would show up as NaN or a wrong value."""
    shape = data.draw(st.sampled_from(KERNEL_POOL), label="shape")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    case = data.draw(pooled_cases(shape, max_T=140, max_B=2, max_H=2), label="case")
    q, k, v = make_qkv(case, dtype)
    do = upstream_gradient(case, dtype)
    with poisoned_allocations() as poisoned:
        _, grads = op_grads(q, k, v, do, case.kwargs())
    assert (case.B, case.T, case.H, case.K) in poisoned, f"dq was not allocated by an empty: {poisoned}"
    check_grads(grads, reference_grads(q, k, v, do, case.kwargs()), (q, k, v), TOL[dtype], str(case))


@pytest.mark.parametrize("magnitude", [1e2, 1e4, 1e6])
def test_large_inputs_give_finite_grads(magnitude):
    """|q|, |k| up to 1e6 (logits up to ~1e13, a saturated softmax): every gradient element is finite, in
    float32 and bfloat16."""
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = qkv_leaves(T=150, dtype=dtype, seed=5)
        with torch.no_grad():
            q.mul_(magnitude)
            k.mul_(magnitude)
        o, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
        o.square().sum().backward()
        for name, x in zip("qkv", (q, k, v)):
            assert torch.isfinite(x.grad).all(), f"d{name} ({dtype}, magnitude {magnitude:g})"


def test_double_backward_raises():
    """Second-order gradients are not implemented: differentiating the gradients raises a clear error rather than
    returning something wrong."""
    q, k, v = qkv_leaves(T=20)
    o, _ = blurry_window_attention(q, k, v, SHAPE.W, SHAPE.N, SHAPE.M)
    grads = torch.autograd.grad(o.square().sum(), (q, k, v), create_graph=True)
    with pytest.raises(RuntimeError, match=r"bla_tvm.backward.*no autograd formula"):
        torch.autograd.grad(grads[0].square().sum(), (q, k, v))


# --- non-finite inputs: causality of the gradients ----------------------------------------------------------


@pytest.mark.parametrize("token", [5, 64, 100])
@pytest.mark.parametrize("name", ["q", "k", "v", "do"])
def test_gradients_are_non_finite_only_where_the_definitions_are(name, token):
    """A NaN at one element of q, k, v or the upstream gradient at token t: every gradient is non-finite
    exactly where the autograd of the float64 recurrent definition (causal by construction) is, and equal to
    it elsewhere; e.g. with dO NaN at t, dq of every other token and dk, dv of the tokens after t stay finite.
    Regression: the backward's products over a chunk multiplied the zeros of their causal masks by the NaN."""
    case = BLACase(W=16, N=7, M=9, T=130, L=64, B=1, H=2, K=40, V=72, scale=0.3, seed=13)
    inputs = dict(zip("qkv", make_qkv(case, torch.float32)), do=upstream_gradient(case, torch.float32))
    inputs[name] = inputs[name].clone()
    inputs[name][0, token, 1, 3] = float("nan")
    q, k, v, do = inputs.values()
    _, grads = op_grads(q, k, v, do, case.kwargs())
    leaves = [x.detach().to(F64).requires_grad_() for x in (q, k, v)]
    refs = torch.autograd.grad(bla_recurrent(*leaves, **case.kwargs()), leaves, do.to(F64))
    floor = max(torch.nan_to_num(r, nan=0.0).abs().max().item() for r in refs)
    for part, grad, ref in zip("qkv", grads, refs):
        assert not torch.isfinite(ref).all() or part == "v"  # the NaN reaches some gradient
        assert_non_finite_where(grad / floor, ref / floor, TOL[torch.float32], f"d{part} ({name}[t={token}] NaN)")
