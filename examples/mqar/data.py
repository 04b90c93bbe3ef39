"""Multi-query associative recall (MQAR), the task of Zoology (Arora, Eyuboglu et al. 2023), generated in torch.

A sequence of T tokens: P key-value pairs ``k1 v1 k2 v2 ...`` (P distinct keys from the lower half of the
vocabulary, P distinct values from the upper half), then a query region where each of the P keys appears once,
at positions 2 P + 2 g (g < (T - 2 P) / 2, drawn without replacement with probability proportional to
g'^(a - 1), g' = g + 1: most queries come soon after the pairs, a few much later; a = ``power_a``). Every other
position holds a uniformly random token. The target at a query is its key's value; every other target is
IGNORE, so the loss and the accuracy count the answers only.
"""

from __future__ import annotations

import torch

#: the target of positions that are not answers (``torch.nn.functional.cross_entropy``'s ignore_index)
IGNORE = -100


def check_task(seq_len: int, num_kv_pairs: int, vocab_size: int) -> None:
    """ValueError naming the argument unless T tokens hold the pairs and a query region with room for each key
    (T >= 4 P) and each vocabulary half holds P distinct tokens."""
    if num_kv_pairs < 1:
        raise ValueError(f"num_kv_pairs must be >= 1, got {num_kv_pairs}")
    if seq_len < 4 * num_kv_pairs:
        raise ValueError(f"seq_len must be >= 4 * num_kv_pairs = {4 * num_kv_pairs} (the pairs, then a query "
                         f"region of two positions per key), got {seq_len}")  # fmt: skip
    if vocab_size < 2 * num_kv_pairs:
        raise ValueError(f"vocab_size must be >= 2 * num_kv_pairs = {2 * num_kv_pairs} (distinct keys in the "
                         f"lower half, distinct values in the upper half), got {vocab_size}")  # fmt: skip


def distinct(batch: int, low: int, high: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """[batch, count] tokens from [low, high), distinct within each row (on the generator's device)."""
    noise = torch.rand(batch, high - low, generator=generator, device=generator.device)
    return noise.argsort(dim=1)[:, :count] + low


def mqar_batch(
    batch: int, seq_len: int, num_kv_pairs: int, vocab_size: int, generator: torch.Generator, power_a: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [batch, seq_len], targets [batch, seq_len]) int64 on the generator's device; targets are the keys'
    values at the queries and IGNORE elsewhere. A CUDA generator draws the batch on the GPU: on two CPU cores,
    drawing and sorting the random keys of one batch of the full sweep took ~20 ms, over a minute per 4,000 steps."""
    check_task(seq_len, num_kv_pairs, vocab_size)
    P, half, device = num_kv_pairs, vocab_size // 2, generator.device
    keys = distinct(batch, 0, half, P, generator)
    values = distinct(batch, half, vocab_size, P, generator)
    inputs = torch.randint(vocab_size, (batch, seq_len), generator=generator, device=device)
    inputs[:, 0 : 2 * P : 2], inputs[:, 1 : 2 * P : 2] = keys, values
    slots = (seq_len - 2 * P) // 2  # query positions 2 P + 2 g, g < slots
    weights = power_a * torch.arange(1, slots + 1, dtype=torch.float64, device=device) ** (power_a - 1)
    gaps = torch.multinomial(weights.expand(batch, slots), P, replacement=False, generator=generator)
    queries = 2 * P + 2 * gaps
    inputs.scatter_(1, queries, keys)
    targets = torch.full_like(inputs, IGNORE).scatter_(1, queries, values)
    return inputs, targets
