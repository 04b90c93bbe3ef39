"""CPU forward benchmark: the compiled op against two baselines, in one run.

    python benchmarks/cpu_forward.py [--out /tmp/bla_cpu_forward.json] [--repeats 10]

Default problem: B=1, T=4096, H=4, K=V=64, W=512, N=M=63, float32. Timed:

- ``op``: ``bla_tvm.blurry_window_attention`` (the compiled TVM kernels), float32;
- ``torch_chunked``: the chunked form in plain torch float32, written below (bla-math.md, "Chunked form",
  steps 1-6): vectorised over B and H, a Python loop over chunks, torch matmuls;
- ``reference_chunked``: ``bla_tvm.bla_chunked``, the float64 reference (slow: timed ``--reference-repeats``
  times).

Before timing, the op's output is checked against ``torch_chunked`` and ``reference_chunked`` (relative
error = max |o - ref| / max |ref|). Reports the median (and min) of ``--repeats`` interleaved runs after
``--warmup`` runs, a table with the op's speed-up over each baseline, and writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from bla_tvm import BLAParams, bla_chunked, blurry_window_attention
from bla_tvm.constants import chunk_constants, partner_index


class TorchChunked:
    """BLA's chunked form in plain torch (any float dtype), bla-math.md "Chunked form" steps 1-6."""

    def __init__(self, window, resolution, num_slots, chunk_size=64, dtype=torch.float32, device="cpu"):
        self.params = BLAParams.make(window, resolution, num_slots)
        cc = chunk_constants(self.params, chunk_size)
        L, R = chunk_size, cc.base.R

        def put(x):
            return x.to(device=device, dtype=dtype).contiguous()

        self.L, self.dtype = L, dtype
        self.Inv, self.Psi, self.Hk, self.Bm = put(cc.Inv), put(cc.Psi), put(cc.H), put(cc.Bm)
        self.C, self.rot_diag, self.rot_off = put(cc.base.C), put(cc.rot_diag), put(cc.rot_off)
        self.slot_lags = cc.base.slot_lags.to(device)
        self.partner = partner_index(self.params.resolution).to(device)
        self.R_pow = {L: put(torch.linalg.matrix_power(R, L))}  # R^n for the chunk lengths met
        self.R_f64 = R
        lag = torch.arange(L, device=device)[:, None] - torch.arange(L, device=device)[None, :]  # j - D
        self.causal, self.lag_index = lag >= 0, lag.clamp(min=0)

    def _rotate(self, x, transpose=False):
        """Row j of x [.., n, N] -> R^{j+1} x_j (or x_j R^{j+1} with transpose)."""
        n = x.shape[-2]
        sign = -1.0 if transpose else 1.0
        return self.rot_diag[:n] * x + sign * self.rot_off[:n] * x[..., self.partner]

    def _diagonal(self, x, n):
        """y[.., j, D] = x[.., j, j - D] for D <= j, else 0 (x [.., n, n])."""
        index = self.lag_index[:n, :n].expand(*x.shape[:-2], n, n)
        return x.gather(-1, index).masked_fill(~self.causal[:n, :n], 0.0)

    def __call__(self, q, k, v, scale=None):
        B, T, H, K = q.shape
        scale = K ** -0.5 if scale is None else scale
        q, k, v = (x.to(self.dtype).transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
        X = q.new_zeros(B, H, self.params.resolution, K)
        Y = q.new_zeros(B, H, self.params.resolution, v.shape[-1])
        t_all = torch.arange(T, device=q.device, dtype=self.slot_lags.dtype)
        out = []
        for start in range(0, T, self.L):
            Qc, Kc, Vc = q[:, :, start:start + self.L], k[:, :, start:start + self.L], v[:, :, start:start + self.L]
            n = Qc.shape[2]
            Inv, Psi, Hk, Bm = self.Inv[:n, :n], self.Psi[:n], self.Hk[:, :n], self.Bm[self.L - n:]
            # 1. effective inputs: the token leaving the window removed
            Kp = Inv @ (Kc - Psi @ X)
            Vp = Inv @ (Vc - Psi @ Y)
            # 2. intra-chunk scores through the slot kernels H
            S = self._diagonal(Qc @ Kp.transpose(-1, -2), n) @ Hk.T
            # 3. inter-chunk scores from the carried state
            S = scale * (S + self._rotate(Qc @ X.transpose(-1, -2)) @ self.C.T)
            # 4. slots before the sequence start masked, softmax over slots
            mask = self.slot_lags[None, :] > t_all[start:start + n, None]
            Pr = torch.softmax(S.masked_fill(mask, float("-inf")), dim=-1)
            # 5. output: intra-chunk values through H, plus the carried value state
            O = self._diagonal(Pr @ Hk, n) @ Vp + self._rotate(Pr @ self.C, transpose=True) @ Y
            out.append(O)
            # 6. carry the states to the next chunk
            if n not in self.R_pow:
                self.R_pow[n] = torch.linalg.matrix_power(self.R_f64, n).to(q)
            X = self.R_pow[n] @ X + Bm.T @ Kp
            Y = self.R_pow[n] @ Y + Bm.T @ Vp
        if not out:
            return v.new_zeros(B, 0, H, v.shape[-1])
        return torch.cat(out, dim=2).transpose(1, 2)


def rel_err(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max()).item()


def time_interleaved(fns: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Milliseconds per call of each function, the functions taking turns (round robin) so that load from
    other processes on the machine falls on all of them alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--B", type=int, default=1)
    parser.add_argument("--T", type=int, default=4096)
    parser.add_argument("--H", type=int, default=4)
    parser.add_argument("--K", type=int, default=64)
    parser.add_argument("--V", type=int, default=64)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--resolution", type=int, default=63)
    parser.add_argument("--slots", type=int, default=63)
    parser.add_argument("--repeats", type=int, default=10, help="timed runs of the op and torch_chunked")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reference-repeats", type=int, default=2, help="timed runs of the float64 reference")
    parser.add_argument("--out", default="/tmp/bla_cpu_forward.json", help="where to write the JSON results")
    args = parser.parse_args()

    shape = dict(B=args.B, T=args.T, H=args.H, K=args.K, V=args.V)
    bla = dict(window=args.window, resolution=args.resolution, num_slots=args.slots)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(args.B, args.T, args.H, args.K, generator=gen)
    k = torch.randn(args.B, args.T, args.H, args.K, generator=gen)
    v = torch.randn(args.B, args.T, args.H, args.V, generator=gen)
    threads = torch.get_num_threads()
    print(f"CPU forward: {shape}, {bla}, float32")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__} with "
          f"{threads} threads; TVM kernels: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'unset (all cores)')}")

    def op():
        return blurry_window_attention(q, k, v, **bla)[0]

    start = time.perf_counter()
    o = op()
    first_call_s = time.perf_counter() - start
    print(f"op first call (compile or load, and run): {first_call_s:.2f} s")

    torch_chunked = TorchChunked(**bla)
    o_torch = torch_chunked(q, k, v)
    start = time.perf_counter()
    o_ref = bla_chunked(q, k, v, **bla)
    reference_first_ms = (time.perf_counter() - start) * 1e3
    errors = {
        "op_vs_torch_chunked": rel_err(o, o_torch),
        "op_vs_reference_chunked": rel_err(o, o_ref),
        "torch_chunked_vs_reference_chunked": rel_err(o_torch, o_ref),
    }
    for name, err in errors.items():
        print(f"relative error (max abs / max |ref|) {name}: {err:.2e}")
    if errors["op_vs_torch_chunked"] > 1e-4:
        raise SystemExit(f"the op disagrees with the plain-torch chunked form: {errors['op_vs_torch_chunked']:.2e}")

    times = time_interleaved({"op": op, "torch_chunked": lambda: torch_chunked(q, k, v)}, args.repeats, args.warmup)
    times["reference_chunked"] = [reference_first_ms] + time_interleaved(
        {"reference_chunked": lambda: bla_chunked(q, k, v, **bla)}, max(args.reference_repeats - 1, 0), 0
    )["reference_chunked"]
    median = {name: statistics.median(t) for name, t in times.items()}
    fastest = {name: min(t) for name, t in times.items()}
    what = {
        "op": "bla_tvm op (TVM kernels), fp32",
        "torch_chunked": "plain torch chunked, fp32",
        "reference_chunked": "bla_chunked reference, fp64",
    }
    tokens = args.B * args.T * args.H
    print()
    print(f"{'implementation':30s} {'median ms':>10s} {'min ms':>8s} {'runs':>5s} {'op speed-up':>12s} "
          f"{'M token-heads/s':>16s}")
    for name in times:
        speedup = median[name] / median["op"]
        print(f"{what[name]:30s} {median[name]:10.2f} {fastest[name]:8.2f} {len(times[name]):5d} {speedup:11.2f}x "
              f"{tokens / median[name] / 1e3:16.3f}")
    print("(op speed-up = baseline median / op median; timings interleaved, op and torch_chunked after "
          f"{args.warmup} warm-up runs)")

    result = {
        "benchmark": "cpu_forward",
        "shape": shape,
        "bla": bla,
        "dtype": "float32",
        "chunk_size": 64,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "tvm_num_threads": os.environ.get("TVM_NUM_THREADS"),
        "torch": torch.__version__,
        "op_first_call_s": first_call_s,
        "relative_errors": errors,
        "times_ms": times,
        "median_ms": median,
        "min_ms": fastest,
        "op_speedup": {name: median[name] / median["op"] for name in times if name != "op"},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
