"""BLA forward on a CUDA GPU: correctness of every compiled kernel against the float64 reference, then timing
against the kernels a user would otherwise pick. One script, one call on the GPU machine.

Here (build machine, no GPU):
    python benchmarks/gpu_forward.py --list-specs > build/gpu_specs.json
    bla-tvm build --device cuda --arch sm_90 --specs build/gpu_specs.json --out .bundle/kernels
    bla-tvm bundle --out .bundle
On the GPU machine (torch + the bundle only; FLA wheels optional in .whl/):
    python benchmarks/gpu_forward.py --bundle .bundle --out $OUT

Writes gpu_forward.json (every measurement) and gpu_forward.png (time per token against T).
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

#: benchmark shape (issue 4): B=4, H=16, K=V=64, bf16, window 512
BENCH = dict(B=4, H=16, K=64, V=64, window=512)
BENCH_T = (1024, 4096, 16384, 65536)
BENCH_BLA = {"BLA N=M=63": (63, 63), "BLA N=63 M=512": (63, 512)}
CHECK_DTYPES = ("float32", "bfloat16")
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-2}


def check_cases(count: int = 20, seed: int = 2026) -> list[dict]:
    """Random parameter sets for the correctness check: T often not a multiple of the chunk, N == W often."""
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
                K=rng.choice([16, 40, 64]), V=rng.choice([16, 64, 72]),
            )
        )  # fmt: skip
    return cases


def chunk_size(window, resolution, slots, K, V, dtype) -> int:
    sys.path.insert(0, str(REPO))
    from bla_tvm.runtime import cuda_chunk_size

    return cuda_chunk_size("sm_90", window, resolution, slots, K, V, dtype)


def kernel_specs() -> list[dict]:
    specs = []
    for case in check_cases():
        for dtype in CHECK_DTYPES:
            W, N, M, K, V = (case[x] for x in ("window", "resolution", "num_slots", "K", "V"))
            specs.append(
                dict(window=W, resolution=N, num_slots=M, chunk_size=chunk_size(W, N, M, K, V, dtype),
                     head_k=K, head_v=V, dtype=dtype)
            )  # fmt: skip
    for resolution, slots in BENCH_BLA.values():
        for dtype in ("bfloat16", "float32"):
            specs.append(
                dict(window=BENCH["window"], resolution=resolution, num_slots=slots,
                     chunk_size=chunk_size(BENCH["window"], resolution, slots, BENCH["K"], BENCH["V"], dtype),
                     head_k=BENCH["K"], head_v=BENCH["V"], dtype=dtype)
            )  # fmt: skip
    unique = {json.dumps(s, sort_keys=True): s for s in specs}
    return list(unique.values())


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


def relative_error(out, ref) -> float:
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def run_checks(torch, bla) -> list[dict]:
    from bla_tvm.ops import kernel_spec, launch_forward

    results = []
    for index, case in enumerate(check_cases()):
        for dtype_name in CHECK_DTYPES:
            dtype = getattr(torch, dtype_name)
            g = torch.Generator(device="cuda").manual_seed(index)
            B, T, H, K, V = (case[x] for x in "BTHKV")
            q, k = (torch.randn(B, T, H, K, device="cuda", generator=g, dtype=dtype) for _ in range(2))
            v = torch.randn(B, T, H, V, device="cuda", generator=g, dtype=dtype)
            L = chunk_size(case["window"], case["resolution"], case["num_slots"], K, V, dtype_name)
            spec = kernel_spec(q, v, case["window"], case["resolution"], case["num_slots"], L)
            scale = K**-0.5
            o = torch.full((B, T, H, V), float("nan"), device="cuda", dtype=dtype)  # poisoned
            launch_forward(q, k, v, o, spec, scale)
            torch.cuda.synchronize()
            ref = bla.bla_recurrent(q.cpu(), k.cpu(), v.cpu(), case["window"], case["resolution"], case["num_slots"], scale)
            err = relative_error(o.cpu(), ref)
            finite = bool(torch.isfinite(o).all())
            ok = finite and err <= TOLERANCE[dtype_name]
            results.append(dict(case, dtype=dtype_name, rel_err=err, finite=finite, ok=ok))
            print(f"check {index:2d} {dtype_name:8s} {case} rel_err={err:.2e} {'ok' if ok else 'FAIL'}", flush=True)
    return results


def bench(fn, do_bench) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def run_benchmarks(torch, args) -> dict:
    from triton.testing import do_bench

    import bla_tvm
    from bla_tvm.ops import device_constants, kernel_spec
    from bla_tvm.runtime import LIBRARY
    from bla_tvm.spec import FORWARD_KERNELS
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
        v = torch.randn(B, T, H, V, device="cuda", dtype=torch.bfloat16, generator=g)
        row = {"T": T}
        for name, (resolution, slots) in BENCH_BLA.items():
            row[name] = bench(lambda: bla_tvm.blurry_window_attention(q, k, v, W, resolution, slots), do_bench)
            if T == 4096:  # where the time goes: each kernel alone
                L = chunk_size(W, resolution, slots, K, V, "bfloat16")
                spec = kernel_spec(q, v, W, resolution, slots, L)
                fns = [LIBRARY.function(kn, spec, q.device) for kn in FORWARD_KERNELS]
                consts = device_constants(spec.params, L, torch.float32, q.device, K**-0.5)
                NC = T // L
                U = torch.randn(B, NC, H, resolution, K + V, device="cuda")
                X = torch.randn_like(U)
                o = torch.empty_like(v)
                row[name + " kernels"] = {
                    "chunk_state": bench(lambda: fns[0](k, v, consts["state_in"], U), do_bench),
                    "state_scan": bench(lambda: fns[1](U, consts["state_decay"], X), do_bench),
                    "chunk_output": bench(
                        lambda: fns[2](q, k, v, X, consts["scale"], *consts["output"], o), do_bench
                    ),
                }
        qh, kh, vh = (x.transpose(1, 2).contiguous() for x in (q, k, v))

        def sliding(b, h, qi, ki):
            return (qi >= ki) & (qi - ki < W)

        mask = create_block_mask(sliding, None, None, T, T, device="cuda")
        row["Flex SWA-512"] = bench(lambda: flex(qh, kh, vh, block_mask=mask), do_bench)
        row["SDPA causal"] = bench(
            lambda: torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True), do_bench
        )
        if fla is not None and T <= 16384:
            s = torch.randn(B, T, H, 64, device="cuda", dtype=torch.bfloat16, generator=g)
            gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, 64, device="cuda", generator=g)).bfloat16()
            row["FLA chunk_gsa M=64"] = bench(lambda: fla(q, k, v, s, gate), do_bench)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return {"shape": dict(BENCH, dtype="bfloat16"), "gpu": torch.cuda.get_device_name(), "rows": rows}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    names = [n for n in rows[0] if n != "T" and not n.endswith("kernels")]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        ts = [r["T"] for r in rows if name in r]
        ax.plot(ts, [r[name] * 1e6 / r["T"] for r in rows if name in r], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("ns per token (B=4, H=16, K=V=64, bf16)")
    ax.set_title(f"BLA forward vs baselines on {results['gpu']}")
    ax.legend()
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
    results = {"checks": [] if args.skip_checks else run_checks(torch, bla_tvm)}
    results["bench"] = run_benchmarks(torch, args)
    results["seconds"] = time.time() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_forward.json").write_text(json.dumps(results, indent=1))
    plot(results["bench"], args.out / "gpu_forward.png")
    failed = [c for c in results["checks"] if not c["ok"]]
    print(f"checks: {len(results['checks']) - len(failed)} passed, {len(failed)} failed")
    for row in results["bench"]["rows"]:
        print("  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
                        if not k.endswith("kernels")))  # fmt: skip
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
