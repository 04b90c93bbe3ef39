"""The tile forward's algorithm (schedules/cuda_tile_forward.py) carried out in float64 torch with its own
constants (bla_tvm/tile_constants.py) must equal the chunked reference: this checks the basis permutation, the
rotation identity that replaces the diagonal gathers, the padding, the online softmax over slot tiles and the
kernel's rule for non-finite tokens without a GPU."""

import math

import pytest
import torch

from bla_tvm.constants import chunk_constants
from bla_tvm.params import BLAParams
from bla_tvm.reference import bla_chunked, bla_recurrent
from bla_tvm.tile_constants import padded_resolution, rotation_order, tile_constants

F64 = torch.float64


def rotate(x, diag, pair):
    """x [.., L, NP] row j -> diag[j] x_j + pair[j] x_j[p xor 1]."""
    partner = torch.arange(x.shape[-1]) ^ 1
    return diag * x + pair * x[..., partner]


def tile_algorithm(q, k, v, params, L, slot_tile, scale, initial_state=None):
    """o [B, T, H, V] (float64) computed chunk by chunk the way the tile kernel does, states carried with the
    float64 scan from ``initial_state`` (X [B, H, N, K], Y [B, H, N, V], seen [B]; zeros by default).
    q, k, v [B, T, H, D] float64. A non-finite k or v element enters the products as 0 (stage 1), and o is NaN
    from its chunk's first non-finite k row on and, in column f, from its first non-finite v[:, f] row on
    (stage 5); the scan reads k and v as they are."""
    tc = tile_constants(params, L, slot_tile)
    cc = chunk_constants(params, L)
    B, T, H, K = q.shape
    V, N, M, W = v.shape[-1], params.resolution, params.num_slots, params.window
    NP = padded_resolution(N)
    if initial_state is None:
        X, seen_before = q.new_zeros(B, H, N, K + V), torch.zeros(B, dtype=torch.long)
    else:
        X, seen_before = torch.cat(initial_state[:2], dim=-1), initial_state[2]
    rows = torch.arange(L)[:, None]
    causal = torch.arange(L)[None, :] <= rows  # [j, s]: s <= j
    out = []
    for start in range(0, T, L):
        n = min(L, T - start)

        def chunk(x):
            padded = x.new_zeros(B, L, H, x.shape[-1])
            padded[:, :n] = x[:, start:start + n]
            return padded.transpose(1, 2)  # [B, H, L, D]

        qc, raw = chunk(q), torch.cat([chunk(k), chunk(v)], dim=-1)
        finite = torch.isfinite(raw)
        kvc = torch.where(finite, raw, 0.0)
        first_bad = torch.where(finite, L, rows).amin(dim=2, keepdim=True)  # [B, H, 1, F]
        poisoned = (rows >= first_bad[..., :K].amin(-1, keepdim=True)) | (rows >= first_bad[..., K:])  # [B, H, L, V]
        Xp = X.new_zeros(B, H, NP, K + V)
        Xp[:, :, :N] = X[:, :, tc.perm]
        kv_eff = tc.input_map @ torch.cat([kvc, Xp], dim=2)  # [B, H, L, F]
        kp, vp = kv_eff[..., :K], kv_eff[..., K:]
        qx = torch.where(causal, qc @ kp.transpose(-1, -2), 0.0)
        z = qc @ Xp[..., :K].transpose(-1, -2) + qx @ tc.lag
        z = scale * rotate(z, tc.rot_diag, tc.rot_pair)
        row_max = torch.full((B, H, L, 1), -math.inf, dtype=F64)
        row_sum = torch.zeros(B, H, L, 1, dtype=F64)
        w = torch.zeros(B, H, L, NP, dtype=F64)
        seen = seen_before[:, None, None, None] + start + rows  # [B, 1, L, 1]
        for first in range(0, tc.slots.shape[0], slot_tile):
            i = first + torch.arange(slot_tile)[None, :]
            logits = z @ tc.slots[first:first + slot_tile].T
            masked = (i >= M) | (i * W > seen * M)
            logits = logits.masked_fill(masked, -math.inf)
            new_max = torch.maximum(row_max, logits.amax(-1, keepdim=True))
            decay = torch.exp(row_max - new_max)
            E = torch.where(masked, 0.0, torch.exp(logits - new_max))
            row_sum = row_sum * decay + E.sum(-1, keepdim=True)
            w = w * decay + E @ tc.slots_t[:, first:first + slot_tile].T
            row_max = new_max
        w_rot = rotate(w, tc.rot_diag, tc.rot_pair_t)
        mix = torch.where(causal, w_rot @ tc.lag_t, 0.0)
        o = torch.where(poisoned, math.nan, (mix @ vp + w_rot @ Xp[..., K:]) / row_sum)
        out.append(o.transpose(1, 2)[:, :n])
        X = cc.state_decay @ X + cc.state_in[:, :n] @ raw[:, :, :n] if n == L else None
    return torch.cat(out, dim=1)


