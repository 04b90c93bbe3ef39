"""The torch ops ``bla_tvm::forward`` (returning (o, states): the output and the chunk-start states the backward
reads) and ``bla_tvm::backward``, and the public entry point around them, on the CPU: torch.library's opcheck,
torch.compile, zero-copy argument passing, input validation, the tvm-free runtime path, the kernel cache key
and concurrent first builds. Gradients themselves are tested in test_backward_cpu.py and test_training.py.

Shapes come from ``helpers.KERNEL_POOL`` where possible, so these tests reuse kernels that
test_forward_cpu.py compiles in the same session.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from helpers import KERNEL_POOL, F64, max_rel_err

import bla_tvm
import bla_tvm.kernel_cache
import bla_tvm.runtime
from bla_tvm import bla_recurrent, blurry_window_attention, kernels
from bla_tvm.layer import KernelSpec
from bla_tvm.runtime import kernel_key, record_launches

SHAPE = next(s for s in KERNEL_POOL if (s.K, s.V) == (40, 72))  # M > N, K != V, neither a power of two
ARGS = dict(window=SHAPE.W, resolution=SHAPE.N, num_slots=SHAPE.M)
CHUNK = 64  # the CPU chunk length (bla_tvm.dispatch.default_chunk_size)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def qkv(B=2, T=70, H=3, K=SHAPE.K, V=SHAPE.V, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    return q.to(dtype), k.to(dtype), torch.randn(B, T, H, V, generator=gen).to(dtype)


def op_args(q, k, v, scale=0.3):
    """The 12 arguments of bla_tvm::forward for a fresh start (zero initial states, nothing seen), no
    cu_seqlens, final states returned."""
    acc = F64 if q.dtype == F64 else torch.float32
    B, H = k.shape[0], k.shape[2]
    initial = torch.zeros(B, H, SHAPE.N, SHAPE.K + SHAPE.V, dtype=acc, device=q.device)
    seen = torch.zeros(B, dtype=torch.int64, device=q.device)
    return (q, k, v, initial, seen, None, True, SHAPE.W, SHAPE.N, SHAPE.M, scale, CHUNK)


def forget_source_digest() -> None:
    """A fresh process hashes the compute and schedule sources anew for its kernel keys, while this one keeps
    the digest it took first: if the sources were edited since (a live checkout), the keys would differ and a
    subprocess would not find the kernels built here. Called before building kernels a subprocess will load."""
    bla_tvm.runtime.source_digest.cache_clear()


def run_python(code: str, env: dict | None = None, timeout=300) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with this process's environment (hence its BLA_TVM_CACHE_DIR)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- torch.library ------------------------------------------------------------------------------------------


def num_chunks(T):
    return (T + CHUNK - 1) // CHUNK


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck(dtype, requires_grad):
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch all agree with the kernel
    (with inputs that require grad, AOT dispatch also runs the registered backward)."""
    q, k, v = (x.requires_grad_(requires_grad) for x in qkv(dtype=dtype))
    torch.library.opcheck(torch.ops.bla_tvm.forward, op_args(q, k, v))


def test_forward_returns_output_and_chunk_states():
    q, k, v = qkv(B=2, T=70, H=3)
    o, flat, _, _ = torch.ops.bla_tvm.forward(*op_args(q, k, v))
    assert o.shape == (2, 70, 3, SHAPE.V) and o.dtype == torch.float32
    grid = (2, num_chunks(70), 3, SHAPE.N, SHAPE.K + SHAPE.V)
    assert flat.shape == (math.prod(grid),) and flat.dtype == torch.float32  # flat: see bla_tvm.ops.forward
    states = flat.view(grid)
    assert torch.isfinite(states).all()
    assert torch.equal(states[:, 0], torch.zeros_like(states[:, 0]))  # nothing precedes the first chunk
    assert max_rel_err(o, bla_recurrent(q, k, v, *ARGS.values(), scale=0.3)) <= 1e-5
    assert not states.requires_grad


