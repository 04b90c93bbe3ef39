"""One MQAR run: train a ``LanguageModel`` on fresh batches, then measure its accuracy on held-out examples.

A run's config (stored with its result, and its key for resuming) is a dict: task {seq_len, num_kv_pairs,
vocab_size, power_a}, model {d_model, layers, heads}, training {steps, batch_size, lr, weight_decay,
warmup, eval_examples, dtype}, method (``model``'s method dict) and seed. The seed draws the weights and the
training batches; the held-out examples are the same for every run of a task on one kind of device (their own
seed). The batches are drawn on the run's device (a generator there): on CUDA the draws differ from the CPU's.

Training: AdamW (betas 0.9, 0.98), the learning rate warmed up linearly over ``warmup`` of the steps, then
cosine to zero; gradients clipped to norm 1; cross-entropy on the answers only. Accuracy: the fraction of
answers (over the held-out examples) whose argmax prediction is the right value.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .data import IGNORE, mqar_batch
from .model import LanguageModel

#: seed of the held-out examples
EVAL_SEED = 2**31 - 1


def build_model(config: dict) -> LanguageModel:
    task, model = config["task"], config["model"]
    return LanguageModel(config["method"], task["vocab_size"], task["seq_len"], model["d_model"], model["layers"],
                         model["heads"])  # fmt: skip


def batch(task: dict, size: int, generator: torch.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch drawn by ``generator`` (on ``device``: ``make_generator``)."""
    inputs, targets = mqar_batch(size, task["seq_len"], task["num_kv_pairs"], task["vocab_size"], generator,
                                 task["power_a"])  # fmt: skip
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)


def answers(task: dict, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [B, P], values [B, P]) of the answers in targets [B, T] (P = num_kv_pairs per row, ascending).
    A stable sort, not a boolean mask: indexing by a mask waits for the GPU to count it, every step."""
    positions = torch.argsort((targets == IGNORE).to(torch.uint8), dim=1, stable=True)[:, : task["num_kv_pairs"]]
    return positions, targets.gather(1, positions)


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator of a run's batches, on ``device``: no host work per step beyond the launches."""
    return torch.Generator(device=device).manual_seed(seed)


def autocast(device: torch.device, dtype: str):
    """bfloat16 autocast for dtype "bfloat16" (weights and the optimizer stay float32); nothing for "float32"."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


def learning_rate(step: int, steps: int, warmup: float) -> float:
    """The learning rate's multiplier at ``step``: linear warm-up over warmup * steps, then cosine to 0."""
    ramp = max(1, round(warmup * steps))
    if step < ramp:
        return (step + 1) / ramp
    return 0.5 * (1 + math.cos(math.pi * (step - ramp) / max(1, steps - ramp)))


@torch.no_grad()
def accuracy(model, task: dict, training: dict, device) -> float:
    """Fraction of right answers over the task's held-out examples."""
    generator = make_generator(device, EVAL_SEED)
    right = total = 0
    remaining = training["eval_examples"]
    model.eval()
    while remaining:
        size = min(remaining, training["batch_size"])
        inputs, targets = batch(task, size, generator, device)
        positions, values = answers(task, targets)
        with autocast(device, training["dtype"]):
            predictions = model(inputs, positions).argmax(-1)
        right += (predictions == values).sum().item()
        total += values.numel()
        remaining -= size
    model.train()
    return right / total


def optimizer_and_schedule(model, training: dict) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (one fused kernel on CUDA) and its warm-up + cosine schedule over ``training["steps"]``."""
    fused = next(model.parameters()).is_cuda
    optimizer = torch.optim.AdamW(model.parameters(), lr=training["lr"], betas=(0.9, 0.98),
                                  weight_decay=training["weight_decay"], fused=fused)  # fmt: skip
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, training["steps"], training["warmup"])
    )
    return optimizer, schedule


def training_step(model, optimizer, schedule, task: dict, training: dict, generator, device) -> torch.Tensor:
    """One step on a fresh batch; returns the loss (on the device: no wait for the GPU)."""
    inputs, targets = batch(task, training["batch_size"], generator, device)
    positions, values = answers(task, targets)
    with autocast(device, training["dtype"]):
        logits = model(inputs, positions)
    loss = F.cross_entropy(logits.float().flatten(0, 1), values.flatten())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return loss.detach()


def train_run(config: dict, device: torch.device, description: str = "", progress: bool = True,
              compiled: bool = False) -> dict:  # fmt: skip
    """Train (steps >= 1) and evaluate the run ``config``: {"accuracy", "final_loss" (mean of the last 5% of
    steps), "seconds"}. ``compiled``: run the model through ``torch.compile`` (the same arithmetic, fewer
    launches)."""
    task, training = config["task"], config["training"]
    torch.manual_seed(config["seed"])
    model = build_model(config).to(device)
    if compiled:
        model = torch.compile(model)
    optimizer, schedule = optimizer_and_schedule(model, training)
    generator = make_generator(device, config["seed"])
    start, losses = time.perf_counter(), []
    bar = tqdm(range(training["steps"]), desc=description, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        losses.append(training_step(model, optimizer, schedule, task, training, generator, device))
        if step % 50 == 0 or step == training["steps"] - 1:
            bar.set_postfix(loss=f"{losses[-1].item():.3f}")
    tail = torch.stack(losses[-max(1, len(losses) // 20) :]).mean().item()
    result = {"accuracy": accuracy(model, task, training, device), "final_loss": tail}
    return {**result, "seconds": round(time.perf_counter() - start, 2)}
