"""Float64 reference implementations of Blurry Window Attention (bla-math.md), independent of the kernels.

All three take q, k [B, T, H, K] and v [B, T, H, V] and return o [B, T, H, V] in float64:

- ``bla_recurrent``: the definition, token by token (X_t = A X_{t-1} + b k_t^T, slots C X_t, softmax over slots);
- ``bla_quadratic``: through the slot kernels h_i(D) = C_i A^D b, O(T^2 M);
- ``bla_chunked``: the chunked rotation form that the kernels follow, chunk by chunk.
"""

from __future__ import annotations

import torch

from .constants import F64, bla_constants, chunk_constants, partner_index
from .params import BLAParams, check_chunk_size, check_qkv, check_scale


def _prepare(q, k, v, window, resolution, num_slots, scale):
    """Validated parameters and q, k, v as [B, H, T, D] float64, k and v repeated over GQA groups."""
    check_qkv(q, k, v)
    params = BLAParams.make(window, resolution, num_slots)
    scale = check_scale(scale, q.shape[-1])
    group = q.shape[2] // max(k.shape[2], 1)
    k, v = (x.repeat_interleave(group, dim=2) for x in (k, v))
    q, k, v = (x.to(F64).transpose(1, 2) for x in (q, k, v))
    return params, scale, q, k, v


def _slot_mask(slot_lags: torch.Tensor, T: int) -> torch.Tensor:
    """[T, M] True where slot i's lag lies before the sequence start (tau_i > t)."""
    return slot_lags[None, :] > torch.arange(T, dtype=F64)[:, None]


def _initial_state(initial_state, B, H, N, K, V):
    """X, Y [B, H, N, K | V] in float64 (a state per key/value head repeated over query heads) and the tokens
    seen [B] (zeros without an initial state)."""
    if initial_state is None:
        return torch.zeros(B, H, N, K, dtype=F64), torch.zeros(B, H, N, V, dtype=F64), torch.zeros(B, dtype=torch.long)
    X, Y, seen = initial_state[:3]  # a BLAState's window, if given, is not needed here
    group = H // X.shape[1]
    return (*(x.to(F64).repeat_interleave(group, dim=1) for x in (X, Y)), seen.to(torch.long))


def _softmax_readout(scores, slot_values, mask):
    """scores [B, H, T, M] masked by mask [T, M]; slot_values [B, H, T, M, V] -> o [B, H, T, V]."""
    p = torch.softmax(scores.masked_fill(mask, float("-inf")), dim=-1)
    return torch.einsum("bhtm,bhtmv->bhtv", p, slot_values)


def bla_recurrent(q, k, v, window, resolution, num_slots=None, scale=None, initial_state=None, output_final_state=False):
    """The recurrent definition: for t = 0..T-1, X_t = A X_{t-1} + b k_t^T, Y_t = A Y_{t-1} + b v_t^T,
    s_t = scale * C X_t q_t (masked where tau_i > t0 + t), o_t = softmax(s_t)^T C Y_t.

    initial_state: (X [B, H, N, K], Y [B, H, N, V], t0 [B] tokens already seen), or a BLAState; zeros by default.
    Returns o, or (o, (X, Y, t0 + T)) with ``output_final_state`` (float64, autograd flows through; with GQA
    per query head, every head of a group holding its key/value head's state).
    """
    params, scale, q, k, v = _prepare(q, k, v, window, resolution, num_slots, scale)
    c = bla_constants(params)
    B, H, T, K = q.shape
    X, Y, seen = _initial_state(initial_state, B, H, params.resolution, K, v.shape[-1])
    out = []
    for t in range(T):
        X = c.A @ X + c.b[:, None] * k[:, :, t, None, :]
        Y = c.A @ Y + c.b[:, None] * v[:, :, t, None, :]
        Kslot, Vslot = c.C @ X, c.C @ Y  # [B, H, M, K], [B, H, M, V]
        s = scale * torch.einsum("bhmk,bhk->bhm", Kslot, q[:, :, t])
        mask = c.slot_lags[None, None, :] > (seen + t).to(F64)[:, None, None]  # [B, 1, M]
        p = torch.softmax(s.masked_fill(mask, float("-inf")), dim=-1)
        out.append(torch.einsum("bhm,bhmv->bhv", p, Vslot))
    o = torch.stack(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, v.shape[-1])
    return (o, (X, Y, seen + T)) if output_final_state else o


