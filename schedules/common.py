"""What the per-target schedules ask of a stage: its shape of computation, read off its block."""

from __future__ import annotations

import tvm


def is_elementwise(sch, block) -> bool:
    return all(iv.iter_type == tvm.tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def is_contraction(sch, block) -> bool:
    """One reduction axis, innermost, under a row and a column axis of fixed size: a small matrix product
    (a row reduction such as a softmax's max has no column axis)."""
    iter_vars = sch.get(block).iter_vars
    reduce = [iv for iv in iter_vars if iv.iter_type != tvm.tirx.IterVar.DataPar]
    if len(reduce) != 1 or iter_vars[-1].iter_type == tvm.tirx.IterVar.DataPar:
        return False
    row, col = iter_vars[-3], iter_vars[-2]
    return all(isinstance(iv.dom.extent, tvm.tirx.IntImm) and iv.dom.extent.value > 1 for iv in (row, col))


def intermediate_buffers(sch) -> set[str]:
    """Names of the buffers a kernel allocates (as opposed to its parameters)."""
    return {buf.name for buf in sch.get(sch.get_sblock("root")).alloc_buffers}


def output_name(sch) -> str:
    """The name of a kernel's single output block (the last block of the root)."""
    return sch.get(sch.get_child_blocks(sch.get_sblock("root"))[-1]).name_hint


def chunk_loops(sch, anchor: str, spec):
    """The (chunk, batch, head) loops of the ``anchor`` block, outermost in that order: its t axis split into
    (chunk, position) when it is token-indexed [B, T, H, X], taken as is when chunk-indexed [B, NC, H, R, X]."""
    loops = sch.get_loops(sch.get_sblock(anchor))
    if len(loops) == 4:
        b, t, h, x = loops
        c, j = sch.split(t, factors=[None, spec.chunk_size])
        sch.reorder(c, b, h, j, x)
    else:
        b, c, h, *rest = loops
        sch.reorder(c, b, h, *rest)
    return c, b, h
