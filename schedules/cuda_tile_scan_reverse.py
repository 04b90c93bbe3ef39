"""The CUDA backward's reverse state scan as a tile program, with the gradients of k and v (stands in for
``compute.scan``'s reverse scan and ``compute.backward.input_gradient`` of k and v).

G_c = D_c + (A^L)^T G_{c+1}, the second term dropped where chunk c ends its sequence (c is the row's last chunk,
or chunk c + 1 starts another: starts[b, c + 1] >= 0); D_c = sum over the G query heads of key/value head h of
grads[b, c, hq, L + n, f] (the gradient of chunk c's outputs with respect to its start state, rows in
bla-math.md's basis order). Outputs: d[k | v] of chunk c's tokens = sum over the query heads of
grads[b, c, hq, j, :F] + (that same carry) state_in^T G_{c+1}, in the input dtype; and, of the G_c, only those
the op returns: initial_grads[s] = G_c where chunk c starts sequence s (starts[b, c] = s; the packed layout's
spare chunks after the last sequence also start sequence 0, and the true start, chunk 0, is written last).
grads are the tile backward's (float16, times s: ``cuda_tile_backward``) where it serves the layer, else the TE
chunk_backward's (float32, with dq columns after F, which are not read).

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
from bla_tvm.tile_constants import padded_resolution, tile_backward_serves, tile_scan_serves

from .cuda_tile_forward import accumulator_layout, operand_a_layout, operand_b_layout
from .cuda_tile_scan import COLUMN_BLOCK


def state_scan_reverse_tile(spec: KernelSpec):
    """The PrimFunc ``bla_state_scan_reverse_tile``: initial_grads [S, H, N, F] (float32), dk [B, T, H, K] and
    dv [B, T, H, V] from grads [B, NC, HQ, L + N, >= F] (see the module docstring), the float16 tables
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
    # the tile backward's grads are float16 times s already; the TE chunk_backward's are float32, not scaled
    GRADS_SCALED = tile_backward_serves(spec)
    GRADS_DTYPE = "float16" if GRADS_SCALED else "float32"

    @T.prim_func
    def state_scan_reverse(
        grads_h: T.handle, decay_t_hi_h: T.handle, decay_t_lo_h: T.handle, state_in_t_hi_h: T.handle,
        state_in_t_lo_h: T.handle, starts_h: T.handle, gradient_scale_h: T.handle, initial_grads_h: T.handle,
        dk_h: T.handle, dv_h: T.handle,
    ):  # fmt: skip
        T.func_attr({"global_symbol": "bla_state_scan_reverse_tile"})
        B = T.int32()
        TT = T.int32()
        H = T.int32()
        NC = T.int32()
        S = T.int32()
        GC = T.int32()
        grads = T.match_buffer(grads_h, (B, NC, H * G, L + N, GC), GRADS_DTYPE)
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
        # D_c of this thread's accumulator elements, loaded one chunk ahead; likewise the chunk's local d[k | v]
        ahead = T.alloc_buffer((FB // 8, 2, 2), "float32", scope="local")
        local_ahead = T.alloc_buffer((ROW_TILES, FB // 8, 2, 2), "float32", scope="local")
        dkv = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        dkv_lo = T.alloc_buffer((16, FB), "float32", scope="local", layout=accumulator_layout(FB))
        dkv_r, dkv_lo_r = dkv.local(FB // 8, 2, 2), dkv_lo.local(FB // 8, 2, 2)
        next_start = T.alloc_buffer((1,), "int32", scope="local")  # starts[b, c + 1], read a chunk ahead

        for nt, rM, rN in T.grid(FB // 8, 2, 2):
            p = warp * 16 + g + 8 * rM
            ahead[nt, rM, rN] = T.float32(0)
            for head in T.unroll(G):
                ahead[nt, rM, rN] = ahead[nt, rM, rN] + T.if_then_else(
                    p < N,
                    T.Cast("float32", grads[
                        b, NC - 1, h * G + head, L + T.min(p, N - 1), fb * FB + nt * 8 + 2 * tq + rN]),
                    T.float32(0))  # fmt: skip
        for i, nt, rM, rN in T.grid(ROW_TILES, FB // 8, 2, 2):
            local_ahead[i, nt, rM, rN] = T.float32(0)
            for head in T.unroll(G):
                local_ahead[i, nt, rM, rN] = local_ahead[i, nt, rM, rN] + T.Cast("float32", grads[
                    b, NC - 1, h * G + head, T.min((warp + i * WARPS) * 16 + g + 8 * rM, L - 1),
                    fb * FB + nt * 8 + 2 * tq + rN])  # fmt: skip
        factor = T.alloc_buffer((2,), "float32", scope="local")  # grads -> s grads, and 1 / s (s a power of two)
        if GRADS_SCALED:
            factor[0] = T.float32(1)
        else:
            factor[0] = gradient_scale[0]
        factor[1] = T.float32(1) / gradient_scale[0]
        next_start[0] = 0  # the last chunk takes nothing from after it
        for step in T.serial(NC):
            c = NC - 1 - step
            stage = c % 2 * STAGE
            other = (c + 1) % 2 * STAGE
            carry = step > 0 and next_start[0] < 0
            next_start[0] = starts[b, c]
            # 1. G_c = D_c + (A^L)^T G_{c+1}
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                hh_r[nt, rM, rN] = ahead[nt, rM, rN] * factor[0]
                lo_r[nt, rM, rN] = T.float32(0)
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                p = warp * 16 + g + 8 * rM
                ahead[nt, rM, rN] = T.float32(0)
                for head in T.unroll(G):
                    ahead[nt, rM, rN] = ahead[nt, rM, rN] + T.if_then_else(
                        p < N,
                        T.Cast("float32", grads[
                            b, T.max(c - 1, 0), h * G + head, L + T.min(p, N - 1), fb * FB + nt * 8 + 2 * tq + rN]),
                        T.float32(0),
                    )
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
                        dkv_r[nt, rM, rN] = local_ahead[i, nt, rM, rN] * factor[0]
                        dkv_lo_r[nt, rM, rN] = T.float32(0)
                        local_ahead[i, nt, rM, rN] = T.float32(0)
                        for head in T.unroll(G):
                            local_ahead[i, nt, rM, rN] = local_ahead[i, nt, rM, rN] + T.Cast("float32", grads[
                                b, T.max(c - 1, 0), h * G + head, rt * 16 + g + 8 * rM, fb * FB + nt * 8 + 2 * tq + rN])
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
                        if t < TT:
                            if fb * FB < K:
                                dk[b, t, h, T.min(f, K - 1)] = T.Cast(dt, (dkv_r[nt, rM, rN] + dkv_lo_r[nt, rM, rN]) * factor[1])
                            else:
                                dv[b, t, h, T.max(f - K, 0)] = T.Cast(dt, (dkv_r[nt, rM, rN] + dkv_lo_r[nt, rM, rN]) * factor[1])
            # 3. G_c -> the output where chunk c starts a sequence, and as hi + lo -> this chunk's stage
            for nt, rM, rN in T.grid(FB // 8, 2, 2):
                p = warp * 16 + g + 8 * rM
                f = fb * FB + nt * 8 + 2 * tq + rN
                x = hh_r[nt, rM, rN] + lo_r[nt, rM, rN]
                if p < N and next_start[0] >= 0:
                    initial_grads[T.max(next_start[0], 0), h, T.min(p, N - 1), f] = x * factor[1]
                hi = T.Cast(h16, x)
                pool[stage + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = hi
                pool[stage + LO_AT + (nt * 8 + 2 * tq + rN) * X_STRIDE + p] = T.Cast(h16, x - T.Cast("float32", hi))
            T.cuda.cta_sync()  # the stage is complete; the other one was read before this barrier

    return state_scan_reverse