def test_eager_inference_equals_the_op_without_its_dispatch(monkeypatch):
    """Eager inference (no gradient wanted) runs the op's code directly, and gives what the op gives, final
    states included; a call that wants gradients goes through the op."""
    q, k, v = qkv(B=2, T=70, H=3)
    o_op, _, final_op, _ = torch.ops.bla_tvm.forward(*op_args(q, k, v))
    through_op = []
    original = torch.ops.bla_tvm.forward
    monkeypatch.setattr(torch.ops.bla_tvm, "forward", lambda *a: through_op.append(1) or original(*a))
    with torch.no_grad():
        o, state = blurry_window_attention(q, k, v, **ARGS, scale=0.3, output_final_state=True)
    assert not through_op
    assert torch.equal(o, o_op)
    assert torch.equal(torch.cat([state.key_state, state.value_state], -1), final_op)
    blurry_window_attention(q.requires_grad_(), k, v, **ARGS, scale=0.3)
    assert not through_op  # eager training: ``ops.EagerForward``, the op's autograd without its dispatch


def test_eager_training_equals_the_ops_autograd():
    """Eager training (``ops.EagerForward``) gives the outputs and every gradient the op's registered autograd
    gives, bit for bit: o and the final state's gradients flowing into q, k, v and the initial state."""
    q, k, v = qkv(B=2, T=70, H=3)
    args = op_args(q, k, v)
    initial = args[3].clone().normal_()
    grads = []
    for run in (torch.ops.bla_tvm.forward, bla_tvm.ops.EagerForward.apply):
        inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, initial)]
        o, _, final, _ = run(*inputs, *args[4:])
        (o.square().sum() + final.sin().sum()).backward()
        grads.append([o, final, *(x.grad for x in inputs)])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_backward_allocates_no_zero_gradients_for_the_saved_states():
    """The op's outputs that carry no gradient (the chunk states, the layout) get none: autograd would otherwise
    fill zeros of their size for the backward (at the training bench's shape, 63 MiB at the peak)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Fills(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            aten = torch.ops.aten
            if func in (aten.zeros.default, aten.new_zeros.default, aten.zeros_like.default):
                self.sizes.append(out.numel())
            return out

    q, k, v = (x.requires_grad_() for x in qkv(B=1, T=200, H=2))
    o, _ = blurry_window_attention(q, k, v, **ARGS)
    do = torch.randn_like(o)
    with Fills() as fills:
        o.backward(do)
    states = 1 * num_chunks(200) * 2 * SHAPE.N * (SHAPE.K + SHAPE.V)
    assert states not in fills.sizes and all(size < states for size in fills.sizes), fills.sizes
    assert q.grad is not None and torch.isfinite(q.grad).all()


def backward_args(q, k, v, scale=0.3, seed=1):
    """The 14 arguments of bla_tvm::backward: states and layout from a forward call, random upstream
    gradients."""
    args = op_args(q, k, v, scale)
    _, states, final, layout = torch.ops.bla_tvm.forward(*args)
    gen = torch.Generator().manual_seed(seed)
    do = torch.randn(*q.shape[:3], v.shape[-1], generator=gen).to(q.dtype)
    dfinal = torch.randn(final.shape, generator=gen, dtype=final.dtype)
    return (q, k, v, states, layout, do, dfinal, False, num_chunks(q.shape[1]), *args[7:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_opcheck_backward(dtype):
    torch.library.opcheck(torch.ops.bla_tvm.backward, backward_args(*qkv(dtype=dtype)))


def test_opcheck_backward_non_contiguous():
    """[B, H, T, D] tensors transposed to [B, T, H, D] (FLA's other layout), upstream gradient too: the fake
    implementation must give the gradients the strides the real one returns.

    Regression: the fake returned ``torch.empty_like(q)`` (q's transposed strides) while the kernel returns
    contiguous gradients; inductor's stride assertions then failed in training (test_training.py)."""
    args = list(backward_args(*qkv()))
    for i in (0, 1, 2, 5):  # q, k, v, do
        args[i] = args[i].transpose(1, 2).contiguous().transpose(1, 2)
        assert not args[i].is_contiguous()
    torch.library.opcheck(torch.ops.bla_tvm.backward, tuple(args))


def test_fake_impl_on_meta_tensors():
    q, k, v = (x.to("meta") for x in qkv(B=3, T=1000, H=5))
    args = op_args(q, k, v)
    o, states, final, layout = torch.ops.bla_tvm.forward(*args)
    assert o.device.type == "meta" and o.shape == (3, 1000, 5, SHAPE.V) and o.dtype == torch.float32
    assert states.device.type == "meta" and states.dtype == torch.float32
    assert states.shape == (3 * num_chunks(1000) * 5 * SHAPE.N * (SHAPE.K + SHAPE.V),)
    assert final.shape == (3, 5, SHAPE.N, SHAPE.K + SHAPE.V)
    do = torch.empty(3, 1000, 5, SHAPE.V, device="meta")
    assert layout.dtype == torch.int32 and layout.shape == (3 * 3 * num_chunks(1000) + 5 * 3,)
    grads = torch.ops.bla_tvm.backward(q, k, v, states, layout, do, final, False, num_chunks(1000), *args[7:])
    assert [(g.device.type, g.shape, g.dtype) for g in grads] == [
        ("meta", x.shape, torch.float32) for x in (q, k, v, final)
    ]


def test_fake_states_are_float64_for_float64_inputs():
    q, k, v = (x.to(device="meta", dtype=F64) for x in qkv(B=1, T=64, H=2))
    o, states, _, _ = torch.ops.bla_tvm.forward(*op_args(q, k, v))
    assert o.dtype == F64 and states.dtype == F64 and states.shape == (2 * SHAPE.N * (SHAPE.K + SHAPE.V),)


def surrounded(q, k, v):
    """Torch ops before and after BLA, so the compiled graph has more than the one custom op."""
    o, state = blurry_window_attention(q * 0.5 + 0.1, torch.tanh(k), v.flip(1), **ARGS)
    assert state is None
    return torch.relu(o) * 2.0 + o.sum(dim=-1, keepdim=True)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    """One graph, no breaks (fullgraph=True raises on any), same result as eager."""
    torch._dynamo.reset()
    q, k, v = qkv()
    expected = surrounded(q, k, v)
    compiled = torch.compile(surrounded, fullgraph=True, backend=backend)
    out = compiled(q, k, v)
    # inductor fuses the surrounding elementwise ops, so it may round differently from eager
    tol = 0.0 if backend != "inductor" else 1e-5
    assert max_rel_err(out, expected) <= tol


def test_torch_compile_dynamic_lengths():
    """With dynamic shapes, one compiled graph serves several (B, T) through the fake implementation."""
    torch._dynamo.reset()
    compiled = torch.compile(surrounded, fullgraph=True, backend="aot_eager", dynamic=True)
    for B, T in ((1, 70), (2, 131), (3, 5)):
        q, k, v = qkv(B=B, T=T)
        assert max_rel_err(compiled(q, k, v), surrounded(q, k, v)) == 0.0



def test_torch_compile_dynamic_lengths_compile_once():
    """dynamic=True: one graph for T below and past the chunk length, forward and backward. Regression: the
    chunk-start states [B, NC, H, N, F] let the tracer specialise on NC == 1 (their strides' contiguity check),
    so the graph was compiled again when T first passed L = 64."""
    torch._dynamo.reset()
    aot_eager, graphs = torch._dynamo.lookup_backend("aot_eager"), []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return aot_eager(gm, example_inputs)

    compiled = torch.compile(surrounded, fullgraph=True, backend=counting, dynamic=True)
    for T in (10, 70, 130, 20):
        q, k, v = (x.requires_grad_() for x in qkv(B=2, T=T))
        compiled(q, k, v).sum().backward()
    assert len(graphs) == 1

# --- how tensors reach the kernels -------------------------------------------------------------------------


@pytest.fixture
def launches():
    """Every kernel launch of the test (``runtime.Launch``), in order."""
    with record_launches() as recorded:
        yield recorded


def pointers(launch) -> dict:
    """{argument name: (data_ptr, is_contiguous)} of a recorded launch."""
    return {name: (a.data_ptr(), a.is_contiguous()) for name, a in zip(launch.kernel.kernel.args, launch.args)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_contiguous_inputs_are_not_copied(dtype, launches):
    q, k, v = qkv(dtype=dtype)
    o, _ = blurry_window_attention(q, k, v, **ARGS)
    assert len(launches) == len(kernels.FORWARD) - 1  # no final state was asked for: no final_state kernel
    chunk_state, _, chunk_output = map(pointers, launches)
    assert [chunk_state[x][0] for x in "kv"] == [k.data_ptr(), v.data_ptr()]
    assert [chunk_output[x][0] for x in "qkv"] == [q.data_ptr(), k.data_ptr(), v.data_ptr()]
    assert chunk_output["o"][0] == o.data_ptr()  # the kernel writes the returned tensor itself


def test_non_contiguous_inputs_give_the_same_result(launches):
    """[B, H, T, D] tensors transposed to [B, T, H, D]: one contiguous copy each, the same output bits."""
    q, k, v = qkv()
    q_t, k_t, v_t = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not any(x.is_contiguous() for x in (q_t, k_t, v_t))
    expected, _ = blurry_window_attention(q, k, v, **ARGS)
    launches.clear()
    o, _ = blurry_window_attention(q_t, k_t, v_t, **ARGS)
    assert torch.equal(o, expected)
    chunk_output = pointers(launches[-1])
    assert launches[-1].kernel.kernel.name == "chunk_output"
    assert all(chunk_output[x][1] for x in "qkv")
    assert {chunk_output[x][0] for x in "qkv"}.isdisjoint({x.data_ptr() for x in (q_t, k_t, v_t)})


def test_inputs_at_unaligned_addresses():
    """A contiguous view that starts at an arbitrary element (a slice of a larger buffer) is valid input.

    Regression: the compiled kernels assume 64-byte aligned data (TVM buffers' default data_alignment) and do
    not check it; a q starting 4 or 16 bytes past a boundary made bla_fwd_chunk_output segfault on an aligned
    vector load, until ops.forward copied unaligned inputs. Run in a subprocess so that a crash fails this
    test instead of killing the whole run.
    """
    forget_source_digest()
    for dtype in (torch.float32, torch.bfloat16):  # kernels built here, so the subprocess only loads them
        blurry_window_attention(*qkv(dtype=dtype), **ARGS)
    result = run_python(
        f"""
        import torch
        from bla_tvm import blurry_window_attention
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(0)
            shapes = {{"q": (2, 70, 3, {SHAPE.K}), "k": (2, 70, 3, {SHAPE.K}), "v": (2, 70, 3, {SHAPE.V})}}
            for name in shapes:
                for offset in (1, 2, 4, 8):
                    args = {{}}
                    for n, shape in shapes.items():
                        x = torch.randn(shape, generator=gen).to(dtype)
                        if n == name:  # the same values, copied into a buffer at an unaligned address
                            base = torch.empty(x.numel() + 128, dtype=dtype)
                            start = (-base.data_ptr()) % 64 // x.element_size() + offset  # 64-aligned + offset
                            base[start:start + x.numel()] = x.flatten()
                            x_view = base[start:start + x.numel()].view(shape)
                            assert x_view.is_contiguous() and x_view.data_ptr() % 64 != 0
                            args[n] = (x_view, x)
                        else:
                            args[n] = (x, x)
                    o_view, _ = blurry_window_attention(*(a[0] for a in args.values()), {SHAPE.W}, {SHAPE.N}, {SHAPE.M})
                    o, _ = blurry_window_attention(*(a[1] for a in args.values()), {SHAPE.W}, {SHAPE.N}, {SHAPE.M})
                    assert torch.equal(o_view, o), (dtype, name, offset)
        print("ok")
        """,
        env={"BLA_TVM_NO_BUILD": "1"},
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", (
        f"returncode {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[:1500]}"
    )



def cached_modules_of_a_call(folder, q, k, v) -> dict:
    """Run the op on q, k, v (finding or building its kernels in BLA_TVM_CACHE_DIR) and copy each kernel's cache
    files (the module and what lies beside it) into ``folder``: {kernel name: path of the copied module}."""
    import shutil
    from pathlib import Path

    with record_launches() as launches:
        blurry_window_attention(q, k, v, **ARGS)
    cache, copied = Path(os.environ["BLA_TVM_CACHE_DIR"]), {}
    for launch in launches:
        compiled = launch.kernel
        key = kernel_key(compiled.kernel.name, compiled.spec, bla_tvm.runtime.target_id(q.device), compiled.config)
        for path in cache.glob(f"{key}.so*"):
            shutil.copy2(path, folder)
        copied[compiled.kernel.name] = Path(folder) / f"{key}.so"
    return copied


def damage(path, how: str) -> None:
    """Replace the file at ``path`` by a damaged copy (a new file renamed over it: a module this process has
    mapped keeps its pages, where writing in place would make them vanish and fault at exit)."""
    data = path.read_bytes()
    staging = path.with_name(path.name + ".damaged")
    staging.write_bytes({"truncated": data[: len(data) // 3], "empty": b"", "garbage": os.urandom(len(data))}[how])
    os.replace(staging, path)


@pytest.mark.parametrize("how", ["truncated", "empty", "garbage"])
def test_damaged_cached_kernel_is_rebuilt(tmp_path, how):
    """A cached module cut short (mapping it raised SIGBUS in load_module and killed the process), emptied or
    overwritten does not match its recorded digest: it is never loaded, but rebuilt, and the call is right. Run
    in a subprocess, so that a crash fails this test instead of ending the run."""
    q, k, v = qkv(seed=5)
    forget_source_digest()
    module = cached_modules_of_a_call(tmp_path, q, k, v)["state_scan"]
    damage(module, how)
    result = run_python(
        f"""
        import torch, bla_tvm
        gen = torch.Generator().manual_seed(5)
        q, k = torch.randn(2, 70, 3, {SHAPE.K}, generator=gen), torch.randn(2, 70, 3, {SHAPE.K}, generator=gen)
        v = torch.randn(2, 70, 3, {SHAPE.V}, generator=gen)
        o, _ = bla_tvm.blurry_window_attention(q, k, v, {SHAPE.W}, {SHAPE.N}, {SHAPE.M})
        ref = bla_tvm.bla_recurrent(q, k, v, {SHAPE.W}, {SHAPE.N}, {SHAPE.M})
        print(((o.double() - ref).abs().max() / ref.abs().max()).item())
        """,
        env={"BLA_TVM_CACHE_DIR": str(tmp_path)},
    )
    assert result.returncode == 0, f"returncode {result.returncode}: {result.stderr[-2000:]}"
    assert float(result.stdout.split()[-1]) <= 1e-5
    assert module.read_bytes() != b"" and not list(tmp_path.glob("*.lock"))


def test_damaged_cached_kernel_without_building_is_an_error_naming_it(tmp_path):
    q, k, v = qkv(seed=6)
    module = cached_modules_of_a_call(tmp_path, q, k, v)["chunk_output"]
    damage(module, "garbage")
    library = bla_tvm.runtime.KernelLibrary(None, tmp_path, build_allowed=False)
    spec = KernelSpec(**ARGS, head_k=SHAPE.K, head_v=SHAPE.V, dtype="float32", chunk_size=CHUNK)
    with pytest.raises(RuntimeError, match=rf"{module} does not match its digest"):
        library.function("chunk_output", spec, q.device)


def test_appending_a_rebuilt_kernel_replaces_its_manifest_entry(tmp_path):
    """``bla-tvm build --append`` of a kernel the folder already holds leaves one entry, with the new digest (a
    stale duplicate would name a digest the file no longer has)."""
    from bla_tvm.cli import build_kernels

    small = KernelSpec(9, 5, 3, 4, 4, "float32", chunk_size=8)
    build_kernels([(small, ("final_state",))], "cpu", None, tmp_path, jobs=1)
    (tmp_path / "other.so").write_bytes(b"")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["kernels"].append(dict(manifest["kernels"][0], kernel="state_scan", file="other.so"))
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    build_kernels([(small, ("final_state",))], "cpu", None, tmp_path, jobs=1, append=True)
    entries = json.loads((tmp_path / "manifest.json").read_text())["kernels"]
    assert sorted(e["file"] for e in entries) == sorted(["other.so", entries[-1]["file"]])
    assert entries[-1]["sha256"] == bla_tvm.kernel_cache.file_digest(tmp_path / entries[-1]["file"])


def test_builds_leave_no_lock_files(tmp_path, monkeypatch):
    """A failed build and a successful one both remove the lock file they took."""
    from bla_tvm import build

    spec = KernelSpec(**ARGS, head_k=SHAPE.K, head_v=SHAPE.V, dtype="float32", chunk_size=CHUNK)
    path, target = tmp_path / "scan.so", bla_tvm.runtime.target_id(torch.device("cpu"))

    def fails(*args, **kwargs):
        raise RuntimeError("compiler crashed")

    with monkeypatch.context() as patch:
        patch.setattr(build, "compile_kernel", fails)
        with pytest.raises(RuntimeError, match="compiler crashed"):
            build.build_to_path("state_scan", spec, "cpu", target, None, path)
    assert list(tmp_path.iterdir()) == []
    build.build_to_path("state_scan", spec, "cpu", target, None, path)
    assert path.exists() and not list(tmp_path.glob("*.lock")) and not list(tmp_path.glob("tmp*"))


def test_damaged_prebuilt_kernel_is_an_error_naming_it(tmp_path):
    """A prebuilt module is checked against the digest its manifest records (``bla-tvm build`` writes it)."""
    q, k, v = qkv(seed=6)
    module = cached_modules_of_a_call(tmp_path, q, k, v)["chunk_output"]
    spec = KernelSpec(**ARGS, head_k=SHAPE.K, head_v=SHAPE.V, dtype="float32", chunk_size=CHUNK)
    entry = {"kernel": "chunk_output", "spec": spec.as_dict(), "target": bla_tvm.runtime.target_id(q.device),
             "config": None, "file": module.name, "sha256": bla_tvm.kernel_cache.file_digest(module)}  # fmt: skip
    (tmp_path / "manifest.json").write_text(json.dumps({"kernels": [entry]}))
    library = bla_tvm.runtime.KernelLibrary(tmp_path, tmp_path / "cache", build_allowed=False)
    library.function("chunk_output", spec, q.device)
    damage(module, "truncated")
    with pytest.raises(RuntimeError, match=rf"prebuilt kernel {module} does not match its digest"):
        bla_tvm.runtime.KernelLibrary(tmp_path, tmp_path / "cache", build_allowed=False).function(
            "chunk_output", spec, q.device
        )

@pytest.mark.parametrize(
    "content",
    ["{not json", "[]", json.dumps({"kernels": 3}), json.dumps({"kernels": [{"kernel": "chunk_output"}]}),
     json.dumps({"kernels": [{"kernel": "x", "spec": {}, "target": "t", "file": ["a"]}]}), "[" * 100_000],
    ids=["not-json", "not-object", "kernels-not-list", "entry-missing-fields", "file-not-string", "deep"],
)  # fmt: skip
def test_corrupt_prebuilt_manifest_is_an_error_naming_it(tmp_path, content):
    (tmp_path / "manifest.json").write_text(content)
    with pytest.raises(ValueError, match=f"{tmp_path / 'manifest.json'}"):
        bla_tvm.runtime.KernelLibrary(tmp_path, tmp_path / "cache", build_allowed=False)

# --- validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_mixed_dtypes_rejected(name):
    args = dict(zip("qkv", qkv()))
    args[name] = args[name].to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype"):
        blurry_window_attention(args["q"], args["k"], args["v"], **ARGS)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64, torch.bool], ids=str)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_integer_dtypes_rejected(name, dtype):
    args = dict(zip("qkv", qkv()))
    args[name] = args[name].to(dtype)
    with pytest.raises(TypeError, match=rf"^{name} must have a floating dtype, got {dtype}"):
        blurry_window_attention(args["q"], args["k"], args["v"], **ARGS)


def test_unsupported_floating_dtype_rejected():
    q, k, v = (x.to(torch.float8_e4m3fn) for x in qkv())
    with pytest.raises(TypeError, match=r"^q must be float32, float16, bfloat16 or float64"):
        blurry_window_attention(q, k, v, **ARGS)


@pytest.mark.parametrize("name", ["k", "v"])
def test_mixed_devices_rejected(name):
    args = dict(zip("qkv", qkv()))
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=r"q, k and v must be on one device; got cpu"):
        blurry_window_attention(args["q"], args["k"], args["v"], **ARGS)


def test_unsupported_device_rejected():
    q, k, v = (x.to("meta") for x in qkv())
    with pytest.raises(ValueError, match=r"^q must be on a CPU or CUDA device, got meta"):
        blurry_window_attention(q, k, v, **ARGS)


# --- runtime: no tvm, cache keys, concurrent first builds ---------------------------------------------------


def test_runtime_path_imports_no_tvm():
    """A process where ``import tvm`` is impossible runs a kernel built earlier (here, by this process)."""
    q, k, v = qkv(seed=3)
    forget_source_digest()
    expected, _ = blurry_window_attention(q, k, v, **ARGS)  # builds (or finds) the kernels in BLA_TVM_CACHE_DIR
    result = run_python(
        f"""
        import sys
        sys.modules["tvm"] = None  # any "import tvm" now raises ImportError
        import json, torch, bla_tvm
        gen = torch.Generator().manual_seed(3)
        q, k = torch.randn(2, 70, 3, {SHAPE.K}, generator=gen), torch.randn(2, 70, 3, {SHAPE.K}, generator=gen)
        v = torch.randn(2, 70, 3, {SHAPE.V}, generator=gen)
        o, _ = bla_tvm.blurry_window_attention(q, k, v, {SHAPE.W}, {SHAPE.N}, {SHAPE.M})
        loaded = sorted(n for n, m in sys.modules.items() if m is not None and (n == "tvm" or n.startswith("tvm.")))
        tvm = repr(sys.modules["tvm"])
        print(json.dumps({{"o": o.double().flatten().tolist(), "tvm_modules": loaded, "tvm": tvm}}))
        """,
        env={"BLA_TVM_NO_BUILD": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["tvm"] == "None" and out["tvm_modules"] == []
    assert torch.equal(torch.tensor(out["o"], dtype=F64), expected.double().flatten())


def test_kernel_key_changes_with_spec_and_config():
    base = dict(window=16, resolution=7, num_slots=9, chunk_size=64, head_k=40, head_v=72, dtype="float32")
    variants = [KernelSpec(**base)]
    for field, value in [
        ("window", 17), ("resolution", 5), ("num_slots", 7), ("chunk_size", 32),
        ("head_k", 41), ("head_v", 64), ("dtype", "bfloat16"),
    ]:
        variants.append(KernelSpec(**{**base, field: value}))
    keys = {kernel_key("chunk_output", spec, "x86_64-test", None) for spec in variants}
    assert len(keys) == len(variants)
    spec = variants[0]
    assert kernel_key("chunk_output", spec, "x86_64-test", None) == kernel_key(
        "chunk_output", KernelSpec(**base), "x86_64-test", None
    )  # deterministic
    others = {
        kernel_key("chunk_state", spec, "x86_64-test", None),
        kernel_key("chunk_output", spec, "sm_90", None),
        kernel_key("chunk_output", spec, "x86_64-test", {"vector_lanes": 8}),
        kernel_key("chunk_output", spec, "x86_64-test", {"vector_lanes": 4}),
    }
    assert len(others | keys) == len(keys) + 4


def test_concurrent_first_calls_build_once(tmp_path, monkeypatch):
    """Two threads call the op for a spec no one has built: each kernel is compiled once, both are right."""
    from bla_tvm import build  # imports tvm; this process compiles kernels anyway

    monkeypatch.setenv("BLA_TVM_CACHE_DIR", str(tmp_path))
    builds = []
    build_to_path = build.build_to_path

    def counting(kernel, *args, **kwargs):
        builds.append(kernel)
        return build_to_path(kernel, *args, **kwargs)

    monkeypatch.setattr(build, "build_to_path", counting)
    W, N, M, K, V = 5, 3, 4, 3, 2  # used by no other test: not in memory, not on disk
    gen = torch.Generator().manual_seed(7)
    inputs = [tuple(torch.randn(1, 9, 2, D, generator=gen) for D in (K, K, V)) for _ in range(2)]
    barrier = threading.Barrier(2)
    results, errors = [None, None], []

    def worker(i):
        try:
            barrier.wait()
            results[i] = blurry_window_attention(*inputs[i], W, N, M)[0]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    called = sorted(kernels.names("forward", final_state=False))  # no call asks for final states
    assert sorted(builds) == called
    assert len(list(tmp_path.glob("*.so"))) == len(called)
    for i in range(2):
        assert max_rel_err(results[i], bla_recurrent(*inputs[i], W, N, M)) <= 1e-5


# --- 32-bit indexing: every buffer the kernels index is checked, from shapes alone -------------------------


def huge(*shape, dtype=torch.float32):
    """A tensor of ``shape`` that takes one element of memory (every element aliases it)."""
    return torch.zeros(1, dtype=dtype).expand(*shape)


def test_values_past_32_bit_indexing_are_refused_naming_them():
    """V > K: v and o pass 2^31 - 1 elements while q does not (v [1, 2^16, 1, 2^15]). Refused before anything
    is allocated or compiled, naming the buffers (regression: only q was checked, and chunk_output crashed)."""
    T, V = 2**16, 2**15
    q, k, v = huge(1, T, 1, 1), huge(1, T, 1, 1), huge(1, T, 1, V)
    with pytest.raises(ValueError, match=r"v \[1, 65536, 1, 32768\] \(2147483648 elements\).*o \[1, 65536, 1, 32768\]"):
        blurry_window_attention(q, k, v, 1, 1)


def test_backward_buffers_past_32_bit_indexing_are_refused_naming_them():
    """v and o fit (2^31 - 2^16 elements) but the backward's per-chunk gradients [1, NC, 1, L + N, F + K] do
    not: the backward refuses, naming them, before it allocates anything."""
    from bla_tvm.layout import batch_layout

    T, V, L = 2**16, 2**15 - 1, CHUNK
    q, k, v = huge(1, T, 1, 1), huge(1, T, 1, 1), huge(1, T, 1, V)
    states = huge(T // L * (1 + V))
    layout = batch_layout(1, T, L, 1, torch.zeros(1, dtype=torch.int64)).as_tensor()
    dfinal = torch.zeros(0, 1, 1, 1 + V)
    with pytest.raises(ValueError, match=r"grads \[1, 1024, 1, 65, 32769\] \(2181104640 elements\)"):
        torch.ops.bla_tvm.backward(q, k, v, states, layout, huge(1, T, 1, V), dfinal, False, T // L, 1, 1, 1, 1.0, L)


def test_decode_state_past_32_bit_indexing_is_refused_naming_it():
    """q [B, 1, K] fits, the state [B, 1, N, K] with N = 3 does not."""
    from bla_tvm import BLAState, decode_step

    B, K = 2**14, 2**16
    q = huge(B, 1, K)
    state = BLAState(huge(B, 1, 3, K), huge(B, 1, 3, 1), torch.zeros(B, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"key_state \[16384, 1, 3, 65536\] \(3221225472 elements\)"):
        decode_step(q, q, huge(B, 1, 1), state, 3, 3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gradient_scale_brings_do_into_float16s_normal_range(dtype):
    """The backward's dO factor (ops.gradient_scale): a power of two with max |s dO| in [1, 2) for a mean loss's
    tiny dO and a large one alike, so s dO and the gradients divided by s are exact; 1 where dO is all zeros or
    holds a NaN or an infinity (the kernels then carry the non-finite values as the definition does)."""
    from bla_tvm.ops import gradient_scale

    for largest in (3e-7, 1e-4, 1.0, 1.5, 4e4):
        do = torch.tensor([largest, -largest / 3, 0.0]).to(dtype)
        s = gradient_scale(do)
        assert s.dtype == torch.float32 and s.item() == 2.0 ** round(math.log2(s.item()))
        assert 1.0 <= (do.float().abs().max() * s).item() < 2.0, largest
    for special in ([0.0, 0.0], [float("nan"), 1e-7], [float("inf"), 1e-7], [float("-inf"), 1e-7]):
        assert gradient_scale(torch.tensor(special).to(dtype)).item() == 1.0, special
