"""Carried state, packed variable-length batches and GQA through the compiled op, on the CPU (issue 7).

- splitting a sequence anywhere and passing the state on equals one call, and both equal the float64
  recurrent definition started from the same state;
- packed sequences (``cu_seqlens``) equal separate calls, empty and length-1 sequences included;
- GQA equals the same call with k and v repeated over each group;
- gradients reach the initial state (and flow from the final state) as autograd through the reference says;
- the ops' schema and fake implementations hold with states and offsets (opcheck, torch.compile);
- every bad state or offset table gets a clear error.

Shapes come from ``helpers.KERNEL_POOL`` so that kernels compiled by other test modules are reused.
"""

from __future__ import annotations

import pytest
import torch
from helpers import F64, KERNEL_POOL, max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from bla_tvm import BLAState, bla_recurrent, blurry_window_attention
from bla_tvm import kernels
from bla_tvm.runtime import record_launches

SHAPES = {
    "M>N": next(s for s in KERNEL_POOL if (s.K, s.V) == (40, 72)),
    "SWA W>L": next(s for s in KERNEL_POOL if s.W == 80),
    "M==W>N": next(s for s in KERNEL_POOL if (s.W, s.N, s.M) == (12, 5, 12)),
}
TOL = {F64: 1e-10, torch.float32: 1e-5}


def args(shape):
    return dict(window=shape.W, resolution=shape.N, num_slots=shape.M)


def random_tensor(gen, *shape, dtype=F64):
    return torch.randn(*shape, generator=gen, dtype=F64).to(dtype)


def random_state(gen, S, H, shape, dtype=F64, max_seen=None):
    """A state as a previous call could leave it: random X and Y, seen in [0, 2 W] (before and after the
    window fills)."""
    max_seen = 2 * shape.W if max_seen is None else max_seen
    seen = torch.randint(0, max_seen + 1, (S,), generator=gen)
    acc = F64 if dtype == F64 else torch.float32
    X, Y = (random_tensor(gen, S, H, shape.N, d, dtype=acc) for d in (shape.K, shape.V))
    return BLAState(X, Y, seen)


def qkv(gen, B, T, H, shape, dtype=F64, group=1):
    return (
        random_tensor(gen, B, T, H * group, shape.K, dtype=dtype),
        random_tensor(gen, B, T, H, shape.K, dtype=dtype),
        random_tensor(gen, B, T, H, shape.V, dtype=dtype),
    )


def assert_states_close(actual: BLAState, expected, tol, what=""):
    for name, a, e in zip(("key_state", "value_state"), actual[:2], expected[:2]):
        assert max_rel_err(a, e) <= tol, (what, name, max_rel_err(a, e))
    assert torch.equal(actual.seen, expected[2].to(actual.seen.dtype)), (what, actual.seen, expected[2])


# --- split anywhere -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@settings(max_examples=8)
@given(data=st.data())
def test_split_anywhere_equals_one_call(shape, dtype, data):
    """Cuts inside chunks, at chunk boundaries and before the window fills; a fresh or a carried start."""
    T = data.draw(st.integers(1, 150), label="T")
    B, H = data.draw(st.integers(1, 2), label="B"), data.draw(st.integers(1, 2), label="H")
    cuts = sorted(data.draw(st.lists(st.integers(0, T), max_size=3), label="cuts"))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    q, k, v = qkv(gen, B, T, H, shape, dtype)
    start = random_state(gen, B, H, shape, dtype) if data.draw(st.booleans(), label="carried") else None
    o, final = blurry_window_attention(q, k, v, **args(shape), initial_state=start, output_final_state=True)
    state, pieces = start, []
    for a, b in zip([0, *cuts], [*cuts, T]):
        piece, state = blurry_window_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], **args(shape), initial_state=state, output_final_state=True
        )
        pieces.append(piece)
    assert max_rel_err(torch.cat(pieces, dim=1), o) <= TOL[dtype]
    assert_states_close(state, final, TOL[dtype], "pieces vs one call")
    ref, ref_final = bla_recurrent(q, k, v, **args(shape), initial_state=start, output_final_state=True)
    assert max_rel_err(o, ref) <= TOL[dtype]
    assert_states_close(final, ref_final, TOL[dtype], "one call vs reference")


