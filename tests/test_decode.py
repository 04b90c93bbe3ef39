"""The compiled one-token decode step (``bla_tvm.decode_step``) and the prefill-then-decode helper (``generate``),
on the CPU, against the float64 recurrent definition (``bla_recurrent``), stepping token by token from zeros.

Each (W, N, M, K, V, dtype, G, state dtype) compiles one kernel, so shapes come from a small fixed pool and
hypothesis varies what the kernel is not specialised on (B, H, T, scale, data).
"""

import pytest
import torch
from helpers import KERNEL_POOL, BLACase, assert_close, assert_within_float32_logit_bound, make_qkv, pooled_cases
from hypothesis import given, settings
from hypothesis import strategies as st

from bla_tvm import (
    BLAParams,
    DecodeGraph,
    InPlaceSteps,
    bla_recurrent,
    blurry_window_attention,
    decode_step,
    generate,
)
from bla_tvm.constants import bla_constants
from bla_tvm.state import BLAState

F64 = torch.float64
#: N == W == M with even W (the Nyquist row), odd W with K != V, W = 1, M > N, M < N, M == W > N
SHAPES = [KERNEL_POOL[i] for i in (0, 1, 2, 4, 5, 6)]


def decode_all(q, k, v, case: BLACase, state=None, state_dtype=None):
    """Decode q, k, v [B, T, H*, D] one token at a time; returns (o [B, T, HQ, V], final state)."""
    outputs = []
    for t in range(q.shape[1]):
        o, state = decode_step(
            q[:, t], k[:, t], v[:, t], state, case.W, case.N, case.M, case.scale,
            state_dtype=state_dtype if state is None else None,
        )  # fmt: skip
        outputs.append(o)
    return torch.stack(outputs, dim=1), state


def reference_state(k, v, case: BLACase) -> tuple[torch.Tensor, torch.Tensor]:
    """X_T, Y_T [B, H, N, D] by the recurrence X_t = A X_{t-1} + b k_t^T, in float64."""
    c = bla_constants(BLAParams(case.W, case.N, case.M))
    k, v = (x.to(F64).transpose(1, 2) for x in (k, v))  # [B, H, T, D]
    X = k.new_zeros(*k.shape[:2], case.N, k.shape[-1])
    Y = v.new_zeros(*v.shape[:2], case.N, v.shape[-1])
    for t in range(k.shape[2]):
        X = c.A @ X + c.b[:, None] * k[:, :, t, None, :]
        Y = c.A @ Y + c.b[:, None] * v[:, :, t, None, :]
    return X, Y


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
@settings(max_examples=3)
@given(data=st.data())
def test_decode_from_zeros_matches_recurrent(shape, dtype, tol, data):
    """Outputs and the final state, T from 1 to past 2W (the mask while T < W, a full window after)."""
    case = data.draw(pooled_cases(shape, max_T=2 * shape.W + 5, max_B=2, max_H=2))
    q, k, v = make_qkv(case, dtype)
    o, state = decode_all(q, k, v, case)
    assert o.dtype == dtype
    assert_close(o, bla_recurrent(q, k, v, case.W, case.N, case.M, case.scale), tol, "o")
    X, Y = reference_state(k, v, case)
    assert_close(state.key_state, X, tol, "key_state")
    assert_close(state.value_state, Y, tol, "value_state")
    assert state.key_state.dtype == dtype and state.seen.tolist() == [case.T] * case.B


@pytest.mark.parametrize("group", [2, 3])
@settings(max_examples=3)
@given(data=st.data())
def test_gqa_equals_repeated_kv(group, data):
    """q with H * G heads against k, v with H: the same as the call with k, v repeated G times per head."""
    shape = KERNEL_POOL[4]  # M > N, K = 40, V = 72
    case = data.draw(pooled_cases(shape, max_T=20, max_B=2, max_H=2))
    gen = torch.Generator().manual_seed(case.seed)
    q = torch.randn(case.B, case.T, case.H * group, case.K, generator=gen)
    _, k, v = make_qkv(case, torch.float32)
    o, state = decode_all(q, k, v, case)
    k_rep, v_rep = (x.repeat_interleave(group, dim=2) for x in (k, v))
    o_rep, state_rep = decode_all(q, k_rep, v_rep, case)
    assert_close(o, o_rep, 1e-6, "o")
    assert_close(state.key_state, state_rep.key_state[:, ::group], 1e-6, "key_state")
    assert_close(o, bla_recurrent(q, k_rep, v_rep, case.W, case.N, case.M, case.scale), 1e-5, "o vs reference")


