"""Validation of BLA's parameters and inputs, shared by every entry point.

Every rule raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (value out of range) whose message
names the argument and what is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def check_int(name: str, value, minimum: int) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; else TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` if it is a bool; else a TypeError naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def check_positive(name: str, value) -> float:
    """A finite real number > 0, or a TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite float > 0, got {value}")
    return float(value)


@dataclass(frozen=True)
class BLAParams:
    """The shape of a BLA layer: window W, resolution N, slots M.

    W >= 1; 1 <= N <= W with N odd or N == W; M >= 1 (default M = N).
    """

    window: int
    resolution: int
    num_slots: int

    @classmethod
    def make(cls, window, resolution, num_slots=None) -> "BLAParams":
        window = check_int("window", window, 1)
        resolution = check_int("resolution", resolution, 1)
        if resolution > window:
            raise ValueError(f"resolution must satisfy 1 <= resolution <= window ({window}), got {resolution}")
        if resolution % 2 == 0 and resolution != window:
            raise ValueError(
                f"resolution must be odd or equal to window ({window}), got {resolution}"
            )
        num_slots = resolution if num_slots is None else check_int("num_slots", num_slots, 1)
        return cls(window, resolution, num_slots)


def check_chunk_size(chunk_size) -> int:
    return check_int("chunk_size", chunk_size, 1)


def check_scale(scale, head_dim: int) -> float:
    """Default 1/sqrt(K); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """The kernels' name of an input dtype; TypeError for one they do not take."""
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"q must be float32, float16, bfloat16 or float64, got {dtype}")
    return DTYPE_NAMES[dtype]


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q: [B, T, HQ, K]; k: [B, T, H, K]; v: [B, T, H, V]; HQ a multiple of H (GQA: query head hq reads key/value
    head hq // (HQ / H)); floating, one dtype, one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have rank 4 [B, T, H, D], got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k and v must agree in [B, T]; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k and v must have the same number of heads; got k {tuple(k.shape)}, v {tuple(v.shape)}")
    if k.shape[2] == 0 and q.shape[2] != 0 or k.shape[2] and q.shape[2] % k.shape[2]:
        raise ValueError(
            f"q's heads ({q.shape[2]}) must be a multiple of k's and v's heads ({k.shape[2]}) (GQA groups)"
        )
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"k must have the head dim K of q ({q.shape[3]}), got {k.shape[3]}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k and v must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k and v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[3] < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1, got K={q.shape[3]}, V={v.shape[3]}")
