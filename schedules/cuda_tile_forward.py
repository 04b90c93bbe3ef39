"""The CUDA forward's per-chunk output kernel as a tile program (TVM 0.27 TIRx): warps carry rows.

One thread block of four warps per (sequence row b, chunk c, query head hq); chunk length L = 64, warp w owns
rows j = 16 w .. 16 w + 15 of the chunk and carries them in registers from the queries to the outputs. Only
the chunk-wide operands sit in shared memory, in float16: [k | v; X | Y] (the raw chunk and its start state),
then k' (with X below it) and [v'; Y] transposed. Every contraction is a warp ``Tx.warp.gemm`` over register
fragments (mma.sync m16n8k16, float16 operands, float32 accumulation); the rotation identity of
``bla_tvm/tile_constants.py`` replaces the diagonal gathers. Per block:

  1. [k|v; X|Y] -> shared (float16; X, Y in the rotation-paired basis)                         all threads
  2. [k'|v'] rows of warp w = input_map[rows] [k|v; X|Y]    -> shared: k' [L, K], [v'; Y]^T [V, L + NP]
     the last warp's rows see every element of [k|v; X|Y] (0 * NaN = NaN), so a non-finite one shows there;
     only then (rarely): per column of [k|v] (a thread each) its first non-finite row -> first_bad, its
     non-finite elements -> 0, and stage 2 again
  3. qx = q k'^T (masked s <= j);  z = scale R^{j+1} (q X^T + qx lag)                            [16, NP]
  4. over slot tiles of ``slot_tile``: logits = z C^T, masked; online softmax; w += E C         [16, NP]
  5. w' = (R^{j+1})^T w;  o = ((w' lag^T, masked s <= j) v' + w' Y) / rowsum(E)                [16, V]
     o[j, f] = NaN (its accumulator starts at NaN) from the first non-finite row of k (any column) on and
     of v[:, f] on

Non-finite tokens: a masked product (input_map's zero upper triangle, the masked qx and mix) multiplies its
zeros by the rows after j, and 0 * NaN = NaN, so a non-finite k or v row would reach the earlier outputs of its
chunk. Stage 2's column pass sets such elements to 0 and stage 5 makes non-finite exactly the outputs the
definition makes non-finite: a non-finite k at row t every o[j >= t] (the key state's column enters every
score), a non-finite v[t, f] only o[j >= t, f]. A value float16 cannot hold (a bfloat16 beyond 65504) counts as
non-finite. A non-finite q row or carried state (X, Y) needs nothing: the products carry it to the outputs the
definition's do (a q row: its own output row; a state column: every row of the chunk; a non-finite state also
sends the block through the column pass, which finds nothing to zero).

Fragment registers are addressed through ``.local()`` views whose axis order is the one PTX's m16n8k16 fixes
(g = lane / 4, t = lane % 4):
  A [16, 16 Kt] view [kt, kHi, rM, kp]  holds A[g + 8 rM, 16 kt + 8 kHi + 2 t + kp]
  B [16 Kt, 8 Nt] view [kt, nt, kHi, kp] holds B[16 kt + 8 kHi + 2 t + kp, 8 nt + g]
  D [16, 8 Nt] view [nt, rM, rN]        holds D[g + 8 rM, 8 nt + 2 t + rN]
so an accumulator becomes the A operand of the next product register for register: A[kt, kHi, rM, kp] =
D[2 kt + kHi, rM, kp] (tests/test_tile_fragments.py checks these orders on the GPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T
from tvm.script.tirx import tile as Tx
from tvm.tirx.layout import S, TileLayout, laneid

from bla_tvm.layer import KernelSpec
from bla_tvm.tile_constants import (
    SLOT_TILE, TILE_CHUNK, forward_shared_layout, padded_resolution, round_up, tile_forward_serves, tile_states_half,
)  # fmt: skip

# one m16n8 accumulator tile and the k16 operand tiles (PTX ISA, mma.m16n8k16 fragments)
_D_TILE = TileLayout(S[(2, 8, 4, 2) : (2, 4 @ laneid, 1 @ laneid, 1)])
_A_TILE = TileLayout(S[(2, 8, 4, 2) : (2, 4 @ laneid, 1 @ laneid, 1)]).tile_to([16, 16], [16, 8])
_B_TILE = TileLayout(S[(4, 2, 8) : (1 @ laneid, 1, 4 @ laneid)]).tile_to([16, 8], [8, 8])

CHUNK = TILE_CHUNK
NAN = float("nan")
WARPS = CHUNK // 16
THREADS = 32 * WARPS


def non_finite_half(word, h):
    """Whether float16 number h (0: the low, 1: the high 16 bits) of the 32-bit ``word`` is inf or NaN, i.e. its
    exponent bits are all ones: an integer test, which no fast-math flag folds away."""
    return ((word >> T.uint32(16 * h)) & T.uint32(0x7C00)) == T.uint32(0x7C00)


def non_finite_halves(word):
    """Non-zero where either float16 number of the 32-bit ``word`` is inf or NaN: an all-ones exponent (0x7C00) plus
    0x0400 carries into the number's sign bit, and no smaller exponent does (nor crosses into the other half)."""
    return ((word & T.uint32(0x7C007C00)) + T.uint32(0x04000400)) & T.uint32(0x80008000)


