"""What a CUDA architecture gives the kernels: the shared memory one thread block may opt in to, and whether the
tile programs run there (they use cp.async and mma.sync m16n8k16 on 16-bit operands: sm_80 and newer). The build
(an arch such as "sm_90", no GPU needed) and the dispatch (a device) ask the same questions of a ``CudaArch``.
Imports only torch.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch

#: dynamic shared memory one block may opt in to, in bytes, by compute capability (CUDA C++ Programming Guide,
#: "Technical Specifications per Compute Capability"); nvcc 13 builds nothing older than sm_75
SHARED_MEMORY_OPTIN = {
    (7, 5): 65536, (8, 0): 166912, (8, 6): 101376, (8, 7): 166912, (8, 9): 101376, (9, 0): 232448,
    (10, 0): 232448, (12, 0): 101376,
}  # fmt: skip
#: the oldest architecture the tile programs compile for
TILE_CAPABILITY = (8, 0)
#: the arch assumed where none is named (a machine without a GPU listing the kernels to build for one, a builder
#: asked without an arch): the H200's, which the shipped benchmarks and tuning logs are for
DEFAULT_ARCH = "sm_90"


@dataclass(frozen=True)
class CudaArch:
    """A CUDA architecture: ``capability`` (major, minor) and ``shared_memory``, the bytes of dynamic shared
    memory one block may opt in to."""

    capability: tuple[int, int]
    shared_memory: int

    @property
    def name(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    @property
    def runs_tile_programs(self) -> bool:
        return self.capability >= TILE_CAPABILITY


def arch_named(name: str) -> CudaArch:
    """The ``CudaArch`` of an arch name "sm_XY" (or "sm_XYa"): its shared memory from ``SHARED_MEMORY_OPTIN``, or,
    for an arch not listed, that of the newest listed one older than it; ValueError for a malformed name or an
    arch older than sm_75."""
    match = re.fullmatch(r"sm_(\d+)(\d)a?", name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(f"arch must be a CUDA arch name such as 'sm_90', got {name!r}")
    capability = (int(match.group(1)), int(match.group(2)))
    known = [c for c in SHARED_MEMORY_OPTIN if c <= capability]
    if not known:
        raise ValueError(f"arch {name} is older than sm_75, the oldest the CUDA toolchain (nvcc 13) builds for")
    return CudaArch(capability, SHARED_MEMORY_OPTIN[max(known)])


@functools.lru_cache(maxsize=16)
def _device_arch(device: str) -> CudaArch:
    if not torch.cuda.is_available():
        return arch_named(DEFAULT_ARCH)
    properties = torch.cuda.get_device_properties(torch.device(device))
    capability = (properties.major, properties.minor)
    shared = getattr(properties, "shared_memory_per_block_optin", None)  # older torch: the table's figure
    if not shared:
        return arch_named(f"sm_{capability[0]}{capability[1]}")
    return CudaArch(capability, int(shared))


def device_arch(device: torch.device) -> CudaArch:
    """The ``CudaArch`` of the CUDA ``device`` (its shared memory as the driver reports it); on a machine without
    a GPU, ``DEFAULT_ARCH``'s."""
    return _device_arch(str(device))
