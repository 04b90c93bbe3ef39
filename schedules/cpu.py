"""LLVM (CPU) schedules for the BLA forward kernels: how the compute in ``bla_tvm.compute`` runs on a CPU.

Each rule takes the PrimFunc made from the TE compute and a config, and returns a ``tvm.s_tir.Schedule``.
The work unit is one (chunk, batch, head) triple: the chunk loop is parallel and every per-chunk stage is
computed inside the head loop, so a chunk's intermediates (a few L x L and L x M tiles) stay in cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

#: stages of ``chunk_output``, consumers before producers (the order in which compute_at must move them)
OUTPUT_STAGES = (
    "bla_fwd_out_chunk",
    "bla_fwd_values",
    "bla_fwd_mix",
    "bla_fwd_g",
    "bla_fwd_w",
    "bla_fwd_row_sum",
    "bla_fwd_probs",
    "bla_fwd_row_max",
    "bla_fwd_logits",
    "bla_fwd_scores",
    "bla_fwd_z",
    "bla_fwd_z_intra",
    "bla_fwd_qx",
    "bla_fwd_keys",
    "bla_fwd_kv_eff",
    "bla_fwd_kv_state",
    "bla_fwd_kv_chunk",
    "bla_fwd_q_chunk",
)

#: elementwise stages cheap enough to recompute where they are read
INLINED = ("bla_fwd_logits",)


@dataclass(frozen=True)
class CpuConfig:
    """Knobs of the CPU schedules.

    vector_lanes: the widest innermost loop vectorised whole (wider loops are split to fit).
    """

    vector_lanes: int = 16


def _vectorize_inner(sch, block, max_lanes: int) -> None:
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
    _vectorize_inner(sch, block, config.vector_lanes)
    sch.decompose_reduction(block, j)
    return sch


#: (stage, buffer it reads across its vectorised axis, index map to the layout that makes that read contiguous,
#:  whether the copy moves into the (c, b, h) loop: inputs that change per chunk; constants are copied once per
#:  call, and copies of intermediates already land beside their producer)
TRANSPOSED_READS = (
    ("bla_fwd_z_intra", "lag_basis", lambda n, d: (d, n), False),
    ("bla_fwd_scores", "C", lambda i, n: (n, i), False),
    ("bla_fwd_qx", "bla_fwd_keys", lambda b, c, h, r, k: (b, c, h, k, r), False),
)

#: matmul-like stages: loops (unit c, b, h, j, x, r) become (j, r, x) with x vectorised
CONTRACTIONS = (
    "bla_fwd_kv_eff",
    "bla_fwd_qx",
    "bla_fwd_z_intra",
    "bla_fwd_scores",
    "bla_fwd_w",
    "bla_fwd_g",
    "bla_fwd_out_chunk",
)

#: elementwise stages whose innermost loop is vectorised
ELEMENTWISE = (
    "bla_fwd_kv_chunk",
    "bla_fwd_kv_state",
    "bla_fwd_q_chunk",
    "bla_fwd_z",
    "bla_fwd_probs",
    "bla_fwd_mix",
    "bla_fwd_values",
)


def schedule_chunk_output(func, spec, config: CpuConfig = CpuConfig()):
    """o[b, t, h, v]: t split into (chunk c, position j); chunks parallel, every stage computed per (c, b, h).

    Contractions run as rank-1 updates over their reduction (the innermost output axis vectorised); constants
    read across that axis are transposed once per call.
    """
    sch = tvm.s_tir.Schedule(func)
    out = sch.get_sblock("bla_fwd_out")
    b, t, h, v = sch.get_loops(out)
    c, j = sch.split(t, factors=[None, spec.chunk_size])
    sch.reorder(c, b, h, j, v)
    sch.parallel(c)
    for name in OUTPUT_STAGES:
        sch.compute_at(sch.get_sblock(name), h, preserve_unit_loops=True)
    for name in INLINED:
        sch.compute_inline(sch.get_sblock(name))
    for name, buffer, index_map, into_chunk_loop in TRANSPOSED_READS:
        reader = sch.get_sblock(name)
        copy = sch.cache_read(reader, buffer, "global", consumer_blocks=[reader])
        sch.transform_layout(copy, ("write", 0), index_map)
        if into_chunk_loop:
            sch.compute_at(copy, h, preserve_unit_loops=True)
    for name in CONTRACTIONS:
        block = sch.get_sblock(name)
        *_, row, col, red = sch.get_loops(block)
        sch.reorder(row, red, col)
        _vectorize_inner(sch, block, config.vector_lanes)
        sch.decompose_reduction(block, red)
    for name in ELEMENTWISE:
        _vectorize_inner(sch, sch.get_sblock(name), config.vector_lanes)
    return sch
