"""BLA on a CUDA GPU, forward and backward: every compiled kernel checked against the float64 reference, then
timed against the kernels a user would otherwise pick. One script, one call on the GPU machine.

Here (build machine, no GPU):
    python benchmarks/gpu_bench.py --list-specs > build/gpu_specs.json
    bla-tvm build --device cuda --arch sm_90 --specs build/gpu_specs.json --out .bundle/kernels
    bla-tvm bundle --out .bundle
On the GPU machine (torch + the bundle only; FLA 0.6.0 wheels optional in .whl/, with --fla):
    python benchmarks/gpu_bench.py --bundle .bundle --out $OUT

Writes gpu_bench.json (every measurement) and gpu_bench.png (forward time per token against T).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: benchmark shape (issues 4 and 5): B=4, H=16, K=V=64, bf16, window 512
BENCH = dict(B=4, H=16, K=64, V=64, window=512)
BENCH_T = tuple(int(t) for t in os.environ.get("BLA_BENCH_T", "1024,4096,16384,65536").split(","))
BENCH_BLA = {"BLA N=M=63": (63, 63), "BLA N=63 M=512": (63, 512)}
CHECK_DTYPES = ("float32", "bfloat16")
#: the layer of the training check: (W, N, M, K, V), float32
TRAIN_LAYER = (16, 7, 9, 40, 72)
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}
#: layers of the state, packed-sequence and GQA checks (issue 7): (W, N, M, K, V, GQA group size, dtype)
STATE_LAYERS = (
    (64, 15, 15, 64, 64, 1, "float32"),
    (100, 31, 40, 40, 72, 2, "bfloat16"),
    (16, 16, 16, 16, 16, 4, "float32"),
)


def check_cases(count: int = 24, seed: int = 2026) -> list[dict]:
    """Random parameter sets for the correctness check: T often not a multiple of the chunk, N == W often;
    float32 and bfloat16 alternately."""
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        window = rng.choice([1, 4, 8, 16, 33, 64, 100, 128])
        odd = [n for n in range(1, window + 1) if n % 2 == 1]
        resolution = window if i % 4 == 0 else rng.choice(odd)
        slots = rng.choice([resolution, window, max(1, resolution // 2), rng.randint(1, 2 * window)])
        if i % 4 == 0:
            slots = window  # N == W == M: sliding-window attention
        cases.append(
            dict(
                window=window, resolution=resolution, num_slots=slots,
                B=rng.randint(1, 3), T=rng.choice([1, 37, 64, 100, 129, 200, 255]), H=rng.randint(1, 4),
                K=rng.choice([16, 40, 64]), V=rng.choice([16, 64, 72]), dtype=CHECK_DTYPES[i % 2],
            )
        )  # fmt: skip
    return cases


def chunk_size(window, resolution, slots, K, V, dtype, backward, group_size=1) -> int:
    """The chunk length the op picks on CUDA where no tuning log has one (``dispatch.default_chunk_size``)."""
    sys.path.insert(0, str(REPO))
    import torch

    from bla_tvm.dispatch import default_chunk_size
    from bla_tvm.layer import LayerSpec

    layer = LayerSpec(window, resolution, slots, K, V, dtype, group_size)
    return default_chunk_size(torch.device("cuda"), layer, backward)


def kernel_specs() -> list[dict]:
    """Every spec the checks and benchmarks load: inference chunk length (forward kernels) and training chunk
    length (forward and backward kernels; the build command builds both for every spec)."""
    layers = [(c["window"], c["resolution"], c["num_slots"], c["K"], c["V"], c["dtype"]) for c in check_cases()]
    layers += [(BENCH["window"], n, m, BENCH["K"], BENCH["V"], d) for n, m in BENCH_BLA.values()
               for d in ("bfloat16", "float32")]  # fmt: skip
    layers.append((*TRAIN_LAYER, "float32"))
    layers = [(*layer[:5], 1, layer[5]) for layer in layers] + list(STATE_LAYERS)
    from bla_tvm.kernels import BACKWARD, FORWARD

    specs = {}
    for W, N, M, K, V, group, dtype in layers:
        for backward in (False, True):
            L = chunk_size(W, N, M, K, V, dtype, backward, group)
            spec = dict(
                window=W, resolution=N, num_slots=M, chunk_size=L, head_k=K, head_v=V, dtype=dtype, group_size=group
            )
            key = json.dumps(spec, sort_keys=True)
            kernels = set(specs.get(key, {}).get("kernels", ()))
            kernels |= set(FORWARD + (BACKWARD if backward else ()))
            specs[key] = dict(spec, kernels=sorted(kernels))
    return list(specs.values())


def use_bundle(bundle: Path) -> None:
    """Install the bundle's tvm_ffi wheel and point bla_tvm at the prebuilt kernels and TVM runtime."""
    site = Path("/tmp/bla_site")
    wheels = sorted((bundle / "wheels").glob("*.whl")) + sorted(Path(REPO / ".whl").glob("*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(site),
         *map(str, wheels)],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(site))
    os.environ["BLA_TVM_PREBUILT_DIR"] = str(bundle / "kernels")
    os.environ["BLA_TVM_RUNTIME_DIR"] = str(bundle / "lib")
    os.environ["BLA_TVM_NO_BUILD"] = "1"


