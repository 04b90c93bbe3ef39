"""Where the inference forward's device time goes at T = 1k to 64k (issue 12's time per token): each call (B = 4,
H = 16, K = V = 64, bf16, W = 512, N = M = 63) captured in a CUDA graph and replayed under torch.profiler, with and
without an L2 flush (a 256 MB zero, as triton's do_bench does) before it. Per T: each kernel's median duration, the
gap between the scan's end and the output kernel's start, and the span from the scan's start to the output's end
(per token). One call on the GPU machine (kernels prebuilt: README "GPU tests"):

    BLA_TVM_PREBUILT_DIR=.bundle/kernels BLA_TVM_RUNTIME_DIR=.bundle/lib BLA_TVM_NO_BUILD=1 \\
        python benchmarks/forward_timeline.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bla_tvm import blurry_window_attention

B, H, K, WINDOW, N = 4, 16, 64, 512, 63
LENGTHS = (1024, 4096, 16384, 65536)


def kernel_intervals(prof) -> dict[str, list[tuple[float, float]]]:
    """{kernel name: [(start, end) us of each launch, in order]} of a profile's CUDA kernels."""
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time > 0]
    intervals: dict[str, list] = {}
    for e in sorted(events, key=lambda e: e.time_range.start):
        intervals.setdefault(e.name, []).append((e.time_range.start, e.time_range.end))
    return intervals


def timeline(call, flush: torch.Tensor | None, replays: int) -> dict:
    """Medians over ``replays`` CUDA-graph replays of ``call`` (after ``flush.zero_()`` where given)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        if flush is not None:
            flush.zero_()
        call()
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    intervals = kernel_intervals(prof)
    row = {name: statistics.median(end - start for start, end in spans) for name, spans in intervals.items()}
    scan = next(spans for name, spans in intervals.items() if "state_scan" in name)
    output = next(spans for name, spans in intervals.items() if "chunk_output" in name)
    row["gap_scan_to_output_us"] = statistics.median(o[0] - s[1] for s, o in zip(scan, output))
    row["span_us"] = statistics.median(o[1] - s[0] for s, o in zip(scan, output))
    return row


def main(out: Path) -> None:
    flush = torch.empty(int(256e6 // 4), dtype=torch.int, device="cuda")
    results = {"device": torch.cuda.get_device_name(), "shape": dict(B=B, H=H, K=K, V=K, W=WINDOW, N=N, M=N),
               "lengths": {}}  # fmt: skip
    for T in LENGTHS:
        q, k, v = (torch.randn(B, T, H, K, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        with torch.no_grad():
            call = lambda: blurry_window_attention(q, k, v, WINDOW, N, N)  # noqa: E731
            call()
            rows = {how: timeline(call, buffer, 20 if T <= 4096 else 5) for how, buffer in (("warm", None),
                                                                                             ("flushed", flush))}
        for row in rows.values():
            row["span_ns_per_token"] = row["span_us"] * 1e3 / (B * T)
        results["lengths"][T] = rows
        print(T, json.dumps(rows), flush=True)
        del q, k, v
    out.mkdir(parents=True, exist_ok=True)
    (out / "forward_timeline.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("."))
    main(parser.parse_args().out)
