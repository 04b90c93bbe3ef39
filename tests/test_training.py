"""Training with the compiled op on the CPU: torch.compile(fullgraph=True) over forward and backward, and a
small model that learns a task only attention can solve.

The layer shape (W, N, M, K, V) = (16, 7, 9, 40, 72) is one of ``helpers.KERNEL_POOL``'s, so its float32
kernels are shared with the other test modules.
"""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_POOL, max_rel_err
from small_models import BLABlock, assert_learns_lag_copy

SHAPE = next(s for s in KERNEL_POOL if s.id == "W16N7M9K40V72")


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


def test_small_model_learns_previous_token_prediction():
    """Predict the previous token (inside the window W = 16) with one BLA layer (N = 7, M = 9: a blurred view
    of the window): 100 Adam steps in float32 bring the loss well below its start, and well below log(vocab),
    the best any model that does not look back can do."""
    assert_learns_lag_copy((SHAPE.W, SHAPE.N, SHAPE.M, SHAPE.K, SHAPE.V))