@pytest.mark.parametrize("magnitude", [1e5, 1e6])
def test_large_finite_logits_give_a_finite_softmax(magnitude):
    """|scale q k| up to ~1e13, scale no power of two: each step's output is finite and within the float32-logit
    bound of the definition. Regression: the step's maximum read rounded logits while its exponent fused the
    unrounded product into the subtraction (inf / inf = NaN)."""
    case = BLACase(W=16, N=7, M=9, T=40, L=1, B=2, H=2, K=40, V=72, scale=0.3, seed=15)
    q, k, v = make_qkv(case, torch.float32)
    q, k = q * magnitude, k * magnitude
    o, _ = decode_all(q, k, v, case)
    assert torch.isfinite(o).all(), f"{(~torch.isfinite(o)).sum().item()} non-finite outputs"
    assert_within_float32_logit_bound(o, q, k, v, case, 1e-5)


@pytest.mark.parametrize("state_dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_reduced_precision_state_within_1e_2(state_dtype):
    """The state kept in 16 bits: relative error of all outputs (Frobenius) within 1e-2 over 4 windows.

    The rounding error of one step lives as long as the window remembers it, so it grows like sqrt(W) ulp:
    W = 64 here; the GPU script checks W = 512 over 4,096 tokens.
    """
    case = BLACase(W=64, N=15, M=15, T=256, L=1, B=2, H=2, K=16, V=16, scale=None, seed=7)
    q, k, v = make_qkv(case, torch.float32)
    o, state = decode_all(q, k, v, case, state_dtype=state_dtype)
    assert state.key_state.dtype == state.value_state.dtype == state_dtype
    ref = bla_recurrent(q, k, v, case.W, case.N, case.M)
    err = ((o.to(F64) - ref).norm() / ref.norm()).item()
    assert err <= 1e-2, f"{state_dtype} state: relative error {err:.2e}"


def test_decode_continues_a_given_state_and_leaves_it_unchanged():
    """A step reads the state and returns a new one: the old tensors keep their values, and decoding on from
    the middle gives what decoding from the start gives."""
    case = BLACase(W=12, N=5, M=12, T=30, L=1, B=2, H=3, K=16, V=24, scale=0.3, seed=3)
    q, k, v = make_qkv(case, torch.float32)
    o_all, state_all = decode_all(q, k, v, case)
    o_head, middle = decode_all(q[:, :11], k[:, :11], v[:, :11], case)
    kept = [x.clone() for x in middle[:3]]
    o_tail, state = decode_all(q[:, 11:], k[:, 11:], v[:, 11:], case, state=middle)
    for before, after in zip(kept, middle[:3]):
        assert torch.equal(before, after)
    assert_close(torch.cat([o_head, o_tail], dim=1), o_all, 1e-6, "o")
    assert_close(state.key_state, state_all.key_state, 1e-6, "key_state")


def test_fla_layout_with_a_token_axis():
    """q [B, 1, HQ, K] (FLA's layout with T = 1) gives o [B, 1, HQ, V]."""
    case = BLACase(W=9, N=5, M=3, T=1, L=1, B=2, H=2, K=6, V=6, scale=None, seed=1)
    q, k, v = make_qkv(case, torch.float32)
    o4, state4 = decode_step(q, k, v, None, 9, 5, 3)
    o3, state3 = decode_step(q[:, 0], k[:, 0], v[:, 0], None, 9, 5, 3)
    assert o4.shape == (2, 1, 2, 6) and torch.equal(o4[:, 0], o3)
    assert torch.equal(state4.key_state, state3.key_state)


@pytest.mark.parametrize("token_axis", [False, True], ids=["BHD", "B1HD"])
def test_generate_prefill_then_decode_equals_the_recurrence(token_axis):
    """generate: the prompt through the chunked kernels, then token by token; together, one sequence. next_token
    may return each token with or without a token axis of 1."""
    case = BLACase(W=16, N=7, M=9, T=50, L=64, B=2, H=2, K=8, V=8, scale=None, seed=11)
    q, k, v = make_qkv(case, torch.float32)
    prompt = 37

    def next_token(o, i):
        assert o.shape == (case.B, case.H, case.V)
        t = prompt + i
        return (q[:, t : t + 1], k[:, t : t + 1], v[:, t : t + 1]) if token_axis else (q[:, t], k[:, t], v[:, t])

    o_prompt, o_new, state = generate(
        q[:, :prompt], k[:, :prompt], v[:, :prompt], case.W, case.N, case.M,
        next_token=next_token, max_new_tokens=case.T - prompt,
    )  # fmt: skip
    ref = bla_recurrent(q, k, v, case.W, case.N, case.M)
    assert_close(torch.cat([o_prompt, o_new], dim=1), ref, 1e-5, "o")
    assert state.seen.tolist() == [case.T] * case.B
    X, _ = reference_state(k, v, case)
    assert_close(state.key_state, X, 1e-5, "key_state")
    o_full, _ = blurry_window_attention(q, k, v, case.W, case.N, case.M)
    assert_close(torch.cat([o_prompt, o_new], dim=1), o_full, 1e-5, "o vs one chunked call")


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_in_place_step_equals_the_functional_step(state_dtype):
    """in_place writes X', Y' over the state's own tensors and adds 1 to its seen: the values of the functional
    step, token after token (mask open and closed: seen from 0 past W)."""
    case = BLACase(W=12, N=5, M=7, T=20, L=1, B=2, H=2, K=8, V=12, scale=None, seed=4)
    q, k, v = make_qkv(case, torch.float32)
    state = BLAState.zeros(case.B, case.H, case.N, case.K, case.V, state_dtype)
    functional = state
    tensors = tuple(state)
    for t in range(case.T):
        o, functional = decode_step(q[:, t], k[:, t], v[:, t], functional, case.W, case.N, case.M)
        o_in, state = decode_step(q[:, t], k[:, t], v[:, t], state, case.W, case.N, case.M, in_place=True)
        assert torch.equal(o_in, o)
    assert all(a is b for a, b in zip(state[:3], tensors))
    assert torch.equal(state.key_state, functional.key_state)
    assert torch.equal(state.value_state, functional.value_state)
    assert state.seen.tolist() == functional.seen.tolist() == [case.T] * case.B


def test_in_place_step_compiles_into_one_graph():
    """torch.compile(fullgraph=True) over an in-place step (the mutating op, its fake) updates the state as eager
    does."""
    q, k, v = _token(HQ=4)
    state = BLAState(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3), torch.tensor([3, 40]))
    eager, compiled = (BLAState(*(x.clone() for x in state[:3])) for _ in range(2))

    def step(q, k, v, X, Y, seen):
        o, _ = decode_step(q, k, v, BLAState(X, Y, seen), 9, 5, 3, 0.5, in_place=True)
        return o * 2

    o = step(q, k, v, *eager[:3])
    o_compiled = torch.compile(step, fullgraph=True)(q, k, v, *compiled[:3])
    assert torch.equal(o, o_compiled)
    assert all(torch.equal(a, b) for a, b in zip(eager[:3], compiled[:3]))
    assert compiled.seen.tolist() == [4, 41]


