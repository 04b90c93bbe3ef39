"""BLA's constant matrices, in float64 torch, exactly as ../shared/docs/bla-math.md defines them.

Window W, resolution N (real Fourier rows kept), slots M, chunk length L.
These are computed once on the host; kernels receive them cast to their accumulation dtype.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .params import BLAParams, check_chunk_size

F64 = torch.float64


def fourier_basis(window: int, resolution: int, lags: torch.Tensor) -> torch.Tensor:
    """phi_n(tau) for n < N at (possibly fractional) lags: [N, len(lags)].

    Rows: 1, then sqrt2 cos(2 pi m tau / W), sqrt2 sin(2 pi m tau / W) for m = 1, 2, ...;
    when W is even and N == W the last row is the Nyquist row cos(pi tau).
    """
    lags = lags.to(F64)
    rows = [torch.ones_like(lags)]
    m = 1
    while len(rows) < resolution:
        angle = 2 * math.pi * m * lags / window
        if 2 * m == window:  # Nyquist: only when W is even and N == W
            rows.append(torch.cos(angle))
        else:
            rows.append(math.sqrt(2) * torch.cos(angle))
            if len(rows) < resolution:
                rows.append(math.sqrt(2) * torch.sin(angle))
        m += 1
    return torch.stack(rows)


def partner_index(resolution: int) -> torch.Tensor:
    """For each basis row n, the other row of its (cos, sin) pair; itself for phi_0 and Nyquist: [N] int64."""
    partner = torch.arange(resolution)
    for n in range(1, resolution - 1, 2):
        partner[n], partner[n + 1] = n + 1, n
    return partner


@dataclass(frozen=True)
class BLAConstants:
    """The recurrence's matrices (see bla-math.md, "Recurrent form").

    R [N, N]: one-lag shift in the basis; b [N]: phi(0); A = (I - b b^T / W) R [N, N];
    slot_lags [M]: tau_i = i W / M; C [M, N]: C[i, n] = phi_n(tau_i) / W.
    """

    params: BLAParams
    R: torch.Tensor
    b: torch.Tensor
    A: torch.Tensor
    slot_lags: torch.Tensor
    C: torch.Tensor


@functools.lru_cache(maxsize=64)
def bla_constants(params: BLAParams) -> BLAConstants:
    W, N, M = params.window, params.resolution, params.num_slots
    lags = torch.arange(W, dtype=F64)
    Phi = fourier_basis(W, N, lags)  # [N, W]
    shift = torch.roll(torch.eye(W, dtype=F64), 1, dims=0)  # S e_tau = e_{tau+1 mod W}
    R = Phi @ shift @ Phi.T / W
    b = Phi[:, 0].clone()
    A = (torch.eye(N, dtype=F64) - torch.outer(b, b) / W) @ R
    slot_lags = torch.arange(M, dtype=F64) * W / M
    C = fourier_basis(W, N, slot_lags).T / W
    return BLAConstants(params, R, b, A, slot_lags, C)


@dataclass(frozen=True)
class ChunkConstants:
    """Constants of the chunked form for chunk length L (bla-math.md, "Chunked form"); j = 0..L-1.

    Psi [L, N]: b^T R^{j+1} / W.           Inv [L, L]: (I + G)^{-1}, G[t, s] = b^T R^{t-s} b / W for s < t.
    H [M, L]: H[i, D] = C_i R^D b.          Bm [L, N]: Bm[s] = R^{L-1-s} b.
    state_in [N, L] = Bm^T Inv (chunk-local state contribution U = state_in K).
    state_decay [N, N] = A^L = R^L - Bm^T Inv Psi (X_next = A^L X + U).
    lag_basis [N, L]: lag_basis[:, D] = R^D b, so that H = C lag_basis.
    input_map [L, L + N] = [Inv | -Inv Psi], so that K' = input_map [K; X] (step 1 as one product).
    final_map [L + 1, N, N + L]: final_map[r] = [A^r | A^{r-1-j} b (j < r), 0 (j >= r)], the state after the
        first r tokens of a chunk: X_r = final_map[r] [X; K] (a sequence's last, possibly partial, chunk).
    rot_diag, rot_off [L, N]: R^{j+1}[n, n] and R^{j+1}[n, partner(n)], so that
        (R^{j+1} x)[n] = rot_diag[j, n] x[n] + rot_off[j, n] x[partner(n)]
        (x R^{j+1})[n] = rot_diag[j, n] x[n] - rot_off[j, n] x[partner(n)]   (R^{j+1} is a rotation)
    """

    base: BLAConstants
    chunk_size: int
    Psi: torch.Tensor
    Inv: torch.Tensor
    H: torch.Tensor
    Bm: torch.Tensor
    state_in: torch.Tensor
    state_decay: torch.Tensor
    rot_diag: torch.Tensor
    rot_off: torch.Tensor
    lag_basis: torch.Tensor
    input_map: torch.Tensor
    final_map: torch.Tensor


def chunk_constants(params: BLAParams, chunk_size: int) -> ChunkConstants:
    # Validate before the cache: lru_cache keys by equality, so 16.0 or True would hit the entry for 16 or 1.
    return _chunk_constants(params, check_chunk_size(chunk_size))


@functools.lru_cache(maxsize=64)
def _chunk_constants(params: BLAParams, L: int) -> ChunkConstants:
    base = bla_constants(params)
    R, b, C, W, N = base.R, base.b, base.C, params.window, params.resolution
    powers = [torch.eye(N, dtype=F64)]  # R^0 .. R^L
    for _ in range(L):
        powers.append(R @ powers[-1])
    R_pow = torch.stack(powers)  # [L + 1, N, N]
    Psi = (b @ R_pow[1:]) / W  # [L, N]
    kernel = (b @ R_pow[:L] @ b) / W  # b^T R^D b / W, D = 0..L-1
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    G = torch.where(lag > 0, kernel[lag.clamp(min=0)], torch.zeros((), dtype=F64))
    Inv = torch.linalg.inv(torch.eye(L, dtype=F64) + G)
    lag_basis = (R_pow[:L] @ b).T  # [N, L]
    H = C @ lag_basis  # [M, L]
    Bm = torch.stack([R_pow[L - 1 - s] @ b for s in range(L)])  # [L, N]
    state_in = Bm.T @ Inv
    state_decay = R_pow[L] - state_in @ Psi
    partner = partner_index(N)
    n = torch.arange(N)
    rot_diag = R_pow[1:, n, n]
    rot_off = torch.where(partner == n, torch.zeros((), dtype=F64), R_pow[1:, n, partner])
    input_map = torch.cat([Inv, -Inv @ Psi], dim=1)
    final_map = torch.zeros(L + 1, N, N + L, dtype=F64)
    final_map[0, :, :N] = torch.eye(N, dtype=F64)
    for r in range(1, L + 1):  # X_r = A X_{r-1} + b k_{r-1}^T
        final_map[r] = base.A @ final_map[r - 1]
        final_map[r, :, N + r - 1] = b
    return ChunkConstants(
        base, L, Psi, Inv, H, Bm, state_in, state_decay, rot_diag, rot_off, lag_basis, input_map, final_map
    )
