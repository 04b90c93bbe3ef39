"""NaN-poisoned allocation, for the tests and the tuner: an output element a kernel never writes shows up as NaN.

    with poisoned_allocations() as shapes:
        o, _ = blurry_window_attention(q, k, v, 64, 15)
    assert torch.isfinite(o).all()

Imports only torch.
"""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def poisoned_allocations():
    """Within it, torch.empty, torch.empty_like and Tensor.new_empty return floating tensors full of NaN (meta
    tensors aside); yields the list of the poisoned allocations' shapes, in allocation order. Not thread safe:
    it replaces the three functions for the whole process while it is open."""
    originals = {"empty": torch.empty, "empty_like": torch.empty_like}
    new_empty = torch.Tensor.new_empty
    own_new_empty = "new_empty" in vars(torch.Tensor)  # else inherited from torch._C.TensorBase
    shapes: list[tuple[int, ...]] = []

    def fill(x):
        if x.dtype.is_floating_point and x.device.type != "meta":
            x.fill_(float("nan"))
            shapes.append(tuple(x.shape))
        return x

    torch.empty = lambda *a, **kw: fill(originals["empty"](*a, **kw))
    torch.empty_like = lambda *a, **kw: fill(originals["empty_like"](*a, **kw))
    torch.Tensor.new_empty = lambda self, *a, **kw: fill(new_empty(self, *a, **kw))
    try:
        yield shapes
    finally:
        torch.empty, torch.empty_like = originals["empty"], originals["empty_like"]
        if own_new_empty:
            torch.Tensor.new_empty = new_empty
        else:
            del torch.Tensor.new_empty
