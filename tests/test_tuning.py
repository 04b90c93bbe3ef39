"""Tuning logs and the tuner, on the CPU: the op picks the chunk length and schedule a log gives for this device
(nearest shape bucket); corrupt, foreign and unusable logs are reported once and skipped, never crash the op; the
declared search space; and the tuner end to end (build, verify, time, write a log the op then uses).
"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from bla_tvm import bla_quadratic, blurry_window_attention, dispatch, kernels, tuning_logs
from bla_tvm.layer import KernelSpec, LayerSpec
from bla_tvm.runtime import record_launches, target_id

#: a small layer, so that its CPU kernels compile in seconds
LAYER = {"window": 16, "resolution": 7, "num_slots": 9}
K, V = 8, 8
PARAMS = dict(LAYER, head_k=K, head_v=V, dtype="float32", group_size=1)
CPU = torch.device("cpu")
LAYER_SPEC = LayerSpec(**PARAMS)


def cpu_identity() -> dict:
    return {"kind": "cpu", "name": target_id(CPU), "target": target_id(CPU)}


def chunk_record(L, mode="inference", T=256, params=PARAMS) -> dict:
    return {"kernel": "chunk_size", "mode": mode, "params": params, "chunk_size": L,
            "bucket": {"B": 1, "T": T, "H": 2}, "ms": 1.0, "default_chunk_size": 64, "default_ms": 2.0}  # fmt: skip


def kernel_record(kernel, L, config, T=256, params=PARAMS) -> dict:
    return {"kernel": kernel, "params": params, "chunk_size": L, "bucket": {"B": 1, "T": T, "H": 2},
            "config": config, "ms": 1.0, "default_ms": 2.0, "candidates": 2}  # fmt: skip


def write(folder, name, records, device=None) -> None:
    log = tuning_logs.new_log(device or cpu_identity(), records, {"candidates": 2})
    (folder / name).write_text(json.dumps(log))


@pytest.fixture
def log_dir(tmp_path, monkeypatch):
    """An empty user tuning folder, tuning on, nothing read or reported yet."""
    monkeypatch.setenv("BLA_TVM_TUNING_DIR", str(tmp_path))
    monkeypatch.delenv("BLA_TVM_NO_TUNING", raising=False)
    tuning_logs.reload()
    yield tmp_path
    tuning_logs.reload()


@pytest.fixture
def loaded():
    """Every (kernel, chunk length, config) the op launches."""
    with record_launches() as launches:
        yield Launched(launches)


class Launched:
    """(kernel, chunk length, config) of each recorded launch."""

    def __init__(self, launches):
        self.launches = launches

    def __iter__(self):
        return ((x.kernel.kernel.name, x.kernel.spec.chunk_size, x.kernel.config) for x in self.launches)

    def __contains__(self, item):
        return item in list(self)

    def clear(self):
        self.launches.clear()


def chunk_size(shape, backward=False, params=PARAMS):
    """The op's chunk length for ``params`` at ``shape`` on the CPU (64 where no log has one)."""
    return dispatch.chunk_size(CPU, LayerSpec(**params), shape, backward)


def run_layer(T=200):
    g = torch.Generator().manual_seed(T)
    q, k = (torch.randn(1, T, 2, K, generator=g) for _ in range(2))
    v = torch.randn(1, T, 2, V, generator=g)
    o, _ = blurry_window_attention(q, k, v, **LAYER)
    expected = bla_quadratic(q, k, v, **LAYER)
    assert ((o.double() - expected).norm() / expected.norm()).item() < 1e-4
    return o


def test_op_uses_the_logged_chunk_length_and_schedule(log_dir, loaded):
    write(log_dir, "mine.json", [chunk_record(32), kernel_record("chunk_output", 32, {"vector_lanes": 8})])
    run_layer()
    assert ("chunk_output", 32, {"vector_lanes": 8}) in loaded
    assert ("chunk_state", 32, None) in loaded  # no record: default schedule
    assert all(L == 32 for _, L, _ in loaded)


def test_nearest_bucket_wins(log_dir):
    write(log_dir, "mine.json", [chunk_record(16, T=1024), chunk_record(32, T=16384),
                                 kernel_record("chunk_output", 16, {"vector_lanes": 8}, T=1024),
                                 kernel_record("chunk_output", 16, {"vector_lanes": 4}, T=16384)])  # fmt: skip
    assert chunk_size((1, 2000, 2, K)) == 16
    assert chunk_size((1, 9000, 2, K)) == 32
    assert chunk_size((8, 1024, 16, K)) == 16  # more heads: still nearer 1k
    assert chunk_size((1, 1024, 2, K), backward=True) == 64  # no training record: the default
    assert chunk_size((1, 1024, 2, K), params=dict(PARAMS, num_slots=7)) == 64
    spec = LAYER_SPEC.kernel(16).as_dict()
    logs = dispatch.log_index(CPU, dispatch.log_folders())
    assert logs.config("chunk_output", spec, (1, 600, 2, K)) == {"vector_lanes": 8}
    assert logs.config("chunk_output", spec, (1, 60000, 2, K)) == {"vector_lanes": 4}


