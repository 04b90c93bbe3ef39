"""The chunk-to-chunk state scan, the one piece TE cannot express (te.scan does not lower to a PrimFunc).

X_0 = 0, X_{c+1} = A^L X_c + U_c for c = 0..NC-2, independently for every (b, h) and column f:
U [B, NC, H, N, F], decay = A^L [N, N]  ->  states [B, NC, H, N, F], the state before each chunk.
Written as a TVMScript PrimFunc, sequential over chunks, parallel over batch and heads, columns vectorised.
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..spec import KernelSpec


def state_scan(spec: KernelSpec):
    N, F, acc = spec.resolution, spec.state_width, spec.acc_dtype

    @T.prim_func
    def bla_fwd_state_scan(u_handle: T.handle, decay: T.Buffer((N, N), acc), x_handle: T.handle):
        T.func_attr({"global_symbol": "bla_fwd_state_scan", "tirx.noalias": True})
        B = T.int32()
        NC = T.int32()
        H = T.int32()
        U = T.match_buffer(u_handle, (B, NC, H, N, F), acc)
        X = T.match_buffer(x_handle, (B, NC, H, N, F), acc)
        for bh in T.parallel(B * H):
            for n in range(N):
                for f in T.vectorized(F):
                    X[bh // H, 0, bh % H, n, f] = T.cast(0, acc)
            for c in range(NC - 1):
                for n in range(N):
                    for f in T.vectorized(F):
                        X[bh // H, c + 1, bh % H, n, f] = U[bh // H, c, bh % H, n, f]
                    for m in range(N):
                        for f in T.vectorized(F):
                            X[bh // H, c + 1, bh % H, n, f] += decay[n, m] * X[bh // H, c, bh % H, m, f]

    return bla_fwd_state_scan
