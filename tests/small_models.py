"""Small models around the op for the training tests: a BLA block (projections, BLA per head, output
projection), a model that learns to copy the token ``lag`` steps back, and that task's batches."""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from bla_tvm import blurry_window_attention


class BLABlock(nn.Module):
    """x [B, T, D] -> q, k, v projections (cast to ``dtype``, the op's input dtype; None: x's) -> BLA per head ->
    output projection (+ residual)."""

    def __init__(self, dim: int, heads: int, window: int, resolution: int, num_slots: int, head_k: int, head_v: int,
                 layout: str = "bthd", dtype: torch.dtype | None = None):  # fmt: skip
        super().__init__()
        self.heads, self.head_k, self.head_v, self.layout, self.dtype = heads, head_k, head_v, layout, dtype
        self.bla = dict(window=window, resolution=resolution, num_slots=num_slots)
        self.q = nn.Linear(dim, heads * head_k)
        self.k = nn.Linear(dim, heads * head_k)
        self.v = nn.Linear(dim, heads * head_v)
        self.out = nn.Linear(heads * head_v, dim)

    def split(self, x, d):
        B, T, _ = x.shape
        x = x.view(B, T, self.heads, d).to(self.dtype or x.dtype)
        if self.layout == "bhtd":  # FLA's other layout: [B, H, T, D] made contiguous, passed as a transposed view
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    def forward(self, x):
        q = self.split(self.q(x), self.head_k)
        k = self.split(torch.nn.functional.normalize(self.k(x), dim=-1).mul(4.0), self.head_k)
        v = self.split(self.v(x), self.head_v)
        o, state = blurry_window_attention(q, k, v, **self.bla)
        assert state is None
        return x + self.out(o.flatten(2).to(x.dtype))


class LagCopyModel(nn.Module):
    """embedding -> BLABlock (one head of the layer (W, N, M, K, V)) -> vocabulary logits."""

    def __init__(self, vocab: int, layer: tuple[int, int, int, int, int], dtype=None, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = BLABlock(dim, 1, *layer, dtype=dtype)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens):
        return self.head(self.block(self.embed(tokens)))


def lag_copy_batch(gen, batch: int, length: int, vocab: int, lag: int):
    """Random tokens; the target at t is the token at t - lag (a token of its own, vocab, before the start).
    Uniform tokens: without looking ``lag`` steps back, no model beats a loss of log(vocab)."""
    tokens = torch.randint(0, vocab, (batch, length), generator=gen)
    target = torch.full_like(tokens, vocab)
    target[:, lag:] = tokens[:, :-lag]
    return tokens, target


def assert_learns_lag_copy(layer, dtype=None, device="cpu", vocab=16, lag=1, steps=100) -> str:
    """Train ``LagCopyModel`` (float32 parameters, BLA inputs in ``dtype``) with Adam on lag-copy batches [16, 96]
    and assert that it learns: every parameter gradient finite, and the mean loss of the last 5 steps well below
    that of the first 5 and well below log(vocab), the best any model that does not look back can do. Returns
    the progress line."""
    torch.manual_seed(0)
    model = LagCopyModel(vocab + 1, layer, dtype).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens, target = (x.to(device) for x in lag_copy_batch(gen, 16, 96, vocab, lag))
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    initial, final = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert initial > 0.9 * math.log(vocab), f"initial loss {initial:.3f}: the task is not as hard as intended"
    progress = f"loss {initial:.3f} -> {final:.3f} in {steps} steps ({time.perf_counter() - start:.1f} s)"
    assert final < 0.7 * initial, progress
    assert final < 0.75 * math.log(vocab), progress + ": not learning to look back"
    return progress
