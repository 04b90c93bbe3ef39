"""What a compiled BLA kernel is specialised on: the static parameters and dtypes (never B, T or H).

Imported by the build layer (to compile) and by the runtime (to name and find compiled modules), so it
imports neither tvm nor tvm_ffi.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .params import BLAParams, check_chunk_size

#: the forward's kernels, in launch order (bla-math.md, "A kernel decomposition that keeps the chunks parallel")
FORWARD_KERNELS = ("chunk_state", "state_scan", "chunk_output", "final_state")
#: the backward's kernels, in launch order (compute/backward.py, compute/final_state.py)
BACKWARD_KERNELS = (
    "final_state_backward",
    "chunk_backward",
    "state_scan_reverse",
    "input_gradient_q",
    "input_gradient_k",
    "input_gradient_v",
)

#: the one-token decode step (compute/decode.py), one kernel per stored state dtype: the accumulation dtype, or
#: float16 / bfloat16 (half the memory traffic); its specs carry chunk_size 1 (a step has no chunks)
DECODE_KERNELS = ("decode_step", "decode_step_state_float16", "decode_step_state_bfloat16")

#: the kernels that run only for calls asking for the final states (``output_final_state``)
FINAL_STATE_KERNELS = ("final_state", "final_state_backward")


def entry_symbol(kernel: str) -> str:
    """Name of the function a compiled kernel module exports."""
    return f"bla_{kernel}"


#: chunk lengths the kernels are built for, preferred first
CHUNK_SIZES = (64, 32, 16)
#: shared memory one CUDA thread block may use on sm_90 (227 KB)
CUDA_SHARED_MEMORY_LIMIT = 232448


def cuda_shared_memory_bound(L: int, N: int, M: int, K: int, V: int, backward: bool = True) -> int:  # noqa: E741
    """Upper bound on the bytes of shared memory of one block of the per-chunk kernels: every fp32
    intermediate of ``compute.forward.chunk_output`` (and with ``backward`` of ``compute.backward.
    chunk_backward``, which recomputes the forward's) at once, as if none reused another's space.

    q [L, K]; [k|v; X|Y] [L + N, F]; k'|v' [L, F]; [k'; X] [L + N, K]; qx [L, L + N]; z, z_intra, w [L, N];
    scores, probs [L, M]; g [L, L]; mix [L, L + N]; [v'; Y] [L + N, V]; o [L, V]; row max and sum [L].
    """
    F = K + V
    rows = L + N
    forward = L * K + rows * F + L * F + rows * K + 2 * L * rows + 3 * L * N + 2 * L * M + L * L + rows * V + L * V
    # the backward recomputes those and adds: dO, P, mix / rowsum, dmix, d[v'; Y], dw (twice), dP, dscores,
    # dz, dqx (lagged and stacked), dq, d[k'; X], d[kv; X|Y] and the row dot products
    gradients = L * V + L * M + 2 * L * rows + rows * V + 2 * L * N + 2 * L * M + L * N + L * L + L * rows
    gradients += L * K + rows * K + rows * F
    return 4 * (forward + (gradients if backward else 0) + 3 * L)


#: dtypes the kernels accept as inputs, and the dtype they accumulate in.
ACCUMULATOR = {"float32": "float32", "float16": "float32", "bfloat16": "float32", "float64": "float64"}


@dataclass(frozen=True)
class KernelSpec:
    """Static shape of one compiled kernel: W, N, M, chunk length L, head dims K and V, input dtype, and the
    GQA group size G (query heads per key/value head: q has H * G heads, k, v and the state H)."""

    window: int
    resolution: int
    num_slots: int
    chunk_size: int
    head_k: int
    head_v: int
    dtype: str
    group_size: int = 1

    def __post_init__(self):
        BLAParams.make(self.window, self.resolution, self.num_slots)
        check_chunk_size(self.chunk_size)
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be an int >= 1, got {self.group_size!r}")
        if self.dtype not in ACCUMULATOR:
            raise ValueError(f"dtype must be one of {sorted(ACCUMULATOR)}, got {self.dtype!r}")

    @property
    def params(self) -> BLAParams:
        return BLAParams(self.window, self.resolution, self.num_slots)

    @property
    def acc_dtype(self) -> str:
        return ACCUMULATOR[self.dtype]

    @property
    def state_width(self) -> int:
        """Key and value states are scanned together: F = K + V columns."""
        return self.head_k + self.head_v

    def as_dict(self) -> dict:
        return asdict(self)

    def tag(self) -> str:
        return (
            f"W{self.window}_N{self.resolution}_M{self.num_slots}_L{self.chunk_size}"
            f"_K{self.head_k}_V{self.head_v}_G{self.group_size}_{self.dtype}"
        )
