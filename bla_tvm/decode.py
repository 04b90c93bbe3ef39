"""One-token decoding with BLA's recurrent form: ``decode_step`` (one compiled kernel per token), functional or in
place (``generate`` and ``DecodeGraph`` build on it).

By default the state is returned, not updated in place: ``decode_step`` reads ``state`` and returns a new
``BLAState`` (X', Y', seen + 1), the old tensors left as they were (the op stays functional: ``torch.compile``,
keeping a state to branch from). With ``in_place=True`` the kernel writes X', Y' over the state's own tensors
(every kernel reads an element before writing it, and a (b, h) only from its own) and seen is incremented in
place: the same memory traffic, no allocation, fixed addresses for a CUDA graph. ``torch.ops.bla_tvm.
decode_step`` and ``decode_step_`` are the custom ops (no autograd: decoding is inference); eager calls outside
autograd run their implementations directly, skipping the op's dispatch.

Imports only torch, tvm_ffi and the package's runtime (the build layer only when a kernel is missing).
"""

from __future__ import annotations

import functools

import torch

from .constants import bla_constants, partner_index
from .layer import ACCUMULATOR, DECODE_CHUNK, KernelSpec, LayerSpec, check_index_range, layer_spec
from .params import DTYPE_NAMES, BLAParams, check_int, check_scale, dtype_name
from .runtime import KERNEL_ALIGNMENT, BoundLaunch, default_library, kernel_ready, launch, record_launches
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


