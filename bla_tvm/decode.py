"""One-token decoding with BLA's recurrent form: ``decode_step`` (one compiled kernel per token) and ``generate``
(prefill with the chunked kernels, then token by token).

The state is returned, not updated in place: ``decode_step`` reads ``state`` and returns a new ``BLAState``
(X', Y', seen + 1); the old tensors are left as they were. Reading the old state and writing the new one is the
same memory traffic as an in-place update, and the op stays functional (``torch.compile``, CUDA graphs,
keeping a state to branch from). ``torch.ops.bla_tvm.decode_step`` is the custom op behind it (no autograd:
decoding is inference); eager calls outside autograd run its implementation directly, skipping the op's
dispatch.

Imports only torch, tvm_ffi and the package's runtime (the build layer only when a kernel is missing).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from .constants import bla_constants, partner_index
from .layer import ACCUMULATOR, DECODE_CHUNK, KernelSpec, LayerSpec, check_index_range, layer_spec
from .params import DTYPE_NAMES, BLAParams, check_scale, dtype_name
from .runtime import default_library, kernel_ready, launch
from .state import BLAState, check_seen, check_state

#: stored state dtypes besides the accumulation dtype, and the kernel that reads and writes each
REDUCED_STATE_KERNELS = {torch.float16: "decode_step_state_float16", torch.bfloat16: "decode_step_state_bfloat16"}


def decode_kernel(state_dtype: torch.dtype, acc_dtype: torch.dtype) -> str:
    """The decode kernel for a stored state dtype (a name of ``kernels.DECODE``)."""
    if state_dtype == acc_dtype:
        return "decode_step"
    return REDUCED_STATE_KERNELS[state_dtype]


@functools.lru_cache(maxsize=128)
def decode_constants(params: BLAParams, dtype: torch.dtype, device: torch.device, scale: float) -> dict:
    """The decode kernel's constants by argument name: scale [1], rot_diag [N] = R[n, n], rot_off [N] =
    R[n, partner(n)] (0 where n has no partner), basis [N] = b, removal [N] = b / W and the slot readout C
    [M, N] (slot_readout) and C^T (slot_readout_t)."""
    c = bla_constants(params)
    n = torch.arange(params.resolution)
    partner = partner_index(params.resolution)
    rot_off = torch.where(partner == n, torch.zeros((), dtype=c.R.dtype), c.R[n, partner])
    tables = {"scale": torch.tensor([scale], dtype=c.R.dtype), "rot_diag": c.R[n, n], "rot_off": rot_off,
              "basis": c.b, "removal": c.b / params.window, "slot_readout": c.C, "slot_readout_t": c.C.T}  # fmt: skip
    return {name: x.to(device=device, dtype=dtype).contiguous() for name, x in tables.items()}


@functools.lru_cache(maxsize=256)
def _decode_function(kernel: str, spec: KernelSpec, device: torch.device, library):
    """The loaded kernel, looked up once per (kernel, spec, device, library): a decode step is short, and the
    library's lookup hashes the whole cache key."""
    return library.function(kernel, spec, device)


