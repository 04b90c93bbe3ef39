"""CUDA schedule of the one-token decode step (``bla_tvm.compute.decode``): one thread block per (batch, kv head).

The step is memory bound: it reads the state X | Y once and writes it once (N (K + V) values per (b, h)); the
readout is a few hundred FLOPs per value. So the block's threads own the state's columns: thread f loads
column f of X | Y (and f + threads, ...) with one coalesced load per row, keeps it in registers, rotates it,
forms its removal value and writes the new column once, to shared memory. From there the readout (z = X' q, scores, softmax,
w = p C, o = w Y') runs over the block's threads, and X', Y' are copied to global memory, coalesced.
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm

from .cpu_decode import decode_step_loops

#: the per-column chain of the stacked state X | Y: loaded, R S, the removal b^T R S / W, A S + b new^T
CHAIN = ("bla_dec_loaded", "bla_dec_rotated", "bla_dec_removed", "bla_dec_state")
#: the readout, in order; each stage's outputs spread over the threads, its reduction serial in a register
READOUT = (
    "bla_dec_z", "bla_dec_scores", "bla_dec_row_max", "bla_dec_probs", "bla_dec_w", "bla_dec_mix",
    "bla_dec_row_sum", "bla_dec_out",
)  # fmt: skip
#: stages recomputed where they are read instead of stored
INLINED = ("bla_dec_logits",)
#: the copies of X', Y' from shared memory to the outputs
OUTPUTS = ("bla_dec_key_out", "bla_dec_value_out")
#: where the new state lives (dynamic: no 48 KB limit) and where the readout's small vectors live (TVM 0.27's
#: shared-memory merging fails on a reduction's register write-back into "shared.dyn")
STATE_SCOPE = "shared.dyn"
SHARED = "shared"
#: the softmax's row reductions, by the stage that reads them: each thread of that stage computes its row's max
#: (sum) itself, in a register, from the scores in shared memory (all threads read the same words: broadcasts).
#: Neither way of sharing one result fails safe in TVM 0.27: an all-reduce over fewer threads than the block has
#: runs over all of them (the extra threads fold stale shared memory into the max and the sum: 10% error on the
#: H200 at M = 63 with 64 threads), and one thread's register write-back into shared memory loses its guard
#: (every thread stores its uninitialised register: o off by 260% on the H200).
ROW_REDUCTIONS = {"bla_dec_probs": "bla_dec_row_max", "bla_dec_out": "bla_dec_row_sum"}


@dataclass(frozen=True)
class DecodeCudaConfig:
    """Knobs of the CUDA decode schedule.

    threads: threads per block; the state's K + V columns are spread over them (wider ones loop). At the
        bench shape (K = V = 64, N = M = 63, fp32 state) 64 threads, two columns each, took 42.2 us on the H200
        against 49.2 us for 128 threads, one column each (255 against 95 registers: the readout, not the
        memory, is the critical path); but 64 threads spill ~900 bytes at M = 512, so 128 stays the default.
    pad: shared-memory rows of X' | Y' padded by one element when True, so that threads reading down a column
        (z = X' q) hit distinct banks.
    rotated_in_registers: keep R S in a register array beside the loaded column (else recomputed from the
        loaded column where it is read: two multiply-adds, half the live registers).
    unroll_readout: unroll the readout's reductions (their operand loads in flight together; more code).
    """

    threads: int = 128
    pad: bool = True
    rotated_in_registers: bool = False
    unroll_readout: bool = True


def _spread(sch, block, threads: int, unroll: bool = True):
    """The block's own spatial loops fused and spread over the threads; a reduction runs serially in a register
    and is written back once by the thread that owns the output. Returns the thread loop."""
    loops = sch.get_loops(block)[2:]  # under the block's (b, h)
    iter_vars = sch.get(block).iter_vars[-len(loops):]
    spatial = [loop for loop, iv in zip(loops, iter_vars) if iv.iter_type == tvm.tirx.IterVar.DataPar]
    _, thread = sch.split(sch.fuse(*spatial), factors=[None, threads])
    sch.bind(thread, "threadIdx.x")
    if len(spatial) < len(loops):
        if unroll:  # independent operand loads in flight, one accumulator
            sch.unroll(sch.get_loops(block)[-1])
        write_back = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_back, thread, preserve_unit_loops=True)
    return thread


def _unroll_all_below(sch, block, loop) -> None:
    """Unroll the block's loops inside ``loop``: per-thread arrays indexed by constants stay in registers."""
    loops = sch.get_loops(block)
    position = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(loop)))
    for inner in loops[position + 1:]:
        sch.unroll(inner)


def _schedule_chain(sch, threads: int, pad: bool, rotated_in_registers: bool) -> None:
    """The state's column chain: the new state's column loop over the threads, rows unrolled inside; the loaded
    column (one coalesced load per row) and the removal value computed at that thread loop, in registers, and R S
    too or recomputed where read; the new state in shared memory (rows padded by one element with ``pad``)."""
    loaded, rotated, removed, state = (sch.get_sblock(name) for name in CHAIN)
    *_, n, f = sch.get_loops(state)
    sch.reorder(f, n)
    _, f_thread = sch.split(f, factors=[None, threads])
    sch.bind(f_thread, "threadIdx.x")
    local = [loaded, removed]
    if rotated_in_registers:
        local.insert(1, rotated)
    else:
        sch.compute_inline(rotated)
    for block in reversed(local):  # consumers first
        sch.compute_at(block, f_thread, preserve_unit_loops=True)
    for block in local:
        sch.set_scope(block, 0, "local")
        _unroll_all_below(sch, block, f_thread)
    sch.set_scope(state, 0, STATE_SCOPE)
    _unroll_all_below(sch, state, f_thread)
    if pad:
        sch.storage_align(state, 0, axis=2, factor=32, offset=1)


def schedule_decode_step(func, spec, config=None):
    """o[b, h, g, v] and X', Y' [b, h, n, :]: every stage inside one (b, h) loop pair (``cpu_decode.
    decode_step_loops``), bound to blocks (h -> blockIdx.x, b -> blockIdx.y); see the module docstring."""
    config = config if isinstance(config, DecodeCudaConfig) else DecodeCudaConfig()
    sch = tvm.s_tir.Schedule(func)
    b, h = decode_step_loops(sch)
    sch.bind(h, "blockIdx.x")
    sch.bind(b, "blockIdx.y")
    _schedule_chain(sch, config.threads, config.pad, config.rotated_in_registers)
    for name in INLINED:
        sch.compute_inline(sch.get_sblock(name))
    for name in READOUT:
        block = sch.get_sblock(name)
        if name in ROW_REDUCTIONS.values():
            continue  # computed by each thread that reads it, below
        if name != "bla_dec_out":
            sch.set_scope(block, 0, SHARED)
        thread = _spread(sch, block, config.threads, config.unroll_readout)
        reduction = ROW_REDUCTIONS.get(name)
        if reduction is not None:  # the row's max (sum) of the softmax, in a register of every thread using it
            row = sch.get_sblock(reduction)
            sch.compute_at(row, thread, preserve_unit_loops=True)
            sch.set_scope(row, 0, "local")
            sch.unroll(sch.get_loops(row)[-1])
    for name in OUTPUTS:
        _spread(sch, sch.get_sblock(name), config.threads)
    return sch
