"""Shared test helpers: a hypothesis strategy for BLA problems, input generation, comparison, an SWA reference.

Imported by the test modules as ``from helpers import ...`` (pytest puts tests/ on sys.path through
tests/conftest.py). Everything here is CPU torch and float64 unless a dtype is passed.

    @given(bla_cases(max_T=40, max_W=16))
    def test_something(case):
        q, k, v = make_qkv(case, torch.float64)
        o = bla_recurrent(q, k, v, **case.kwargs())
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from hypothesis import strategies as st

F64 = torch.float64


@dataclass(frozen=True)
class BLACase:
    """One BLA problem: window W, resolution N, slots M, length T, chunk length L, batch B, heads H,
    head dims K (queries/keys) and V (values), softmax scale (None: the default 1/sqrt(K)), data seed."""

    W: int
    N: int
    M: int
    T: int
    L: int
    B: int
    H: int
    K: int
    V: int
    scale: float | None
    seed: int

    def kwargs(self) -> dict:
        """Keyword arguments of the BLA entry points, less q, k, v and chunk_size."""
        return dict(window=self.W, resolution=self.N, num_slots=self.M, scale=self.scale)

    def as_dict(self) -> dict:
        return asdict(self)


def valid_resolutions(window: int) -> list[int]:
    """Every N accepted for window W: the odd N <= W, and W itself."""
    return sorted({n for n in range(1, window + 1, 2)} | {window})


@st.composite
def resolutions(draw, window: int) -> int:
    """A valid N for window W: N == W (exact SWA) about a quarter of the time, else an odd N < W when W > 2."""
    below = [n for n in valid_resolutions(window) if n < window]
    if not below or draw(st.integers(0, 3)) == 0:
        return window
    return draw(st.sampled_from(below))


@st.composite
def bla_cases(
    draw,
    max_T: int = 40,
    max_W: int = 16,
    max_L: int | None = None,
    max_B: int = 2,
    max_H: int = 2,
    max_K: int = 6,
    max_V: int = 6,
    max_M: int | None = None,
    min_T: int = 1,
    distinct_KV: bool = True,
    draw_scale: bool = True,
) -> BLACase:
    """A random BLA problem.

    W in [1, max_W]; N odd or == W; M in [1, max_M] (default max_M = W), with M == N, M > N and M < N all
    drawn often; T in [min_T, max_T], with T == 1 and T around W drawn often; L mostly in [1, T] (several
    chunks, usually a partial last one), sometimes in [1, max_L] (default max_T + 4, so L > W and L > T
    occur); K != V unless distinct_KV is False (or max_V == 1); scale is None (default 1/sqrt(K)) or a
    positive float when draw_scale.
    """
    W = draw(st.integers(1, max_W), label="W")
    N = draw(resolutions(W), label="N")
    max_M = max(max_M or W, 1)
    m_kind = draw(st.integers(0, 3), label="M kind")  # 0: M == N, 1: M > N (when possible), else any
    if m_kind == 0:
        M = N
    elif m_kind == 1 and N < max_M:
        M = draw(st.integers(N + 1, max_M), label="M")
    else:
        M = draw(st.integers(1, max_M), label="M")
    edges = sorted({min(max(x, min_T), max_T) for x in (1, W - 1, W, W + 1)})  # T == 1, T around W
    if draw(st.integers(0, 4), label="T kind") == 0:
        T = draw(st.sampled_from(edges), label="T")
    else:
        T = draw(st.integers(min_T, max_T), label="T")
    # mostly several chunks (usually with a partial last one); sometimes anything up to max_L (L > T, L > W)
    if draw(st.integers(0, 3), label="L kind") < 3:
        L = draw(st.integers(1, max(T, 1)), label="L")
    else:
        L = draw(st.integers(1, max_L or (max_T + 4)), label="L")
    B = draw(st.integers(1, max_B), label="B")
    H = draw(st.integers(1, max_H), label="H")
    K = draw(st.integers(1, max_K), label="K")
    v_choices = [x for x in range(1, max_V + 1) if x != K or not distinct_KV] or [K]
    V = draw(st.sampled_from(v_choices), label="V")
    scale = draw(st.one_of(st.none(), st.floats(0.1, 2.0)), label="scale") if draw_scale else None
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    return BLACase(W=W, N=N, M=M, T=T, L=L, B=B, H=H, K=K, V=V, scale=scale, seed=seed)


def make_qkv(case: BLACase, dtype: torch.dtype = F64, device="cpu"):
    """q, k [B, T, H, K] and v [B, T, H, V], standard normal, from case.seed (drawn in float64 on the CPU,
    then cast, so every dtype and device sees the same numbers up to rounding)."""
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.T, case.H, case.K, generator=gen, dtype=F64)
    k = torch.randn(case.B, case.T, case.H, case.K, generator=gen, dtype=F64)
    v = torch.randn(case.B, case.T, case.H, case.V, generator=gen, dtype=F64)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def max_abs_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.to(F64) - b.to(F64)).abs().max().item() if a.numel() else 0.0


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """max |actual - expected| <= tol * max(1, max |expected|): absolute for O(1) values, relative beyond.
    Shapes must match exactly; NaNs fail."""
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if not actual.numel():
        return
    a, e = actual.to(F64), expected.to(F64)
    assert torch.isfinite(a).all(), f"{what} has non-finite entries"
    ref = max(1.0, e.abs().max().item())
    err = max_abs_err(a, e)
    assert err <= tol * ref, f"{what} max abs err {err:.3e} > {tol:.1e} * {ref:.3g}"


def assert_non_finite_where(actual: torch.Tensor, expected: torch.Tensor, tol: float, what: str = "") -> None:
    """actual is non-finite exactly where expected (a float64 reference) is, and its finite elements are within
    tol * max(1, max |expected|) of expected's (absolute for O(1) values, relative beyond)."""
    assert actual.shape == expected.shape, f"{what} shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = torch.isfinite(expected)
    differ = torch.isfinite(actual.to(F64)) != finite
    assert not differ.any(), (
        f"{what}: {differ.sum().item()} elements finite in one and not the other, first at index "
        f"{differ.nonzero()[0].tolist()} (reference {'finite' if finite[differ][0] else 'non-finite'} there)"
    )
    assert_close(actual.to(F64)[finite], expected[finite], tol, what)


