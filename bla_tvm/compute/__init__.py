"""BLA as TVM compute definitions (imports tvm): what each kernel computes, with no schedule.

``prim_func(kernel, spec)`` returns the unscheduled PrimFunc of one named kernel.
"""

from __future__ import annotations

import functools

from tvm import te

from ..spec import BACKWARD_KERNELS, DECODE_KERNELS, FORWARD_KERNELS, KernelSpec, entry_symbol
from .backward import chunk_backward, input_gradient
from .decode import decode_step
from .final_state import final_state, final_state_backward
from .forward import chunk_output, chunk_state_contribution
from .scan import state_scan

_TE_KERNELS = {
    "chunk_state": chunk_state_contribution,
    "chunk_output": chunk_output,
    "chunk_backward": chunk_backward,
    "final_state": final_state,
    "final_state_backward": final_state_backward,
    **{f"input_gradient_{part}": functools.partial(input_gradient, part=part) for part in "qkv"},
    "decode_step": decode_step,
    **{f"decode_step_state_{dt}": functools.partial(decode_step, state_dtype=dt) for dt in ("float16", "bfloat16")},
}
_SCANS = {"state_scan": False, "state_scan_reverse": True}


def prim_func(kernel: str, spec: KernelSpec, device_kind: str = "cpu"):
    """The PrimFunc of ``kernel`` (one of FORWARD_KERNELS + BACKWARD_KERNELS + DECODE_KERNELS), exported under
    ``entry_symbol(kernel)``.

    TE kernels are the same for every target; the TVMScript scans come in one version per ``device_kind``.
    """
    kernels = FORWARD_KERNELS + BACKWARD_KERNELS + DECODE_KERNELS
    if kernel not in kernels:
        raise ValueError(f"kernel must be one of {kernels}, got {kernel!r}")
    if kernel in _SCANS:
        func = state_scan(spec, device_kind, reverse=_SCANS[kernel])
    else:
        func = te.create_prim_func(_TE_KERNELS[kernel](spec))
    return func.with_attr("global_symbol", entry_symbol(kernel))