def relative_error(out, ref, floor=0.0) -> float:
    """||out - ref|| / max(||ref||, floor). A gradient can vanish exactly (with N = 1 every slot holds the same
    key, so dq = dk = 0): its error is then measured against ``floor`` = ||dO||, the scale of a gradient."""
    return ((out.double().cpu() - ref).norm() / max(ref.norm().item(), floor, 1e-300)).item()


def run_checks(torch, bla, only=None) -> list[dict]:
    """Forward (inference chunk length) and forward + backward (training chunk length) on poisoned outputs;
    ``only``: the indices of the cases to run (all by default)."""
    from bla_tvm.layout import batch_layout
    from bla_tvm.dispatch import phase_kernels, plan_call
    from bla_tvm.ops import kernel_spec, launch_backward, launch_forward

    results = []
    for index, case in enumerate(check_cases()):
        if only is not None and index not in only:
            continue
        for dtype_name in [case["dtype"]]:
            dtype = getattr(torch, dtype_name)
            g = torch.Generator(device="cuda").manual_seed(index)
            B, T, H, K, V = (case[x] for x in "BTHKV")
            W, N, M = case["window"], case["resolution"], case["num_slots"]
            q, k = (torch.randn(B, T, H, K, device="cuda", generator=g, dtype=dtype) for _ in range(2))
            v, do = (torch.randn(B, T, H, V, device="cuda", generator=g, dtype=dtype) for _ in range(2))
            scale = K**-0.5
            qr, kr, vr = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
            ref = bla.bla_quadratic(qr, kr, vr, W, N, M, scale)
            ref.backward(do.cpu().double())
            row = dict(case)
            for backward in (False, True):
                spec = kernel_spec(q, k, v, W, N, M, chunk_size(W, N, M, K, V, dtype_name, backward))
                layout = batch_layout(B, T, spec.chunk_size, W, torch.zeros(B, dtype=torch.int64, device="cuda"))
                initial = torch.zeros(B, H, N, K + V, device="cuda")  # a fresh start
                o = torch.full((B, T, H, V), float("nan"), device="cuda", dtype=dtype)  # poisoned
                plan = plan_call(q.device, spec, q.shape, phase_kernels(backward, final_state=True), scale)
                states, _ = launch_forward(plan, q, k, v, initial, o, layout)
                tag = "train" if backward else "infer"
                outputs = {f"o_{tag}": (o, ref.detach())}
                if backward:
                    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
                    launch_backward(plan, q, k, v, states, do, torch.zeros_like(initial), dq, dk, dv, layout)
                    outputs.update(dq=(dq, qr.grad), dk=(dk, kr.grad), dv=(dv, vr.grad))
                torch.cuda.synchronize()
                for name, (out, expected) in outputs.items():
                    floor = 0.0 if name.startswith("o_") else do.double().norm().item()
                    row[name] = relative_error(out, expected, floor)
                    row[name + "_finite"] = bool(torch.isfinite(out).all())
            names = ("o_infer", "o_train", "dq", "dk", "dv")
            row["ok"] = all(row[n + "_finite"] and row[n] <= TOLERANCE[dtype_name] for n in names)
            results.append(row)
            print(f"check {index:2d} {dtype_name:8s} W={W} N={N} M={M} B={B} T={T} H={H} K={K} V={V} "
                  + " ".join(f"{n}={row[n]:.1e}" for n in names) + (" ok" if row["ok"] else " FAIL"), flush=True)
    return results


