"""What to tune: a layer's parameters and the shapes (buckets) to measure it at. Imports neither tvm nor torch."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ..layer import KernelSpec, LayerSpec


@dataclass(frozen=True)
class TuningProblem:
    """One layer to tune: LayerSpec's fields (the chunk length is tuned), the shape buckets (B, T, H)
    to measure at (the first is where every candidate is screened; the best few are re-measured at the others),
    and the modes: "inference" (forward kernels, L may be longer) and "training" (forward + backward, one L)."""

    window: int
    resolution: int
    num_slots: int
    head_k: int
    head_v: int
    dtype: str
    group_size: int = 1
    buckets: tuple[tuple[int, int, int], ...] = ((4, 4096, 16),)
    modes: tuple[str, ...] = ("inference", "training")
    #: the chunk lengths to try (default: every one of spec.CHUNK_SIZES that fits)
    chunk_sizes: tuple[int, ...] | None = None

    def __post_init__(self):
        self.spec(16)  # validates the parameters
        object.__setattr__(self, "buckets", tuple(tuple(int(x) for x in b) for b in self.buckets))
        object.__setattr__(self, "modes", tuple(self.modes))
        if not self.buckets or any(len(b) != 3 or min(b) < 1 for b in self.buckets):
            raise ValueError(f"buckets must be (B, T, H) triples of positive ints, got {self.buckets}")
        if self.chunk_sizes is not None:
            object.__setattr__(self, "chunk_sizes", tuple(self.chunk_sizes))
            for L in self.chunk_sizes:
                self.spec(L)
        if not set(self.modes) <= {"inference", "training"} or not self.modes:
            raise ValueError(f"modes must be among ('inference', 'training'), got {self.modes}")

    @property
    def params(self) -> dict:
        """LayerSpec's fields: how tuning logs name the layer."""
        return {k: v for k, v in asdict(self).items() if k not in ("buckets", "modes", "chunk_sizes")}

    @property
    def layer(self) -> LayerSpec:
        return LayerSpec(**self.params)

    def spec(self, chunk_size: int) -> KernelSpec:
        return self.layer.kernel(chunk_size)

    def tag(self) -> str:
        return self.spec(16).tag().replace("_L16", "")

    def as_dict(self) -> dict:
        return {**self.params, "buckets": [list(b) for b in self.buckets], "modes": list(self.modes),
                "chunk_sizes": None if self.chunk_sizes is None else list(self.chunk_sizes)}


def load_problems(path: Path) -> list[TuningProblem]:
    """Problems from a JSON list of objects with TuningProblem's fields."""
    return [TuningProblem(**fields) for fields in json.loads(Path(path).read_text())]


#: the benchmark shapes of the forward and backward issues: B=4, H=16, W=512, N=63, M in {63, 512},
#: K = V in {64, 128}, bf16 and fp32; measured at T = 1k, 4k, 16k (screened at 4k). T = 64k is served by the
#: nearest bucket (16k): time per token is flat in T (benchmarks/NOTES.md), and one 64k fwd+bwd is past 32-bit
#: indexing anyway. Ordered by priority (the measuring run stops at its deadline).
H200_BENCH_BUCKETS = ((4, 4096, 16), (4, 1024, 16), (4, 16384, 16))


def h200_bench_problems() -> list[TuningProblem]:
    layers = []
    for dtype in ("bfloat16", "float32"):
        for kv, slots in ((64, 63), (64, 512), (128, 63), (128, 512)):
            layers.append((dtype, kv, slots))
    layers.sort(key=lambda x: (x[1], x[0] != "bfloat16", x[2]))  # K = V = 64 first, bf16 before fp32
    return [
        TuningProblem(512, 63, slots, kv, kv, dtype, buckets=H200_BENCH_BUCKETS) for dtype, kv, slots in layers
    ]


PRESETS = {"h200-bench": h200_bench_problems}