@pytest.mark.parametrize(
    "window, resolution, slots, slot_tile",
    [(512, 63, 63, 64), (512, 63, 512, 64), (64, 15, 40, 32), (16, 16, 16, 64), (33, 1, 5, 64), (8, 7, 3, 16)],
    ids=lambda x: str(x),
)
def test_tile_algorithm_matches_the_chunked_reference(window, resolution, slots, slot_tile):
    torch.manual_seed(0)
    params = BLAParams.make(window, resolution, slots)
    B, T, H, K, V, L = 2, 150, 2, 16, 24, 64
    q, k, v = (torch.randn(B, T, H, d, dtype=F64) for d in (K, K, V))
    scale = K**-0.5
    expected = bla_chunked(q, k, v, window, resolution, slots, scale, chunk_size=L)
    actual = tile_algorithm(q, k, v, params, L, slot_tile, scale)
    assert (actual - expected).abs().max() < 1e-10


def test_tile_algorithm_is_non_finite_exactly_where_the_definition_is():
    """Non-finite k and v mid-chunk (NaN, inf, -inf; two columns of v in one chunk), from a carried state: the
    tile kernel's rule (``tile_algorithm``) gives non-finite outputs exactly where the float64 definition does
    (a k at token t: every o[j >= t] of its head; a v[t, f]: o[j >= t, f] only) and its values elsewhere."""
    torch.manual_seed(1)
    window, resolution, slots, L = 64, 15, 40, 64
    params = BLAParams.make(window, resolution, slots)
    B, T, H, K, V = 2, 150, 2, 16, 24
    q, k, v = (torch.randn(B, T, H, d, dtype=F64) for d in (K, K, V))
    X0, Y0 = (torch.randn(B, H, resolution, d, dtype=F64) for d in (K, V))
    seen = torch.tensor([3, 2 * window])
    k[1, 37, 0, 1], k[0, 70, 0, 5] = math.nan, math.inf  # mid-chunk 0 and chunk 1
    v[0, 100, 1, 2], v[0, 90, 1, 7], v[1, 5, 1, 0] = math.nan, -math.inf, math.inf
    expected = bla_recurrent(q, k, v, window, resolution, slots, K**-0.5, initial_state=(X0, Y0, seen))
    actual = tile_algorithm(q, k, v, params, L, 64, K**-0.5, initial_state=(X0, Y0, seen))
    non_finite = ~torch.isfinite(expected)
    assert non_finite[1, 37:, 0].all() and not non_finite[1, :37, 0].any()
    assert non_finite[0, 90:, 1, 7].all() and not non_finite[0, :90, 1, 7].any() and not non_finite[0, :, 1, 3].any()
    assert torch.equal(~torch.isfinite(actual), non_finite)
    assert (actual - expected)[~non_finite].abs().max() < 1e-10


@pytest.mark.parametrize("resolution", [1, 2, 7, 16, 63])
def test_rotation_order_pairs_then_fixed_rows(resolution):
    perm = rotation_order(resolution)
    assert sorted(perm.tolist()) == list(range(resolution))
    pairs = (resolution - 1) // 2
    assert perm[: 2 * pairs].tolist() == list(range(1, 2 * pairs + 1))
    assert perm[2 * pairs] == 0


@pytest.mark.parametrize("window, resolution", [(512, 63), (16, 16), (9, 1), (64, 15)])
def test_rotations_mix_only_adjacent_column_pairs(window, resolution):
    """R^{j+1} in the permuted, padded basis is diag + pairs (2p, 2p + 1): what the kernel's registers assume."""
    params = BLAParams.make(window, resolution, resolution)
    tc = tile_constants(params, 64, 64)
    cc = chunk_constants(params, 64)
    NP, N = padded_resolution(resolution), resolution
    p = torch.arange(NP)
    for j in (0, 1, 37, 63):
        R = torch.linalg.matrix_power(cc.base.R, j + 1)
        P = torch.zeros(NP, NP, dtype=F64)
        P[:N, :N] = R[tc.perm][:, tc.perm]
        rebuilt = torch.diag(tc.rot_diag[j]).index_put((p, p ^ 1), tc.rot_pair[j], accumulate=True)
        assert torch.allclose(P, rebuilt, atol=1e-12)
        assert torch.allclose(tc.rot_pair_t[j], P[p ^ 1, p], atol=1e-12)


