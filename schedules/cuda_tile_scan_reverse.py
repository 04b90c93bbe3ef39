"""The CUDA backward's reverse state scan as a tile program, with the gradients of k and v (stands in for
``compute.scan``'s reverse scan and ``compute.backward.input_gradient`` of k and v).

G_c = D_c + (A^L)^T G_{c+1}, the second term dropped where chunk c ends its sequence (c is the row's last chunk,
or chunk c + 1 starts another: starts[b, c + 1] >= 0); D_c = sum over the G query heads of key/value head h of
grads[b, c, hq, n, f] (the gradient of chunk c's outputs with respect to its start state, rows in bla-math.md's
basis order). Outputs: d[k | v] of chunk c's tokens t = c L + j = sum over the query heads of
local_k | local_v [b, t, hq] + (that same carry) state_in^T G_{c+1}, in the input dtype; and, of the G_c, only
those the op returns: initial_grads[s] = G_c where chunk c starts sequence s (starts[b, c] = s; the packed
layout's spare chunks after the last sequence also start sequence 0, and the true start, chunk 0, is written
last). grads, local_k and local_v are float16 times s, as the tile backward writes them (``cuda_tile_backward``;
``ops.tile_grads`` converts the TE chunk_backward's). local_k and local_v may be dk and dv themselves (G = 1):
each thread reads an element a chunk before it writes it.

Like the forward's tile scan (``cuda_tile_scan``): one block of NP / 16 warps per (b, h, 16 columns of F), warp w
owns rows 16 w .. 16 w + 15 of G in float32 registers from chunk to chunk, and the product runs on mma.sync with
(A^L)^T = T_hi + T_lo and G = G_hi + G_lo split into float16 parts (T_hi G_hi + T_lo G_hi + T_hi G_lo, ~1e-6
relative). Per chunk, from the last to the first:

  1. D_c (loaded one chunk ahead) + the product with G_{c+1} (from the other shared stage) -> G_c
  2. the chunk's local d[k | v] (loaded one chunk ahead) + state_in^T G_{c+1} (the same B operands; warp w takes
     rows 16 w, 16 (w + NP / 16), ... of the chunk) -> dk, dv
  3. G_c -> initial_grads where chunk c starts a sequence, and as hi + lo -> this chunk's shared stage; one barrier

G is carried as s G with s the backward's gradient scale (a power of two that brings max |dO| into [1, 2),
``ops.gradient_scale``), so its float16 parts keep their precision whatever the loss's scale; the outputs are
divided by s, exactly.
"""

from __future__ import annotations

from tvm.script import tirx as T
from tvm.script.tirx import tile as Tx

from bla_tvm.layer import KernelSpec
from bla_tvm.tile_constants import padded_resolution, tile_scan_serves

from .cuda_tile_forward import accumulator_layout, operand_a_layout, operand_b_layout
from .cuda_tile_loads import half_value
from .cuda_tile_scan import COLUMN_BLOCK