def test_generate_leaves_the_initial_state_unchanged():
    """generate decodes in place into its own copy of the state: the caller's initial_state keeps its values, also
    after an empty prompt (whose prefill passes the state through)."""
    case = BLACase(W=16, N=7, M=9, T=10, L=64, B=2, H=2, K=8, V=8, scale=None, seed=12)
    q, k, v = make_qkv(case, torch.float32)
    initial = BLAState(torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 8), torch.tensor([5, 30]))
    kept = [x.clone() for x in initial[:3]]
    _, o_new, state = generate(q[:, :0], k[:, :0], v[:, :0], case.W, case.N, case.M, initial_state=initial,
                               next_token=lambda o, i: (q[:, i], k[:, i], v[:, i]), max_new_tokens=case.T)  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(initial[:3], kept))
    o_ref, state_ref = decode_all(q, k, v, case, state=initial)
    assert_close(o_new, o_ref, 1e-6, "o")
    assert_close(state.key_state, state_ref.key_state, 1e-6, "key_state")
    assert state.seen.tolist() == [15, 40]


# --- validation: every bad argument raises an error that names it (no kernel is compiled) ----------------


def _token(B=2, HQ=2, H=2, K=4, V=3, dtype=torch.float32):
    return torch.randn(B, HQ, K, dtype=dtype), torch.randn(B, H, K, dtype=dtype), torch.randn(B, H, V, dtype=dtype)


