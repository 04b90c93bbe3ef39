"""Per-target schedules of the BLA kernels: how the compute in ``bla_tvm.compute`` runs on each target.

``schedule(kernel, func, spec, device_kind, config)`` returns the IRModule to compile; every kernel of
``bla_tvm.kernels.TABLE`` has a rule per device kind (the scans: none, they carry their own loop annotations).
Schedules import tvm but never torch; the compute never imports schedules.
"""

from __future__ import annotations

from bla_tvm.cuda_toolchain import prepare_before_tvm_loads

prepare_before_tvm_loads()  # on a machine without a GPU driver: nvcc and a stand-in libcuda, before tvm loads

from bla_tvm import kernels  # noqa: E402

from . import cpu, cpu_decode, cuda, cuda_decode, cuda_final_state  # noqa: E402

#: kernels whose TVMScript carries its own loops: scheduled as written
UNSCHEDULED = ("state_scan", "state_scan_reverse")

_RULES = {
    "cpu": {
        "chunk_state": cpu.schedule_chunk_state,
        "chunk_output": cpu.schedule_chunk_output,
        "chunk_backward": cpu.schedule_chunk_backward,
        "final_state": cpu.schedule_final_state,
        "final_state_backward": cpu.schedule_final_state,
        **{f"input_gradient_{part}": cpu.schedule_input_gradient for part in "qkv"},
        **{kernel: cpu_decode.schedule_decode_step for kernel in kernels.DECODE},
    },
    "cuda": {
        "chunk_state": cuda.schedule_chunk_state,
        "chunk_output": cuda.schedule_chunk_output,
        "chunk_backward": cuda.schedule_chunk_backward,
        "final_state": cuda_final_state.schedule_final_state,
        "final_state_backward": cuda_final_state.schedule_final_state,
        **{f"input_gradient_{part}": cuda.schedule_input_gradient for part in "qkv"},
        **{kernel: cuda_decode.schedule_decode_step for kernel in kernels.DECODE},
    },
}

CONFIGS = {"cpu": cpu.CpuConfig, "cuda": cuda.CudaConfig}


def default_config(device_kind: str):
    if device_kind not in CONFIGS:
        raise ValueError(f"device_kind must be one of {sorted(CONFIGS)}, got {device_kind!r}")
    return CONFIGS[device_kind]()


def schedule(kernel: str, func, spec, device_kind: str, config=None):
    """IRModule of ``func`` scheduled for ``device_kind``; kernels with no rule (the TVMScript scan, which
    carries its own loop annotations) are returned as written."""
    config = default_config(device_kind) if config is None else config
    if kernels.get(kernel).name in UNSCHEDULED:
        import tvm

        return tvm.IRModule({func.attrs["global_symbol"]: func})
    return _RULES[device_kind][kernel](func, spec, config).mod