def _decode_step_impl(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_state: torch.Tensor,
    value_state: torch.Tensor,
    seen: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [B, HQ, V], X' [B, H, N, K], Y' [B, H, N, V]) of one token: q [B, HQ, K], k [B, H, K], v [B, H, V],
    X, Y in the state dtype, seen [B] int64. Arguments validated by the caller (``bla_tvm.decode_step``) but
    seen's values, checked here on the CPU, eager or compiled (on a GPU the check would wait for the device at
    every token)."""
    if not seen.is_cuda:
        check_seen(seen, 1, "state.seen")
    B, HQ, K = q.shape
    H, V = k.shape[1], v.shape[-1]
    spec = layer_spec(window, resolution, num_slots, K, V, dtype_name(q.dtype), HQ // H).kernel(DECODE_CHUNK)
    acc = getattr(torch, spec.acc_dtype)
    check_index_range({"q": q.shape, "k": k.shape, "v": v.shape, "key_state": key_state.shape,
                       "value_state": value_state.shape, "o": (B, HQ, V)})  # fmt: skip
    kernel = _decode_function(decode_kernel(key_state.dtype, acc), spec, q.device, default_library())
    q, k, v, key_state, value_state, seen = (kernel_ready(x) for x in (q, k, v, key_state, value_state, seen))
    o = q.new_empty(B, H, HQ // H, V)
    key_out, value_out = torch.empty_like(key_state), torch.empty_like(value_state)
    consts = decode_constants(spec.params, acc, q.device, float(scale))
    if B * H:
        launch(kernel, consts, q=q.view(B, H, HQ // H, K), k=k, v=v, key_state=key_state, value_state=value_state,
               seen=seen, o=o, key_out=key_out, value_out=value_out)  # fmt: skip
    return o.view(B, HQ, V), key_out, value_out


#: the op (for torch.compile and torch.library tooling); eager inference calls ``_decode_step_impl`` directly
decode_step_op = torch.library.custom_op("bla_tvm::decode_step", _decode_step_impl, mutates_args=())


@decode_step_op.register_fake
def _(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1]), torch.empty_like(key_state), torch.empty_like(value_state)


def _check_token(name: str, x, rank3_heads: str, dim: str) -> torch.Tensor:
    """One token's tensor, [B, heads, D] or FLA's [B, 1, heads, D]: returned as [B, heads, D]."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} must hold one token: [B, {rank3_heads}, {dim}] or [B, 1, {rank3_heads}, {dim}], "
                             f"got shape {list(x.shape)}")  # fmt: skip
        x = x[:, 0]
    elif x.dim() != 3:
        raise ValueError(f"{name} must have shape [B, {rank3_heads}, {dim}] or [B, 1, {rank3_heads}, {dim}], "
                         f"got shape {list(x.shape)}")  # fmt: skip
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    return x


def _check_inputs(q, k, v):
    """q [B, HQ, K], k [B, H, K], v [B, H, V] (each optionally with a T = 1 axis), one dtype and device."""
    squeeze = isinstance(q, torch.Tensor) and q.dim() == 4
    q, k, v = _check_token("q", q, "HQ", "K"), _check_token("k", k, "H", "K"), _check_token("v", v, "H", "V")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dtype not in DTYPE_NAMES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {q.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"q, k and v must share the batch size B; got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have the heads H of k ({k.shape[1]}), got {v.shape[1]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have the head dim K of q ({q.shape[-1]}), got {k.shape[-1]}")
    if min(q.shape[-1], v.shape[-1]) < 1:
        raise ValueError(f"head dims must be >= 1, got K={q.shape[-1]}, V={v.shape[-1]}")
    if k.shape[1] < 1 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q's heads HQ ({q.shape[1]}) must be a multiple of k's heads H ({k.shape[1]}) (GQA)")
    return q, k, v, squeeze


