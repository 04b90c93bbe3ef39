"""The constants of the CUDA tile-program forward (``schedules/cuda_tile_forward.py``), in float64 on the host.

The tile kernel computes bla-math.md's chunked form with every contraction on the tensor cores and no
diagonal gather, through the rotation identity lag_basis[:, D] = R^D b with R orthogonal:

    z[j]  = R^{j+1} (X q_j + sum_{s <= j} qx[j, s] R^{-(s+1)} b)          (steps 2-3: scores = C z)
    mix   = [ (w'_j . R^{-(s+1)} b) masked to s <= j  |  w'_j ],  w'_j = (R^{j+1})^T w_j     (step 5)

so the lagged products become a masked [16 x L] x [L x N] product followed by a per-row rotation.

Two changes of form make the kernel's registers line up:
- the basis is permuted so that every rotation pair (cos_m, sin_m) sits at columns (2p, 2p + 1), the rows that
  R does not rotate (phi_0 and, for N == W even, the Nyquist row) after them: a rotation then mixes the two
  columns one thread holds in an mma accumulator;
- N is padded to NP, a multiple of 16 (the mma's K), and M to MP, a multiple of the slot tile; padded columns
  and slots are zero (padded slots are masked as well).

Every table that is a B operand of an mma is stored transposed, [columns of the product, reduction axis]
(``*_t``), so a thread's two adjacent reduction elements are adjacent in memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .constants import F64, chunk_constants
from .params import BLAParams


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def rotation_order(resolution: int) -> torch.Tensor:
    """perm [N] int64: column p of the tile kernel's basis is row perm[p] of bla-math.md's basis; pairs first
    ((1, 2), (3, 4), ...), then phi_0, then the Nyquist row if N is even (N == W)."""
    pairs = (resolution - 1) // 2
    order = list(range(1, 2 * pairs + 1)) + [0] + ([resolution - 1] if resolution % 2 == 0 and resolution > 1 else [])
    return torch.tensor(order, dtype=torch.int64)


@dataclass(frozen=True)
class TileConstants:
    """Tables of the tile forward for chunk length L, basis padded to NP, slots padded to MP (float64).

    perm [N]: see ``rotation_order``.
    input_map [L, L + NP]: [Inv | -Inv Psi] with Psi's columns permuted, so k' = input_map [k; X] (X permuted);
        input_map_t [L + NP, L] its transpose (the backward's d[k; X] = input_map_t d k').
    lag [L, NP]: lag[s, p] = (R^{-(s+1)} b)[perm p];  lag_t [NP, L] its transpose.
    slots [MP, NP]: C with permuted columns; slots_t [NP, MP] its transpose.
    rot_diag, rot_pair, rot_pair_t [L, NP]: with p' = p xor 1,
        (R^{j+1} x)[p]   = rot_diag[j, p] x[p] + rot_pair[j, p] x[p']
        ((R^{j+1})^T x)[p] = rot_diag[j, p] x[p] + rot_pair_t[j, p] x[p']
    """

    perm: torch.Tensor
    input_map: torch.Tensor
    input_map_t: torch.Tensor
    lag: torch.Tensor
    lag_t: torch.Tensor
    slots: torch.Tensor
    slots_t: torch.Tensor
    rot_diag: torch.Tensor
    rot_pair: torch.Tensor
    rot_pair_t: torch.Tensor


#: the tile forward's chunk length (four warps of 16 rows) and slots per online-softmax step
TILE_CHUNK = 64
SLOT_TILE = 64


def tile_forward_serves(spec) -> bool:
    """Whether the tile-program forward computes ``spec`` (a KernelSpec) on CUDA: 16-bit inputs, L = 64, K and V
    multiples of 16 up to 128, N up to 127 (its fragments stay in registers)."""
    return (
        spec.dtype in ("float16", "bfloat16")
        and spec.chunk_size == TILE_CHUNK
        and spec.head_k % 16 == 0 and 16 <= spec.head_k <= 128
        and spec.head_v % 16 == 0 and 16 <= spec.head_v <= 128
        and spec.resolution <= 127
    )  # fmt: skip


#: shared memory one CUDA thread block may use on sm_90 (227 KB)
SHARED_MEMORY_LIMIT = 232448


@dataclass(frozen=True)
class ForwardSharedLayout:
    """Where the tile forward (``schedules/cuda_tile_forward.py``) keeps each buffer in its dynamic shared memory,
    in float16 elements from the start. Region 1 holds the raw chunk [k|v; X|Y]^T, then (after the [k'|v'] product)
    the constant tables lag_t, slots, slots_t, lag; region 2 (from ``keys``) holds [k'; X] and [v'; Y]^T; the int32
    first non-finite rows come last (``first_bad``, in 32-bit words)."""

    raw_stride: int
    keys_stride: int
    values_stride: int
    lag_t: int
    slots: int
    slots_t: int
    lag: int
    keys: int
    values: int
    first_bad: int
    halves: int

    @property
    def bytes(self) -> int:
        return 2 * self.halves


@functools.lru_cache(maxsize=256)  # dispatch asks on every call
def forward_shared_layout(spec, slot_tile: int = SLOT_TILE) -> ForwardSharedLayout:
    L, K, V, NP, MT = spec.chunk_size, spec.head_k, spec.head_v, padded_resolution(spec.resolution), slot_tile
    F, LR = K + V, L + NP
    raw_stride, keys_stride, values_stride = LR + 8, K + 8, LR + 8  # padded by 8 halves: rows in other banks
    slots = NP * (L + 8)
    slots_t = slots + MT * (NP + 8)
    lag = slots_t + NP * (MT + 8)
    keys = max(F * raw_stride, lag + L * (NP + 8))
    values = keys + LR * keys_stride
    first_bad = (values + V * values_stride) // 2
    return ForwardSharedLayout(raw_stride, keys_stride, values_stride, 0, slots, slots_t, lag, keys, values, first_bad,
                               2 * (first_bad + V + 2))  # fmt: skip


@dataclass(frozen=True)
class BackwardSharedLayout:
    """Where the tile backward (``schedules/cuda_tile_backward.py``) keeps each buffer in its dynamic shared
    memory, in float16 elements from the start. Region 1 holds the raw chunk [k|v; X|Y]^T, then the constant
    tables (lag_t, slots, slots_t, lag), then d[k'|v']^T; region 2 (from ``keys``) holds [k'; X], its transpose
    and [v'; Y], then the transposed row operands gt, ht, q_t, do_t; the int32 row masks come last."""

    raw_stride: int
    keys_stride: int
    keys_t_stride: int
    values_stride: int
    row_stride: int
    lag_t: int
    slots: int
    slots_t: int
    lag: int
    keys: int
    keys_t: int
    values: int
    gt: int
    ht: int
    q_t: int
    do_t: int
    bad: int
    halves: int

    @property
    def bytes(self) -> int:
        return 2 * self.halves


@functools.lru_cache(maxsize=256)  # dispatch asks on every call
def backward_shared_layout(spec, slot_tile: int = SLOT_TILE) -> BackwardSharedLayout:
    L, K, V, NP, MT = spec.chunk_size, spec.head_k, spec.head_v, padded_resolution(spec.resolution), slot_tile
    F, LR = K + V, L + NP
    raw_stride, keys_stride, keys_t_stride, values_stride, row_stride = LR + 8, K + 8, LR + 8, V + 8, L + 8
    slots = NP * (L + 8)
    slots_t = slots + MT * (NP + 8)
    lag = slots_t + NP * (MT + 8)
    keys = max(F * raw_stride, lag + L * (NP + 8), F * row_stride)
    keys_t = keys + LR * keys_stride
    values = keys_t + K * keys_t_stride
    ht = keys + LR * row_stride
    q_t = ht + LR * row_stride
    do_t = q_t + K * row_stride
    bad = round_up(max(values + LR * values_stride, do_t + V * row_stride), 2)
    return BackwardSharedLayout(raw_stride, keys_stride, keys_t_stride, values_stride, row_stride, 0, slots, slots_t,
                                lag, keys, keys_t, values, keys, ht, q_t, do_t, bad, bad + 4 * (F + V))  # fmt: skip


def tile_backward_serves(spec) -> bool:
    """Whether the tile-program backward computes ``spec`` on CUDA: where the tile forward does and its shared
    memory fits a block (K = V = 128 with N > 63 does not)."""
    return tile_forward_serves(spec) and backward_shared_layout(spec).bytes <= SHARED_MEMORY_LIMIT


def tile_states_half(spec) -> bool:
    """Whether the tile scan writes the chunk-start states in float16, not float32: where the tile forward and
    backward, which read them as float16 operands, serve ``spec`` (the final state reads the scan's float32
    end_states)."""
    return tile_backward_serves(spec)


def tile_scan_serves(spec) -> bool:
    """Whether the tile-program scans (``schedules/cuda_tile_scan.py`` and ``cuda_tile_scan_reverse.py``) run
    ``spec`` on CUDA: 16-bit inputs, N up to 127 (eight warps of 16 state rows), L a multiple of 16, and K and V
    multiples of 16, as each block of 16 state columns must be all key or all value columns (K = 8, V = 24 read
    and wrote value columns as key columns)."""
    return (spec.dtype in ("float16", "bfloat16") and spec.resolution <= 127 and spec.head_k % 16 == 0
            and spec.head_v % 16 == 0 and spec.chunk_size % 16 == 0)  # fmt: skip


def tile_programs_fit(spec, arch) -> bool:
    """Whether the tile programs may run ``spec`` on ``arch`` (a ``cuda_arch.CudaArch``): sm_80 or newer, and the
    forward's block (and the backward's, where the tile backward serves ``spec``) within the shared memory a block
    may opt in to there. All or none: the tile scan writes float16 states only for the tile forward and backward to
    read (``tile_states_half``). The scans' blocks (at most 22 KB) fit every arch."""
    if not arch.runs_tile_programs:
        return False
    need = forward_shared_layout(spec).bytes if tile_forward_serves(spec) else 0
    if tile_backward_serves(spec):
        need = max(need, backward_shared_layout(spec).bytes)
    return need <= arch.shared_memory


def split_half(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (float64) as hi + lo, each float16 (returned as float64 values): |x - hi - lo| ~ 2^-22 |x|."""
    hi = x.to(torch.float16).to(F64)
    return hi, (x - hi).to(torch.float16).to(F64)


@functools.lru_cache(maxsize=32)
def scan_tables(params: BLAParams, chunk_size: int) -> dict[str, torch.Tensor]:
    """The tile scan's tables (float64 values exact in float16): state_in = Bm^T Inv [NP, L] and the decay
    A^L [NP, NP], each split hi + lo, padded with zeros to NP rows (and columns)."""
    cc = chunk_constants(params, chunk_size)
    N, NP = params.resolution, padded_resolution(params.resolution)
    state_in = torch.zeros(NP, chunk_size, dtype=F64)
    state_in[:N] = cc.state_in
    decay = torch.zeros(NP, NP, dtype=F64)
    decay[:N, :N] = cc.state_decay
    (in_hi, in_lo), (decay_hi, decay_lo) = split_half(state_in), split_half(decay)
    return {"tile_state_in_hi": in_hi, "tile_state_in_lo": in_lo, "tile_decay_hi": decay_hi, "tile_decay_lo": decay_lo}


@functools.lru_cache(maxsize=32)
def reverse_scan_tables(params: BLAParams, chunk_size: int) -> dict[str, torch.Tensor]:
    """The tile reverse scan's tables, split hi + lo (float64 values exact in float16): (A^L)^T [NP, NP] and
    state_in^T [L, NP], zero-padded."""
    cc = chunk_constants(params, chunk_size)
    N, NP = params.resolution, padded_resolution(params.resolution)
    decay_t = torch.zeros(NP, NP, dtype=F64)
    decay_t[:N, :N] = cc.state_decay.T
    state_in_t = torch.zeros(chunk_size, NP, dtype=F64)
    state_in_t[:, :N] = cc.state_in.T
    (decay_hi, decay_lo), (in_hi, in_lo) = split_half(decay_t), split_half(state_in_t)
    return {"tile_decay_t_hi": decay_hi, "tile_decay_t_lo": decay_lo, "tile_state_in_t_hi": in_hi,
            "tile_state_in_t_lo": in_lo}  # fmt: skip


def padded_resolution(resolution: int) -> int:
    """NP: N rounded up to the mma's reduction length 16."""
    return round_up(resolution, 16)


@functools.lru_cache(maxsize=32)
def tile_constants(params: BLAParams, chunk_size: int, slot_tile: int) -> TileConstants:
    cc = chunk_constants(params, chunk_size)
    base, L, N = cc.base, chunk_size, params.resolution
    NP, MP = padded_resolution(N), round_up(params.num_slots, slot_tile)
    perm = rotation_order(N)
    R, b = base.R, base.b

    def pad_columns(x, width):
        return torch.cat([x, x.new_zeros(*x.shape[:-1], width - x.shape[-1])], dim=-1)

    input_map = torch.cat([cc.Inv, pad_columns(-(cc.Inv @ cc.Psi)[:, perm], NP)], dim=1)
    R_inv = R.T
    lag_rows, vector = [], b
    for _ in range(L):  # R^{-(s+1)} b, s = 0..L-1
        vector = R_inv @ vector
        lag_rows.append(vector[perm])
    lag = pad_columns(torch.stack(lag_rows), NP)
    slots = pad_columns(base.C[:, perm], NP)
    slots = torch.cat([slots, slots.new_zeros(MP - slots.shape[0], NP)])
    partner = torch.arange(NP) ^ 1
    rot_diag, rot_pair, rot_pair_t = (torch.zeros(L, NP, dtype=F64) for _ in range(3))
    power = torch.eye(N, dtype=F64)
    for j in range(L):
        power = R @ power  # R^{j+1}
        P = torch.zeros(NP, NP, dtype=F64)
        P[:N, :N] = power[perm][:, perm]
        p = torch.arange(NP)
        rot_diag[j], rot_pair[j], rot_pair_t[j] = P[p, p], P[p, partner], P[partner, p]

    return TileConstants(perm, input_map, input_map.T.contiguous(), lag, lag.T.contiguous(), slots, slots.T.contiguous(), rot_diag, rot_pair,
                         rot_pair_t)  # fmt: skip