def test_logged_chunk_length_never_refuses_a_shape_the_default_runs(log_dir):
    """A shorter L means more chunks: where its buffers would pass 32-bit indexing, the default L is used."""
    wide = dict(PARAMS, head_k=128, head_v=128, resolution=63, num_slots=63, window=512)
    write(log_dir, "mine.json", [chunk_record(16, T=16384, params=wide)])
    assert chunk_size((4, 16384, 16, 128), params=wide) == 16
    assert chunk_size((4, 65536, 16, 128), params=wide) == 64  # 4.2e9 elements at L = 16: the default


def test_user_logs_come_before_shipped_ones(log_dir, monkeypatch, tmp_path_factory):
    shipped = tmp_path_factory.mktemp("shipped")
    monkeypatch.setattr(tuning_logs, "shipped_dir", lambda: shipped)
    write(shipped, "shipped.json", [chunk_record(16)])
    write(log_dir, "mine.json", [chunk_record(32)])
    assert chunk_size((1, 256, 2)) == 32


def test_no_tuning_variable_ignores_logs(log_dir, monkeypatch):
    write(log_dir, "mine.json", [chunk_record(32)])
    assert chunk_size((1, 256, 2)) == 32
    monkeypatch.setenv("BLA_TVM_NO_TUNING", "1")
    assert chunk_size((1, 256, 2)) == 64
    monkeypatch.delenv("BLA_TVM_NO_TUNING")  # each call reads the environment anew (``env.snapshot``)
    assert chunk_size((1, 256, 2)) == 32


def test_explicit_log_folders_override_the_environment(log_dir, tmp_path_factory):
    """The tuner's way: folders passed to the dispatch, whatever BLA_TVM_TUNING_DIR says."""
    other = tmp_path_factory.mktemp("other")
    write(log_dir, "mine.json", [chunk_record(32)])
    write(other, "theirs.json", [chunk_record(16)])
    assert dispatch.chunk_size(CPU, LAYER_SPEC, (1, 256, 2), False, folders=[other]) == 16
    assert dispatch.chunk_size(CPU, LAYER_SPEC, (1, 256, 2), False, folders=[]) == 64
    assert chunk_size((1, 256, 2)) == 32


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        json.dumps({"format": "something else", "version": 1}),
        json.dumps({"format": tuning_logs.FORMAT, "version": 99, "device": {}, "records": []}),
        json.dumps(tuning_logs.new_log(cpu_identity(), [], {}) | {"records": [{"kernel": "chunk_size"}]}),
        json.dumps(tuning_logs.new_log(cpu_identity(), [], {}) | {"records": [chunk_record(48)]}),  # no such L
        json.dumps(tuning_logs.new_log(cpu_identity(), [chunk_record(32)], {}) | {"tuning": ["not", "an object"]}),
        json.dumps(tuning_logs.new_log(cpu_identity(), [], {}) | {"records": [chunk_record(32, params=dict(PARAMS, window=[16]))]}),
        json.dumps(tuning_logs.new_log(cpu_identity(), [], {}) | {"records": [chunk_record(32, params=dict(PARAMS, window={"W": 16}))]}),
        "[" * 100_000 + "]" * 100_000,
        '{"format": ' * 100_000 + "1" + "}" * 100_000,
    ],
    ids=["not-json", "other-format", "other-version", "record-missing-fields", "bad-chunk-size", "tuning-not-object",
         "params-list", "params-dict", "deep-array", "deep-object"],  # fmt: skip
)
def test_corrupt_log_is_reported_once_and_skipped(log_dir, loaded, caplog, content):
    (log_dir / "broken.json").write_text(content)
    write(log_dir, "good.json", [kernel_record("chunk_output", 64, {"vector_lanes": 8})])
    with caplog.at_level(logging.INFO, logger="bla_tvm.tuning"):
        run_layer()
        run_layer(T=150)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "broken.json" in warnings[0].getMessage()
    assert ("chunk_output", 64, {"vector_lanes": 8}) in loaded  # the good log still applies
    no_record = [r for r in caplog.records if "no tuning" in r.getMessage()]
    assert len(no_record) == 1  # one clear message, not one per call


