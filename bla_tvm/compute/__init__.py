"""BLA as TVM compute definitions (imports tvm): what each kernel computes, with no schedule.

``prim_func(kernel, spec)`` returns the unscheduled PrimFunc of one named kernel.
"""

from __future__ import annotations

from tvm import te

from ..spec import FORWARD_KERNELS, KernelSpec, entry_symbol
from .forward import chunk_output, chunk_state_contribution
from .scan import state_scan

_TE_KERNELS = {"chunk_state": chunk_state_contribution, "chunk_output": chunk_output}


def prim_func(kernel: str, spec: KernelSpec, device_kind: str = "cpu"):
    """The PrimFunc of ``kernel`` (one of FORWARD_KERNELS), exported under ``entry_symbol(kernel)``.

    TE kernels are the same for every target; the TVMScript scan comes in one version per ``device_kind``.
    """
    if kernel not in FORWARD_KERNELS:
        raise ValueError(f"kernel must be one of {FORWARD_KERNELS}, got {kernel!r}")
    if kernel == "state_scan":
        func = state_scan(spec, device_kind)
    else:
        func = te.create_prim_func(_TE_KERNELS[kernel](spec))
    return func.with_attr("global_symbol", entry_symbol(kernel))
