"""LLVM (CPU) schedules for the BLA forward kernels: how the compute in ``bla_tvm.compute`` runs on a CPU.

Each rule takes the PrimFunc made from the TE compute and a config, and returns a ``tvm.s_tir.Schedule``.
The work unit is one (chunk, batch, head) triple: the chunk loop is parallel and every per-chunk stage is
computed inside the head loop, so a chunk's intermediates (a few L x L and L x M tiles) stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from .common import chunk_loops, is_contraction, is_elementwise, output_name

#: stages recomputed where they are read instead of stored
INLINED = ("bla_fwd_logits",)

#: (stage, buffer it reads across its vectorised axis, index map to the layout that makes that read contiguous);
#: constants are copied once per call, copies of intermediates land beside their producer in the chunk loop
TRANSPOSED_READS = (
    ("bla_fwd_z_intra", "lag_basis", lambda n, d: (d, n)),
    ("bla_fwd_scores", "C", lambda i, n: (n, i)),
    ("bla_fwd_qx", "bla_fwd_keys", lambda b, c, h, r, k: (b, c, h, k, r)),
)


@dataclass(frozen=True)
class CpuConfig:
    """Knobs of the CPU schedules.

    vector_lanes: the widest innermost loop vectorised whole (wider loops are split to fit).
    """

    vector_lanes: int = 16


def vectorize_inner(sch, block, max_lanes: int) -> None:
    """Vectorise the innermost loop of ``block``: whole when its extent is at most ``max_lanes`` (LLVM splits
    a wide vector into registers, masking the tail), else split by the largest divisor of the extent that fits."""
    inner = sch.get_loops(block)[-1]
    extent = int(sch.get(inner).extent)
    if extent <= 1:
        return
    if extent > max_lanes:
        lanes = max(d for d in (1, 2, 4, 8, 16, 32, 64) if d <= max_lanes and extent % d == 0)
        if lanes == 1:
            return
        _, inner = sch.split(inner, factors=[None, lanes])
    sch.vectorize(inner)


def schedule_chunk_state(func, spec, config: CpuConfig = CpuConfig()):
    """U[b, c, h, n, f]: parallel over chunks c (B, H are symbolic, so fusing them would break affine bindings); f vectorised."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock("bla_fwd_chunk_state")
    b, c, h, n, f, j = sch.get_loops(block)
    sch.reorder(c, b, h, n, j, f)
    sch.parallel(c)
    sch.compute_at(sch.get_sblock("bla_fwd_kv_chunk"), h, preserve_unit_loops=True)
    vectorize_inner(sch, block, config.vector_lanes)
    sch.decompose_reduction(block, j)
    return sch


def schedule_per_chunk(sch, anchor: str, spec, config: CpuConfig, inlined=(), transposed_reads=()):
    """Schedule a kernel whose ``anchor`` output is [B, T, H, X] or [B, NC, H, R, X] and whose other stages
    are per chunk.

    The anchor's t is split into (chunk c, position j) if it has one; chunks run in parallel, and every other
    stage is computed inside the (c, b, h) loop, so a chunk's intermediates stay in cache.
    Contractions run as rank-1 updates over their reduction (the column axis vectorised); elementwise stages
    are vectorised along their last axis.
    """
    c, b, h = chunk_loops(sch, anchor, spec)
    sch.parallel(c)
    root = sch.get_sblock("root")
    stages = [blk for blk in sch.get_child_blocks(root) if sch.get(blk).name_hint != anchor]
    for block in reversed(stages):  # consumers first
        sch.compute_at(block, h, preserve_unit_loops=True)
    for name in inlined:
        sch.compute_inline(sch.get_sblock(name))
    for name, buffer, index_map in transposed_reads:
        reader = sch.get_sblock(name)
        copy = sch.cache_read(reader, buffer, "global", consumer_blocks=[reader])
        sch.transform_layout(copy, ("write", 0), index_map)
    for block in sch.get_child_blocks(h):
        if is_contraction(sch, block):
            *_, row, col, red = sch.get_loops(block)
            sch.reorder(row, red, col)
            vectorize_inner(sch, block, config.vector_lanes)
            sch.decompose_reduction(block, red)
        elif is_elementwise(sch, block):
            vectorize_inner(sch, block, config.vector_lanes)
    return sch


def schedule_chunk_output(func, spec, config: CpuConfig = CpuConfig()):
    """o[b, t, h, v]: see ``schedule_per_chunk``; constants read across a vectorised axis are transposed."""
    sch = tvm.s_tir.Schedule(func)
    return schedule_per_chunk(sch, "bla_fwd_out", spec, config, INLINED, TRANSPOSED_READS)


def schedule_chunk_backward(func, spec, config: CpuConfig = CpuConfig()):
    """grads[b, c, h, r, f]: see ``schedule_per_chunk``."""
    sch = tvm.s_tir.Schedule(func)
    return schedule_per_chunk(sch, "bla_bwd_grads", spec, config, INLINED)


def schedule_input_gradient(func, spec, config: CpuConfig = CpuConfig()):
    """dq, dk or dv [B, T, H, X]: see ``schedule_per_chunk``."""
    sch = tvm.s_tir.Schedule(func)
    return schedule_per_chunk(sch, output_name(sch), spec, config)


def schedule_final_state(func, spec, config: CpuConfig = CpuConfig()):
    """A sequence's final state [S, H, N, F] or its gradient [S, H, L + N, F]: one reduction over stacked rows.
    Parallel over sequences; rank-1 updates over the reduction with the column axis vectorised; the gathered
    operand is read where it is used."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock(output_name(sch))
    for producer in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        sch.compute_inline(producer)
    s, _, _, f, red = sch.get_loops(block)
    sch.reorder(red, f)
    sch.parallel(s)
    vectorize_inner(sch, block, config.vector_lanes)
    sch.decompose_reduction(block, red)
    return sch

