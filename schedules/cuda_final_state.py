"""CUDA schedule of the per-sequence final-state kernels (``bla_tvm.compute.final_state``): small reductions
over N + L (or N) stacked rows, one output per thread accumulated in a register."""

from __future__ import annotations

from .common import output_name
from .cuda import CudaConfig


def schedule_final_state(func, spec, config: CudaConfig = CudaConfig()):
    """final [S, H, N, F] or its gradient [S, H, L + N, F]: a block per (sequence, head, row), a thread per
    column (F = K + V <= 1024), so the constant's row is a broadcast read and the operand's a coalesced one;
    the gathered operand is read where it is used. Every thread owns exactly one output: no bound checks."""
    import tvm

    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock(output_name(sch))
    for producer in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        sch.compute_inline(producer)
    s, h, row, col, _ = sch.get_loops(block)
    for loop, axis in ((s, "blockIdx.x"), (h, "blockIdx.y"), (row, "blockIdx.z"), (col, "threadIdx.x")):
        sch.bind(loop, axis)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, col, preserve_unit_loops=True)
    return sch
