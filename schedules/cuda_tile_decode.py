"""The CUDA one-token decode step as a TIRx program: warps own rows of the state, lanes own its columns.

One thread block of ``warps`` warps per (batch b, kv head h), or per ``items`` of them in turn. The state
X | Y [N, F] (F = K + V) is split by rows over the warps and by columns over the lanes: row slot s holds row 0
(s = 0), the rotation pair (2s - 1, 2s) (1 <= s <= (N - 1) / 2) or the Nyquist row N - 1 (N even); warp w owns
slots w, w + warps, ...; lane l owns columns l, l + 32, ... . Each thread loads its rows x columns once (all
loads in flight together, coalesced: a warp reads whole rows) and keeps them in registers to the end; everything
the readout reduces over columns (z = X' q, over K) or over a warp's rows (partial scores, w = p C, o = w Y') is
reduced in registers and by warp shuffles. Three block barriers, each after a cross-warp partial sum in shared memory:

  1. S -> R S (pairwise, in registers); partial removal  sum_n (b_n / W) (R S)[n, f]  over the warp's rows
  2. S' = R S + b (new - removal), stored (rounded to the state dtype, which the readout then reads);
     z_g[n] = sum_k q_g[k] X'[n, k] (warp shuffles); partial scores  sum_n C[i, n] z_g[n]  over the warp's rows
  3. every warp: scores, mask, softmax over the slots i = lane + 32 j (shuffles); w_g[n] = sum_i p_g[i] C[i, n]
     for its own rows (shuffles); partial o  sum_n w_g[n] Y'[n, v]  over its rows
  4. o_g[v] = sum over warps / sum_i p_g[i]

Each lane's slot readouts C[i, n] (its slots i by its warp's rows n) are loaded once per block and used twice per
item (scores and w). Every state element is read (phase 1) before any is written (phase 2), each by the thread
that writes it, and a block touches only its own (b, h): the outputs may alias the state inputs (in place).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from bla_tvm.layer import KernelSpec

from .cuda_launch_bounds import with_min_blocks_per_sm

#: the largest shapes the program serves (registers per thread grow with them; beyond, the TE schedule of
#: ``cuda_decode.py`` runs)
MAX_STATE_WIDTH = 256
MAX_SLOT_TERMS = 256  # G * M: the slots' scores and probabilities each lane keeps, times 32
MAX_GROUP = 8


@dataclass(frozen=True)
class DecodeTileConfig:
    """Knobs of the tile decode step. warps: warps per block (the state's row slots are spread over them:
    fewer warps, more rows and registers per thread). items: the (b, h) one block decodes in turn, asking L2 for
    each next one's state while it computes the one before (1: one each). min_blocks_per_sm: blocks ptxas must
    fit on one SM (0: as many as the registers it picks allow); at the bench shape fp32, 4 warps: 166 registers
    (3 blocks per SM), 4 blocks: 128 registers and 80 B of spills (ptxas; not timed yet).

    At the bench shape (B = 64, H = 16, K = V = 64, N = M = 63; do_bench on the H200, 2026-12-04, one run), one
    item per block: fp32 state 27.3 / 31.3 / 33.0 us with 4 / 8 / 16 warps (166 / 92 / 56 registers); fp16 state
    23.9 us with 8 warps (116), 41.3 with 16. Two or four items did not help (fp32, 8 warps: 32.2 / 31.6 us; fp16,
    8 warps, four items: 29.6)."""

    warps: int = 8
    items: int = 1
    min_blocks_per_sm: int = 0  # > 0: ``cuda_launch_bounds.with_min_blocks_per_sm`` (registers capped to fit)


def default_config(spec: KernelSpec, state_dtype: str | None) -> DecodeTileConfig:
    """The fastest measured (``DecodeTileConfig``): 4 warps for a float32 state where a thread then holds at most
    64 state values (the bench shape's: 16 rows x 4 columns) and one query head per kv head, else 8."""
    rows_4_warps = 2 * ceil_div(1 + (spec.resolution - 1) // 2 + (1 - spec.resolution % 2), 4)
    small = rows_4_warps * ceil_div(spec.state_width, 32) <= 64
    return DecodeTileConfig(warps=4 if state_dtype in (None, "float32") and small and spec.group_size == 1 else 8)


def decode_tile_serves(spec: KernelSpec) -> bool:
    """Whether ``decode_step_tile`` compiles ``spec`` (float64 and shapes past the register budget do not)."""
    return (
        spec.acc_dtype == "float32"
        and spec.state_width <= MAX_STATE_WIDTH
        and spec.group_size <= MAX_GROUP
        and spec.group_size * spec.num_slots <= MAX_SLOT_TERMS
    )


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def decode_step_tile(spec: KernelSpec, state_dtype: str | None = None, config: DecodeTileConfig = DecodeTileConfig()):
    """The PrimFunc of a decode kernel (``kernels.DECODE_ARGS``; the builder gives it the kernel's symbol):
    o [B, H, G, V], key_out [B, H, N, K], value_out [B, H, N, V] from q [B, H, G, K], k [B, H, K], v [B, H, V],
    key_state [B, H, N, K], value_state [B, H, N, V] (``state_dtype``, default float32), seen [B] int64, and the
    float32 constants scale [1], rot_diag [N], rot_off [N], basis [N], removal [N], C [M, N], C_t [N, M]
    (``bla_tvm.decode.decode_constants``)."""
    if not decode_tile_serves(spec):
        raise ValueError(f"the tile decode step does not serve {spec}")
    N, M, W, G, K, V = spec.resolution, spec.num_slots, spec.window, spec.group_size, spec.head_k, spec.head_v
    F = K + V
    dt, acc = spec.dtype, "float32"
    sdt = state_dtype or acc
    WARPS, ITEMS = config.warps, config.items
    THREADS = 32 * WARPS
    PAIRS = (N - 1) // 2
    SLOTS = 1 + PAIRS + (1 - N % 2)  # row 0, the pairs, the Nyquist row when N is even
    SPW = ceil_div(SLOTS, WARPS)  # row slots per warp
    ROWS = 2 * SPW  # rows per thread (slot j: rows 2 j and 2 j + 1 of the thread's arrays)
    E = ceil_div(F, 32)  # columns per lane
    MJ = ceil_div(M, 32)  # slots i per lane
    LINE = 128 // {"float32": 4, "float16": 2, "bfloat16": 2}[sdt]  # state elements per 128-byte line
    K_LINES, ROW_LINES = ceil_div(K, LINE), ceil_div(K, LINE) + ceil_div(V, LINE)  # lines of a row's X, X | Y
    NEG = T.float32(-3.0e38)

    @T.prim_func
    def decode_step(
        q_h: T.handle, k_h: T.handle, v_h: T.handle, key_state_h: T.handle, value_state_h: T.handle, seen_h: T.handle,
        scale_h: T.handle, rot_diag_h: T.handle, rot_off_h: T.handle, basis_h: T.handle, removal_h: T.handle,
        C_h: T.handle, C_t_h: T.handle, o_h: T.handle, key_out_h: T.handle, value_out_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_decode_step"})
        B = T.int32()
        H = T.int32()
        q = T.match_buffer(q_h, (B, H, G, K), dt)
        k = T.match_buffer(k_h, (B, H, K), dt)
        v = T.match_buffer(v_h, (B, H, V), dt)
        key_state = T.match_buffer(key_state_h, (B, H, N, K), sdt)
        value_state = T.match_buffer(value_state_h, (B, H, N, V), sdt)
        seen = T.match_buffer(seen_h, (B,), "int64")
        scale = T.match_buffer(scale_h, (1,), acc)
        rot_diag = T.match_buffer(rot_diag_h, (N,), acc)
        rot_off = T.match_buffer(rot_off_h, (N,), acc)
        basis = T.match_buffer(basis_h, (N,), acc)
        removal = T.match_buffer(removal_h, (N,), acc)
        C = T.match_buffer(C_h, (M, N), acc)
        C_t = T.match_buffer(C_t_h, (N, M), acc)
        o = T.match_buffer(o_h, (B, H, G, V), dt)
        key_out = T.match_buffer(key_out_h, (B, H, N, K), sdt)
        value_out = T.match_buffer(value_out_h, (B, H, N, V), sdt)

        T.device_entry()
        block = T.cta_id([(B * H + ITEMS - 1) // ITEMS])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])

        # cross-warp partial sums: removal [F], scores [G, M], o [G, V]
        removal_part = T.alloc_buffer((WARPS, F), acc, scope="shared")
        score_part = T.alloc_buffer((WARPS, G, M), acc, scope="shared")
        out_part = T.alloc_buffer((WARPS, G, V), acc, scope="shared")

        state = T.alloc_buffer((ROWS, E), acc, scope="local")  # S, then R S, then S'
        row = T.alloc_buffer((ROWS,), "int32", scope="local")
        row_ok = T.alloc_buffer((ROWS,), "bool", scope="local")
        slot_c = T.alloc_buffer((MJ, ROWS), acc, scope="local")  # C[lane + 32 j, row]
        gain = T.alloc_buffer((ROWS,), acc, scope="local")
        drop = T.alloc_buffer((ROWS,), acc, scope="local")
        vec = T.alloc_buffer((E,), acc, scope="local")
        z = T.alloc_buffer((G, ROWS), acc, scope="local")
        probs = T.alloc_buffer((G, MJ), acc, scope="local")
        row_sum = T.alloc_buffer((G,), acc, scope="local")
        red = T.alloc_buffer((1,), acc, scope="local")

        # ---- 0. this thread's rows and its slot readouts, once for all the block's items ---------------------
        for j in T.unroll(SPW):
            s = warp + WARPS * j
            row[2 * j] = T.if_then_else(s == 0, 0, T.if_then_else(s <= PAIRS, 2 * s - 1, N - 1))
            row_ok[2 * j] = s < SLOTS
            row[2 * j + 1] = T.min(2 * s, N - 1)
            row_ok[2 * j + 1] = T.And(1 <= s, s <= PAIRS)
        for mj, r in T.grid(MJ, ROWS):
            slot_c[mj, r] = C_t[row[r], T.min(lane + 32 * mj, M - 1)]

        for i in T.serial(ITEMS):  # the block's items in turn: (b, h) = divmod(block ITEMS + i, H)
            item = block * ITEMS + i
            if item < B * H:
                b = item // H
                h = item % H
                # ---- 1. load S (rows x columns of this thread), then ask L2 for the next item's --------------------
                for r, e in T.grid(ROWS, E):
                    f = lane + 32 * e
                    state[r, e] = T.float32(0)
                    if row_ok[r] and f < F:
                        if f < K:
                            state[r, e] = T.Cast(acc, key_state[b, h, row[r], T.min(f, K - 1)])
                        else:
                            state[r, e] = T.Cast(acc, value_state[b, h, row[r], T.max(f - K, 0)])
                if i + 1 < ITEMS and item + 1 < B * H:
                    for p in T.unroll(ceil_div(ROWS * ROW_LINES, 32)):  # lane l: line l (+ 32 p) of its warp's rows
                        line = lane + 32 * p
                        # the warp's row slot j = line // (2 ROW_LINES) holds rows 2 j - 1, 2 j of the state (row
                        # 0 alone for j = 0, N - 1 alone for the Nyquist slot); computed, not read from ``row``,
                        # whose index would be dynamic here (and the array then local memory)
                        s = warp + WARPS * (line // (2 * ROW_LINES))
                        n = T.min(T.max(2 * s - 1 + (line // ROW_LINES) % 2, 0), N - 1)
                        c = line % ROW_LINES
                        if line < ROWS * ROW_LINES and s < SLOTS:
                            if c < K_LINES:
                                T.ptx.prefetch.global_.L2(T.address_of(
                                    key_state[(item + 1) // H, (item + 1) % H, n, T.min(c * LINE, K - 1)]))
                            else:
                                T.ptx.prefetch.global_.L2(T.address_of(value_state[
                                    (item + 1) // H, (item + 1) % H, n, T.min((c - K_LINES) * LINE, V - 1)]))
                # rotate; partial removal over this warp's rows
                for r in T.unroll(ROWS):  # the rows' constants (cached reads): b (masked to the valid rows), b / W
                    gain[r] = T.if_then_else(row_ok[r], basis[row[r]], T.float32(0))
                    drop[r] = T.if_then_else(row_ok[r], removal[row[r]], T.float32(0))
                for j in T.unroll(SPW):
                    diag0 = rot_diag[row[2 * j]]
                    off0 = rot_off[row[2 * j]]
                    diag1 = rot_diag[row[2 * j + 1]]
                    off1 = rot_off[row[2 * j + 1]]
                    for e in T.unroll(E):
                        a = state[2 * j, e]
                        c = state[2 * j + 1, e]
                        state[2 * j, e] = diag0 * a + off0 * c
                        state[2 * j + 1, e] = diag1 * c + off1 * a
                for e in T.unroll(E):
                    vec[e] = T.float32(0)
                    for r in T.unroll(ROWS):
                        vec[e] = vec[e] + drop[r] * state[r, e]
                    if lane + 32 * e < F:
                        removal_part[warp, T.min(lane + 32 * e, F - 1)] = vec[e]
                T.cuda.cta_sync()

                # ---- 2. S' = R S + b (new - removal), stored; z = X' q; partial scores over this warp's rows ---
                for e in T.unroll(E):
                    f = T.min(lane + 32 * e, F - 1)
                    vec[e] = T.if_then_else(
                        f < K, T.Cast(acc, k[b, h, T.min(f, K - 1)]), T.Cast(acc, v[b, h, T.max(f - K, 0)])
                    )
                    for w in T.unroll(WARPS):
                        vec[e] = vec[e] - removal_part[w, f]
                for r, e in T.grid(ROWS, E):
                    f = lane + 32 * e
                    state[r, e] = T.Cast(acc, T.Cast(sdt, state[r, e] + gain[r] * vec[e]))
                    if row_ok[r] and f < F:
                        if f < K:
                            key_out[b, h, row[r], T.min(f, K - 1)] = T.Cast(sdt, state[r, e])
                        else:
                            value_out[b, h, row[r], T.max(f - K, 0)] = T.Cast(sdt, state[r, e])
                for g in T.unroll(G):
                    for e in T.unroll(E):
                        f = lane + 32 * e
                        vec[e] = T.if_then_else(f < K, T.Cast(acc, q[b, h, g, T.min(f, K - 1)]), T.float32(0))
                    for r in T.unroll(ROWS):
                        red[0] = T.float32(0)
                        for e in T.unroll(E):
                            red[0] = red[0] + vec[e] * state[r, e]
                        z[g, r] = T.cuda.warp_sum(red[0])
                    for mj in T.unroll(MJ):
                        red[0] = T.float32(0)
                        for r in T.unroll(ROWS):
                            red[0] = red[0] + slot_c[mj, r] * z[g, r]
                        if lane + 32 * mj < M:
                            score_part[warp, g, T.min(lane + 32 * mj, M - 1)] = red[0]
                T.cuda.cta_sync()

                # ---- 3. every warp: softmax over the slots; w = p C on its rows; partial o over its rows -------
                for g in T.unroll(G):
                    red[0] = NEG
                    for mj in T.unroll(MJ):
                        i_slot = lane + 32 * mj
                        probs[g, mj] = NEG
                        if i_slot < M and T.Cast("int64", i_slot) * W <= T.min(seen[b], T.int64(W)) * M:
                            probs[g, mj] = T.float32(0)  # (the int64 product cannot overflow)
                            for w in T.unroll(WARPS):
                                probs[g, mj] = probs[g, mj] + score_part[w, g, T.min(i_slot, M - 1)]
                            probs[g, mj] = scale[0] * probs[g, mj]
                        red[0] = T.max(red[0], probs[g, mj])
                    red[0] = T.cuda.warp_max(red[0])
                    row_sum[g] = T.float32(0)
                    for mj in T.unroll(MJ):
                        probs[g, mj] = T.if_then_else(
                            probs[g, mj] > T.float32(-1.0e38), T.exp(probs[g, mj] - red[0]), T.float32(0)
                        )
                        row_sum[g] = row_sum[g] + probs[g, mj]
                    row_sum[g] = T.cuda.warp_sum(row_sum[g])
                    for r in T.unroll(ROWS):
                        red[0] = T.float32(0)
                        for mj in T.unroll(MJ):
                            red[0] = red[0] + probs[g, mj] * slot_c[mj, r]
                        z[g, r] = T.cuda.warp_sum(red[0])  # now w_g[row r]
                    for e in T.unroll(E):
                        f = lane + 32 * e
                        red[0] = T.float32(0)
                        for r in T.unroll(ROWS):
                            red[0] = red[0] + z[g, r] * state[r, e]
                        if K <= f and f < F:
                            out_part[warp, g, T.min(T.max(f - K, 0), V - 1)] = red[0]
                T.cuda.cta_sync()

                # ---- 4. o = sum of the warps' partials / sum(p) -----------------------------------------------
                for it in T.unroll(ceil_div(G * V, THREADS)):
                    t = it * THREADS + warp * 32 + lane
                    if t < G * V:
                        g = t // V
                        red[0] = T.float32(0)
                        for w in T.unroll(WARPS):
                            red[0] = red[0] + out_part[w, g, t % V]
                        for gg in T.unroll(G):
                            if gg == g:
                                o[b, h, g, t % V] = T.Cast(dt, red[0] / row_sum[gg])

    if config.min_blocks_per_sm:
        return with_min_blocks_per_sm(decode_step, config.min_blocks_per_sm)
    return decode_step
