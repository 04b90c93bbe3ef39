"""CPU decode benchmark: the compiled decode step against two baselines, in one run.

    python benchmarks/cpu_decode.py [--out /tmp/bla_cpu_decode.json] [--batches 1 4 16] [--repeats 200]

Problem: H = 16 heads, K = V = 64, W = 512, N = M = 63, float32 q, k, v, B sequences each past the window
(seen = 600). Timed per step, in place (``bla_tvm.InPlaceSteps``: the op's loop for decoding, one call a token):

- ``op``: the compiled step, with a float32 state and with a bfloat16 one;
- ``torch_step``: the same step in plain torch float32, written below (bla-math.md, "Recurrent form": R as its
  diagonal and pair terms, the removal, the readout regrouped as in ``compute/decode.py``), vectorised over B, H;
- ``state_copy``: torch copying the float32 state's bytes (one read, one write of each: the floor of any step).

Before timing, the op's o and new state are checked against the step in float64 (dense A). Reports the median of
``--repeats`` steps after a warm-up, the op's speed-up over ``torch_step`` and its ratio to ``state_copy``, and
writes everything as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from bla_tvm import BLAParams, BLAState, InPlaceSteps, decode_step
from bla_tvm.constants import bla_constants, partner_index

H, K, V, W, N, M, SEEN = 16, 64, 64, 512, 63, 63, 600


class TorchStep:
    """One decode step of BLA in plain torch (float32): X' = A X + b k^T with A X = R X - b (b^T R X) / W, R
    applied as R[n, n] X[n] + R[n, partner(n)] X[partner(n)]; s = scale C (X' q), masked where the slot's lag
    exceeds seen; o = softmax(s) C Y'."""

    def __init__(self, dtype=torch.float32):
        c = bla_constants(BLAParams.make(W, N, M))
        n, partner = torch.arange(N), partner_index(N)
        self.partner = partner
        self.rot_diag = c.R[n, n].to(dtype)[:, None]
        self.rot_off = torch.where(partner == n, 0.0, c.R[n, partner]).to(dtype)[:, None]
        self.basis, self.removal = c.b.to(dtype), (c.b / W).to(dtype)
        self.C, self.lags, self.scale = c.C.to(dtype), c.slot_lags.to(dtype), K**-0.5

    def __call__(self, q, k, v, X, Y, seen):
        S = torch.cat((X, Y), -1)  # [B, H, N, K + V]
        RS = self.rot_diag * S + self.rot_off * S[:, :, self.partner]
        token = torch.cat((k, v), -1) - self.removal @ RS  # [B, H, K + V]
        S = torch.addcmul(RS, self.basis[:, None], token[:, :, None, :])
        X, Y = S[..., :K], S[..., K:]
        z = torch.einsum("bhnk,bhk->bhn", X, q)
        s = (self.scale * z @ self.C.T).masked_fill(self.lags > seen[:, None, None], float("-inf"))
        o = torch.einsum("bhn,bhnv->bhv", torch.softmax(s, -1) @ self.C, Y)
        return o, X, Y


def reference_step(q, k, v, X, Y, seen):
    """The step in float64 with the dense A: (o, X', Y')."""
    c = bla_constants(BLAParams.make(W, N, M))
    X = c.A @ X.double() + c.b[:, None] * k.double()[:, :, None, :]
    Y = c.A @ Y.double() + c.b[:, None] * v.double()[:, :, None, :]
    s = K**-0.5 * torch.einsum("mn,bhnk,bhk->bhm", c.C, X, q.double())
    p = torch.softmax(s.masked_fill(c.slot_lags > seen[:, None, None], float("-inf")), -1)
    return torch.einsum("bhm,mn,bhnv->bhv", p, c.C, Y), X, Y


def relative_error(x, ref) -> float:
    return float((x.double() - ref).abs().max() / ref.abs().max())


def median_us(fn, repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e6


def run(B: int, repeats: int) -> dict:
    g = torch.Generator().manual_seed(B)
    q, k, v = (torch.randn(B, H, d, generator=g) for d in (K, K, V))
    X, Y = (torch.randn(B, H, N, d, generator=g) for d in (K, V))
    seen = torch.full((B,), SEEN, dtype=torch.int64)
    o_ref, X_ref, Y_ref = reference_step(q, k, v, X, Y, seen)
    o, state = decode_step(q, k, v, BLAState(X, Y, seen, W), W, N, M)
    errors = {"o": relative_error(o, o_ref), "key_state": relative_error(state.key_state, X_ref),
              "value_state": relative_error(state.value_state, Y_ref)}  # fmt: skip
    row = {"B": B, "H": H, "errors_vs_float64": errors}
    # the baselines first: TVM's worker threads spin a while after the op's parallel loop, slowing what runs next
    torch_step = TorchStep()
    row["torch_step"] = median_us(lambda: torch_step(q, k, v, X, Y, seen), repeats)
    source, target = torch.cat((X, Y), -1), torch.empty(B, H, N, K + V)
    row["state_copy"] = median_us(lambda: target.copy_(source), repeats)
    for name, dtype in (("op_float32_state", torch.float32), ("op_bfloat16_state", torch.bfloat16)):
        state = BLAState(X.to(dtype), Y.to(dtype), seen.clone(), W)
        with InPlaceSteps(state, W, N, M, tokens=repeats + 5) as steps:
            row[name] = median_us(lambda: steps(q, k, v), repeats)
    row["speedup_vs_torch_step"] = row["torch_step"] / row["op_float32_state"]
    row["ratio_to_state_copy"] = row["op_float32_state"] / row["state_copy"]
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=str, default="/tmp/bla_cpu_decode.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    rows = [run(B, args.repeats) for B in args.batches]
    print(f"{'B':>3} {'op fp32':>10} {'op bf16':>10} {'torch':>10} {'copy':>10} {'vs torch':>9} {'/ copy':>7}"
          "  (us per step)")
    for r in rows:
        print(f"{r['B']:>3} {r['op_float32_state']:>10.1f} {r['op_bfloat16_state']:>10.1f} {r['torch_step']:>10.1f} "
              f"{r['state_copy']:>10.1f} {r['speedup_vs_torch_step']:>8.2f}x {r['ratio_to_state_copy']:>6.1f}x  "
              f"o err {r['errors_vs_float64']['o']:.1e}")  # fmt: skip
    host = {"machine": platform.machine(), "processor": platform.processor(), "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "torch": torch.__version__}  # fmt: skip
    with open(args.out, "w") as out:
        json.dump({"problem": dict(H=H, K=K, V=V, W=W, N=N, M=M, seen=SEEN), "host": host, "rows": rows}, out,
                  indent=1)  # fmt: skip
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
