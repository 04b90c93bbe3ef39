"""LLVM (CPU) schedule of the one-token decode step (``bla_tvm.compute.decode``).

The work unit is one (batch, kv head) pair: the head loop is parallel and every stage is computed inside it, so
the pair's state tile [N, K + V] and the readout's vectors stay in cache; the new state is written from that tile.
"""

from __future__ import annotations

import tvm

from .common import is_elementwise
from .cpu import CpuConfig, vectorize_inner

#: [.., F] = sum_n a[n] S[n, f]: run as rank-1 updates over n, the column axis f vectorised
RANK_ONE = ("bla_dec_removed", "bla_dec_mix")
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
    parallel over h (B and H are symbolic, so they are not fused); reductions over rows run as rank-1 updates
    with the column axis vectorised, other stages vectorised along their last axis."""
    config = config if isinstance(config, CpuConfig) else CpuConfig()
    sch = tvm.s_tir.Schedule(func)
    _, h = decode_step_loops(sch)
    sch.parallel(h)
    for name in INLINED:
        sch.compute_inline(sch.get_sblock(name))
    for block in sch.get_child_blocks(h):
        name = sch.get(block).name_hint
        if name in RANK_ONE:
            *_, col, red = sch.get_loops(block)
            sch.reorder(red, col)
            vectorize_inner(sch, block, config.vector_lanes)
            sch.decompose_reduction(block, red)
        elif is_elementwise(sch, block):
            vectorize_inner(sch, block, config.vector_lanes)
    return sch