def accumulator_layout(columns: int) -> TileLayout:
    return _D_TILE.tile_to([16, columns], [16, 8])


def operand_a_layout(depth: int) -> TileLayout:
    return _A_TILE.tile_to([16, depth], [16, 16])


def operand_b_layout(depth: int, columns: int) -> TileLayout:
    return _B_TILE.tile_to([depth, columns], [16, 8])


@dataclass(frozen=True)
class TileConfig:
    """Knobs of the tile forward. slot_tile: slots per online-softmax step (a multiple of 16; the constant
    tables' MP is a multiple of it)."""

    slot_tile: int = SLOT_TILE


def chunk_output_tile(spec: KernelSpec, config: TileConfig = TileConfig()):
    """The PrimFunc ``bla_chunk_output_tile``: o [B, T, HQ, V] from q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V],
    states [B, NC, H, N, K + V] (X | Y at each chunk start; float16 where ``tile_states_half``, else float32),
    positions [B, NC] int32, scale [1] and the float16 tables of ``bla_tvm.tile_constants.TileConstants``
    (input_map, lag, lag_t, slots, slots_t) and float32 rotations (rot_diag, rot_pair, rot_pair_t)."""
    if not tile_forward_serves(spec):
        raise ValueError(f"the tile forward does not serve {spec}")
    L, K, V, N, M, W, G = (spec.chunk_size, spec.head_k, spec.head_v, spec.resolution, spec.num_slots,
                           spec.window, spec.group_size)  # fmt: skip
    F = K + V
    NP = padded_resolution(N)
    MT = config.slot_tile
    MP = round_up(M, MT)
    LR = L + NP  # rows of [k; X]
    PAIRS = (N - 1) // 2
    dt = spec.dtype
    h16 = "float16"
    states_dt = h16 if tile_states_half(spec) else "float32"  # as the tile scan writes them
    FB = 64 if F % 64 == 0 else 16  # column block of the [k'|v'] product
    KV_BLOCKS = F // FB
    shared = forward_shared_layout(spec, MT)  # in float16 elements (see its docstring)
    KV_STRIDE, KX_STRIDE, VY_STRIDE = shared.raw_stride, shared.keys_stride, shared.values_stride
    LAG_T_AT, SLOTS_AT, SLOTS_T_AT, LAG_AT = shared.lag_t, shared.slots, shared.slots_t, shared.lag
    KEYS_AT, VALUES_AT, FIRST_BAD_AT, SHARED_HALVES = shared.keys, shared.values, shared.first_bad, shared.halves

    @T.prim_func
    def chunk_output(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, states_h: T.handle, positions_h: T.handle, scale_h: T.handle,
        input_map_h: T.handle, lag_h: T.handle, lag_t_h: T.handle, slots_h: T.handle, slots_t_h: T.handle,
        rot_diag_h: T.handle, rot_pair_h: T.handle, rot_pair_t_h: T.handle, o_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_chunk_output_tile"})
        B = T.int32()
        TT = T.int32()
        H = T.int32()
        HQ = T.int32()
        NC = T.int32()
        q = T.match_buffer(q_h, (B, TT, HQ, K), dt)
        k = T.match_buffer(k_h, (B, TT, H, K), dt)
        v = T.match_buffer(v_h, (B, TT, H, V), dt)
        states = T.match_buffer(states_h, (B, NC, H, N, F), states_dt)
        positions = T.match_buffer(positions_h, (B, NC), "int32")
        scale = T.match_buffer(scale_h, (1,), "float32")
        input_map = T.match_buffer(input_map_h, (L, LR), h16)
        lag = T.match_buffer(lag_h, (L, NP), h16)
        lag_t = T.match_buffer(lag_t_h, (NP, L), h16)
        slots = T.match_buffer(slots_h, (MP, NP), h16)
        slots_t = T.match_buffer(slots_t_h, (NP, MP), h16)
        rot_diag = T.match_buffer(rot_diag_h, (L, NP), "float32")
        rot_pair = T.match_buffer(rot_pair_h, (L, NP), "float32")
        rot_pair_t = T.match_buffer(rot_pair_t_h, (L, NP), "float32")
        o = T.match_buffer(o_h, (B, TT, HQ, V), dt)

        T.device_entry()
        block = T.cta_id([B * NC * HQ])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])

        pool = T.alloc_buffer((SHARED_HALVES,), h16, scope="shared.dyn")
        kv_raw = T.decl_buffer((F, KV_STRIDE), h16, data=pool.data, elem_offset=0, scope="shared.dyn")  # [k|v; X|Y]^T
        keys = T.decl_buffer((LR, KX_STRIDE), h16, data=pool.data, elem_offset=KEYS_AT, scope="shared.dyn")  # [k'; X]
        values = T.decl_buffer((V, VY_STRIDE), h16, data=pool.data, elem_offset=VALUES_AT, scope="shared.dyn")  # [v'; Y]^T
        lag_t_s = T.decl_buffer((NP, L + 8), h16, data=pool.data, elem_offset=LAG_T_AT, scope="shared.dyn")
        slots_s = T.decl_buffer((MT, NP + 8), h16, data=pool.data, elem_offset=SLOTS_AT, scope="shared.dyn")
        slots_t_s = T.decl_buffer((NP, MT + 8), h16, data=pool.data, elem_offset=SLOTS_T_AT, scope="shared.dyn")
        lag_s = T.decl_buffer((L, NP + 8), h16, data=pool.data, elem_offset=LAG_AT, scope="shared.dyn")
        # the chunk's first row with a non-finite v[:, f] (f < V), with a non-finite k (V); L where there is none
        first_bad = T.decl_buffer((V + 1,), "int32", data=pool.data, elem_offset=FIRST_BAD_AT, scope="shared.dyn")
        # non-zero where stage 2's last warp met a non-finite k'|v' (then stage 2 runs again, non-finite k, v zeroed)
        non_finite_seen = T.decl_buffer(
            (1,), "int32", data=pool.data, elem_offset=FIRST_BAD_AT + V + 1, scope="shared.dyn")
        # 32-bit views: fragment loads move two adjacent reduction elements at once
        kv_raw_w = kv_raw.view("uint32")
        keys_w = keys.view("uint32")
        values_w = values.view("uint32")
        input_map_w = input_map.view("uint32")
        lag_w = lag.view("uint32")
        lag_t_w = lag_t.view("uint32")
        slots_w = slots.view("uint32")
        slots_t_w = slots_t.view("uint32")
        lag_t_sw = lag_t_s.view("uint32")
        slots_sw = slots_s.view("uint32")
        slots_t_sw = slots_t_s.view("uint32")
        lag_sw = lag_s.view("uint32")

        hq = block % HQ
        c = block // HQ % NC
        b = block // (HQ * NC)
        hk = hq // G
        tid = warp * 32 + lane
        g = lane // 4
        tq = lane % 4
        first = c * L

        # the k16 slice of an A operand a product consumes: TVM 0.27 offsets a sliced packed fragment
        # (A[:, 16 kt : 16 kt + 16]) by elements where it indexes 32-bit registers, so slices are copied
        a_slice = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        a_slice_r = a_slice.local(1, 2, 2, 2)

        # ---- 1. the raw chunk and its start state, float16, transposed: kv_raw[f, r] -------------------------
        for it in T.serial(L * K // THREADS):
            j = (it * THREADS + tid) // K
            f = (it * THREADS + tid) % K
            x = T.Cast(h16, k[b, T.min(first + j, TT - 1), hk, f])
            kv_raw[f, j] = T.if_then_else(first + j < TT, x, T.float16(0))
        for it in T.serial(L * V // THREADS):
            j = (it * THREADS + tid) // V
            f = (it * THREADS + tid) % V
            x = T.Cast(h16, v[b, T.min(first + j, TT - 1), hk, f])
            kv_raw[K + f, j] = T.if_then_else(first + j < TT, x, T.float16(0))
        # the state rows in basis order (cuda_tile_loads.state_row) with row n a let-bound variable: state_row inline
        # here (and the backward's 32-bit q loads) ran the M = 512 forward at 0.77 ms against 0.67 (H200, one run)
        for it in T.serial(NP * K // THREADS):
            p = (it * THREADS + tid) // K
            f = (it * THREADS + tid) % K
            n = T.if_then_else(p < 2 * PAIRS, p + 1, T.if_then_else(p == 2 * PAIRS, 0, N - 1))
            x = T.if_then_else(p < N, T.Cast(h16, states[b, c, hk, T.min(n, N - 1), f]), T.float16(0))
            kv_raw[f, L + p] = x
            keys[L + p, f] = x
        for it in T.serial(NP * V // THREADS):
            p = (it * THREADS + tid) // V
            f = (it * THREADS + tid) % V
            n = T.if_then_else(p < 2 * PAIRS, p + 1, T.if_then_else(p == 2 * PAIRS, 0, N - 1))
            x = T.if_then_else(p < N, T.Cast(h16, states[b, c, hk, T.min(n, N - 1), K + f]), T.float16(0))
            kv_raw[K + f, L + p] = x
            values[f, L + p] = x
        for it in T.serial((V + 2 + THREADS - 1) // THREADS):
            if it * THREADS + tid < V + 1:
                first_bad[it * THREADS + tid] = L
            if it * THREADS + tid == V + 1:
                non_finite_seen[0] = 0
        T.cuda.cta_sync()

        # ---- 2. k', v' of this warp's rows: input_map[rows] [k|v; X|Y] ---------------------------------------
        #         (again, after the column pass, where the first attempt met a non-finite value)
        a_map = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        b_raw = T.alloc_buffer((16, FB), h16, scope="local", layout=operand_b_layout(16, FB))
        kv_eff = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        a_map_w = a_map.local(8).view("uint32")
        b_raw_w = b_raw.local(FB // 8 * 4).view("uint32")
        kv_eff_r = kv_eff.local(FB // 8, 2, 2)
        kv_eff_w = kv_eff.local(FB // 2).view("uint32")
        bad_row = T.alloc_buffer((1,), "int32", scope="local")
        for attempt in T.serial(2):
            if attempt == 0 or non_finite_seen[0] != 0:  # the same for the whole block (read after a barrier)
                if attempt == 1:
                    # thread tid takes column f = tid (+ THREADS) of [k|v] in shared memory, records its first
                    # non-finite row (k's first_bad is the least over k's columns) and sets those elements to 0
                    for it in T.serial((F + THREADS - 1) // THREADS):
                        f = it * THREADS + tid
                        if f < F:
                            # first a cheap test of the column (three integer operations a word), then the rows
                            bad_row[0] = 0
                            for r2 in T.serial(L // 2):
                                bad_row[0] = bad_row[0] | T.Cast("int32", non_finite_halves(kv_raw_w[f, r2]))
                            if bad_row[0] != 0:
                                bad_row[0] = L
                                for r2, h in T.grid(L // 2, 2):
                                    bad_row[0] = T.min(
                                        bad_row[0], T.if_then_else(non_finite_half(kv_raw_w[f, r2], h), 2 * r2 + h, L))
                            else:
                                bad_row[0] = L
                            if f >= K:
                                first_bad[T.max(f - K, 0)] = bad_row[0]
                            if bad_row[0] < L:
                                if f < K:
                                    T.ptx.red.shared.min.s32(first_bad.ptr_to([V]), bad_row[0])
                                for r2, h in T.grid(L // 2, 2):
                                    if non_finite_half(kv_raw_w[f, r2], h):
                                        kv_raw[f, 2 * r2 + h] = T.float16(0)
                    T.cuda.cta_sync()
                for fb in T.serial(KV_BLOCKS):
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        kv_eff_r[nt, rM, rN] = T.float32(0)
                    for kt in T.serial(LR // 16):
                        if kt <= warp or kt >= L // 16:  # Inv is lower triangular: zero tiles above the diagonal
                            for kHi, rM in T.grid(2, 2):
                                a_map_w[kHi * 2 + rM] = input_map_w[
                                    warp * 16 + g + 8 * rM, (kt * 16 + kHi * 8) // 2 + tq]
                            for nt, kHi in T.grid(FB // 8, 2):
                                b_raw_w[nt * 2 + kHi] = kv_raw_w[fb * FB + nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
                            Tx.warp.gemm(kv_eff, a_map, b_raw, kv_eff, transpose_A=False, transpose_B=False,
                                         alpha=1.0, beta=1.0)
                    if attempt == 0 and warp == WARPS - 1:  # an all-ones float32 exponent: inf or NaN
                        bad_row[0] = 0
                        for word in T.serial(FB // 2):
                            bad_row[0] = bad_row[0] | T.Cast(
                                "int32", (kv_eff_w[word] & T.uint32(0x7F800000)) == T.uint32(0x7F800000))
                        if bad_row[0] != 0:
                            non_finite_seen[0] = 1
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        j = warp * 16 + g + 8 * rM
                        f = fb * FB + nt * 8 + 2 * tq + rN
                        if f < K:
                            keys[j, T.min(f, K - 1)] = T.Cast(h16, kv_eff_r[nt, rM, rN])
                        else:
                            values[T.max(f - K, 0), j] = T.Cast(h16, kv_eff_r[nt, rM, rN])
                T.cuda.cta_sync()
        # the constant B operands of stages 3 and 5 (the slot tables: per slot tile, in stage 4), once per block
        for it in T.serial((NP * L // 2 + THREADS - 1) // THREADS):
            if it * THREADS + tid < NP * L // 2:
                lag_t_sw[(it * THREADS + tid) // (L // 2), (it * THREADS + tid) % (L // 2)] = lag_t_w[
                    (it * THREADS + tid) // (L // 2), (it * THREADS + tid) % (L // 2)]
                lag_sw[(it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)] = lag_w[
                    (it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)]
        T.cuda.cta_sync()

        # ---- 3. z = scale R^{j+1} (q X^T + (q k'^T masked) lag) ---------------------------------------------
        q_a = T.alloc_buffer((16, K), h16, scope="local", layout=operand_a_layout(K))
        q_r = q_a.local(K // 16, 2, 2, 2)
        for kt, kHi, rM, kp in T.grid(K // 16, 2, 2, 2):
            t = first + warp * 16 + g + 8 * rM
            q_r[kt, kHi, rM, kp] = T.if_then_else(
                t < TT, T.Cast(h16, q[b, T.min(t, TT - 1), hq, kt * 16 + kHi * 8 + 2 * tq + kp]), T.float16(0)
            )
        b_keys = T.alloc_buffer((16, L), h16, scope="local", layout=operand_b_layout(16, L))
        b_keys_w = b_keys.local(L // 8 * 4).view("uint32")
        qx = T.alloc_buffer((16, L), "float32", scope="local", layout=accumulator_layout(L))
        qx_r = qx.local(L // 8, 2, 2)
        b_state = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_b_layout(16, NP))
        b_state_w = b_state.local(NP // 8 * 4).view("uint32")
        z = T.alloc_buffer((16, NP), "float32", scope="local", layout=accumulator_layout(NP))
        z_r = z.local(NP // 8, 2, 2)
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            qx_r[nt, rM, rN] = T.float32(0)
        for nt, rM, rN in T.grid(NP // 8, 2, 2):
            z_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(K // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_keys_w[nt * 2 + kHi] = keys_w[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = q_r[kt, kHi, rM, kp]
            Tx.warp.gemm(qx, a_slice, b_keys, qx, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, kHi in T.grid(NP // 8, 2):
                b_state_w[nt * 2 + kHi] = keys_w[L + nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = q_r[kt, kHi, rM, kp]
            Tx.warp.gemm(z, a_slice, b_state, z, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        qx_a = T.alloc_buffer((16, L), h16, scope="local", layout=operand_a_layout(L))
        qx_a_r = qx_a.local(L // 16, 2, 2, 2)
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            qx_a_r[kt, kHi, rM, kp] = T.if_then_else(
                s <= warp * 16 + g + 8 * rM, T.Cast(h16, qx_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        b_lag = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_b_layout(16, NP))
        b_lag_w = b_lag.local(NP // 8 * 4).view("uint32")
        for kt in T.unroll(L // 16):
            for nt, kHi in T.grid(NP // 8, 2):
                b_lag_w[nt * 2 + kHi] = lag_t_sw[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = qx_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(z, a_slice, b_lag, z, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        z_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        z_a_r = z_a.local(NP // 16, 2, 2, 2)
        for nt, rM in T.grid(NP // 8, 2):
            j = warp * 16 + g + 8 * rM
            p = nt * 8 + 2 * tq
            z0 = z_r[nt, rM, 0]
            z1 = z_r[nt, rM, 1]
            z_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, scale[0] * (rot_diag[j, p] * z0 + rot_pair[j, p] * z1))
            z_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, scale[0] * (rot_diag[j, p + 1] * z1 + rot_pair[j, p + 1] * z0))

        # ---- 4. softmax over the slots, a tile of MT slots at a time: w = E C --------------------------------
        row_max = T.alloc_buffer((2,), "float32", scope="local")
        row_sum = T.alloc_buffer((2,), "float32", scope="local")
        w = T.alloc_buffer((16, NP), "float32", scope="local", layout=accumulator_layout(NP))
        w_r = w.local(NP // 8, 2, 2)
        logits = T.alloc_buffer((16, MT), "float32", scope="local", layout=accumulator_layout(MT))
        logits_r = logits.local(MT // 8, 2, 2)
        probs = T.alloc_buffer((16, MT), h16, scope="local", layout=operand_a_layout(MT))
        probs_r = probs.local(MT // 16, 2, 2, 2)
        b_slots = T.alloc_buffer((16, MT), h16, scope="local", layout=operand_b_layout(16, MT))
        b_slots_w = b_slots.local(MT // 8 * 4).view("uint32")
        b_slots_t = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_b_layout(16, NP))
        b_slots_t_w = b_slots_t.local(NP // 8 * 4).view("uint32")
        tile_max = T.alloc_buffer((2,), "float32", scope="local")
        tile_sum = T.alloc_buffer((2,), "float32", scope="local")
        for rM in T.unroll(2):
            row_max[rM] = T.float32(-3.0e38)
            row_sum[rM] = T.float32(0)
        for nt, rM, rN in T.grid(NP // 8, 2, 2):
            w_r[nt, rM, rN] = T.float32(0)
        seen_before = T.Cast("int64", positions[b, c])
        for st in T.serial(MP // MT):
            T.cuda.cta_sync()  # every warp is done with the previous slot tile
            for it in T.serial((MT * NP // 2 + THREADS - 1) // THREADS):
                if it * THREADS + tid < MT * NP // 2:
                    slots_sw[(it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)] = slots_w[
                        st * MT + (it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)]
                    slots_t_sw[(it * THREADS + tid) // (MT // 2), (it * THREADS + tid) % (MT // 2)] = slots_t_w[
                        (it * THREADS + tid) // (MT // 2), st * MT // 2 + (it * THREADS + tid) % (MT // 2)]
            T.cuda.cta_sync()
            for nt, rM, rN in T.grid(MT // 8, 2, 2):
                logits_r[nt, rM, rN] = T.float32(0)
            for kt in T.unroll(NP // 16):
                for nt, kHi in T.grid(MT // 8, 2):
                    b_slots_w[nt * 2 + kHi] = slots_sw[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
                for kHi, rM, kp in T.grid(2, 2, 2):
                    a_slice_r[0, kHi, rM, kp] = z_a_r[kt, kHi, rM, kp]
                Tx.warp.gemm(logits, a_slice, b_slots, logits, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for rM in T.unroll(2):
                tile_max[rM] = T.float32(-3.0e38)
                tile_sum[rM] = T.float32(0)
            for nt, rM, rN in T.grid(MT // 8, 2, 2):
                i = st * MT + nt * 8 + 2 * tq + rN
                seen = seen_before + T.Cast("int64", warp * 16 + g + 8 * rM)
                if i >= M or T.Cast("int64", i) * W > seen * M:
                    logits_r[nt, rM, rN] = T.float32(-3.0e38)
                tile_max[rM] = T.max(tile_max[rM], logits_r[nt, rM, rN])
            for rM in T.unroll(2):
                tile_max[rM] = T.max(row_max[rM], T.cuda.warp_max(tile_max[rM], width=4))
                tile_sum[rM] = T.exp(row_max[rM] - tile_max[rM])  # rescales what earlier tiles summed
                row_sum[rM] = row_sum[rM] * tile_sum[rM]
            for nt, rM, rN in T.grid(NP // 8, 2, 2):
                w_r[nt, rM, rN] = w_r[nt, rM, rN] * tile_sum[rM]
            for rM in T.unroll(2):
                row_max[rM] = tile_max[rM]
                tile_sum[rM] = T.float32(0)
            for nt, rM, rN in T.grid(MT // 8, 2, 2):
                e = T.if_then_else(
                    logits_r[nt, rM, rN] > T.float32(-1.0e38), T.exp(logits_r[nt, rM, rN] - row_max[rM]), T.float32(0)
                )
                tile_sum[rM] = tile_sum[rM] + e
                probs_r[nt // 2, nt % 2, rM, rN] = T.Cast(h16, e)
            for rM in T.unroll(2):
                row_sum[rM] = row_sum[rM] + T.cuda.warp_sum(tile_sum[rM], width=4)
            for kt in T.unroll(MT // 16):
                for nt, kHi in T.grid(NP // 8, 2):
                    b_slots_t_w[nt * 2 + kHi] = slots_t_sw[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
                for kHi, rM, kp in T.grid(2, 2, 2):
                    a_slice_r[0, kHi, rM, kp] = probs_r[kt, kHi, rM, kp]
                Tx.warp.gemm(w, a_slice, b_slots_t, w, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)

        # ---- 5. o = (mix v' + w' Y) / rowsum, mix = (w' lag^T) masked to s <= j, w' = (R^{j+1})^T w; ---------
        #         NaN from the first non-finite row of k on and, in column f, of v[:, f] on (stage 1's first_bad)
        w_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        w_a_r = w_a.local(NP // 16, 2, 2, 2)
        for nt, rM in T.grid(NP // 8, 2):
            j = warp * 16 + g + 8 * rM
            p = nt * 8 + 2 * tq
            w0 = w_r[nt, rM, 0]
            w1 = w_r[nt, rM, 1]
            w_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, rot_diag[j, p] * w0 + rot_pair_t[j, p] * w1)
            w_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, rot_diag[j, p + 1] * w1 + rot_pair_t[j, p + 1] * w0)
        mix = T.alloc_buffer((16, L), "float32", scope="local", layout=accumulator_layout(L))
        mix_r = mix.local(L // 8, 2, 2)
        b_lag_rows = T.alloc_buffer((16, L), h16, scope="local", layout=operand_b_layout(16, L))
        b_lag_rows_w = b_lag_rows.local(L // 8 * 4).view("uint32")
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            mix_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(NP // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_lag_rows_w[nt * 2 + kHi] = lag_sw[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = w_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(mix, a_slice, b_lag_rows, mix, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        mix_a = T.alloc_buffer((16, L), h16, scope="local", layout=operand_a_layout(L))
        mix_a_r = mix_a.local(L // 16, 2, 2, 2)
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            mix_a_r[kt, kHi, rM, kp] = T.if_then_else(
                s <= warp * 16 + g + 8 * rM, T.Cast(h16, mix_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        out = T.alloc_buffer((16, V), "float32", scope="local", layout=accumulator_layout(V))
        out_r = out.local(V // 8, 2, 2)
        b_values = T.alloc_buffer((16, V), h16, scope="local", layout=operand_b_layout(16, V))
        b_values_w = b_values.local(V // 8 * 4).view("uint32")
        for nt, rM, rN in T.grid(V // 8, 2, 2):  # NaN where a non-finite k or v (first_bad) reaches o
            j = warp * 16 + g + 8 * rM
            out_r[nt, rM, rN] = T.if_then_else(
                j >= first_bad[V] or j >= first_bad[nt * 8 + 2 * tq + rN], T.float32(NAN), T.float32(0))
        for kt in T.unroll(L // 16):
            for nt, kHi in T.grid(V // 8, 2):
                b_values_w[nt * 2 + kHi] = values_w[nt * 8 + g, (kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = mix_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(out, a_slice, b_values, out, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for kt in T.unroll(NP // 16):
            for nt, kHi in T.grid(V // 8, 2):
                b_values_w[nt * 2 + kHi] = values_w[nt * 8 + g, (L + kt * 16 + kHi * 8) // 2 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = w_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(out, a_slice, b_values, out, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for nt, rM, rN in T.grid(V // 8, 2, 2):
            t = first + warp * 16 + g + 8 * rM
            if t < TT:
                o[b, t, hq, nt * 8 + 2 * tq + rN] = T.Cast(dt, out_r[nt, rM, rN] / row_sum[rM])

    return chunk_output