def run_state_checks(torch, bla) -> list[dict]:
    """Issue 7 on the GPU, through the public API: a sequence split in pieces carrying the state equals one
    call; one call from a random carried state (GQA where the layer has groups) equals the float64 recurrent
    definition, outputs, final states and every gradient (initial state included); packed sequences (empty
    and length-1 ones included) equal separate calls."""
    from bla_tvm import BLAState

    results = []
    for index, (W, N, M, K, V, group, dtype_name) in enumerate(STATE_LAYERS):
        dtype, tol = getattr(torch, dtype_name), TOLERANCE[dtype_name]
        g = torch.Generator().manual_seed(index)
        B, T, H = 2, 300, 2
        q, k, v = (torch.randn(B, T, h, d, generator=g).to(dtype).cuda() for h, d in ((H * group, K), (H, K), (H, V)))
        layer = dict(window=W, resolution=N, num_slots=M)
        row = dict(window=W, resolution=N, num_slots=M, K=K, V=V, group=group, dtype=dtype_name, T=T)
        # split anywhere: inside a chunk, before the window fills, at a chunk boundary
        o, final = bla.blurry_window_attention(q, k, v, **layer, output_final_state=True)
        pieces, state = [], None
        for a, b in ((0, 5), (5, 64), (64, 170), (170, T)):
            piece, state = bla.blurry_window_attention(
                q[:, a:b], k[:, a:b], v[:, a:b], **layer, initial_state=state, output_final_state=True
            )
            pieces.append(piece)
        row["split_o"] = relative_error(torch.cat(pieces, 1), o.double().cpu())
        row["split_state"] = relative_error(state.key_state, final.key_state.double().cpu())
        # a carried start against the definition, gradients included
        seen = torch.tensor([3, 2 * W])
        X0, Y0 = (torch.randn(B, H, N, d, generator=g) for d in (K, V))
        weights = [torch.randn(B, T, H * group, V, generator=g), torch.randn(B, H, N, K, generator=g)]
        inputs = [x.detach().clone().cuda().requires_grad_() for x in (q, k, v, X0, Y0)]
        o, final = bla.blurry_window_attention(
            *inputs[:3], **layer, initial_state=BLAState(inputs[3], inputs[4], seen.cuda()), output_final_state=True
        )
        loss = (o.float() * weights[0].cuda()).sum() + (final.key_state * weights[1].cuda()).sum()
        grads = torch.autograd.grad(loss, inputs)
        refs = [x.detach().double().cpu().requires_grad_() for x in inputs]
        o_ref, (X, _, _) = bla.bla_recurrent(
            *refs[:3], **layer, initial_state=(refs[3], refs[4], seen), output_final_state=True
        )
        ref_loss = (o_ref * weights[0].double()).sum() + (X[:, ::group] * weights[1].double()).sum()
        ref_grads = torch.autograd.grad(ref_loss, refs)
        row["carried_o"] = relative_error(o, o_ref.detach())
        row["carried_state"] = relative_error(final.key_state, X[:, ::group].detach())
        for name, grad, expected in zip(("dq", "dk", "dv", "dX0", "dY0"), grads, ref_grads):
            row[name] = relative_error(grad, expected)
        # packed sequences against separate calls
        lengths = [0, 1, 77, 130, 5, 64, 0]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
        Tp = sum(lengths)
        qp, kp, vp = (x[:1, :Tp].contiguous() for x in (q, k, v))
        o, final = bla.blurry_window_attention(qp, kp, vp, **layer, output_final_state=True, cu_seqlens=cu)
        worst = 0.0
        for s in range(len(lengths)):
            a, b = cu[s].item(), cu[s + 1].item()
            o_s, final_s = bla.blurry_window_attention(qp[:, a:b], kp[:, a:b], vp[:, a:b], **layer, output_final_state=True)
            if b > a:
                worst = max(worst, relative_error(o[:, a:b], o_s.double().cpu()))
            worst = max(worst, relative_error(final.value_state[s:s + 1], final_s.value_state.double().cpu()))
        row["packed"] = worst
        names = ("split_o", "split_state", "carried_o", "carried_state", "dq", "dk", "dv", "dX0", "dY0", "packed")
        exact = 1e-5 if dtype_name == "float32" else tol  # pieces against one call: the same kernels
        row["ok"] = all(row[n] <= (exact if n.startswith("split") or n == "packed" else tol) for n in names)
        row["name"] = f"state {index}"
        results.append(row)
        print(f"state check {index} W={W} N={N} M={M} K={K} V={V} G={group} {dtype_name} "
              + " ".join(f"{n}={row[n]:.1e}" for n in names) + (" ok" if row["ok"] else " FAIL"), flush=True)
    return results


