"""CUDA schedules for the BLA kernels: how the compute in ``bla_tvm.compute`` runs on a GPU.

One thread block per (chunk, batch, head): blockIdx.x = chunk, .y = head, .z = batch. Every per-chunk stage is
computed inside the block with its intermediates in shared memory (one dynamic allocation, reused between stages
whose lifetimes do not overlap). In fp16/bf16 kernels the plain matrix products run on the tensor cores, a warp
per 16 x 16 output tile (``cuda_tensorcore``); the other contractions give each thread a register tile of
outputs, the remaining stages one output per thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import tvm

from . import cuda_tensorcore
from .common import (
    chunk_loops,
    intermediate_buffers,
    is_contraction,
    output_name,
    unguarded_write_backs,
)

#: stages recomputed where they are read instead of stored
CUDA_INLINED = ("bla_fwd_kv_chunk", "bla_fwd_logits")


@dataclass(frozen=True)
class CudaConfig:
    """Knobs of the CUDA schedules.

    threads: threads per block of the per-chunk kernels.
    tile: outputs (rows, columns) each thread of a contraction stage accumulates in registers.
    cache_operands: load each reduction step's operand slices into registers once per tile.
    tensor_cores: run the contractions that qualify on the tensor cores (WMMA, fp16 operands, fp32
        accumulation) in fp16/bf16 kernels (``cuda_tensorcore``); fp32 kernels always stay SIMT.
    """

    threads: int = 256
    tile: tuple[int, int] = (4, 4)
    cache_operands: bool = True
    tensor_cores: bool = True


def _bind_threads(sch, loops, threads):
    """Fuse ``loops`` (spatial, adjacent), split by ``threads`` and bind the inner part to threadIdx.x; with
    ``threads`` = (warps, lanes), to threadIdx.y and .x (the layout of kernels with tensor-core stages, whose
    warps are threadIdx.y). Returns the innermost thread loop."""
    if isinstance(threads, tuple):
        _, warp, thread = sch.split(sch.fuse(*loops), factors=[None, *threads])
        sch.bind(warp, "threadIdx.y")
    else:
        _, thread = sch.split(sch.fuse(*loops), factors=[None, threads])
    sch.bind(thread, "threadIdx.x")
    return thread


def _thread_count(threads) -> int:
    return threads[0] * threads[1] if isinstance(threads, tuple) else threads


def _spread_over_threads(sch, block, threads, spatial=None) -> None:
    """For a stage computed inside the chunk's block: its spatial loops (by default all of its own) spread over
    the threads; a reduction accumulates in a register and is written once, by the thread that owns it."""
    iter_vars = sch.get(block).iter_vars
    if spatial is None:
        inner = sch.get_loops(block)[-len(iter_vars):]
        spatial = [loop for loop, iv in zip(inner, iter_vars) if iv.iter_type == tvm.tirx.IterVar.DataPar]
    _bind_threads(sch, spatial, threads)
    reductions = sum(iv.iter_type != tvm.tirx.IterVar.DataPar for iv in iter_vars)
    if reductions:
        thread_loop = sch.get_loops(block)[-1 - reductions]
        write_back = sch.cache_write(block, 0, "local")
        sch.reverse_compute_at(write_back, thread_loop, preserve_unit_loops=True)


#: operands read along a diagonal (A[j, j - D]): caching their slice in registers defeats TVM's region
#: analysis, so they are read from shared memory directly
GATHERED = {
    "bla_fwd_z_intra": ("bla_fwd_qx",),
    "bla_bwd_dw_lag": ("bla_bwd_dmix",),
    "bla_bwd_dqx_lag": ("lag_basis",),
    # read through a k | v select, with the rows their non-finite inputs reach (compute.backward's d_stacked)
    "bla_bwd_d_kv_state": ("bla_bwd_dkeys", "bla_bwd_dvalues", "bla_bwd_q_bad", "bla_bwd_do_bad"),
}


def _tile_shape(rows: int, cols: int, threads: int, tile: tuple[int, int]) -> tuple[int, int]:
    """The register tile (at most ``tile``) with the least serial work per thread: tile rounds over the block
    times outputs per tile; ties go to the larger tile (fewer operand loads per multiply-add). Partial tiles at
    the edges are fine: every write-back stays under its bound check (``common.unguarded_write_backs``)."""

    def ceil(a: int, b: int) -> int:
        return (a + b - 1) // b

    def cost(shape):
        r, c = shape
        rounds = ceil(ceil(rows, r) * ceil(cols, c), threads)
        return (rounds * r * c, -r * c, -r)

    shapes = [(r, c) for r in range(1, min(rows, tile[0]) + 1) for c in range(1, min(cols, tile[1]) + 1)]
    return min(shapes, key=cost)


def _tile_over_threads(sch, block, threads, tile: tuple[int, int], cache_operands: bool = True) -> None:
    """For a contraction (loops unit c, b, h, then rows j, columns x, reduction r) inside the chunk's block:
    each thread owns a box of outputs, held in registers across the reduction, so each operand load feeds
    several multiply-adds; the box is written to shared memory once (partial boxes at the edges are
    predicated: see ``_tile_shape``)."""
    *_, row, col, red = sch.get_loops(block)
    shape = _tile_shape(int(sch.get(row).extent), int(sch.get(col).extent), _thread_count(threads), tile)
    operands = [region.source.name for region in sch.get(block).reads]
    gathered = GATHERED.get(sch.get(block).name_hint, ())
    operands = [name for name in operands if re.sub(r"(_shared\.dyn|_pad(_\d+)?)+$", "", name) not in gathered]
    row_o, row_i = sch.split(row, factors=[None, shape[0]])
    col_o, col_i = sch.split(col, factors=[None, shape[1]])
    sch.reorder(row_o, col_o, red, row_i, col_i)
    thread = _bind_threads(sch, [row_o, col_o], threads)
    for operand in operands if cache_operands else ():  # each step's operand slices, loaded into registers
        cache = sch.cache_read(block, operand, "local", [block])
        sch.compute_at(cache, red, preserve_unit_loops=True)
        _unroll_below(sch, cache, red)
    write_back = sch.cache_write(block, 0, "local")
    sch.reverse_compute_at(write_back, thread, preserve_unit_loops=True)
    _unroll_below(sch, write_back, thread)
    sch.unroll(row_i)
    sch.unroll(col_i)
    sch.decompose_reduction(block, red)


def _unroll_below(sch, block, loop) -> None:
    """Unroll the loops of ``block`` inside ``loop``: register arrays must be indexed by constants, or they
    go to local memory (a stack frame in ptxas's report)."""
    loops = sch.get_loops(block)
    position = next(i for i, candidate in enumerate(loops) if sch.get(candidate).same_as(sch.get(loop)))
    for inner in loops[position + 1:]:
        sch.unroll(inner)


def _bind_chunk_blocks(sch, c, b, h) -> None:
    sch.reorder(c, h, b)
    sch.bind(c, "blockIdx.x")
    sch.bind(h, "blockIdx.y")
    sch.bind(b, "blockIdx.z")


def schedule_chunk_state(func, spec, config: CudaConfig = CudaConfig()):
    """U[b, c, h, n, f]: a block per (c, b, h); the chunk's k | v staged in shared memory, each thread a
    register tile of U. U goes through shared memory on its way out: a register tile written straight into
    the kernel's output loses its bound check (``common.unguarded_write_backs``)."""
    sch = tvm.s_tir.Schedule(func)
    staged = sch.cache_write(sch.get_sblock("bla_fwd_chunk_state"), 0, "shared.dyn")
    return schedule_per_chunk(sch, sch.get(staged).name_hint, spec, config)


def schedule_per_chunk(sch, anchor: str, spec, config: CudaConfig, inlined=()):
    """Schedule a kernel whose ``anchor`` output is [B, T, H, X] and whose other stages are per chunk: t split
    into (chunk, position); a block per (c, b, h) computes every stage of its chunk, intermediates in shared
    memory, contractions on the tensor cores (``cuda_tensorcore``) or as register tiles, other stages spread
    over the threads."""
    threads, tensor_core_blocks = config.threads, []
    if config.tensor_cores and spec.dtype in cuda_tensorcore.TENSOR_CORE_DTYPES:
        for name in inlined:
            sch.compute_inline(sch.get_sblock(name))
        inlined = ()
        names = [
            sch.get(block).name_hint
            for block in sch.get_child_blocks(sch.get_sblock("root"))
            if is_contraction(sch, block) and sch.get(block).name_hint not in GATHERED
        ]
        threads = (config.threads // cuda_tensorcore.WARP, cuda_tensorcore.WARP)
        tensor_core_blocks = cuda_tensorcore.prepare(sch, names, threads[0])
    c, b, h = chunk_loops(sch, anchor, spec)
    inner = sch.get_loops(sch.get_sblock(anchor))[3:]
    _bind_chunk_blocks(sch, c, b, h)
    stages = [blk for blk in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(blk).name_hint != anchor]
    for block in reversed(stages):  # consumers first
        sch.compute_at(block, b, preserve_unit_loops=True)
    for name in inlined:
        sch.compute_inline(sch.get_sblock(name))
    intermediates = intermediate_buffers(sch)
    on_tensor_cores = {sch.get(step).name_hint: (step, operands) for step, operands in tensor_core_blocks}
    for block in sch.get_child_blocks(b):
        if sch.get(block).name_hint == anchor:
            continue
        if sch.get(block).writes[0].source.name in intermediates:
            sch.set_scope(block, 0, "shared.dyn")
        if sch.get(block).name_hint in on_tensor_cores:
            cuda_tensorcore.tensorize(sch, on_tensor_cores[sch.get(block).name_hint], threads[0])
        elif is_contraction(sch, block):
            _tile_over_threads(sch, block, threads, config.tile, config.cache_operands)
        else:
            _spread_over_threads(sch, block, threads)
    _bind_threads(sch, inner, threads)
    _check_write_backs(sch)
    return sch


def _check_write_backs(sch) -> None:
    """Refuse a schedule with a register write-back that could land outside its buffer (see
    ``common.unguarded_write_backs``): it would compile into a kernel that races with its neighbours."""
    (func,) = sch.mod.functions.values()
    unguarded = unguarded_write_backs(func)
    if unguarded:
        raise RuntimeError(f"register write-backs without a bound check (block, buffer, index, extent): {unguarded}")


def schedule_chunk_output(func, spec, config: CudaConfig = CudaConfig()):
    """o[b, t, h, v]: see ``schedule_per_chunk``."""
    return schedule_per_chunk(tvm.s_tir.Schedule(func), "bla_fwd_out", spec, config, CUDA_INLINED)


def schedule_chunk_backward(func, spec, config: CudaConfig = CudaConfig()):
    """grads[b, c, h, r, f]: see ``schedule_per_chunk``."""
    return schedule_per_chunk(tvm.s_tir.Schedule(func), "bla_bwd_grads", spec, config, CUDA_INLINED)


def schedule_input_gradient(func, spec, config: CudaConfig = CudaConfig()):
    """dq, dk or dv [B, T, H, X]: see ``schedule_per_chunk``."""
    sch = tvm.s_tir.Schedule(func)
    return schedule_per_chunk(sch, output_name(sch), spec, config)
