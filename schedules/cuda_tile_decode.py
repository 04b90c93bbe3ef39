"""The CUDA one-token decode step as a TIRx program: warps own row pairs of the state, lanes own its columns.

A grid of at most ``blocks`` thread blocks of ``warps`` warps; block i decodes (b, h) = divmod(item, H) for item
= i, i + grid, ... in turn. While it computes one item, the next one's state X | Y [N, K + V] and seen[b]
stream into shared memory (``cp.async``: every thread a share of 16-, 8- or 4-byte copies, ``copy_chunk``) and its
k, v, q into registers.
The constants are loaded once per block: the rows' rotation, b and b / W into a shared table (read where used),
the slot readouts C[i, n] of this lane's slots and rows into registers (``readout_in_shared``: all of C, rows
absent or not, into a shared table [rows, M] read where used, which frees MJ x rows registers a thread).

Thread layout of an item: warp w owns the rotation pairs (2 s - 1, 2 s), s = w, w + warps, ... (row 0 pairs
with an absent row -1, an even N's row N - 1 with an absent row N; absent rows have zero constants and stay
zero); lane l owns the columns of X and of Y in groups of 4, 2 or 1 adjacent ones (``vector_width``): l, l + 32,
... . Each thread copies its rows x columns from the stage into registers once and keeps them to the end;
sums over columns (z = X' q, over K) and over a warp's rows (partial scores, w = p C, o = w Y') are reduced
in registers and by warp shuffles, a reduce-scatter then an all-gather for the per-row sums. Five block
barriers an item: the stage complete, the stage read (it may then be refilled), and one after each cross-warp
partial sum in shared memory:

  1. S -> R S (pairwise, in registers); partial removal  sum_n (b_n / W) (R S)[n, f]  over the warp's rows
  2. S' = R S + b (new - removal), stored (rounded to the state dtype, which the readout then reads);
     z_g[n] = sum_k q_g[k] X'[n, k]; partial scores  sum_n C[i, n] z_g[n]  over the warp's rows
  3. every warp: scores, mask, softmax over the slots i = lane + 32 j (shuffles); w_g[n] = sum_i p_g[i] C[i, n]
     for its own rows; partial o  sum_n w_g[n] Y'[n, v]  over its rows
  4. o_g[v] = sum over warps / sum_i p_g[i]

Every state element is read (into the stage) before any of the item is written (phase 2), and an item's state
is touched by one block only: the outputs may alias the state inputs (in place).
"""

from __future__ import annotations

from dataclasses import dataclass

from tvm.script import tirx as T

from bla_tvm.cuda_arch import SHARED_MEMORY_OPTIN
from bla_tvm.layer import KernelSpec

from .cuda_launch_bounds import with_min_blocks_per_sm

#: the largest shapes the program serves (registers per thread grow with them; beyond, the TE schedule of
#: ``cuda_decode.py`` runs)
MAX_STATE_WIDTH = 256
MAX_SLOT_TERMS = 256  # G * M: the slots' scores and probabilities each lane keeps, times 32
MAX_GROUP = 8
STATE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class DecodeTileConfig:
    """Knobs of the tile decode step. warps: warps per block (the state's row pairs are spread over them: fewer
    warps, more rows and registers per thread). min_blocks_per_sm: blocks ptxas must fit on one SM (0: as many as
    the registers it picks allow)."""

    warps: int = 8
    blocks: int = 264  # the grid's size at most (132 SMs x 2 blocks); each block takes every blocks-th (b, h)
    min_blocks_per_sm: int = 0  # > 0: ``cuda_launch_bounds.with_min_blocks_per_sm`` (registers capped to fit)
    readout_in_shared: bool = False  # C in a shared table instead of registers (3-4 blocks per SM fit unspilled)