def test_token_by_token_equals_one_call():
    """Prefill, then one token per call (T = 1), through the window's filling and past it."""
    shape = SHAPES["SWA W>L"]
    gen = torch.Generator().manual_seed(0)
    q, k, v = qkv(gen, 2, 100, 2, shape)
    o, final = blurry_window_attention(q, k, v, **args(shape), output_final_state=True)
    pieces, state = [], None
    for a, b in [(0, 3)] + [(t, t + 1) for t in range(3, 100)]:
        piece, state = blurry_window_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], **args(shape), initial_state=state, output_final_state=True
        )
        pieces.append(piece)
    assert max_rel_err(torch.cat(pieces, dim=1), o) <= 1e-10
    assert_states_close(state, final, 1e-10)


# --- packed sequences ---------------------------------------------------------------------------------------


@st.composite
def sequence_lengths(draw, max_sequences=5, max_length=140):
    """1..5 lengths; 0 and 1 drawn often."""
    length = st.one_of(st.sampled_from([0, 1]), st.integers(0, max_length))
    return draw(st.lists(length, min_size=1, max_size=max_sequences), label="lengths")


def offsets(lengths, dtype=torch.int32):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=dtype)


@pytest.mark.parametrize("shape", [SHAPES["M>N"], SHAPES["SWA W>L"]], ids=["M>N", "SWA W>L"])
@settings(max_examples=8)
@given(lengths=sequence_lengths(), carried=st.booleans(), seed=st.integers(0, 2**31 - 1),
       offset_dtype=st.sampled_from([torch.int32, torch.int64]))
def test_packed_sequences_equal_separate_calls(shape, lengths, carried, seed, offset_dtype):
    """Outputs, final states and gradients (of q, k, v and the initial states)."""
    gen = torch.Generator().manual_seed(seed)
    S, H, T = len(lengths), 2, sum(lengths)
    q, k, v = (x.requires_grad_() for x in qkv(gen, 1, T, H, shape))
    start = random_state(gen, S, H, shape) if carried else BLAState.zeros(S, H, shape.N, shape.K, shape.V, F64)
    X0, Y0 = (x.clone().requires_grad_() for x in start[:2])
    cu = offsets(lengths, offset_dtype)
    wo, wx, wy = (random_tensor(gen, *x.shape) for x in (v, X0, Y0))
    o, final = blurry_window_attention(
        q, k, v, **args(shape), initial_state=BLAState(X0, Y0, start.seen), output_final_state=True, cu_seqlens=cu
    )
    loss = (o * wo).sum() + (final.key_state * wx).sum() + (final.value_state * wy).sum()
    grads = torch.autograd.grad(loss, (q, k, v, X0, Y0))
    separate_loss = 0.0
    for s in range(S):
        a, b = cu[s].item(), cu[s + 1].item()
        o_s, final_s = blurry_window_attention(
            q[:, a:b], k[:, a:b], v[:, a:b], **args(shape),
            initial_state=BLAState(X0[s:s + 1], Y0[s:s + 1], start.seen[s:s + 1]), output_final_state=True,
        )
        assert max_rel_err(o[:, a:b], o_s) <= 1e-10
        assert_states_close(BLAState(*(x[s:s + 1] for x in final[:3])), final_s, 1e-10, f"sequence {s}")
        separate_loss = separate_loss + (o_s * wo[:, a:b]).sum() + (final_s.key_state * wx[s:s + 1]).sum()
        separate_loss = separate_loss + (final_s.value_state * wy[s:s + 1]).sum()
    expected = torch.autograd.grad(separate_loss, (q, k, v, X0, Y0), allow_unused=True)
    for name, g, e in zip("q k v X0 Y0".split(), grads, expected):
        e = torch.zeros_like(g) if e is None else e  # T = 0: nothing reaches q, k, v
        assert max_rel_err(g, e) <= 1e-10, name