def _check_decode_state(state, q, k, v, layer: LayerSpec) -> BLAState:
    """``state`` as a BLAState of float32 (float64 for float64 inputs), float16 or bfloat16 tensors for ``layer``'s
    window, with errors naming ``state`` (seen's values are checked by the op, ``_decode_step_impl``)."""
    acc = getattr(torch, layer.acc_dtype)
    dtypes = (acc, *REDUCED_STATE_KERNELS)
    try:
        state = check_state(state, q.shape[0], k.shape[1], layer.resolution, k.shape[-1], v.shape[-1], dtypes,
                            q.device, layer.window)  # fmt: skip
    except (TypeError, ValueError) as error:
        raise type(error)(str(error).replace("initial_state", "state")) from None
    if state.key_state.dtype != state.value_state.dtype:
        raise TypeError(
            f"state.key_state and state.value_state must share one dtype, got {state.key_state.dtype} and "
            f"{state.value_state.dtype}"
        )
    return state


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: BLAState | None,
    window: int,
    resolution: int,
    num_slots: int | None = None,
    scale: float | None = None,
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, BLAState]:
    """One token of Blurry Window Attention per sequence, through the compiled recurrent kernel.

    Args:
        q: the token's queries `[B, HQ, K]` (or FLA's `[B, 1, HQ, K]`).
        k: keys `[B, H, K]` (or `[B, 1, H, K]`); HQ a multiple of H (GQA: query head hq uses kv head hq // (HQ / H)).
        v: values `[B, H, V]` (or `[B, 1, H, V]`).
        state: the `BLAState` after the tokens seen so far (key_state `[B, H, N, K]`, value_state `[B, H, N, V]`,
            seen `[B]` int, window: this W or None), e.g. from `blurry_window_attention(..., output_final_state=
            True)` or a previous step; None for a fresh sequence (zeros, in `state_dtype`). Not modified. seen must
            be >= 0 and < 2^63 - 1: checked for CPU tensors; on CUDA (where a check would wait for the device
            every token) a negative seen masks every slot and the output is NaN.
        window, resolution, num_slots, scale: as in `blurry_window_attention`.
        state_dtype: only with `state=None`: the dtype of the state to start, float32 (float64 for float64
            inputs, the default) or float16 / bfloat16, which halve the memory a step reads and writes. The
            kernel computes in float32 either way and keeps the dtype it is given. Rounding the state to 16 bits
            every token costs accuracy (W = 512, N = M = 63, 4,096 tokens, against float64: float16 ~3e-3,
            bfloat16 ~3e-2 relative error): prefer float16 unless keys or values reach ~1e3 (its range).

    Returns:
        (o, new_state): o `[B, HQ, V]` (`[B, 1, HQ, V]` for 4-D q) in q's dtype, and the state after this token
        (new tensors; seen + 1).

    Example:
        >>> state = None
        >>> for t in range(16):
        ...     q = k = torch.randn(2, 4, 64); v = torch.randn(2, 4, 64)
        ...     o, state = decode_step(q, k, v, state, window=64, resolution=15)
    """
    q, k, v, squeeze = _check_inputs(q, k, v)
    layer = LayerSpec.make(window, resolution, num_slots, q.shape[-1], v.shape[-1], dtype_name(q.dtype),
                           q.shape[1] // k.shape[1])  # fmt: skip
    params = layer.params
    scale = check_scale(scale, q.shape[-1])
    if state is None:
        acc = getattr(torch, ACCUMULATOR[dtype_name(q.dtype)])
        dtype = acc if state_dtype is None else state_dtype
        if dtype not in (acc, *REDUCED_STATE_KERNELS):
            raise TypeError(f"state_dtype must be None, {acc}, torch.float16 or torch.bfloat16, got {state_dtype}")
        state = BLAState.zeros(q.shape[0], k.shape[1], params.resolution, k.shape[-1], v.shape[-1], dtype, q.device,
                               params.window)  # fmt: skip
    elif state_dtype is not None:
        raise ValueError("state_dtype applies only to a fresh state (state=None); convert the state's tensors instead")
    state = _check_decode_state(state, q, k, v, layer)
    seen = state.seen.to(torch.int64)
    step = torch.ops.bla_tvm.decode_step
    tensors = (q, k, v, state.key_state, state.value_state)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and any(x.requires_grad for x in tensors)):
        step = _decode_step_impl  # eager inference: the same code without the op's dispatch (tens of us a token)
    o, key_state, value_state = step(*tensors, seen, params.window, params.resolution, params.num_slots, scale)
    return (o[:, None] if squeeze else o), BLAState(key_state, value_state, seen + 1, params.window)