def default_config(spec: KernelSpec, state_dtype: str | None) -> DecodeTileConfig:
    """8 warps, 264 blocks (2 per SM of an H200). Where a thread then holds at most 32 state values (the bench
    shape's: 8 rows x 4 columns), ptxas is held to 128 registers so that 2 blocks fit; else it picks. At the bench
    shape (H200, do_bench, 2026-12-04, one run): float32 state 23.4 us (3 blocks per SM at 80 registers, which
    spill, 26.3-26.7); float16 17.3 us (3 per SM 19.0); two states per block in shared memory, one computed while
    the other streams in, were slower (25.3 / 18.5 us)."""
    rows = 2 * ceil_div(spec.resolution // 2 + 1, 8)
    small = rows * ceil_div(spec.state_width, 32) <= 32 and spec.group_size <= 2
    return DecodeTileConfig(warps=8, blocks=264, min_blocks_per_sm=2 if small else 0)


def decode_tile_serves(
    spec: KernelSpec, state_dtype: str | None = None, config: DecodeTileConfig | None = None,
    shared_memory: int = SHARED_MEMORY_OPTIN[(9, 0)],
) -> bool:  # fmt: skip
    """Whether ``decode_step_tile`` compiles and launches ``spec`` with a ``state_dtype`` state and ``config``
    (default: ``default_config``'s) where a block may opt in to ``shared_memory`` bytes (default sm_90's, 227 KB;
    the tile program needs sm_80 or newer, which the caller checks). Not: float64; shapes past the register budget;
    a 16-bit state with odd head dims (rows of no whole number of 4-byte copies); a shared pool past
    ``shared_memory`` (a large N)."""
    elem = STATE_BYTES[state_dtype or "float32"]
    config = config or default_config(spec, state_dtype)
    return (
        spec.acc_dtype == "float32"
        and spec.head_k * elem % 4 == 0
        and spec.head_v * elem % 4 == 0
        and spec.state_width <= MAX_STATE_WIDTH
        and spec.group_size <= MAX_GROUP
        and spec.group_size * spec.num_slots <= MAX_SLOT_TERMS
        and 4 * SharedPool(spec, elem, config.warps, config.readout_in_shared).words <= shared_memory
    )


@dataclass(frozen=True)
class SharedPool:
    """The block's shared memory, one dynamic pool of 32-bit words: the stage (one (b, h)'s X | Y [N, K + V] of
    ``elem``-byte elements), seen[b] (8-byte aligned), the rows' constants [4, table], the cross-warp partial
    sums removal [warps, K + V], scores [warps, G, M], o [warps, G, V] and, with ``readout``, C [table, M];
    offsets in words."""

    spec: KernelSpec
    elem: int
    warps: int
    readout: bool = False

    @property
    def table(self) -> int:  # rows n = -1 .. 2 warps SPW - 1 of the threads, at n + 1
        return 2 * self.warps * ceil_div(self.spec.resolution // 2 + 1, self.warps) + 1

    @property
    def seen_at(self) -> int:
        return 2 * ceil_div(self.spec.resolution * self.spec.state_width * self.elem, 8)

    @property
    def consts_at(self) -> int:
        return self.seen_at + 2

    @property
    def removal_at(self) -> int:
        return self.consts_at + 4 * self.table

    @property
    def scores_at(self) -> int:
        return self.removal_at + self.warps * self.spec.state_width

    @property
    def out_at(self) -> int:
        return self.scores_at + self.warps * self.spec.group_size * self.spec.num_slots

    @property
    def readout_at(self) -> int:
        return self.out_at + self.warps * self.spec.group_size * self.spec.head_v

    @property
    def words(self) -> int:
        return self.readout_at + (self.table * self.spec.num_slots if self.readout else 0)


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def vector_width(width: int) -> int:
    """Columns a lane loads at once from a state row of ``width`` columns: 4 or 2 when every lane then has a whole
    group of its own (width a multiple of 128 or 64), else 1."""
    return 4 if width % 128 == 0 else 2 if width % 64 == 0 else 1


def copy_chunk(*row_bytes: int) -> int:
    """Bytes per asynchronous copy of a state whose rows take ``row_bytes`` each: 16, 8 or 4, the largest
    dividing every row (so that every (b, h)'s state starts on a chunk)."""
    return next(chunk for chunk in (16, 8, 4) if all(size % chunk == 0 for size in row_bytes))


def decode_step_tile(spec: KernelSpec, state_dtype: str | None = None, config: DecodeTileConfig = DecodeTileConfig()):
    """The PrimFunc of a decode kernel (``kernels.DECODE_ARGS``; the builder gives it the kernel's symbol):
    o [B, H, G, V], key_out [B, H, N, K], value_out [B, H, N, V] from q [B, H, G, K], k [B, H, K], v [B, H, V],
    key_state [B, H, N, K], value_state [B, H, N, V] (``state_dtype``, default float32), seen [B] int64, and the
    float32 constants scale [1], rot_diag [N], rot_off [N], basis [N], removal [N], C [M, N], C_t [N, M]
    (``bla_tvm.decode.decode_constants``)."""
    if not decode_tile_serves(spec, state_dtype, config):
        raise ValueError(f"the tile decode step does not serve {spec} with a {state_dtype or 'float32'} state")
    N, M, W, G, K, V = spec.resolution, spec.num_slots, spec.window, spec.group_size, spec.head_k, spec.head_v
    dt, acc = spec.dtype, "float32"
    sdt = state_dtype or acc
    WARPS, BLOCKS = config.warps, config.blocks
    THREADS = 32 * WARPS
    SPW = ceil_div(N // 2 + 1, WARPS)  # row pairs (2 s - 1, 2 s), s = 0 .. N // 2, per warp
    ROWS = 2 * SPW  # rows per thread
    RP = 1 << (ROWS - 1).bit_length()  # ROWS rounded up to a power of two, for the reduce-scatter
    VK, VV = vector_width(K), vector_width(V)  # a lane's columns: groups of VK (VV) adjacent ones
    EK, EV = ceil_div(K, 32 * VK), ceil_div(V, 32 * VV)  # groups per lane
    MJ = ceil_div(M, 32)  # slots i per lane
    NEG = T.float32(-3.0e38)
    ELEM = STATE_BYTES[sdt]
    CHUNK = copy_chunk(K * ELEM, V * ELEM)  # bytes per cp.async
    X_CHUNKS, Y_CHUNKS = N * K * ELEM // CHUNK, N * V * ELEM // CHUNK  # of one (b, h)'s X, Y
    PER_CHUNK = CHUNK // ELEM  # state elements per chunk
    COPY = f"cp.async.{'cg' if CHUNK == 16 else 'ca'}.shared.global"
    READOUT_SHARED = config.readout_in_shared
    pool = SharedPool(spec, ELEM, WARPS, READOUT_SHARED)
    TABLE, SEEN_AT, CONSTS_AT, POOL_WORDS = pool.table, pool.seen_at, pool.consts_at, pool.words
    REMOVAL_AT, SCORES_AT, OUT_AT, READOUT_AT = pool.removal_at, pool.scores_at, pool.out_at, pool.readout_at
    shfl_xor = getattr(T.cuda, "__shfl_xor_sync")
    shfl = getattr(T.cuda, "__shfl_sync")

    def state_row(warp, r):
        """The state row n of a thread's row r: rotation pair s = warp + WARPS (r // 2) holds rows 2 s - 1, 2 s."""
        return 2 * (warp + WARPS * (r // 2)) - 1 + r % 2

    def slot_readout(slot_c, readout, mj, r, warp, lane):
        """C[i, n] of slot i = lane + 32 mj and the thread's row r (n = ``state_row``; 0 for an absent row)."""
        if READOUT_SHARED:
            return readout[state_row(warp, r) + 1, T.min(lane + 32 * mj, M - 1)]
        return slot_c[mj, r]

    def columns(first, width):
        """Index of ``width`` adjacent columns from ``first`` (a ramp: one vector access)."""
        return first if width == 1 else T.ramp(first, 1, width)

    @T.macro
    def sum_rows_over_lanes(part, total, g, lane):
        """total[g, r] = sum over the warp's lanes of part[r] (r < RP), in every lane: a reduce-scatter (lane L
        keeps rows (L RP) // 32 + i, i < max(RP // 32, 1)), then an all-gather; ``part`` is overwritten."""
        for step in T.unroll(5):
            d = 16 >> step
            for i in T.unroll(RP // 2):
                half = T.max(RP >> (step + 1), 1)
                if i < half and (step < RP.bit_length() - 1 or i == 0):
                    if RP >> step >= 2:  # halve: keep one half, send the other to the partner, add its
                        upper = (lane & d) != 0
                        keep = T.if_then_else(upper, part[half + i], part[i])
                        send = T.if_then_else(upper, part[i], part[half + i])
                        part[i] = keep + shfl_xor(T.uint32(0xFFFFFFFF), send, d, 32)
                    else:  # one value left (per slot i < RP // 32): reduce it over the remaining lanes
                        part[i] = part[i] + shfl_xor(T.uint32(0xFFFFFFFF), part[i], d, 32)
        for r in T.unroll(RP):
            total[g, r] = shfl(T.uint32(0xFFFFFFFF), part[r % T.max(RP // 32, 1)], (r * 32) // RP, 32)

    @T.macro
    def fetch(stage, stage_seen, key_flat, value_flat, seen, item, heads, tid):
        """Start copying X | Y of (b, h) = divmod(item, heads) into ``stage`` (cp.async, CHUNK bytes a copy;
        thread tid takes chunks tid, tid + THREADS, ... of X, then of Y: addresses a base plus an immediate) and
        seen[b] into ``stage_seen`` (so that no register waits for it: a warp-uniform value loaded into a
        register is moved to a uniform register at once, which waits for the load)."""
        if tid == 0:
            T.ptx["cp.async.ca.shared.global"](T.address_of(stage_seen[0]), T.address_of(seen[item // heads]), 8)
        for p in T.unroll(ceil_div(X_CHUNKS, THREADS)):
            if tid + THREADS * p < X_CHUNKS:
                T.ptx[COPY](T.address_of(stage[(tid + THREADS * p) * PER_CHUNK]),
                            T.address_of(key_flat[item * (N * K) + (tid + THREADS * p) * PER_CHUNK]), CHUNK)
        for p in T.unroll(ceil_div(Y_CHUNKS, THREADS)):
            if tid + THREADS * p < Y_CHUNKS:
                T.ptx[COPY](T.address_of(stage[N * K + (tid + THREADS * p) * PER_CHUNK]),
                            T.address_of(value_flat[item * (N * V) + (tid + THREADS * p) * PER_CHUNK]), CHUNK)
        T.ptx["cp.async.commit_group"]()

    @T.macro
    def load_token(token_x, token_y, token_q, q, k, v, item, heads, lane):
        """This lane's columns of k, v and q_g of (b, h) = divmod(item, heads): loads in flight while the item
        before is computed (kept in the input dtype: a conversion here would wait for them)."""
        for e, u in T.grid(EK, VK):
            col = T.min(VK * (lane + 32 * e) + u, K - 1)
            token_x[e * VK + u] = k[item // heads, item % heads, col]
            for g in T.unroll(G):
                token_q[g, e * VK + u] = q[item // heads, item % heads, g, col]
        for e, u in T.grid(EV, VV):
            col = T.min(VV * (lane + 32 * e) + u, V - 1)
            token_y[e * VV + u] = v[item // heads, item % heads, col]

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
        block = T.cta_id([T.min(B * H, BLOCKS)])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])
        grid = T.min(B * H, BLOCKS)

        # one dynamic pool of 32-bit words (a static part would count against the 48 KB a block gets without
        # opting in, which the runtime does for the dynamic size alone)
        pool = T.alloc_buffer((POOL_WORDS,), acc, scope="shared.dyn")
        stage = T.decl_buffer((N * (K + V),), sdt, data=pool.data, elem_offset=0, scope="shared.dyn")  # X | Y
        stage_seen = T.decl_buffer((1,), "int64", data=pool.data, elem_offset=SEEN_AT // 2, scope="shared.dyn")
        # rot_diag, rot_off, basis, removal of state row n at n + 1 (read where used: registers are short)
        row_consts = T.decl_buffer((4, TABLE), acc, data=pool.data, elem_offset=CONSTS_AT, scope="shared.dyn")
        # cross-warp partial sums: removal [K | V], scores [G, M], o [G, V]
        removal_part = T.decl_buffer((WARPS, K + V), acc, data=pool.data, elem_offset=REMOVAL_AT, scope="shared.dyn")
        score_part = T.decl_buffer((WARPS, G, M), acc, data=pool.data, elem_offset=SCORES_AT, scope="shared.dyn")
        out_part = T.decl_buffer((WARPS, G, V), acc, data=pool.data, elem_offset=OUT_AT, scope="shared.dyn")
        # readout_in_shared: C_t[n, i] at [n + 1, i], zero rows for absent n
        readout = T.decl_buffer((TABLE, M), acc, data=pool.data, elem_offset=READOUT_AT, scope="shared.dyn")
        key_flat = T.decl_buffer((B * H * N * K,), sdt, data=key_state.data)
        value_flat = T.decl_buffer((B * H * N * V,), sdt, data=value_state.data)

        xs = T.alloc_buffer((ROWS, EK * VK), acc, scope="local")  # X: S, then R S, then S'
        ys = T.alloc_buffer((ROWS, EV * VV), acc, scope="local")  # Y alike
        slot_c = T.alloc_buffer((MJ, 1 if READOUT_SHARED else ROWS), acc, scope="local")  # C[lane + 32 j, row]
        token_x = T.alloc_buffer((EK * VK,), dt, scope="local")  # k, v, q_g of the next item
        token_y = T.alloc_buffer((EV * VV,), dt, scope="local")
        token_q = T.alloc_buffer((G, EK * VK), dt, scope="local")
        new_x = T.alloc_buffer((EK * VK,), acc, scope="local")  # k, v of this item, then new - removal
        new_y = T.alloc_buffer((EV * VV,), acc, scope="local")
        q_x = T.alloc_buffer((G, EK * VK), acc, scope="local")
        seen_b = T.alloc_buffer((1,), "int64", scope="local")
        part = T.alloc_buffer((RP,), acc, scope="local")
        z = T.alloc_buffer((G, RP), acc, scope="local")  # X' q_g, then w_g, by row
        probs = T.alloc_buffer((G, MJ), acc, scope="local")
        row_sum = T.alloc_buffer((G,), acc, scope="local")
        red = T.alloc_buffer((1,), acc, scope="local")

        fetch(stage, stage_seen, key_flat, value_flat, seen, block, H, warp * 32 + lane)
        load_token(token_x, token_y, token_q, q, k, v, block, H, lane)
        for p in T.unroll(ceil_div(TABLE, THREADS)):  # the rows' constants at n + 1, zero for absent rows
            i = warp * 32 + lane + THREADS * p
            if i < TABLE:
                n_in = T.min(T.max(i - 1, 0), N - 1)
                present = 1 <= i and i <= N
                row_consts[0, i] = T.if_then_else(present, rot_diag[n_in], T.float32(0))
                row_consts[1, i] = T.if_then_else(present, rot_off[n_in], T.float32(0))
                row_consts[2, i] = T.if_then_else(present, basis[n_in], T.float32(0))
                row_consts[3, i] = T.if_then_else(present, removal[n_in], T.float32(0))
        if READOUT_SHARED:
            for p in T.unroll(ceil_div(TABLE * M, THREADS)):
                e = warp * 32 + lane + THREADS * p
                if e < TABLE * M:
                    readout[e // M, e % M] = T.if_then_else(
                        1 <= e // M and e // M <= N, C_t[T.min(T.max(e // M - 1, 0), N - 1), e % M], T.float32(0))
        T.cuda.cta_sync()
        if not READOUT_SHARED:
            for r in T.unroll(ROWS):
                n = state_row(warp, r)
                for mj in T.unroll(MJ):
                    slot_c[mj, r] = T.float32(0)
                    if 0 <= n and n < N:
                        slot_c[mj, r] = C_t[n, T.min(lane + 32 * mj, M - 1)]

        for it in T.serial((B * H - block + grid - 1) // grid):  # this block's (b, h): block + it grid
            item = block + it * grid
            b = item // H
            h = item % H
            # thread row r is state row n = 2 (warp + WARPS (r // 2)) - 1 + r % 2 (rotation pairs (2 s - 1, 2 s);
            # row 0 and the Nyquist row N - 1 of an even N pair with an absent row -1 or N, whose constants are 0)
            # ---- 1. S (rows x columns of this thread) from the stage; the next item's state to the stage ------
            for e, u in T.grid(EK, VK):  # zero past K, V
                new_x[e * VK + u] = T.if_then_else(VK * (lane + 32 * e) < K, T.Cast(acc, token_x[e * VK + u]), 0.0)
                for g in T.unroll(G):
                    q_x[g, e * VK + u] = T.if_then_else(
                        VK * (lane + 32 * e) < K, T.Cast(acc, token_q[g, e * VK + u]), 0.0)
            for e, u in T.grid(EV, VV):
                new_y[e * VV + u] = T.if_then_else(VV * (lane + 32 * e) < V, T.Cast(acc, token_y[e * VV + u]), 0.0)
            T.ptx["cp.async.wait_all"]()
            T.cuda.cta_sync()
            for r in T.unroll(ROWS):
                n = state_row(warp, r)
                for e in T.unroll(EK):
                    for u in T.unroll(VK):
                        xs[r, e * VK + u] = T.float32(0)
                    if 0 <= n and n < N and VK * (lane + 32 * e) < K:
                        xs[r, columns(e * VK, VK)] = T.Cast(
                            f"{acc}x{VK}" if VK > 1 else acc, stage[columns(n * K + VK * (lane + 32 * e), VK)])
                for e in T.unroll(EV):
                    for u in T.unroll(VV):
                        ys[r, e * VV + u] = T.float32(0)
                    if 0 <= n and n < N and VV * (lane + 32 * e) < V:
                        ys[r, columns(e * VV, VV)] = T.Cast(
                            f"{acc}x{VV}" if VV > 1 else acc, stage[columns(N * K + n * V + VV * (lane + 32 * e), VV)])
            seen_b[0] = stage_seen[0]
            T.cuda.cta_sync()
            if item + grid < B * H:
                fetch(stage, stage_seen, key_flat, value_flat, seen, item + grid, H, warp * 32 + lane)
                load_token(token_x, token_y, token_q, q, k, v, item + grid, H, lane)
            # rotate; partial removal over this warp's rows
            for j in T.unroll(SPW):  # rows a = 2 j, c = 2 j + 1 of the thread: a' = d_a a + o_a c, c' = d_c c + o_c a
                d_a = row_consts[0, state_row(warp, 2 * j) + 1]
                o_a = row_consts[1, state_row(warp, 2 * j) + 1]
                d_c = row_consts[0, state_row(warp, 2 * j + 1) + 1]
                o_c = row_consts[1, state_row(warp, 2 * j + 1) + 1]
                for c in T.unroll(EK * VK):
                    a = xs[2 * j, c]
                    xs[2 * j, c] = d_a * a + o_a * xs[2 * j + 1, c]
                    xs[2 * j + 1, c] = d_c * xs[2 * j + 1, c] + o_c * a
                for c in T.unroll(EV * VV):
                    a = ys[2 * j, c]
                    ys[2 * j, c] = d_a * a + o_a * ys[2 * j + 1, c]
                    ys[2 * j + 1, c] = d_c * ys[2 * j + 1, c] + o_c * a
            for e, u in T.grid(EK, VK):
                red[0] = T.float32(0)
                for r in T.unroll(ROWS):
                    red[0] = red[0] + row_consts[3, state_row(warp, r) + 1] * xs[r, e * VK + u]
                if VK * (lane + 32 * e) < K:
                    removal_part[warp, T.min(VK * (lane + 32 * e) + u, K - 1)] = red[0]
            for e, u in T.grid(EV, VV):
                red[0] = T.float32(0)
                for r in T.unroll(ROWS):
                    red[0] = red[0] + row_consts[3, state_row(warp, r) + 1] * ys[r, e * VV + u]
                if VV * (lane + 32 * e) < V:
                    removal_part[warp, K + T.min(VV * (lane + 32 * e) + u, V - 1)] = red[0]
            T.cuda.cta_sync()

            # ---- 2. S' = R S + b (new - removal), stored; z = X' q; partial scores over this warp's rows -------
            for e, u in T.grid(EK, VK):
                col = T.min(VK * (lane + 32 * e) + u, K - 1)
                for w in T.unroll(WARPS):
                    new_x[e * VK + u] = new_x[e * VK + u] - removal_part[w, col]
            for e, u in T.grid(EV, VV):
                col = T.min(VV * (lane + 32 * e) + u, V - 1)
                for w in T.unroll(WARPS):
                    new_y[e * VV + u] = new_y[e * VV + u] - removal_part[w, K + col]
            for r in T.unroll(ROWS):
                n = state_row(warp, r)
                for c in T.unroll(EK * VK):
                    xs[r, c] = T.Cast(acc, T.Cast(sdt, xs[r, c] + row_consts[2, state_row(warp, r) + 1] * new_x[c]))
                for c in T.unroll(EV * VV):
                    ys[r, c] = T.Cast(acc, T.Cast(sdt, ys[r, c] + row_consts[2, state_row(warp, r) + 1] * new_y[c]))
                for e in T.unroll(EK):
                    if 0 <= n and n < N and VK * (lane + 32 * e) < K:
                        key_out[b, h, n, columns(VK * (lane + 32 * e), VK)] = T.Cast(
                            f"{sdt}x{VK}" if VK > 1 else sdt, xs[r, columns(e * VK, VK)])
                for e in T.unroll(EV):
                    if 0 <= n and n < N and VV * (lane + 32 * e) < V:
                        value_out[b, h, n, columns(VV * (lane + 32 * e), VV)] = T.Cast(
                            f"{sdt}x{VV}" if VV > 1 else sdt, ys[r, columns(e * VV, VV)])
            for g in T.unroll(G):
                for r in T.unroll(RP):
                    part[r] = T.float32(0)
                    if r < ROWS:
                        for c in T.unroll(EK * VK):
                            part[r] = part[r] + q_x[g, c] * xs[T.min(r, ROWS - 1), c]
                sum_rows_over_lanes(part, z, g, lane)
                for mj in T.unroll(MJ):
                    red[0] = T.float32(0)
                    for r in T.unroll(ROWS):
                        red[0] = red[0] + slot_readout(slot_c, readout, mj, r, warp, lane) * z[g, r]
                    if lane + 32 * mj < M:
                        score_part[warp, g, T.min(lane + 32 * mj, M - 1)] = red[0]
            T.cuda.cta_sync()

            # ---- 3. every warp: softmax over the slots; w = p C on its rows; partial o over its rows -------------
            for g in T.unroll(G):
                red[0] = NEG
                for mj in T.unroll(MJ):
                    i_slot = lane + 32 * mj
                    probs[g, mj] = NEG
                    if i_slot < M and T.Cast("int64", i_slot) * W <= T.min(seen_b[0], T.int64(W)) * M:
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
                for r in T.unroll(RP):
                    part[r] = T.float32(0)
                    if r < ROWS:
                        for mj in T.unroll(MJ):
                            part[r] = part[r] + probs[g, mj] * slot_readout(slot_c, readout, mj, T.min(r, ROWS - 1),
                                                                            warp, lane)  # fmt: skip
                sum_rows_over_lanes(part, z, g, lane)  # now w_g by row
                for e, u in T.grid(EV, VV):
                    red[0] = T.float32(0)
                    for r in T.unroll(ROWS):
                        red[0] = red[0] + z[g, r] * ys[r, e * VV + u]
                    if VV * (lane + 32 * e) < V:
                        out_part[warp, g, T.min(VV * (lane + 32 * e) + u, V - 1)] = red[0]
            T.cuda.cta_sync()

            # ---- 4. o = sum of the warps' partials / sum(p) -------------------------------------------------------
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
