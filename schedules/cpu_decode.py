"""LLVM (CPU) schedule of the one-token decode step (``bla_tvm.compute.decode``).

The work unit is one (batch, kv head) pair: the head loop is parallel and every stage is computed inside it, so
the pair's state tile [N, K + V] and the readout's vectors stay in cache; the new state is written from that tile.
No loop carries one accumulator through a long chain: each reduction either runs as rank-1 updates (a vector of
independent sums, the summed axis outer) or, for z = X' q (summed along a row), as partial sums over
``DOT_LANES`` columns at once, added up at the end.
"""

from __future__ import annotations

import tvm

from .common import is_elementwise
from .cpu import CpuConfig, vectorize_inner

#: out[.., j] = sum_r a[r] T[r, j] over rows of a table: run as rank-1 updates over r, the column axis j
#: vectorised (the removal and o's mix read the state tile, the scores C^T, w C)
RANK_ONE = ("bla_dec_removed", "bla_dec_mix", "bla_dec_scores", "bla_dec_w")
#: the stacked state's stages: their key columns and their value columns run as two loops (one k | v select per
#: loop, not per lane)
STACKED = ("bla_dec_rotated", "bla_dec_state")
#: partial sums of z = X' q kept at once (one vector register of float32 on AVX2)
DOT_LANES = 8
#: stages recomputed where they are read instead of stored
INLINED = ("bla_dec_loaded", "bla_dec_logits")
#: the stages at the root whose (b, h) loops are merged into one, in execution order; each of the others is
#: computed inside the first of these that reads it
ANCHORS = ("bla_dec_state", "bla_dec_out", "bla_dec_key_out", "bla_dec_value_out")


def decode_step_loops(sch):
    """Gather every stage of the decode step under one pair of (b, h) loops and return them.

    TE gives the step three outputs (o, X', Y'), and an output stage cannot be moved into another's loops; so
    each of ``ANCHORS`` keeps its own nest, every other stage is computed inside the nest of its consumer, and the
    anchors' b and h loops are then merged: per (b, h), X' | Y' (an intermediate), the readout and o, then the
    copies of X' and Y' to the outputs.
    """
    root = sch.get_sblock("root")
    names = [sch.get(blk).name_hint for blk in sch.get_child_blocks(root)]
    for name in reversed(names):  # consumers first
        if name in ANCHORS:
            continue
        block = sch.get_sblock(name)
        consumer = next(sch.get(c).name_hint for c in sch.get_consumers(block))
        while consumer not in ANCHORS:  # the consumer has already moved inside an anchor's nest
            consumer = next(sch.get(c).name_hint for c in sch.get_consumers(sch.get_sblock(consumer)))
        sch.compute_at(block, sch.get_loops(sch.get_sblock(consumer))[1], preserve_unit_loops=True)
    b = sch.merge(*[sch.get_loops(sch.get_sblock(name))[0] for name in ANCHORS])
    h = sch.merge(*[sch.get_loops(sch.get_sblock(name))[1] for name in ANCHORS])
    return b, h


def schedule_decode_step(func, spec, config: CpuConfig | None = None):
    """o[b, h, g, v] and X', Y' [b, h, n, :]: every stage inside one (b, h) loop pair (``decode_step_loops``),
    parallel over h (B and H are symbolic, so they are not fused); the reductions as the module docstring says,
    the other stages vectorised along their last axis."""
    config = config if isinstance(config, CpuConfig) else CpuConfig()
    sch = tvm.s_tir.Schedule(func)
    partial = _dot_partial_sums(sch, spec.head_k)  # before the stages move: rfactor needs z's own loop nest
    _, h = decode_step_loops(sch)
    sch.parallel(h)
    if partial is not None:
        lane, *_, n, chunk = sch.get_loops(partial)[2:]  # (lane, g, n, chunk) under b, h
        sch.reorder(n, chunk, lane)
        sch.vectorize(lane)
        sch.decompose_reduction(partial, chunk)
    for name in INLINED:
        sch.compute_inline(sch.get_sblock(name))
    for block in sch.get_child_blocks(h):
        name = sch.get(block).name_hint
        if name in RANK_ONE:
            *_, col, red = sch.get_loops(block)
            sch.reorder(red, col)
            vectorize_inner(sch, block, config.vector_lanes)
            sch.decompose_reduction(block, red)
        elif name in STACKED:
            _split_keys_from_values(sch, block, spec.head_k, spec.head_v, config.vector_lanes)
        elif is_elementwise(sch, block):
            vectorize_inner(sch, block, config.vector_lanes)
    return sch


def _widest_lanes(extents, max_lanes: int) -> int:
    """The widest power of two up to ``max_lanes`` that divides every extent (1: none does)."""
    return max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= max_lanes and all(e % d == 0 for e in extents))


def _dot_partial_sums(sch, K: int):
    """z[g, n] = sum_k X'[n, k] q[g, k] as DOT_LANES partial sums (lane l sums the columns k = l mod DOT_LANES)
    plus their total: returns the partial sums' block, or None where K has no such split."""
    lanes = _widest_lanes((K,), DOT_LANES)
    if lanes == 1:
        return None
    z = sch.get_sblock("bla_dec_z")
    *_, columns = sch.get_loops(z)
    _, lane = sch.split(columns, [None, lanes])
    return sch.rfactor(lane, factor_axis=0)


def _split_keys_from_values(sch, block, K: int, V: int, max_lanes: int) -> None:
    """Run the column loop of a stacked [.., K + V] stage as its K key columns, then its V value columns, each
    vectorised by the widest width dividing K and V (the selects between key and value then fold away)."""
    *_, col = sch.get_loops(block)
    lanes = _widest_lanes((K, V), max_lanes)
    if lanes > 1:
        col, inner = sch.split(col, [None, lanes])
        sch.vectorize(inner)
    sch.loop_partition(col, [K // lanes, None])
