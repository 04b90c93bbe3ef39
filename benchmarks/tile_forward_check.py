"""The tile-program forward kernel (schedules/cuda_tile_forward.py) on its own: correctness against the float64
chunked reference on poisoned outputs, and time against the TE chunk_output kernel and FlexAttention SWA, in
one call on the GPU machine.

Here (build machine, nvcc, no GPU):
    .venv/bin/python benchmarks/tile_forward_check.py build --out .bundle/tile
    .venv/bin/bla-tvm bundle --out .bundle
On the GPU machine (torch + the bundle):
    python benchmarks/tile_forward_check.py run --bundle .bundle --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: (W, N, M, K, V, G, dtype): the benchmark layers and odd shapes (F not a multiple of 64, N == W even, GQA)
CHECK_LAYERS = (
    (512, 63, 63, 64, 64, 1, "bfloat16"),
    (512, 63, 512, 64, 64, 1, "bfloat16"),
    (64, 15, 40, 32, 48, 2, "bfloat16"),
    (16, 16, 16, 16, 16, 1, "float16"),
    (100, 31, 7, 128, 64, 1, "bfloat16"),
)
BENCH_LAYER = CHECK_LAYERS[0]
BENCH_SHAPE = dict(B=4, T=4096, H=16)
L = 64


def tag(layer) -> str:
    return "W{}_N{}_M{}_K{}_V{}_G{}_{}".format(*layer)


def build(out: Path) -> None:
    from bla_tvm.build import compile_kernel, ptxas_report
    from bla_tvm.layer import KernelSpec

    out.mkdir(parents=True, exist_ok=True)
    report = {}
    for layer in CHECK_LAYERS:
        W, N, M, K, V, G, dtype = layer
        start = time.time()
        module = compile_kernel("chunk_output_tile", KernelSpec(W, N, M, K, V, dtype, G, chunk_size=L), "cuda", "sm_90")
        module.export_library(str(out / f"tile_{tag(layer)}.so"))
        report[tag(layer)] = dict(ptxas_report(module, "sm_90"), seconds=round(time.time() - start, 1))
        scan = compile_kernel("state_scan_tile", KernelSpec(W, N, M, K, V, dtype, G, chunk_size=L), "cuda", "sm_90")
        scan.export_library(str(out / f"scan_{tag(layer)}.so"))
        report["scan_" + tag(layer)] = ptxas_report(scan, "sm_90")
        print(tag(layer), report[tag(layer)], report["scan_" + tag(layer)], flush=True)
    W, N, M, K, V, G, dtype = BENCH_LAYER
    module = compile_kernel("chunk_output", KernelSpec(W, N, M, K, V, dtype, G, chunk_size=L), "cuda", "sm_90")
    module.export_library(str(out / f"te_{tag(BENCH_LAYER)}.so"))
    (out / "build.json").write_text(json.dumps(report, indent=1))


# --- on the GPU --------------------------------------------------------------------------------------------


def use_bundle(bundle: Path) -> None:
    site = Path("/tmp/bla_site")
    wheels = sorted((bundle / "wheels").glob("*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--upgrade", "--target", str(site),
                    *map(str, wheels)], check=True)  # fmt: skip
    sys.path.insert(0, str(site))
    import ctypes

    import tvm_ffi  # noqa: F401  (loads libtvm_ffi.so, which the runtime libraries link against)

    for name in ("libtvm_runtime.so", "libtvm_runtime_cuda.so"):
        ctypes.CDLL(str(bundle / "lib" / name), mode=ctypes.RTLD_GLOBAL)


def chunk_states(k, v, params, initial=None):
    """X | Y at every chunk start [B, NC, H, N, K + V] (float64 scan on k, v's device)."""
    import torch

    from bla_tvm.constants import chunk_constants

    cc = chunk_constants(params, L)
    B, T, H, K = k.shape
    NC = -(-T // L)
    kv = torch.cat([k, v], dim=-1).double()
    kv = torch.cat([kv, kv.new_zeros(B, NC * L - T, H, kv.shape[-1])], dim=1).view(B, NC, L, H, -1)
    decay, state_in = cc.state_decay.to(k.device), cc.state_in.to(k.device)
    X = kv.new_zeros(B, H, params.resolution, kv.shape[-1])
    states = []
    for c in range(NC):
        states.append(X)
        X = decay @ X + state_in @ kv[:, c].transpose(1, 2)
    return torch.stack(states, dim=1)


def tile_tables(params, slot_tile, device):
    import torch

    from bla_tvm.tile_constants import tile_constants

    tc = tile_constants(params, L, slot_tile)
    half = [x.to(device, torch.float16).contiguous() for x in (tc.input_map, tc.lag, tc.lag_t, tc.slots, tc.slots_t)]
    single = [x.to(device, torch.float32).contiguous() for x in (tc.rot_diag, tc.rot_pair, tc.rot_pair_t)]
    return half + single


def run(bundle: Path, out: Path) -> None:
    use_bundle(bundle)
    import torch
    import tvm_ffi

    from bla_tvm.constants import chunk_constants
    from bla_tvm.params import BLAParams
    from bla_tvm.reference import bla_chunked

    results = {"device": torch.cuda.get_device_name(), "checks": [], "timing": {}}
    device = torch.device("cuda")

    def load(name):
        module = tvm_ffi.load_module(str(bundle / "tile" / name))
        return module["bla_chunk_output_tile" if name.startswith("tile_") else "bla_chunk_output"]

    def call(fn, *args):
        with tvm_ffi.use_torch_stream():
            fn(*args)

    def inputs(layer, B, T, H, seed):
        W, N, M, K, V, G, dtype = layer
        gen = torch.Generator(device="cpu").manual_seed(seed)
        dt = getattr(torch, dtype)
        q, k, v = (torch.randn(B, T, h, d, generator=gen).to(device, dt) for h, d in ((H * G, K), (H, K), (H, V)))
        params = BLAParams.make(W, N, M)
        states = chunk_states(k, v, params).float().contiguous()
        NC = states.shape[1]
        positions = (torch.arange(NC, device=device) * L).clamp(max=W).to(torch.int32)[None].expand(B, NC).contiguous()
        return params, q, k, v, states, positions

    def scan_tables_on(params):
        from bla_tvm.tile_constants import scan_tables

        return [x.to(device, torch.float16).contiguous() for x in scan_tables(params, L).values()]

    for seed, layer in enumerate(CHECK_LAYERS):
        W, N, M, K, V, G, dtype = layer
        B, T, H = 2, 200, 2
        params, q, k, v, states, positions = inputs(layer, B, T, H, seed)
        scan = tvm_ffi.load_module(str(bundle / "tile" / f"scan_{tag(layer)}.so"))["bla_state_scan_tile"]
        initial = torch.zeros(B, H, N, K + V, device=device)
        starts = torch.full((B, states.shape[1]), -1, dtype=torch.int32, device=device)
        starts[:, 0] = torch.arange(B, dtype=torch.int32, device=device)
        scanned = torch.full_like(states, float("nan"))
        call(scan, k, v, *scan_tables_on(params), initial, starts, scanned)
        torch.cuda.synchronize()
        scan_err = ((scanned.double() - states.double()).norm() / states.double().norm()).item()
        results["checks"].append(dict(layer="scan_" + tag(layer), rel_err=scan_err, passed=scan_err < 1e-4))
        print("check scan", tag(layer), f"rel_err={scan_err:.2e}", flush=True)
        scale = K**-0.5
        o = torch.full((B, T, H * G, V), float("nan"), dtype=q.dtype, device=device)
        tables = tile_tables(params, 64, device)
        call(load(f"tile_{tag(layer)}.so"), q, k, v, states, positions,
             torch.tensor([scale], device=device), *tables, o)  # fmt: skip
        torch.cuda.synchronize()
        kk = k.double().cpu().repeat_interleave(G, dim=2)
        vv = v.double().cpu().repeat_interleave(G, dim=2)
        ref = bla_chunked(q.double().cpu(), kk, vv, W, N, M, scale, chunk_size=L)
        err = ((o.double().cpu() - ref).norm() / ref.norm()).item()
        finite = bool(torch.isfinite(o).all())
        results["checks"].append(dict(layer=tag(layer), rel_err=err, all_written=finite, passed=finite and err < 1e-2))
        print("check", tag(layer), f"rel_err={err:.2e}", "all_written" if finite else "UNWRITTEN/NaN", flush=True)

    import triton.testing

    layer = BENCH_LAYER
    W, N, M, K, V, G, dtype = layer
    params, q, k, v, states, positions = inputs(layer, BENCH_SHAPE["B"], BENCH_SHAPE["T"], BENCH_SHAPE["H"], 7)
    o = torch.empty(*q.shape[:3], V, dtype=q.dtype, device=device)
    scale = torch.tensor([K**-0.5], device=device)
    tile = load(f"tile_{tag(layer)}.so")
    tables = tile_tables(params, 64, device)
    ms_tile = triton.testing.do_bench(lambda: call(tile, q, k, v, states, positions, scale, *tables, o), return_mode="median")
    previous = {}
    for folder in sorted(bundle.glob("tile_v*")):  # earlier versions of the kernel, kept to time them beside
        module = tvm_ffi.load_module(str(folder / f"tile_{tag(layer)}.so"))
        fn = module["bla_chunk_output_tile" if folder.name >= "tile_v3" else "bla_chunk_output"]
        previous[folder.name] = triton.testing.do_bench(
            lambda: call(fn, q, k, v, states, positions, scale, *tables, o), return_mode="median"
        )
    o_tile = o.clone()
    fine = CHECK_LAYERS[1]  # M = W = 512
    fine_params = BLAParams.make(*fine[:3])
    fine_tile, fine_tables = load(f"tile_{tag(fine)}.so"), tile_tables(fine_params, 64, device)
    ms_fine = triton.testing.do_bench(lambda: call(fine_tile, q, k, v, states, positions, scale, *fine_tables, o),
                                      return_mode="median")  # fmt: skip
    cc = chunk_constants(params, L)
    te_tables = [x.to(device, torch.float32).contiguous() for x in (cc.input_map, cc.lag_basis, cc.base.C, cc.rot_diag, cc.rot_off)]
    te = load(f"te_{tag(layer)}.so")
    ms_te = triton.testing.do_bench(lambda: call(te, q, k, v, states, positions, scale, *te_tables, o), return_mode="median")
    agree = ((o.float() - o_tile.float()).norm() / o.float().norm()).item()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def swa(b, h, qi, ki):
        return (qi >= ki) & (qi - ki < W)

    Tn = BENCH_SHAPE["T"]
    mask = create_block_mask(swa, None, None, Tn, Tn, device=device)
    flex = torch.compile(flex_attention)
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    ms_flex = triton.testing.do_bench(lambda: flex(qt, kt, vt, block_mask=mask), return_mode="median")
    results["timing"] = dict(shape=dict(BENCH_SHAPE, K=K, V=V, dtype=dtype), layer=tag(layer), tile_ms=ms_tile, previous_versions_ms=previous, tile_fine_slots_ms=ms_fine,
                             te_chunk_output_ms=ms_te, flex_swa_ms=ms_flex, tile_vs_te_rel_diff=agree)  # fmt: skip
    print(json.dumps(results["timing"]), flush=True)
    scans = {}
    NC, H = states.shape[1], states.shape[2]
    U = torch.randn_like(states)
    decay = chunk_constants(params, L).state_decay.to(device, torch.float32).contiguous()
    initial = torch.randn(states.shape[0], H, N, K + V, device=device)
    starts = torch.full((states.shape[0], NC), -1, dtype=torch.int32, device=device)
    starts[:, 0] = torch.arange(states.shape[0], dtype=torch.int32, device=device)
    grads = torch.randn(states.shape[0], NC, H, L + N, K + V + K, device=device)
    for version in ("old", "new"):
        forward = tvm_ffi.load_module(str(bundle / "tile" / f"{version}_state_scan.so"))["bla_state_scan"]
        reverse = tvm_ffi.load_module(str(bundle / "tile" / f"{version}_state_scan_reverse.so"))["bla_state_scan_reverse"]
        X, Gs = torch.empty_like(states), torch.empty_like(states)
        ms_f = triton.testing.do_bench(lambda: call(forward, U, decay, initial, starts, X), return_mode="median")
        ms_r = triton.testing.do_bench(lambda: call(reverse, grads, decay.T.contiguous(), starts, Gs), return_mode="median")
        scans[version] = dict(forward_ms=ms_f, reverse_ms=ms_r, X=X, G=Gs)
    tile_scan = tvm_ffi.load_module(str(bundle / "tile" / f"scan_{tag(layer)}.so"))["bla_state_scan_tile"]
    scan_tables_bench = scan_tables_on(params)
    X = torch.empty_like(states)
    scans["tile"] = dict(forward_ms=triton.testing.do_bench(
        lambda: call(tile_scan, k, v, *scan_tables_bench, initial, starts, X), return_mode="median"))
    scan_diff = max(((scans["new"][key] - scans["old"][key]).norm() / scans["old"][key].norm()).item() for key in "XG")
    results["scan"] = {version: {k_: v_ for k_, v_ in scans[version].items() if k_.endswith("ms")} for version in scans}
    results["scan"]["new_vs_old_rel_diff"] = scan_diff
    print("scan", json.dumps(results["scan"]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tile_forward_check.json").write_text(json.dumps(results, indent=1))
    if os.environ.get("BLA_PROFILE_ONLY"):
        return


def profile(bundle: Path) -> None:
    """One launch of the tile kernel at the benchmark shape (for ncu)."""
    use_bundle(bundle)
    import torch
    import tvm_ffi

    from bla_tvm.params import BLAParams

    W, N, M, K, V, G, dtype = BENCH_LAYER
    B, T, H = BENCH_SHAPE["B"], BENCH_SHAPE["T"], BENCH_SHAPE["H"]
    device = torch.device("cuda")
    dt = getattr(torch, dtype)
    q, k, v = (torch.randn(B, T, H, d, device=device).to(dt) for d in (K, K, V))
    params = BLAParams.make(W, N, M)
    states = chunk_states(k, v, params).float().contiguous()
    NC = states.shape[1]
    positions = (torch.arange(NC, device=device) * L).clamp(max=W).to(torch.int32)[None].expand(B, NC).contiguous()
    o = torch.empty(B, T, H, V, dtype=dt, device=device)
    fn = tvm_ffi.load_module(str(bundle / "tile" / f"tile_{tag(BENCH_LAYER)}.so"))["bla_chunk_output_tile"]
    scan = tvm_ffi.load_module(str(bundle / "tile" / f"scan_{tag(BENCH_LAYER)}.so"))["bla_state_scan_tile"]
    from bla_tvm.tile_constants import scan_tables

    tables = [x.to(device, torch.float16).contiguous() for x in scan_tables(params, L).values()]
    initial = torch.zeros(B, H, N, K + V, device=device)
    starts = torch.full((B, NC), -1, dtype=torch.int32, device=device)
    starts[:, 0] = torch.arange(B, dtype=torch.int32, device=device)
    with tvm_ffi.use_torch_stream():
        for _ in range(2):
            scan(k, v, *tables, initial, starts, states)
            fn(q, k, v, states, positions, torch.tensor([K**-0.5], device=device), *tile_tables(params, 64, device), o)
    torch.cuda.synchronize()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("build", "run", "profile"))
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--bundle", type=Path, default=REPO / ".bundle")
    args = parser.parse_args()
    if args.command == "build":
        build(args.out)
    elif args.command == "run":
        run(args.bundle, args.out)
    else:
        profile(args.bundle)
