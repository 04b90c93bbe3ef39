"""Auto-tuning of the BLA kernels for one device: build candidate schedules, measure them, write a tuning log that
the ops then use (``bla_tvm.tuning_logs``).

    from bla_tvm.tuning import TuningProblem, tune
    tune([TuningProblem(512, 63, 63, 64, 64, "bfloat16", buckets=[(4, 4096, 16)])], device="cuda", arch="sm_90")

or ``bla-tvm tune --device cuda --arch sm_90 --preset h200-bench``. Builder and runner are separable:
``build_work`` (needs TVM, no GPU) compiles every candidate into a work folder; ``measure_work`` (needs torch and
tvm_ffi only) measures them on the device and writes the log; ``tune`` does both in one process.

The search space: our own templates' knobs, not meta_schedule's
----------------------------------------------------------------
Each schedule rule in ``schedules/`` reads a config dataclass (``CudaConfig``: threads, register tile, operand
caching, tensor cores; ``CpuConfig``: vector lanes); ``schedules/space.py`` declares the values each knob may
take, per kernel, and the chunk length L is searched over ``spec.CHUNK_SIZES`` as a knob of the whole layer. The tuner enumerates
that grid (default first, then one-knob changes, then two; ``limit`` caps it) and keeps a candidate only if it
builds within the target's resources, matches the float64 reference and beats the default.

meta_schedule's database and sampling instructions were considered and not used, because on this chain, in
TVM 0.27:
- its stock CUDA design spaces crash or reject every candidate of our kernels ("Index 6 out of bounds 6",
  VerifyGPUCode, the tvm_access_ptr dtype check; ../shared/docs/toolchain.md), so it would search only knobs we
  declare anyway, through trace replay;
- its runner measures through TVM's own runtime and RPC, and our GPU machine has torch and tvm_ffi but no TVM:
  the measurement has to be ours (torch CUDA events, tensors laid out as the op lays them out) either way;
- L is not a schedule knob: it changes the compute (the chunk constants, the per-chunk tensors) and must agree
  between a training call's forward and backward, which a per-PrimFunc tuning record cannot express;
- the space is small (tens of points per kernel) and each point takes ~3 s to build, so exhaustive enumeration
  with static pruning is cheaper and reproducible, where an evolutionary search over traces would add little.
The log is our own documented JSON (``tuning_logs``), keyed by device, kernel, parameters and shape bucket,
which the runtime reads without TVM.
"""

from __future__ import annotations

import time
from pathlib import Path

from .problems import PRESETS, TuningProblem, load_problems

__all__ = ["PRESETS", "TuningProblem", "build_work", "evidence_work", "load_problems", "measure_work", "tune"]


def build_work(problems, device_kind: str, arch: str | None, work: Path, limit: int | None = None, jobs: int = 1,
               progress: bool = True) -> dict:  # fmt: skip
    """Compile every candidate of ``problems`` into the folder ``work`` (needs TVM; no GPU). See
    ``builder.build_work``."""
    from . import builder

    return builder.build_work(list(problems), device_kind, arch, Path(work), limit, jobs, progress)


def measure_work(work: Path, log_dir: Path | None = None, **kwargs) -> dict:
    """Measure the candidates in ``work`` on this machine's device and write the tuning log into ``log_dir``
    (default ``BLA_TVM_TUNING_DIR``). Needs torch and tvm_ffi only. See ``runner.measure_work``."""
    from . import runner

    return runner.measure_work(Path(work), log_dir, **kwargs)


def evidence_work(work: Path, log_dir: Path | None = None, **kwargs) -> dict:
    """Time the op end to end, tuned against default, for the problems of ``work``. See
    ``runner.evidence_work``."""
    from . import runner

    return runner.evidence_work(Path(work), log_dir, **kwargs)


def tune(problems, device: str = "cuda", arch: str | None = None, work: Path | None = None,
         log_dir: Path | None = None, limit: int | None = None, jobs: int = 1, **kwargs) -> dict:  # fmt: skip
    """Build and measure in one process: the fastest verified schedule and chunk length of each problem on this
    machine's ``device`` ('cuda' or 'cpu'), written into ``log_dir``; the ops use it from the next call on.
    ``arch`` defaults to the GPU's (sm_XY)."""
    import tempfile

    import torch

    if device == "cuda" and arch is None:
        major, minor = torch.cuda.get_device_capability()
        arch = f"sm_{major}{minor}"
    start = time.time()
    with tempfile.TemporaryDirectory(prefix="bla_tvm_tune_") as scratch:
        folder = Path(work) if work else Path(scratch)
        build_work(problems, device, arch, folder, limit, jobs, kwargs.get("progress", True))
        report = measure_work(folder, log_dir, **kwargs)
    report["seconds_total"] = round(time.time() - start, 1)
    return report
