"""``bla-tvm``: build kernels ahead of time, and assemble the runtime bundle a GPU machine without TVM needs.

    bla-tvm build  --device cuda --arch sm_90 --specs specs.json --out DIR   # kernels + DIR/manifest.json
    bla-tvm build  --device cuda --arch sm_90 --gpu-test-layers --out DIR    # the kernels tests/test_gpu.py loads
    bla-tvm bundle --out DIR                                                 # DIR/lib/*.so + DIR/wheels/*.whl
    bla-tvm tune   --device cuda --preset h200-bench [--build-only | --measure-only] --work DIR   # tuning logs

specs.json is a list of KernelSpec fields ({"window": 512, "resolution": 63, ...}), each optionally with
"kernels": the kernels to build (default: the forward's and the backward's). On the GPU machine, point
BLA_TVM_PREBUILT_DIR at the kernels, BLA_TVM_RUNTIME_DIR at DIR/lib, and install DIR/wheels' tvm_ffi.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import kernels
from .kernel_cache import file_digest
from .layer import KernelSpec
from .runtime import MANIFEST, target_id

#: the tvm_ffi release the kernels are built against (../shared/docs/toolchain.md: newer ones segfault)
TVM_FFI_VERSION = "0.1.14.post1"
RUNTIME_LIBRARIES = ("libtvm_runtime.so", "libtvm_runtime_cuda.so")


def _build_one(kernel: str, spec: KernelSpec, device_kind: str, arch: str | None, out: Path) -> dict:
    from . import build  # imports tvm, in the worker process

    target = arch if device_kind == "cuda" else target_id(torch.device("cpu"))
    name = f"{kernel}-{spec.tag()}-{target}.so"
    build.compile_kernel(kernel, spec, device_kind, arch).export_library(str(out / name))
    return {"kernel": kernel, "spec": spec.as_dict(), "target": target, "config": None, "file": name,
            "sha256": file_digest(out / name)}  # fmt: skip


def build_kernels(
    specs: list[tuple[KernelSpec, tuple[str, ...]]], device_kind: str, arch: str, out: Path, jobs: int,
    append: bool = False,
) -> list[dict]:
    """Compile the given kernels of every spec into ``out`` and write ``out/manifest.json`` (with ``append``,
    added to the kernels it already lists, in place of those built again)."""
    out.mkdir(parents=True, exist_ok=True)
    work = [(kernel, spec) for spec, kernels in specs for kernel in kernels]
    entries = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(_build_one, kernel, spec, device_kind, arch, out) for kernel, spec in work]
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            entries.append(future.result())
            if done % 10 == 0 or done == len(work):
                print(f"built {done}/{len(work)} kernels", flush=True)
    if append and (out / MANIFEST).exists():  # a kernel built again replaces its entry (and its digest)
        rebuilt = {entry["file"] for entry in entries}
        old = json.loads((out / MANIFEST).read_text())["kernels"]
        entries = [entry for entry in old if entry["file"] not in rebuilt] + entries
    manifest = {"device_kind": device_kind, "tvm": importlib.metadata.version("apache-tvm"), "kernels": entries}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return entries


#: what `pytest -m gpu` needs on a GPU machine that has torch only
TEST_WHEELS = ("pytest", "hypothesis", "iniconfig", "pluggy", "packaging", "sortedcontainers", "attrs")


def assemble_bundle(out: Path, python_version: str = "3.12", test_wheels: bool = False) -> None:
    """Copy TVM's runtime libraries and download the tvm_ffi wheel (and with ``test_wheels`` pytest's and
    hypothesis's) for the GPU machine's Python."""
    lib = out / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    tvm_lib = Path(importlib.metadata.distribution("apache-tvm").locate_file("tvm/lib"))
    for name in RUNTIME_LIBRARIES:
        shutil.copy2(tvm_lib / name, lib / name)
    wheels = out / "wheels"
    wheels.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
         "--python-version", python_version, "--implementation", "cp",
         "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
         "-d", str(wheels), f"apache-tvm-ffi=={TVM_FFI_VERSION}", *(TEST_WHEELS if test_wheels else ())],
        check=True,
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="bla-tvm", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile kernels ahead of time and write a manifest")
    build.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    build.add_argument("--arch", default="sm_90", help="CUDA architecture (ignored for cpu)")
    which = build.add_mutually_exclusive_group(required=True)
    which.add_argument("--specs", type=Path, help="JSON list of KernelSpec fields")
    which.add_argument("--gpu-test-layers", action="store_true",
                       help="the kernels of the GPU tests (bla_tvm.testing.GPU_TEST_LAYERS; run with BLA_TVM_NO_TUNING=1)")
    build.add_argument("--out", type=Path, required=True)
    build.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    build.add_argument("--append", action="store_true", help="add to the manifest already in --out")
    bundle = commands.add_parser("bundle", help="runtime libraries + tvm_ffi wheel for a machine without TVM")
    bundle.add_argument("--out", type=Path, required=True)
    bundle.add_argument("--python-version", default="3.12")
    bundle.add_argument("--test-wheels", action="store_true",
                        help="also pytest, hypothesis and their dependencies (to run `pytest -m gpu` there)")
    _add_tune_parser(commands)
    args = parser.parse_args(argv)

    start = time.time()
    if args.command == "tune":
        return _tune(args)
    if args.command == "build":
        if args.gpu_test_layers:
            from .testing import gpu_test_kernels

            specs = gpu_test_kernels(args.arch)
        else:
            specs = []
            for fields in json.loads(args.specs.read_text()):
                names = tuple(fields.pop("kernels", kernels.FORWARD + kernels.BACKWARD))
                specs.append((KernelSpec(**fields), names))
        arch = args.arch if args.device == "cuda" else None
        entries = build_kernels(specs, args.device, arch, args.out, args.jobs, args.append)
        print(f"{len(entries)} kernels for {len(specs)} specs in {args.out} ({time.time() - start:.0f} s)")
    else:
        assemble_bundle(args.out, args.python_version, args.test_wheels)
        print(f"runtime bundle in {args.out} ({time.time() - start:.0f} s)")
    return 0


def _add_tune_parser(commands) -> None:
    tune = commands.add_parser(
        "tune", help="find the fastest schedules and chunk lengths for this device; write a tuning log",
        description="Build candidate schedules (needs TVM), measure them on the device (needs torch + tvm_ffi) and "
        "write the tuning log the ops read (bla_tvm/tuning_logs.py). --build-only and --measure-only split the two "
        "between a build machine and a GPU machine, through --work.",
    )  # fmt: skip
    tune.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    tune.add_argument("--arch", help="CUDA architecture (default: the GPU's; required with --build-only)")
    what = tune.add_mutually_exclusive_group()
    what.add_argument("--preset", help="named problem set: h200-bench")
    what.add_argument("--problems", type=Path, help="JSON list of TuningProblem fields")
    tune.add_argument("--work", type=Path, help="folder of the built candidates (default: a temporary one)")
    tune.add_argument("--out", type=Path, help="folder for the tuning log (default: BLA_TVM_TUNING_DIR)")
    tune.add_argument("--report", type=Path, help="JSON of every measurement (default: WORK/measurements.json)")
    tune.add_argument("--limit", type=int, help="at most this many candidate schedules per kernel and L")
    tune.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build processes")
    tune.add_argument("--deadline", type=float, help="seconds after which measuring stops starting new problems")
    tune.add_argument("--no-evidence", action="store_true", help="skip timing the op end to end, tuned vs default")
    tune.add_argument("--label", default="tuned", help="suffix of the log's file name")
    tune.add_argument("--shapes", nargs="*", default=(), metavar="B,T,H",
                      help="shapes to time the op at end to end, besides the buckets (with --evidence-only: instead)")
    tune.add_argument("--kernels", type=Path, help="with --evidence-only: the prebuilt kernels (default WORK/kernels)")
    split = tune.add_mutually_exclusive_group()
    split.add_argument("--build-only", action="store_true", help="only build the candidates into --work")
    split.add_argument("--measure-only", action="store_true", help="only measure what --work holds")
    split.add_argument("--evidence-only", action="store_true",
                       help="only time the op, tuned (logs in --out and shipped) vs default, for --work's problems")


def _tune(args) -> int:
    from . import tuning

    shapes = [tuple(int(x) for x in shape.split(",")) for shape in args.shapes]
    if (args.measure_only or args.evidence_only) and args.work is None:
        raise SystemExit("--measure-only and --evidence-only need --work (a folder written by --build-only)")
    if args.evidence_only:
        report = tuning.evidence_work(args.work, args.out, report=args.report, shapes=shapes, kernels=args.kernels,
                                      deadline_s=args.deadline)  # fmt: skip
        return _summary(report)
    if args.measure_only:
        report = tuning.measure_work(args.work, args.out, report=args.report, deadline_s=args.deadline,
                                     with_evidence=not args.no_evidence, label=args.label,
                                     extra_shapes=shapes)  # fmt: skip
        return _summary(report)
    if args.preset:
        if args.preset not in tuning.PRESETS:
            raise SystemExit(f"--preset must be one of {sorted(tuning.PRESETS)}")
        problems = tuning.PRESETS[args.preset]()
    elif args.problems:
        problems = tuning.load_problems(args.problems)
    else:
        raise SystemExit("give --preset or --problems")
    if args.build_only:
        if args.work is None or (args.device == "cuda" and args.arch is None):
            raise SystemExit("--build-only needs --work (and --arch for cuda)")
        tasks = tuning.build_work(problems, args.device, args.arch, args.work, args.limit, args.jobs)
        print(f"{tasks['counts']} in {args.work} ({tasks['build_seconds']:.0f} s)")
        return 0
    report = tuning.tune(problems, args.device, args.arch, args.work, args.out, args.limit, args.jobs,
                         report=args.report, deadline_s=args.deadline, with_evidence=not args.no_evidence,
                         label=args.label, extra_shapes=shapes)  # fmt: skip
    return _summary(report)


def _summary(report: dict) -> int:
    if "log" in report:
        print(f"tuning log: {report.get('log')} ({report.get('seconds', 0):.0f} s measuring)")
    if report.get("unfinished"):
        print("not finished before the deadline:", ", ".join(report["unfinished"]))
    for tag, rows in report.get("evidence", {}).items():
        for row in rows:
            ratios = [f"{mode} {row[f'{mode} default ms']:.2f} -> {row[f'{mode} tuned ms']:.2f} ms "
                      f"({row[f'{mode} default ms'] / row[f'{mode} tuned ms']:.2f}x)"
                      for mode in ("inference", "training") if f"{mode} tuned ms" in row]  # fmt: skip
            ratios += [f"{mode} refused" for mode in ("inference", "training") if f"{mode} refused" in row]
            print(f"  {tag} {row['shape']}: " + ", ".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
