"""The tuner's runner: measures the candidates a builder compiled (``builder.py``) and writes the tuning log.
Imports only torch, tvm_ffi and the package's runtime, so it runs on a GPU machine that has no TVM.

It runs the layer through the ops' launchers (``ops.launch_forward``, ``ops.launch_backward``) with a
``dispatch.CallPlan`` it builds itself, from an explicit ``runtime.KernelLibrary`` over the work folder's kernels
(building forbidden) and explicit tuning-log folders: nothing in the environment is read or changed.

For each problem and each chunk length L it can use:
1. runs the layer once per bucket with default schedules, recording every kernel's arguments
   (``runtime.record_launches``);
2. verifies each candidate: the forward (and, for a backward kernel, the backward) with that kernel's candidate
   schedule, on fresh random inputs and NaN-poisoned outputs, against the float64 reference
   (``reference.bla_quadratic``, on the same device); a candidate over tolerance, or leaving a NaN, is out;
3. times each verified candidate on the recorded arguments of the first bucket: warm-up, synchronisation,
   median of several runs between CUDA events (``time_call``); the best one and the default are timed again at
   the other buckets;
4. per (kernel, L, bucket) keeps the fastest, unless it beats the default by less than ``MARGIN``; per (mode,
   bucket) picks the L with the least total over the mode's kernels (each with its kept schedule);
5. writes the log (``tuning_logs`` format) after each problem, and, with ``evidence``, times the layer end to
   end, planned from the log just written (the op's own lookup, ``dispatch.chunk_size`` and ``plan_call``)
   against planned from no log, forward and forward + backward. Where the tuned layer is slower than the default
   in a (mode, bucket), that bucket's L record falls back to the default and is timed again.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .. import dispatch, env, kernels, tuning_logs
from ..layout import batch_layout
from ..ops import launch_backward, launch_forward
from ..reference import bla_quadratic
from ..runtime import KernelLibrary, call, device_identity, record_launches
from ..testing import poisoned_allocations
from .builder import TASKS, WORK_FORMAT, progress_bar
from .problems import TuningProblem

#: relative error each input dtype must stay under against the float64 reference (bench script's tolerances)
TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 1e-2, "float64": 1e-10}
#: a candidate (or a chunk length) must beat the default by this fraction to replace it
MARGIN = 0.02
#: the best candidates (by the first bucket's time) timed again, with the default, at the other buckets
TOP_K = 1


def time_call(fn, device: torch.device, budget_ms: float = 60.0, min_reps: int = 3, max_reps: int = 50) -> float:
    """Median milliseconds of ``fn()``: one warm-up call (module load, first-launch costs), one call to size the
    run, then ``budget_ms`` worth of calls (``min_reps`` to ``max_reps``), each timed between CUDA events on the
    current stream (``time.perf_counter`` on the CPU), synchronised before reading."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(reps: int) -> list[float]:
        if cuda:
            pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            for start, end in pairs:
                start.record()
                fn()
                end.record()
            sync()
            return [start.elapsed_time(end) for start, end in pairs]
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return times

    fn()
    sync()
    estimate = timed(1)[0]
    reps = int(min(max(budget_ms / max(estimate, 1e-3), min_reps), max_reps))
    return statistics.median(timed(reps))


def _inputs(problem: TuningProblem, shape, device, seed: int):
    """q [B, T, H G, K], k [B, T, H, K], v [B, T, H, V] and an upstream gradient dO, random, in the problem's dtype."""
    B, T, H = shape
    dtype = getattr(torch, problem.dtype)
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device, dtype=dtype)

    HQ = H * problem.group_size
    return randn(B, T, HQ, problem.head_k), randn(B, T, H, problem.head_k), randn(B, T, H, problem.head_v), \
        randn(B, T, HQ, problem.head_v)


def run_layer(problem: TuningProblem, spec, q, k, v, do, backward: bool, library: KernelLibrary, folders=(),
              configs: dict | None = None):  # fmt: skip
    """The layer at L = spec.chunk_size on (q, k, v) from a fresh start, through the launchers, and with
    ``backward`` its backward from ``do``: (o, [dq, dk, dv] or None). Kernels from ``library``, each with the
    config ``configs`` names, else the one the logs in ``folders`` give (none: the default schedule)."""
    B, T, HQ, K = q.shape
    H = k.shape[2]
    plan = dispatch.plan_call(q.device, spec, q.shape, dispatch.phase_kernels(backward, final_state=False),
                              K**-0.5, library, folders, configs)  # fmt: skip
    seen = torch.zeros(B, dtype=torch.int64, device=q.device)
    layout = batch_layout(B, T, spec.chunk_size, spec.window, seen)
    initial = torch.zeros(B, H, spec.resolution, spec.state_width, dtype=getattr(torch, spec.acc_dtype),
                          device=q.device)  # fmt: skip
    o = q.new_empty(B, T, HQ, spec.head_v)
    states, _ = launch_forward(plan, q, k, v, initial, o, layout, final_state=False)
    if not backward:
        return o, None
    grads = [x.new_empty(x.shape) for x in (q, k, v)]
    launch_backward(plan, q, k, v, states, do, None, *grads, layout)
    return o, grads