def test_scan_tables_split_into_float16_parts_that_sum_to_the_constants():
    """The tile scan multiplies float16 hi and lo parts: together they carry A^L and state_in to ~2^-22."""
    from bla_tvm.tile_constants import reverse_scan_tables, scan_tables

    params = BLAParams.make(512, 63, 63)
    tables = scan_tables(params, 64)
    cc = chunk_constants(params, 64)
    for name, exact in (("decay", cc.state_decay), ("state_in", cc.state_in)):
        prefix = "tile_decay" if name == "decay" else "tile_state_in"
        hi, lo = tables[f"{prefix}_hi"], tables[f"{prefix}_lo"]
        assert torch.equal(hi, hi.to(torch.float16).to(F64)) and torch.equal(lo, lo.to(torch.float16).to(F64))
        rows, cols = exact.shape
        assert (hi[:rows, :cols] + lo[:rows, :cols] - exact).abs().max() <= 2**-20 * exact.abs().max()
        assert hi[rows:].abs().sum() == 0 and hi[:, cols:].abs().sum() == 0
    reverse = reverse_scan_tables(params, 64)
    hi, lo = reverse["tile_decay_t_hi"], reverse["tile_decay_t_lo"]
    assert (hi[:63, :63] + lo[:63, :63] - cc.state_decay.T).abs().max() <= 2**-20 * cc.state_decay.abs().max()


def test_cuda_calls_of_16_bit_layers_run_the_tile_programs():
    """dispatch: on CUDA the tile scan stands in for the scan and absorbs chunk_state; the tile forward and backward
    stand in for chunk_output and chunk_backward at L = 64 (inference and training); float32 and the CPU keep the
    TE kernels."""
    from bla_tvm import dispatch
    from bla_tvm.layer import LayerSpec

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    names = dispatch.phase_kernels(False, final_state=False)
    bf16 = LayerSpec(512, 63, 63, 64, 64, "bfloat16").kernel(64)
    assert dispatch.implementations(names, bf16, cuda) == {"state_scan": "state_scan_tile",
                                                           "chunk_output": "chunk_output_tile"}
    assert dispatch.implementations(names, bf16, cpu) == {name: name for name in names}
    fp32 = LayerSpec(512, 63, 63, 64, 64, "float32").kernel(64)
    assert dispatch.implementations(names, fp32, cuda) == {name: name for name in names}
    assert dispatch.chunk_size(cuda, LayerSpec(512, 63, 63, 64, 64, "bfloat16"), (4, 4096, 16, 64), False) == 64
    training = dispatch.phase_kernels(True, final_state=False)
    assert dispatch.implementations(training, bf16, cuda)["chunk_backward"] == "chunk_backward_tile"
    assert dispatch.implementations(training, bf16, cuda)["state_scan_reverse"] == "state_scan_reverse_tile"
    # the tile backward writes dq and the tile reverse scan dk, dv: no input-gradient kernel runs
    assert not {"input_gradient_q", "input_gradient_k", "input_gradient_v"} & set(
        dispatch.implementations(training, bf16, cuda))
    assert dispatch.implementations(training, fp32, cuda)["chunk_backward"] == "chunk_backward"
    assert dispatch.chunk_size(cuda, LayerSpec(512, 63, 63, 64, 64, "bfloat16"), (4, 4096, 16, 64), True) == 64
    # the tile backward's shared memory does not fit a block at K = V = 128, N = 127: training keeps the TE kernels
    large = LayerSpec(512, 127, 127, 128, 128, "bfloat16")
    assert dispatch.implementations(training, large.kernel(64), cuda)["chunk_backward"] == "chunk_backward"
    assert "input_gradient_q" in dispatch.implementations(training, large.kernel(64), cuda)
    assert not dispatch.tile_backward_serves(large.kernel(64)) and dispatch.default_chunk_size(cuda, large, True) != 64
    assert dispatch.chunk_size(cuda, large, (1, 4096, 2, 128), False) == 64


def test_tile_scans_only_where_key_and_value_columns_fill_whole_blocks():
    """The tile scans read and write each block of 16 state columns as key columns or as value columns whole: with
    K = 8, V = 24 a block holds both (on the H200 the forward scan's value state was 82% off, and the reverse scan
    wrote dv into dk), so such layers keep the TE scans, chunk_state and the dk, dv kernels, and both tile programs
    refuse the spec."""
    from bla_tvm import dispatch
    from bla_tvm.layer import LayerSpec

    cuda = torch.device("cuda")
    split = LayerSpec(64, 15, 15, 8, 24, "bfloat16").kernel(64)
    runs = dispatch.implementations(dispatch.phase_kernels(True, final_state=False), split, cuda)
    assert runs["state_scan"] == "state_scan" and runs["state_scan_reverse"] == "state_scan_reverse"
    assert {"chunk_state", "input_gradient_k", "input_gradient_v"} <= set(runs)
    pytest.importorskip("bla_tvm.build")  # prepares nvcc before tvm loads, then imports it
    from bla_tvm.schedules.cuda_tile_scan import state_scan_tile
    from bla_tvm.schedules.cuda_tile_scan_reverse import state_scan_reverse_tile

    for program in (state_scan_tile, state_scan_reverse_tile):
        with pytest.raises(ValueError, match="does not serve"):
            program(split)
