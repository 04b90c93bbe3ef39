"""Compile FLA's chunk_gsa kernels in parallel before a benchmark times it (run on the GPU machine).

FLA autotunes each of its Triton kernels over tens of configs, compiled one after another on first use: one
training step of chunk_gsa at the benchmark's shape takes more than five minutes to compile on a fresh machine,
longer than a device call may run. This script starts ``--parts`` processes that each run that step with only
their share of every kernel's configs (config i goes to process i mod parts), so that together they put every
compiled config into the shared Triton cache (``TRITON_CACHE_DIR``). The benchmark run after it then autotunes
over all configs, as FLA does, with every compilation a cache hit. The partial autotunings' choices are not
stored (``FLA_CACHE_RESULTS=0``), so they cannot leak into the benchmark's.

    TRITON_CACHE_DIR=/tmp/triton python benchmarks/fla_warmup.py --parts 12
"""

import argparse
import os
import subprocess
import sys

SHAPE = dict(B=4, T=4096, H=16, K=64, V=64, slots=64)


def compile_share(part: int, parts: int) -> None:
    """Run one chunk_gsa training step (forward, backward) with configs part, part + parts, ... of each kernel."""
    import torch
    from triton.runtime.autotuner import Autotuner

    prune = Autotuner.prune_configs

    def prune_share(self, *args, **kwargs):  # after FLA's own pruning, which may keep only some configs
        configs = prune(self, *args, **kwargs)
        return configs[part::parts] or configs[:1]

    Autotuner.prune_configs = prune_share
    from fla.ops.gsa import chunk_gsa

    B, T, H, K, V, M = SHAPE.values()
    make = lambda d: torch.randn(B, T, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
    q, k, v, slots = make(K), make(K), make(V), make(M)
    gate = torch.nn.functional.logsigmoid(torch.randn(B, T, H, M, device="cuda")).bfloat16().requires_grad_()
    with torch.no_grad():
        chunk_gsa(q, k, v, slots, gate)
    chunk_gsa(q, k, v, slots, gate)[0].backward(torch.randn_like(v))
    torch.cuda.synchronize()


def main(parts: int) -> None:
    if "TRITON_CACHE_DIR" not in os.environ:
        sys.exit("set TRITON_CACHE_DIR to the cache the benchmark will use")
    env = dict(os.environ, FLA_CACHE_RESULTS="0")
    workers = [subprocess.Popen([sys.executable, __file__, "--part", str(part), "--parts", str(parts)], env=env)
               for part in range(parts)]  # fmt: skip
    failed = [part for part, worker in enumerate(workers) if worker.wait() != 0]
    if failed:
        sys.exit(f"FLA warm-up parts {failed} failed")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=12, help="processes compiling at once")
    parser.add_argument("--part", type=int, help="(internal) run this share of the configs")
    args = parser.parse_args()
    if args.part is None:
        main(args.parts)
    else:
        compile_share(args.part, args.parts)
