"""Properties of the float64 references and constants (../shared/docs/bla-math.md), on random small problems.

- the three forms (recurrent definition, quadratic, chunked) agree;
- N == W == M is sliding-window attention (against an independent SWA);
- the GSA view: slots follow Kslot_t = (C A C^-1) Kslot_{t-1} + (C b) k_t^T;
- ||A||_2 <= 1, spectral radius < 1 for N < W;
- the chunk constants satisfy their documented identities;
- causality.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import BLACase, assert_close, bla_cases, make_qkv, swa_reference, valid_resolutions
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bla_tvm import BLAParams, bla_chunked, bla_quadratic, bla_recurrent, blurry_window_attention
from bla_tvm.constants import bla_constants, chunk_constants, fourier_basis, partner_index

F64 = torch.float64
TOL = 1e-10
FORMS = {
    "recurrent": lambda q, k, v, case: bla_recurrent(q, k, v, **case.kwargs()),
    "quadratic": lambda q, k, v, case: bla_quadratic(q, k, v, **case.kwargs()),
    "chunked": lambda q, k, v, case: bla_chunked(q, k, v, **case.kwargs(), chunk_size=case.L),
}
ALL_WN = [(W, N) for W in range(1, 17) for N in valid_resolutions(W)]


def params_of(case: BLACase) -> BLAParams:
    return BLAParams.make(case.W, case.N, case.M)


def run_recurrence(A, b, k):
    """X_t = A X_{t-1} + b k_t^T from X_{-1} = 0, for k [T, K]: the states [T, N, K]."""
    X = torch.zeros(A.shape[0], k.shape[-1], dtype=F64)
    states = []
    for t in range(k.shape[0]):
        X = A @ X + torch.outer(b, k[t])
        states.append(X)
    return torch.stack(states)


# --- the three forms ---------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(bla_cases(max_T=40, max_W=16))
def test_three_forms_agree(case):
    q, k, v = make_qkv(case)
    outs = {name: f(q, k, v, case) for name, f in FORMS.items()}
    for name, o in outs.items():
        assert o.dtype == F64, name
        assert o.shape == (case.B, case.T, case.H, case.V), name
    assert_close(outs["quadratic"], outs["recurrent"], TOL, "quadratic vs recurrent")
    assert_close(outs["chunked"], outs["recurrent"], TOL, "chunked vs recurrent")


@settings(max_examples=25)
@given(bla_cases(max_T=24, max_W=12), st.integers(1, 30))
def test_chunked_independent_of_chunk_size(case, other_L):
    q, k, v = make_qkv(case)
    a = bla_chunked(q, k, v, **case.kwargs(), chunk_size=case.L)
    b = bla_chunked(q, k, v, **case.kwargs(), chunk_size=other_L)
    assert_close(a, b, TOL, f"chunk_size {case.L} vs {other_L}")


@pytest.mark.parametrize("name", FORMS)
def test_empty_sequence(name):
    case = BLACase(W=4, N=3, M=5, T=0, L=4, B=2, H=1, K=3, V=2, scale=None, seed=0)
    q, k, v = make_qkv(case)
    o = FORMS[name](q, k, v, case)
    assert o.shape == (2, 0, 1, 2) and o.dtype == F64


@pytest.mark.parametrize("name", FORMS)
def test_lower_precision_inputs_give_float64(name):
    case = BLACase(W=6, N=3, M=4, T=9, L=4, B=1, H=2, K=3, V=5, scale=None, seed=1)
    q32, k32, v32 = make_qkv(case, torch.float32)
    o = FORMS[name](q32, k32, v32, case)
    assert o.dtype == F64
    expected = FORMS[name](*(x.to(F64) for x in (q32, k32, v32)), case)
    assert_close(o, expected, 1e-14, name)


@pytest.mark.parametrize("name", FORMS)
def test_default_scale_is_inverse_sqrt_K(name):
    case = BLACase(W=5, N=5, M=5, T=7, L=3, B=1, H=1, K=4, V=2, scale=None, seed=2)
    q, k, v = make_qkv(case)
    explicit = dataclasses.replace(case, scale=0.5)
    assert_close(FORMS[name](q, k, v, case), FORMS[name](q, k, v, explicit), 1e-15, name)


# --- N == W == M is sliding-window attention ---------------------------------------------------------------


@settings(max_examples=30)
@given(bla_cases(max_T=40, max_W=16))
def test_full_resolution_is_sliding_window_attention(case):
    case = dataclasses.replace(case, N=case.W, M=case.W)
    q, k, v = make_qkv(case)
    expected = swa_reference(q, k, v, case.W, case.scale)
    for name, f in FORMS.items():
        assert_close(f(q, k, v, case), expected, TOL, f"{name} vs SWA")


@settings(max_examples=25)
@given(st.integers(1, 16), st.integers(1, 40), st.integers(0, 2**31 - 1))
def test_full_resolution_slots_are_the_window(W, T, seed):
    """At N == W == M the slots hold the last W keys exactly: Kslot_t[i] = k_{t-i} (0 where t - i < 0)."""
    c = bla_constants(BLAParams.make(W, W, W))
    k = torch.randn(T, 3, generator=torch.Generator().manual_seed(seed), dtype=F64)
    slots = c.C @ run_recurrence(c.A, c.b, k)  # [T, M, K]
    for t in range(T):
        expected = torch.stack([k[t - i] if t - i >= 0 else torch.zeros(3, dtype=F64) for i in range(W)])
        assert_close(slots[t], expected, TOL, f"slots at t={t}")


# --- GSA view ----------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(st.data())
def test_gsa_view(data):
    """With M == N, C is invertible and Kslot_t = (C A C^-1) Kslot_{t-1} + (C b) k_t^T."""
    W = data.draw(st.integers(1, 16), label="W")
    N = data.draw(st.sampled_from(valid_resolutions(W)), label="N")
    T = data.draw(st.integers(1, 40), label="T")
    K = data.draw(st.integers(1, 6), label="K")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    c = bla_constants(BLAParams.make(W, N))  # M defaults to N
    assert c.C.shape == (N, N)
    cond = torch.linalg.cond(c.C).item()
    assume(cond < 1e6)
    decay = c.C @ c.A @ torch.linalg.inv(c.C)
    gate = c.C @ c.b
    k = torch.randn(T, K, generator=torch.Generator().manual_seed(seed), dtype=F64)
    X = run_recurrence(c.A, c.b, k)
    slot = torch.zeros(N, K, dtype=F64)
    for t in range(T):
        slot = decay @ slot + torch.outer(gate, k[t])
        assert_close(slot, c.C @ X[t], TOL, f"GSA slots at t={t}")


@pytest.mark.parametrize("W,N", [(W, N) for W, N in ALL_WN if N % 2 == 1], ids=str)
def test_gsa_gate_is_sampled_dirichlet_kernel(W, N):
    """C b = D_N(tau_i) / W at the slot lags, D_N(x) = sin(pi N x / W) / sin(pi x / W) (N at x = 0), N odd."""
    c = bla_constants(BLAParams.make(W, N))
    tau = c.slot_lags
    den = torch.sin(math.pi * tau / W)
    dirichlet = torch.where(den.abs() > 1e-12, torch.sin(math.pi * N * tau / W) / den, torch.full_like(tau, N))
    assert_close(c.C @ c.b, dirichlet / W, 1e-12)


# --- A, R and the basis ------------------------------------------------------------------------------------


@pytest.mark.parametrize("W,N", ALL_WN, ids=str)
def test_A_contractive(W, N):
    c = bla_constants(BLAParams.make(W, N))
    assert torch.linalg.matrix_norm(c.A, 2).item() <= 1 + 1e-12
    radius = torch.linalg.eigvals(c.A).abs().max().item()
    if N < W:
        assert radius < 1 - 1e-9, f"spectral radius {radius}"
    # the basis is orthogonal and R orthogonal (the chunked form relies on both)
    Phi = fourier_basis(W, N, torch.arange(W))
    assert_close(Phi @ Phi.T, W * torch.eye(N, dtype=F64), 1e-12, "Phi Phi^T")
    assert_close(c.R @ c.R.T, torch.eye(N, dtype=F64), 1e-12, "R R^T")
    assert_close(c.b, Phi[:, 0], 0.0, "b")


def basis_from_doc(W: int, N: int, tau: float) -> list[float]:
    """phi_n(tau), n < N, written out from bla-math.md independently of bla_tvm.constants.fourier_basis."""
    rows, m = [1.0], 1
    while len(rows) < N:
        if 2 * m == W:  # Nyquist row, only reached when W is even and N == W
            rows.append(math.cos(math.pi * tau))
        else:
            angle = 2 * math.pi * m * tau / W
            rows += [math.sqrt(2) * math.cos(angle), math.sqrt(2) * math.sin(angle)]
        m += 1
    return rows[:N]


@pytest.mark.parametrize("W,N", ALL_WN, ids=str)
def test_constants_match_definitions(W, N):
    """b, R, A, slot lags and C against the formulas of bla-math.md, for M < N, M == N, M > N (M not dividing W)."""
    Phi = torch.tensor([basis_from_doc(W, N, tau) for tau in range(W)], dtype=F64).T  # [N, W]
    shift = torch.zeros(W, W, dtype=F64)
    for tau in range(W):
        shift[(tau + 1) % W, tau] = 1.0
    R = Phi @ shift @ Phi.T / W
    b = Phi[:, 0]
    for M in sorted({1, max(1, N - 1), N, N + 1, W, W + 3}):
        c = bla_constants(BLAParams.make(W, N, M))
        assert_close(c.b, b, 1e-12, "b")
        assert_close(c.R, R, 1e-12, "R")
        assert_close(c.A, (torch.eye(N, dtype=F64) - torch.outer(b, b) / W) @ R, 1e-12, "A")
        lags = [i * W / M for i in range(M)]
        assert_close(c.slot_lags, torch.tensor(lags, dtype=F64), 1e-12, "slot lags")
        C = torch.tensor([basis_from_doc(W, N, tau) for tau in lags], dtype=F64) / W
        assert_close(c.C, C, 1e-12, f"C (M={M})")


@pytest.mark.parametrize("W", range(1, 17))
def test_full_resolution_A_is_the_window_shift(W):
    """At N == W: A^W == 0 (everything leaves the window after W steps), while A^(W-1), which carries lag 0 to
    lag W-1, has 2-norm 1."""
    A = bla_constants(BLAParams.make(W, W)).A
    assert torch.linalg.matrix_power(A, W).abs().max().item() < 1e-12
    assert abs(torch.linalg.matrix_norm(torch.linalg.matrix_power(A, W - 1), 2).item() - 1) < 1e-12


# --- chunk constants ---------------------------------------------------------------------------------------


@settings(max_examples=40)
@given(bla_cases(max_T=1, max_W=16), st.integers(1, 40), st.integers(1, 4))
def test_chunk_constants(case, L, K):
    params = params_of(case)
    cc = chunk_constants(params, L)
    c = cc.base
    W, N, M = case.W, case.N, case.M
    R_pow = [torch.linalg.matrix_power(c.R, p) for p in range(L + 1)]
    assert_close(cc.state_decay, torch.linalg.matrix_power(c.A, L), 1e-12, "state_decay vs A^L")
    # the documented definitions
    assert cc.Psi.shape == (L, N) and cc.Inv.shape == (L, L) and cc.H.shape == (M, L) and cc.Bm.shape == (L, N)
    assert_close(cc.Psi, torch.stack([c.b @ R_pow[j + 1] / W for j in range(L)]), 1e-12, "Psi")
    G = torch.zeros(L, L, dtype=F64)
    for t in range(L):
        for s in range(t):
            G[t, s] = c.b @ R_pow[t - s] @ c.b / W
    assert_close(cc.Inv @ (torch.eye(L, dtype=F64) + G), torch.eye(L, dtype=F64), 1e-12, "Inv")
    assert_close(cc.H, torch.stack([c.C @ R_pow[d] @ c.b for d in range(L)], dim=1), 1e-12, "H")
    assert_close(cc.Bm, torch.stack([R_pow[L - 1 - s] @ c.b for s in range(L)]), 1e-12, "Bm")
    assert_close(cc.state_in, cc.Bm.T @ cc.Inv, 1e-12, "state_in")
    # rotation tables: (R^{j+1} x)[n] and (x R^{j+1})[n]
    gen = torch.Generator().manual_seed(case.seed)
    x = torch.randn(L, N, generator=gen, dtype=F64)
    partner = partner_index(N)
    rotated = cc.rot_diag * x + cc.rot_off * x[:, partner]
    rotated_t = cc.rot_diag * x - cc.rot_off * x[:, partner]
    assert_close(rotated, torch.stack([R_pow[j + 1] @ x[j] for j in range(L)]), 1e-12, "R^{j+1} x")
    assert_close(rotated_t, torch.stack([x[j] @ R_pow[j + 1] for j in range(L)]), 1e-12, "x R^{j+1}")
    # one chunk of the recurrence from a random state: X_L = A^L X_0 + state_in K (the scan kernel's step)
    X0 = torch.randn(N, K, generator=gen, dtype=F64)
    keys = torch.randn(L, K, generator=gen, dtype=F64)
    X = X0
    for t in range(L):
        X = c.A @ X + torch.outer(c.b, keys[t])
    assert_close(cc.state_decay @ X0 + cc.state_in @ keys, X, 1e-12, "chunk state update")


# --- causality ---------------------------------------------------------------------------------------------


@settings(max_examples=30)
@given(bla_cases(max_T=40, max_W=16), st.data())
def test_causality(case, data):
    """Changing token s (q_s, k_s, v_s) never changes outputs before s; at N == W it also leaves every output
    from s + W on unchanged (the token has left the window)."""
    s = data.draw(st.integers(0, case.T - 1), label="s")
    q, k, v = make_qkv(case)
    gen = torch.Generator().manual_seed(case.seed + 1)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for x in (q2, k2, v2):
        x[:, s] = torch.randn(x[:, s].shape, generator=gen, dtype=F64)
    for name in ("recurrent", "chunked", "quadratic"):
        a, b = FORMS[name](q, k, v, case), FORMS[name](q2, k2, v2, case)
        assert_close(b[:, :s], a[:, :s], 1e-12, f"{name}: outputs before s={s}")
        assert (b[:, s] - a[:, s]).abs().max() > 0, f"{name}: token s={s} has no effect at s"
        if case.N == case.W:
            tail = s + case.W
            assert_close(b[:, tail:], a[:, tail:], 1e-12, f"{name}: outputs from s+W={tail}")


# --- constants at scale: no W x W matrix, refusals that name the argument ---------------------------------


def test_constants_of_a_huge_window_take_no_window_sized_memory():
    """W = 2^30 with N = 15, M = 31: the constants are O(N^2 + N L + M N), built from the closed forms (R is
    block-diagonal rotations by 2 pi m / W). Regression: a [W, W] shift matrix and a [N, W] basis were formed
    (4.5 GB at W = 16384; an allocator error here)."""
    W, N, M, L = 2**30, 15, 31, 64
    params = BLAParams.make(W, N, M)
    c = bla_constants(params)
    m = torch.arange(1, (N - 1) // 2 + 1, dtype=F64)
    angle = 2 * math.pi * m / W
    assert_close(c.R[1::2, 1::2].diagonal(), torch.cos(angle), 1e-15, "R cos")
    assert_close(c.R[2::2, 1::2].diagonal(), torch.sin(angle), 1e-15, "R sin")
    assert_close(c.R @ c.R.T, torch.eye(N, dtype=F64), 1e-15, "R orthogonal")
    cc = chunk_constants(params, L)
    assert_close(cc.state_decay, torch.linalg.matrix_power(c.A, L), 1e-12, "state_decay vs A^L")
    assert_close(cc.final_map[L, :, :N], cc.state_decay, 1e-12, "final_map[L] vs A^L")
    q, k, v = (torch.randn(1, 70, 2, 8, generator=torch.Generator().manual_seed(d)) for d in range(3))
    o, _ = blurry_window_attention(q, k, v, W, N, M)  # the compiled op, end to end
    assert_close(o, bla_recurrent(q, k, v, W, N, M), 1e-5, "o")


def test_constants_past_32_bit_indexing_are_refused_naming_the_argument():
    """The kernels index their constant tables (and a sequence's position in the window) with 32-bit integers:
    a layer whose tables would pass 2^31 - 1 elements is refused, naming the argument, before anything is built."""
    from bla_tvm.layer import LayerSpec

    def layer(W, N, M=None):
        return LayerSpec.make(W, N, M, 8, 8, "float32")

    with pytest.raises(ValueError, match=r"^window must be at most 2147483583 .*got 2147483648"):
        layer(2**31, 7)
    with pytest.raises(ValueError, match=r"^resolution must be at most 46340 .*\[N, N\].*got 46341"):
        layer(46341, 46341)
    with pytest.raises(ValueError, match=r"^num_slots must be at most 306783378 .*\[M, N\].*got 306783379"):
        layer(64, 7, 306783379)
    with pytest.raises(ValueError, match=r"^resolution must be at most 5715 \(at chunk length 64: .*final-state"):
        layer(6000, 5717).kernel(64)
    layer(6000, 5717).kernel(16)  # the smaller table of a shorter chunk fits


def test_constants_that_would_not_fit_in_memory_are_refused_naming_the_arguments(monkeypatch):
    """Before any table is built, the host memory the float64 constants take is checked against what the host
    has available: a MemoryError naming window, resolution, num_slots and the bytes, not an allocator error."""
    import bla_tvm.constants as constants

    monkeypatch.setattr(constants, "available_memory", lambda: 10**6)
    params = BLAParams.make(4096, 255, 63)
    with pytest.raises(MemoryError, match=r"window=4096, resolution=255, num_slots=63 at chunk length 64 need 46 MB "
                       r"of host memory, 1 MB are available"):  # fmt: skip
        constants.chunk_constants(params, 64)
