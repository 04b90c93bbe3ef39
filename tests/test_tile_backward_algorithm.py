"""The tile backward's algorithm (schedules/cuda_tile_backward.py) carried out in float64 torch with the tile
constants must equal autograd through the tile forward's (tests/test_tile_constants.py), chunk by chunk: this
checks, without a GPU, the order of the rotations, the scale, the masks, the softmax gradient through
delta = dw . w, and the chunk-wide products through the transposed input map."""

import math

import pytest
import torch

from bla_tvm.params import BLAParams
from bla_tvm.tile_constants import padded_resolution, tile_constants

from test_tile_constants import rotate

F64 = torch.float64


def chunk_forward(q, kv, Xp, tc, params, L, slot_tile, scale, seen_before, K):
    """o [L, V] of one chunk the way the tile forward computes it; q [L, K], kv [L, F], Xp [NP, F] permuted."""
    M, W = params.num_slots, params.window
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    kv_eff = tc.input_map @ torch.cat([kv, Xp])
    kp, vp = kv_eff[:, :K], kv_eff[:, K:]
    qx = torch.where(causal, q @ kp.T, 0.0)
    z = scale * rotate(q @ Xp[:, :K].T + qx @ tc.lag, tc.rot_diag, tc.rot_pair)
    i = torch.arange(tc.slots.shape[0])[None, :]
    masked = (i >= M) | (i * W > (seen_before + torch.arange(L)[:, None]) * M)
    p = torch.softmax((z @ tc.slots.T).masked_fill(masked, -math.inf), dim=-1)
    w_rot = rotate(p @ tc.slots, tc.rot_diag, tc.rot_pair_t)
    return torch.where(causal, w_rot @ tc.lag_t, 0.0) @ vp + w_rot @ Xp[:, K:]


def chunk_backward(q, kv, Xp, do, tc, params, L, slot_tile, scale, seen_before, K):
    """(dq [L, K], d[kv; Xp] [L + NP, F]) of one chunk, step by step as the tile backward computes them."""
    M, W = params.num_slots, params.window
    causal = torch.arange(L)[None, :] <= torch.arange(L)[:, None]
    # forward, recomputed: k', v', z, the softmax's max and sum (pass 1), w, w' = R^T w, mix
    kv_eff = tc.input_map @ torch.cat([kv, Xp])
    kp, vp = kv_eff[:, :K], kv_eff[:, K:]
    qx = torch.where(causal, q @ kp.T, 0.0)
    z = scale * rotate(q @ Xp[:, :K].T + qx @ tc.lag, tc.rot_diag, tc.rot_pair)
    row_max = torch.full((L, 1), -math.inf, dtype=F64)
    row_sum = torch.zeros(L, 1, dtype=F64)
    w = torch.zeros(L, Xp.shape[0], dtype=F64)
    tiles = []
    for first in range(0, tc.slots.shape[0], slot_tile):
        i = first + torch.arange(slot_tile)[None, :]
        masked = (i >= M) | (i * W > (seen_before + torch.arange(L)[:, None]) * M)
        logits = (z @ tc.slots[first:first + slot_tile].T).masked_fill(masked, -math.inf)
        new_max = torch.maximum(row_max, logits.amax(-1, keepdim=True))
        decay = torch.exp(row_max - new_max)
        E = torch.exp(logits - new_max)
        row_sum = row_sum * decay + E.sum(-1, keepdim=True)
        w = w * decay + E @ tc.slots_t[:, first:first + slot_tile].T
        row_max = new_max
        tiles.append((first, masked))
    w = w / row_sum
    w_rot = rotate(w, tc.rot_diag, tc.rot_pair_t)
    mix = torch.where(causal, w_rot @ tc.lag_t, 0.0)
    # backward along each row
    dmix = torch.where(causal, do @ vp.T, 0.0)
    dw = rotate(do @ Xp[:, K:].T + dmix @ tc.lag, tc.rot_diag, tc.rot_pair)
    delta = (dw * w).sum(-1, keepdim=True)
    dz = torch.zeros_like(z)
    for first, masked in tiles:
        logits = (z @ tc.slots[first:first + slot_tile].T).masked_fill(masked, -math.inf)
        p = torch.exp(logits - row_max) / row_sum
        dp = dw @ tc.slots_t[:, first:first + slot_tile]
        dz = dz + (p * (dp - delta)) @ tc.slots[first:first + slot_tile]
    dz_rot = scale * rotate(dz, tc.rot_diag, tc.rot_pair_t)
    dqx = torch.where(causal, dz_rot @ tc.lag_t, 0.0)
    dq = dz_rot @ Xp[:, :K] + dqx @ kp
    # chunk-wide: [dqx | dz'] ^T q and [mix | w'] ^T dO, then the input map transposed
    d_keys = torch.cat([dqx, dz_rot], dim=1).T @ q  # [L + NP, K]: d k' | d X (direct)
    d_values = torch.cat([mix, w_rot], dim=1).T @ do  # [L + NP, V]: d v' | d Y (direct)
    d_eff = torch.cat([d_keys[:L], d_values[:L]], dim=1)
    d_inputs = tc.input_map.T @ d_eff
    d_inputs[L:] += torch.cat([d_keys[L:], d_values[L:]], dim=1)
    return dq, d_inputs


@pytest.mark.parametrize(
    "window, resolution, slots, slot_tile, seen_before",
    [(512, 63, 63, 64, 0), (512, 63, 512, 64, 130), (64, 15, 40, 32, 7), (16, 16, 16, 64, 64), (8, 7, 3, 16, 2)],
    ids=lambda x: str(x),
)
def test_tile_backward_algorithm_matches_autograd(window, resolution, slots, slot_tile, seen_before):
    torch.manual_seed(1)
    params = BLAParams.make(window, resolution, slots)
    L, K, V = 64, 16, 24
    tc = tile_constants(params, L, slot_tile)
    NP, N = padded_resolution(resolution), resolution
    q, kv, do = torch.randn(L, K, dtype=F64), torch.randn(L, K + V, dtype=F64), torch.randn(L, V, dtype=F64)
    Xp = torch.zeros(NP, K + V, dtype=F64)
    Xp[:N] = torch.randn(N, K + V, dtype=F64)
    scale = K**-0.5
    leaves = [x.clone().requires_grad_() for x in (q, kv, Xp)]
    o = chunk_forward(*leaves, tc, params, L, slot_tile, scale, seen_before, K)
    dq_ref, dkv_ref, dX_ref = torch.autograd.grad(o, leaves, do)
    dq, d_inputs = chunk_backward(q, kv, Xp, do, tc, params, L, slot_tile, scale, seen_before, K)
    assert (dq - dq_ref).abs().max() < 1e-10
    assert (d_inputs[:L] - dkv_ref).abs().max() < 1e-10
    assert (d_inputs[L:L + N] - dX_ref[:N]).abs().max() < 1e-10