def state_scan_reverse_tile(spec: KernelSpec):
    """The PrimFunc ``bla_state_scan_reverse_tile``: initial_grads [S, H, N, F] (float32), dk [B, T, H, K] and
    dv [B, T, H, V] from grads [B, NC, HQ, N, F], local_k [B, TL, HQ, K], local_v [B, TL, HQ, V] (float16; rows
    t >= TL read as zero; see the module docstring), the float16 tables
    decay_t_hi, decay_t_lo [NP, NP] ((A^L)^T split) and state_in_t_hi, state_in_t_lo [L, NP] (state_in^T split;
    ``tile_constants.reverse_scan_tables``), starts [B, NC] int32 and gradient_scale [1] (float32, a power of two
    s: G is carried as s G, so that its float16 parts keep their precision; the outputs are divided by s)."""
    if not tile_scan_serves(spec):
        raise ValueError(f"the tile reverse scan does not serve {spec}")
    L, K, V, N, G = spec.chunk_size, spec.head_k, spec.head_v, spec.resolution, spec.group_size
    F = K + V
    NP = padded_resolution(N)
    FB = COLUMN_BLOCK
    WARPS = NP // 16
    h16 = "float16"
    X_STRIDE = NP + 8
    LO_AT = FB * X_STRIDE
    STAGE = 2 * FB * X_STRIDE  # G^T hi, G^T lo; two stages alternate from chunk to chunk
    ROW_TILES = -(-(L // 16) // WARPS)  # 16-row tiles of the chunk's d[k | v] per warp
    dt = spec.dtype

    @T.macro
    def fetch_state_rows(d_ahead, grads_w, b, chunk, h, fb, warp, g, tq):
        """d_ahead[head, nt, rM] = the 32-bit word (columns fb FB + 8 nt + 2 tq + 0, 1) of D_chunk's row
        p = 16 warp + g + 8 rM (clamped to N - 1) of query head h G + head, from grads_w [B, NC, HQ, N, F / 2]."""
        for head, nt, rM in T.grid(G, FB // 8, 2):
            d_ahead[head, nt, rM] = grads_w[
                b, chunk, h * G + head, T.min(warp * 16 + g + 8 * rM, N - 1), fb * FB // 2 + nt * 4 + tq]

    @T.macro
    def fetch_local_rows(local_ahead, i, local_k_w, local_v_w, b, t0, h, fb, g, tq):
        """local_ahead[head, i, nt, rM] = the 32-bit word (columns fb FB + 8 nt + 2 tq + 0, 1 of [k | v]) of the
        local d[k | v] of token t0 + g + 8 rM (clamped to TL - 1), query head h G + head."""
        TL = local_k_w.shape[1]
        for head, nt, rM in T.grid(G, FB // 8, 2):
            t = T.min(t0 + g + 8 * rM, TL - 1)
            local_ahead[head, i, nt, rM] = T.if_then_else(
                fb * FB < K, local_k_w[b, t, h * G + head, fb * FB // 2 + nt * 4 + tq],
                local_v_w[b, t, h * G + head, T.max(fb * FB - K, 0) // 2 + nt * 4 + tq])  # fmt: skip

    def head_sum(words, index, rN):
        """The float32 sum over the query heads of element rN of the float16 pairs words[head, *index]."""
        total = half_value(words[(0, *index)], rN)
        for head in range(1, G):
            total = total + half_value(words[(head, *index)], rN)
        return total

    @T.prim_func
    def state_scan_reverse(
        grads_h: T.handle, local_k_h: T.handle, local_v_h: T.handle, decay_t_hi_h: T.handle, decay_t_lo_h: T.handle,
        state_in_t_hi_h: T.handle, state_in_t_lo_h: T.handle, starts_h: T.handle, gradient_scale_h: T.handle,
        initial_grads_h: T.handle, dk_h: T.handle, dv_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_state_scan_reverse_tile"})
        B = T.int32()
        TT = T.int32()
        H = T.int32()
        NC = T.int32()
        S = T.int32()
        TL = T.int32()
        grads = T.match_buffer(grads_h, (B, NC, H * G, N, F), h16)
        local_k = T.match_buffer(local_k_h, (B, TL, H * G, K), h16)
        local_v = T.match_buffer(local_v_h, (B, TL, H * G, V), h16)
        decay_t_hi = T.match_buffer(decay_t_hi_h, (NP, NP), h16)
        decay_t_lo = T.match_buffer(decay_t_lo_h, (NP, NP), h16)
        state_in_t_hi = T.match_buffer(state_in_t_hi_h, (L, NP), h16)
        state_in_t_lo = T.match_buffer(state_in_t_lo_h, (L, NP), h16)
        starts = T.match_buffer(starts_h, (B, NC), "int32")
        gradient_scale = T.match_buffer(gradient_scale_h, (1,), "float32")
        initial_grads = T.match_buffer(initial_grads_h, (S, H, N, F), "float32")
        dk = T.match_buffer(dk_h, (B, TT, H, K), dt)
        dv = T.match_buffer(dv_h, (B, TT, H, V), dt)

        T.device_entry()
        block = T.cta_id([B * H * (F // FB)])
        warp = T.warp_id([WARPS])
        lane = T.lane_id([32])

        pool = T.alloc_buffer((2 * STAGE,), h16, scope="shared.dyn")
        pool_w = pool.view("uint32")
        decay_t_hi_w = decay_t_hi.view("uint32")
        decay_t_lo_w = decay_t_lo.view("uint32")
        state_in_t_hi_w = state_in_t_hi.view("uint32")
        state_in_t_lo_w = state_in_t_lo.view("uint32")
        grads_w = grads.view("uint32")
        local_k_w = local_k.view("uint32")
        local_v_w = local_v.view("uint32")

        fb = block % (F // FB)
        h = block // (F // FB) % H
        b = block // (F // FB * H)
        g = lane // 4
        tq = lane % 4

        # this warp's rows of (A^L)^T, in registers for the whole scan
        a_hi = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        a_lo = T.alloc_buffer((16, NP), h16, scope="local", layout=operand_a_layout(NP))
        a_hi_w = a_hi.local(NP // 16 * 8).view("uint32")
        a_lo_w = a_lo.local(NP // 16 * 8).view("uint32")
        for kt, kHi, rM in T.grid(NP // 16, 2, 2):
            a_hi_w[kt * 4 + kHi * 2 + rM] = decay_t_hi_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
            a_lo_w[kt * 4 + kHi * 2 + rM] = decay_t_lo_w[warp * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
        a_slice = T.alloc_buffer((16, 16), h16, scope="local", layout=operand_a_layout(16))
        a_slice_w = a_slice.local(8).view("uint32")
        b_tile = T.alloc_buffer((16, FB), h16, scope="local", layout=operand_b_layout(16, FB))
        b_tile_w = b_tile.local(FB // 8 * 4).view("uint32")
        hh = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # D + T_hi G_hi
        lo = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))  # T_lo G_hi + T_hi G_lo
        hh_r, lo_r = hh.local(FB // 8, 2, 2), lo.local(FB // 8, 2, 2)
        # D_{c - 1} and the local d[k | v] of chunk c - 1 of this thread's accumulator elements, loaded a chunk
        # ahead as they are stored (float16 pairs) and converted when used, so that no load is waited for early
        d_ahead = T.alloc_buffer((G, FB // 8, 2), "uint32", scope="local")
        local_ahead = T.alloc_buffer((G, ROW_TILES, FB // 8, 2), "uint32", scope="local")
        dkv = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        dkv_lo = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        dkv_r, dkv_lo_r = dkv.local(FB // 8, 2, 2), dkv_lo.local(FB // 8, 2, 2)
        next_start = T.alloc_buffer((1,), "int32", scope="local")  # starts[b, c + 1], read a chunk ahead

        fetch_state_rows(d_ahead, grads_w, b, NC - 1, h, fb, warp, g, tq)
        for i in T.unroll(ROW_TILES):  # a warp's last row tiles may pass the chunk: clamped, never written out
            fetch_local_rows(local_ahead, i, local_k_w, local_v_w, b,
                             (NC - 1) * L + T.min((warp + i * WARPS) * 16, L - 16), h, fb, g, tq)  # fmt: skip
        inverse_scale = T.alloc_buffer((1,), "float32", scope="local")  # 1 / s, exact (s is a power of two)
        inverse_scale[0] = T.float32(1) / gradient_scale[0]
        next_start[0] = 0  # the last chunk takes nothing from after it
        for step in T.serial(NC):
            c = NC - 1 - step
            stage = c % 2 * STAGE
            other = (c + 1) % 2 * STAGE
            carry = step > 0 and next_start[0] < 0
            next_start[0] = starts[b, c]
            # 1. G_c = D_c + (A^L)^T G_{c+1}
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                hh_r[nt, rM, rN] = T.Select(warp * 16 + g + 8 * rM < N, head_sum(d_ahead, (nt, rM), rN), T.float32(0))
                lo_r[nt, rM, rN] = T.float32(0)
            fetch_state_rows(d_ahead, grads_w, b, T.max(c - 1, 0), h, fb, warp, g, tq)
            if carry:
                for kt in T.unroll(NP // 16):
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_tile_w[nt * 2 + kHi] = pool_w[(other + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                    for word in T.unroll(4):
                        a_slice_w[word] = a_hi_w[kt * 4 + word]
                    Tx.warp.gemm(hh, a_slice, b_tile, hh, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                    for word in T.unroll(4):
                        a_slice_w[word] = a_lo_w[kt * 4 + word]
                    Tx.warp.gemm(lo, a_slice, b_tile, lo, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
                    for nt, kHi in T.grid(FB // 8, 2):
                        b_tile_w[nt * 2 + kHi] = pool_w[
                            (other + LO_AT + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                    for word in T.unroll(4):
                        a_slice_w[word] = a_hi_w[kt * 4 + word]
                    Tx.warp.gemm(lo, a_slice, b_tile, lo, transpose_A=False, transpose_B=False, alpha=1.0, beta=1.0)
            # 2. d[k | v] of the chunk's rows = local + state_in^T G_{c+1}
            for i in T.serial(ROW_TILES):
                rt = warp + i * WARPS
                if rt < L // 16:
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        dkv_r[nt, rM, rN] = T.Select(c * L + rt * 16 + g + 8 * rM < TL,
                                                     head_sum(local_ahead, (i, nt, rM), rN), T.float32(0))  # fmt: skip
                        dkv_lo_r[nt, rM, rN] = T.float32(0)
                    fetch_local_rows(local_ahead, i, local_k_w, local_v_w, b, T.max(c - 1, 0) * L + rt * 16, h, fb, g,
                                     tq)  # fmt: skip
                    if carry:
                        for kt in T.unroll(NP // 16):
                            for nt, kHi in T.grid(FB // 8, 2):
                                b_tile_w[nt * 2 + kHi] = pool_w[
                                    (other + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                            for kHi, rM in T.grid(2, 2):
                                a_slice_w[kHi * 2 + rM] = state_in_t_hi_w[rt * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                            Tx.warp.gemm(dkv, a_slice, b_tile, dkv, transpose_A=False, transpose_B=False, alpha=1.0,
                                         beta=1.0)  # fmt: skip
                            for kHi, rM in T.grid(2, 2):
                                a_slice_w[kHi * 2 + rM] = state_in_t_lo_w[rt * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                            Tx.warp.gemm(dkv_lo, a_slice, b_tile, dkv_lo, transpose_A=False, transpose_B=False,
                                         alpha=1.0, beta=1.0)  # fmt: skip
                            for nt, kHi in T.grid(FB // 8, 2):
                                b_tile_w[nt * 2 + kHi] = pool_w[
                                    (other + LO_AT + (nt * 8 + g) * X_STRIDE) // 2 + kt * 8 + kHi * 4 + tq]
                            for kHi, rM in T.grid(2, 2):
                                a_slice_w[kHi * 2 + rM] = state_in_t_hi_w[rt * 16 + g + 8 * rM, kt * 8 + kHi * 4 + tq]
                            Tx.warp.gemm(dkv_lo, a_slice, b_tile, dkv_lo, transpose_A=False, transpose_B=False,
                                         alpha=1.0, beta=1.0)  # fmt: skip
                    for nt, rM, rN in T.grid(FB // 8, 2, 2):
                        t = c * L + rt * 16 + g + 8 * rM
                        f = fb * FB + nt * 8 + 2 * tq + rN
                        x = T.Cast(dt, (dkv_r[nt, rM, rN] + dkv_lo_r[nt, rM, rN]) * inverse_scale[0])
                        if t < TT:
                            if fb * FB < K:
                                dk[b, t, h, T.min(f, K - 1)] = x
                            else:
                                dv[b, t, h, T.max(f - K, 0)] = x
            # 3. G_c -> the output where chunk c starts a sequence, and as hi + lo -> this chunk's stage
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                p = warp * 16 + g + 8 * rM
                f = fb * FB + nt * 8 + 2 * tq + rN
                x = hh_r[nt, rM, rN] + lo_r[nt, rM, rN]
                if p < N and next_start[0] >= 0:
                    initial_grads[T.max(next_start[0], 0), h, T.min(p, N - 1), f] = x * inverse_scale[0]
                hi = T.Cast(h16, x)
                pool[stage + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = hi
                pool[stage + LO_AT + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = T.Cast(h16, x - T.Cast("float32", hi))
            T.cuda.cta_sync()  # the stage is complete; the other one was read before this barrier

    return state_scan_reverse
