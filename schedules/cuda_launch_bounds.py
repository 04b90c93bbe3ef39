"""Launch bounds of a CUDA tile program: ``with_min_blocks_per_sm`` asks ptxas to fit that many blocks of the
program on one SM (``__launch_bounds__(threads, blocks)``: registers capped at 65,536 / (threads x blocks),
whatever does not fit spilled to local memory).

TVM 0.27's CUDA codegen reads the attribute ``tirx.launch_bounds_min_blocks_per_sm`` inside a program's device
entry; given as a function attribute it is ignored, and the source keeps ``__launch_bounds__(threads)``.
"""

from __future__ import annotations

import tvm

MIN_BLOCKS_KEY = "tirx.launch_bounds_min_blocks_per_sm"


def with_min_blocks_per_sm(func: tvm.tirx.PrimFunc, blocks: int) -> tvm.tirx.PrimFunc:
    """``func`` (a tile program: its body is its device entry) with ``blocks`` as its minimum blocks per SM."""
    entry = func.body
    if not (isinstance(entry, tvm.tirx.AttrStmt) and entry.attr_key == "tirx.device_entry"):
        raise ValueError(f"{func.attrs['global_symbol']}: the body is not a device entry")
    bound = tvm.tirx.AttrStmt(tvm.runtime.convert(""), MIN_BLOCKS_KEY, tvm.tirx.IntImm("int32", blocks), entry.body)
    return func.with_body(tvm.tirx.AttrStmt(entry.node, entry.attr_key, entry.value, bound))