def swa_reference(q, k, v, window: int, scale: float | None = None) -> torch.Tensor:
    """Sliding-window softmax attention, written independently of bla_tvm: o_t = softmax over keys s with
    t - W < s <= t of scale <q_t, k_s>, applied to v_s. q, k [B, T, H, K], v [B, T, H, V] -> [B, T, H, V]."""
    q, k, v = (x.to(F64) for x in (q, k, v))
    T = q.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = scale * torch.einsum("bthk,bshk->bhts", q, k)
    t = torch.arange(T)[:, None]
    s = torch.arange(T)[None, :]
    visible = (s <= t) & (s > t - window)
    p = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshv->bthv", p, v)



# --- the float64 definition's logits, and what float32 logits can match ---------------------------------------


def reference_logits_and_slots(q, k, v, window, resolution, num_slots, scale):
    """The recurrent definition (bla-math.md), keeping its intermediates: masked logits s [B, T, H, M] and
    slot values Vslot [B, T, H, M, V], float64 (o = softmax(s) Vslot is ``bla_recurrent``)."""
    from bla_tvm import BLAParams
    from bla_tvm.constants import bla_constants

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


def assert_within_float32_logit_bound(o, q, k, v, case: BLACase, tol: float) -> None:
    """o [B, T, H, V] (from q, k, v as given, starting from zeros) against the float64 definition at the same
    inputs, per output row t: max_v |o_t - ref_t| <= tol * max |ref| + 2 delta_t sum_i p_i max_v |Vslot_i - ref_t|
    with delta_t = LOGIT_ERR_FACTOR * eps32 * scale * |q_t| * max_s |k_s|. The second term is the first-order
    effect on a softmax of logits known only to float32 accuracy, which no float32 kernel can beat: it is tiny
    when the softmax is saturated (one p_i ~ 1) and only matters where slots nearly tie."""
    scale = 1.0 / math.sqrt(case.K) if case.scale is None else case.scale
    s, vslot = reference_logits_and_slots(q, k, v, case.W, case.N, case.M, scale)
    p = torch.softmax(s, dim=-1)
    ref = torch.einsum("bthm,bthmv->bthv", p, vslot)
    err = (o.to(F64) - ref).abs().amax(-1)  # [B, T, H]
    spread = (p[..., None] * (vslot - ref[..., None, :]).abs()).sum(-2).amax(-1)  # sum_i p_i |Vslot_i - o|
    q_norm = q.to(F64).norm(dim=-1)
    k_norm = k.to(F64).norm(dim=-1).amax(1, keepdim=True)
    delta = LOGIT_ERR_FACTOR * ACC_EPS * abs(scale) * q_norm * k_norm
    bound = tol * ref.abs().max() + 2 * delta * spread
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"error exceeds the float32-logit bound by {worst:.2f}x (max |q| {q.abs().max():.3g})"