def _bad_state(**change):
    state = BLAState.zeros(2, 2, 5, 4, 3)._asdict()
    state.update(change)
    return BLAState(**state)


@pytest.mark.parametrize(
    "args, kwargs, error, words",
    [
        ((torch.randn(2, 4),) + _token()[1:], {}, ValueError, "q must have shape"),
        ((torch.randn(2, 3, 2, 4),) + _token()[1:], {}, ValueError, "one token"),
        (("x",) + _token()[1:], {}, TypeError, "q must be a torch.Tensor"),
        (_token()[:1] + (torch.randn(2, 2, 4, dtype=F64), _token()[2]), {}, TypeError, "one dtype"),
        (_token(HQ=3), {}, ValueError, "multiple of k's heads"),
        (_token()[:2] + (torch.randn(2, 3, 3),), {}, ValueError, "v must have the heads H"),
        (_token()[:2] + (torch.randn(3, 2, 3),), {}, ValueError, "batch size"),
        ((torch.randn(2, 2, 5),) + _token()[1:], {}, ValueError, "head dim K"),
        (_token(), {"resolution": 4}, ValueError, "resolution"),
        (_token(), {"num_slots": 0}, ValueError, "num_slots"),
        (_token(), {"window": 0}, ValueError, "window"),
        (_token(), {"scale": float("inf")}, ValueError, "scale"),
        (_token(), {"state": "zeros"}, TypeError, "state must be a BLAState"),
        (_token(), {"state": _bad_state(key_state=torch.zeros(2, 2, 5, 5))}, ValueError, "state.key_state"),
        (_token(), {"state": _bad_state(value_state=torch.zeros(2, 2, 5, 3, dtype=F64))}, TypeError,
         "state.value_state"),
        (_token(), {"state": _bad_state(value_state=torch.zeros(2, 2, 5, 3, dtype=torch.float16))}, TypeError,
         "share one dtype"),
        (_token(), {"state": _bad_state(seen=torch.tensor([0, -1]))}, ValueError, "state.seen"),
        (_token(), {"state": _bad_state(seen=torch.zeros(2))}, TypeError, "state.seen"),
        (_token(), {"state": BLAState.zeros(2, 2, 5, 4, 3), "state_dtype": torch.float16}, ValueError,
         "state_dtype"),
        (_token(), {"state_dtype": torch.int32}, TypeError, "state_dtype"),
        (_token(), {"in_place": True}, ValueError, "in_place needs a state"),
        (_token(), {"state": _bad_state(key_state=torch.zeros(2, 2, 4, 5).transpose(2, 3)), "in_place": True},
         ValueError, "state.key_state contiguous"),
        (_token(), {"state": _bad_state(seen=torch.zeros(2, dtype=torch.int32)), "in_place": True}, TypeError,
         "state.seen of dtype int64"),
    ],
)
def test_bad_inputs_raise_naming_the_argument(args, kwargs, error, words):
    kwargs = {"state": None, "window": 9, "resolution": 5, **kwargs}
    with pytest.raises(error, match=words):
        decode_step(*args, **kwargs)


def test_generate_validates_its_own_arguments():
    q, k, v = (torch.randn(1, 4, 2, 4) for _ in range(3))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(q, k, v, 9, 5, max_new_tokens=-1)
    with pytest.raises(TypeError, match="next_token"):
        generate(q, k, v, 9, 5, max_new_tokens=2)
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA inputs"):
        generate(q, k, v, 9, 5, cuda_graph=True)
    with pytest.raises(TypeError, match="cuda_graph must be"):
        generate(q, k, v, 9, 5, cuda_graph="yes")