def _launch_decode(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale, key_out, value_out):
    """o [B, HQ, V] of one token, X' and Y' written to key_out, value_out: q [B, HQ, K], k [B, H, K], v [B, H, V],
    X, Y and the outputs kernel ready, in the state dtype, seen [B] int64. The outputs may be X and Y themselves
    (every kernel reads an element of the state before it writes it, and a (b, h) only from its own)."""
    B, HQ, K = q.shape
    H, V = k.shape[1], v.shape[-1]
    if not seen.is_cuda:  # on the CPU, eager or compiled (on a GPU the check would wait for the device every token)
        check_seen(seen, 1, "state.seen")
    spec = layer_spec(window, resolution, num_slots, K, V, dtype_name(q.dtype), HQ // H).kernel(DECODE_CHUNK)
    acc = getattr(torch, spec.acc_dtype)
    check_index_range({"q": q.shape, "k": k.shape, "v": v.shape, "key_state": key_state.shape,
                       "value_state": value_state.shape, "o": (B, HQ, V)})  # fmt: skip
    kernel = _decode_function(decode_kernel(key_state.dtype, acc), spec, q.device, default_library())
    q, k, v, seen = (kernel_ready(x) for x in (q, k, v, seen))
    o = q.new_empty(B, H, HQ // H, V)
    consts = decode_constants(spec.params, acc, q.device, float(scale))
    if B * H:
        launch(kernel, consts, q=q.view(B, H, HQ // H, K), k=k, v=v, key_state=key_state, value_state=value_state,
               seen=seen, o=o, key_out=key_out, value_out=value_out)  # fmt: skip
    return o.view(B, HQ, V)


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
    X, Y in the state dtype, seen [B] int64. Arguments validated by the caller (``bla_tvm.decode_step``)."""
    key_state, value_state = kernel_ready(key_state), kernel_ready(value_state)
    key_out, value_out = torch.empty_like(key_state), torch.empty_like(value_state)
    o = _launch_decode(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale, key_out, value_out)
    return o, key_out, value_out


#: the op (for torch.compile and torch.library tooling); eager inference calls ``_decode_step_impl`` directly
decode_step_op = torch.library.custom_op("bla_tvm::decode_step", _decode_step_impl, mutates_args=())


@decode_step_op.register_fake
def _(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1]), torch.empty_like(key_state), torch.empty_like(value_state)


def _decode_step_inplace_impl(
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
) -> torch.Tensor:
    """o [B, HQ, V] of one token; X', Y' written over key_state, value_state and seen [B] int64 incremented,
    in place (ValueError where the state cannot take the kernel's outputs where it is)."""
    check_in_place(BLAState(key_state, value_state, seen))
    o = _launch_decode(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale, key_state,
                       value_state)  # fmt: skip
    seen.add_(1)
    return o


#: the in-place step (a CUDA graph or a compiled graph can hold it: no allocation of the state per token)
decode_step_inplace_op = torch.library.custom_op(
    "bla_tvm::decode_step_", _decode_step_inplace_impl, mutates_args=("key_state", "value_state", "seen")
)


@decode_step_inplace_op.register_fake
def _(q, k, v, key_state, value_state, seen, window, resolution, num_slots, scale):
    return q.new_empty(*q.shape[:2], v.shape[-1])


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
    window, with errors naming ``state`` (seen's values are checked by the op, ``_launch_decode``)."""
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
    in_place: bool = False,
) -> tuple[torch.Tensor, BLAState]:
    """One token of Blurry Window Attention per sequence, through the compiled recurrent kernel.

    Args:
        q: the token's queries `[B, HQ, K]` (or FLA's `[B, 1, HQ, K]`).
        k: keys `[B, H, K]` (or `[B, 1, H, K]`); HQ a multiple of H (GQA: query head hq uses kv head hq // (HQ / H)).
        v: values `[B, H, V]` (or `[B, 1, H, V]`).
        state: the `BLAState` after the tokens seen so far (key_state `[B, H, N, K]`, value_state `[B, H, N, V]`,
            seen `[B]` int, window: this W or None), e.g. from `blurry_window_attention(..., output_final_state=
            True)` or a previous step; None for a fresh sequence (zeros, in `state_dtype`). Not modified unless
            `in_place`. seen must be >= 0 and < 2^63 - 1: checked for CPU tensors; on CUDA (where a check would wait
            for the device every token) a negative seen masks every slot and the output is NaN.
        window, resolution, num_slots, scale: as in `blurry_window_attention`.
        state_dtype: only with `state=None`: the dtype of the state to start, float32 (float64 for float64
            inputs, the default) or float16 / bfloat16, which halve the memory a step reads and writes. The
            kernel computes in float32 either way and keeps the dtype it is given. Rounding the state to 16 bits
            every token costs accuracy (W = 512, N = M = 63, 4,096 tokens, against float64: float16 ~3e-3,
            bfloat16 ~3e-2 relative error): prefer float16 unless keys or values reach ~1e3 (its range).
        in_place: write the new state over `state`'s tensors (contiguous, seen int64) and add 1 to its `seen`,
            instead of allocating a new state: the same memory traffic, no allocation, fixed addresses (what a
            CUDA graph of a decoding loop needs; `bla_tvm.DecodeGraph` is one).

    Returns:
        (o, new_state): o `[B, HQ, V]` (`[B, 1, HQ, V]` for 4-D q) in q's dtype, and the state after this token
        (new tensors with seen + 1; with `in_place`, `state`'s own tensors, updated).

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
        if in_place:
            raise ValueError("in_place needs a state to update; pass state=BLAState.zeros(...) for a fresh sequence")
    elif state_dtype is not None:
        raise ValueError("state_dtype applies only to a fresh state (state=None); convert the state's tensors instead")
    state = _check_decode_state(state, q, k, v, layer)
    tensors = (q, k, v, state.key_state, state.value_state)
    layer_args = (params.window, params.resolution, params.num_slots, scale)
    eager = not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and any(x.requires_grad for x in tensors)
    )  # eager inference: the same code without the op's dispatch (tens of us a token)
    if in_place:
        step = _decode_step_inplace_impl if eager else torch.ops.bla_tvm.decode_step_
        o = step(*tensors, state.seen, *layer_args)
        return (o[:, None] if squeeze else o), state
    seen = state.seen.to(torch.int64)
    step = _decode_step_impl if eager else torch.ops.bla_tvm.decode_step
    o, key_state, value_state = step(*tensors, seen, *layer_args)
    return (o[:, None] if squeeze else o), BLAState(key_state, value_state, seen + 1, params.window)


#: the arguments of a decode kernel that change from token to token of one in-place decoding loop
TOKEN_ARGS = ("q", "k", "v", "seen", "o")


#: rows of InPlaceSteps' table of seen values made at once (one small kernel per this many tokens)
SEEN_BLOCK = 1024


class InPlaceSteps:
    """A decoding loop over one state at one launch per token, without a CUDA graph (``generate``'s steps).

    The first step is ``decode_step(..., in_place=True)`` (every check, the kernel's lookup) and is recorded;
    each next one launches that kernel again (``runtime.BoundLaunch``: the state and the constants bound) with
    the token's q, k, v where they are (copied only if not contiguous), seen_0 + i from a table made
    ``SEEN_BLOCK`` rows at a time (no seen + 1 kernel per token) and o written where the caller says (no copy).
    key_state and value_state advance at every step; state.seen only at ``finish`` (or on leaving a ``with``
    block), which adds the steps taken.

    Args:
        state: a `BLAState` that `decode_step(..., in_place=True)` accepts (contiguous, seen int64).
        window, resolution, num_slots, scale: as in `decode_step`.
        tokens: the most steps the loop will take.

    Example:
        >>> with InPlaceSteps(state, window=512, resolution=63, tokens=n) as steps:
        ...     for t in range(n):
        ...         o = steps(q, k, v)  # q [B, HQ, K], k [B, H, K], v [B, H, V]: the first step's shapes each time
        >>> state.seen  # advanced by the steps taken
    """

    def __init__(self, state: BLAState, window, resolution, num_slots=None, scale=None, tokens: int = 1):
        if not isinstance(state, BLAState):
            raise TypeError(f"state must be a BLAState, got {type(state).__name__}")
        self.tokens = check_int("tokens", tokens, 1)
        self.state, self.layer_args = state, (window, resolution, num_slots, scale)
        self.launch, self.token, self.steps = None, None, 0
        self.seen_0, self.seen_rows, self.seen_from = None, (), 1  # the table's rows: steps seen_from, ...

    def __enter__(self) -> "InPlaceSteps":
        return self

    def __exit__(self, *_exc) -> None:
        self.finish()

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor | None = None):
        """Decode one token: o [B, HQ, V] in q's dtype, written into ``out`` where given (contiguous)."""
        if self.steps >= self.tokens:
            raise ValueError(f"this loop was made for tokens={self.tokens} steps; make a new one to go on"
                             if self.steps == self.tokens else "the loop is finished; make a new one to go on")
        if self.steps == 0:
            return self._first(q, k, v, out)
        token = tuple((x.shape, x.dtype, x.device) if isinstance(x, torch.Tensor) else None for x in (q, k, v))
        if token != self.token:
            raise ValueError(f"q, k and v must keep the first step's shapes, dtype and device {self.token}, got "
                             f"{token}")  # fmt: skip
        out = q.new_empty(self.output_shape) if out is None else self._check_out(out, self.output_shape, q)
        self.launch_token(q, k, v, out.view(self.kernel_output_shape))
        return out

    @staticmethod
    def _check_out(out, shape: tuple, q: torch.Tensor) -> torch.Tensor:
        """``out`` where o may be written: a contiguous tensor of ``shape`` [B, HQ, V], q's dtype and device."""
        if not isinstance(out, torch.Tensor) or out.shape != shape or out.dtype != q.dtype or (
            out.device != q.device or not out.is_contiguous()
        ):
            got = f"{list(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor) else type(out)
            raise ValueError(f"out must be a contiguous {list(shape)} tensor of q's dtype {q.dtype} on {q.device}, "
                             f"got {got}")  # fmt: skip
        return out

    def launch_token(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> None:
        """A step after the first without its checks, for a caller that made them (``generate``): q, k, v of the
        first step's shapes, dtype and device, fewer than ``tokens`` steps taken; o written to ``out``, a
        contiguous [B, H, G, V] (``kernel_output_shape``: the kernel's view of [B, HQ, V]; through an aligned
        copy where it is not aligned as kernels assume)."""
        if self.launch is not None:
            step = self.steps - self.seen_from
            if step >= len(self.seen_rows):  # the next block of the table: seen_0 + i
                self.seen_from, step = self.steps, 0
                rows = torch.arange(self.steps, min(self.steps + SEEN_BLOCK, self.tokens), device=out.device)
                self.seen_rows = (self.seen_0[None] + rows[:, None]).unbind(0)
            aligned = out if out.data_ptr() % KERNEL_ALIGNMENT == 0 else torch.empty_like(out)
            tensors = {"q": kernel_ready(q).view(self.query_shape), "k": kernel_ready(k), "v": kernel_ready(v),
                       "seen": self.seen_rows[step], "o": aligned}  # fmt: skip
            self.launch(tensors, out.device)
            if aligned is not out:
                out.copy_(aligned)
        self.steps += 1

    def _first(self, q, k, v, out):
        for name, x, shape in (("q", q, "[B, HQ, K]"), ("k", k, "[B, H, K]"), ("v", v, "[B, H, V]")):
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError(f"{name} must have shape {shape}, got {getattr(x, 'shape', type(x).__name__)}")
        if out is not None:  # before the state changes
            self._check_out(out, (*q.shape[:2], v.shape[-1]), q)
        if not self.state.seen.is_cuda:
            check_seen(self.state.seen, self.tokens, "state.seen")
        seen_0 = self.state.seen.clone()  # (made before the state changes, as the table's base)
        with record_launches() as launches:
            o, _ = decode_step(q, k, v, self.state, *self.layer_args, in_place=True)
        self.launch = BoundLaunch.bind(launches[0], TOKEN_ARGS) if launches else None  # none for an empty batch
        self.seen_0 = seen_0
        B, HQ, K = q.shape
        G = HQ // k.shape[1]
        self.query_shape, self.output_shape = (B, HQ // G, G, K), (B, HQ, v.shape[-1])
        self.kernel_output_shape = (B, HQ // G, G, v.shape[-1])
        self.token = tuple((x.shape, x.dtype, x.device) for x in (q, k, v))
        self.steps = 1
        return o if out is None else out.copy_(o)

    def finish(self) -> BLAState:
        """The state after the steps taken (their count added to seen, in place); the loop takes no more."""
        if 1 < self.steps <= self.tokens:
            self.state.seen.add_(self.steps - 1)
        self.steps = self.tokens + 1
        return self.state


def check_in_place(state: BLAState) -> None:
    """The state's tensors can take the kernel's outputs where they are: contiguous and aligned, seen int64."""
    for name in ("key_state", "value_state"):
        x = getattr(state, name)
        if not x.is_contiguous() or x.data_ptr() % KERNEL_ALIGNMENT:
            raise ValueError(f"in_place needs state.{name} contiguous and {KERNEL_ALIGNMENT}-byte aligned "
                             f"(e.g. a fresh tensor or .clone()), got strides {x.stride()}")  # fmt: skip
    if state.seen.dtype != torch.int64:
        raise TypeError(f"in_place needs state.seen of dtype int64, got {state.seen.dtype}")
