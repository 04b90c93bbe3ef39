"""Eager inference of fresh sequences replayed from a recording (``bla_tvm.replay``): a replayed call computes
what the full call computes, on its own inputs; every argument check still refuses bad input; calls the key does
not cover (gradients, states, packed sequences, final states, another environment) are not replayed."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_POOL, max_rel_err

from bla_tvm import bla_recurrent, blurry_window_attention, replay, tuning_logs
from bla_tvm.runtime import record_launches
from bla_tvm.testing import poisoned_allocations

SHAPE = next(s for s in KERNEL_POOL if (s.K, s.V) == (40, 72))  # M > N, K != V
ARGS = dict(window=SHAPE.W, resolution=SHAPE.N, num_slots=SHAPE.M)


def qkv(seed: int, B=2, T=70, H=3):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, T, H, d, generator=gen) for d in (SHAPE.K, SHAPE.K, SHAPE.V))


@pytest.fixture(autouse=True)
def nothing_recorded():
    replay._RECORDED.clear()
    yield
    replay._RECORDED.clear()


def infer(q, k, v, **kwargs):
    with torch.no_grad():
        return blurry_window_attention(q, k, v, **{**ARGS, **kwargs})


def test_a_repeated_call_replays_the_same_kernels_on_its_own_inputs():
    """The second call of a key launches the kernels of the first, with the same constants and layout, on its
    own q, k, v and a new o; its output is the full call's on the same inputs, bit for bit, and the float64
    definition's on new ones, also with temporaries that start as NaN and with non-contiguous inputs."""
    first = qkv(0)
    with record_launches() as recorded:
        o_first, _ = infer(*first, scale=0.3)
    assert len(replay._RECORDED) == 1
    second = qkv(1)
    with record_launches() as replayed, poisoned_allocations():
        o_second, _ = infer(*second, scale=0.3)
    assert [x.kernel for x in replayed] == [x.kernel for x in recorded]
    for old, new in zip(recorded, replayed):
        for name, a, b in zip(old.kernel.kernel.args, old.args, new.args):
            if name in ("q", "k", "v"):
                assert b.data_ptr() == second["qkv".index(name)].data_ptr()
            elif name not in replay.PER_CALL:
                assert b is a  # constants, layout tables, the zero initial state: bound once
    assert o_second.data_ptr() != o_first.data_ptr()
    assert max_rel_err(o_second, bla_recurrent(*second, **ARGS, scale=0.3)) <= 1e-5
    assert torch.equal(infer(*first, scale=0.3)[0], o_first)
    strided = tuple(x.transpose(1, 2).contiguous().transpose(1, 2) for x in second)
    assert torch.equal(infer(*strided, scale=0.3)[0], o_second)
    assert len(replay._RECORDED) == 1


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(window=float(SHAPE.W)), TypeError),  # equal to the recorded int, and hashed alike
        (dict(resolution=True, num_slots=1), TypeError),  # equal to a recorded resolution of 1
        (dict(scale=True), TypeError),  # True == 1 == the recorded scale
        (dict(scale=float("nan")), ValueError),
        (dict(window=[SHAPE.W]), TypeError),  # unhashable: the check names it
        (dict(scale=[1.0]), TypeError),
    ],
    ids=["float window", "bool resolution", "bool scale", "nan scale", "list window", "list scale"],
)
def test_argument_checks_still_refuse_what_equals_a_recorded_key(change, error):
    q, k, v = qkv(0)
    infer(q, k, v, scale=1)
    infer(q, k, v, scale=1)  # replayed
    if "resolution" in change:
        infer(q, k, v, scale=1, resolution=1, num_slots=1)
    with pytest.raises(error, match=next(iter(change))):
        infer(q, k, v, **{"scale": 1, **change})


def test_bad_tensors_are_refused_after_their_shape_was_replayed():
    q, k, v = qkv(0)
    infer(q, k, v)
    infer(q, k, v)
    with pytest.raises(TypeError, match="one dtype"):
        infer(q, k.double(), v)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        infer(q.numpy(), k, v)


def test_calls_outside_the_key_are_not_recorded_and_stay_exact():
    """Gradients, an initial state, packed sequences and final states take the full path every time."""
    q, k, v = qkv(0, B=1)
    o = blurry_window_attention(q.requires_grad_(), k, v, **ARGS)[0]
    (dq,) = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(dq).all()
    _, state = infer(q, k, v, output_final_state=True)
    infer(q, k, v, initial_state=state)
    infer(q, k, v, cu_seqlens=torch.tensor([0, 30, 70]))
    assert not replay._RECORDED


def test_a_new_environment_or_reloaded_logs_record_anew(monkeypatch):
    q, k, v = qkv(0)
    infer(q, k, v)
    tuning_logs.reload()
    infer(q, k, v)
    monkeypatch.setenv("BLA_TVM_NO_TUNING", "1")
    infer(q, k, v)
    assert len(replay._RECORDED) == 3


def test_the_least_recently_used_recordings_are_dropped(monkeypatch):
    monkeypatch.setattr(replay, "CAPACITY", 2)
    calls = [qkv(0, T=t) for t in (10, 20, 30)]
    infer(*calls[0])
    infer(*calls[1])
    infer(*calls[0])  # used again: now the most recent
    infer(*calls[2])
    assert [key[0][1] for key in replay._RECORDED] == [10, 30]
