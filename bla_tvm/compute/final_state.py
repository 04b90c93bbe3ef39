"""The state a sequence hands on after its last token, and its gradient (TE compute, no schedule).

A sequence s ends inside chunk (row[s], chunk[s]) after its first length[s] tokens (1 <= length <= L). From the
state X at that chunk's start (the scan's output) and the chunk's keys, the state after those tokens is

    final[s] = final_map[length[s]] [X; K]    with final_map[r] = [A^r | A^{r-1-j} b for j < r, 0 after]

(``constants.ChunkConstants.final_map``, [L + 1, N, N + L]); likewise for values, both as one [N, F] block.
Its gradient is the transpose: d[X; K] = final_map[length]^T dfinal, laid out as the backward's per-chunk
gradients are (rows j < L the chunk's tokens, rows L + n the chunk-start state).
"""

from __future__ import annotations

from tvm import te

from ..layer import KernelSpec
from .forward import symbolic_sizes


def _sequence_ends(spec: KernelSpec):
    """Placeholders locating each sequence's end: row [S], chunk [S], length [S] (int32), and final_map."""
    S = te.var("S")
    L, N = spec.chunk_size, spec.resolution
    row = te.placeholder((S,), "int32", name="end_row")
    chunk = te.placeholder((S,), "int32", name="end_chunk")
    length = te.placeholder((S,), "int32", name="end_length")
    final_map = te.placeholder((L + 1, N, N + L), spec.acc_dtype, name="final_map")
    return S, row, chunk, length, final_map


def final_state(spec: KernelSpec):
    """final[s, h, n, f] = sum_r final_map[length[s], n, r] [X | Y; k | v][s, h, r, f]: the state X | Y at the
    start of sequence s's last chunk (chunk[s] of row[s]) stacked on that chunk's tokens.

    Inputs: end_states [S, H, N, F] (those start states), k [B, T, H, K], v [B, T, H, V], end_row, end_chunk,
    end_length [S], final_map [L + 1, N, N + L]. Output: final [S, H, N, F] in the accumulation dtype.
    """
    B, T, H, _ = symbolic_sizes(spec.chunk_size)
    L, N, K, F, acc = spec.chunk_size, spec.resolution, spec.head_k, spec.state_width, spec.acc_dtype
    k = te.placeholder((B, T, H, K), spec.dtype, name="k")
    v = te.placeholder((B, T, H, spec.head_v), spec.dtype, name="v")
    S, row, chunk, length, final_map = _sequence_ends(spec)
    end_states = te.placeholder((S, H, N, F), acc, name="end_states")

    def stacked(s, h, r, f):  # [X | Y; k | v] of the sequence's last chunk, zero past the end of the row
        t = te.min(chunk[s] * L + te.max(r - N, 0), T - 1)
        token = te.if_then_else(f < K, k[row[s], t, h, te.min(f, K - 1)], v[row[s], t, h, te.max(f - K, 0)])
        in_row = chunk[s] * L + r - N < T
        return te.if_then_else(
            r < N,
            end_states[s, h, te.min(r, N - 1), f],
            te.if_then_else(in_row, token.astype(acc), te.const(0, acc)),
        )

    sources = te.compute((S, H, N + L, F), stacked, name="bla_final_sources")
    r = te.reduce_axis((0, N + L), name="r")
    final = te.compute(
        (S, H, N, F),
        lambda s, h, n, f: te.sum(final_map[length[s], n, r] * sources[s, h, r, f], axis=r),
        name="bla_final_state",
    )
    return [end_states, k, v, row, chunk, length, final_map, final]


def final_state_backward(spec: KernelSpec):
    """d[s, h, r, f] = sum_n final_map[length[s], n, r'] dfinal[s, h, n, f], rows in the backward's order:
    r < L is token r of the last chunk (r' = N + r), r = L + n the state at the chunk start (r' = n).

    Inputs: dfinal [S, H, N, F], end_length [S], final_map [L + 1, N, N + L]; output [S, H, L + N, F].
    """
    L, N, F, acc = spec.chunk_size, spec.resolution, spec.state_width, spec.acc_dtype
    S, _, _, length, final_map = _sequence_ends(spec)
    H = te.var("H")
    dfinal = te.placeholder((S, H, N, F), acc, name="dfinal")
    n = te.reduce_axis((0, N), name="n")
    grad = te.compute(
        (S, H, L + N, F),
        lambda s, h, r, f: te.sum(
            final_map[length[s], n, te.if_then_else(r < L, N + r, r - L)] * dfinal[s, h, n, f], axis=n
        ),
        name="bla_final_state_grad",
    )
    return [dfinal, length, final_map, grad]
