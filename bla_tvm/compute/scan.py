"""The chunk-to-chunk state scan, the one piece TE cannot express (te.scan does not lower to a PrimFunc).

X_0 = 0, X_{c+1} = decay X_c + U_c for c = 0..NC-2, independently for every (b, h) and column f:
U [B, NC, H, N, F], decay [N, N]  ->  X [B, NC, H, N, F]. The forward passes decay = A^L and gets the state
before each chunk. With ``reverse`` the chunk order is flipped: X_{NC-1} = 0, X_c = decay X_{c+1} + U_{c+1};
the backward passes decay = (A^L)^T and the per-chunk state gradients D, and gets G_{c+1}, the gradient of
everything after chunk c with respect to the state chunk c hands on.
Written as TVMScript, sequential over chunks, parallel over batch, heads and (on CUDA) columns and rows.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import KernelSpec


def state_scan(spec: KernelSpec, device_kind: str = "cpu", reverse: bool = False):
    """The scan's PrimFunc for ``device_kind``: TVMScript carries its own loop schedule, so there is one per
    target family (``_state_scan_cpu``, ``_state_scan_cuda``) and no schedule rule.

    Forward, U is [B, NC, H, N, F]; reverse, U is the backward's grads [B, NC, H, L + N, F + K], whose rows
    L.. and columns ..F are D (``backward.chunk_backward``).
    """
    layout = (spec.chunk_size, spec.chunk_size + spec.resolution, spec.state_width + spec.head_k)
    rows_offset, rows, columns = layout if reverse else (0, spec.resolution, spec.state_width)
    if device_kind == "cpu":
        return _state_scan_cpu(spec, int(reverse), rows_offset, rows, columns)
    if device_kind == "cuda":
        return _state_scan_cuda(spec, int(reverse), rows_offset, rows, columns)
    raise ValueError(f"device_kind must be 'cpu' or 'cuda', got {device_kind!r}")


def _state_scan_cpu(spec: KernelSpec, R: int, U0: int, UN: int, UF: int):
    """Parallel over b * H + h, columns vectorised, chunks in sequence; step c touches chunk
    c + R (NC - 1 - 2c), i.e. c forward and NC - 1 - c in reverse."""
    N, F, acc = spec.resolution, spec.state_width, spec.acc_dtype

    @T.prim_func
    def bla_state_scan(u_handle: T.handle, decay: T.Buffer((N, N), acc), x_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int32()
        NC = T.int32()
        H = T.int32()
        U = T.match_buffer(u_handle, (B, NC, H, UN, UF), acc)
        X = T.match_buffer(x_handle, (B, NC, H, N, F), acc)
        for bh in T.parallel(B * H):
            for n in range(N):
                for f in T.vectorized(F):
                    X[bh // H, R * (NC - 1), bh % H, n, f] = T.cast(0, acc)
            for c in range(NC - 1):
                for n in range(N):
                    for f in T.vectorized(F):
                        X[bh // H, c + 1 + R * (NC - 3 - 2 * c), bh % H, n, f] = U[
                            bh // H, c + R * (NC - 1 - 2 * c), bh % H, U0 + n, f
                        ]
                    for m in range(N):
                        for f in T.vectorized(F):
                            X[bh // H, c + 1 + R * (NC - 3 - 2 * c), bh % H, n, f] += (
                                decay[n, m] * X[bh // H, c + R * (NC - 1 - 2 * c), bh % H, m, f]
                            )

    return bla_state_scan


def _state_scan_cuda(spec: KernelSpec, R: int, U0: int, UN: int, UF: int, max_threads: int = 256):
    """A block per (b * H + h, tile of FT columns); thread (n, f) owns X[n, f]; chunks visited as on the CPU.

    The running state tile X_c [N, FT] lives in shared memory; each step every thread computes
    U_c[n, f] + sum_m decay[n, m] X_c[m, f], all threads synchronise, then overwrite X_c with X_{c+1}.
    Rows beyond the thread count are handled by NR = ceil(N / NT) rows per thread.
    """
    N, F, acc = spec.resolution, spec.state_width, spec.acc_dtype
    NT = min(N, max_threads)  # threads along n
    NR = (N + NT - 1) // NT  # rows per thread
    FT = max(d for d in range(1, F + 1) if F % d == 0 and d * NT <= max_threads)  # columns per block

    @T.prim_func
    def bla_state_scan(u_handle: T.handle, decay: T.Buffer((N, N), acc), x_handle: T.handle):
        T.func_attr({"tirx.noalias": True})
        B = T.int32()
        NC = T.int32()
        H = T.int32()
        U = T.match_buffer(u_handle, (B, NC, H, UN, UF), acc)
        X = T.match_buffer(x_handle, (B, NC, H, N, F), acc)
        for bh in T.thread_binding(B * H, thread="blockIdx.x"):
            for fo in T.thread_binding(F // FT, thread="blockIdx.y"):
                for nt in T.thread_binding(NT, thread="threadIdx.y"):
                    for fi in T.thread_binding(FT, thread="threadIdx.x"):
                        state = T.alloc_buffer((N, FT), acc, scope="shared")
                        nxt = T.alloc_buffer((NR,), acc, scope="local")
                        for r in range(NR):
                            if r * NT + nt < N:
                                state[r * NT + nt, fi] = T.cast(0, acc)
                                X[bh // H, R * (NC - 1), bh % H, r * NT + nt, fo * FT + fi] = T.cast(0, acc)
                        for c in range(NC - 1):
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    nxt[r] = U[bh // H, c + R * (NC - 1 - 2 * c), bh % H, U0 + r * NT + nt, fo * FT + fi]
                                    for m in range(N):
                                        nxt[r] = nxt[r] + decay[r * NT + nt, m] * state[m, fi]
                            T.tvm_storage_sync("shared")
                            for r in range(NR):
                                if r * NT + nt < N:
                                    state[r * NT + nt, fi] = nxt[r]
                                    X[bh // H, c + 1 + R * (NC - 3 - 2 * c), bh % H, r * NT + nt, fo * FT + fi] = nxt[
                                        r
                                    ]

    return bla_state_scan
