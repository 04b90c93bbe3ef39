"""Validation (bla_tvm/params.py): every rule raises the documented error type, with a message naming the
argument, from BLAParams.make and from each reference entry point."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import valid_resolutions

from bla_tvm import BLAParams, bla_chunked, bla_quadratic, bla_recurrent
from bla_tvm.constants import chunk_constants
from bla_tvm.params import check_chunk_size, check_scale

F64 = torch.float64
ENTRY_POINTS = {"recurrent": bla_recurrent, "quadratic": bla_quadratic, "chunked": bla_chunked}


def qkv(B=1, T=5, H=2, K=3, V=4, dtype=F64):
    q, k = torch.randn(B, T, H, K, dtype=dtype), torch.randn(B, T, H, K, dtype=dtype)
    return q, k, torch.randn(B, T, H, V, dtype=dtype)


# --- parameters --------------------------------------------------------------------------------------------

BAD_PARAMS = [
    # (window, resolution, num_slots), error, message
    pytest.param((0, 1, None), ValueError, r"^window must be an int >= 1, got 0", id="window<1"),
    pytest.param((-3, 1, None), ValueError, r"^window must be an int >= 1", id="window<0"),
    pytest.param((2.0, 1, None), TypeError, r"^window must be an int >= 1, got float", id="window-float"),
    pytest.param((True, 1, None), TypeError, r"^window must be an int >= 1, got bool", id="window-bool"),
    pytest.param(("4", 1, None), TypeError, r"^window must be an int", id="window-str"),
    pytest.param((4, 5, None), ValueError, r"^resolution must satisfy 1 <= resolution <= window \(4\), got 5",
                 id="N>W"),
    pytest.param((6, 4, None), ValueError, r"^resolution must be odd or equal to window \(6\), got 4", id="N-even<W"),
    pytest.param((6, 0, None), ValueError, r"^resolution must be an int >= 1, got 0", id="N<1"),
    pytest.param((6, 3.0, None), TypeError, r"^resolution must be an int", id="N-float"),
    pytest.param((6, 3, 0), ValueError, r"^num_slots must be an int >= 1, got 0", id="M<1"),
    pytest.param((6, 3, -1), ValueError, r"^num_slots must be an int >= 1", id="M<0"),
    pytest.param((6, 3, 2.5), TypeError, r"^num_slots must be an int", id="M-float"),
    pytest.param((6, 3, False), TypeError, r"^num_slots must be an int", id="M-bool"),
]


@pytest.mark.parametrize("args,error,match", BAD_PARAMS)
def test_params_rejected(args, error, match):
    with pytest.raises(error, match=match):
        BLAParams.make(*args)


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("args,error,match", BAD_PARAMS)
def test_params_rejected_by_entry_points(name, args, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        ENTRY_POINTS[name](q, k, v, *args)


@pytest.mark.parametrize("W", range(1, 17))
def test_params_accepted(W):
    for N in valid_resolutions(W):
        p = BLAParams.make(W, N)
        assert (p.window, p.resolution, p.num_slots) == (W, N, N)  # M defaults to N
        for M in (1, N, W, 2 * W + 1):
            assert BLAParams.make(W, N, M).num_slots == M
    evens_below = [N for N in range(2, W, 2)]
    for N in evens_below:
        with pytest.raises(ValueError, match="resolution"):
            BLAParams.make(W, N)


# --- inputs ------------------------------------------------------------------------------------------------

BAD_INPUTS = [
    # lambda building (q, k, v), error, message
    pytest.param(lambda: (torch.randn(5, 2, 3, dtype=F64),) + qkv()[1:], ValueError,
                 r"^q must have rank 4 \[B, T, H, D\], got shape \(5, 2, 3\)", id="q-rank3"),
    pytest.param(lambda: (torch.randn(1, 1, 5, 2, 3, dtype=F64),) + qkv()[1:], ValueError,
                 r"^q must have rank 4", id="q-rank5"),
    pytest.param(lambda: (qkv()[0], torch.randn(5, 2, 3, dtype=F64), qkv()[2]), ValueError,
                 r"^k must have rank 4", id="k-rank3"),
    pytest.param(lambda: qkv()[:2] + (torch.randn(1, 5, 2, dtype=F64),), ValueError,
                 r"^v must have rank 4", id="v-rank3"),
    pytest.param(lambda: (qkv(B=2)[0],) + qkv(B=1)[1:], ValueError,
                 r"^q, k and v must agree in \[B, T\]", id="B-mismatch"),
    pytest.param(lambda: qkv(T=5)[:2] + (qkv(T=6)[2],), ValueError,
                 r"^q, k and v must agree in \[B, T\]", id="T-mismatch"),
    pytest.param(lambda: (qkv(H=2)[0], qkv(H=3)[1], qkv(H=3)[2]), ValueError,
                 r"^q's heads \(2\) must be a multiple of k's and v's heads \(3\)", id="H-not-a-group"),
    pytest.param(lambda: (qkv(H=2)[0], qkv(H=2)[1], qkv(H=1)[2]), ValueError,
                 r"^k and v must have the same number of heads", id="H-kv-mismatch"),
    pytest.param(lambda: (qkv(K=3)[0], qkv(K=4)[1], qkv()[2]), ValueError,
                 r"^k must have the head dim K of q \(3\), got 4", id="K-mismatch"),
    pytest.param(lambda: (torch.ones(1, 5, 2, 3, dtype=torch.int64),) + qkv()[1:], TypeError,
                 r"^q must have a floating dtype, got torch.int64", id="q-int"),
    pytest.param(lambda: qkv()[:2] + (torch.ones(1, 5, 2, 4, dtype=torch.int32),), TypeError,
                 r"^v must have a floating dtype", id="v-int"),
    pytest.param(lambda: (qkv()[0], torch.ones(1, 5, 2, 3, dtype=torch.bool), qkv()[2]), TypeError,
                 r"^k must have a floating dtype", id="k-bool"),
    pytest.param(lambda: (qkv(dtype=torch.float32)[0],) + qkv()[1:], TypeError,
                 r"^q, k and v must share one dtype", id="mixed-dtype-q"),
    pytest.param(lambda: qkv()[:2] + (qkv(dtype=torch.float16)[2],), TypeError,
                 r"^q, k and v must share one dtype", id="mixed-dtype-v"),
    pytest.param(lambda: (qkv()[0].numpy(),) + qkv()[1:], TypeError,
                 r"^q must be a torch.Tensor, got ndarray", id="q-numpy"),
]


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("make,error,match", BAD_INPUTS)
def test_inputs_rejected(name, make, error, match):
    q, k, v = make()
    with pytest.raises(error, match=match):
        ENTRY_POINTS[name](q, k, v, 4, 3)


BAD_SCALES = [
    pytest.param(float("nan"), ValueError, r"^scale must be finite, got nan", id="nan"),
    pytest.param(float("inf"), ValueError, r"^scale must be finite, got inf", id="inf"),
    pytest.param(-math.inf, ValueError, r"^scale must be finite, got -inf", id="-inf"),
    pytest.param(True, TypeError, r"^scale must be a float or None, got bool", id="bool"),
    pytest.param("0.5", TypeError, r"^scale must be a float or None, got str", id="str"),
    pytest.param(torch.tensor(0.5), TypeError, r"^scale must be a float or None, got Tensor", id="tensor"),
]


@pytest.mark.parametrize("name", ENTRY_POINTS)
@pytest.mark.parametrize("scale,error,match", BAD_SCALES)
def test_scale_rejected(name, scale, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        ENTRY_POINTS[name](q, k, v, 4, 3, scale=scale)


def test_scale_accepted():
    assert check_scale(None, 4) == 0.5
    assert check_scale(2, 4) == 2.0 and isinstance(check_scale(2, 4), float)
    assert check_scale(-0.25, 4) == -0.25


BAD_CHUNKS = [
    pytest.param(0, ValueError, r"^chunk_size must be an int >= 1, got 0", id="0"),
    pytest.param(-4, ValueError, r"^chunk_size must be an int >= 1, got -4", id="negative"),
    pytest.param(16.0, TypeError, r"^chunk_size must be an int >= 1, got float", id="float"),
    pytest.param(True, TypeError, r"^chunk_size must be an int >= 1, got bool", id="bool"),
    pytest.param(None, TypeError, r"^chunk_size must be an int >= 1, got NoneType", id="None"),
]


@pytest.mark.parametrize("chunk_size,error,match", BAD_CHUNKS)
def test_chunk_size_rejected(chunk_size, error, match):
    q, k, v = qkv()
    with pytest.raises(error, match=match):
        bla_chunked(q, k, v, 4, 3, chunk_size=chunk_size)
    with pytest.raises(error, match=match):
        check_chunk_size(chunk_size)
    params = BLAParams.make(4, 3)
    chunk_constants(params, 16), chunk_constants(params, 1)  # cached: 16.0 == 16 and True == 1 must not hit them
    with pytest.raises(error, match=match):
        chunk_constants(params, chunk_size)
