"""The kernel table: every compiled BLA kernel, its ordered argument names, its phase and whether it is tuned.

The one contract between the compute (``compute/``: the PrimFunc's parameters, in this order), the schedules
(``schedules/``: one rule per name), the build (``build.py``), the tuner and the ops (``runtime.launch`` passes
arguments by these names). Imports neither tvm nor torch.

Argument names are those of the tensors the ops hold: ``q, k, v`` ([B, T, HQ | H, K | V]), ``states``
(X | Y at chunk starts [B, NC, H, N, F]), the layout's tables (``positions``, ``starts``, ``end_*``), the chunk
constants (``dispatch.device_constants``: ``state_in``, ``state_decay``, ``input_map``, ...) and the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

PHASES = ("forward", "backward", "decode")

#: the inputs every per-chunk kernel (forward output, backward) reads, in order (``compute.forward.ChunkInputs``)
CHUNK_INPUTS = (
    "q", "k", "v", "states", "positions", "scale", "input_map", "lag_basis", "slot_readout", "rot_diag", "rot_off",
)  # fmt: skip
#: the constant tables of the tile-program forward (``tile_constants.TileConstants``, ``dispatch.tile_device_constants``)
TILE_CONSTANTS = (
    "tile_input_map", "tile_lag", "tile_lag_t", "tile_slots", "tile_slots_t", "tile_rot_diag", "tile_rot_pair",
    "tile_rot_pair_t",
)  # fmt: skip
#: the tables the tile-program backward reads beyond the forward's
TILE_BACKWARD_CONSTANTS = ("tile_input_map_t",)
#: the tables of the tile-program reverse scan (``tile_constants.reverse_scan_tables``)
TILE_REVERSE_SCAN_CONSTANTS = ("tile_decay_t_hi", "tile_decay_t_lo", "tile_state_in_t_hi", "tile_state_in_t_lo")
#: the tables of the tile-program scan (``tile_constants.scan_tables``)
TILE_SCAN_CONSTANTS = ("tile_state_in_hi", "tile_state_in_lo", "tile_decay_hi", "tile_decay_lo")
#: the decode step's arguments less its state dtype (``compute.decode.decode_step``)
DECODE_ARGS = (
    "q", "k", "v", "key_state", "value_state", "seen", "scale", "rot_diag", "rot_off", "basis", "removal",
    "slot_readout", "slot_readout_t", "o", "key_out", "value_out",
)  # fmt: skip

#: the decode kernels and the state dtype each stores (None: the accumulation dtype)
DECODE_STATE_DTYPES = {
    "decode_step": None, "decode_step_state_float16": "float16", "decode_step_state_bfloat16": "bfloat16",
}  # fmt: skip


@dataclass(frozen=True)
class Kernel:
    """One compiled kernel: ``name`` (exported as ``bla_<name>``), ``args`` (its parameters in order, outputs
    last), ``phase`` (one of PHASES), ``final_state`` (runs only for calls that return or differentiate the final
    states), ``tunable`` (its schedule takes a searched config; ``schedules/space.py``) and ``implements`` (the
    kernel it can stand in for where ``dispatch`` picks it: its own constants, the same outputs or those the op
    reads of them, as its args name them; None for the kernels every call names), ``absorbs`` (kernels whose work
    it does as well, which then do not run)."""

    name: str
    args: tuple[str, ...]
    phase: str
    final_state: bool = False
    tunable: bool = False
    implements: str | None = None
    absorbs: tuple[str, ...] = ()

    def __post_init__(self):
        if self.phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {self.phase!r}")
        if len(set(self.args)) != len(self.args):
            raise ValueError(f"{self.name}: argument names must be distinct, got {self.args}")

    @property
    def symbol(self) -> str:
        """Name of the function a compiled module of this kernel exports."""
        return f"bla_{self.name}"


TABLE = (
    Kernel("chunk_state", ("k", "v", "state_in", "contributions"), "forward", tunable=True),
    Kernel("state_scan", ("contributions", "state_decay", "initial", "starts", "states"), "forward"),
    Kernel("chunk_output", (*CHUNK_INPUTS, "o"), "forward", tunable=True),
    # the CUDA forward's scan fused with the chunk-local contributions, a tile program (schedules/cuda_tile_scan.py)
    # (it also writes each sequence's end_states, the final state's input, so its states may be float16)
    Kernel("state_scan_tile", ("k", "v", *TILE_SCAN_CONSTANTS, "initial", "starts", "ends", "states", "end_states"),
           "forward", implements="state_scan", absorbs=("chunk_state",)),  # fmt: skip
    # the CUDA forward's per-chunk output as a tile program, for 16-bit inputs (schedules/cuda_tile_forward.py)
    Kernel("chunk_output_tile", ("q", "k", "v", "states", "positions", "scale", *TILE_CONSTANTS, "o"), "forward",
           implements="chunk_output"),  # fmt: skip
    Kernel("final_state", ("end_states", "k", "v", "end_row", "end_chunk", "end_length", "final_map", "final"),
           "forward", final_state=True),  # fmt: skip
    Kernel("final_state_backward", ("dfinal", "end_length", "final_map", "final_grads"), "backward", final_state=True),
    Kernel("chunk_backward", (*CHUNK_INPUTS, "do", "grads"), "backward", tunable=True),
    # the CUDA backward's per-chunk gradients as a tile program, for 16-bit inputs (schedules/cuda_tile_backward.py)
    # (it writes dq itself; grads holds only the state rows, the local d(k | v) go to local_k, local_v)
    Kernel("chunk_backward_tile", ("q", "k", "v", "states", "positions", "scale", *TILE_CONSTANTS,
                                   *TILE_BACKWARD_CONSTANTS, "do", "gradient_scale", "grads", "local_k", "local_v",
                                   "dq"), "backward", implements="chunk_backward", absorbs=("input_gradient_q",)),
    Kernel("state_scan_reverse", ("grads", "state_decay_t", "starts", "state_grads"), "backward"),
    # the CUDA backward's reverse scan with the gradients of k and v, a tile program (cuda_tile_scan_reverse.py),
    # reading grads, local_k, local_v as chunk_backward_tile writes them (local_k, local_v may be dk, dv
    # themselves); of the state gradients it writes only those at the sequences' starts (initial_grads)
    Kernel("state_scan_reverse_tile",
           ("grads", "local_k", "local_v", *TILE_REVERSE_SCAN_CONSTANTS, "starts", "gradient_scale", "initial_grads",
            "dk", "dv"),
           "backward", implements="state_scan_reverse", absorbs=("input_gradient_k", "input_gradient_v")),  # fmt: skip
    Kernel("input_gradient_q", ("grads", "dq"), "backward", tunable=True),
    *(Kernel(f"input_gradient_{x}", ("grads", "state_grads", "starts", "state_in", f"d{x}"), "backward", tunable=True)
      for x in "kv"),  # fmt: skip
    # one decode kernel per stored state dtype: the accumulation dtype, or float16 / bfloat16
    *(Kernel(name, DECODE_ARGS, "decode") for name in DECODE_STATE_DTYPES),
)

by_name: dict[str, Kernel] = {kernel.name: kernel for kernel in TABLE}


def names(phase: str, final_state: bool = True) -> tuple[str, ...]:
    """The kernels of ``phase``, in table order; without ``final_state``, less the final-state ones."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    return tuple(
        k.name for k in TABLE if k.phase == phase and k.implements is None and (final_state or not k.final_state)
    )


def get(name: str) -> Kernel:
    """The table entry of ``name``; ValueError naming the known kernels otherwise."""
    if name not in by_name:
        raise ValueError(f"kernel must be one of {sorted(by_name)}, got {name!r}")
    return by_name[name]


FORWARD = names("forward")
BACKWARD = names("backward")
DECODE = names("decode")
TUNABLE = tuple(k.name for k in TABLE if k.tunable)
