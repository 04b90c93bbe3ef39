"""Blurry Window Attention through compiled TVM kernels: compile, run, check against the float64 definition.

    python examples/demo.py

Runs on the CPU, and on CUDA too when torch sees a GPU. The first run compiles the kernels (a few seconds per
shape and dtype; they are cached on disk, see bla_tvm/env.py), later runs load them.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from bla_tvm import bla_chunked, bla_recurrent, blurry_window_attention
from bla_tvm import env

B, T, H, K, V = 2, 300, 4, 64, 64
WINDOW, RESOLUTION, SLOTS = 64, 15, 15
REPEATS = 20


def sliding_window_attention(q, k, v, window):
    """Softmax attention where token t sees tokens t - window < s <= t; float64, [B, T, H, D] layout."""
    q, k, v = (x.double() for x in (q, k, v))
    scores = torch.einsum("bthk,bshk->bhts", q, k) / math.sqrt(q.shape[-1])
    t = torch.arange(q.shape[1])
    visible = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)
    weights = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.einsum("bhts,bshv->bthv", weights, v)


def errors(o, ref):
    diff = (o.double().cpu() - ref.double().cpu()).abs().max().item()
    return diff, diff / ref.abs().max().item()


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device, repeats=REPEATS):
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def cached_kernels() -> int:
    return len(list(env.cache_dir().glob("*.so"))) if env.cache_dir().exists() else 0


def inputs(device, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, K, generator=gen)
    v = torch.randn(B, T, H, V, generator=gen)
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


def first_call(fn):
    before = cached_kernels()
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    built = cached_kernels() - before
    how = f"compiled {built} kernels" if built else "kernels loaded from the cache"
    return out, f"{elapsed:6.2f} s ({how})"


def run(device: torch.device) -> None:
    print(f"\n=== device: {device} ===")
    chunked_ms = None
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).replace("torch.", "")
        q, k, v = inputs(device, dtype)
        print(f"\n-- BLA W={WINDOW} N={RESOLUTION} M={SLOTS}, B={B} T={T} H={H} K={K} V={V}, {name}")

        def op():
            return blurry_window_attention(q, k, v, window=WINDOW, resolution=RESOLUTION, num_slots=SLOTS)[0]

        o, first = first_call(op)
        print(f"   first call (incl. compile/load): {first}")
        ref = bla_recurrent(q.cpu(), k.cpu(), v.cpu(), WINDOW, RESOLUTION, SLOTS)
        abs_err, rel_err = errors(o, ref)
        print(f"   vs bla_recurrent (float64, same rounded inputs): max abs err {abs_err:.2e}, "
              f"relative (max abs / max |ref|) {rel_err:.2e}")
        op_ms = median_ms(op, device)
        if chunked_ms is None:  # float64 on the CPU whatever the op's dtype: time it once
            qc, kc, vc = q.cpu().double(), k.cpu().double(), v.cpu().double()
            chunked_ms = median_ms(lambda: bla_chunked(qc, kc, vc, WINDOW, RESOLUTION, SLOTS), torch.device("cpu"), 3)
        print(f"   compiled op:                median {op_ms:8.3f} ms over {REPEATS} calls")
        print(f"   bla_chunked reference (f64, CPU): median {chunked_ms:8.3f} ms  "
              f"(reference time / op time = {chunked_ms / op_ms:.2f})")

    print(f"\n-- full resolution N = W = M = {WINDOW} is sliding window attention (float32)")
    q, k, v = inputs(device, torch.float32, seed=1)
    o, first = first_call(lambda: blurry_window_attention(q, k, v, window=WINDOW, resolution=WINDOW)[0])
    print(f"   first call (incl. compile/load): {first}")
    abs_err, rel_err = errors(o, sliding_window_attention(q.cpu(), k.cpu(), v.cpu(), WINDOW))
    print(f"   vs masked-softmax SWA (float64): max abs err {abs_err:.2e}, relative {rel_err:.2e}")


def main() -> None:
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print("Blurry Window Attention (bla_tvm) demo")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, kernel cache: {env.cache_dir()}")
    print("devices: " + ", ".join(
        f"{d} ({torch.cuda.get_device_name(d)})" if d.type == "cuda" else "cpu" for d in devices
    ))
    for device in devices:
        try:
            run(device)
        except Exception as error:  # e.g. no CUDA kernels for this GPU and no compiler here: say so, go on
            print(f"   FAILED on {device}: {type(error).__name__}: {error}")
            if device.type == "cpu":
                raise


if __name__ == "__main__":
    main()
