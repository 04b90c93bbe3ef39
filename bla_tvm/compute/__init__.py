"""BLA as TVM compute definitions (imports tvm): what each kernel computes, with no schedule.

``prim_func(kernel, spec)`` returns the unscheduled PrimFunc of one kernel of ``kernels.TABLE``, whose
parameters are the table's arguments, in order.
"""

from __future__ import annotations

import functools

from bla_tvm.cuda_toolchain import prepare_before_tvm_loads

prepare_before_tvm_loads()  # on a machine without a GPU driver: nvcc and a stand-in libcuda, before tvm loads

from tvm import te  # noqa: E402

from .. import kernels  # noqa: E402
from ..layer import KernelSpec  # noqa: E402
from .backward import chunk_backward, input_gradient  # noqa: E402
from .decode import decode_step  # noqa: E402
from .final_state import final_state, final_state_backward  # noqa: E402
from .forward import chunk_output, chunk_state_contribution  # noqa: E402
from .scan import state_scan  # noqa: E402

_TE_KERNELS = {
    "chunk_state": chunk_state_contribution,
    "chunk_output": chunk_output,
    "chunk_backward": chunk_backward,
    "final_state": final_state,
    "final_state_backward": final_state_backward,
    **{f"input_gradient_{part}": functools.partial(input_gradient, part=part) for part in "qkv"},
    **{name: functools.partial(decode_step, state_dtype=dt) for name, dt in kernels.DECODE_STATE_DTYPES.items()},
}
_SCANS = {"state_scan": False, "state_scan_reverse": True}


def prim_func(kernel: str, spec: KernelSpec, device_kind: str = "cpu"):
    """The PrimFunc of ``kernel`` (a name of ``kernels.TABLE``), exported under its symbol, with one parameter
    per argument of the table (ValueError where they disagree).

    TE kernels are the same for every target; the TVMScript scans come in one version per ``device_kind``.
    """
    entry = kernels.get(kernel)
    if kernel in _SCANS:
        func = state_scan(spec, device_kind, reverse=_SCANS[kernel])
    else:
        func = te.create_prim_func(_TE_KERNELS[kernel](spec))
    if len(func.params) != len(entry.args):
        raise ValueError(f"{kernel}: the compute takes {len(func.params)} tensors, the kernel table names "
                         f"{len(entry.args)} arguments {entry.args}")  # fmt: skip
    return func.with_attr("global_symbol", entry.symbol)
