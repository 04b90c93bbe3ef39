"""Training with the compiled op on the CPU: torch.compile(fullgraph=True) over forward and backward, and a
small model that learns a task only attention can solve.

The layer shape (W, N, M, K, V) = (16, 7, 9, 40, 72) is one of ``helpers.KERNEL_POOL``'s, so its float32
kernels are shared with the other test modules.
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from helpers import KERNEL_POOL, max_rel_err
from torch import nn

from bla_tvm import blurry_window_attention

SHAPE = next(s for s in KERNEL_POOL if s.id == "W16N7M9K40V72")


class BLABlock(nn.Module):
    """x [B, T, D] -> q, k, v projections -> BLA per head -> output projection (+ residual)."""

    def __init__(self, dim: int, heads: int, window: int, resolution: int, num_slots: int, head_k: int, head_v: int,
                 layout: str = "bthd"):  # fmt: skip
        super().__init__()
        self.heads, self.head_k, self.head_v, self.layout = heads, head_k, head_v, layout
        self.bla = dict(window=window, resolution=resolution, num_slots=num_slots)
        self.q = nn.Linear(dim, heads * head_k)
        self.k = nn.Linear(dim, heads * head_k)
        self.v = nn.Linear(dim, heads * head_v)
        self.out = nn.Linear(heads * head_v, dim)

    def split(self, x, d):
        B, T, _ = x.shape
        x = x.view(B, T, self.heads, d)
        if self.layout == "bhtd":  # FLA's other layout: [B, H, T, D] made contiguous, passed as a transposed view
            x = x.transpose(1, 2).contiguous().transpose(1, 2)
        return x

    def forward(self, x):
        q = self.split(self.q(x), self.head_k)
        k = self.split(torch.nn.functional.normalize(self.k(x), dim=-1).mul(4.0), self.head_k)
        v = self.split(self.v(x), self.head_v)
        o, state = blurry_window_attention(q, k, v, **self.bla)
        assert state is None
        return x + self.out(o.flatten(2))


def make_block(seed=0, layout="bthd", heads=2):
    torch.manual_seed(seed)
    return BLABlock(32, heads, SHAPE.W, SHAPE.N, SHAPE.M, SHAPE.K, SHAPE.V, layout)


def loss_fn(block, x, target):
    return (block(x).tanh() - target).square().mean()


def param_grads(block, x, target, fn):
    block.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    loss = fn(block, x, target)
    loss.backward()
    return loss.detach(), x.grad, {n: p.grad.clone() for n, p in block.named_parameters()}


@pytest.fixture
def fresh_compile():
    """A clean dynamo state, and inductor's on-disk caches off: a graph compiled by an earlier run against an
    older fake implementation of the op must not be reused (the cache key does not cover custom ops' fakes)."""
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):
        yield
    torch._dynamo.reset()


@pytest.mark.parametrize(
    "backend,layout",
    # inductor compiles for ~10-20 s on two cores: once, with the layout that needs the most care
    [("aot_eager", "bthd"), ("aot_eager", "bhtd"), ("inductor", "bhtd")],
)
def test_compiled_training_step_matches_eager(backend, layout, fresh_compile):
    """Forward + backward of a loss through linear layers and BLA under torch.compile(fullgraph=True): no graph
    break, and the loss and every gradient (parameters and input) match eager.

    With layout "bhtd" the op gets non-contiguous q, k, v views; under inductor this was a regression for the
    backward's fake implementation returning q's strides (bla_tvm/ops.py) where the kernel returns contiguous
    gradients: inductor asserted the fake strides at run time and failed."""
    block = make_block(layout=layout)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 75, 32, generator=gen)
    target = torch.randn(2, 75, 32, generator=gen).tanh()
    loss, dx, grads = param_grads(block, x, target, loss_fn)
    compiled = torch.compile(loss_fn, fullgraph=True, backend=backend)
    c_loss, c_dx, c_grads = param_grads(block, x, target, compiled)
    # aot_eager runs the same kernels in the same order; inductor fuses and reorders the surrounding ops
    tol = 1e-6 if backend == "aot_eager" else 1e-4
    assert max_rel_err(c_loss, loss) <= tol
    assert max_rel_err(c_dx, dx) <= tol, "input gradient"
    for name in grads:
        assert max_rel_err(c_grads[name], grads[name]) <= tol, name


def test_compiled_training_dynamic_lengths(fresh_compile):
    """dynamic=True: one graph (forward and backward) serves several (B, T), with eager's gradients."""
    block = make_block()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager", dynamic=True)
    gen = torch.Generator().manual_seed(2)
    for B, T in ((1, 70), (3, 131), (2, 5)):
        x, target = torch.randn(B, T, 32, generator=gen), torch.randn(B, T, 32, generator=gen).tanh()
        loss, dx, grads = param_grads(block, x, target, loss_fn)
        c_loss, c_dx, c_grads = param_grads(block, x, target, compiled)
        assert max_rel_err(c_loss, loss) <= 1e-6 and max_rel_err(c_dx, dx) <= 1e-6
        assert all(max_rel_err(c_grads[n], grads[n]) <= 1e-6 for n in grads)


# --- a model that learns --------------------------------------------------------------------------------------


class LagCopyModel(nn.Module):
    """embedding -> BLABlock -> vocabulary logits."""

    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.block = BLABlock(dim, 1, SHAPE.W, SHAPE.N, SHAPE.M, SHAPE.K, SHAPE.V)
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


def test_small_model_learns_previous_token_prediction():
    """Predict the previous token (inside the window W = 16) with one BLA layer (N = 7, M = 9: a blurred view
    of the window): 100 Adam steps in float32 bring the loss well below its start, and well below log(vocab),
    the best any model that does not look back can do."""
    torch.manual_seed(0)
    vocab, lag, steps = 16, 1, 100
    model = LagCopyModel(vocab + 1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        tokens, target = lag_copy_batch(gen, 16, 96, vocab, lag)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start
    initial, final = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert initial > 0.9 * math.log(vocab), f"initial loss {initial:.3f}: the task is not as hard as intended"
    progress = f"loss {initial:.3f} -> {final:.3f} in {steps} steps ({elapsed:.1f} s)"
    assert final < 0.7 * initial, progress
    assert final < 0.75 * math.log(vocab), progress + ": not learning to look back"
