"""The CUDA backward's per-chunk kernel as a tile program (TVM 0.27 TIRx): warps carry rows, as in the forward.

Stands in for ``compute.backward.chunk_backward`` (same output): one block of four warps per (b, chunk c, query
head hq), L = 64, warp w owns rows j = 16 w .. 16 w + 15. The forward's row chain is recomputed in registers
from the state at the chunk start and run backward given dO (the algorithm, in float64, is
tests/test_tile_backward_algorithm.py; the basis and tables are those of ``bla_tvm/tile_constants.py``):

  1. [k|v; X|Y] -> shared; [k'|v'] = input_map [k|v; X|Y]: [k'; X] as rows and transposed, [v'; Y] as rows
  2. forward along each row: qx (masked), z = scale R^{j+1} (q X^T + qx lag), the softmax's max and sum over
     slot tiles, w = P C, w' = (R^{j+1})^T w, mix = (w' lag^T) masked
  3. backward along each row:
       dmix = (dO v'^T) masked        dw = R^{j+1} (dO Y^T + dmix lag)      delta = dw . w
       per slot tile: P again, dP = dw C^T, dz += P (dP - delta) C
       dz' = scale (R^{j+1})^T dz     dqx = (dz' lag^T) masked               dq = dz' X + dqx k'
  4. chunk-wide, over the 64 rows of all warps (transposed row operands through shared memory):
       d[k'; X]_direct = [dqx | dz']^T q        d[v'; Y]_direct = [mix | w']^T dO
       d[k|v; X|Y] = input_map^T d[k'|v']  (+ the direct d[X|Y] on the state rows)
Outputs: dq [B, T, HQ, K] (the input dtype; it needs nothing from other chunks, so ``input_gradient_q`` does not
run), and in float16, times the gradient scale s (the reverse scan carries s G): the local d(k|v) of token
t = c L + j in local_k [B, TL, HQ, K] and local_v [B, TL, HQ, V] (rows t < TL; dk and dv themselves where the op
can: ``ops.launch_backward``), and grads [B, NC, HQ, N, F], row n D[n], D the gradient with respect to the state
at the chunk start, rows in bla-math.md's basis order (``compute.backward.chunk_backward``'s grads, split, less
its dq columns, times s). s makes max |s dO| about 1, so float16 holds them as well as the float16 operands they
came through.

Every product is a warp ``Tx.warp.gemm`` (mma.sync m16n8k16, float16 operands, float32 accumulation); fragment
orders as in ``cuda_tile_forward``.

Non-finite q or dO rows reach only the gradients the definition's do: the row chain keeps a non-finite row to
itself; the chunk-wide products read finite copies of q, dO and d[k'|v'] (a masked product would multiply its
zeros by them), and 64-bit masks per column record the rows that were not finite, so that
    d[k'|v'][s, f] is non-finite where s <= a non-finite dO row of column f (for the v' columns),
    d[k|v][r, f] where r <= a non-finite d[k'|v'] row of column f (input_map is lower triangular),
    D[:, f] where any d[k'|v'] row of column f, or (v columns) any dO row of column f, is non-finite.
Non-finite k, v or states are not isolated by this kernel (the forward's recomputation spreads them).
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.script.tirx import tile as Tx

from bla_tvm.layer import KernelSpec
from bla_tvm.tile_constants import (
    SLOT_TILE, backward_shared_layout, padded_resolution, round_up, tile_backward_serves,
)  # fmt: skip

from .cuda_tile_forward import CHUNK, THREADS, WARPS, accumulator_layout, operand_a_layout, operand_b_layout
from .cuda_tile_loads import (
    fetch_row_pair, half_pair, load_chunk_transposed, load_row_fragment, load_rows_transposed, pair_word, state_row,
)  # fmt: skip


NAN = T.float32("nan")


def rows_at_or_after(bad, word, row):
    """Whether the 64-bit row mask at bad[word], bad[word + 1] has a bit at ``row`` or after (row < 64). Plain
    Python, called while the kernel is parsed: T.Or, not ``or`` (which would test the first PrimExpr's truth)."""
    return T.if_then_else(
        row < 32,
        T.Or(T.shift_right(bad[word], T.min(row, 31)) != 0, bad[word + 1] != 0),
        T.shift_right(bad[word + 1], T.max(row - 32, 0)) != 0,
    )


def chunk_backward_tile(spec: KernelSpec, slot_tile: int = SLOT_TILE):
    """The PrimFunc ``bla_chunk_backward_tile``: grads, local_k, local_v and dq (see the module docstring) from
    q, k, v, states (float16), positions, scale, the forward's tile tables (``TileConstants``: input_map, lag,
    lag_t, slots, slots_t, rot_diag, rot_pair, rot_pair_t), input_map_t [L + NP, L] (float16), do [B, T, HQ, V] and
    gradient_scale [1] (float32): a power of two s that dO is multiplied by as it is loaded (its float16 copies
    then keep full precision, ``ops.gradient_scale``); dq is divided by it, exactly, and grads keep it."""
    if not tile_backward_serves(spec):
        raise ValueError(f"the tile backward does not serve {spec}")
    L, K, V, N, M, W, G = (spec.chunk_size, spec.head_k, spec.head_v, spec.resolution, spec.num_slots,
                           spec.window, spec.group_size)  # fmt: skip
    F = K + V
    NP = padded_resolution(N)
    MT = slot_tile
    MP = round_up(M, MT)
    LR = L + NP  # rows of [k; X]
    X_TILES = NP // 16  # 16-row tiles of the state rows; warp w takes tiles w, w + 4, ...
    FB = 64 if F % 64 == 0 and K % 64 == 0 else 16  # column block of the chunk-wide products (inside k or v)
    dt, h16 = spec.dtype, "float16"
    states_dt = h16  # the tile scan writes them so wherever this kernel serves (``tile_states_half``)
    shared = backward_shared_layout(spec, slot_tile)  # in float16 elements (see its docstring)
    RAW_STRIDE, KX_STRIDE, KXT_STRIDE, VY_STRIDE, ROW_STRIDE = (
        shared.raw_stride, shared.keys_stride, shared.keys_t_stride, shared.values_stride, shared.row_stride)
    LAG_T_AT, SLOTS_AT, SLOTS_T_AT, LAG_AT = shared.lag_t, shared.slots, shared.slots_t, shared.lag
    KEYS_AT, KEYS_T_AT, VALUES_AT = shared.keys, shared.keys_t, shared.values
    GT_AT, HT_AT, QT_AT, DOT_AT, BAD_AT = shared.gt, shared.ht, shared.q_t, shared.do_t, shared.bad
    SHARED_HALVES = shared.halves

    @T.prim_func
    def chunk_backward(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, states_h: T.handle, positions_h: T.handle, scale_h: T.handle,
        input_map_h: T.handle, lag_h: T.handle, lag_t_h: T.handle, slots_h: T.handle, slots_t_h: T.handle,
        rot_diag_h: T.handle, rot_pair_h: T.handle, rot_pair_t_h: T.handle, input_map_t_h: T.handle,
        do_h: T.handle, gradient_scale_h: T.handle, grads_h: T.handle, local_k_h: T.handle, local_v_h: T.handle,
        dq_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_chunk_backward_tile"})
        B = T.int32()
        TT = T.int32()
        H = T.int32()
        HQ = T.int32()
        NC = T.int32()
        TL = T.int32()
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
        input_map_t = T.match_buffer(input_map_t_h, (LR, L), h16)
        do = T.match_buffer(do_h, (B, TT, HQ, V), dt)
        gradient_scale = T.match_buffer(gradient_scale_h, (1,), "float32")
        grads = T.match_buffer(grads_h, (B, NC, HQ, N, F), h16)
        local_k = T.match_buffer(local_k_h, (B, TL, HQ, K), h16)
        local_v = T.match_buffer(local_v_h, (B, TL, HQ, V), h16)
        dq_out = T.match_buffer(dq_h, (B, TT, HQ, K), dt)

        T.device_entry()
        block = T.cta_id([B * NC * HQ])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])

        pool = T.alloc_buffer((SHARED_HALVES,), h16, scope="shared.dyn")
        # bit j % 32 of word [f, j // 32]: row j of column f was not finite (d[k'|v'], then dO); in the dynamic
        # pool, as a static array would take the block past 48 KB without the dynamic size's opt-in
        bad = T.decl_buffer((2 * (F + V),), "int32", data=pool.data, elem_offset=BAD_AT // 2, scope="shared.dyn")
        kv_raw = T.decl_buffer((F, RAW_STRIDE), h16, data=pool.data, elem_offset=0, scope="shared.dyn")  # [k|v; X|Y]^T
        keys = T.decl_buffer((LR, KX_STRIDE), h16, data=pool.data, elem_offset=KEYS_AT, scope="shared.dyn")  # [k'; X]
        keys_t = T.decl_buffer((K, KXT_STRIDE), h16, data=pool.data, elem_offset=KEYS_T_AT, scope="shared.dyn")
        values = T.decl_buffer((LR, VY_STRIDE), h16, data=pool.data, elem_offset=VALUES_AT, scope="shared.dyn")  # [v'; Y]
        lag_t_s = T.decl_buffer((NP, L + 8), h16, data=pool.data, elem_offset=LAG_T_AT, scope="shared.dyn")
        slots_s = T.decl_buffer((MT, NP + 8), h16, data=pool.data, elem_offset=SLOTS_AT, scope="shared.dyn")
        slots_t_s = T.decl_buffer((NP, MT + 8), h16, data=pool.data, elem_offset=SLOTS_T_AT, scope="shared.dyn")
        lag_s = T.decl_buffer((L, NP + 8), h16, data=pool.data, elem_offset=LAG_AT, scope="shared.dyn")
        d_eff_t = T.decl_buffer((F, ROW_STRIDE), h16, data=pool.data, elem_offset=0, scope="shared.dyn")  # d[k'|v']^T
        gt = T.decl_buffer((LR, ROW_STRIDE), h16, data=pool.data, elem_offset=GT_AT, scope="shared.dyn")  # [dqx|dz']^T
        ht = T.decl_buffer((LR, ROW_STRIDE), h16, data=pool.data, elem_offset=HT_AT, scope="shared.dyn")  # [mix|w']^T
        q_t = T.decl_buffer((K, ROW_STRIDE), h16, data=pool.data, elem_offset=QT_AT, scope="shared.dyn")
        do_t = T.decl_buffer((V, ROW_STRIDE), h16, data=pool.data, elem_offset=DOT_AT, scope="shared.dyn")
        kv_raw_w = kv_raw.view("uint32")
        keys_w = keys.view("uint32")
        keys_t_w = keys_t.view("uint32")
        values_w = values.view("uint32")
        lag_t_sw = lag_t_s.view("uint32")
        slots_sw = slots_s.view("uint32")
        slots_t_sw = slots_t_s.view("uint32")
        lag_sw = lag_s.view("uint32")
        d_eff_t_w = d_eff_t.view("uint32")
        gt_w = gt.view("uint32")
        ht_w = ht.view("uint32")
        q_t_w = q_t.view("uint32")
        do_t_w = do_t.view("uint32")
        local_k_w = local_k.view("uint32")
        local_v_w = local_v.view("uint32")
        q_w = q.view("uint32")
        do_w = do.view("uint32")
        k_w = k.view("uint32")
        v_w = v.view("uint32")
        states_w = states.view("uint32")
        input_map_w = input_map.view("uint32")
        input_map_t_w = input_map_t.view("uint32")
        lag_w = lag.view("uint32")
        lag_t_w = lag_t.view("uint32")
        slots_w = slots.view("uint32")
        slots_t_w = slots_t.view("uint32")

        hq = block % HQ
        c = block // HQ % NC
        b = block // (HQ * NC)
        hk = hq // G
        tid = warp * 32 + lane
        g = lane // 4
        tq = lane % 4
        first = c * L
        row0 = warp * 16

        # the k16 slice of an A operand a product consumes (TVM 0.27 mis-offsets sliced packed fragments)
        a_slice = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        a_slice_r = a_slice.local(1, 2, 2, 2)
        a_slice_w = a_slice.local(8).view("uint32")

        for it in T.serial((2 * (F + V) + THREADS - 1) // THREADS):
            if it * THREADS + tid < 2 * (F + V):
                bad[it * THREADS + tid] = 0
        factor = T.alloc_buffer((2,), "float32", scope="local")  # s and 1 / s (exact: s is a power of two)
        factor[0] = gradient_scale[0]
        factor[1] = T.float32(1) / gradient_scale[0]

        # ---- 1. the raw chunk and its start state; [k'|v'] = input_map [k|v; X|Y] --------------------------
        rows = T.alloc_buffer((2, 4), "uint32", scope="local")
        load_chunk_transposed(kv_raw_w, rows, k_w, v_w, b, hk, first, TT, tid, L, K, F, THREADS, dt)
        # state rows p in basis order (rows n = p + 1 of the pairs, then n = 0, then N - 1 when N is even)
        for it in T.unroll((NP // 2 * (F // 8) + THREADS - 1) // THREADS):
            if it * THREADS + tid < NP // 2 * (F // 8):
                pp = (it * THREADS + tid) % (NP // 2)
                fg = (it * THREADS + tid) // (NP // 2)
                fetch_row_pair(
                    rows, lambda r: states_w[b, c, hk, T.min(state_row(2 * pp + r, N), N - 1), T.ramp(fg * 4, 1, 4)],
                    lambda r: 2 * pp + r < N)
                for i, h in T.grid(4, 2):
                    kv_raw_w[fg * 8 + 2 * i + h, L // 2 + pp] = pair_word(rows, i, h, h16)
                    if fg * 8 < K:
                        keys_t_w[T.min(fg * 8 + 2 * i + h, K - 1), L // 2 + pp] = pair_word(rows, i, h, h16)
                for r in T.unroll(2):
                    if fg * 8 < K:
                        keys_w[L + 2 * pp + r, T.ramp(T.min(fg * 4, K // 2 - 4), 1, 4)] = rows[r, T.ramp(0, 1, 4)]
                    else:
                        values_w[L + 2 * pp + r, T.ramp(T.max(fg * 4 - K // 2, 0), 1, 4)] = rows[r, T.ramp(0, 1, 4)]
        T.cuda.cta_sync()
        a_map = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        b_raw = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_b_layout(16, 16))
        kv_eff = T.alloc_buffer((16, 16), "float32", scope="local", layout=accumulator_layout(16))
        a_map_w = a_map.local(8).view("uint32")
        b_raw_w = b_raw.local(8).view("uint32")
        kv_eff_r = kv_eff.local(2, 2, 2)
        for fb in T.serial(F // 16):
            for nt, rM, rN in T.grid(2, 2, 2):
                kv_eff_r[nt, rM, rN] = T.float32(0)
            for kt in T.serial(LR // 16):
                if kt <= warp or kt >= L // 16:  # Inv is lower triangular
                    for kHi, rM in T.grid(2, 2):
                        a_map_w[kHi * 2 + rM] = input_map_w[row0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                    for nt, kHi in T.grid(2, 2):
                        b_raw_w[nt * 2 + kHi] = kv_raw_w[fb * 16 + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                    Tx.warp.gemm(kv_eff, a_map, b_raw, kv_eff, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, rM, rN in T.grid(2, 2, 2):
                j = row0 + g + 8 * rM
                f = fb * 16 + nt * 8 + 2 * tq + rN
                x = T.Cast(h16, kv_eff_r[nt, rM, rN])
                if f < K:
                    keys[j, T.min(f, K - 1)] = x
                    keys_t[T.min(f, K - 1), j] = x
                else:
                    values[j, T.max(f - K, 0)] = x
        T.cuda.cta_sync()
        for it in T.serial((NP * L // 2 + THREADS - 1) // THREADS):
            if it * THREADS + tid < NP * L // 2:
                lag_t_sw[(it * THREADS + tid) // (L // 2), (it * THREADS + tid) % (L // 2)] = lag_t_w[
                    (it * THREADS + tid) // (L // 2), (it * THREADS + tid) % (L // 2)]
                lag_sw[(it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)] = lag_w[
                    (it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)]
        T.cuda.cta_sync()

        # ---- 2. forward along the rows: z, the softmax's max and sum, w, w', mix ----------------------------
        q_a = T.alloc_buffer((16, K), h16, scope="local", layout=operand_a_layout(K))
        q_r = q_a.local(K // 16, 2, 2, 2)
        q_a_w = q_a.local(K // 16 * 8).view("uint32")
        load_row_fragment(q_a_w, q_w, b, first + row0 + g, hq, TT, tq, K, dt, T.float32(1))
        b_keys = T.alloc_buffer((16, L), h16, scope="local", layout=operand_b_layout(16, L))
        b_keys_w = b_keys.local(L // 8 * 4).view("uint32")
        rows_l = T.alloc_buffer((16, L), "float32", scope="local", layout=accumulator_layout(L))  # qx, mix, dmix, dqx
        rows_l_r = rows_l.local(L // 8, 2, 2)
        b_np = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_b_layout(16, NP))
        b_np_w = b_np.local(NP // 8 * 4).view("uint32")
        rows_n = T.alloc_buffer((16, NP), "float32", scope="local", layout=accumulator_layout(NP))  # z, dw, dz'
        rows_n_r = rows_n.local(NP // 8, 2, 2)
        l_a = T.alloc_buffer((16, L), h16, scope="local", layout=operand_a_layout(L))  # masked [16, L] A operands
        l_a_r = l_a.local(L // 16, 2, 2, 2)
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            rows_l_r[nt, rM, rN] = T.float32(0)
        for nt, rM, rN in T.grid(NP // 8, 2, 2):
            rows_n_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(K // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_keys_w[nt * 2 + kHi] = keys_w[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = q_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_l, a_slice, b_keys, rows_l, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, kHi in T.grid(NP // 8, 2):
                b_np_w[nt * 2 + kHi] = keys_w[L + nt * 8 + g, kt * 8 + kHi * 4 + tq]
            Tx.warp.gemm(rows_n, a_slice, b_np, rows_n, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            l_a_r[kt, kHi, rM, kp] = T.if_then_else(
                s <= row0 + g + 8 * rM, T.Cast(h16, rows_l_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        for kt in T.unroll(L // 16):
            for nt, kHi in T.grid(NP // 8, 2):
                b_np_w[nt * 2 + kHi] = lag_t_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = l_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_n, a_slice, b_np, rows_n, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        z_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        z_a_r = z_a.local(NP // 16, 2, 2, 2)
        for nt, rM in T.grid(NP // 8, 2):
            j = row0 + g + 8 * rM
            p = nt * 8 + 2 * tq
            z0 = rows_n_r[nt, rM, 0]
            z1 = rows_n_r[nt, rM, 1]
            z_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, scale[0] * (rot_diag[j, p] * z0 + rot_pair[j, p] * z1))
            z_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, scale[0] * (rot_diag[j, p + 1] * z1 + rot_pair[j, p + 1] * z0))

        row_max = T.alloc_buffer((2,), "float32", scope="local")
        row_sum = T.alloc_buffer((2,), "float32", scope="local")
        tile_max = T.alloc_buffer((2,), "float32", scope="local")
        tile_sum = T.alloc_buffer((2,), "float32", scope="local")
        w = T.alloc_buffer((16, NP), "float32", scope="local", layout=accumulator_layout(NP))
        w_r = w.local(NP // 8, 2, 2)
        logits = T.alloc_buffer((16, MT), "float32", scope="local", layout=accumulator_layout(MT))
        logits_r = logits.local(MT // 8, 2, 2)
        probs = T.alloc_buffer((16, MT), h16, scope="local", layout=operand_a_layout(MT))
        probs_r = probs.local(MT // 16, 2, 2, 2)
        b_slots = T.alloc_buffer((16, MT), h16, scope="local", layout=operand_b_layout(16, MT))
        b_slots_w = b_slots.local(MT // 8 * 4).view("uint32")
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
                    b_slots_w[nt * 2 + kHi] = slots_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
                for kHi, rM, kp in T.grid(2, 2, 2):
                    a_slice_r[0, kHi, rM, kp] = z_a_r[kt, kHi, rM, kp]
                Tx.warp.gemm(logits, a_slice, b_slots, logits, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for rM in T.unroll(2):
                tile_max[rM] = T.float32(-3.0e38)
                tile_sum[rM] = T.float32(0)
            for nt, rM, rN in T.grid(MT // 8, 2, 2):
                i = st * MT + nt * 8 + 2 * tq + rN
                if i >= M or T.Cast("int64", i) * W > (seen_before + T.Cast("int64", row0 + g + 8 * rM)) * M:
                    logits_r[nt, rM, rN] = T.float32(-3.0e38)
                tile_max[rM] = T.max(tile_max[rM], logits_r[nt, rM, rN])
            for rM in T.unroll(2):
                tile_max[rM] = T.max(row_max[rM], T.cuda.warp_max(tile_max[rM], width=4))
                tile_sum[rM] = T.exp(row_max[rM] - tile_max[rM])
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
                    b_np_w[nt * 2 + kHi] = slots_t_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
                for kHi, rM, kp in T.grid(2, 2, 2):
                    a_slice_r[0, kHi, rM, kp] = probs_r[kt, kHi, rM, kp]
                Tx.warp.gemm(w, a_slice, b_np, w, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        # w' = (R^{j+1})^T w / rowsum, w = P C with P normalised (w itself is not needed again)
        wr_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        wr_a_r = wr_a.local(NP // 16, 2, 2, 2)
        for nt, rM in T.grid(NP // 8, 2):
            j = row0 + g + 8 * rM
            p = nt * 8 + 2 * tq
            w0 = w_r[nt, rM, 0] / row_sum[rM]
            w1 = w_r[nt, rM, 1] / row_sum[rM]
            wr_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, rot_diag[j, p] * w0 + rot_pair_t[j, p] * w1)
            wr_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, rot_diag[j, p + 1] * w1 + rot_pair_t[j, p + 1] * w0)

        # ---- 3. backward along the rows ---------------------------------------------------------------------
        do_a = T.alloc_buffer((16, V), h16, scope="local", layout=operand_a_layout(V))
        do_r = do_a.local(V // 16, 2, 2, 2)
        do_a_w = do_a.local(V // 16 * 8).view("uint32")
        load_row_fragment(do_a_w, do_w, b, first + row0 + g, hq, TT, tq, V, dt, factor[0])
        # dmix = (dO v'^T) masked;  dw' = dO Y^T + dmix lag
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            rows_l_r[nt, rM, rN] = T.float32(0)
        for nt, rM, rN in T.grid(NP // 8, 2, 2):
            rows_n_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(V // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_keys_w[nt * 2 + kHi] = values_w[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = do_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_l, a_slice, b_keys, rows_l, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, kHi in T.grid(NP // 8, 2):
                b_np_w[nt * 2 + kHi] = values_w[L + nt * 8 + g, kt * 8 + kHi * 4 + tq]
            Tx.warp.gemm(rows_n, a_slice, b_np, rows_n, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            l_a_r[kt, kHi, rM, kp] = T.if_then_else(
                s <= row0 + g + 8 * rM, T.Cast(h16, rows_l_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        for kt in T.unroll(L // 16):
            for nt, kHi in T.grid(NP // 8, 2):
                b_np_w[nt * 2 + kHi] = lag_t_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = l_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_n, a_slice, b_np, rows_n, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        # dw = R^{j+1} dw';  delta = dw . w = dw' . w' (R is orthogonal), the softmax gradient's row term
        delta = T.alloc_buffer((2,), "float32", scope="local")
        dw_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        dw_a_r = dw_a.local(NP // 16, 2, 2, 2)
        for rM in T.unroll(2):
            delta[rM] = T.float32(0)
        for nt, rM in T.grid(NP // 8, 2):
            j = row0 + g + 8 * rM
            p = nt * 8 + 2 * tq
            d0 = rows_n_r[nt, rM, 0]
            d1 = rows_n_r[nt, rM, 1]
            delta[rM] = (delta[rM] + d0 * T.Cast("float32", wr_a_r[nt // 2, nt % 2, rM, 0])
                         + d1 * T.Cast("float32", wr_a_r[nt // 2, nt % 2, rM, 1]))  # fmt: skip
            dw_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, rot_diag[j, p] * d0 + rot_pair[j, p] * d1)
            dw_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, rot_diag[j, p + 1] * d1 + rot_pair[j, p + 1] * d0)
        for rM in T.unroll(2):
            delta[rM] = T.cuda.warp_sum(delta[rM], width=4)
        # per slot tile, 16 slots at a time: P again, dP = dw C^T, dz += P (dP - delta) C
        logits16 = T.alloc_buffer((16, 16), "float32", scope="local", layout=accumulator_layout(16))
        logits16_r = logits16.local(2, 2, 2)
        dlogits16 = T.alloc_buffer((16, 16), "float32", scope="local", layout=accumulator_layout(16))
        dlogits16_r = dlogits16.local(2, 2, 2)
        b_slots16 = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_b_layout(16, 16))
        b_slots16_w = b_slots16.local(8).view("uint32")
        for nt, rM, rN in T.grid(NP // 8, 2, 2):
            rows_n_r[nt, rM, rN] = T.float32(0)
        for st in T.serial(MP // MT):
            T.cuda.cta_sync()
            for it in T.serial((MT * NP // 2 + THREADS - 1) // THREADS):
                if it * THREADS + tid < MT * NP // 2:
                    slots_sw[(it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)] = slots_w[
                        st * MT + (it * THREADS + tid) // (NP // 2), (it * THREADS + tid) % (NP // 2)]
                    slots_t_sw[(it * THREADS + tid) // (MT // 2), (it * THREADS + tid) % (MT // 2)] = slots_t_w[
                        (it * THREADS + tid) // (MT // 2), st * MT // 2 + (it * THREADS + tid) % (MT // 2)]
            T.cuda.cta_sync()
            for piece in T.serial(MT // 16):
                for nt, rM, rN in T.grid(2, 2, 2):
                    logits16_r[nt, rM, rN] = T.float32(0)
                    dlogits16_r[nt, rM, rN] = T.float32(0)
                for kt in T.unroll(NP // 16):
                    for nt, kHi in T.grid(2, 2):
                        b_slots16_w[nt * 2 + kHi] = slots_sw[piece * 16 + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                    for kHi, rM, kp in T.grid(2, 2, 2):
                        a_slice_r[0, kHi, rM, kp] = z_a_r[kt, kHi, rM, kp]
                    Tx.warp.gemm(logits16, a_slice, b_slots16, logits16, transpose_A=False, transpose_B=False,
                                 alpha=1.0, beta=1.0)  # fmt: skip
                    for kHi, rM, kp in T.grid(2, 2, 2):
                        a_slice_r[0, kHi, rM, kp] = dw_a_r[kt, kHi, rM, kp]
                    Tx.warp.gemm(dlogits16, a_slice, b_slots16, dlogits16, transpose_A=False, transpose_B=False,
                                 alpha=1.0, beta=1.0)  # fmt: skip
                for nt, rM, rN in T.grid(2, 2, 2):
                    i = st * MT + piece * 16 + nt * 8 + 2 * tq + rN
                    e = T.exp(logits16_r[nt, rM, rN] - row_max[rM]) / row_sum[rM]
                    if i >= M or T.Cast("int64", i) * W > (seen_before + T.Cast("int64", row0 + g + 8 * rM)) * M:
                        e = T.float32(0)
                    a_slice_r[0, nt, rM, rN] = T.Cast(h16, e * (dlogits16_r[nt, rM, rN] - delta[rM]))
                for nt, kHi in T.grid(NP // 8, 2):
                    b_np_w[nt * 2 + kHi] = slots_t_sw[nt * 8 + g, piece * 8 + kHi * 4 + tq]
                Tx.warp.gemm(rows_n, a_slice, b_np, rows_n, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        # dz' = scale (R^{j+1})^T dz;  dqx = (dz' lag^T) masked;  dq = dz' X + dqx k'
        dz_a = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        dz_a_r = dz_a.local(NP // 16, 2, 2, 2)
        for nt, rM in T.grid(NP // 8, 2):
            j = row0 + g + 8 * rM
            p = nt * 8 + 2 * tq
            d0 = rows_n_r[nt, rM, 0]
            d1 = rows_n_r[nt, rM, 1]
            dz_a_r[nt // 2, nt % 2, rM, 0] = T.Cast(h16, scale[0] * (rot_diag[j, p] * d0 + rot_pair_t[j, p] * d1))
            dz_a_r[nt // 2, nt % 2, rM, 1] = T.Cast(h16, scale[0] * (rot_diag[j, p + 1] * d1 + rot_pair_t[j, p + 1] * d0))
        b_lag_rows = T.alloc_buffer((16, L), h16, scope="local", layout=operand_b_layout(16, L))
        b_lag_rows_w = b_lag_rows.local(L // 8 * 4).view("uint32")
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            rows_l_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(NP // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_lag_rows_w[nt * 2 + kHi] = lag_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = dz_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_l, a_slice, b_lag_rows, rows_l, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            l_a_r[kt, kHi, rM, kp] = T.if_then_else(
                s <= row0 + g + 8 * rM, T.Cast(h16, rows_l_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        dq = T.alloc_buffer((16, K), "float32", scope="local", layout=accumulator_layout(K))
        dq_r = dq.local(K // 8, 2, 2)
        b_k = T.alloc_buffer((16, K), h16, scope="local", layout=operand_b_layout(16, K))
        b_k_w = b_k.local(K // 8 * 4).view("uint32")
        for nt, rM, rN in T.grid(K // 8, 2, 2):
            dq_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(NP // 16):
            for nt, kHi in T.grid(K // 8, 2):
                b_k_w[nt * 2 + kHi] = keys_t_w[nt * 8 + g, (L + kt * 16) // 2 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = dz_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(dq, a_slice, b_k, dq, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for kt in T.unroll(L // 16):
            for nt, kHi in T.grid(K // 8, 2):
                b_k_w[nt * 2 + kHi] = keys_t_w[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = l_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(dq, a_slice, b_k, dq, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        for nt, rM, rN in T.grid(K // 8, 2, 2):
            t = first + row0 + g + 8 * rM
            if t < TT:
                dq_out[b, t, hq, nt * 8 + 2 * tq + rN] = T.Cast(dt, dq_r[nt, rM, rN] * factor[1])

        # ---- 4. chunk-wide: the row operands transposed into shared memory, then products over all rows -----
        # mix = (w' lag^T) masked, recomputed here (not kept in registers through stage 3)
        for nt, rM, rN in T.grid(L // 8, 2, 2):
            rows_l_r[nt, rM, rN] = T.float32(0)
        for kt in T.unroll(NP // 16):
            for nt, kHi in T.grid(L // 8, 2):
                b_lag_rows_w[nt * 2 + kHi] = lag_sw[nt * 8 + g, kt * 8 + kHi * 4 + tq]
            for kHi, rM, kp in T.grid(2, 2, 2):
                a_slice_r[0, kHi, rM, kp] = wr_a_r[kt, kHi, rM, kp]
            Tx.warp.gemm(rows_l, a_slice, b_lag_rows, rows_l, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
        T.cuda.cta_sync()  # every warp is done with [k'; X], [v'; Y]
        for kt, kHi, rM, kp in T.grid(L // 16, 2, 2, 2):
            s = kt * 16 + kHi * 8 + 2 * tq + kp
            gt[s, row0 + g + 8 * rM] = l_a_r[kt, kHi, rM, kp]
            ht[s, row0 + g + 8 * rM] = T.if_then_else(
                s <= row0 + g + 8 * rM, T.Cast(h16, rows_l_r[2 * kt + kHi, rM, kp]), T.float16(0)
            )
        for kt, kHi, rM, kp in T.grid(NP // 16, 2, 2, 2):
            p = kt * 16 + kHi * 8 + 2 * tq + kp
            gt[L + p, row0 + g + 8 * rM] = dz_a_r[kt, kHi, rM, kp]
            ht[L + p, row0 + g + 8 * rM] = wr_a_r[kt, kHi, rM, kp]
        load_rows_transposed(q_t_w, rows, q_w, b, hq, first, TT, tid, L, K, THREADS, dt, T.float32(1), None)
        bad_do = T.decl_buffer((2 * V,), "int32", data=pool.data, elem_offset=BAD_AT // 2 + 2 * F, scope="shared.dyn")
        load_rows_transposed(do_t_w, rows, do_w, b, hq, first, TT, tid, L, V, THREADS, dt, factor[0], bad_do)
        T.cuda.cta_sync()
        acc = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        acc_r = acc.local(FB // 8, 2, 2)
        b_fb = T.alloc_buffer((16, FB), h16, scope="local", layout=operand_b_layout(16, FB))
        b_fb_w = b_fb.local(FB // 8 * 4).view("uint32")
        # d[k'|v'] rows of this warp -> d_eff_t (transposed)
        for fb in T.serial(F // FB):
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                acc_r[nt, rM, rN] = T.float32(0)
            for kt in T.unroll(L // 16):
                for kHi, rM in T.grid(2, 2):
                    if fb * FB < K:
                        a_slice_w[kHi * 2 + rM] = gt_w[row0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                    else:
                        a_slice_w[kHi * 2 + rM] = ht_w[row0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                for nt, kHi in T.grid(FB // 8, 2):
                    if fb * FB < K:
                        b_fb_w[nt * 2 + kHi] = q_t_w[fb * FB + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                    else:
                        b_fb_w[nt * 2 + kHi] = do_t_w[fb * FB - K + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                Tx.warp.gemm(acc, a_slice, b_fb, acc, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                s = row0 + g + 8 * rM
                f = fb * FB + nt * 8 + 2 * tq + rN
                spoilt = not T.isfinite(acc_r[nt, rM, rN]) or (
                    f >= K and rows_at_or_after(bad, 2 * F + 2 * T.max(f - K, 0), s))
                d_eff_t[f, s] = T.if_then_else(spoilt, T.float16(0), T.Cast(h16, acc_r[nt, rM, rN]))
                if spoilt:
                    T.evaluate(T.cuda.atomic_add(T.address_of(bad[2 * f + s // 32]), T.shift_left(1, s % 32)))
        T.cuda.cta_sync()
        # d[k|v] of this warp's rows: input_map^T d[k'|v'] (input_map is lower triangular: s >= row)
        for fb in T.serial(F // FB):
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                acc_r[nt, rM, rN] = T.float32(0)
            for kt in T.serial(L // 16):
                if kt >= warp:
                    for kHi, rM in T.grid(2, 2):
                        a_slice_w[kHi * 2 + rM] = input_map_t_w[row0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_fb_w[nt * 2 + kHi] = d_eff_t_w[fb * FB + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                    Tx.warp.gemm(acc, a_slice, b_fb, acc, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            for nt, rM in T.grid(FB // 8, 2):
                r = row0 + g + 8 * rM
                f = fb * FB + nt * 8 + 2 * tq
                x = [T.Cast(h16, T.if_then_else(rows_at_or_after(bad, 2 * (f + rN), r), NAN, acc_r[nt, rM, rN]))
                     for rN in range(2)]  # fmt: skip
                if first + r < TL:
                    if fb * FB < K:
                        local_k_w[b, first + r, hq, fb * FB // 2 + nt * 4 + tq] = half_pair(x[0], x[1])
                    else:
                        local_v_w[b, first + r, hq, T.max(fb * FB - K, 0) // 2 + nt * 4 + tq] = half_pair(x[0], x[1])
        # D of the state rows this warp owns: the direct products plus input_map^T d[k'|v'], back in N's order
        for xt in T.serial((X_TILES + WARPS - 1) // WARPS):
            if xt * WARPS + warp < X_TILES:
                p0 = (xt * WARPS + warp) * 16
                for fb in T.serial(F // FB):
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        acc_r[nt, rM, rN] = T.float32(0)
                    for kt in T.unroll(L // 16):
                        for kHi, rM in T.grid(2, 2):
                            if fb * FB < K:
                                a_slice_w[kHi * 2 + rM] = gt_w[L + p0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                            else:
                                a_slice_w[kHi * 2 + rM] = ht_w[L + p0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                        for nt, kHi in T.grid(FB // 8, 2):
                            if fb * FB < K:
                                b_fb_w[nt * 2 + kHi] = q_t_w[fb * FB + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                            else:
                                b_fb_w[nt * 2 + kHi] = do_t_w[fb * FB - K + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                        Tx.warp.gemm(acc, a_slice, b_fb, acc, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                        for kHi, rM in T.grid(2, 2):
                            a_slice_w[kHi * 2 + rM] = input_map_t_w[L + p0 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                        for nt, kHi in T.grid(FB // 8, 2):
                            b_fb_w[nt * 2 + kHi] = d_eff_t_w[fb * FB + nt * 8 + g, kt * 8 + kHi * 4 + tq]
                        Tx.warp.gemm(acc, a_slice, b_fb, acc, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        p = p0 + g + 8 * rM
                        f = fb * FB + nt * 8 + 2 * tq + rN
                        n = state_row(p, N)
                        spoilt = rows_at_or_after(bad, 2 * f, 0) or (
                            f >= K and rows_at_or_after(bad, 2 * F + 2 * T.max(f - K, 0), 0))
                        if p < N:
                            grads[b, c, hq, n, f] = T.Cast(
                                h16, T.if_then_else(spoilt, NAN, acc_r[nt, rM, rN]))

    return chunk_backward