def test_decode_graph_validates_its_state():
    with pytest.raises(TypeError, match="state must be a BLAState"):
        DecodeGraph((1, 2, 3), 9, 5)
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraph(BLAState.zeros(2, 2, 5, 4, 3), 9, 5)


def test_generate_names_next_token_when_it_returns_a_wrong_token():
    """next_token's q, k, v must continue the prompt (its B, HQ, H, K, V, dtype, device): a wrong one is an error
    naming next_token and the tensor. Regression: a k with the wrong heads was blamed on state.key_state."""
    q, k, v = (torch.randn(1, 4, 2, 4) for _ in range(3))

    def wrong_heads(o, i):
        return torch.randn(1, 2, 4), torch.randn(1, 1, 4), torch.randn(1, 1, 4)

    with pytest.raises(ValueError, match=r"^next_token\(o, 0\) returned k of shape \[1, 1, 4\]; expected \[1, 2, 4\]"):
        generate(q, k, v, 9, 5, next_token=wrong_heads, max_new_tokens=2)
    with pytest.raises(TypeError, match=r"^next_token\(o, 0\) must return \(q, k, v\)"):
        generate(q, k, v, 9, 5, next_token=lambda o, i: torch.randn(1, 2, 4), max_new_tokens=1)
    with pytest.raises(TypeError, match=r"^next_token\(o, 0\) returned v of dtype torch.float64"):
        generate(q, k, v, 9, 5, next_token=lambda o, i: (*torch.randn(2, 1, 2, 4), torch.randn(1, 2, 4).double()),
                 max_new_tokens=1)  # fmt: skip


def test_seen_near_int64_max_masks_nothing_and_cannot_wrap():
    """A state that has seen 2^62 tokens decodes like any state past its window (the kernel's mask i W > t M
    no longer overflows int64); one that has seen 2^63 - 1 is refused (seen + 1 would wrap)."""
    q, k, v = _token()
    X, Y = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)
    o, new = decode_step(q, k, v, BLAState(X, Y, torch.tensor([2**62, 2**62])), 9, 5, 3, 0.5)
    o_window, _ = decode_step(q, k, v, BLAState(X, Y, torch.tensor([9, 9])), 9, 5, 3, 0.5)
    assert torch.equal(o, o_window) and new.seen.tolist() == [2**62 + 1] * 2
    with pytest.raises(ValueError, match=r"^state.seen must be <= 2\^63 - 1 - 1"):
        decode_step(q, k, v, BLAState(X, Y, torch.tensor([0, 2**63 - 1])), 9, 5, 3, 0.5)


def test_negative_seen_is_refused_under_torch_compile():
    """On the CPU the op checks seen itself, so a compiled step refuses a negative count as an eager one does.
    Regression: the compiled step skipped the check and masked every slot (NaN outputs)."""
    q, k, v = _token()
    X, Y = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3)

    def step(q, k, v, X, Y, seen):
        return decode_step(q, k, v, BLAState(X, Y, seen), 9, 5, 3, 0.5)[0]

    compiled = torch.compile(step, fullgraph=True, backend="eager")
    with pytest.raises(ValueError, match=r"state.seen must be >= 0"):
        compiled(q, k, v, X, Y, torch.tensor([3, -2]))

def test_eager_path_equals_the_op():
    """Eager inference runs the op's implementation directly; the registered op gives the same result."""
    q, k, v = _token(HQ=4)
    state = BLAState(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3), torch.tensor([3, 40]))
    o, new = decode_step(q, k, v, state, 9, 5, 3, 0.5)
    o_op, key_op, value_op = torch.ops.bla_tvm.decode_step(q, k, v, *state[:3], 9, 5, 3, 0.5)
    assert torch.equal(o, o_op) and torch.equal(new.key_state, key_op) and torch.equal(new.value_state, value_op)
    assert new.seen.tolist() == [4, 41]