NextToken = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _check_next_token(token, i: int, q, k, v):
    """``next_token``'s (q, k, v) for new token i: one token ([B, heads, D] or [B, 1, heads, D]) of the prompt's
    B, HQ, H, K, V, dtype and device each; else a TypeError / ValueError naming next_token and the tensor."""
    where = f"next_token(o, {i})"
    if not isinstance(token, tuple) or len(token) != 3:
        raise TypeError(f"{where} must return (q, k, v), got {type(token).__name__}")
    expected = {"q": (q.shape[0], q.shape[2], q.shape[3]), "k": (k.shape[0], k.shape[2], k.shape[3]),
                "v": (v.shape[0], v.shape[2], v.shape[3])}  # fmt: skip
    for name, x in zip("qkv", token):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where} returned {name} of type {type(x).__name__}; expected a torch.Tensor")
        one = tuple(x.shape[:1] + x.shape[2:]) if x.dim() == 4 and x.shape[1] == 1 else tuple(x.shape)
        if one != expected[name]:
            raise ValueError(f"{where} returned {name} of shape {list(x.shape)}; expected {list(expected[name])} "
                             "(or with a token axis of 1), the prompt's batch, heads and head dim")  # fmt: skip
        if x.dtype != q.dtype or x.device != q.device:
            raise TypeError(f"{where} returned {name} of dtype {x.dtype} on {x.device}; expected the prompt's "
                            f"{q.dtype} on {q.device}")  # fmt: skip
    return token


def generate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    resolution: int,
    num_slots: int | None = None,
    scale: float | None = None,
    next_token: NextToken | None = None,
    max_new_tokens: int = 0,
    initial_state: BLAState | None = None,
    state_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, BLAState]:
    """Prefill a prompt with the chunked kernels, then decode ``max_new_tokens`` tokens one at a time.

    Args:
        q, k, v: the prompt, `[B, T, HQ, K]`, `[B, T, H, K]`, `[B, T, H, V]` (T >= 0).
        window, resolution, num_slots, scale: as in `blurry_window_attention`.
        next_token: `next_token(o, i) -> (q, k, v)`: given the attention output of the previous token `o`
            `[B, HQ, V]` (None after an empty prompt) and the index i of the token to produce (0 for the first
            new token), the next token's
            `[B, HQ, K]`, `[B, H, K]`, `[B, H, V]` (a model's layer would project them from its hidden state).
        max_new_tokens: how many tokens to decode after the prompt (needs `next_token` when > 0).
        initial_state: a `BLAState` to continue from (default: a fresh sequence), as in `blurry_window_attention`.
        state_dtype: dtype the decoded tokens' state is kept in (see `decode_step`); default the accumulation
            dtype. The prefill runs with the accumulation dtype and its final state is then converted.

    Returns:
        (o_prompt `[B, T, HQ, V]`, o_new `[B, max_new_tokens, HQ, V]`, the state after the last token).

    Example:
        >>> q = k = torch.randn(1, 100, 2, 64); v = torch.randn(1, 100, 2, 64)
        >>> step = lambda o, i: (torch.randn(1, 2, 64), torch.randn(1, 2, 64), o)
        >>> o, new, state = generate(q, k, v, 64, 15, next_token=step, max_new_tokens=8)
    """
    from .api import blurry_window_attention

    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if max_new_tokens and not callable(next_token):
        raise TypeError(f"next_token must be callable when max_new_tokens > 0, got {type(next_token).__name__}")
    o_prompt, state = blurry_window_attention(
        q, k, v, window, resolution, num_slots, scale, initial_state=initial_state, output_final_state=True
    )
    if state_dtype is not None:
        acc = state.key_state.dtype
        if state_dtype not in (acc, *REDUCED_STATE_KERNELS):
            raise TypeError(f"state_dtype must be None, {acc}, torch.float16 or torch.bfloat16, got {state_dtype}")
        state = state._replace(key_state=state.key_state.to(state_dtype), value_state=state.value_state.to(state_dtype))
    outputs = []
    last = o_prompt[:, -1] if o_prompt.shape[1] else None
    for i in range(max_new_tokens):
        tq, tk, tv = _check_next_token(next_token(last, i), i, q, k, v)
        last, state = decode_step(tq, tk, tv, state, window, resolution, num_slots, scale)
        outputs.append(last)
    B, HQ, V = o_prompt.shape[0], o_prompt.shape[2], o_prompt.shape[3]
    o_new = torch.stack(outputs, dim=1) if outputs else o_prompt.new_empty(B, 0, HQ, V)
    return o_prompt, o_new, state
