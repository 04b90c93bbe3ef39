"""Training step (forward + backward) of the public op on CUDA at the shape of record, against FlexAttention SWA
and SDPA timed in the same run: time, peak memory above the inputs, the time of each kernel (torch.profiler) and
the gradients' error against the float64 definition on a slice (one call on the GPU machine; kernels prebuilt:
see README "GPU tests" for the bundle).

    BLA_TVM_PREBUILT_DIR=.bundle/kernels BLA_TVM_RUNTIME_DIR=.bundle/lib BLA_TVM_NO_BUILD=1 BLA_TVM_NO_TUNING=1 \\
        python benchmarks/training_bench.py --out $OUT
``--profile`` runs two steps of N = M = 63 and nothing else (for Nsight Compute: ``ncu --launch-skip`` the first);
``--memory`` prints what is allocated at the peak of one such step, by size and the line that allocated it;
``--list-specs`` prints the kernels this benchmark and ``forward_bench.py`` load, for ``bla-tvm build --specs``.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bla_tvm import blurry_window_attention
from bla_tvm.layer import LayerSpec
from bla_tvm.testing import layer_kernels
from bla_tvm.reference import bla_recurrent

SHAPE = dict(B=4, T=4096, H=16, K=64, V=64)
WINDOW = 512
LAYERS = {"BLA N=M=63": (63, 63), "BLA N=63 M=512": (63, 512)}


def kernel_specs() -> list[dict]:
    """The (spec, kernels) of every layer timed here and in forward_bench.py, GQA G = 2 of ``gradient_errors``
    included, as ``bla-tvm build --specs`` reads them."""
    K, V = SHAPE["K"], SHAPE["V"]
    layers = [LayerSpec(WINDOW, N, M, K, V, "bfloat16") for N, M in LAYERS.values()]
    layers.append(LayerSpec(WINDOW, 63, 63, K, V, "bfloat16", 2))
    return [dict(spec.as_dict(), kernels=list(names)) for spec, names in layer_kernels(layers)]


def relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double().cpu() - ref).norm() / ref.norm()).item()


def gradient_errors(N: int, M: int, device, dtype, group: int = 1) -> dict:
    """Relative error of o, dq, dk, dv against autograd through the float64 recurrence (B=1, T=300, H=2, and
    2 ``group`` query heads)."""
    gen = torch.Generator().manual_seed(1)
    q, do = (torch.randn(1, 300, 2 * group, 64, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, 300, 2, 64, generator=gen) for _ in range(2))
    leaves = [x.to(device, dtype).requires_grad_() for x in (q, k, v)]
    o, _ = blurry_window_attention(*leaves, WINDOW, N, M)
    grads = torch.autograd.grad(o, leaves, do.to(device, dtype))
    refs = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref = bla_recurrent(refs[0], *(x.repeat_interleave(group, dim=2) for x in refs[1:]), WINDOW, N, M)
    ref_grads = torch.autograd.grad(o_ref, refs, do.double())
    errors = {"o": relative(o, o_ref.detach())}
    errors.update({name: relative(g, r) for name, g, r in zip(("dq", "dk", "dv"), grads, ref_grads)})
    return errors


def do_bench(*args, **kwargs) -> float:
    """triton's do_bench, imported at first use: ``--list-specs`` runs where there is no triton (no GPU)."""
    import triton.testing

    return triton.testing.do_bench(*args, **kwargs)


def step_ms(step, inputs) -> float:
    return do_bench(step, grad_to_none=inputs, return_mode="median")


def peak_mb(step) -> float:
    """Peak memory of one step above what was allocated before it (MB)."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def kernel_ms(step, inputs, repeats: int = 5) -> dict:
    """CUDA time per step of each kernel name (ms), from torch.profiler; the inputs' gradients dropped before
    each step, as in ``step_ms`` (else autograd's accumulation into them is timed too)."""

    def fresh_step():
        for x in inputs:
            x.grad = None
        step()

    fresh_step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(repeats):
            fresh_step()
        torch.cuda.synchronize()
    totals = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            totals[event.name] += event.device_time_total / 1e3 / repeats
    return dict(sorted(totals.items(), key=lambda item: -item[1]))


def profile_steps() -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    B, T, H, K, V = (SHAPE[x] for x in "BTHKV")
    q, k, v = (torch.randn(B, T, H, d, device=device, dtype=dtype, requires_grad=True) for d in (K, K, V))
    do = torch.randn(B, T, H, V, device=device, dtype=dtype)
    for _ in range(2):
        blurry_window_attention(q, k, v, WINDOW, 63, 63)[0].backward(do)
    torch.cuda.synchronize()


def memory_at_peak() -> None:
    """The tensors live at the peak of one training step (N = M = 63, after a warm-up step), from the caching
    allocator's trace: each one's MiB and the innermost frame of the package or this script that allocated it."""
    device, dtype = torch.device("cuda"), torch.bfloat16
    B, T, H, K, V = (SHAPE[x] for x in "BTHKV")
    q, k, v = (torch.randn(B, T, H, d, device=device, dtype=dtype, requires_grad=True) for d in (K, K, V))
    do = torch.randn(B, T, H, V, device=device, dtype=dtype)

    def step():
        blurry_window_attention(q, k, v, WINDOW, 63, 63)[0].backward(do)

    step()
    torch.cuda.synchronize()
    before = {(block["address"], block["size"]) for segment in torch.cuda.memory._snapshot()["segments"]
              for block in segment["blocks"] if block["state"] == "active_allocated"}  # fmt: skip
    torch.cuda.memory._record_memory_history(stacks="python", max_entries=100_000)
    step()
    torch.cuda.synchronize()
    trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    live, peak, at_peak = {}, 0, {}
    for event in trace:
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total = sum(e["size"] for e in live.values())
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] in ("free_requested", "free_completed"):
            live.pop(event["addr"], None)
    print(f"before the step: {sum(size for _, size in before) / 2**20:.1f} MiB allocated (q, k, v, do, grads)")
    print(f"peak of the step above that: {peak / 2**20:.1f} MiB, held by:")
    for event in sorted(at_peak.values(), key=lambda e: -e["size"]):
        frames = [f for f in event["frames"] if "bla_tvm" in f["filename"] or "training_bench" in f["filename"]]
        where = f"{frames[0]['filename'].split('/')[-1]}:{frames[0]['line']} {frames[0]['name']}" if frames else "?"
        print(f"  {event['size'] / 2**20:8.2f} MiB  {where}")


