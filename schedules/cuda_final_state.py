"""CUDA schedule of the per-sequence final-state kernels (``bla_tvm.compute.final_state``): small reductions,
a block per (sequence, head) and one output per thread, accumulated in a register."""

from __future__ import annotations

import tvm

from .common import output_name
from .cuda import CudaConfig, _spread_over_threads


def schedule_final_state(func, spec, config: CudaConfig = CudaConfig()):
    """final [S, H, N, F] or its gradient [S, H, L + N, F]: blockIdx.x = sequence, .y = head; the gathered
    operand is read where it is used."""
    sch = tvm.s_tir.Schedule(func)
    block = sch.get_sblock(output_name(sch))
    for producer in sch.get_child_blocks(sch.get_sblock("root"))[:-1]:
        sch.compute_inline(producer)
    s, h, row, col, _ = sch.get_loops(block)
    sch.bind(s, "blockIdx.x")
    sch.bind(h, "blockIdx.y")
    _spread_over_threads(sch, block, config.threads, [row, col])
    return sch