# --- GQA ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [2, 3])
@settings(max_examples=5)
@given(T=st.integers(1, 150), seed=st.integers(0, 2**31 - 1), carried=st.booleans())
def test_gqa_equals_repeated_key_value_heads(group, T, seed, carried):
    """Output, final state and every gradient; k and v gradients are the group sums of the repeated call's."""
    shape = SHAPES["M>N"]
    gen = torch.Generator().manual_seed(seed)
    H = 2
    q, k, v = (x.requires_grad_() for x in qkv(gen, 2, T, H, shape, group=group))
    start = random_state(gen, 2, H, shape) if carried else None
    o, final = blurry_window_attention(q, k, v, **args(shape), initial_state=start, output_final_state=True)
    k_rep, v_rep = (x.repeat_interleave(group, dim=2) for x in (k, v))
    start_rep = None if start is None else BLAState(*(x.repeat_interleave(group, dim=1) for x in start[:2]), start.seen)
    o_rep, final_rep = blurry_window_attention(
        q, k_rep, v_rep, **args(shape), initial_state=start_rep, output_final_state=True
    )
    assert max_rel_err(o, o_rep) <= 1e-10
    assert_states_close(final, BLAState(*(x[:, ::group] for x in final_rep[:2]), final_rep.seen), 1e-10)
    weight = random_tensor(gen, *o.shape)
    grads = torch.autograd.grad((o * weight).sum() + final.key_state.square().sum(), (q, k, v))
    # the repeated call's key state gradient is the group's: square of the shared state, once per group
    rep_loss = (o_rep * weight).sum() + final_rep.key_state[:, ::group].square().sum()
    dq, dk_rep, dv_rep = torch.autograd.grad(rep_loss, (q, k, v))
    assert max_rel_err(grads[0], dq) <= 1e-10
    assert max_rel_err(grads[1], dk_rep) <= 1e-10 and max_rel_err(grads[2], dv_rep) <= 1e-10


# --- gradients into the initial state -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=str)
@settings(max_examples=6)
@given(T=st.integers(0, 150), seed=st.integers(0, 2**31 - 1), max_seen=st.sampled_from([0, 10, 40]))
def test_state_gradients_match_reference(dtype, T, seed, max_seen):
    """d/dX0, d/dY0 (and d/dq, d/dk, d/dv) of a loss on o and the final state, against autograd through the
    float64 recurrent definition; T = 0 passes the state straight through."""
    shape = SHAPES["M==W>N"]
    gen = torch.Generator().manual_seed(seed)
    q, k, v = qkv(gen, 2, T, 2, shape, dtype)
    start = random_state(gen, 2, 2, shape, dtype, max_seen)
    wo, wx, wy = (random_tensor(gen, *x.shape) for x in (v, start.key_state, start.value_state))

    def loss(q, k, v, X0, Y0, fn, cast):
        o, (X, Y, *_) = fn(q, k, v, initial_state=(X0, Y0, start.seen))
        return (cast(o) * wo).sum() + (cast(X) * wx).sum() + (cast(Y) * wy).sum()

    def op(q, k, v, initial_state):
        o, state = blurry_window_attention(
            q, k, v, **args(shape), initial_state=BLAState(*initial_state), output_final_state=True
        )
        return o, state

    def reference(q, k, v, initial_state):
        return bla_recurrent(q, k, v, **args(shape), initial_state=initial_state, output_final_state=True)

    inputs = [x.clone().requires_grad_() for x in (q, k, v, *start[:2])]
    grads = torch.autograd.grad(loss(*inputs, op, lambda x: x.to(F64)), inputs)
    inputs64 = [x.detach().to(F64).requires_grad_() for x in inputs]
    expected = torch.autograd.grad(loss(*inputs64, reference, lambda x: x), inputs64, allow_unused=True)
    for name, g, e in zip("q k v X0 Y0".split(), grads, expected):
        e = torch.zeros_like(inputs64[0] if g is None else g, dtype=F64) if e is None else e
        assert max_rel_err(g, e) <= TOL[dtype], name