def test_decode_step_compiles_into_one_graph():
    """torch.compile(fullgraph=True) over a step (the op, its fake, no data-dependent checks) gives eager's result."""
    q, k, v = _token(HQ=4)
    state = BLAState(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3), torch.tensor([3, 40]))

    def step(q, k, v, X, Y, seen):
        o, new = decode_step(q, k, v, BLAState(X, Y, seen), 9, 5, 3, 0.5)
        return o * 2, new.key_state, new.value_state, new.seen

    eager = step(q, k, v, *state[:3])
    compiled = torch.compile(step, fullgraph=True)(q, k, v, *state[:3])
    assert all(torch.equal(a, b) for a, b in zip(eager, compiled))


@pytest.mark.parametrize("op", ["decode_step", "decode_step_"], ids=["functional", "in-place"])
def test_op_passes_opcheck(op):
    """torch.ops.bla_tvm.decode_step and its in-place twin: schema (the declared mutations), fake tensor and
    dispatch checks."""
    q, k, v = _token(HQ=4)
    state = BLAState(torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 3), torch.tensor([0, 7]))
    args = (q, k, v, state.key_state, state.value_state, state.seen, 9, 5, 3, 0.5)
    torch.library.opcheck(getattr(torch.ops.bla_tvm, op), args)


@pytest.mark.parametrize("state_dtype", [None, torch.float16], ids=["fp32", "fp16"])
def test_generate_launches_one_kernel_per_token_equal_to_decode_steps(state_dtype):
    """generate's steps (``decode.InPlaceSteps``): the first a checked in-place ``decode_step``, each next one a
    single launch of its kernel reading the token where it is and writing o into the result. They equal a loop of
    functional ``decode_step`` calls bit for bit (GQA, strided tokens, a 16-bit state, seen past W), and the
    state ends with seen + tokens."""
    from bla_tvm.runtime import record_launches

    case = BLACase(W=12, N=5, M=7, T=30, L=64, B=2, H=2, K=8, V=12, scale=None, seed=5)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(case.B, case.T, 2 * case.H, case.K, generator=gen)
    k, v = (torch.randn(case.B, case.T, case.H, d, generator=gen) for d in (case.K, case.V))
    initial = BLAState(torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 12), torch.tensor([3, 40]))
    start = initial if state_dtype is None else BLAState(*(x.to(state_dtype) for x in initial[:2]), initial.seen)
    # (generate converts its prefill's float32 state to state_dtype)
    with record_launches() as launches:
        _, o_new, state = generate(q[:, :0], k[:, :0], v[:, :0], case.W, case.N, case.M, initial_state=initial,
                                   next_token=lambda o, i: (q[:, i], k[:, i], v[:, i]), max_new_tokens=case.T,
                                   state_dtype=state_dtype)  # fmt: skip
    decodes = [x for x in launches if x.kernel.kernel.name.startswith("decode_step")]
    assert len(decodes) == case.T
    expected = start
    for t in range(case.T):
        o, expected = decode_step(q[:, t], k[:, t], v[:, t], expected, case.W, case.N, case.M)
        assert torch.equal(o_new[:, t], o)
    assert all(torch.equal(a, b) for a, b in zip(state[:2], expected[:2]))
    assert state.seen.tolist() == [3 + case.T, 40 + case.T]


def test_generate_refuses_a_seen_that_its_tokens_would_overflow():
    q, k, v = _token()
    near = BLAState(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 3), torch.tensor([0, 2**63 - 4]))
    empty = (q[:, None, :, :][:, :0], k[:, None][:, :0], v[:, None][:, :0])
    with pytest.raises(ValueError, match=r"state.seen must be <= 2\^63 - 1 - 5"):
        generate(*empty, 9, 5, initial_state=near, next_token=lambda o, i: (q, k, v), max_new_tokens=5)
    _, o_new, state = generate(*empty, 9, 5, initial_state=near, next_token=lambda o, i: (q, k, v), max_new_tokens=3)
    assert state.seen.tolist() == [3, 2**63 - 1] and torch.isfinite(o_new).all()


