"""The compiled forward on the CPU (``bla_tvm.blurry_window_attention``) against the float64 references.

Error measure, everywhere in this file: relative error = max |o - ref| / max |ref| over the whole output
(``helpers.max_rel_err``), with ref the float64 recurrent definition computed from the same inputs after they
were rounded to the tested dtype. Bounds: 1e-5 for float32, 1e-2 for bfloat16 and float16 (the output itself
is rounded to 8 or 11 bits), 1e-10 for float64.

W, N, M, K and V come from the small fixed pool ``helpers.KERNEL_POOL`` (each distinct (W, N, M, K, V, dtype)
compiles three kernels); hypothesis varies B, T (T == 1, T < W, T around multiples of the chunk length), H,
the scale and the data.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    KERNEL_POOL,
    F64,
    make_qkv,
    max_rel_err,
    pooled_cases,
    swa_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bla_tvm.testing import poisoned_allocations
from bla_tvm import BLAParams, bla_recurrent, blurry_window_attention
from bla_tvm.constants import bla_constants

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2, torch.float64: 1e-10}
DTYPES = list(TOL)
SWA_POOL = [s for s in KERNEL_POOL if s.is_swa]


def shape_param(shapes):
    return pytest.mark.parametrize("shape", shapes, ids=[s.id for s in shapes])


def run_op(q, k, v, case):
    o, state = blurry_window_attention(q, k, v, **case.kwargs())
    assert state is None
    return o


def check_output(o, q, v, case, dtype):
    assert o.shape == (case.B, case.T, case.H, case.V)
    assert o.dtype == dtype and o.device == q.device
    assert torch.isfinite(o).all(), f"{(~torch.isfinite(o)).sum().item()} non-finite output elements"


# --- against the definition --------------------------------------------------------------------------------


@shape_param(KERNEL_POOL)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_matches_recurrent(shape, dtype, data):
    case = data.draw(pooled_cases(shape), label="case")
    q, k, v = make_qkv(case, dtype)
    o = run_op(q, k, v, case)
    check_output(o, q, v, case, dtype)
    ref = bla_recurrent(q, k, v, **case.kwargs())
    err = max_rel_err(o, ref)
    assert err <= TOL[dtype], f"relative error {err:.3e} > {TOL[dtype]:.0e} ({case})"


@shape_param(SWA_POOL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@settings(max_examples=6, deadline=None)
@given(data=st.data())
def test_full_resolution_is_sliding_window_attention(shape, dtype, data):
    """N == W == M: BLA is SWA with window W (checked against an SWA written independently of bla_tvm)."""
    case = data.draw(pooled_cases(shape), label="case")
    q, k, v = make_qkv(case, dtype)
    o = run_op(q, k, v, case)
    check_output(o, q, v, case, dtype)
    ref = swa_reference(q, k, v, case.W, case.scale)
    err = max_rel_err(o, ref)
    assert err <= TOL[dtype], f"relative error vs SWA {err:.3e} > {TOL[dtype]:.0e} ({case})"


def test_window_one_returns_values():
    """W = N = M = 1: the only slot holds the current token, so o == v (up to rounding)."""
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 70, 3, 4, generator=gen), torch.randn(2, 70, 3, 4, generator=gen)
    v = torch.randn(2, 70, 3, 6, generator=gen)
    o, _ = blurry_window_attention(q, k, v, window=1, resolution=1)
    assert max_rel_err(o, v) <= 1e-6


# --- large inputs: the softmax is max-subtracted ------------------------------------------------------------


def reference_logits_and_slots(q, k, v, window, resolution, num_slots, scale):
    """The recurrent definition (bla-math.md), keeping its intermediates: masked logits s [B, T, H, M] and
    slot values Vslot [B, T, H, M, V], float64 (o = softmax(s) Vslot is ``bla_recurrent``)."""
    c = bla_constants(BLAParams.make(window, resolution, num_slots))
    q, k, v = (x.to(F64).transpose(1, 2) for x in (q, k, v))
    B, H, T, K = q.shape
    X, Y = q.new_zeros(B, H, resolution, K), v.new_zeros(B, H, resolution, v.shape[-1])
    logits, slots = [], []
    for t in range(T):
        X = c.A @ X + c.b[:, None] * k[:, :, t, None, :]
        Y = c.A @ Y + c.b[:, None] * v[:, :, t, None, :]
        s = scale * torch.einsum("bhmk,bhk->bhm", c.C @ X, q[:, :, t])
        logits.append(s.masked_fill(c.slot_lags > t, float("-inf")))
        slots.append(c.C @ Y)
    return torch.stack(logits, 2).transpose(1, 2), torch.stack(slots, 2).transpose(1, 2)


#: the kernels accumulate in float32: logits carry an absolute error of about eps * scale |q_t| |k|
ACC_EPS = 2.0**-24
#: safety factor over the largest error/bound ratio seen while calibrating (0.82 over 180 random problems)
LOGIT_ERR_FACTOR = 8.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_large_inputs_stay_finite_and_accurate(dtype, data):
    """|q|, |k| up to 1e4 (logits up to ~1e9): every output element is finite and matches the float64
    definition computed from the same rounded inputs.

    Bound, per output row t: max_v |o_t - ref_t| <= TOL * max |ref| + 2 delta_t sum_i p_i max_v |Vslot_i - ref_t|
    with delta_t = LOGIT_ERR_FACTOR * eps32 * scale * |q_t| * max_s |k_s|. The second term is the first-order
    effect on a softmax of logits known only to float32 accuracy, which no float32 kernel can beat: it is
    tiny when the softmax is saturated (one p_i ~ 1) and only matters where slots nearly tie.
    """
    shape = data.draw(st.sampled_from(KERNEL_POOL), label="shape")
    case = data.draw(pooled_cases(shape, max_T=150, max_B=2, max_H=2), label="case")
    magnitude = 10.0 ** data.draw(st.floats(0.0, 4.0), label="log10 magnitude")
    q, k, v = make_qkv(case, F64)
    q, k, v = (q * magnitude).to(dtype), (k * magnitude).to(dtype), v.to(dtype)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    o = run_op(q, k, v, case)
    check_output(o, q, v, case, dtype)

    scale = 1.0 / math.sqrt(case.K) if case.scale is None else case.scale
    s, vslot = reference_logits_and_slots(q, k, v, case.W, case.N, case.M, scale)
    p = torch.softmax(s, dim=-1)
    ref = torch.einsum("bthm,bthmv->bthv", p, vslot)
    assert max_rel_err(ref, bla_recurrent(q, k, v, **case.kwargs())) <= 1e-12  # the same definition

    err = (o.to(F64) - ref).abs().amax(-1)  # [B, T, H]
    spread = (p[..., None] * (vslot - ref[..., None, :]).abs()).sum(-2).amax(-1)  # sum_i p_i |Vslot_i - o|
    q_norm = q.to(F64).norm(dim=-1)
    k_norm = k.to(F64).norm(dim=-1).amax(1, keepdim=True)
    delta = LOGIT_ERR_FACTOR * ACC_EPS * abs(scale) * q_norm * k_norm
    bound = TOL[dtype] * ref.abs().max() + 2 * delta * spread
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the float32-logit bound by {worst:.2f}x (magnitude {magnitude:.3g})"


# --- every element written, empty inputs --------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_every_output_element_is_written(data):
    """The op allocates its output and scratch buffers; with every allocation pre-filled with NaN, an element
    (or a scratch state) that no kernel writes would show up as NaN or a wrong value."""
    shape = data.draw(st.sampled_from(KERNEL_POOL), label="shape")
    dtype = data.draw(st.sampled_from([torch.float32, torch.bfloat16]), label="dtype")
    case = data.draw(pooled_cases(shape), label="case")
    q, k, v = make_qkv(case, dtype)
    with poisoned_allocations() as poisoned:
        o = run_op(q, k, v, case)
    assert (case.B, case.T, case.H, case.V) in poisoned, f"the output was not allocated by torch.empty: {poisoned}"
    check_output(o, q, v, case, dtype)
    err = max_rel_err(o, bla_recurrent(q, k, v, **case.kwargs()))
    assert err <= TOL[dtype], f"relative error {err:.3e} ({case})"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H", [(2, 0, 3), (0, 5, 3), (2, 5, 0)])
def test_empty_inputs(dtype, B, T, H):
    """T == 0 (and B == 0, H == 0): an empty [B, T, H, V] output in the input dtype."""
    q, k, v = (torch.randn(B, T, H, 8, dtype=dtype) for _ in range(3))
    o, state = blurry_window_attention(q, k, v, window=16, resolution=16)
    assert state is None
    assert o.shape == (B, T, H, 8) and o.dtype == dtype