def record_arguments(problem, spec, shape, device, backward: bool, library: KernelLibrary) -> dict:
    """Each kernel's launch arguments at ``shape``, from one run of the layer at L = spec.chunk_size with
    default schedules: kernel name -> args."""
    q, k, v, do = _inputs(problem, shape, device, seed=1)
    names = dispatch.phase_kernels(backward, final_state=False)
    with record_launches() as launches:
        run_layer(problem, spec, q, k, v, do, backward, library)
    arguments = {launch.kernel.kernel.name: launch.args for launch in launches}
    missing = set(names) - set(arguments)
    if missing:
        raise RuntimeError(f"the op launched none of {sorted(missing)} at L = {spec.chunk_size}")
    return arguments


def verify(problem, spec, kernel: str, config, device, seed: int, backward: bool, library: KernelLibrary) -> float:
    """Largest relative error (NaN counts as infinite) of the op with ``kernel`` scheduled by ``config``,
    against the float64 reference, on a small random problem whose length is no multiple of L; outputs and
    temporaries start as NaN."""
    shape = (2, 3 * spec.chunk_size + 5, 2)
    q, k, v, do = _inputs(problem, shape, device, seed)
    with poisoned_allocations():
        o, grads = run_layer(problem, spec, q, k, v, do, backward, library, configs={kernel: config})
    qr, kr, vr = (x.detach().cpu().double().requires_grad_(backward) for x in (q, k, v))
    ref = bla_quadratic(qr, kr, vr, problem.window, problem.resolution, problem.num_slots, problem.head_k**-0.5)
    errors = [_relative(o, ref.detach())]
    if backward:
        ref.backward(do.cpu().double())
        floor = do.double().norm().item()
        errors += [_relative(g, r.grad, floor) for g, r in zip(grads, (qr, kr, vr))]
    return max(errors)


def _relative(out, ref, floor: float = 0.0) -> float:
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out.double().cpu() - ref).norm() / max(ref.norm().item(), floor, 1e-300)).item()


class _Deadline:
    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.time() + seconds

    def passed(self) -> bool:
        return self.end is not None and time.time() > self.end


