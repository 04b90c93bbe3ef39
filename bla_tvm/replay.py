"""Eager inference of fresh sequences, replayed: a repeated small call costs its allocations and launches.

A call of ``blurry_window_attention`` that wants no gradient, is not traced (torch.compile) or captured (CUDA
graph), starts fresh sequences (no initial_state, no cu_seqlens) and returns no final state launches kernels that
depend, past its inputs' data, only on a key: q, k and v's shapes, dtypes and devices, the layer's arguments (ints,
or None; a call with another type is not replayed), the scale (an int, a float or None), and what chose the
kernels (the environment, ``env.snapshot``, and the tuning logs read, ``tuning_logs.generation``). The first
call of a key runs ``ops.run_forward`` and records its launches; a later call with the same key launches the
same kernels with the same constants, chunk layout and zero initial state, its own q, k, v, a new o and new
temporaries of the recorded shapes and dtypes (empty: ``ops.launch_forward`` writes each before reading it,
``ops.FORWARD_TEMPORARIES``). The argument checks are not repeated: they read nothing outside the key, so a key
seen before passed them.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass

import torch

from . import env, tuning_logs
from .ops import FORWARD_TEMPORARIES
from .runtime import BoundLaunch, Launch, kernel_ready, record_launches

#: the per-call arguments of the forward's kernels: the call's tensors and ``FORWARD_TEMPORARIES``
PER_CALL = ("q", "k", "v", "o", *FORWARD_TEMPORARIES)
#: recorded forwards kept (least recently used dropped first)
CAPACITY = 64


@dataclass(frozen=True)
class ReplayedForward:
    """The launches of one recorded forward, to run again on new q, k, v of the recorded key."""

    launches: tuple[BoundLaunch, ...]
    temporaries: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]  # (name, shape, dtype)
    output_shape: tuple[int, ...]
    device: torch.device

    @classmethod
    def from_launches(cls, launches: list[Launch], q: torch.Tensor, v: torch.Tensor) -> "ReplayedForward":
        temporaries = {}
        for launch in launches:
            for name, x in zip(launch.kernel.kernel.args, launch.args):
                if name in FORWARD_TEMPORARIES:
                    temporaries[name] = (name, tuple(x.shape), x.dtype)
        bound = tuple(BoundLaunch.bind(launch, PER_CALL) for launch in launches)
        return cls(bound, tuple(temporaries.values()), (*q.shape[:3], v.shape[3]), q.device)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """o [B, T, HQ, V] of q, k, v (the recorded key's shapes, dtype and device)."""
        o = torch.empty(self.output_shape, dtype=q.dtype, device=self.device)
        tensors = {"q": kernel_ready(q), "k": kernel_ready(k), "v": kernel_ready(v), "o": o}
        for name, shape, dtype in self.temporaries:
            tensors[name] = torch.empty(shape, dtype=dtype, device=self.device)
        for launch in self.launches:
            launch(tensors, self.device)
        return o


_RECORDED: collections.OrderedDict[tuple, ReplayedForward] = collections.OrderedDict()
_LOCK = threading.Lock()


def key(q, k, v, window, resolution, num_slots, scale) -> tuple | None:
    """The replay key of a fresh, final-state-free call (see the module docstring), or None where the call may
    not be replayed: an argument not a tensor, gradients wanted, torch.compile tracing, a CUDA graph capturing."""
    if not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)):
        return None
    if not (type(window) is int and type(resolution) is int and (num_slots is None or type(num_slots) is int)
            and (scale is None or type(scale) in (int, float))):  # fmt: skip
        return None  # (the checks name the argument; an unhashable one would fail the lookup)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return None
    if torch.compiler.is_compiling():
        return None
    device = q.device
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return None  # the capture's memory is the graph's: allocate as the op does (``state.zero_initial``)
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, device, k.device, v.device,
            window, resolution, num_slots, scale, env.snapshot(), tuning_logs.generation())  # fmt: skip


def recorded(replay_key: tuple) -> ReplayedForward | None:
    """The forward recorded for ``replay_key``, if any."""
    found = _RECORDED.get(replay_key)
    if found is not None:
        with _LOCK:
            if replay_key in _RECORDED:
                _RECORDED.move_to_end(replay_key)
    return found


def record(replay_key: tuple, forward, q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """o of ``forward()`` (a fresh, final-state-free ``ops.run_forward`` call on q, k, v), its launches recorded
    under ``replay_key``."""
    with record_launches() as launches:
        o = forward()
    replayed = ReplayedForward.from_launches(launches, q, v)
    with _LOCK:
        _RECORDED[replay_key] = replayed
        while len(_RECORDED) > CAPACITY:
            _RECORDED.popitem(last=False)
    return o