def main(out: Path, lengths: list[int], fla: bool) -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    B, T, H, K, V = (SHAPE[x] for x in "BTHKV")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen).to(device, dtype).requires_grad_() for d in (K, K, V))
    do = torch.randn(B, T, H, V, generator=gen).to(device, dtype)
    results = {"device": torch.cuda.get_device_name(), "shape": dict(SHAPE, W=WINDOW, dtype="bfloat16"), "ms": {},
               "peak_mb_above_inputs": {}, "kernels_ms": {}, "errors": {}}  # fmt: skip
    results["errors"]["BLA N=M=63, GQA G=2"] = gradient_errors(63, 63, device, dtype, group=2)
    for name, (N, M) in LAYERS.items():
        results["errors"][name] = gradient_errors(N, M, device, dtype)

        def step(N=N, M=M):
            blurry_window_attention(q, k, v, WINDOW, N, M)[0].backward(do)

        results["ms"][name] = step_ms(step, [q, k, v])
        results["peak_mb_above_inputs"][name] = peak_mb(step)
        results["kernels_ms"][name] = kernel_ms(step, [q, k, v])
        print(name, results["ms"][name], results["errors"][name], flush=True)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    dot = do.transpose(1, 2).contiguous()
    mask = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < WINDOW), None, None, T, T, device=device)
    flex = torch.compile(flex_attention)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    baselines = {"Flex SWA-512": lambda: flex(qt, kt, vt, block_mask=mask).backward(dot),
                 "SDPA causal": lambda: sdpa(qt, kt, vt, is_causal=True).backward(dot)}  # fmt: skip
    for name, step in baselines.items():
        results["ms"][name] = step_ms(step, [qt, kt, vt])
        results["peak_mb_above_inputs"][name] = peak_mb(step)
    # inference forwards in the same run (the forward's own benchmark is forward_bench.py)
    results["forward_ms"] = {}
    with torch.no_grad():
        for name, (N, M) in LAYERS.items():
            results["forward_ms"][name] = do_bench(
                lambda N=N, M=M: blurry_window_attention(q, k, v, WINDOW, N, M), return_mode="median")
        results["forward_ms"]["Flex SWA-512"] = do_bench(lambda: flex(qt, kt, vt, block_mask=mask),
                                                                        return_mode="median")  # fmt: skip
        results["forward_ms"]["SDPA causal"] = do_bench(lambda: sdpa(qt, kt, vt, is_causal=True),
                                                                       return_mode="median")  # fmt: skip
    save(results, out)  # what is measured so far, should a later part (FLA's compilation) run out of time
    if fla:  # FLA's Gated Slot Attention with 64 slots (its chunk kernel), the Triton peer
        from fla.ops.gsa import chunk_gsa

        slots = torch.randn(B, T, H, 64, generator=gen).to(device, dtype)
        gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, 64, generator=gen)).to(device, dtype)
        fla_inputs = [x.detach().clone().requires_grad_() for x in (q, k, v, slots, gate)]
        with torch.no_grad():
            results["forward_ms"]["FLA chunk_gsa M=64"] = do_bench(
                lambda: chunk_gsa(q, k, v, slots, gate), return_mode="median")  # fmt: skip
        fla_step = lambda: chunk_gsa(*fla_inputs)[0].backward(do)  # noqa: E731
        results["ms"]["FLA chunk_gsa M=64"] = step_ms(fla_step, fla_inputs)
        results["peak_mb_above_inputs"]["FLA chunk_gsa M=64"] = peak_mb(fla_step)
        save(results, out)
    results["long"] = {}
    del q, k, v, qt, kt, vt
    for length in lengths:  # does a long sequence train, and with how much memory
        ql, kl, vl = (torch.randn(B, length, H, d, generator=gen).to(device, dtype).requires_grad_() for d in (K, K, V))
        dol = torch.randn(B, length, H, V, generator=gen).to(device, dtype)

        def long_step():
            blurry_window_attention(ql, kl, vl, WINDOW, 63, 63)[0].backward(dol)

        results["long"][length] = dict(ms=step_ms(long_step, [ql, kl, vl]), peak_mb=peak_mb(long_step),
                                       finite=bool(torch.isfinite(ql.grad).all()))  # fmt: skip
        del ql, kl, vl, dol
    print(json.dumps(results, indent=1))
    save(results, out)


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "training_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--lengths", type=int, nargs="*", default=[65536])
    parser.add_argument("--profile", action="store_true", help="two training steps only (for ncu)")
    parser.add_argument("--fla", action="store_true", help="time FLA's chunk_gsa too (flash-linear-attention)")
    parser.add_argument("--memory", action="store_true", help="what one step holds at its peak, and who allocated it")
    parser.add_argument("--list-specs", action="store_true", help="print the kernel specs to build, as JSON")
    args = parser.parse_args()
    if args.list_specs:
        print(json.dumps(kernel_specs(), indent=1))
    elif args.profile:
        profile_steps()
    elif args.memory:
        memory_at_peak()
    else:
        main(args.out, args.lengths, args.fla)