def tune_problem(entry: dict, device, library: KernelLibrary, deadline: _Deadline, bar, log_measure) -> dict:
    """Measure one problem's candidates (see the module docstring); returns its records and measurements."""
    problem = TuningProblem(**entry["problem"])
    buckets = [tuple(b) for b in problem.buckets]
    tol = TOLERANCE[problem.dtype]
    result = {"problem": problem.as_dict(), "kernels": {}, "chunk_sizes": {}, "skipped": []}
    best = {}  # (kernel, L, bucket) -> (config, ms, default_ms, candidates)
    for L_text, by_kernel in entry["kernels"].items():
        L = int(L_text)
        spec = problem.spec(L)
        backward = "chunk_backward" in by_kernel
        arguments = {}
        for bucket in buckets:
            try:
                arguments[bucket] = record_arguments(problem, spec, bucket, device, backward, library)
            except Exception as error:  # noqa: BLE001 - e.g. past 32-bit indexing: no bucket at this L
                result["skipped"].append({"L": L, "bucket": bucket, "why": f"{type(error).__name__}: {error}"})
        for kernel, candidates in by_kernel.items():
            if kernels.get(kernel).final_state:  # planned by older builders; no timed call launches them
                continue
            rows = []
            for index, candidate in enumerate(candidates):
                if deadline.passed():
                    raise TimeoutError
                config = None if candidate["default"] else candidate["config"]
                row = {"config": candidate["config"], "default": candidate["default"], "ms": {}}
                try:
                    function = library.function(kernel, spec, device, config)
                    if len(candidates) > 1:
                        row["error"] = verify(problem, spec, kernel, config, device, seed=1000 + index,
                                              backward=kernels.get(kernel).phase == "backward", library=library)
                        row["verified"] = row["error"] <= tol
                    else:
                        row["verified"] = True  # the one default (a scan): checked by every other candidate's run
                    first = next((b for b in buckets if b in arguments), None)
                    if row["verified"] and first is not None:
                        args = arguments[first][kernel]
                        row["ms"][first] = time_call(lambda args=args, f=function: call(f, args), device)
                except Exception as error:  # noqa: BLE001 - a candidate that fails to load or run is out
                    row.update(verified=False, failed=f"{type(error).__name__}: {str(error)[:300]}")
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                rows.append(row)
                bar.update(1)
            ranked = sorted((r for r in rows if r["verified"] and r["ms"]), key=lambda r: min(r["ms"].values()))
            again = ranked[:TOP_K] + [r for r in rows if r["default"] and r not in ranked[:TOP_K]]
            for bucket in [b for b in buckets if b in arguments][1:]:
                args = arguments[bucket][kernel]
                for row in again:
                    if deadline.passed():
                        raise TimeoutError
                    if not row["ms"]:
                        continue  # the default failed: nothing to compare with
                    config = None if row["default"] else row["config"]
                    function = library.function(kernel, spec, device, config)
                    row["ms"][bucket] = time_call(lambda args=args, f=function: call(f, args), device)
            default = next((r for r in rows if r["default"]), None)
            for bucket in arguments:
                if default is None or bucket not in default["ms"]:
                    continue
                timed = [r for r in rows if bucket in r["ms"]]
                winner = min(timed, key=lambda r: r["ms"][bucket])
                if winner["ms"][bucket] > default["ms"][bucket] * (1 - MARGIN):
                    winner = default
                best[(kernel, L, bucket)] = (winner["config"], winner["ms"][bucket], default["ms"][bucket],
                                             sum(r["verified"] for r in rows))  # fmt: skip
            result["kernels"][f"{kernel} L={L}"] = [
                {**r, "ms": {json.dumps(list(b)): t for b, t in r["ms"].items()}} for r in rows
            ]  # fmt: skip
            log_measure(f"{problem.tag()} L={L} {kernel}: " + ", ".join(
                f"{json.dumps(list(b))} best {best[(kernel, L, b)][1]:.3f} ms (default {best[(kernel, L, b)][2]:.3f})"
                for b in buckets if (kernel, L, b) in best))  # fmt: skip
    result["records"] = _records(problem, entry, best, result)
    return result


def _mode_kernels(mode: str) -> tuple[str, ...]:
    """The kernels a call launches in ``mode`` (the layer run by the tuner asks for no final states)."""
    return dispatch.phase_kernels(mode == "training", final_state=False)


def _records(problem, entry, best, result) -> list[dict]:
    records = []
    params = problem.params
    for (kernel, L, bucket), (config, ms, default_ms, count) in best.items():
        if kernel not in entry["tunable"]:
            continue  # the scans and final-state kernels: timed for the totals, no schedule to choose
        records.append({
            "kernel": kernel, "params": params, "chunk_size": L, "bucket": dict(zip("BTH", bucket)),
            "config": config, "ms": round(ms, 4), "default_ms": round(default_ms, 4), "candidates": count,
        })  # fmt: skip
    for mode, sizes in entry["chunk_sizes"].items():
        default_L = entry["default_chunk_size"][mode]
        for bucket in map(tuple, problem.buckets):
            totals = {}
            for L in sizes:
                keys = [(kernel, L, bucket) for kernel in _mode_kernels(mode)]
                if all(key in best for key in keys):
                    totals[L] = (sum(best[key][1] for key in keys), sum(best[key][2] for key in keys))
            if default_L not in totals:
                continue
            chosen = min(totals, key=lambda L: totals[L][0])
            if totals[chosen][0] > totals[default_L][1] * (1 - MARGIN):
                chosen = default_L
            result["chunk_sizes"][f"{mode} {json.dumps(list(bucket))}"] = {
                "estimates_ms": {str(L): t for L, t in totals.items()}, "chosen": chosen, "default": default_L,
            }  # fmt: skip
            records.append({
                "kernel": tuning_logs.CHUNK_SIZE, "mode": mode, "params": params, "chunk_size": chosen,
                "bucket": dict(zip("BTH", bucket)), "ms": round(totals[chosen][0], 4),
                "default_chunk_size": default_L, "default_ms": round(totals[default_L][1], 4),
            })  # fmt: skip
    return records


