"""Is a poor MQAR result of BLA the method's or the kernels'? The sweep's model (examples/mqar, BLA layers through
the CUDA kernels under bfloat16 autocast) against the same model with ``bla_chunked`` (the float64 reference,
plain torch, on the CPU) in place of the kernels, under the same autocast and in float64 throughout: the loss and
every parameter's gradient on one batch, at initialisation and again after some training steps through the
kernels.

    PYTHONPATH=. python benchmarks/mqar_kernel_check.py [--resolution N] [--slots N|W] [--short-conv] [--steps S]

Prints, at each check, the kernels against reference attention under the same bf16 autocast (the kernels' own
error) and against the model in float64 throughout: the losses, the largest relative gradient error (max |a - b|
/ max |b| per parameter, the worst parameter named) and the median over parameters.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

from bla_tvm import bla_chunked
from examples.mqar import train

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--resolution", type=int, default=63)
parser.add_argument("--slots", default="N")
parser.add_argument("--short-conv", action="store_true")
parser.add_argument("--steps", type=int, default=500)
args = parser.parse_args()

device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
config = dict(
    task=dict(seq_len=256, num_kv_pairs=16, vocab_size=8192, power_a=0.01),
    model=dict(d_model=128, layers=2, heads=2),
    training=dict(steps=4000, batch_size=64, lr=3e-3, weight_decay=0.1, warmup=0.1, eval_examples=256,
                  dtype="bfloat16"),
    method=dict(name="bla", window=256, resolution=args.resolution, slots=args.slots, short_conv=args.short_conv,
                feature_map=None, output_gate=False, norm=False),
    seed=0,
)  # fmt: skip


def reference_attend(layer):
    """The layer's ``_attend`` through ``bla_chunked`` in float64 (training calls: no state in or out)."""

    def attend(q, k, v, initial, use_cache, cu_seqlens):
        p = layer.params
        q64, k64, v64 = (x.double().cpu() for x in (q, k, v))  # the reference's tables live on the CPU
        o = bla_chunked(q64, k64, v64, p.window, p.resolution, p.num_slots, layer.scale)
        return o.to(q.device, q.dtype), None

    return attend


def loss_and_grads(model, inputs, positions, values, dtype):
    model.zero_grad(set_to_none=True)
    with train.autocast(device, dtype):
        logits = model(inputs, positions)
    loss = F.cross_entropy(logits.float().flatten(0, 1), values.flatten())
    loss.backward()
    return loss.item(), {name: p.grad.double() for name, p in model.named_parameters()}


def with_reference_attention(model, dtype):
    """A copy of ``model`` in ``dtype`` whose BLA layers attend through ``reference_attend``."""
    copied = copy.deepcopy(model).to(dtype)
    for block in copied.blocks:
        block.attention._attend = reference_attend(block.attention)
    return copied


def compare(name: str, loss, grads, ref_loss, ref_grads) -> None:
    errors = {n: ((grads[n] - ref_grads[n]).abs().max() / ref_grads[n].abs().max()).item() for n in grads}
    worst = max(errors, key=errors.get)
    print(f"  {name}: loss {loss:.5f} against {ref_loss:.5f}; gradients: worst {worst} {errors[worst]:.2e}, "
          f"median {sorted(errors.values())[len(errors) // 2]:.2e}", flush=True)  # fmt: skip


def check(model, when: str):
    """Three runs of one batch: the kernels under bf16 autocast; the same with float64 reference attention (the
    kernels' own error is the difference of the two); the model in float64 throughout (autocast's error too)."""
    generator = train.make_generator(device, 12345)
    inputs, targets = train.batch(config["task"], 16, generator, device)
    positions, values = train.answers(config["task"], targets)
    batch = (inputs, positions, values)
    kernels = loss_and_grads(model, *batch, "bfloat16")
    autocast_reference = loss_and_grads(with_reference_attention(model, torch.float32), *batch, "bfloat16")
    exact = loss_and_grads(with_reference_attention(model, torch.float64), *batch, "float32")  # no autocast
    print(f"{when}:")
    compare("kernels vs reference attention, both under bf16 autocast", *kernels, *autocast_reference)
    compare("kernels under bf16 autocast vs float64 throughout", *kernels, *exact)


torch.manual_seed(config["seed"])
model = train.build_model(config).to(device)
print(f"BLA W 256 N {args.resolution} M {args.slots} short conv {args.short_conv}, batch 16, bf16 autocast vs float64")
check(model, "init")
optimizer, schedule = train.optimizer_and_schedule(model, config["training"])
generator = train.make_generator(device, 0)
for _ in range(args.steps):
    loss = train.training_step(model, optimizer, schedule, config["task"], config["training"], generator, device)
print(f"after {args.steps} steps (training loss {loss.item():.3f})")
check(model, f"step {args.steps}")
