"""The chunk-to-chunk state scans, the one piece TE cannot express (te.scan does not lower to a PrimFunc).

A row b of chunks may hold several sequences, each starting at a chunk boundary; starts[b, c] is the index s of
the sequence chunk c starts, or -1 when chunk c continues the one before. Independently for every (b, h) and
column f:

- forward: X_c = initial[starts[b, c]] where chunk c starts a sequence, else X_c = decay X_{c-1} + U_{c-1};
  with decay = A^L and U the chunk-local contributions [B, NC, H, N, F], X [B, NC, H, N, F] is the state
  before each chunk;
- reverse: G_c = D_c + decay G_{c+1}, the second term dropped where chunk c ends its sequence (c is the last
  chunk, or chunk c + 1 starts another); with decay = (A^L)^T and D_c the gradient of chunk c's outputs with
  respect to its start state, G [B, NC, H, N, F] is the gradient with respect to the state before each chunk.
  D_c is read from the backward's grads [B, NC, H G, L + N, F + K] (rows L.., columns ..F), summed over the G
  query heads that share key/value head h.

Written as TVMScript, one version per target family: sequential over chunks, parallel over batch and heads
(and, on CUDA, over state rows and columns).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..layer import KernelSpec


def state_scan(spec: KernelSpec, device_kind: str = "cpu", reverse: bool = False):
    """The scan's PrimFunc for ``device_kind`` ("cpu" or "cuda"), forward or ``reverse``.

    Forward arguments: U, decay [N, N], initial [S, H, N, F], starts [B, NC] int32, X (output).
    Reverse arguments: grads, decay [N, N], starts, G (output).
    """
    scans = {
        ("cpu", False): _forward_cpu,
        ("cpu", True): _reverse_cpu,
        ("cuda", False): _forward_cuda,
        ("cuda", True): _reverse_cuda,
    }
    if (device_kind, reverse) not in scans:
        raise ValueError(f"device_kind must be 'cpu' or 'cuda', got {device_kind!r}")
    return scans[device_kind, reverse](spec)


def _forward_cpu(spec: KernelSpec):
    """Parallel over b * H + h, columns vectorised, chunks in sequence."""
    N, F, acc = spec.resolution, spec.state_width, spec.acc_dtype

    @T.prim_func
    def bla_state_scan(
        u_handle: T.handle, decay: T.Buffer((N, N), acc), init_handle: T.handle, starts_handle: T.handle,
        x_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        B, NC, H, S = T.int32(), T.int32(), T.int32(), T.int32()
        U = T.match_buffer(u_handle, (B, NC, H, N, F), acc)
        initial = T.match_buffer(init_handle, (S, H, N, F), acc)
        starts = T.match_buffer(starts_handle, (B, NC), "int32")
        X = T.match_buffer(x_handle, (B, NC, H, N, F), acc)
        for bh in T.parallel(B * H):
            for c in range(NC):
                if starts[bh // H, c] >= 0:
                    for n in range(N):
                        for f in T.vectorized(F):
                            X[bh // H, c, bh % H, n, f] = initial[starts[bh // H, c], bh % H, n, f]
                else:
                    for n in range(N):
                        for f in T.vectorized(F):
                            X[bh // H, c, bh % H, n, f] = U[bh // H, c - 1, bh % H, n, f]
                        for m in range(N):
                            for f in T.vectorized(F):
                                X[bh // H, c, bh % H, n, f] += decay[n, m] * X[bh // H, c - 1, bh % H, m, f]

    return bla_state_scan


def _reverse_cpu(spec: KernelSpec):
    """Parallel over b * H + h, columns vectorised, chunks in reverse sequence."""
    N, F, L, G, acc = spec.resolution, spec.state_width, spec.chunk_size, spec.group_size, spec.acc_dtype
    rows, columns = L + N, F + spec.head_k

    @T.prim_func
    def bla_state_scan_reverse(
        grads_handle: T.handle, decay: T.Buffer((N, N), acc), starts_handle: T.handle, g_handle: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        B, NC, H = T.int32(), T.int32(), T.int32()
        grads = T.match_buffer(grads_handle, (B, NC, H * G, rows, columns), acc)
        starts = T.match_buffer(starts_handle, (B, NC), "int32")
        Gs = T.match_buffer(g_handle, (B, NC, H, N, F), acc)
        for bh in T.parallel(B * H):
            for i in range(NC):
                for n in range(N):
                    for f in T.vectorized(F):
                        Gs[bh // H, NC - 1 - i, bh % H, n, f] = grads[bh // H, NC - 1 - i, bh % H * G, L + n, f]
                    for g in range(1, G):
                        for f in T.vectorized(F):
                            Gs[bh // H, NC - 1 - i, bh % H, n, f] += grads[
                                bh // H, NC - 1 - i, bh % H * G + g, L + n, f
                            ]
                if i > 0:
                    if starts[bh // H, NC - i] < 0:
                        for n in range(N):
                            for m in range(N):
                                for f in T.vectorized(F):
                                    Gs[bh // H, NC - 1 - i, bh % H, n, f] += (
                                        decay[n, m] * Gs[bh // H, NC - i, bh % H, m, f]
                                    )

    return bla_state_scan_reverse


def _cuda_tiling(spec: KernelSpec, max_threads: int = 256):
    """Threads along state rows NT, rows per thread NR = ceil(N / NT), columns per block FT (divides F)."""
    N, F = spec.resolution, spec.state_width
    NT = min(N, max_threads)
    FT = max(d for d in range(1, F + 1) if F % d == 0 and d * NT <= max_threads)
    return NT, (N + NT - 1) // NT, FT


#: each CUDA scan thread keeps the first RESIDENT entries of its rows of the decay in registers (all of them up
#: to N = 128; the rest are read from memory), and sums its dot product in PARTS independent partial sums:
#: a step is then a chain of N / PARTS fused multiply-adds on shared-memory operands, not N dependent global loads
RESIDENT_LIMIT = 128
PARTS = 4


def _forward_cuda(spec: KernelSpec):
    """A block per (b * H + h, tile of FT columns); thread (n, f) owns X[n, f]. The running state tile lives in
    shared memory: each step every thread computes its next value, all synchronise, then overwrite the tile."""
    N, F, acc = spec.resolution, spec.state_width, spec.acc_dtype
    NT, NR, FT = _cuda_tiling(spec)
    RESIDENT = min(N, RESIDENT_LIMIT)

    @T.prim_func
    def bla_state_scan(
        u_handle: T.handle, decay: T.Buffer((N, N), acc), init_handle: T.handle, starts_handle: T.handle,
        x_handle: T.handle,
    ):
        T.func_attr({"tirx.noalias": True})
        B, NC, H, S = T.int32(), T.int32(), T.int32(), T.int32()
        U = T.match_buffer(u_handle, (B, NC, H, N, F), acc)
        initial = T.match_buffer(init_handle, (S, H, N, F), acc)
        starts = T.match_buffer(starts_handle, (B, NC), "int32")
        X = T.match_buffer(x_handle, (B, NC, H, N, F), acc)
        for bh in T.thread_binding(B * H, thread="blockIdx.x"):
            for fo in T.thread_binding(F // FT, thread="blockIdx.y"):
                for nt in T.thread_binding(NT, thread="threadIdx.y"):
                    for fi in T.thread_binding(FT, thread="threadIdx.x"):
                        state = T.alloc_buffer((N, FT), acc, scope="shared")
                        nxt = T.alloc_buffer((NR,), acc, scope="local")
                        decay_rows = T.alloc_buffer((NR, RESIDENT), acc, scope="local")
                        part = T.alloc_buffer((PARTS,), acc, scope="local")
                        for r in range(NR):
                            for m in T.unroll(RESIDENT):
                                decay_rows[r, m] = decay[T.min(r * NT + nt, N - 1), m]
                        for c in range(NC):
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    if starts[bh // H, c] >= 0:
                                        nxt[r] = initial[starts[bh // H, c], bh % H, r * NT + nt, fo * FT + fi]
                                    else:
                                        for p in T.unroll(PARTS):
                                            part[p] = T.cast(0, acc)
                                        for m in T.unroll(RESIDENT):
                                            part[m % PARTS] = part[m % PARTS] + decay_rows[r, m] * state[m, fi]
                                        for m in range(RESIDENT, N):
                                            part[0] = part[0] + decay[r * NT + nt, m] * state[m, fi]
                                        nxt[r] = U[bh // H, c - 1, bh % H, r * NT + nt, fo * FT + fi]
                                        for p in T.unroll(PARTS):
                                            nxt[r] = nxt[r] + part[p]
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    state[r * NT + nt, fi] = nxt[r]
                                    X[bh // H, c, bh % H, r * NT + nt, fo * FT + fi] = nxt[r]

    return bla_state_scan


def _reverse_cuda(spec: KernelSpec):
    """As ``_forward_cuda``, chunks visited last to first."""
    N, F, L, G, acc = spec.resolution, spec.state_width, spec.chunk_size, spec.group_size, spec.acc_dtype
    rows, columns = L + N, F + spec.head_k
    NT, NR, FT = _cuda_tiling(spec)
    RESIDENT = min(N, RESIDENT_LIMIT)

    @T.prim_func
    def bla_state_scan_reverse(
        grads_handle: T.handle, decay: T.Buffer((N, N), acc), starts_handle: T.handle, g_handle: T.handle
    ):
        T.func_attr({"tirx.noalias": True})
        B, NC, H = T.int32(), T.int32(), T.int32()
        grads = T.match_buffer(grads_handle, (B, NC, H * G, rows, columns), acc)
        starts = T.match_buffer(starts_handle, (B, NC), "int32")
        Gs = T.match_buffer(g_handle, (B, NC, H, N, F), acc)
        for bh in T.thread_binding(B * H, thread="blockIdx.x"):
            for fo in T.thread_binding(F // FT, thread="blockIdx.y"):
                for nt in T.thread_binding(NT, thread="threadIdx.y"):
                    for fi in T.thread_binding(FT, thread="threadIdx.x"):
                        state = T.alloc_buffer((N, FT), acc, scope="shared")
                        nxt = T.alloc_buffer((NR,), acc, scope="local")
                        decay_rows = T.alloc_buffer((NR, RESIDENT), acc, scope="local")
                        part = T.alloc_buffer((PARTS,), acc, scope="local")
                        for r in range(NR):
                            for m in T.unroll(RESIDENT):
                                decay_rows[r, m] = decay[T.min(r * NT + nt, N - 1), m]
                        for i in range(NC):
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    nxt[r] = T.cast(0, acc)
                                    for g in range(G):
                                        nxt[r] = nxt[r] + grads[
                                            bh // H, NC - 1 - i, bh % H * G + g, L + r * NT + nt, fo * FT + fi
                                        ]
                                    if i > 0:
                                        if starts[bh // H, NC - i] < 0:
                                            for p in T.unroll(PARTS):
                                                part[p] = T.cast(0, acc)
                                            for m in T.unroll(RESIDENT):
                                                part[m % PARTS] = part[m % PARTS] + decay_rows[r, m] * state[m, fi]
                                            for m in range(RESIDENT, N):
                                                part[0] = part[0] + decay[r * NT + nt, m] * state[m, fi]
                                            for p in T.unroll(PARTS):
                                                nxt[r] = nxt[r] + part[p]
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    state[r * NT + nt, fi] = nxt[r]
                                    Gs[bh // H, NC - 1 - i, bh % H, r * NT + nt, fo * FT + fi] = nxt[r]

    return bla_state_scan_reverse