def evidence(problem: TuningProblem, modes, tunable, device, shapes, folders: tuple, library: KernelLibrary,
             deadline: _Deadline) -> list[dict]:  # fmt: skip
    """The layer planned from no log (default) against planned from the logs in ``folders`` (tuned), forward and
    forward + backward, at ``shapes``; each row also says which L and schedules the tuned plan picked."""
    rows = []
    layer = problem.layer
    for shape in shapes:
        q, k, v, do = _inputs(problem, shape, device, seed=7)
        row = {"shape": list(shape)}
        for mode in (m for m in ("inference", "training") if m in modes):
            backward = mode == "training"
            for setting, logs in (("default", ()), ("tuned", folders)):
                if deadline.passed():
                    raise TimeoutError
                spec = layer.kernel(dispatch.chunk_size(device, layer, q.shape, backward, logs))
                try:
                    row[f"{mode} {setting} ms"] = time_call(
                        lambda spec=spec, logs=logs: run_layer(problem, spec, q, k, v, do, backward, library, logs),
                        device, budget_ms=100.0)  # fmt: skip
                except Exception as error:  # noqa: BLE001 - e.g. past 32-bit indexing
                    row[f"{mode} refused"] = f"{type(error).__name__}: {str(error)[:300]}"
                    break
                if setting == "tuned":
                    configs = dispatch.log_index(device, logs)
                    row[f"{mode} picked"] = {"L": spec.chunk_size, "configs": {
                        name: configs.config(name, spec.as_dict(), shape) for name in _mode_kernels(mode)
                        if name in tunable}}  # fmt: skip
        rows.append(row)
    return rows


def _revert_slower(results: list[dict], rows_by_problem: dict, margin: float = 0.03) -> list[tuple]:
    """Where the tuned op ran slower than the default (by more than ``margin``) in a (mode, bucket), set that
    bucket's chunk-length record back to the default L. Returns the (problem tag, mode, bucket) reverted."""
    reverted = []
    for result in results:
        problem = TuningProblem(**result["problem"])
        for row in rows_by_problem.get(problem.tag(), []):
            for mode in tuning_logs.MODES:
                tuned, default = row.get(f"{mode} tuned ms"), row.get(f"{mode} default ms")
                if tuned is None or default is None or tuned <= default * (1 + margin):
                    continue
                for record in result["records"]:
                    if (record["kernel"] == tuning_logs.CHUNK_SIZE and record["mode"] == mode
                            and [record["bucket"][x] for x in "BTH"] == row["shape"]
                            and record["chunk_size"] != record["default_chunk_size"]):  # fmt: skip
                        record["chunk_size"], record["ms"] = record["default_chunk_size"], record["default_ms"]
                        reverted.append((problem.tag(), mode, tuple(row["shape"])))
    return reverted


def measure_work(
    work: Path, log_dir: Path | None = None, report: Path | None = None, device: str | None = None,
    deadline_s: float | None = None, with_evidence: bool = True, extra_shapes=(), progress: bool = True,
    label: str = "tuned",
) -> dict:
    """Measure every candidate in the work folder ``work`` (built by ``builder.build_work``), write the tuning
    log into ``log_dir`` (default: the user's, ``env.tuning_dir()``) and every measurement into ``report``
    (default ``work/measurements.json``). ``deadline_s``: stop starting new work after that many seconds
    (the log then holds the problems finished). ``extra_shapes``: (B, T, H) to time end to end besides the
    buckets. Returns the report."""
    start = time.time()
    work = Path(work)
    tasks = json.loads((work / TASKS).read_text())
    if tasks.get("format") != WORK_FORMAT:
        raise ValueError(f"{work / TASKS} is not a tuning work folder")
    device = torch.device(device or ("cuda" if tasks["device_kind"] == "cuda" else "cpu"))
    identity = device_identity(device)
    if identity["target"] != tasks["target"]:
        raise ValueError(f"the candidates were built for {tasks['target']}, this device is {identity['target']}")
    log_dir = Path(log_dir) if log_dir else env.tuning_dir()
    report = Path(report) if report else work / "measurements.json"
    library = work_library(work / "kernels")
    return _measure(tasks, device, identity, library, log_dir, report, _Deadline(deadline_s), with_evidence,
                    extra_shapes, progress, label, start)  # fmt: skip


def work_library(kernels_dir: Path) -> KernelLibrary:
    """The kernels of a work folder: every candidate is there, so nothing is ever compiled behind a miss."""
    return KernelLibrary(kernels_dir, env.cache_dir(), build_allowed=False)


def _tuned_folders(log_dir: Path) -> tuple[str, ...]:
    """Where the tuned plan reads logs: the new log's folder, then the shipped logs (as a user's would be)."""
    return (str(log_dir), str(tuning_logs.shipped_dir()))


