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
    BLACase,
    assert_non_finite_where,
    assert_within_float32_logit_bound,
    make_qkv,
    max_rel_err,
    pooled_cases,
    swa_reference,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from bla_tvm.testing import poisoned_allocations
from bla_tvm import bla_recurrent, blurry_window_attention

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_large_inputs_stay_finite_and_accurate(dtype, data):
    """|q|, |k| up to 1e4 (logits up to ~1e9): every output element is finite and matches the float64
    definition computed from the same rounded inputs, within what float32 logits allow
    (``helpers.assert_within_float32_logit_bound``)."""
    shape = data.draw(st.sampled_from(KERNEL_POOL), label="shape")
    case = data.draw(pooled_cases(shape, max_T=150, max_B=2, max_H=2), label="case")
    check_large_inputs(case, 10.0 ** data.draw(st.floats(0.0, 4.0), label="log10 magnitude"), dtype)


@pytest.mark.parametrize("magnitude", [1e5, 1e6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_finite_logits_give_a_finite_softmax(dtype, magnitude):
    """|scale q k| up to ~1e13 with a scale that is no power of two (each logit rounds): the outputs are finite
    and within the float32-logit bound of the definition. Regression: the row
    maximum was taken over rounded logits while the exponent fused the unrounded product into its subtraction
    (a multiply-add), so the largest slot's exponent could pass float32's range: inf / inf = NaN."""
    case = BLACase(W=16, N=7, M=9, T=150, L=64, B=2, H=2, K=40, V=72, scale=0.3, seed=14)
    check_large_inputs(case, magnitude, dtype)


def check_large_inputs(case, magnitude: float, dtype) -> None:
    """The op on q, k scaled by ``magnitude``: finite, and within the float32-logit bound of the float64
    definition at the same rounded inputs."""
    q, k, v = make_qkv(case, F64)
    q, k, v = (q * magnitude).to(dtype), (k * magnitude).to(dtype), v.to(dtype)
    assert torch.isfinite(q).all() and torch.isfinite(k).all()
    o = run_op(q, k, v, case)
    check_output(o, q, v, case, dtype)

    assert_within_float32_logit_bound(o, q, k, v, case, TOL[dtype])


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


# --- non-finite inputs: causality ---------------------------------------------------------------------------

def poisoned(x: torch.Tensor, token: int, value: float, row: int = 1, head: int = 0, column: int = 3):
    """A copy of x [B, T, H, D] with ``value`` at one element of token ``token``."""
    x = x.clone()
    x[row, token, head, column] = value
    return x


@pytest.mark.parametrize("token", [0, 37, 64, 149])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_token_leaves_the_outputs_before_it_finite(name, value, token):
    """A NaN or an infinity at one element of q, k or v at token t: o is non-finite exactly where the float64
    definition's is (from t on: all of o_t for q, every later output for k, one column of the later outputs for
    v) and equal to it elsewhere. Regression: the products over a chunk multiplied the exact zeros of their
    causal masks by the non-finite token, so the outputs before t in its chunk were NaN too."""
    case = BLACase(W=16, N=7, M=9, T=150, L=64, B=2, H=2, K=40, V=72, scale=0.3, seed=11)
    inputs = dict(zip("qkv", make_qkv(case, torch.float32)))
    inputs[name] = poisoned(inputs[name], token, value)
    o = run_op(*inputs.values(), case)
    ref = bla_recurrent(*inputs.values(), **case.kwargs())
    assert not torch.isfinite(ref[1, token:]).all() and torch.isfinite(ref[:, :token]).all()
    assert_non_finite_where(o, ref, TOL[torch.float32], f"o ({name}[t={token}] = {value})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_nan_padding_keeps_the_valid_outputs(dtype):
    """Rows right-padded with NaN (batch layout; valid lengths 150, 70, 1) and a packed sequence whose tail is
    NaN: every output of a valid token equals the definition on the valid tokens alone; every padded one is
    non-finite. Regression: a row lost all its valid outputs in the chunk its padding starts in."""
    case = BLACase(W=16, N=7, M=9, T=150, L=64, B=3, H=2, K=40, V=72, scale=None, seed=12)
    q, k, v = make_qkv(case, dtype)
    lengths = [150, 70, 1]
    for row, length in enumerate(lengths):
        for x in (q, k, v):
            x[row, length:] = math.nan
    o = run_op(q, k, v, case)
    for row, length in enumerate(lengths):
        ref = bla_recurrent(*(x[row : row + 1, :length] for x in (q, k, v)), **case.kwargs())
        assert max_rel_err(o[row : row + 1, :length], ref) <= TOL[dtype], f"row {row}"
        assert not torch.isfinite(o[row, length:]).any(), f"row {row}: padding"

    bounds = [0, 40, 110, 150]  # sequence 1 is NaN from its token 20 on
    packed = [x[:1].clone() for x in make_qkv(case, dtype)]
    for x in packed:
        x[0, 60:110] = math.nan
    cu = torch.tensor(bounds, dtype=torch.int32)
    o, _ = blurry_window_attention(*packed, **case.kwargs(), cu_seqlens=cu)
    for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        valid = b if s != 1 else 60
        ref = bla_recurrent(*(x[:, a:valid] for x in packed), **case.kwargs())
        assert max_rel_err(o[:, a:valid], ref) <= TOL[dtype], f"sequence {s}"
    assert not torch.isfinite(o[:, 60:110]).any()