# --- cases for the compiled kernels -----------------------------------------------------------------------
#
# Every distinct (W, N, M, K, V, dtype) compiles three kernels (about a second on two cores), so tests of the
# compiled op draw W, N, M, K and V from this small fixed pool and let hypothesis vary everything a kernel is
# not specialised on (B, T, H, scale, data).


@dataclass(frozen=True)
class KernelShape:
    """What a compiled kernel is specialised on, less dtype and chunk length: W, N, M, K, V."""

    W: int
    N: int
    M: int
    K: int
    V: int
    why: str = ""

    @property
    def id(self) -> str:
        return f"W{self.W}N{self.N}M{self.M}K{self.K}V{self.V}"

    @property
    def is_swa(self) -> bool:
        return self.N == self.W == self.M


KERNEL_POOL = (
    KernelShape(16, 16, 16, 8, 8, "N == W == M, even W: the Nyquist row; SWA"),
    KernelShape(7, 7, 7, 5, 3, "N == W == M, odd W, K != V; SWA"),
    KernelShape(1, 1, 1, 4, 6, "W = 1: o_t = v_t"),
    KernelShape(80, 80, 80, 16, 16, "N == W == M with W > L (window spans chunks), even W; SWA"),
    KernelShape(16, 7, 9, 40, 72, "M > N, K and V not powers of two"),
    KernelShape(12, 5, 12, 16, 24, "M == W > N"),
    KernelShape(9, 5, 3, 6, 6, "M < N"),
    KernelShape(64, 15, 15, 64, 64, "the demo's shape: W == L, N == M < W"),
    KernelShape(100, 31, 40, 72, 40, "W > L, M > N, K = 72, V = 40"),
)


@st.composite
def pooled_cases(
    draw, shape: KernelShape, max_T: int = 200, max_B: int = 3, max_H: int = 3, chunk_size: int = 64,
    draw_scale: bool = True,
) -> BLACase:
    """A BLACase with W, N, M, K, V from ``shape`` and L = chunk_size; T in [1, max_T] with T == 1, T around
    W and T around multiples of L drawn often (T < W, partial last chunks, exact multiples)."""
    W, L = shape.W, chunk_size
    edges = sorted({x for x in (1, 2, W - 1, W, W + 1, L - 1, L, L + 1, 2 * L, 2 * L + 1) if 1 <= x <= max_T})
    if draw(st.integers(0, 2), label="T kind") == 0:
        T = draw(st.sampled_from(edges), label="T")
    else:
        T = draw(st.integers(1, max_T), label="T")
    B = draw(st.integers(1, max_B), label="B")
    H = draw(st.integers(1, max_H), label="H")
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)), label="scale") if draw_scale else None
    seed = draw(st.integers(0, 2**31 - 1), label="seed")
    return BLACase(W=W, N=shape.N, M=shape.M, T=T, L=L, B=B, H=H, K=shape.K, V=shape.V, scale=scale, seed=seed)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (0 for empty tensors), in float64."""
    if not expected.numel():
        return 0.0
    return max_abs_err(actual, expected) / max(expected.to(F64).abs().max().item(), 1e-300)
