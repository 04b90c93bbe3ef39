"""Inference forward of the public op on CUDA at the shape of record, against FlexAttention SWA and SDPA timed in
the same run (one call on the GPU machine; kernels prebuilt: see README "GPU tests" for the bundle).

    BLA_TVM_PREBUILT_DIR=.bundle/kernels BLA_TVM_RUNTIME_DIR=.bundle/lib BLA_TVM_NO_BUILD=1 \\
        python benchmarks/forward_bench.py --out $OUT [--fla]

``--fla`` times FLA's chunk_gsa (64 slots) too: its wheels in .whl/, installed beside the bundle's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import triton.testing
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from bla_tvm import blurry_window_attention
from bla_tvm.reference import bla_chunked

SHAPE = dict(B=4, T=4096, H=16, K=64, V=64)
WINDOW = 512
LAYERS = {"BLA N=M=63": (63, 63), "BLA N=63 M=512": (63, 512)}


def main(out: Path, fla: bool) -> None:
    device, dtype = torch.device("cuda"), torch.bfloat16
    B, T, H, K, V = (SHAPE[x] for x in "BTHKV")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, d, generator=gen).to(device, dtype) for d in (K, K, V))
    results = {"device": torch.cuda.get_device_name(), "shape": dict(SHAPE, W=WINDOW, dtype="bfloat16"), "ms": {},
               "check": {}}  # fmt: skip
    for name, (N, M) in LAYERS.items():
        small = [x[:1, :300, :2] for x in (q, k, v)]
        o = blurry_window_attention(*small, WINDOW, N, M)[0]
        ref = bla_chunked(*(x.double().cpu() for x in small), WINDOW, N, M)
        results["check"][name] = ((o.double().cpu() - ref).norm() / ref.norm()).item()
        with torch.no_grad():
            results["ms"][name] = triton.testing.do_bench(lambda: blurry_window_attention(q, k, v, WINDOW, N, M),
                                                          return_mode="median")  # fmt: skip
    results["per_token_ns"] = {}  # time per token from T = 1k to 64k (N = M = 63)
    for length in (1024, 4096, 16384, 65536):
        ql, kl, vl = (torch.randn(B, length, H, d, generator=gen).to(device, dtype) for d in (K, K, V))
        with torch.no_grad():
            ms = triton.testing.do_bench(lambda: blurry_window_attention(ql, kl, vl, WINDOW, 63, 63), return_mode="median")
        results["per_token_ns"][length] = ms * 1e6 / (B * length)
        if length == 1024:  # where the host may be slower than the GPU: time each alone
            results["t1k"] = host_and_device_us(lambda: blurry_window_attention(ql, kl, vl, WINDOW, 63, 63))
        del ql, kl, vl
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    mask = create_block_mask(lambda b, h, i, j: (i >= j) & (i - j < WINDOW), None, None, T, T, device=device)
    flex = torch.compile(flex_attention)
    results["ms"]["Flex SWA-512"] = triton.testing.do_bench(lambda: flex(qt, kt, vt, block_mask=mask),
                                                            return_mode="median")  # fmt: skip
    sdpa = torch.nn.functional.scaled_dot_product_attention
    results["ms"]["SDPA causal"] = triton.testing.do_bench(lambda: sdpa(qt, kt, vt, is_causal=True),
                                                           return_mode="median")  # fmt: skip
    save(results, out)  # before FLA's Triton kernels compile, which may take long
    if fla:  # FLA's Gated Slot Attention with 64 slots (its chunk kernel), the Triton peer
        from fla.ops.gsa import chunk_gsa

        slots = torch.randn(B, T, H, 64, generator=gen).to(device, dtype)
        gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, 64, generator=gen)).to(device, dtype)
        results["ms"]["FLA chunk_gsa M=64"] = triton.testing.do_bench(lambda: chunk_gsa(q, k, v, slots, gate),
                                                                      return_mode="median")  # fmt: skip
    print(json.dumps(results, indent=1))
    save(results, out)


def host_and_device_us(call, calls: int = 200) -> dict:
    """The host's time per call (calls issued back to back, the device's queue absorbing them: the rate the
    Python side sustains) and the device's (the call captured in a CUDA graph and replayed: no host in the way),
    in us, the median of 5 rounds each."""
    with torch.no_grad():
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        host = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                call()
            host.append((time.perf_counter() - start) / calls * 1e6)
            torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        graph.replay()
        device = []
        for _ in range(5):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            for _ in range(calls):
                graph.replay()
            end.record()
            end.synchronize()
            device.append(begin.elapsed_time(end) / calls * 1e3)
    return {"host_us_per_call": statistics.median(host), "graph_us_per_call": statistics.median(device)}


def save(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--fla", action="store_true", help="time FLA's chunk_gsa too (flash-linear-attention)")
    args = parser.parse_args()
    main(args.out, args.fla)