def test_in_place_steps_refuse_a_token_unlike_the_first_and_steps_past_their_count():
    """InPlaceSteps binds the first step's shapes: a later token of another shape, dtype or device, a step past
    ``tokens`` and a step after ``finish`` are refused with errors that say so; the state then holds the steps
    taken (seen advanced by them, equal to decode_step's)."""
    q, k, v = _token()
    state = BLAState(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 3), torch.tensor([0, 7]))
    expected = BLAState(*(x.clone() for x in state[:3]))
    steps = InPlaceSteps(state, 9, 5, tokens=3)
    for _ in range(2):
        o = steps(q, k, v)
        o_ref, expected = decode_step(q, k, v, expected, 9, 5)
        assert torch.equal(o, o_ref)
    with pytest.raises(ValueError, match="first step's shapes"):
        steps(q, k[:, :1], v)
    with pytest.raises(ValueError, match="first step's shapes"):
        steps(q.double(), k, v)
    steps(q, k, v, out=torch.empty(2, 2, 3))
    with pytest.raises(ValueError, match="tokens=3"):
        steps(q, k, v)
    assert steps.finish().seen.tolist() == [3, 10]
    with pytest.raises(ValueError, match="finished"):
        steps(q, k, v)
    with pytest.raises(ValueError, match="tokens must be an int >= 1"):
        InPlaceSteps(state, 9, 5, tokens=0)
    with pytest.raises(ValueError, match=r"q must have shape \[B, HQ, K\]"):
        InPlaceSteps(state, 9, 5, tokens=2)(q[:, None], k, v)
    fresh = InPlaceSteps(state, 9, 5, tokens=2)
    for out in (torch.empty(3, 2, 2, 3), torch.empty(2, 2, 3).double(), torch.empty(2, 3, 2).transpose(1, 2)):
        with pytest.raises(ValueError, match=r"out must be a contiguous \[2, 2, 3\] tensor"):
            fresh(q, k, v, out=out)
    assert state.seen.tolist() == [3, 10]  # a refused first step left the state as it was


def test_in_place_steps_cross_table_blocks_write_unaligned_outputs_and_finish_on_leaving_with(monkeypatch):
    """Past the first SEEN_BLOCK steps the table of seen values is refilled; an out that is not 64-byte aligned
    gets o through an aligned copy; leaving the ``with`` block finishes the loop. Equal to decode_step's
    functional loop bit for bit."""
    import bla_tvm.decode

    monkeypatch.setattr(bla_tvm.decode, "SEEN_BLOCK", 2)
    gen = torch.Generator().manual_seed(8)
    tokens = [tuple(torch.randn(2, 2, d, generator=gen) for d in (4, 4, 3)) for _ in range(7)]
    state = BLAState(torch.randn(2, 2, 5, 4, generator=gen), torch.randn(2, 2, 5, 3, generator=gen),
                     torch.tensor([0, 7]))  # fmt: skip
    expected = BLAState(*(x.clone() for x in state[:3]))
    buffer = torch.empty(2 * 2 * 3 + 1)
    with InPlaceSteps(state, 9, 5, tokens=10) as steps:
        for q, k, v in tokens:
            out = buffer[1:].view(2, 2, 3)  # 4 bytes past an aligned start
            steps(q, k, v, out=out)
            o_ref, expected = decode_step(q, k, v, expected, 9, 5)
            assert torch.equal(out, o_ref)
    assert state.seen.tolist() == [7, 14]
    assert torch.equal(state.key_state, expected.key_state) and torch.equal(state.value_state, expected.value_state)


def test_in_place_steps_refuse_bad_arguments_naming_them():
    q, k, v = _token()
    state = BLAState(torch.zeros(2, 2, 5, 4), torch.zeros(2, 2, 5, 3), torch.tensor([0, 7]))
    with pytest.raises(TypeError, match="state must be a BLAState"):
        InPlaceSteps(None, 9, 5)
    with pytest.raises(TypeError, match="tokens must be an int >= 1, got float"):
        InPlaceSteps(state, 9, 5, tokens=1.5)
    with pytest.raises(ValueError, match=r"k must have shape \[B, H, K\]"):
        InPlaceSteps(state, 9, 5, tokens=2)(q, k[:, None], v)  # decode_step would take it; the steps would not
    assert state.seen.tolist() == [0, 7]
