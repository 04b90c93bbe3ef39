"""The declared search space of the schedule templates: which values each knob of ``CudaConfig`` / ``CpuConfig``
may take, per target and per kernel. Read by the tuner (``bla_tvm.tuning``); the schedules themselves read only
their config.

A knob is a field of the target's config dataclass (found with ``dataclasses.fields``, so a field added to a
config later is simply left at its default until it is declared here). The chunk length L is a knob of the whole
layer, not of one kernel (the forward and backward of one training call share it): ``CHUNK_SIZES`` in
``bla_tvm.layer``, pruned by shared memory when kernels are built.

Invalid points are not listed by hand: the tuner builds each point and rejects it on what the compiler reports
(see ``bla_tvm.tuning.builder.check_resources``).
"""

from __future__ import annotations

import dataclasses
import itertools

from bla_tvm import kernels

#: knob -> values, per device kind; the default config's value of each knob must be among them
SPACES: dict[str, dict[str, tuple]] = {
    "cuda": {
        "threads": (256, 128, 512, 1024),
        "tile": ((4, 4), (2, 2)),
        "cache_operands": (True, False),
        # fp16/bf16 kernels only; fp32 kernels ignore it (their two points build the same kernel)
        "tensor_cores": (True, False),
    },
    "cpu": {
        "vector_lanes": (16, 8, 32, 4),
    },
}

#: narrower spaces where a kernel has fewer useful knobs: (device kind, kernel) -> knob -> values
KERNEL_SPACES: dict[tuple[str, str], dict[str, tuple]] = {
    # one contraction with a 127-long reduction; a small share of the forward's time
    ("cuda", "chunk_state"): {"threads": (256, 128, 512)},
    # per-token reads of the chunk gradients and carried states: block size is what matters
    **{("cuda", f"input_gradient_{x}"): {"threads": (256, 128, 512)} for x in "qkv"},
}

#: knobs that change nothing for some specs (their other values would build the same kernel again): knob ->
#: whether it matters for a spec
MATTERS = {
    "tensor_cores": lambda spec: spec.dtype in ("float16", "bfloat16"),  # fp32 / fp64 kernels always stay SIMT
}

def _config_class(device_kind: str):
    from . import CONFIGS

    return CONFIGS[device_kind]


def config_dict(config) -> dict:
    """A config as the JSON-ready dict the runtime keys kernels by (tuples become lists)."""
    return {f.name: _jsonable(getattr(config, f.name)) for f in dataclasses.fields(config)}


def _jsonable(value):
    return [_jsonable(x) for x in value] if isinstance(value, (tuple, list)) else value


def space(device_kind: str, kernel: str) -> dict[str, tuple]:
    """The knobs of ``kernel`` on ``device_kind`` and their values; every knob is a field of the config class."""
    if device_kind not in SPACES:
        raise ValueError(f"device_kind must be one of {sorted(SPACES)}, got {device_kind!r}")
    knobs = KERNEL_SPACES.get((device_kind, kernel), SPACES[device_kind])
    fields = {f.name for f in dataclasses.fields(_config_class(device_kind))}
    unknown = set(knobs) - fields
    if unknown:
        raise ValueError(f"search space of {kernel} names knobs that {_config_class(device_kind).__name__} lacks: "
                         f"{sorted(unknown)}")
    return knobs


def candidate_configs(device_kind: str, kernel: str, limit: int | None = None, spec=None) -> list[dict]:
    """The points of ``kernel``'s space as config dicts, the default config first, then by how many knobs
    differ from the default (one-knob changes before two), in declaration order; at most ``limit``. With
    ``spec``, knobs that do not matter for it (``MATTERS``) keep their default. Kernels without a schedule rule
    have one point, the default."""
    cls = _config_class(device_kind)
    default = config_dict(cls())
    if not kernels.get(kernel).tunable:  # the scans, final-state and decode kernels keep their default
        return [default]
    knobs = dict(space(device_kind, kernel))
    if spec is not None:
        knobs = {k: v for k, v in knobs.items() if k not in MATTERS or MATTERS[k](spec)}
    points = []
    for values in itertools.product(*knobs.values()):
        point = dict(default, **{name: _jsonable(value) for name, value in zip(knobs, values)})
        point = config_dict(cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in point.items()}))
        if point not in points:
            points.append(point)
    if default not in points:
        points.insert(0, default)
    points.sort(key=lambda p: sum(p[k] != default[k] for k in p))  # stable: declaration order within a distance
    return points[:limit] if limit else points