def _measure(tasks, device, identity, library, log_dir, report, deadline, with_evidence, extra_shapes, progress,
             label, start) -> dict:  # fmt: skip
    total = sum(len(c) for p in tasks["problems"] for by_kernel in p["kernels"].values() for c in by_kernel.values())
    bar = progress_bar(total, "measure", progress)
    lines = []

    def log_measure(line):
        lines.append(line)
        (bar.write if hasattr(bar, "write") else print)(line)

    out = {"device": identity, "tasks": {k: tasks[k] for k in ("target", "build_seconds", "counts")},
           "problems": [], "evidence": {}, "unfinished": []}  # fmt: skip
    results, path = [], None
    for entry in tasks["problems"]:
        problem = TuningProblem(**entry["problem"])
        try:
            if deadline.passed():
                raise TimeoutError
            result = tune_problem(entry, device, library, deadline, bar, log_measure)
            results.append(result)
            path = _write(log_dir, identity, results, tasks, start, label)
            if with_evidence:
                shapes = list(map(tuple, problem.buckets)) + [tuple(s) for s in extra_shapes]
                modes = list(entry["chunk_sizes"])
                folders = _tuned_folders(log_dir)
                rows = evidence(problem, modes, entry["tunable"], device, shapes, folders, library, deadline)
                out["evidence"][problem.tag()] = rows
                reverted = _revert_slower([result], out["evidence"])
                if reverted:
                    path = _write(log_dir, identity, results, tasks, start, label)
                    again = evidence(problem, modes, entry["tunable"], device, sorted({r[2] for r in reverted}),
                                     folders, library, deadline)  # fmt: skip
                    out["evidence"][problem.tag()] += [dict(r, after_revert=True) for r in again]
                    result["reverted"] = reverted
                for row in rows:
                    log_measure(f"{problem.tag()} {row}")
        except TimeoutError:
            out["unfinished"].append(problem.tag())
            log_measure(f"deadline: {problem.tag()} not finished")
        except Exception as error:  # noqa: BLE001 - one problem's failure must not lose the others
            import traceback

            out.setdefault("failed", {})[problem.tag()] = traceback.format_exc()[-3000:]
            log_measure(f"failed: {problem.tag()}: {type(error).__name__}: {error}")
        out["problems"] = results
        out["seconds"] = round(time.time() - start, 1)
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(out, indent=1, default=str))
    bar.close()
    out["log"] = str(path) if path else None
    out["lines"] = lines
    report.write_text(json.dumps(out, indent=1, default=str))
    return out


def evidence_work(work: Path, log_dir: Path | None = None, report: Path | None = None, shapes=(),
                  kernels: Path | None = None, deadline_s: float | None = None) -> dict:  # fmt: skip
    """Time the op end to end, tuned (the logs in ``log_dir`` and the shipped ones) against the defaults, for the
    problems of the work folder ``work`` at ``shapes`` (default: their buckets), with the kernels of ``kernels``
    (default ``work/kernels``; a manifest there may name files elsewhere). Writes and returns the report."""
    start = time.time()
    tasks = json.loads((Path(work) / TASKS).read_text())
    device = torch.device("cuda" if tasks["device_kind"] == "cuda" else "cpu")
    log_dir = Path(log_dir) if log_dir else env.tuning_dir()
    report = Path(report) if report else Path(work) / "evidence.json"
    library = work_library(kernels or Path(work) / "kernels")
    deadline = _Deadline(deadline_s)
    out = {"device": device_identity(device), "evidence": {}, "unfinished": []}
    for entry in tasks["problems"]:
        problem = TuningProblem(**entry["problem"])
        wanted = [tuple(x) for x in shapes] or [tuple(b) for b in problem.buckets]
        try:
            rows = evidence(problem, list(entry["chunk_sizes"]), entry["tunable"], device, wanted,
                            _tuned_folders(log_dir), library, deadline)  # fmt: skip
            out["evidence"][problem.tag()] = rows
            for row in rows:
                print(f"{problem.tag()} {row}", flush=True)
        except TimeoutError:
            out["unfinished"].append(problem.tag())
    out["seconds"] = round(time.time() - start, 1)
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps(out, indent=1, default=str))
    return out


def _write(log_dir, identity, results, tasks, start, label) -> Path:
    records = [r for result in results for r in result["records"]]
    verified = sum(row["verified"] for result in results for rows in result["kernels"].values() for row in rows)
    tuning = dict(tasks["counts"], verified=verified, build_seconds=tasks["build_seconds"],
                  measure_seconds=round(time.time() - start, 1), sources=tasks.get("sources"))  # fmt: skip
    return tuning_logs.write_log(log_dir, tuning_logs.new_log(identity, records, tuning), label)