def run_training(torch, bla) -> dict:
    """A small model using the op learns, on the GPU: embeddings -> q, k, v -> BLA -> logits, trained with Adam
    to name the current token from the attention output alone (it must learn to find it among the slots)."""
    W, N, M, K, V = TRAIN_LAYER
    torch.manual_seed(0)
    vocab, dim, heads = 16, 64, 2
    embed = torch.nn.Embedding(vocab, dim).cuda()
    project = torch.nn.Linear(dim, heads * (2 * K + V)).cuda()
    readout = torch.nn.Linear(heads * V, vocab).cuda()
    params = [*embed.parameters(), *project.parameters(), *readout.parameters()]
    optimizer = torch.optim.Adam(params, lr=3e-3)
    losses = []
    for step in range(100):
        tokens = torch.randint(0, vocab, (8, 96), device="cuda")
        q, k, v = project(embed(tokens)).view(8, 96, heads, 2 * K + V).split([K, K, V], dim=-1)
        o, _ = bla.blurry_window_attention(q.contiguous(), k.contiguous(), v.contiguous(), W, N, M)
        loss = torch.nn.functional.cross_entropy(readout(o.flatten(2)).reshape(-1, vocab), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    result = {"layer": TRAIN_LAYER, "first_loss": first, "last_loss": last, "ok": last < 0.5 * first}
    print("training:", result, flush=True)
    return result


def bench(fn, do_bench) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd(torch, fn, inputs, do):
    def run():
        for x in inputs:
            x.grad = None
        fn().backward(do)

    return run


def peak_memory_mb(torch, fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_benchmarks(torch, args) -> dict:
    from triton.testing import do_bench

    import bla_tvm
    from bla_tvm.layout import batch_layout
    from bla_tvm.dispatch import device_constants
    from bla_tvm.kernels import FORWARD
    from bla_tvm.ops import kernel_spec
    from bla_tvm.runtime import default_library
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    fla = None
    if args.fla:
        try:
            from fla.ops.gsa import chunk_gsa

            fla = chunk_gsa
        except ImportError as error:
            print("FLA not available:", error)
    B, H, K, V, W = (BENCH[x] for x in ("B", "H", "K", "V", "window"))
    rows = []
    for T in BENCH_T:
        g = torch.Generator(device="cuda").manual_seed(T)
        q, k = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        v, do = (torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
        row = {"T": T}
        methods = {}
        for name, (resolution, slots) in BENCH_BLA.items():
            methods[name] = (
                lambda n=resolution, m=slots: bla_tvm.blurry_window_attention(q, k, v, W, n, m)[0],
                lambda n=resolution, m=slots: bla_tvm.blurry_window_attention(qg, kg, vg, W, n, m)[0],
                (qg, kg, vg), do,
            )  # fmt: skip
            if T == 4096:  # where the forward's time goes: each kernel alone (inference chunk length)
                L = chunk_size(W, resolution, slots, K, V, "bfloat16", False)
                spec = kernel_spec(q, k, v, W, resolution, slots, L)
                fns = [default_library().function(kn, spec, q.device) for kn in FORWARD]
                consts = device_constants(spec.params, L, torch.float32, q.device, K**-0.5)
                U = torch.randn(B, T // L, H, resolution, K + V, device="cuda")
                X, o = torch.randn_like(U), torch.empty_like(v)
                layout = batch_layout(B, T, L, W, torch.zeros(B, dtype=torch.int64, device="cuda"))
                initial = torch.zeros(B, H, resolution, K + V, device="cuda")
                row[name + " kernels"] = {
                    "chunk_length": L,
                    "chunk_state": bench(lambda: fns[0](k, v, consts["state_in"], U), do_bench),
                    "state_scan": bench(lambda: fns[1](U, consts["state_decay"], initial, layout.starts, X), do_bench),
                    "chunk_output": bench(
                        lambda: fns[2](q, k, v, X, layout.positions, consts["scale"], *(consts[n] for n in ("input_map", "lag_basis", "slot_readout", "rot_diag", "rot_off")), o), do_bench
                    ),
                }
        qh, kh, vh, doh = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
        qhg, khg, vhg = (x.clone().requires_grad_() for x in (qh, kh, vh))

        def sliding(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        mask = create_block_mask(sliding, None, None, T, T, device="cuda")
        methods["Flex SWA-512"] = (
            lambda: flex(qh, kh, vh, block_mask=mask), lambda: flex(qhg, khg, vhg, block_mask=mask),
            (qhg, khg, vhg), doh,
        )  # fmt: skip
        sdpa = torch.nn.functional.scaled_dot_product_attention
        methods["SDPA causal"] = (
            lambda: sdpa(qh, kh, vh, is_causal=True), lambda: sdpa(qhg, khg, vhg, is_causal=True),
            (qhg, khg, vhg), doh,
        )  # fmt: skip
        if fla is not None and T <= 16384:
            s = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, 64, device="cuda", generator=g)).bfloat16()
            sg, gg = s.clone().requires_grad_(), gate.clone().requires_grad_()
            methods["FLA chunk_gsa M=64"] = (
                lambda: fla(q, k, v, s, gate)[0], lambda: fla(qg, kg, vg, sg, gg)[0], (qg, kg, vg, sg, gg), do,
            )  # fmt: skip
        for name, (forward, training, inputs, grad_out) in methods.items():
            try:
                with torch.no_grad():
                    row[name] = bench(forward, do_bench)
                step = fwd_bwd(torch, training, inputs, grad_out)
                row[name + " fwd+bwd"] = bench(step, do_bench)
                if T == 4096:
                    row[name + " fwd+bwd peak MB"] = peak_memory_mb(torch, step)
            except ValueError as error:  # a shape the method refuses (BLA: 32-bit indexing)
                row[name + " refused"] = str(error)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_bench_rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # partial
    return {"shape": dict(BENCH, dtype="bfloat16"), "gpu": torch.cuda.get_device_name(), "rows": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = sorted({n for r in rows for n, x in r.items() if isinstance(x, float) and "MB" not in n})
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in names:
        ts = [r["T"] for r in rows if name in r]
        style = "--" if name.endswith("fwd+bwd") else "-"
        ax.plot(ts, [r[name] * 1e6 / r["T"] for r in rows if name in r], style, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ns per token (B=4, H=16, K=V=64, bf16)")
    ax.set_title(f"BLA vs baselines on {results['gpu']}")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--list-specs", action="store_true", help="print the kernel specs to build, as JSON")
    parser.add_argument("--bundle", type=Path, help="runtime bundle (for a machine without apache-tvm)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "/tmp")))
    parser.add_argument("--fla", action="store_true", help="also time FLA's chunk_gsa (its wheels in .whl/)")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--cases", type=int, nargs="*", help="run only these check cases")
    args = parser.parse_args()
    if args.list_specs:
        print(json.dumps(kernel_specs(), indent=1))
        return 0
    if args.bundle:
        use_bundle(args.bundle)
    sys.path.insert(0, str(REPO))
    import torch

    import bla_tvm

    start = time.time()
    results = {"checks": [] if args.skip_checks else run_checks(torch, bla_tvm, args.cases)}
    results["checks"] += run_state_checks(torch, bla_tvm)
    results["training"] = run_training(torch, bla_tvm)
    results["checks"].append(dict(results["training"], name="training"))
    if args.skip_bench:
        failed = [c for c in results["checks"] if not c["ok"]]
        print(f"checks: {len(results['checks']) - len(failed)} passed, {len(failed)} failed")
        return 1 if failed else 0
    results["bench"] = run_benchmarks(torch, args)
    results["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    plot(results["bench"], args.out / "gpu_bench.png")
    failed = [c for c in results["checks"] if not c["ok"]]
    print(f"checks: {len(results['checks']) - len(failed)} passed, {len(failed)} failed")
    for row in results["bench"]["rows"]:
        print("  ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