def slot_kernels(params: BLAParams, length: int) -> torch.Tensor:
    """h[i, D] = C_i A^D b for D = 0..length-1: [M, length]."""
    c = bla_constants(params)
    columns, x = [], c.b
    for _ in range(length):
        columns.append(c.C @ x)
        x = c.A @ x
    return torch.stack(columns, dim=1) if columns else c.C.new_zeros(params.num_slots, 0)


def bla_quadratic(q, k, v, window, resolution, num_slots=None, scale=None):
    """The parallel form: s_t[i] = scale sum_{s<=t} h_i(t-s) <q_t, k_s>, Vslot_t[i] = sum_{s<=t} h_i(t-s) v_s."""
    params, scale, q, k, v = _prepare(q, k, v, window, resolution, num_slots, scale)
    T = q.shape[2]
    h = slot_kernels(params, T)  # [M, T]
    lag = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    toeplitz = torch.where(lag >= 0, h[:, lag.clamp(min=0)], torch.zeros((), dtype=F64))  # [M, t, s]
    scores = scale * torch.einsum("mts,bhtk,bhsk->bhtm", toeplitz, q, k)
    slot_values = torch.einsum("mts,bhsv->bhtmv", toeplitz, v)
    o = _softmax_readout(scores, slot_values, _slot_mask(bla_constants(params).slot_lags, T))
    return o.transpose(1, 2)


def _rotate(x, cc, transpose=False):
    """x [..., n, N], row j -> R^{j+1} x_j, or with transpose x_j R^{j+1} (pair-by-pair rotation tables)."""
    partner = partner_index(x.shape[-1])
    sign = -1.0 if transpose else 1.0
    L = x.shape[-2]
    return cc.rot_diag[:L] * x + sign * cc.rot_off[:L] * x[..., partner]


def bla_chunked(q, k, v, window, resolution, num_slots=None, scale=None, chunk_size=64):
    """The chunked rotation form (bla-math.md, "Chunked form", steps 1-6), chunk by chunk in float64."""
    params, scale, q, k, v = _prepare(q, k, v, window, resolution, num_slots, scale)
    L = check_chunk_size(chunk_size)
    cc = chunk_constants(params, L)
    C, slot_lags = cc.base.C, cc.base.slot_lags
    B, H, T, K = q.shape
    X = q.new_zeros(B, H, params.resolution, K)
    Y = v.new_zeros(B, H, params.resolution, v.shape[-1])
    gather = torch.arange(L)[:, None] - torch.arange(L)[None, :]  # j - D
    causal = gather >= 0
    RL = torch.linalg.matrix_power(cc.base.R, L)
    out = []
    for start in range(0, T, L):
        Qc, Kc, Vc = (x[:, :, start:start + L] for x in (q, k, v))
        n = Qc.shape[2]  # the last chunk may be partial
        Inv, Psi, Hk, Bm = cc.Inv[:n, :n], cc.Psi[:n], cc.H[:, :n], cc.Bm[L - n:]
        # 1. effective inputs
        Kp = Inv @ (Kc - Psi @ X)
        Vp = Inv @ (Vc - Psi @ Y)
        # 2. intra scores: S[j, i] = sum_{D<=j} H[i, D] (Q K'^T)[j, j-D]
        QK = Qc @ Kp.transpose(-1, -2)
        g = gather[:n, :n]
        QK_lag = torch.where(causal[:n, :n], QK[..., torch.arange(n)[:, None], g.clamp(min=0)], 0.0)
        S = QK_lag @ Hk.T
        # 3. inter scores: C R^{j+1} X q_j
        S = S + (_rotate(Qc @ X.transpose(-1, -2), cc) @ C.T)
        S = scale * S
        # 4. softmax over unmasked slots
        mask = _slot_mask(slot_lags, start + n)[start:]
        Pr = torch.softmax(S.masked_fill(mask, float("-inf")), dim=-1)
        # 5. output: sum_s (Pr H)[j, j-s] v'_s + ((Pr C)[j] R^{j+1}) Y
        PH = Pr @ Hk  # [.., j, D]
        scatter = torch.where(causal[:n, :n], PH[..., torch.arange(n)[:, None], g.clamp(min=0)], 0.0)
        O = scatter @ Vp + _rotate(Pr @ C, cc, transpose=True) @ Y
        out.append(O)
        # 6. carry the state: X <- R^n X + Bm^T K'
        Rn = RL if n == L else torch.linalg.matrix_power(cc.base.R, n)
        X = Rn @ X + Bm.transpose(0, 1) @ Kp
        Y = Rn @ Y + Bm.transpose(0, 1) @ Vp
    return torch.cat(out, dim=2).transpose(1, 2) if out else v.new_zeros(B, 0, H, v.shape[-1]).to(F64)