def test_foreign_log_is_skipped(log_dir, loaded, caplog):
    foreign = {"kind": "cuda", "name": "NVIDIA H200", "compute_capability": "9.0", "target": "sm_90"}
    write(log_dir, "h200.json", [chunk_record(16), kernel_record("chunk_output", 16, {"vector_lanes": 4})], foreign)
    with caplog.at_level(logging.INFO, logger="bla_tvm.tuning"):
        run_layer()
    assert all(L == 64 and config is None for _, L, config in loaded)
    assert any("h200.json" in r.getMessage() and "NVIDIA H200" in r.getMessage() for r in caplog.records)


def test_unusable_config_falls_back_to_the_default(log_dir, loaded, caplog):
    write(log_dir, "mine.json", [kernel_record("chunk_output", 64, {"no_such_knob": 3})])
    with caplog.at_level(logging.WARNING, logger="bla_tvm.tuning"):
        run_layer()
        run_layer(T=150)
    assert ("chunk_output", 64, None) in loaded
    assert len([r for r in caplog.records if "unusable" in r.getMessage()]) == 1


def test_search_space_is_declared_over_config_fields():
    import dataclasses

    from bla_tvm.schedules import cpu, cuda, space

    for kind, cls in (("cpu", cpu.CpuConfig), ("cuda", cuda.CudaConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        for kernel in kernels.TUNABLE:
            points = space.candidate_configs(kind, kernel)
            assert points[0] == space.config_dict(cls())  # the default first
            assert len(points) == len({json.dumps(p, sort_keys=True) for p in points}) > 1
            assert all(set(p) == fields for p in points)
            cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in points[-1].items()})
        assert space.candidate_configs(kind, "state_scan") == [space.config_dict(cls())]
    fp32 = KernelSpec(chunk_size=16, **PARAMS)
    assert all(p["tensor_cores"] for p in space.candidate_configs("cuda", "chunk_output", spec=fp32))
    bf16 = KernelSpec(chunk_size=16, **dict(PARAMS, dtype="bfloat16"))
    assert any(not p["tensor_cores"] for p in space.candidate_configs("cuda", "chunk_output", spec=bf16))
    one_knob = space.candidate_configs("cuda", "chunk_output", limit=4)[1:]
    default = space.config_dict(cuda.CudaConfig())
    assert all(sum(p[k] != default[k] for k in p) == 1 for p in one_knob)


def test_tuner_end_to_end_on_the_cpu(tmp_path, log_dir, loaded):
    """Build two schedules per kernel at two chunk lengths, measure, write a log: the op then uses it."""
    from bla_tvm.tuning import TuningProblem, build_work, measure_work

    problem = TuningProblem(**PARAMS, buckets=[(1, 256, 2)], modes=("inference",), chunk_sizes=(64, 32))
    tasks = build_work([problem], "cpu", None, tmp_path / "work", limit=2, jobs=1, progress=False)
    assert tasks["counts"] == {"candidates": 10, "built": 10, "rejected": 0}  # per L: 2 + 1 (scan) + 2
    report = measure_work(tmp_path / "work", log_dir, progress=False)
    log = tuning_logs.read_log(report["log"])
    assert log["device"] == cpu_identity()
    kernels = {(r["kernel"], r["chunk_size"]) for r in log["records"]}
    assert {("chunk_state", 64), ("chunk_output", 64), ("chunk_state", 32), ("chunk_output", 32)} <= kernels
    (chosen,) = [r for r in log["records"] if r["kernel"] == "chunk_size"]
    assert chosen["mode"] == "inference" and chosen["chunk_size"] in (64, 32)
    rows = report["evidence"][problem.tag()]
    assert rows and all(row["inference default ms"] > 0 and row["inference tuned ms"] > 0 for row in rows)
    loaded.clear()
    tuning_logs.reload()
    run_layer(T=256)
    output = [(L, c) for kernel, L, c in loaded if kernel == "chunk_output"]
    expected = next(r for r in log["records"] if r["kernel"] == "chunk_output" and r["chunk_size"] == output[0][0])
    assert output[0] == (chosen["chunk_size"], expected["config"])


def test_logged_chunk_length_under_torch_compile(log_dir, loaded):
    """torch.compile(fullgraph=True) traces the lookup without a break and bakes in the logged L."""
    write(log_dir, "mine.json", [chunk_record(32)])
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 100, 2, 8, generator=g) for _ in range(3))

    def layer(q, k, v):
        return blurry_window_attention(q * 0.5, k, v, **LAYER)[0].relu()

    out = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v)
    assert ((out - layer(q, k, v)).abs().max()) == 0.0
    assert {L for _, L, _ in loaded} == {32}
