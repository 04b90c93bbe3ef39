"""What a BLA layer is, and what one compiled kernel is specialised on.

``LayerSpec`` (W, N, M, K, V, dtype, GQA group size G) is built and validated once, where a call enters the
package (``api``, ``decode``); ``LayerSpec.kernel(L)`` gives the ``KernelSpec`` of the kernels at chunk length L
(never B, T or H). Imported by the build layer (to compile), the runtime (to name and find compiled modules),
the dispatch and the tuner, so it imports neither tvm, tvm_ffi nor torch.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, field

from .params import BLAParams, check_chunk_size, check_int

#: dtypes the kernels accept as inputs, and the dtype they accumulate in (and keep the state in)
ACCUMULATOR = {"float32": "float32", "float16": "float32", "bfloat16": "float32", "float64": "float64"}
#: chunk lengths the kernels are built for, preferred first
CHUNK_SIZES = (64, 32, 16)
#: decode kernels have no chunks; their KernelSpec carries this chunk length
DECODE_CHUNK = 1
#: the kernels index with 32-bit integers: no buffer may hold more elements
MAX_ELEMENTS = 2**31 - 1
#: positions in the window (clipped at W) plus a chunk's offsets are int32 in the kernels
MAX_WINDOW = MAX_ELEMENTS - max(CHUNK_SIZES)


def largest_fitting(elements, limit: int = MAX_ELEMENTS) -> int:
    """The largest n >= 0 with elements(n) <= limit, for ``elements`` increasing in n."""
    low, high = 0, 1
    while elements(high) <= limit:
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if elements(middle) <= limit else (low, middle)
    return low


def check_tables(window: int, resolution: int, num_slots: int, chunk_size: int | None = None) -> None:
    """ValueError naming the argument where a constant table the kernels index would pass 32 bits: the window
    (positions), the [N, N] state decay, the [M, N] slot readout and, at a chunk length L, the final-state map
    [L + 1, N, N + L]."""
    N = resolution
    limits = [
        ("window", window, MAX_WINDOW, "a position in the window plus a chunk offset is an int32 in the kernels"),
        ("resolution", N, largest_fitting(lambda n: n * n), "the kernels index the [N, N] state decay with 32 bits"),
        ("num_slots", num_slots, MAX_ELEMENTS // N,
         f"at resolution {N}: the kernels index the slot readout [M, N] with 32 bits"),
    ]  # fmt: skip
    if chunk_size is not None:
        L = chunk_size
        largest = largest_fitting(lambda n: (L + 1) * n * (n + L))
        limits.append(("resolution", N, largest, f"at chunk length {L}: the kernels index the final-state map "
                                                 f"[L + 1, N, N + L] with 32 bits"))  # fmt: skip
    for name, value, limit, why in limits:
        if value > limit:
            raise ValueError(f"{name} must be at most {limit} ({why}), got {value}")


def check_index_range(shapes: dict[str, tuple[int, ...]]) -> None:
    """ValueError naming every buffer of ``shapes`` (name -> shape) past MAX_ELEMENTS elements: the kernels
    index with 32-bit integers, so a larger buffer would be read and written out of place."""
    too_large = {name: shape for name, shape in shapes.items() if math.prod(shape) > MAX_ELEMENTS}
    if too_large:
        listed = ", ".join(f"{name} {list(shape)} ({math.prod(shape)} elements)" for name, shape in too_large.items())
        raise ValueError(
            f"the kernels index with 32-bit integers (at most {MAX_ELEMENTS} elements per buffer), but this call "
            f"needs {listed}: split the batch, the sequence or the heads"
        )


def num_chunks(tokens: int, chunk_size: int) -> int:
    """NC: chunks of L tokens covering ``tokens`` (the batch layout; ``layout.packed_chunks`` for packed rows)."""
    return -(-tokens // chunk_size)


@dataclass(frozen=True)
class LayerSpec:
    """A BLA layer: window W, resolution N, slots M, head dims K (queries, keys) and V (values), input dtype and
    GQA group size G (query heads per key/value head). Validated on construction: W >= 1, 1 <= N <= W with N odd
    or N == W, M >= 1, K, V, G >= 1, dtype one of ACCUMULATOR's keys, constant tables within 32-bit indexing
    (``check_tables``)."""

    window: int
    resolution: int
    num_slots: int
    head_k: int
    head_v: int
    dtype: str
    group_size: int = 1

    @classmethod
    def make(cls, window, resolution, num_slots, head_k, head_v, dtype, group_size=1) -> "LayerSpec":
        """Validated, with ``num_slots`` None meaning N; plain ints and a dtype name are validated once per distinct
        layer (``layer_spec``: a call's check took ~40 us), anything else on every call (so that it fails with
        its own error, not lru_cache's)."""
        num_slots = resolution if num_slots is None else num_slots
        sizes = (window, resolution, num_slots, head_k, head_v, group_size)
        if cls is LayerSpec and all(type(x) is int for x in sizes) and type(dtype) is str:
            return layer_spec(window, resolution, num_slots, head_k, head_v, dtype, group_size)
        return cls(window, resolution, num_slots, head_k, head_v, dtype, group_size)

    def __post_init__(self):
        BLAParams.make(self.window, self.resolution, self.num_slots)
        check_tables(self.window, self.resolution, self.num_slots)
        for name in ("head_k", "head_v", "group_size"):
            check_int(name, getattr(self, name), 1)
        if self.dtype not in ACCUMULATOR:
            raise ValueError(f"dtype must be one of {sorted(ACCUMULATOR)}, got {self.dtype!r}")

    @property
    def params(self) -> BLAParams:
        """(W, N, M): what the constant matrices depend on."""
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

    @functools.lru_cache(maxsize=None)  # noqa: B019 - frozen and hashable; a handful of layers per process
    def kernel(self, chunk_size: int) -> KernelSpec:
        """The KernelSpec of this layer's kernels at chunk length ``chunk_size``."""
        return KernelSpec(**self.as_dict(), chunk_size=chunk_size)

    def buffers(self, rows: int, tokens: int, query_heads: int, sequences: int, chunk_size: int,
                backward: bool) -> dict[str, tuple[int, ...]]:  # fmt: skip
        """Shape of every buffer the kernels of a call index, by argument name, for a chunk grid of ``rows`` x
        ``tokens`` (B x T; 1 x NC L when packed), HQ = ``query_heads``, S = ``sequences``, L = ``chunk_size``:
        q, o [rows, tokens, HQ, K | V], k, v [rows, tokens, H, K | V], states [rows, NC, H, N, F], final
        [S, H, N, F]; with ``backward`` also their gradients, grads [rows, NC, HQ, L + N, F + K] and
        final_grads [S, H, L + N, F]."""
        HQ, H, NC = query_heads, max(query_heads // self.group_size, 1), num_chunks(tokens, chunk_size)
        N, K, V, F = self.resolution, self.head_k, self.head_v, self.state_width
        shapes = {
            "q": (rows, tokens, HQ, K), "k": (rows, tokens, H, K), "v": (rows, tokens, H, V),
            "o": (rows, tokens, HQ, V), "states": (rows, NC, H, N, F), "final": (sequences, H, N, F),
        }  # fmt: skip
        if backward:
            shapes.update({f"d{name}": shapes[name] for name in ("q", "k", "v", "o")})
            shapes.update(grads=(rows, NC, HQ, chunk_size + N, F + K), final_grads=(sequences, H, chunk_size + N, F))
        return shapes

    def largest_buffer(self, shape, chunk_size: int, backward: bool) -> int:
        """Elements of the largest of ``buffers`` for q of ``shape`` (B, T, HQ, ...) at chunk length L."""
        B, T, HQ = (int(x) for x in shape[:3])
        return max(math.prod(s) for s in self.buffers(B, T, HQ, B, chunk_size, backward).values())


@functools.lru_cache(maxsize=256)
def layer_spec(window, resolution, num_slots, head_k, head_v, dtype, group_size) -> LayerSpec:
    """``LayerSpec(...)``, once per distinct layer: for the ops, whose arguments the entry point validated."""
    return LayerSpec(window, resolution, num_slots, head_k, head_v, dtype, group_size)


@dataclass(frozen=True)
class KernelSpec(LayerSpec):
    """A layer's kernels at one chunk length L: LayerSpec's fields and ``chunk_size`` (keyword only)."""

    chunk_size: int = field(kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        check_chunk_size(self.chunk_size)
        check_tables(self.window, self.resolution, self.num_slots, self.chunk_size)

    @property
    def layer(self) -> LayerSpec:
        return LayerSpec(**{k: v for k, v in self.as_dict().items() if k != "chunk_size"})

    def tag(self) -> str:
        return (
            f"W{self.window}_N{self.resolution}_M{self.num_slots}_L{self.chunk_size}"
            f"_K{self.head_k}_V{self.head_v}_G{self.group_size}_{self.dtype}"
        )
