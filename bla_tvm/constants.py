"""BLA's constant matrices, in float64 torch, exactly as ../shared/docs/bla-math.md defines them.

Window W, resolution N (real Fourier rows kept), slots M, chunk length L.
These are computed once on the host; kernels receive them cast to their accumulation dtype.

Every table is built from the closed forms, never from the [N, W] basis or a [W, W] shift: R is block diagonal
(1 for phi_0, a rotation by 2 pi m / W for the pair m, -1 for the Nyquist row), so its powers are cos / sin
tables and applying one costs O(N). The memory is O(N^2 + N L + M N + L N (N + L)) whatever W: the [N, N] decay
A^L and the final-state map [L + 1, N, N + L] are the largest. Before building, the float64 bytes are checked
against the memory the host has available (``check_memory``).
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


def rotation_powers(window: int, resolution: int, powers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(diag, off) [P, N]: R^p[n, n] and R^p[n, partner(n)] for each p of ``powers`` (off 0 where n has no
    partner), so that R^p x = diag x + off x[partner] and x^T R^p = diag x - off x[partner].

    Row n = 2m - 1 (cos) and 2m (sin) turn by omega = 2 pi m / W: R^p = [[cos, -sin], [sin, cos]](p omega) on the
    pair; phi_0 does not turn; the Nyquist row (m = W / 2, only when N == W is even) turns by pi."""
    n = torch.arange(resolution)
    m = (n + 1) // 2
    nyquist = 2 * m == window
    omega = torch.where(nyquist, math.pi, 2 * math.pi * m.to(F64) / window)
    sign = torch.where((n == 0) | nyquist, 0.0, torch.where(n % 2 == 1, -1.0, 1.0)).to(F64)
    angle = powers.to(F64)[:, None] * omega
    return torch.cos(angle), sign * torch.sin(angle)


def rotate(diag: torch.Tensor, off: torch.Tensor, x: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """R^p x (``transpose``: x^T R^p) along the last axis of x [..., N], with (diag, off) rows of
    ``rotation_powers`` broadcast against x: one power for every row of x, or a power per row."""
    return diag * x + (-off if transpose else off) * x[..., partner_index(x.shape[-1])]


def _dense(diag: torch.Tensor, off: torch.Tensor) -> torch.Tensor:
    """The [N, N] matrix of one power of R from its (diag, off) row."""
    n, partner = torch.arange(diag.shape[0]), partner_index(diag.shape[0])
    matrix = torch.diag(diag)
    matrix[n, partner] += off
    return matrix


#: bytes of a float64 entry
F64_BYTES = 8


def host_elements(params: BLAParams, chunk_size: int | None = None) -> int:
    """Float64 entries ``bla_constants`` (and, with a chunk length L, ``chunk_constants``) hold at once:
    R, A [N, N], C [M, N]; at L also A^L and R^L [N, N], the final-state map [L + 1, N, N + L] and the
    [L, L + N] / [N, L] / [M, L] tables."""
    N, M = params.resolution, params.num_slots
    elements = 2 * N * N + M * N + M + N
    if chunk_size is not None:
        L = chunk_size
        elements += 2 * N * N + (L + 1) * N * (N + L) + L * (L + N) * 3 + 6 * N * L + M * L
    return elements


def available_memory() -> int | None:
    """Bytes of memory the host can still give (MemAvailable in /proc/meminfo), None where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(params: BLAParams, chunk_size: int | None = None) -> None:
    """MemoryError naming the layer's arguments where its float64 constants (``host_elements``) need more memory
    than the host has available: raised before any of them is allocated."""
    needed, available = F64_BYTES * host_elements(params, chunk_size), available_memory()
    if available is not None and needed > available:
        at = "" if chunk_size is None else f" at chunk length {chunk_size}"
        raise MemoryError(
            f"the constants of window={params.window}, resolution={params.resolution}, num_slots={params.num_slots}"
            f"{at} need {needed / 1e6:.0f} MB of host memory, {available / 1e6:.0f} MB are available: lower the "
            "resolution or the number of slots"
        )


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
    """The recurrence's matrices in O(N^2 + M N) memory (``check_memory`` first): R from ``rotation_powers``
    (R = Phi S Phi^T / W, S the shift by one lag), b = phi(0), A = R - b (b^T R) / W."""
    check_memory(params)
    W, N, M = params.window, params.resolution, params.num_slots
    diag, off = rotation_powers(W, N, torch.ones(1))
    R = _dense(diag[0], off[0])
    b = fourier_basis(W, N, torch.zeros(1))[:, 0]
    A = R - torch.outer(b, rotate(diag[0], off[0], b, transpose=True)) / W
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
    """The chunk constants from the rotation tables of R^0 .. R^L (``rotation_powers``), in O(N^2 + L N (N + L))
    memory (``check_memory`` first): no power of R is formed as a matrix but R^L."""
    check_memory(params, L)
    base = bla_constants(params)
    b, C, W, N = base.b, base.C, params.window, params.resolution
    diag, off = rotation_powers(W, N, torch.arange(L + 1))  # R^0 .. R^L
    lag_basis = rotate(diag[:L], off[:L], b).T  # [N, L]: R^D b
    Psi = rotate(diag[1:], off[1:], b, transpose=True) / W  # [L, N]: b^T R^{j+1} / W
    kernel = lag_basis.T @ b / W  # b^T R^D b / W, D = 0..L-1
    lag = torch.arange(L)[:, None] - torch.arange(L)[None, :]
    G = torch.where(lag > 0, kernel[lag.clamp(min=0)], torch.zeros((), dtype=F64))
    eye = torch.eye(L, dtype=F64)
    Inv = torch.linalg.solve_triangular(eye + G, eye, upper=False)  # exactly lower triangular
    H = C @ lag_basis  # [M, L]
    Bm = lag_basis.T.flip(0)  # [L, N]: Bm[s] = R^{L-1-s} b
    state_in = Bm.T @ Inv
    state_decay = _dense(diag[L], off[L]) - state_in @ Psi
    rot_diag, rot_off = diag[1:], off[1:]
    input_map = torch.cat([Inv, -Inv @ Psi], dim=1)
    final_map = torch.zeros(L + 1, N, N + L, dtype=F64)
    final_map[0, :, :N] = torch.eye(N, dtype=F64)
    for r in range(1, L + 1):  # X_r = A X_{r-1} + b k_{r-1}^T, A Y = R Y - b (b^T R Y) / W = R Y - b (Psi[0] Y)
        previous = final_map[r - 1]
        final_map[r] = rotate(diag[1], off[1], previous.T).T - torch.outer(b, Psi[0] @ previous)
        final_map[r, :, N + r - 1] = b
    return ChunkConstants(
        base, L, Psi, Inv, H, Bm, state_in, state_decay, rot_diag, rot_off, lag_basis, input_map, final_map
    )
