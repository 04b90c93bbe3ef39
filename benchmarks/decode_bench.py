"""BLA one-token decoding on a CUDA GPU: the compiled decode step checked against the float64 recurrence over
4,096 tokens (float32, float16 and bfloat16 states), DecodeGraph against the eager step and generate (CUDA graph
and eager); then the latency and tokens/s of the kernel alone, the eager step, the CUDA-graph step
(``DecodeGraph``) and ``generate`` per token, and of kernel variants (``VARIANTS``), against the floor of any step
(torch copying the state's bytes: one read and one write of each, as the step does), FLA's
``fused_recurrent_gsa`` single-token path (64 slots, with ``--fla``) and SDPA over a KV cache of 512 and 4,096
tokens, with the state bytes per sequence beside each. One script, one call on the GPU machine (torch + the
runtime bundle); ``--profile`` only launches one kernel, for Nsight Compute (``decode_gpu_run.sh``).

Here (build machine, no GPU):
    python benchmarks/decode_bench.py --list-specs > build/decode_specs.json
    python -m bla_tvm.cli build --device cuda --arch sm_90 --specs build/decode_specs.json --out .bundle-decode/kernels
    python benchmarks/decode_bench.py --build-variants .bundle-decode/variants
    python -m bla_tvm.cli bundle --out .bundle-decode
On the GPU machine (FLA 0.6.0 wheels in .whl/ for the FLA baseline; BLA_TVM_NO_TUNING=1 for generate's prefill):
    python benchmarks/decode_bench.py --bundle .bundle-decode --out $OUT
Where generate's time per token goes (issue 14; fp32 and bf16 states, ~15-30 s), instead of the above:
    BLA_TVM_NO_TUNING=1 python benchmarks/decode_bench.py --bundle .bundle-decode --profile-generate --out $OUT

Writes decode_bench.json (every measurement); with --profile-generate, profile_generate.json (CPU time of each
part of generate's loop against GPU time per token, each layer timed alone), profile_generate_tables.txt
(torch.profiler's tables) and profile_generate_<state>.trace.json.gz (Chrome traces of one generate call).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

from gpu_bench import bench, relative_error, use_bundle

#: the decode shape of issue 7: B = 64 sequences, H = 16 heads, K = V = 64, W = 512, N = M = 63, bf16 inputs
SHAPE = dict(B=64, H=16, K=64, V=64, window=512, resolution=63, num_slots=63)
STATE_DTYPES = ("float32", "float16", "bfloat16")
CHECK_TOKENS = 4096
TOLERANCE = 1e-2  # relative (Frobenius) error of all outputs against float64; 1e-4 with float32 inputs and state
FLA_SLOTS = 64
#: where everything runs; --device cpu runs the same script on the CPU kernels (a dry run of the script itself)
DEVICE = "cuda"
#: where measure() appends its rows as it goes (set by main)
PARTIAL = None
SDPA_CACHE = (512, 4096)


def decode_specs() -> list[dict]:
    """Every decode kernel the script loads: the benchmark layer (bf16 inputs, each state dtype), float32 inputs,
    and GQA (G = 2). The prefill check loads the chunked forward kernels too when they are in the bundle (built
    from gpu_bench.py's specs); without them it reports an error and the decode checks stand alone."""
    import torch

    from bla_tvm.dispatch import implementations
    from bla_tvm.kernels import DECODE, FORWARD
    from bla_tvm.layer import KernelSpec
    from bla_tvm.tile_constants import TILE_CHUNK

    W, N, M, K, V = (SHAPE[x] for x in ("window", "resolution", "num_slots", "K", "V"))
    layer = dict(window=W, resolution=N, num_slots=M, chunk_size=1, head_k=K, head_v=V)
    prefill = dict(layer, dtype="bfloat16", chunk_size=TILE_CHUNK)  # bf16 inference, BLA_TVM_NO_TUNING=1
    runs = implementations(FORWARD, KernelSpec(**prefill), torch.device("cuda"))  # the tile programs
    return [
        dict(layer, dtype="bfloat16", kernels=list(DECODE)),
        dict(layer, dtype="float32", kernels=["decode_step"]),
        dict(layer, dtype="bfloat16", group_size=2, kernels=["decode_step"]),
        dict(prefill, kernels=sorted(set(runs.values()))),  # generate's prefill
    ]  # fmt: skip


def layer_args():
    return SHAPE["window"], SHAPE["resolution"], SHAPE["num_slots"]


def decode_tokens(torch, bla, q, k, v, state_dtype):
    """Decode q, k, v [B, T, H*, D] token by token from a fresh state; o [B, T, HQ, V]."""
    state, outputs = None, []
    for t in range(q.shape[1]):
        o, state = bla.decode_step(
            q[:, t], k[:, t], v[:, t], state, *layer_args(), state_dtype=state_dtype if state is None else None
        )
        outputs.append(o)
    return torch.stack(outputs, dim=1), state


def recurrent_reference(torch, bla, q, k, v):
    """``bla_recurrent``'s definition, on q's device (``bla_recurrent`` itself runs on the CPU, too slowly for
    4,096 tokens): float64, dense A, X_t = A X_{t-1} + b k_t^T, s = scale C X_t q_t masked, o = softmax C Y_t.
    Returns o [B, T, HQ, V] on the CPU."""
    from bla_tvm.constants import bla_constants

    c = bla_constants(bla.BLAParams.make(*layer_args()))
    A, b, C, lags = (x.to(q.device) for x in (c.A, c.b, c.C, c.slot_lags))
    q, k, v = (x.double().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    X = k.new_zeros(*k.shape[:2], A.shape[0], k.shape[-1])
    Y = v.new_zeros(*v.shape[:2], A.shape[0], v.shape[-1])
    out = []
    for t in range(q.shape[2]):
        X = A @ X + b[:, None] * k[:, :, t, None, :]
        Y = A @ Y + b[:, None] * v[:, :, t, None, :]
        s = q.shape[-1] ** -0.5 * torch.einsum("bhmk,bhk->bhm", C @ X, q[:, :, t])
        p = torch.softmax(s.masked_fill(lags > t, float("-inf")), dim=-1)
        out.append(torch.einsum("bhm,bhmv->bhv", p, C @ Y))
    return torch.stack(out, dim=2).transpose(1, 2).cpu()


def run_checks(torch, bla) -> list[dict]:
    """4,096 tokens from zeros against the float64 recurrence for every state dtype; GQA; prefill + decode."""
    results = []
    B, H, K, V, T = 2, 2, SHAPE["K"], SHAPE["V"], CHECK_TOKENS
    g = torch.Generator(device=DEVICE).manual_seed(7)
    base = [torch.randn(B, T, H, d, device=DEVICE, generator=g) for d in (K, K, V)]
    # the device reference against bla_recurrent itself, on a prefix
    head = [x[:, :300] for x in base]
    row = dict(name="device float64 reference vs bla_recurrent, 300 tokens",
               rel_err=relative_error(recurrent_reference(torch, bla, *head),
                                      bla.bla_recurrent(*(x.cpu() for x in head), *layer_args())))  # fmt: skip
    row["ok"] = row["rel_err"] <= 1e-12
    results.append(row)
    print(json.dumps(row), flush=True)
    references = {}
    for input_dtype, state_dtype in [("float32", "float32")] + [("bfloat16", s) for s in STATE_DTYPES]:
        q, k, v = (x.to(getattr(torch, input_dtype)) for x in base)
        if input_dtype not in references:
            start = time.time()
            references[input_dtype] = recurrent_reference(torch, bla, q, k, v)
            print(f"float64 reference, {input_dtype} inputs: {time.time() - start:.1f} s", flush=True)
        start = time.time()
        o, state = decode_tokens(torch, bla, q, k, v, getattr(torch, state_dtype))
        synchronize(torch)
        seconds = time.time() - start
        err = relative_error(o, references[input_dtype])
        norm = torch.linalg.vector_norm
        per_token = (norm(o.double().cpu() - references[input_dtype], dim=(0, 2, 3))
                     / norm(references[input_dtype], dim=(0, 2, 3))).max().item()  # fmt: skip
        tol = 1e-4 if input_dtype == "float32" else TOLERANCE
        row = dict(name=f"decode {T} tokens", inputs=input_dtype, state=state_dtype, rel_err=err,
                   worst_token_rel_err=per_token, tolerance=tol, finite=bool(torch.isfinite(o).all()),
                   seen=int(state.seen[0]), seconds=seconds)  # fmt: skip
        row["ok"] = row["finite"] and err <= tol and row["seen"] == T
        # a bfloat16 state is the question "does it keep 1e-2?", not a requirement (H200, W = 512: 2.5e-2)
        row["gating"] = state_dtype != "bfloat16"
        results.append(row)
        print(json.dumps(row), flush=True)
    # GQA: q with 2 H heads against k, v with H: the same as k, v repeated (256 tokens)
    q = torch.randn(B, 256, 2 * H, K, device=DEVICE, generator=g, dtype=torch.bfloat16)
    k, v = (x[:, :256].to(torch.bfloat16) for x in base[1:])
    o, _ = decode_tokens(torch, bla, q, k, v, torch.float32)
    k2, v2 = (x.repeat_interleave(2, dim=2) for x in (k, v))
    o_rep, _ = decode_tokens(torch, bla, q, k2, v2, torch.float32)
    ref = recurrent_reference(torch, bla, q, k2, v2)
    row = dict(name="GQA G=2, 256 tokens", vs_repeated=relative_error(o, o_rep.double().cpu()),
               rel_err=relative_error(o, ref))  # fmt: skip
    row["ok"] = row["vs_repeated"] <= 1e-2 and row["rel_err"] <= TOLERANCE
    results.append(row)
    print(json.dumps(row), flush=True)
    # the in-place step in a CUDA graph against the functional eager step, 64 tokens from a random state
    if DEVICE == "cuda":
        seen = torch.tensor([0, 700], dtype=torch.int64, device=DEVICE)
        start = bla.BLAState(*(torch.randn(B, H, SHAPE["resolution"], d, device=DEVICE, generator=g) for d in (K, V)),
                             seen)  # fmt: skip
        tokens = [torch.randn(B, 64, H, d, device=DEVICE, generator=g, dtype=torch.bfloat16) for d in (K, K, V)]
        decoder = bla.DecodeGraph(bla.BLAState(*(x.clone() for x in start[:3])), *layer_args(), query_heads=H)
        state, worst = start, 0.0
        for t in range(64):
            o, state = bla.decode_step(*(x[:, t] for x in tokens), state, *layer_args())
            worst = max(worst, relative_error(decoder(*(x[:, t] for x in tokens)), o.double().cpu()))
        row = dict(name="DecodeGraph vs decode_step, 64 tokens", o_rel_err=worst,
                   state_rel_err=relative_error(decoder.state.key_state, state.key_state.double().cpu()),
                   seen=decoder.state.seen.tolist())  # fmt: skip
        row["ok"] = worst <= 1e-6 and row["state_rel_err"] <= 1e-6 and row["seen"] == [64, 764]
        results.append(row)
        print(json.dumps(row), flush=True)
    # prefill 1,000 tokens with the chunked kernels, then decode 96, through the CUDA graph and eagerly
    q, k, v = (x[:, :1096].to(torch.bfloat16) for x in base)
    ref = recurrent_reference(torch, bla, q, k, v)
    for cuda_graph in (True, False) if DEVICE == "cuda" else (False,):
        name = f"generate: prefill 1000 + decode 96 ({'CUDA graph' if cuda_graph else 'eager'})"
        try:
            step = lambda o, i: (q[:, 1000 + i], k[:, 1000 + i], v[:, 1000 + i])
            o_prompt, o_new, _ = bla.generate(q[:, :1000], k[:, :1000], v[:, :1000], *layer_args(),
                                              next_token=step, max_new_tokens=96, cuda_graph=cuda_graph)  # fmt: skip
            row = dict(name=name, rel_err=relative_error(torch.cat([o_prompt, o_new], 1), ref))
            row["ok"] = row["rel_err"] <= TOLERANCE
        except Exception as error:  # noqa: BLE001 - reported, the decode checks above stand on their own
            row = dict(name=name, error=f"{type(error).__name__}: {error}"[:500], ok=False)
        results.append(row)
        print(json.dumps(row), flush=True)
    return results


def synchronize(torch) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


#: variants of the decode kernel (bf16 inputs) timed beside the library's own (the tile program of
#: schedules/cuda_tile_decode.py at its default config), each checked on one step first: name -> (builder, the
#: config's fields, the state dtype): "te" the TE schedule of schedules/cuda_decode.py (DecodeCudaConfig), "tile"
#: the tile program (DecodeTileConfig)
VARIANTS = {
    # the next step for a 16-bit state (seventh session, built but not yet timed: no GPU was lent): the slots'
    # readout C in shared memory frees 16 registers a thread, so 3 (80 registers) or 4 (64) blocks fit an SM
    # unspilled, for more items computed at once
    "tile, C in shared, 264 blocks, 2 per SM": ("tile", {"blocks": 264, "min_blocks_per_sm": 2,
                                                         "readout_in_shared": True}, "float16"),
    "tile, C in shared, 396 blocks, 3 per SM": ("tile", {"blocks": 396, "min_blocks_per_sm": 3,
                                                         "readout_in_shared": True}, "float16"),
    "tile, C in shared, 528 blocks, 4 per SM": ("tile", {"blocks": 528, "min_blocks_per_sm": 4,
                                                         "readout_in_shared": True}, "float16"),
    "tile, C in shared, 396 blocks, 3 per SM, bf16 state": ("tile", {"blocks": 396, "min_blocks_per_sm": 3,
                                                                     "readout_in_shared": True}, "bfloat16"),
    "tile, C in shared, 528 blocks, 4 per SM, bf16 state": ("tile", {"blocks": 528, "min_blocks_per_sm": 4,
                                                                     "readout_in_shared": True}, "bfloat16"),
    "tile, C in shared, 264 blocks, 2 per SM, fp32 state": ("tile", {"blocks": 264, "min_blocks_per_sm": 2,
                                                                     "readout_in_shared": True}, "float32"),
    # one (b, h) per block (blocks >= B H = 1024: no state streamed in while another is computed), so that the
    # blocks resident on an SM overlap one another's loads and compute instead (eighth session, not yet timed)
    "tile, C in shared, a block per (b, h), 3 per SM": ("tile", {"blocks": 1024, "min_blocks_per_sm": 3,
                                                                  "readout_in_shared": True}, "float16"),
    "tile, C in shared, a block per (b, h), 4 per SM": ("tile", {"blocks": 1024, "min_blocks_per_sm": 4,
                                                                  "readout_in_shared": True}, "float16"),
    "tile, a block per (b, h), 2 per SM, fp32 state": ("tile", {"blocks": 1024, "min_blocks_per_sm": 2},
                                                       "float32"),
}


def build_variants(out: Path) -> None:
    """Compile VARIANTS for sm_90 into ``out`` with a manifest (needs TVM)."""
    from bla_tvm import build  # first: it prepares nvcc (and a stand-in libcuda) before tvm loads
    from bla_tvm.compute import prim_func
    from bla_tvm.layer import KernelSpec
    from bla_tvm.decode import decode_kernel
    from bla_tvm.schedules import cuda_decode, cuda_tile_decode

    torch, tvm = __import__("torch"), build.tvm
    W, N, M, K, V = (SHAPE[x] for x in ("window", "resolution", "num_slots", "K", "V"))
    spec = KernelSpec(W, N, M, K, V, "bfloat16", 1, chunk_size=1)
    target = build.target_for("cuda", "sm_90")
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (name, (kind, config, state)) in enumerate(VARIANTS.items()):
        kernel = decode_kernel(getattr(torch, state), torch.float32)
        if kind == "te":
            func = prim_func(kernel, spec, "cuda")
            mod = cuda_decode.schedule_decode_step(func, spec, cuda_decode.DecodeCudaConfig(**config)).mod
            options = {}
        else:
            config_object = cuda_tile_decode.DecodeTileConfig(**config)
            mod, options = build.tile_decode_module(kernel, spec, "cuda", config_object)
        pass_config = options.pop("pass_config", {})
        with target, tvm.transform.PassContext(config=pass_config):
            module = tvm.compile(mod, target=target, **options)
        module.export_library(str(out / f"variant{index}.so"))
        entries.append(dict(name=name, builder=kind, config=config, state=state, file=f"variant{index}.so",
                            ptxas=build.ptxas_report(module, "sm_90")))  # fmt: skip
        print(entries[-1], flush=True)
    (out / "manifest.json").write_text(json.dumps(entries, indent=1))


def step_check(torch, kernel, state_dtype, consts, in_place: bool = False) -> dict:
    """One step of ``kernel`` (bf16 inputs) on a random state, seen spread below and past W (the mask), against
    the step in float64 with the dense A: relative errors of o, X', Y' (outputs NaN-poisoned; with ``in_place``
    X', Y' written over X, Y)."""
    from bla_tvm.constants import bla_constants

    c = bla_constants(__import__("bla_tvm").BLAParams.make(*layer_args()))
    W, N, K, V, B, H = SHAPE["window"], SHAPE["resolution"], SHAPE["K"], SHAPE["V"], 8, 4
    g = torch.Generator(device=DEVICE).manual_seed(5)
    X, Y = (3 * torch.randn(B, H, N, d, device=DEVICE, generator=g) for d in (K, V))
    X, Y = X.to(state_dtype), Y.to(state_dtype)
    seen = torch.tensor([0, 1, 7, 100, W - 1, W, 3 * W, 9], dtype=torch.int64, device=DEVICE)
    q, k, v = (torch.randn(B, H, d, device=DEVICE, generator=g).to(torch.bfloat16) for d in (K, K, V))
    o = torch.full((B, H, 1, V), float("nan"), device=DEVICE, dtype=torch.bfloat16)
    poisoned = (torch.full_like(X, float("nan")), torch.full_like(Y, float("nan")))
    X2, Y2 = (X.clone(), Y.clone()) if in_place else poisoned
    inputs = (X2, Y2) if in_place else (X, Y)
    kernel_launcher(torch, kernel, dict(q=q.view(B, H, 1, K), k=k, v=v, key_state=inputs[0], value_state=inputs[1],
                                        seen=seen, o=o, key_out=X2, value_out=Y2), consts)()  # fmt: skip
    synchronize(torch)
    A, b, C, lags = (x.to(DEVICE) for x in (c.A, c.b, c.C, c.slot_lags))
    Xr = A @ X.double() + b[:, None] * k.double()[:, :, None, :]
    Yr = A @ Y.double() + b[:, None] * v.double()[:, :, None, :]
    s = K**-0.5 * torch.einsum("bhmk,bhk->bhm", C @ Xr, q.double())
    p = torch.softmax(s.masked_fill(lags[None, None, :] > seen[:, None, None], float("-inf")), dim=-1)
    o_ref = torch.einsum("bhm,bhmv->bhv", p, C @ Yr)
    return {
        "o": relative_error(o[:, :, 0], o_ref.cpu()),
        "key_state": relative_error(X2, Xr.cpu()),
        "value_state": relative_error(Y2, Yr.cpu()),
    }


def wall_time(torch, fn, steps: int = 200) -> float:
    """Seconds per call of ``fn`` called back to back (CPU launch overhead included), after a warm-up."""
    for _ in range(10):
        fn()
    synchronize(torch)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(torch)
    return (time.perf_counter() - start) / steps


def cpu_bench(fn, warmup: int = 3, rep: int = 20, return_mode: str = "median") -> float:
    """Milliseconds per call on the CPU (the --device cpu dry run; do_bench needs a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rep):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def graph_time(torch, fn, do_bench) -> float | None:
    """Milliseconds per replay of ``fn`` captured in a CUDA graph (no CPU overhead), or None if capture fails."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench(graph.replay, do_bench)
    except Exception as error:  # noqa: BLE001
        print("CUDA graph capture failed:", type(error).__name__, error, flush=True)
        return None


def measure(torch, name: str, fn, do_bench, state_bytes: int, rows: list, graph: bool = True) -> dict:
    """do_bench median (GPU time, L2 flushed before each call), back-to-back wall time, CUDA-graph replay."""
    B = SHAPE["B"]
    row = {"method": name, "state_bytes_per_sequence": state_bytes}
    try:
        row["step_us"] = bench(fn, do_bench) * 1e3
        row["wall_us"] = wall_time(torch, fn) * 1e6
        if graph and DEVICE == "cuda":
            replay = graph_time(torch, fn, do_bench)
            row["graph_us"] = None if replay is None else replay * 1e3
        best = min(x for x in (row["step_us"], row.get("graph_us")) if x is not None)
        row["tokens_per_s"] = B / (best * 1e-6)
        row["tokens_per_s_wall"] = B / (row["wall_us"] * 1e-6)
    except Exception as error:  # noqa: BLE001
        row["error"] = f"{type(error).__name__}: {error}"[:500]
    rows.append(row)
    print(json.dumps(row), flush=True)
    if PARTIAL is not None:  # every row on disk as soon as it is measured, in case the run is cut short
        PARTIAL.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return row


def kernel_launcher(torch, kernel, tensors: dict, consts: dict):
    """A call of ``kernel`` (a loaded decode function) with its arguments by name, on torch's stream."""
    import tvm_ffi

    from bla_tvm.kernels import DECODE_ARGS

    args = tuple(tensors[name] if name in tensors else consts[name] for name in DECODE_ARGS)

    def launch():
        if DEVICE == "cuda":
            with tvm_ffi.use_torch_stream():
                kernel(*args)
        else:
            kernel(*args)

    return launch


def bench_state(torch, dtype, g):
    """A random state of the benchmark shape in ``dtype``, every sequence past the window (all slots open)."""
    from bla_tvm.state import BLAState

    B, H, K, V, N = (SHAPE[x] for x in ("B", "H", "K", "V", "resolution"))
    return BLAState(
        torch.randn(B, H, N, K, device=DEVICE, generator=g).to(dtype),
        torch.randn(B, H, N, V, device=DEVICE, generator=g).to(dtype),
        torch.full((B,), 5000, dtype=torch.int64, device=DEVICE),
    )


def generate_per_token(torch, bla, state_dtype, cuda_graph: bool, g, lengths=(32, 544), contiguous=False) -> dict:
    """Wall seconds per decoded token of ``generate`` at the benchmark shape, end to end (``next_token`` slices
    pre-made tokens [B, T, H, D]; with ``contiguous``, returns pre-made contiguous [B, H, D] tokens, as a model's
    projections would): the difference of two runs of ``lengths`` new tokens over the difference of the lengths,
    so the prefill (64 tokens) and the graph's capture cancel; the longer run's seconds beside it."""
    B, H, K, V = (SHAPE[x] for x in "BHKV")
    bf16 = torch.bfloat16
    prompt = [torch.randn(B, 64, H, d, device=DEVICE, dtype=bf16, generator=g) for d in (K, K, V)]
    tokens = [torch.randn(B, lengths[-1], H, d, device=DEVICE, dtype=bf16, generator=g) for d in (K, K, V)]
    if contiguous:
        tokens = [x.transpose(0, 1).contiguous() for x in tokens]  # [T, B, H, D]: token i is one block

    def next_token(o, i):
        if contiguous:
            return tokens[0][i], tokens[1][i], tokens[2][i]
        return tokens[0][:, i], tokens[1][:, i], tokens[2][:, i]

    def run(n):
        synchronize(torch)
        start = time.perf_counter()
        bla.generate(*prompt, *layer_args(), next_token=next_token, max_new_tokens=n, state_dtype=state_dtype,
                     cuda_graph=cuda_graph)  # fmt: skip
        synchronize(torch)
        return time.perf_counter() - start

    run(lengths[0])  # loads every kernel
    short, long = run(lengths[0]), run(lengths[-1])
    return {"per_token_us": (long - short) / (lengths[-1] - lengths[0]) * 1e6, "tokens": lengths[-1], "seconds": long}


def run_benchmarks(torch, bla, args) -> dict:
    if DEVICE == "cuda":
        from triton.testing import do_bench
    else:
        do_bench = cpu_bench
    import tvm_ffi

    from bla_tvm import kernels
    from bla_tvm.decode import DECODE_CHUNK, decode_constants, decode_kernel
    from bla_tvm.layer import KernelSpec
    from bla_tvm.runtime import default_library

    B, H, K, V = (SHAPE[x] for x in "BHKV")
    W, N, M = layer_args()
    bf16 = torch.bfloat16
    g = torch.Generator(device=DEVICE).manual_seed(0)
    q, k = (torch.randn(B, H, K, device=DEVICE, dtype=bf16, generator=g) for _ in range(2))
    v = torch.randn(B, H, V, device=DEVICE, dtype=bf16, generator=g)
    spec = KernelSpec(W, N, M, K, V, "bfloat16", 1, chunk_size=DECODE_CHUNK)
    consts = decode_constants(spec.params, torch.float32, q.device, K**-0.5)
    rows = []
    with torch.no_grad():
        for state_name in STATE_DTYPES:
            sd = getattr(torch, state_name)
            state = bench_state(torch, sd, g)
            state_bytes = H * N * (K + V) * state.key_state.element_size() + 8
            measure(torch, f"BLA decode_step, eager ({state_name} state)",
                    lambda s=state: bla.decode_step(q, k, v, s, W, N, M), do_bench, state_bytes, rows)  # fmt: skip
            # the kernel alone, outputs preallocated
            kernel = default_library().function(decode_kernel(sd, torch.float32), spec, q.device)
            outs = dict(o=torch.empty(B, H, 1, V, device=DEVICE, dtype=bf16), key_out=torch.empty_like(state.key_state),
                        value_out=torch.empty_like(state.value_state))  # fmt: skip
            tensors = dict(q=q.view(B, H, 1, K), k=k, v=v, key_state=state.key_state, value_state=state.value_state,
                           seen=state.seen, **outs)  # fmt: skip
            launch = kernel_launcher(torch, kernel, tensors, consts)
            check = step_check(torch, kernel, sd, consts)
            check["in_place"] = step_check(torch, kernel, sd, consts, in_place=True)
            print(f"one-step check, {state_name} state:", check, flush=True)
            row = measure(torch, f"BLA kernel only ({state_name} state)", launch, do_bench, state_bytes, rows)
            row["one_step_rel_err"] = check
            # the floor of any step: torch copying the same bytes (the whole state read once, written once)
            source = torch.cat([state.key_state.flatten(), state.value_state.flatten()])
            target = torch.empty_like(source)
            floor = measure(torch, f"torch copy of the state ({state_name})", lambda s=source, t=target: t.copy_(s),
                            do_bench, state_bytes, rows)  # fmt: skip
            for timed in (row, floor):
                if "step_us" in timed:
                    traffic = 2 * B * (state_bytes - 8)
                    timed["state_traffic_MB"] = traffic / 1e6
                    timed["achieved_TB_per_s"] = traffic / (timed["step_us"] * 1e-6) / 1e12
            del source, target
            if DEVICE == "cuda":  # the in-place step captured in a CUDA graph: replay alone, and with copies in
                decoder = bla.DecodeGraph(bench_state(torch, sd, g), W, N, M, query_heads=H, dtype=bf16)
                measure(torch, f"BLA DecodeGraph.replay ({state_name} state)", decoder.replay, do_bench, state_bytes,
                        rows, graph=False)  # fmt: skip
                measure(torch, f"BLA DecodeGraph(q, k, v) ({state_name} state)", lambda d=decoder: d(q, k, v),
                        do_bench, state_bytes, rows, graph=False)  # fmt: skip
            ways = ((True, False), (True, True), (False, False), (False, True))
            ways = ways if DEVICE == "cuda" else ((False, False),)
            for cuda_graph, contiguous in ways:
                how = "CUDA graph" if cuda_graph else "eager in-place steps"
                tokens = ", contiguous tokens" if contiguous else ""
                name = f"BLA generate per token, {how}{tokens} ({state_name} state)"
                try:
                    row = dict(method=name, state_bytes_per_sequence=state_bytes,
                               **generate_per_token(torch, bla, sd, cuda_graph, g, contiguous=contiguous))  # fmt: skip
                    row["tokens_per_s_wall"] = B / (row["per_token_us"] * 1e-6)
                except Exception as error:  # noqa: BLE001
                    row = dict(method=name, error=f"{type(error).__name__}: {error}"[:500])
                rows.append(row)
                print(json.dumps(row), flush=True)
        variants = args.bundle / "variants" if args.bundle else None
        if variants is not None and (variants / "manifest.json").exists():
            for entry in json.loads((variants / "manifest.json").read_text()):
                sd = getattr(torch, entry["state"])
                state = bench_state(torch, sd, g)
                outs = dict(o=torch.empty(B, H, 1, V, device=DEVICE, dtype=bf16),
                            key_out=torch.empty_like(state.key_state), value_out=torch.empty_like(state.value_state))
                symbol = kernels.get(decode_kernel(sd, torch.float32)).symbol
                kernel = tvm_ffi.load_module(str(variants / entry["file"]))[symbol]
                check = step_check(torch, kernel, sd, consts)
                launch = kernel_launcher(torch, kernel, dict(q=q.view(B, H, 1, K), k=k, v=v, key_state=state.key_state,
                                                             value_state=state.value_state, seen=state.seen, **outs),
                                         consts)  # fmt: skip
                row = measure(torch, f"BLA variant: {entry['name']}", launch, do_bench,
                              H * N * (K + V) * sd.itemsize + 8, rows)  # fmt: skip
                row.update(one_step_rel_err=check, ptxas=entry["ptxas"])
        sdpa = torch.nn.functional.scaled_dot_product_attention
        for length in SDPA_CACHE if args.baselines else ():
            kc, vc = (torch.randn(B, H, length, d, device=DEVICE, dtype=bf16, generator=g) for d in (K, V))
            qs = q[:, :, None]

            def step(kc=kc, vc=vc, length=length, qs=qs):  # write the new token's k, v into the cache, attend over it
                kc[:, :, length - 1].copy_(k)
                vc[:, :, length - 1].copy_(v)
                return sdpa(qs, kc, vc)

            cache_bytes = H * length * (K + V) * 2
            measure(torch, f"SDPA KV cache {length}", step, do_bench, cache_bytes, rows)
            measure(torch, f"SDPA KV cache {length} (attention only)", lambda kc=kc, vc=vc, qs=qs: sdpa(qs, kc, vc),
                    do_bench, cache_bytes, rows)  # fmt: skip
        if args.fla and args.baselines:
            try:
                from fla.ops.gsa import fused_recurrent_gsa

                s = torch.randn(B, 1, H, FLA_SLOTS, device=DEVICE, dtype=bf16, generator=g)
                gate = torch.nn.functional.logsigmoid(torch.randn(B, 1, H, FLA_SLOTS, device=DEVICE, generator=g))
                gate = gate.to(bf16)
                hk0 = torch.randn(B, H, K, FLA_SLOTS, device=DEVICE, generator=g)
                hv0 = torch.randn(B, H, FLA_SLOTS, V, device=DEVICE, generator=g)
                qf, kf, vf = (x[:, None] for x in (q, k, v))
                start = time.time()
                fused_recurrent_gsa(qf, kf, vf, s, gate, initial_state=(hk0, hv0), output_final_state=True)
                synchronize(torch)
                print(f"FLA first call (Triton compile): {time.time() - start:.1f} s", flush=True)
                measure(
                    torch, f"FLA fused_recurrent_gsa M={FLA_SLOTS}",
                    lambda: fused_recurrent_gsa(qf, kf, vf, s, gate, initial_state=(hk0, hv0),
                                                output_final_state=True),
                    do_bench, H * FLA_SLOTS * (K + V) * 4, rows,
                )  # fmt: skip
            except Exception as error:  # noqa: BLE001
                rows.append({"method": "FLA fused_recurrent_gsa", "error": f"{type(error).__name__}: {error}"[:500]})
                print("FLA failed:", error, flush=True)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    return {"shape": dict(SHAPE, dtype="bfloat16"), "gpu": gpu, "rows": rows}


def profile_launches(torch, kernel_file: str | None, launches: int = 5) -> None:
    """Launch one decode kernel ``launches`` times at the benchmark shape, for a profiler to pick one launch: the
    library's kernel with a float32 state (``kernel_file`` None) or a variant's module file, with the state dtype
    its manifest (beside it) names."""
    import tvm_ffi

    from bla_tvm import kernels
    from bla_tvm.decode import DECODE_CHUNK, decode_constants, decode_kernel
    from bla_tvm.layer import KernelSpec
    from bla_tvm.runtime import default_library, load_tvm_runtime

    B, H, K, V = (SHAPE[x] for x in "BHKV")
    spec = KernelSpec(*layer_args(), K, V, "bfloat16", 1, chunk_size=DECODE_CHUNK)
    load_tvm_runtime(DEVICE)
    state_dtype = torch.float32
    if kernel_file is None:
        kernel = default_library().function("decode_step", spec, torch.device(DEVICE))
    else:
        manifest = Path(kernel_file).with_name("manifest.json")
        entries = json.loads(manifest.read_text()) if manifest.exists() else []
        state_dtype = next((getattr(torch, e["state"]) for e in entries if e["file"] == Path(kernel_file).name),
                           state_dtype)  # fmt: skip
        kernel = tvm_ffi.load_module(kernel_file)[kernels.get(decode_kernel(state_dtype, torch.float32)).symbol]
    g = torch.Generator(device=DEVICE).manual_seed(0)
    state = bench_state(torch, state_dtype, g)
    q, k, v = (torch.randn(B, H, d, device=DEVICE, generator=g).to(torch.bfloat16) for d in (K, K, V))
    outs = dict(o=torch.empty(B, H, 1, V, device=DEVICE, dtype=torch.bfloat16),
                key_out=torch.empty_like(state.key_state), value_out=torch.empty_like(state.value_state))
    launch = kernel_launcher(torch, kernel, dict(q=q.view(B, H, 1, K), k=k, v=v, key_state=state.key_state,
                                                 value_state=state.value_state, seen=state.seen, **outs),
                             decode_constants(spec.params, torch.float32, q.device, K**-0.5))  # fmt: skip
    for _ in range(launches):
        launch()
    synchronize(torch)


#: --profile-generate: tokens per timed or profiled loop, and loops per measurement (medians kept)
PROFILE_TOKENS = 64
PROFILE_REPEATS = 3
#: the state dtypes of issue 14's gap (generate 73.9 us a token against a 32.1 us replay with fp32, 49.5 against
#: a 40.5 us kernel with bf16)
PROFILE_STATES = ("float32", "bfloat16")
#: generate's loop (bla_tvm/generate.py), as the parts timed apart: the DecodeGraph call whole, or split into the
#: copy of the token into the graph's inputs and the replay (DecodeGraph.__call__'s argument checks left out)
GENERATE_PARTS = ("next_token", "check_next_token", "decoder_call", "copy_out")
SPLIT_PARTS = ("next_token", "check_next_token", "copy_in", "replay", "copy_out")


class EagerDecoder:
    """DecodeGraph's interface over eager in-place steps (generate's cuda_graph=False path): where there is no
    CUDA graph (the --device cpu dry run of --profile-generate)."""

    def __init__(self, torch, bla, state, query_heads: int, dtype):
        B, H, _, K = state.key_state.shape
        device = state.key_state.device
        self.torch, self.bla, self.state = torch, bla, state
        self.q = torch.zeros(B, query_heads, K, dtype=dtype, device=device)
        self.k = torch.zeros(B, H, K, dtype=dtype, device=device)
        self.v = torch.zeros(B, H, state.value_state.shape[-1], dtype=dtype, device=device)

    def replay(self):
        return self.bla.decode_step(self.q, self.k, self.v, self.state, *layer_args(), in_place=True)[0]

    def __call__(self, q, k, v):
        self.torch._foreach_copy_((self.q, self.k, self.v), (q, k, v))
        return self.replay()


def _stats(samples) -> dict:
    ordered = sorted(samples)
    return {"median": statistics.median(ordered), "mean": statistics.fmean(ordered),
            "p90": ordered[int(0.9 * (len(ordered) - 1))], "min": ordered[0]}  # fmt: skip


def loop_timing(torch, body, n: int, repeats: int = PROFILE_REPEATS) -> dict:
    """Microseconds per iteration of ``body(i)``, i < n, medians over ``repeats`` loops of each kind:
    wall_us: free-running (as generate runs), host clock, synchronised before and after;
    gpu_span_us: CUDA events around that free-running loop: the GPU's work plus any time it waits for the CPU;
    gpu_busy_us: CUDA events around the same loop issued while the GPU is held behind a sleep kernel, so that
      it runs the whole loop's work back to back: the GPU time of the work itself, no waiting for the CPU;
    cpu_issue_us: the host clock over that held-back loop: the CPU's cost of issuing it, no call waiting on
      the GPU (held_back_ok: the GPU had not reached the loop when the CPU finished issuing it, every repeat).
    On the CPU (the dry run) only wall_us."""
    cuda = DEVICE == "cuda"
    times = {"wall_us": [], "gpu_span_us": [], "gpu_busy_us": [], "cpu_issue_us": []}
    held_back_ok = True
    for _ in range(repeats):
        synchronize(torch)
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
        start = time.perf_counter()
        for i in range(n):
            body(i)
        if cuda:
            end.record()
        synchronize(torch)
        wall = (time.perf_counter() - start) / n
        times["wall_us"].append(wall * 1e6)
        if not cuda:
            continue
        times["gpu_span_us"].append(begin.elapsed_time(end) / n * 1e3)
        # hold the GPU for ~3x the free-running loop's wall time (cycles at ~2 GHz; longer at lower clocks)
        torch.cuda._sleep(int(max(1e7, 3 * n * wall * 2e9)))
        begin.record()
        start = time.perf_counter()
        for i in range(n):
            body(i)
        issue = (time.perf_counter() - start) / n
        end.record()
        held_back_ok = held_back_ok and not begin.query()
        synchronize(torch)
        times["cpu_issue_us"].append(issue * 1e6)
        times["gpu_busy_us"].append(begin.elapsed_time(end) / n * 1e3)
    row = {name: statistics.median(x) for name, x in times.items() if x}
    if cuda:
        row["held_back_ok"] = held_back_ok
        row["cpu_bound"] = row["cpu_issue_us"] > row["gpu_busy_us"]
    return row


def generate_loop_parts(torch, decoder, prompt, next_token, outputs, n: int, split: bool,
                        repeats: int = PROFILE_REPEATS) -> dict:  # fmt: skip
    """generate's decoding loop (bla_tvm/generate.py), copied with a host clock read between its parts: CPU
    microseconds per token of each part (GENERATE_PARTS, or SPLIT_PARTS with ``split``) over n tokens x
    ``repeats`` loops, their sum (cpu_us, the means), and the loop's wall time per token (synchronised)."""
    from bla_tvm.generate import _TokenCheck

    check = _TokenCheck(*prompt)
    clock = time.perf_counter
    names = SPLIT_PARTS if split else GENERATE_PARTS
    samples = {name: [] for name in names}
    walls = []
    for _ in range(repeats):
        last = None
        synchronize(torch)
        start = clock()
        for i in range(n):
            t0 = clock()
            token = next_token(last, i)
            t1 = clock()
            token = check(token, i)
            t2 = clock()
            if split:
                torch._foreach_copy_((decoder.q, decoder.k, decoder.v), token)
                t3 = clock()
                o = decoder.replay()
                t4 = clock()
                last = outputs[i].copy_(o)
                marks = (t0, t1, t2, t3, t4, clock())
            else:
                o = decoder(*token)
                t3 = clock()
                last = outputs[i].copy_(o)
                marks = (t0, t1, t2, t3, clock())
            for name, a, b in zip(names, marks, marks[1:]):
                samples[name].append((b - a) * 1e6)
        synchronize(torch)
        walls.append((clock() - start) / n * 1e6)
    parts = {name: _stats(x) for name, x in samples.items()}
    return {"parts_us": parts, "cpu_us": sum(p["mean"] for p in parts.values()), "wall_us": statistics.median(walls)}


def profiler_run(torch, fn, title: str, trace: Path | None = None) -> tuple[str, dict]:
    """``fn()`` under torch.profiler (CPU and CUDA activities): its key_averages tables sorted by self CPU time
    and by CUDA time (text), and the CUDA time of each kernel name over the run (us; the profiler's view of the
    GPU's work, no gaps). ``trace``: a Chrome trace, gzipped, there."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if DEVICE == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        synchronize(torch)
    averages = prof.key_averages()
    text = "".join(
        f"\n## {title}: sorted by {key}\n{averages.table(sort_by=key, row_limit=30, max_name_column_width=70)}\n"
        for key in ("self_cpu_time_total", "cuda_time_total" if DEVICE == "cuda" else "cpu_time_total")
    )
    kernels = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            total, count = kernels.get(event.name, (0.0, 0))
            kernels[event.name] = (total + event.device_time_total, count + 1)
    if trace is not None:
        raw = trace.with_suffix("")  # name.json.gz -> name.json
        prof.export_chrome_trace(str(raw))
        trace.write_bytes(gzip.compress(raw.read_bytes()))
        raw.unlink()
    return text, kernels


def profile_generate(torch, bla, out: Path, n: int = PROFILE_TOKENS, states=PROFILE_STATES) -> dict:
    """Where ``generate``'s time per decoded token goes at the benchmark shape (issue 14), for each state dtype:
    generate per token end to end (generate_per_token); generate's loop copied with the CPU time of each part
    (next_token, the token check, the DecodeGraph call or its copy in and replay apart, the copy of o out),
    against the GPU time per token (CUDA events, the GPU held back so it runs the loop's work without waiting);
    the layers under it timed alone (loop_timing: replay only, the copy in only, DecodeGraph(q, k, v) with
    contiguous tokens and with generate's slices, + the copy out, the whole loop, eager in-place steps). Then,
    every timing on disk, torch.profiler over the copied loop (parts labelled with record_function) and over
    one generate call (prefill, graph capture and n tokens). Writes profile_generate.json,
    profile_generate_tables.txt and profile_generate_<state>.trace.json.gz (the generate call's Chrome trace)."""
    from bla_tvm.generate import _TokenCheck

    start_time = time.time()
    out.mkdir(parents=True, exist_ok=True)
    B, H, K, V = (SHAPE[x] for x in "BHKV")
    bf16, cuda = torch.bfloat16, DEVICE == "cuda"
    g = torch.Generator(device=DEVICE).manual_seed(0)
    summary = {"shape": dict(SHAPE, dtype="bfloat16"), "tokens": n, "repeats": PROFILE_REPEATS, "device": DEVICE,
               "gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
               "host_kernel": platform.release(), "python": platform.python_version(),
               "fields": "us per token. generate_per_token: bla.generate end to end (runs of n and 5n tokens, "
               "differenced). generate_loop: its loop copied, CPU time of each part (host clock; cpu_us = sum of "
               "the means) against gpu_busy_us (CUDA events, the GPU held back behind a sleep kernel so it runs "
               "the loop's work back to back); cpu_bound = cpu_us > gpu_busy_us. layers: loop_timing's wall_us, "
               "gpu_span_us (events, free-running), gpu_busy_us, cpu_issue_us. profile_loop / profile_generate: "
               "torch.profiler's CUDA time per token by kernel (profile_generate's includes the 64-token prefill "
               "and the graph's capture, divided by n too)", "states": {}}  # fmt: skip
    tables = []
    # the prompt (64 tokens, as generate_per_token) and the new tokens: slices of [B, n, H, D] as next_token gives
    prompt = [torch.randn(B, 64, H, d, device=DEVICE, dtype=bf16, generator=g) for d in (K, K, V)]
    check = _TokenCheck(*prompt)
    tokens = [torch.randn(B, n, H, d, device=DEVICE, dtype=bf16, generator=g) for d in (K, K, V)]
    slices = [tuple(x[:, i] for x in tokens) for i in range(n)]
    contiguous = [tuple(x.contiguous() for x in token) for token in slices]
    outputs = torch.empty(n, B, H, V, device=DEVICE, dtype=bf16)

    def next_token(o, i):  # as generate_per_token's
        return tokens[0][:, i], tokens[1][:, i], tokens[2][:, i]

    def save():
        summary["seconds"] = time.time() - start_time
        (out / "profile_generate.json").write_text(json.dumps(summary, indent=1))
        (out / "profile_generate_tables.txt").write_text("".join(tables))

    decoders = {}
    with torch.no_grad():
        for state_name in states:
            sd = getattr(torch, state_name)
            case = summary["states"][state_name] = {}
            print(f"--- profile generate, {state_name} state", flush=True)
            try:
                case["generate_per_token"] = generate_per_token(torch, bla, sd, cuda, g, lengths=(n, 5 * n))
            except Exception as error:  # noqa: BLE001 - needs the prefill kernels; the loop below does not
                case["generate_per_token"] = {"error": f"{type(error).__name__}: {error}"[:500]}
            print("generate per token:", json.dumps(case["generate_per_token"]), flush=True)
            # generate's step at the benchmark state (every sequence past the window, as the replay benchmark)
            state = bench_state(torch, sd, g)
            if cuda:
                decoder = bla.DecodeGraph(state, *layer_args(), query_heads=H, dtype=bf16)
            else:
                decoder = EagerDecoder(torch, bla, state, H, bf16)
            decoders[state_name] = decoder
            decoder(*contiguous[0])  # warm-up
            synchronize(torch)
            # the copied loop, its parts timed apart; CPU-bound where the CPU's time per token exceeds the GPU's
            loop = case["generate_loop"] = generate_loop_parts(torch, decoder, prompt, next_token, outputs, n, False)
            case["generate_loop_split"] = generate_loop_parts(torch, decoder, prompt, next_token, outputs, n, True)
            last = [None]

            def whole_loop(i, decoder=decoder):  # generate's loop body, unlabelled
                last[0] = outputs[i].copy_(decoder(*check(next_token(last[0], i), i)))

            eager_state = bench_state(torch, sd, g)
            buffers = (decoder.q, decoder.k, decoder.v)
            whole_name = "generate's graph loop (next_token, the token check, decoder, copy out)"
            layers = {
                "decoder.replay() only": lambda i: decoder.replay(),
                "torch._foreach_copy_ of generate's slices into the graph inputs only":
                    lambda i: torch._foreach_copy_(buffers, slices[i]),
                "decoder(q, k, v), pre-made contiguous tokens": lambda i: decoder(*contiguous[i]),
                "decoder(q, k, v), generate's slices of [B, T, H, D]": lambda i: decoder(*slices[i]),
                "decoder(slices) + outputs[i].copy_(o)": lambda i: outputs[i].copy_(decoder(*slices[i])),
                whole_name: whole_loop,
                "eager in-place decode_step (generate with cuda_graph=False)":
                    lambda i: bla.decode_step(*slices[i], eager_state, *layer_args(), in_place=True),
            }  # fmt: skip
            case["layers"] = {}
            for name, body in layers.items():
                try:
                    case["layers"][name] = loop_timing(torch, body, n)
                except Exception as error:  # noqa: BLE001
                    case["layers"][name] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"{name}: {json.dumps(case['layers'][name])}", flush=True)
            whole = case["layers"][whole_name]
            for key in ("gpu_busy_us", "gpu_span_us", "cpu_issue_us"):
                loop[key] = whole.get(key)
            if loop["gpu_busy_us"] is not None:
                loop["cpu_bound"] = loop["cpu_us"] > loop["gpu_busy_us"]
            print("generate loop parts (us per token, means):",
                  {k: round(v["mean"], 2) for k, v in loop["parts_us"].items()}, "cpu", round(loop["cpu_us"], 2),
                  "gpu busy", loop["gpu_busy_us"], "wall", round(loop["wall_us"], 2), flush=True)  # fmt: skip
            del eager_state
            save()
        # torch.profiler last (every timing already on disk): the copied loop, each part a record_function
        # range, then one whole generate call (its prefill and graph capture inside the profile too)
        record = torch.profiler.record_function
        for state_name in states:
            sd, decoder, case = getattr(torch, state_name), decoders[state_name], summary["states"][state_name]

            def labelled_loop(decoder=decoder):
                last = None
                for i in range(n):
                    with record("gen.next_token"):
                        token = next_token(last, i)
                    with record("gen.check_next_token"):
                        token = check(token, i)
                    with record("gen.decoder_call"):
                        o = decoder(*token)
                    with record("gen.copy_out"):
                        last = outputs[i].copy_(o)

            def one_generate(sd=sd):
                bla.generate(*prompt, *layer_args(), next_token=next_token, max_new_tokens=n, state_dtype=sd,
                             cuda_graph=cuda)  # fmt: skip

            runs = [("loop", f"{state_name} state: generate's loop copied, {n} tokens", labelled_loop, None),
                    ("generate", f"{state_name} state: bla.generate (prefill 64 + {n} new tokens)", one_generate,
                     out / f"profile_generate_{state_name}.trace.json.gz")]  # fmt: skip
            for key, title, fn, trace in runs:
                try:
                    text, kernels = profiler_run(torch, fn, title, trace)
                    tables.append(text)
                    case[f"profile_{key}"] = {
                        "gpu_kernel_us_per_token": sum(t for t, _ in kernels.values()) / n,
                        "kernels_per_token": {name: {"us": t / n, "calls": c / n}
                                              for name, (t, c) in sorted(kernels.items(), key=lambda x: -x[1][0])},
                    }  # fmt: skip
                except Exception as error:  # noqa: BLE001
                    case[f"profile_{key}"] = {"error": f"{type(error).__name__}: {error}"[:500]}
                print(f"profile {key}, {state_name} state:", json.dumps(case[f"profile_{key}"])[:800], flush=True)
                save()
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list-specs", action="store_true", help="print the kernel specs to build, as JSON")
    parser.add_argument("--build-variants", type=Path, help="compile the schedule VARIANTS into this folder")
    parser.add_argument("--bundle", type=Path, help="runtime bundle (for a machine without apache-tvm)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("--no-fla", dest="fla", action="store_false", help="skip FLA's fused_recurrent_gsa")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--no-baselines", dest="baselines", action="store_false", help="time BLA only")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run of the script")
    parser.add_argument("--check-tokens", type=int, default=4096, help="tokens decoded by each check")
    parser.add_argument("--profile", metavar="KERNEL", help="only launch a decode kernel 5 times, for a profiler: "
                        "'default' (the library's) or a variant's module file")  # fmt: skip
    parser.add_argument("--profile-generate", action="store_true",
                        help="only where generate's time per token goes (fp32 and bf16 states): CPU time of each "
                        "part of its loop against GPU time (CUDA events), each layer timed alone, torch.profiler "
                        "tables; writes profile_generate.json, profile_generate_tables.txt, *.trace.json.gz")
    parser.add_argument("--profile-tokens", type=int, default=PROFILE_TOKENS,
                        help="tokens per loop of --profile-generate")  # fmt: skip
    args = parser.parse_args()
    global DEVICE, CHECK_TOKENS, PARTIAL
    DEVICE, CHECK_TOKENS, PARTIAL = args.device, args.check_tokens, args.out / "decode_bench_rows.jsonl"
    if args.list_specs:
        print(json.dumps(decode_specs(), indent=1))
        return 0
    if args.build_variants:
        build_variants(args.build_variants)
        return 0
    if args.bundle:
        use_bundle(args.bundle)
    import torch

    import bla_tvm

    if args.profile:
        profile_launches(torch, None if args.profile == "default" else args.profile)
        return 0
    if args.profile_generate:
        summary = profile_generate(torch, bla_tvm, args.out, args.profile_tokens)
        for state_name, case in summary["states"].items():
            loop, per_token = case["generate_loop"], case["generate_per_token"].get("per_token_us")
            parts = {k: round(v["mean"], 1) for k, v in loop["parts_us"].items()}
            print(f"{state_name} state: generate end to end {per_token} us/token; its loop copied: CPU "
                  f"{loop['cpu_us']:.1f} us/token {parts}, GPU busy {loop.get('gpu_busy_us')}, wall "
                  f"{loop['wall_us']:.1f}, CPU-bound: {loop.get('cpu_bound')}")  # fmt: skip
            for name, row in case["layers"].items():
                numbers = "  ".join(f"{k}={v:.1f}" for k, v in row.items() if isinstance(v, float))
                print(f"  {name:70s} {numbers}")
        print(f"profile-generate: {summary['seconds']:.1f} s, files in {args.out}")
        return 0
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"checks": [] if args.skip_checks else run_checks(torch, bla_tvm)}
    (args.out / "decode_bench.json").write_text(json.dumps(results, indent=1))  # partial, in case of a timeout
    results["bench"] = run_benchmarks(torch, bla_tvm, args)
    results["seconds"] = time.time() - start
    (args.out / "decode_bench.json").write_text(json.dumps(results, indent=1))
    failed = [c for c in results["checks"] if c["ok"] is False and c.get("gating", True)]
    print(f"checks: {len(results['checks']) - len(failed)} passed or skipped, {len(failed)} failed")
    for row in results["bench"]["rows"]:
        numbers = "  ".join(f"{k}={v:.4g}" for k, v in row.items() if isinstance(v, float))
        print(f"{row['method']:45s} {numbers}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
