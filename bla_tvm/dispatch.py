"""Dispatch: what one call runs. From the device, the ``LayerSpec`` and q's shape, ``chunk_size`` chooses the
chunk length L and ``plan_call`` builds the ``CallPlan``: the kernels the call launches, each with its tuned
schedule, and the device constants they read. Imports only torch, tvm_ffi and the package's runtime.

Chunk length: the tuning log's record for this device, layer and mode (inference or training: the forward and
backward of one call must agree on L) nearest the running shape (``tuning_logs``); else 64 on the CPU and, on
CUDA, the longest L whose per-chunk blocks fit in the device's shared memory by ``cuda_shared_memory_bound`` (an
upper bound, as if no buffer reused another's space: no kernel is lowered to measure it), the shortest where none
does. A logged L that would take a buffer past 32-bit indexing is refused for the default. CUDA calls take L = 64
wherever the tile programs serve the layer (16-bit inputs) and fit the device (sm_80 or newer, their blocks
within its shared memory: ``tile_programs_fit``; ``implementation``): the tile forward runs in place of
``chunk_output``, the tile backward in place of ``chunk_backward``, the tile scans in place of ``state_scan`` (and
``chunk_state``) and ``state_scan_reverse``.

Which logs: ``log_folders()``, the user's (``BLA_TVM_TUNING_DIR``) then the shipped ones, none with
``BLA_TVM_NO_TUNING=1``; a caller (the tuner) may pass its own folders and kernel library instead.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass

import torch

from . import env, kernels, tuning_logs
from .constants import chunk_constants
from .cuda_arch import CudaArch, device_arch
from .layer import CHUNK_SIZES, MAX_ELEMENTS, KernelSpec, LayerSpec
from .params import BLAParams
from .runtime import CompiledKernel, KernelLibrary, default_library, device_identity, device_kind, source_digest
from .tile_constants import (
    SLOT_TILE, TILE_CHUNK, reverse_scan_tables, scan_tables, tile_backward_serves, tile_constants, tile_forward_serves,
    tile_programs_fit, tile_scan_serves, tile_states_half,
)  # fmt: skip


def cuda_shared_memory_bound(L: int, N: int, M: int, K: int, V: int, backward: bool = True) -> int:  # noqa: E741
    """Upper bound on the bytes of shared memory of one block of the per-chunk kernels: every fp32
    intermediate of ``compute.forward.chunk_output`` (and with ``backward`` of ``compute.backward.
    chunk_backward``, which recomputes the forward's) at once, as if none reused another's space.

    q [L, K]; [k|v; X|Y] [L + N, F]; k'|v' [L, F]; [k'; X] [L + N, K]; qx [L, L + N]; z, z_intra, w [L, N];
    scores, probs [L, M]; g [L, L]; mix [L, L + N]; [v'; Y] [L + N, V]; o [L, V]; row max and sum [L]; the first
    non-finite rows of [k|v; X|Y] and [v'; Y] [F + V] (int32, 4 bytes too).
    """
    F = K + V
    rows = L + N
    forward = L * K + rows * F + L * F + rows * K + 2 * L * rows + 3 * L * N + 2 * L * M + L * L + rows * V + L * V
    forward += F + V
    # the backward recomputes those and adds: dO, P, mix / rowsum, dmix, d[v'; Y], dw (twice), dP, dscores,
    # dz, dqx (lagged and stacked), dq, d[k'; X], d[kv; X|Y], the row dot products, and the finite copies of
    # [k'; X], q and dO with their first or last non-finite rows
    gradients = L * V + L * M + 2 * L * rows + rows * V + 2 * L * N + 2 * L * M + L * N + L * L + L * rows
    gradients += L * K + rows * K + rows * F
    gradients += rows * K + L * K + L * V + 2 * K + V
    return 4 * (forward + (gradients if backward else 0) + 3 * L)


def default_chunk_size(device: torch.device, layer: LayerSpec, backward: bool, arch: CudaArch | None = None) -> int:
    """L where no log has one: 64 on the CPU; on CUDA (``arch``, default the device's) the tile programs' where
    they serve the layer and fit the arch (``tile_runs``), else the longest that fits ``cuda_shared_memory_bound``
    in the arch's shared memory, else the shortest."""
    if device_kind(device) == "cpu":
        return CHUNK_SIZES[0]
    arch = device_arch(device) if arch is None else arch
    if tile_runs(layer.kernel(TILE_CHUNK), backward, arch):
        return TILE_CHUNK
    N, M, K, V = layer.resolution, layer.num_slots, layer.head_k, layer.head_v
    fits = [L for L in CHUNK_SIZES if cuda_shared_memory_bound(L, N, M, K, V, backward) <= arch.shared_memory]
    return fits[0] if fits else CHUNK_SIZES[-1]


def tile_runs(spec: KernelSpec, backward: bool, arch: CudaArch) -> bool:
    """Whether a CUDA call on ``arch`` at ``spec`` runs the tile forward (and with ``backward`` the tile
    backward): they serve the spec and fit the arch (``tile_programs_fit``)."""
    serves = tile_backward_serves if backward else tile_forward_serves
    return serves(spec) and tile_programs_fit(spec, arch)


@torch.compiler.assume_constant_result
def _tile_chunk(device: str, layer: tuple, backward: bool) -> bool:
    """``tile_runs`` at L = 64 for ``layer`` (``_layer_key``) on ``device``: one constant call under
    torch.compile (the device's properties are read outside the graph)."""
    return tile_runs(LayerSpec(**dict(layer)).kernel(TILE_CHUNK), backward, device_arch(torch.device(device)))


def log_folders(environment: tuple | None = None) -> tuple[str, ...]:
    """The tuning-log folders the environment configures (``environment``: its ``env.snapshot()``, if the caller
    took one), in search order (none with BLA_TVM_NO_TUNING=1)."""
    return _log_folders(env.snapshot() if environment is None else environment)


@functools.lru_cache(maxsize=16)
def _log_folders(_environment: tuple) -> tuple[str, ...]:
    if not env.tuning_enabled():
        return ()
    return (str(env.tuning_dir()), str(tuning_logs.shipped_dir()))


@functools.lru_cache(maxsize=64)
def _identity_json(device: str) -> str:
    return json.dumps(device_identity(torch.device(device)), sort_keys=True)


def _sources() -> str | None:
    try:
        return source_digest()
    except OSError:
        return None


def log_index(device: torch.device, folders: tuple[str, ...]) -> tuning_logs.LogIndex:
    """The records of the logs in ``folders`` that apply to ``device``."""
    return tuning_logs.index(_identity_json(str(device)), tuple(map(str, folders)), _sources())


def _layer_key(layer: LayerSpec) -> tuple:
    return (("dtype", layer.dtype), ("group_size", int(layer.group_size)), ("head_k", int(layer.head_k)),
            ("head_v", int(layer.head_v)), ("num_slots", int(layer.num_slots)),
            ("resolution", int(layer.resolution)), ("window", int(layer.window)))  # fmt: skip


@torch.compiler.assume_constant_result
def _any_logged(device: str, backward: bool, folders: tuple[str, ...] | None) -> bool:
    """Whether any log in ``folders`` (None: ``log_folders()``) has a chunk length for this device and mode:
    decided without reading the layer's (possibly symbolic) sizes, as one constant call under torch.compile."""
    folders = log_folders() if folders is None else folders
    mode = tuning_logs.MODES[backward]
    if log_index(torch.device(device), folders).has_chunk_sizes(mode):
        return True
    if folders:
        tuning_logs.report_once(
            ("no-log", device, mode), logging.INFO,
            f"no tuning log has {mode} chunk lengths for {device}: default chunk lengths and schedules (run "
            f"`bla-tvm tune` to tune them)",
        )  # fmt: skip
    return False


@torch.compiler.assume_constant_result
def _logged_chunk_sizes(device: str, layer: tuple, backward: bool, folders: tuple[str, ...] | None) -> tuple:
    """(L, B, T, H) of every chunk-length record of ``layer`` (``_layer_key``) in the mode; one call that
    torch.compile treats as a constant. ``folders`` None: ``log_folders()``."""
    folders = log_folders() if folders is None else folders
    mode, params = tuning_logs.MODES[backward], dict(layer)
    found = log_index(torch.device(device), folders).chunk_sizes(mode, params)
    if not found:
        tuning_logs.report_once(
            ("no-chunk", device, mode, layer), logging.INFO,
            f"no tuning record for the {mode} chunk length of {' '.join(f'{k}={v}' for k, v in layer)} on "
            f"{device}: default chunk length and schedules (run `bla-tvm tune` to tune them)",
        )  # fmt: skip
    return found


def chunk_size(device: torch.device, layer: LayerSpec, shape, backward: bool, folders=None) -> int:
    """The chunk length L of a call of ``layer`` on q of ``shape`` (B, T, HQ, K) on ``device``, for training
    (``backward``) or inference (see the module docstring). ``folders``: tuning-log folders (default
    ``log_folders()``).

    Runs where the public function runs, so also under torch.compile: the log lookup is one constant call, and
    the shape is read only where the records disagree between buckets (which then specialises a dynamic-shape
    graph on B, T, H)."""
    folders = None if folders is None else tuple(map(str, folders))
    if device_kind(device) == "cuda" and _tile_chunk(str(device), _layer_key(layer), bool(backward)):
        return TILE_CHUNK  # the tile programs have one chunk length (the logs measured the TE kernels)
    if not _any_logged(str(device), bool(backward), folders):
        return default_chunk_size(device, layer, backward)
    found = _logged_chunk_sizes(str(device), _layer_key(layer), bool(backward), folders)
    if found:
        if len({L for L, *_ in found}) == 1 and not all(isinstance(x, int) for x in shape[:3]):
            return found[0][0]  # no need to read a symbolic shape
        B, T, H = (int(x) for x in shape[:3])
        L = min(found, key=lambda f: tuning_logs.bucket_distance(dict(zip("BTH", f[1:])), (B, T, H)))[0]
        if layer.largest_buffer((B, T, H), L, backward) <= MAX_ELEMENTS:
            return L  # a shorter L means more chunks: never refuse a shape the default L can run
    return default_chunk_size(device, layer, backward)


@functools.lru_cache(maxsize=128)
def device_constants(params: BLAParams, chunk_size: int, dtype: torch.dtype, device: torch.device, scale: float):
    """The chunk constants by the kernels' argument names (contiguous, accumulation dtype, on ``device``)."""
    cc = chunk_constants(params, chunk_size)
    tables = {
        "state_in": cc.state_in, "state_decay": cc.state_decay, "state_decay_t": cc.state_decay.T,
        "final_map": cc.final_map, "input_map": cc.input_map, "lag_basis": cc.lag_basis, "slot_readout": cc.base.C,
        "rot_diag": cc.rot_diag, "rot_off": cc.rot_off, "scale": torch.tensor([scale], dtype=cc.state_in.dtype),
    }  # fmt: skip
    return {name: x.to(device=device, dtype=dtype).contiguous() for name, x in tables.items()}


@dataclass(frozen=True)
class CallPlan:
    """What one call runs: the KernelSpec at the chosen L, the kernels it launches by name (each loaded with
    its tuned schedule) and the device constants they read, by argument name."""

    spec: KernelSpec
    kernels: dict[str, CompiledKernel]
    constants: dict[str, torch.Tensor]

    @property
    def chunk_size(self) -> int:
        return self.spec.chunk_size


def phase_kernels(backward: bool, final_state: bool) -> tuple[str, ...]:
    """The kernels a call launches: the forward's, and with ``backward`` the backward's; the final-state ones
    only with ``final_state``."""
    return kernels.names("forward", final_state) + (kernels.names("backward", final_state) if backward else ())


def plan_call(
    device: torch.device, spec: KernelSpec, shape, names, scale: float, library: KernelLibrary | None = None,
    folders=None, configs: dict | None = None,
) -> CallPlan:  # fmt: skip
    """The plan of a call of the kernels ``names`` at ``spec`` (L chosen by ``chunk_size``) on q of ``shape``
    (B, T, HQ, ...) on ``device``. Each kernel takes the config the tuning logs in ``folders`` (default
    ``log_folders()``) give for the nearest bucket, or ``configs[name]`` where ``configs`` names it (None: the
    default schedule); from ``library`` (default ``default_library()``). A logged config that cannot be loaded
    or built is reported once and the default schedule is used."""
    environment = env.snapshot() if library is None or folders is None else None
    library = default_library(environment) if library is None else library
    folders = log_folders(environment) if folders is None else tuple(map(str, folders))
    logs = log_index(device, folders)
    if configs is None:
        return _plan(device, spec, tuple(int(x) for x in shape[:3]), tuple(names), float(scale), library, logs)
    chosen = {name: configs[name] if name in configs else logs.config(name, spec.as_dict(), shape) for name in names}
    loaded = {name: library.function(name, spec, device, config) for name, config in chosen.items()}
    return CallPlan(spec, loaded, device_constants(spec.params, spec.chunk_size, _acc(spec), device, float(scale)))


def _acc(spec: KernelSpec) -> torch.dtype:
    return getattr(torch, spec.acc_dtype)


#: the tile programs that stand in for a kernel on CUDA, and the specs each serves (``tile_constants``)
TILE_PROGRAMS = {"chunk_output": ("chunk_output_tile", tile_forward_serves),
                 "chunk_backward": ("chunk_backward_tile", tile_backward_serves),
                 "state_scan": ("state_scan_tile", tile_scan_serves),
                 "state_scan_reverse": ("state_scan_reverse_tile", tile_scan_serves)}  # fmt: skip


def implementation(name: str, spec: KernelSpec, device: torch.device, arch: CudaArch | None = None) -> str:
    """The kernel that runs ``name`` for ``spec`` on ``device``: on CUDA (``arch``, default the device's) the tile
    program of ``TILE_PROGRAMS`` where it serves the spec and the tile programs fit the arch
    (``tile_programs_fit``), else ``name``."""
    if name in TILE_PROGRAMS and device_kind(device) == "cuda" and TILE_PROGRAMS[name][1](spec):
        if tile_programs_fit(spec, device_arch(device) if arch is None else arch):
            return TILE_PROGRAMS[name][0]
    return name


def states_dtype(spec: KernelSpec, device: torch.device) -> torch.dtype:
    """The dtype of the chunk-start states a forward on ``device`` saves: float16 where the tile scan writes them
    for the tile forward and backward (``tile_constants.tile_states_half``), else the accumulation dtype."""
    if implementation("state_scan", spec, device) == "state_scan_tile" and tile_states_half(spec):
        return torch.float16
    return _acc(spec)


def implementations(names, spec: KernelSpec, device: torch.device, arch: CudaArch | None = None) -> dict[str, str]:
    """{kernel a call names: the kernel that runs it} for ``names`` (on CUDA: on ``arch``, default the device's),
    less the kernels an implementation absorbs (``kernels.Kernel.absorbs``)."""
    chosen = {name: implementation(name, spec, device, arch) for name in names}
    absorbed = {gone for runs in chosen.values() for gone in kernels.get(runs).absorbs}
    return {name: runs for name, runs in chosen.items() if name not in absorbed}


@functools.lru_cache(maxsize=32)
def tile_device_constants(runs: str, params: BLAParams, chunk_size: int, device: torch.device) -> dict:
    """The tables of the tile program ``runs`` by argument name, on ``device``: float16 operands, float32
    rotations."""
    if runs in ("state_scan_tile", "state_scan_reverse_tile"):
        tables = (scan_tables if runs == "state_scan_tile" else reverse_scan_tables)(params, chunk_size)
        return {name: x.to(device=device, dtype=torch.float16).contiguous() for name, x in tables.items()}
    tc = tile_constants(params, chunk_size, SLOT_TILE)
    half = {"tile_input_map": tc.input_map, "tile_lag": tc.lag, "tile_lag_t": tc.lag_t, "tile_slots": tc.slots,
            "tile_slots_t": tc.slots_t}  # fmt: skip
    if runs == "chunk_backward_tile":
        half["tile_input_map_t"] = tc.input_map_t
    single = {"tile_rot_diag": tc.rot_diag, "tile_rot_pair": tc.rot_pair, "tile_rot_pair_t": tc.rot_pair_t}
    return {
        **{name: x.to(device=device, dtype=torch.float16).contiguous() for name, x in half.items()},
        **{name: x.to(device=device, dtype=torch.float32).contiguous() for name, x in single.items()},
    }


@functools.lru_cache(maxsize=256)
def _plan(device, spec, shape, names, scale, library, logs) -> CallPlan:
    """The plan, once per (device, spec, shape, kernels, scale, library, logs read): ``tuning_logs.reload``
    gives a new index, hence new plans. A kernel run by another implementation (``implementation``) takes that
    implementation's default schedule: the logs measured ``name``'s."""
    loaded = {}
    constants = dict(device_constants(spec.params, spec.chunk_size, _acc(spec), device, scale))
    for name, runs in implementations(names, spec, device).items():
        if runs != name:
            loaded[name] = library.function(runs, spec, device)
            constants.update(tile_device_constants(runs, spec.params, spec.chunk_size, device))
        else:
            loaded[name] = _tuned_or_default(library, name, spec, device, logs.config(name, spec.as_dict(), shape))
    return CallPlan(spec, loaded, constants)


def _tuned_or_default(library: KernelLibrary, name: str, spec: KernelSpec, device, config) -> CompiledKernel:
    if config is not None:
        try:
            return library.function(name, spec, device, config)
        except Exception as error:  # noqa: BLE001 - a stale or foreign config must not stop the call
            tuning_logs.report_once(
                ("unloadable", name, spec, json.dumps(config, sort_keys=True)), logging.WARNING,
                f"tuned schedule {config} of {name} for {spec.tag()} is unusable ({error}); using the default",
            )  # fmt: skip
    return library.function(name, spec, device)
