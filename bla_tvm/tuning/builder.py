"""The tuner's builder (imports tvm): every candidate of every problem compiled into a work folder that the runner
(``runner.py``, torch + tvm_ffi only) measures, here or on another machine.

Work folder layout::

    WORK/tasks.json             what to measure: per problem, the chunk lengths and each kernel's candidates
    WORK/kernels/manifest.json  a prebuilt manifest (``runtime.KernelLibrary``), configs included
    WORK/kernels/*.so           one module per (kernel, spec, config)

A candidate is rejected here, never at run time, when its block needs more shared memory than the target has,
when ptxas reports more registers than a block of its threads can hold (65536 per block, 255 per thread), or
any spill or stack frame (a register array gone to local memory; on this toolchain that has also meant a wrong
kernel, ../shared/docs/toolchain.md). The default schedule is always kept, as the baseline.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import hashlib
import json
import multiprocessing
import subprocess
import time
import types
from pathlib import Path

from .. import kernels
from ..cuda_arch import arch_named
from ..dispatch import phase_kernels
from ..kernel_cache import file_digest
from ..layer import CHUNK_SIZES, KernelSpec
from ..runtime import MANIFEST, source_digest
from .problems import TuningProblem

WORK_FORMAT = "bla_tvm.tuning_work"
TASKS = "tasks.json"
#: registers of one SM's register file a single block may use (sm_50 to sm_90), and per thread
REGISTERS_PER_BLOCK = 65536
REGISTERS_PER_THREAD = 255
MAX_THREADS = 1024

_PTXAS_OUTPUT: list[bytes] = []


def _capture_ptxas() -> None:
    """Keep nvcc's output (TVM drops it; its ptxas options already include -v) so a build's resource report
    costs no second compile. Runs in each builder process."""
    from tvm.support import nvcc

    from .. import build  # noqa: F401 - prepares the CUDA compiler before tvm loads

    class RecordingPopen(subprocess.Popen):
        def communicate(self, *args, **kwargs):
            out, err = super().communicate(*args, **kwargs)
            _PTXAS_OUTPUT.append(out or b"")
            return out, err

    shim = types.SimpleNamespace(**{k: getattr(subprocess, k) for k in ("PIPE", "STDOUT", "run", "check_output")})
    shim.Popen = RecordingPopen
    nvcc.subprocess = shim


def check_resources(report: dict, threads: int) -> str | None:
    """Why a compiled CUDA candidate is invalid, or None: registers past the block's or the thread's share,
    any spill or stack frame."""
    if report["registers"] > REGISTERS_PER_THREAD or report["registers"] * threads > REGISTERS_PER_BLOCK:
        return f"{report['registers']} registers x {threads} threads exceed the register file"
    if report["stack_frame"] or report["spill_stores"] or report["spill_loads"]:
        return f"local memory: {report['stack_frame']} B stack frame, {report['spill_stores']} B spilled"
    return None


def module_file(kernel: str, spec: KernelSpec, target: str, config: dict | None) -> str:
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]
    return f"{kernel}-{spec.tag()}-{target}-{'default' if config is None else digest}.so"


def build_candidate(kernel: str, spec: dict, device_kind: str, target: str, config: dict | None, out: str) -> dict:
    """Compile one candidate (``config`` None: the default schedule) into ``out``; returns a dict with "file" and
    "resources", or with "rejected" (the reason). Runs in a worker process."""

    spec = KernelSpec(**spec)
    result = {"kernel": kernel, "spec": spec.as_dict(), "config": config}
    name = module_file(kernel, spec, target, config)
    outcome = Path(out) / (name + ".json")  # a finished candidate is not built again (a rerun after a stop)
    if outcome.exists():
        return json.loads(outcome.read_text())
    if (Path(out) / name).exists():
        return dict(result, file=name)
    result = _build(kernel, spec, device_kind, target, config, out, name, result)
    outcome.write_text(json.dumps(result))
    return result


def _build(kernel, spec, device_kind, target, config, out, name, result) -> dict:
    from .. import build

    arch = target if device_kind == "cuda" else None
    if device_kind == "cuda":
        threads = getattr(build.config_object("cuda", config), "threads", MAX_THREADS)
        if threads > MAX_THREADS:
            return dict(result, rejected=f"{threads} threads per block (at most {MAX_THREADS})")
        smem = build.cuda_shared_memory(spec, arch, (kernel,), config)
        limit = arch_named(arch).shared_memory
        if smem > limit:
            return dict(result, rejected=f"{smem} B of shared memory (at most {limit} on {arch})")
    _PTXAS_OUTPUT.clear()
    try:
        module = build.compile_kernel(kernel, spec, device_kind, arch, config)
    except Exception as error:  # noqa: BLE001 - a point the schedule cannot take is a rejected candidate
        return dict(result, rejected=f"does not compile: {type(error).__name__}: {str(error)[-300:]}")
    if device_kind == "cuda":
        text = b"".join(_PTXAS_OUTPUT).decode(errors="replace")
        report = build.parse_ptxas(text) if "registers" in text else build.ptxas_report(module, arch)
        report["shared_memory"] = smem
        reason = check_resources(report, threads)
        result["resources"] = report
        if reason is not None and config is not None:
            return dict(result, rejected=reason)
    module.export_library(str(Path(out) / name))
    return dict(result, file=name)


def chunk_sizes(problem: TuningProblem, device_kind: str, arch: str | None) -> dict[str, list[int]]:
    """The chunk lengths each mode can use: on CUDA those whose per-chunk blocks (the forward's; and the
    backward's for training) fit in shared memory with the default schedule; on the CPU all of them."""
    allowed = [L for L in CHUNK_SIZES if problem.chunk_sizes is None or L in problem.chunk_sizes]
    if device_kind == "cpu":
        return {mode: allowed for mode in problem.modes}
    from .. import build

    fits = {}
    for L in allowed:
        spec = problem.spec(L)
        fits[L] = {k: build.cuda_shared_memory(spec, arch, (k,)) <= arch_named(arch).shared_memory
                   for k in ("chunk_output", "chunk_backward")}  # fmt: skip
    sizes = {"inference": [L for L in allowed if fits[L]["chunk_output"]],
             "training": [L for L in allowed if fits[L]["chunk_output"] and fits[L]["chunk_backward"]]}  # fmt: skip
    return {mode: sizes[mode] for mode in problem.modes if sizes[mode]}


def plan(problems: list[TuningProblem], device_kind: str, arch: str | None, limit: int | None) -> list[dict]:
    """Per problem: chunk lengths per mode, and per L every kernel's candidate configs (default first)."""
    from .. import build  # noqa: F401, I001 - prepares the CUDA compiler before tvm loads (the schedules import it)
    from bla_tvm.schedules.space import candidate_configs

    plans = []
    for problem in problems:
        sizes = chunk_sizes(problem, device_kind, arch)
        by_L = {}
        for L in sorted({L for Ls in sizes.values() for L in Ls}, reverse=True):
            # the final-state kernels are launched on request only: no timed call runs them
            names = phase_kernels(L in sizes.get("training", ()), final_state=False)
            spec = problem.spec(L)
            by_L[str(L)] = {name: candidate_configs(device_kind, name, limit, spec) for name in names}
        plans.append({
            "problem": problem.as_dict(), "chunk_sizes": sizes,
            "default_chunk_size": {mode: Ls[0] for mode, Ls in sizes.items()}, "kernels": by_L,
            "tunable": list(kernels.TUNABLE),
        })  # fmt: skip
    return plans


def build_work(
    problems: list[TuningProblem], device_kind: str, arch: str | None, work: Path, limit: int | None = None,
    jobs: int = 1, progress: bool = True,
) -> dict:
    """Build every candidate of ``problems`` into ``work`` (see the module docstring); returns the tasks."""
    import torch

    from ..runtime import target_id

    start = time.time()
    target = arch if device_kind == "cuda" else target_id(torch.device("cpu"))
    kernels_dir = Path(work) / "kernels"
    kernels_dir.mkdir(parents=True, exist_ok=True)
    plans = plan(problems, device_kind, arch, limit)
    jobs_list = []
    for p in plans:
        problem = TuningProblem(**p["problem"])
        for L, by_kernel in p["kernels"].items():
            for kernel, configs in by_kernel.items():
                for i, config in enumerate(configs):
                    jobs_list.append((kernel, problem.spec(int(L)).as_dict(), None if i == 0 else config))
    results = {}
    bar = progress_bar(len(jobs_list), "build", progress)
    initializer = _capture_ptxas if device_kind == "cuda" else None
    # fork is fast, but not after this process has initialised CUDA (tune() on a GPU machine): then spawn
    context = multiprocessing.get_context("spawn" if torch.cuda.is_available() and torch.cuda.is_initialized()
                                          else None)  # fmt: skip
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, initializer=initializer,
                                                mp_context=context) as pool:  # fmt: skip
        futures = {pool.submit(build_candidate, k, s, device_kind, target, c, str(kernels_dir)): (k, s, c)
                   for k, s, c in jobs_list}  # fmt: skip
        for future in concurrent.futures.as_completed(futures):
            kernel, spec, config = futures[future]
            try:
                results[_job_key(kernel, spec, config)] = future.result()
            except Exception as error:  # noqa: BLE001 - e.g. a worker killed by a compiler crash
                results[_job_key(kernel, spec, config)] = {"kernel": kernel, "spec": spec, "config": config,
                                                           "rejected": f"build failed: {error}"}  # fmt: skip
            bar.update(1)
    bar.close()
    manifest, rejected = [], []
    for p in plans:
        problem = TuningProblem(**p["problem"])
        for L, by_kernel in p["kernels"].items():
            spec = problem.spec(int(L)).as_dict()
            for kernel, configs in list(by_kernel.items()):
                kept = []
                for i, config in enumerate(configs):
                    result = results[_job_key(kernel, spec, None if i == 0 else config)]
                    if "rejected" in result:
                        rejected.append(result)
                        continue
                    entry = {"kernel": kernel, "spec": spec, "target": target, "file": result["file"],
                             "sha256": file_digest(kernels_dir / result["file"])}  # fmt: skip
                    manifest.append(dict(entry, config=None if i == 0 else config))
                    if i == 0:  # the default also under its explicit config, as a log names it
                        manifest.append(dict(entry, config=config))
                    kept.append({"config": config, "default": i == 0, "resources": result.get("resources")})
                by_kernel[kernel] = kept
    import importlib.metadata

    (kernels_dir / MANIFEST).write_text(json.dumps(
        {"device_kind": device_kind, "tvm": importlib.metadata.version("apache-tvm"), "kernels": manifest}, indent=1
    ))  # fmt: skip
    tasks = {
        "format": WORK_FORMAT, "device_kind": device_kind, "target": target,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "build_seconds": round(time.time() - start, 1),
        "sources": source_digest(),  # the compute and schedules the candidates were built from
        "counts": {"candidates": len(jobs_list), "built": len(jobs_list) - len(rejected), "rejected": len(rejected)},
        "problems": plans, "rejected": rejected,
    }  # fmt: skip
    (Path(work) / TASKS).write_text(json.dumps(tasks, indent=1))
    return tasks


def _job_key(kernel, spec, config) -> str:
    return json.dumps([kernel, spec, config], sort_keys=True)


def progress_bar(total: int, what: str, enabled: bool):
    """A tqdm bar (tqdm is a dependency; a plain counter where it is missing, as on a bare GPU machine)."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=what, unit="candidate", disable=not enabled, mininterval=1.0)
    except ImportError:
        return _Counter(total, what, enabled)


@dataclasses.dataclass
class _Counter:
    total: int
    what: str
    enabled: bool
    done: int = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled and (self.done % 10 == 0 or self.done == self.total):
            print(f"{self.what}: {self.done}/{self.total}", flush=True)

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
