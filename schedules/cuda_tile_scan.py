"""The CUDA forward's chunk-to-chunk state scan, fused with the chunk-local contributions, as a tile program.

bla-math.md's decomposition, kernels 1 and 2 in one: X_{c+1} = A^L X_c + state_in [k_c | v_c], sequential over
the chunks c of a row, parallel over (b, h) and column blocks of F = K + V. One block of NP / 16 warps per
(b, h, column block); warp w owns state rows 16 w .. 16 w + 15 and keeps them in float32 registers from chunk
to chunk. Per chunk:

  1. [k | v] of the chunk -> shared memory (float16, transposed); X_c -> states (the kernel's output: float32,
     or its float16 hi part where the tile forward and backward read them, ``tile_states_half``), and where
     chunk c is the last of sequence s (ends[b, c] = s >= 0) -> end_states[s] (float32, the final state's input);
     X_c split into float16 hi + lo parts -> shared memory (the next product's B operand)
  2. X_{c+1} = A_hi X_hi + A_hi X_lo + A_lo X_hi + (S_hi + S_lo) [k | v]   (mma.sync, fp32 accumulation; not
     after the last chunk, whose end no kernel reads)

with A^L = A_hi + A_lo and state_in = S_hi + S_lo split into float16 parts: the recurrence keeps ~1e-6 relative
precision (the dropped A_lo X_lo term is ~2^-22 of A X) while every product runs on the tensor cores; 16-bit
[k | v] is exact in float16 within its range. A chunk that starts a sequence (starts[b, c] = s >= 0) takes X_c = initial[s] instead.
Rows are in bla-math.md's basis order, N padded to NP (zero rows and columns).
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.script.tirx import tile as Tx

from bla_tvm.layer import KernelSpec
from bla_tvm.tile_constants import TILE_CHUNK, padded_resolution, tile_scan_serves, tile_states_half

from .cuda_tile_forward import accumulator_layout, operand_a_layout, operand_b_layout


#: columns of the state one block scans: the scan is a chain of NC dependent steps, so the more (narrower)
#: blocks run at once, the better its latency is hidden (16: 4 blocks per SM at B H = 64, K = V = 64)
COLUMN_BLOCK = 16


def state_scan_tile(spec: KernelSpec):
    """The PrimFunc ``bla_state_scan_tile``: states [B, NC, H, N, F] (X | Y before each chunk; float16 where
    ``tile_states_half``, else float32) and end_states [S, H, N, F] (float32, X | Y before each sequence's last
    chunk) from k [B, T, H, K], v [B, T, H, V], initial [S, H, N, F] (float32), starts and ends [B, NC] int32
    (``layout.ChunkLayout``) and the float16 tables state_in_hi, state_in_lo [NP, L] and decay_hi, decay_lo
    [NP, NP] (``tile_constants.scan_tables``)."""
    if not tile_scan_serves(spec):
        raise ValueError(f"the tile scan does not serve {spec}")
    L, K, V, N = spec.chunk_size, spec.head_k, spec.head_v, spec.resolution
    F = K + V
    NP = padded_resolution(N)
    FB = COLUMN_BLOCK
    WARPS = NP // 16
    THREADS = 32 * WARPS
    PAIRS_LOADED = L * FB // 2 // THREADS  # pairs of adjacent [k | v] columns each thread loads per chunk
    dt, h16 = spec.dtype, "float16"
    states_dt = h16 if tile_states_half(spec) else "float32"
    X_STRIDE, KV_STRIDE = NP + 8, L + 8
    # one stage of shared memory: X^T hi, X^T lo, [k | v]^T; two stages alternate from chunk to chunk
    XLO_AT = FB * X_STRIDE
    KV_AT = 2 * FB * X_STRIDE
    STAGE = KV_AT + FB * KV_STRIDE

    @T.prim_func
    def state_scan(
        k_h: T.handle, v_h: T.handle, state_in_hi_h: T.handle, state_in_lo_h: T.handle, decay_hi_h: T.handle,
        decay_lo_h: T.handle, initial_h: T.handle, starts_h: T.handle, ends_h: T.handle, states_h: T.handle,
        end_states_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_state_scan_tile"})
        B = T.int32()
        TT = T.int32()
        H = T.int32()
        S = T.int32()
        NC = T.int32()
        k = T.match_buffer(k_h, (B, TT, H, K), dt)
        v = T.match_buffer(v_h, (B, TT, H, V), dt)
        state_in_hi = T.match_buffer(state_in_hi_h, (NP, L), h16)
        state_in_lo = T.match_buffer(state_in_lo_h, (NP, L), h16)
        decay_hi = T.match_buffer(decay_hi_h, (NP, NP), h16)
        decay_lo = T.match_buffer(decay_lo_h, (NP, NP), h16)
        initial = T.match_buffer(initial_h, (S, H, N, F), "float32")
        starts = T.match_buffer(starts_h, (B, NC), "int32")
        ends = T.match_buffer(ends_h, (B, NC), "int32")
        states = T.match_buffer(states_h, (B, NC, H, N, F), states_dt)
        end_states = T.match_buffer(end_states_h, (S, H, N, F), "float32")

        T.device_entry()
        block = T.cta_id([B * H * (F // FB)])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])

        pool = T.alloc_buffer((2 * STAGE,), h16, scope="shared.dyn")
        pool_w = pool.view("uint32")
        state_in_hi_w = state_in_hi.view("uint32")
        state_in_lo_w = state_in_lo.view("uint32")
        decay_hi_w = decay_hi.view("uint32")
        decay_lo_w = decay_lo.view("uint32")
        k_w = k.view("uint32")
        v_w = v.view("uint32")

        fb = block % (F // FB)
        h = block // (F // FB) % H
        b = block // (F // FB * H)
        tid = warp * 32 + lane
        g = lane // 4
        tq = lane % 4

        # this warp's rows of the constant left operands, in registers for the whole scan
        a_hi = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        a_lo = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        a_in_hi = T.alloc_buffer((16, L), h16, scope="local", layout=operand_a_layout(L))
        a_in_lo = T.alloc_buffer((16, L), h16, scope="local", layout=operand_a_layout(L))
        a_hi_w = a_hi.local(NP // 16 * 8).view("uint32")
        a_lo_w = a_lo.local(NP // 16 * 8).view("uint32")
        a_in_hi_w = a_in_hi.local(L // 16 * 8).view("uint32")
        a_in_lo_w = a_in_lo.local(L // 16 * 8).view("uint32")
        for kt, kHi, rM in T.grid(NP // 16, 2, 2):
            a_hi_w[kt * 4 + kHi * 2 + rM] = decay_hi_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
            a_lo_w[kt * 4 + kHi * 2 + rM] = decay_lo_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
        for kt, kHi, rM in T.grid(L // 16, 2, 2):
            a_in_hi_w[kt * 4 + kHi * 2 + rM] = state_in_hi_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
            a_in_lo_w[kt * 4 + kHi * 2 + rM] = state_in_lo_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
        a_slice = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        a_slice_w = a_slice.local(8).view("uint32")
        b_tile = T.alloc_buffer((16, FB), h16, scope="local", layout=operand_b_layout(16, FB))
        b_tile_w = b_tile.local(FB // 8 * 4).view("uint32")
        # X_{c+1} = sum of four independent products, each its own accumulator (mma chains of NP / 16 or L / 16,
        # 2 NP / 16 for the two small correction terms together)
        x = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        x_r = x.local(FB // 8, 2, 2)
        hh = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # A_hi X_hi
        lo = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # A_lo X_hi + A_hi X_lo
        in_hi = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # S_hi [k|v]
        in_lo = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # S_lo [k|v]
        hh_r, lo_r = hh.local(FB // 8, 2, 2), lo.local(FB // 8, 2, 2)
        in_hi_r, in_lo_r = in_hi.local(FB // 8, 2, 2), in_lo.local(FB // 8, 2, 2)
        for nt, rM, rN in T.grid(FB // 8, 2, 2):
            x_r[nt, rM, rN] = T.float32(0)

        # a chunk's [k | v] columns, two adjacent ones per 32-bit word, loaded one chunk ahead in the input dtype
        # (converted to float16 only when stored, so no step waits on its own loads)
        ahead = T.alloc_buffer((PAIRS_LOADED,), "uint32", scope="local")
        ahead_x = ahead.view(dt)
        for it in T.unroll(PAIRS_LOADED):
            j = (it * THREADS + tid) // (FB // 2)
            f = fb * FB + (it * THREADS + tid) % (FB // 2) * 2
            if fb * FB < K:
                ahead[it] = k_w[b, T.min(j, TT - 1), h, T.min(f, K - 2) // 2]
            else:
                ahead[it] = v_w[b, T.min(j, TT - 1), h, T.max(f - K, 0) // 2]
        start_next = T.alloc_buffer((1,), "int32", scope="local")
        start_next[0] = starts[b, 0]
        end_next = T.alloc_buffer((1,), "int32", scope="local")
        end_next[0] = ends[b, 0]

        for c in T.serial(NC):
            stage = c % 2 * STAGE
            start = start_next[0]
            start_next[0] = starts[b, T.min(c + 1, NC - 1)]
            end = end_next[0]
            end_next[0] = ends[b, T.min(c + 1, NC - 1)]
            # 1. the chunk's [k | v] columns (zero past the sequence's end) -> shared; the next chunk's loads issue
            for it in T.unroll(PAIRS_LOADED):
                j = (it * THREADS + tid) // (FB // 2)
                pair = (it * THREADS + tid) % (FB // 2)
                valid = c * L + j < TT
                pool[stage + KV_AT + (2 * pair) * KV_STRIDE + j] = T.if_then_else(
                    valid, T.Cast(h16, ahead_x[2 * it]), T.float16(0))
                pool[stage + KV_AT + (2 * pair + 1) * KV_STRIDE + j] = T.if_then_else(
                    valid, T.Cast(h16, ahead_x[2 * it + 1]), T.float16(0))
            for it in T.unroll(PAIRS_LOADED):
                j = (c + 1) * L + (it * THREADS + tid) // (FB // 2)
                f = fb * FB + (it * THREADS + tid) % (FB // 2) * 2
                if fb * FB < K:
                    ahead[it] = k_w[b, T.min(j, TT - 1), h, T.min(f, K - 2) // 2]
                else:
                    ahead[it] = v_w[b, T.min(j, TT - 1), h, T.max(f - K, 0) // 2]
            # X_c (from the sequence's initial state where chunk c starts one) -> states (and end_states where
            # chunk c ends a sequence), and as hi + lo -> shared
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                p = warp * 16 + g + 8 * rM
                f = fb * FB + nt * 8 + 2 * tq + rN
                if start >= 0:
                    x_r[nt, rM, rN] = T.if_then_else(p < N, initial[T.max(start, 0), h, T.min(p, N - 1), f],
                                                     T.float32(0))  # fmt: skip
                hi = T.Cast(h16, x_r[nt, rM, rN])
                if p < N:
                    states[b, c, h, p, f] = T.Cast(states_dt, x_r[nt, rM, rN])
                    if end >= 0:
                        end_states[T.max(end, 0), h, p, f] = x_r[nt, rM, rN]
                pool[stage + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = hi
                pool[stage + XLO_AT + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = T.Cast(
                    h16, x_r[nt, rM, rN] - T.Cast("float32", hi))
            T.cuda.cta_sync()  # the stage is complete; the other stage is free (read before this barrier)
            if c + 1 < NC:  # X_NC is no chunk's start: the last chunk's product would go unread
                # 2. X_{c+1} = A_hi X_hi + A_lo X_hi + A_hi X_lo + S_hi [k | v] + S_lo [k | v]
                for nt, rM, rN in T.grid(FB // 8, 2, 2):
                    hh_r[nt, rM, rN] = T.float32(0)
                    lo_r[nt, rM, rN] = T.float32(0)
                    in_hi_r[nt, rM, rN] = T.float32(0)
                    in_lo_r[nt, rM, rN] = T.float32(0)
                for kt in T.unroll(NP // 16):
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_tile_w[nt * 2 + kHi] = pool_w[(stage + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                    for word in T.unroll(4):
                        a_slice_w[word] = a_hi_w[kt * 4 + word]
                    Tx.warp.gemm(hh, a_slice, b_tile, hh, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                    for word in T.unroll(4):
                        a_slice_w[word] = a_lo_w[kt * 4 + word]
                    Tx.warp.gemm(lo, a_slice, b_tile, lo, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_tile_w[nt * 2 + kHi] = pool_w[
                            (stage + XLO_AT + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                    for word in T.unroll(4):
                        a_slice_w[word] = a_hi_w[kt * 4 + word]
                    Tx.warp.gemm(lo, a_slice, b_tile, lo, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                for kt in T.unroll(L // 16):
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_tile_w[nt * 2 + kHi] = pool_w[
                            (stage + KV_AT + (nt * 8 + g) * KV_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                    for word in T.unroll(4):
                        a_slice_w[word] = a_in_hi_w[kt * 4 + word]
                    Tx.warp.gemm(in_hi, a_slice, b_tile, in_hi, transpose_A=False, transpose_B=False, alpha=1.0,
                                 beta=1.0)
                    for word in T.unroll(4):
                        a_slice_w[word] = a_in_lo_w[kt * 4 + word]
                    Tx.warp.gemm(in_lo, a_slice, b_tile, in_lo, transpose_A=False, transpose_B=False, alpha=1.0,
                                 beta=1.0)
                for nt, rM, rN in T.grid(FB // 8, 2, 2):
                    x_r[nt, rM, rN] = (hh_r[nt, rM, rN] + lo_r[nt, rM, rN]) + (
                        in_hi_r[nt, rM, rN] + in_lo_r[nt, rM, rN])

    return state_scan