# --- the ops with states and offsets ------------------------------------------------------------------------


def op_inputs(shape, lengths=None, requires_grad=False, T=70, output_final_state=True):
    gen = torch.Generator().manual_seed(0)
    S = 2 if lengths is None else len(lengths)
    T = T if lengths is None else sum(lengths)
    q, k, v = (x.requires_grad_(requires_grad) for x in qkv(gen, 2 if lengths is None else 1, T, 2, shape, torch.float32))
    start = random_state(gen, S, 2, shape, torch.float32)
    initial = torch.cat(start[:2], dim=-1).requires_grad_(requires_grad)
    cu = None if lengths is None else offsets(lengths)
    return (q, k, v, initial, start.seen, cu, output_final_state, shape.W, shape.N, shape.M, 0.3, 64)


@pytest.mark.parametrize("output_final_state", [True, False], ids=["final", "no_final"])
@pytest.mark.parametrize("lengths", [None, [0, 70, 1, 64]], ids=["batch", "packed"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck_with_states(lengths, requires_grad, output_final_state):
    inputs = op_inputs(SHAPES["M>N"], lengths, requires_grad, output_final_state=output_final_state)
    torch.library.opcheck(torch.ops.bla_tvm.forward, inputs)


def test_no_final_state_is_not_computed():
    """Without output_final_state the final-state kernels do not run, forward or backward, and the initial
    state's gradient is still exact."""
    shape = SHAPES["M>N"]
    gen = torch.Generator().manual_seed(3)
    q, k, v = (x.requires_grad_() for x in qkv(gen, 2, 70, 2, shape))
    start = random_state(gen, 2, 2, shape)
    X0 = start.key_state.clone().requires_grad_()
    with record_launches() as launched:
        o, final = blurry_window_attention(q, k, v, **args(shape), initial_state=start._replace(key_state=X0))
        assert final is None
        grads = torch.autograd.grad(o.square().sum(), (q, X0))
    names = [launch.kernel.kernel.name for launch in launched]
    assert sorted(names) == sorted(kernels.names("forward", False) + kernels.names("backward", False))
    ref = bla_recurrent(q, k, v, **args(shape), initial_state=(X0, start.value_state, start.seen))
    expected = torch.autograd.grad(ref.square().sum(), (q, X0))
    assert all(max_rel_err(g, e) <= 1e-10 for g, e in zip(grads, expected))


def test_fresh_calls_read_one_shared_zero_state_that_stays_zero():
    """Fresh sequences start from a view of one zero buffer per (device, dtype) (no allocation per call): a call
    under inference mode, then a training call, then a larger batch all equal the float64 definition from zeros;
    the buffer is still all zeros, grew to the largest state, and is a normal tensor (autograd accepts it)."""
    from bla_tvm.state import _ZERO_BUFFERS

    shape = SHAPES["M>N"]
    gen = torch.Generator().manual_seed(4)
    _ZERO_BUFFERS.clear()
    for batch, mode in ((2, "inference"), (2, "training"), (3, "inference")):
        q, k, v = qkv(gen, batch, 70, 2, shape)
        if mode == "inference":
            with torch.inference_mode():
                o, _ = blurry_window_attention(q, k, v, **args(shape))
        else:
            q.requires_grad_()
            o, _ = blurry_window_attention(q, k, v, **args(shape))
            o.square().sum().backward()
            assert torch.isfinite(q.grad).all()
        ref = bla_recurrent(*(x.detach().double() for x in (q, k, v)), **args(shape))
        assert max_rel_err(o.detach(), ref) <= TOL[q.dtype], (batch, mode)
    (key, buffer), = _ZERO_BUFFERS.items()
    assert key == (torch.device("cpu"), F64) and not buffer.is_inference()
    assert buffer.numel() == 3 * 2 * shape.N * (shape.K + shape.V) and not buffer.any()


def test_compiled_graph_with_states_and_offsets():
    """torch.compile(fullgraph=True) through a loss on o and the final state, packed sequences."""
    shape = SHAPES["M>N"]
    q, k, v, initial, seen, cu, *_ = op_inputs(shape, [30, 0, 45], requires_grad=True)
    K = shape.K

    def step(q, k, v, X0, Y0):
        o, state = blurry_window_attention(
            q, k, v, **args(shape), initial_state=BLAState(X0, Y0, seen), output_final_state=True, cu_seqlens=cu
        )
        return o.square().sum() + state.key_state.sum() + state.value_state.square().sum()

    inputs = [q, k, v, initial[..., :K].detach().clone().requires_grad_(), initial[..., K:].detach().clone().requires_grad_()]
    eager = torch.autograd.grad(step(*inputs), inputs)
    compiled = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(*inputs), inputs)
    for g, e in zip(compiled, eager):
        assert torch.equal(g, e)


# --- validation ---------------------------------------------------------------------------------------------


def _state(S=2, H=2, shape=SHAPES["M>N"], dtype=torch.float32, **replace):
    state = BLAState.zeros(S, H, shape.N, shape.K, shape.V, dtype)
    return state._replace(**replace)


BAD_STATES = [
    pytest.param(lambda: torch.zeros(2, 2, 7, 112), TypeError, r"^initial_state must be a BLAState", id="tensor"),
    pytest.param(lambda: _state()[:2], TypeError, r"^initial_state must be a BLAState .* of length 2", id="pair"),
    pytest.param(lambda: _state(S=3), ValueError, r"^initial_state.key_state must have shape \[2, 2, 7, 40\]", id="S"),
    pytest.param(lambda: _state(H=4), ValueError, r"^initial_state.key_state must have shape", id="H"),
    pytest.param(lambda: _state(value_state=torch.zeros(2, 2, 7, 40)), ValueError,
                 r"^initial_state.value_state must have shape \[2, 2, 7, 72\]", id="V"),
    pytest.param(lambda: _state(dtype=F64), TypeError, r"^initial_state.key_state must have dtype in \[torch.float32\]",
                 id="float64-state"),
    pytest.param(lambda: _state(dtype=torch.bfloat16), TypeError, r"^initial_state.key_state must have dtype",
                 id="bfloat16-state"),
    pytest.param(lambda: _state(seen=torch.zeros(2)), TypeError, r"^initial_state.seen must be int32 or int64",
                 id="float-seen"),
    pytest.param(lambda: _state(seen=torch.tensor([0, -1])), ValueError, r"^initial_state.seen must be >= 0",
                 id="negative-seen"),
    pytest.param(lambda: _state(seen=[0, 0]), TypeError, r"^initial_state.seen must be a torch.Tensor", id="list-seen"),
    pytest.param(lambda: _state(key_state=torch.zeros(2, 2, 7, 40, device="meta")), ValueError,
                 r"^initial_state.key_state must be on cpu", id="device"),
]


@pytest.mark.parametrize("make,error,match", BAD_STATES)
def test_bad_initial_state_rejected(make, error, match):
    q, k, v = op_inputs(SHAPES["M>N"])[:3]
    with pytest.raises(error, match=match):
        blurry_window_attention(q, k, v, **args(SHAPES["M>N"]), initial_state=make())


BAD_OFFSETS = [
    pytest.param(lambda T: [0, T], 2, ValueError, r"^with cu_seqlens, q, k and v must have batch size 1", id="B=2"),
    pytest.param(lambda T: torch.tensor([0.0, T]), 1, TypeError, r"^cu_seqlens must be int32 or int64", id="float"),
    pytest.param(lambda T: torch.tensor([[0, T]]), 1, ValueError, r"^cu_seqlens must be 1-D with at least 2", id="2-D"),
    pytest.param(lambda T: torch.tensor([0]), 1, ValueError, r"^cu_seqlens must be 1-D with at least 2", id="one"),
    pytest.param(lambda T: torch.tensor([1, T]), 1, ValueError, r"^cu_seqlens must start at 0 and end at T", id="start"),
    pytest.param(lambda T: torch.tensor([0, T + 1]), 1, ValueError, r"^cu_seqlens must start at 0 and end at T = 70",
                 id="past-end"),
    pytest.param(lambda T: torch.tensor([0, 40, 20, T]), 1, ValueError, r"^cu_seqlens must be non-decreasing",
                 id="unsorted"),
    pytest.param(lambda T: [0, T], 1, TypeError, r"^cu_seqlens must be a torch.Tensor", id="list"),
]


@pytest.mark.parametrize("make,batch,error,match", BAD_OFFSETS)
def test_bad_offsets_rejected(make, batch, error, match):
    q, k, v = (x[:batch] if batch == 1 else x for x in op_inputs(SHAPES["M>N"])[:3])
    cu = make(q.shape[1])
    if batch == 2:
        cu = torch.tensor(cu, dtype=torch.int32)
    with pytest.raises(error, match=match):
        blurry_window_attention(q, k, v, **args(SHAPES["M>N"]), cu_seqlens=cu)


def test_output_final_state_must_be_bool():
    q, k, v = op_inputs(SHAPES["M>N"])[:3]
    with pytest.raises(TypeError, match=r"^output_final_state must be a bool, got int"):
        blurry_window_attention(q, k, v, **args(SHAPES["M>N"]), output_final_state=1)


# --- what a state records, and how far it counts -------------------------------------------------------------


def test_a_state_records_its_window_and_another_window_refuses_it():
    """The state is specific to the window W (the shift it was built with): a call with another W (same N, so
    every shape matches) refuses it, naming its window, in the chunked op and in decode_step. Regression: it was
    accepted silently."""
    from bla_tvm import decode_step

    shape = SHAPES["M>N"]
    q, k, v = qkv(torch.Generator().manual_seed(4), 2, 20, 2, shape)
    _, state = blurry_window_attention(q, k, v, **args(shape), output_final_state=True)
    assert state.window == shape.W
    other = dict(args(shape), window=shape.W + 1)
    with pytest.raises(ValueError, match=rf"^initial_state.window must be this call's window \({shape.W + 1}\)"):
        blurry_window_attention(q, k, v, **other, initial_state=state)
    with pytest.raises(ValueError, match=rf"^state.window must be this call's window \({shape.W + 1}\).*{shape.W}"):
        decode_step(q[:, 0], k[:, 0], v[:, 0], state, **other)
    _, new = decode_step(q[:, 0], k[:, 0], v[:, 0], state, **args(shape))
    assert new.window == shape.W
    blurry_window_attention(q, k, v, **other, initial_state=state._replace(window=None))  # not recorded: trusted


def test_tokens_seen_past_int64_are_refused():
    """seen + the call's tokens must fit int64: refused, naming initial_state.seen, instead of wrapping to a
    negative count."""
    shape = SHAPES["M>N"]
    q, k, v = qkv(torch.Generator().manual_seed(5), 2, 20, 2, shape, dtype=torch.float32)
    start = _state(seen=torch.tensor([0, 2**63 - 21]))
    _, state = blurry_window_attention(q, k, v, **args(shape), initial_state=start, output_final_state=True)
    assert state.seen.tolist() == [20, 2**63 - 1]
    with pytest.raises(ValueError, match=r"^initial_state.seen must be <= 2\^63 - 1 - 20"):
        blurry_window_attention(q, k, v, **args(shape), initial_state=_state(seen=torch.tensor([0, 2**63 - 20])))
