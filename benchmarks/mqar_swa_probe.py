"""One MQAR training curve of sliding-window attention, printed every 250 steps: the probe that told the
plateau apart from a GPU defect (benchmarks/results/h200-2026-12-03-mqar-swa-short-conv-probe.log).

The sweep's setting (examples/mqar: d_model 128, 2 layers, 2 heads of 64, T 256, 16 pairs, vocabulary 8192,
batch 64, the 4,000-step schedule) with SWA W = 256, seed 0, stopped after STEPS steps:

    PYTHONPATH=. python benchmarks/mqar_swa_probe.py DTYPE DRAW STEPS [--lr LR] [--short-conv]

DTYPE float32 or bfloat16 (autocast); DRAW the device whose generator draws the batches (cuda or cpu: the CPU's
draws are the same on every machine); the model runs on CUDA where there is one.
"""

from __future__ import annotations

import argparse
import time

import torch

from examples.mqar import train

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("dtype", choices=["float32", "bfloat16"])
parser.add_argument("draw", choices=["cuda", "cpu"])
parser.add_argument("steps", type=int)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--short-conv", action="store_true")
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
config = dict(
    task=dict(seq_len=256, num_kv_pairs=16, vocab_size=8192, power_a=0.01),
    model=dict(d_model=128, layers=2, heads=2),
    training=dict(steps=4000, batch_size=64, lr=args.lr, weight_decay=0.1, warmup=0.1, eval_examples=256,
                  dtype=args.dtype),
    method=dict(name="swa", window=256, kernel="sdpa", short_conv=args.short_conv),
    seed=0,
)  # fmt: skip
torch.manual_seed(config["seed"])
model = train.build_model(config).to(device)
optimizer, schedule = train.optimizer_and_schedule(model, config["training"])
generator = train.make_generator(torch.device(args.draw), config["seed"])
losses, start = [], time.perf_counter()
for step in range(1, args.steps + 1):
    losses.append(train.training_step(model, optimizer, schedule, config["task"], config["training"], generator,
                                      device))  # fmt: skip
    if step % 250 == 0:
        accuracy = f" accuracy {train.accuracy(model, config['task'], config['training'], device):.3f}"
        print(f"{args.dtype} {args.draw} step {step} loss {torch.stack(losses[-250:]).mean().item():.3f}"
              f"{accuracy if step % 1000 == 0 else ''} ({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
