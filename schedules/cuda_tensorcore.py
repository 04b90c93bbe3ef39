"""Tensor cores for the per-chunk contractions of the CUDA kernels: WMMA m16n16k16 (``wmma::mma_sync``, which
ptxas turns into HMMA), fp16 operands in shared memory, fp32 accumulation, fp32 results in shared memory.

Used by ``cuda.schedule_per_chunk`` for fp16/bf16 kernels. A contraction [rows, cols] += [rows, red] x [red, cols]
(the second operand may be stored [cols, red]) qualifies when, its three extents padded to multiples of 16, its
16 x 16 output tiles form at least two rows and a grid the block's warps divide exactly (``_warp_grid``), and it
reads its operands plainly (an einsum, which ``pad_einsum`` pads; a gathered operand such as
``bla_fwd_z_intra``'s does not qualify).

Per contraction:
1. ``pad_einsum`` pads the iteration domain to multiples of 16, with zero-filled padded operand copies and
   the result in a padded buffer (the unpadding copy is inlined into the readers);
2. each operand becomes an fp16 stage in shared memory: its padded copy (or a ``cache_read``), into which the
   elementwise stage that produced it is inlined, so no fp32 copy of it is kept;
3. under the chunk's thread block, each warp (threadIdx.y) owns 16 x 16 output tiles; per 16-deep reduction
   step the operand tiles are loaded into fragments (``wmma::load_matrix_sync``) and multiplied; the
   accumulator is stored back to shared memory once.

Barriers: TVM's passes see a fragment load or store only through the ordinary read its pointer carries
(``_pointer``), never as a write, so the intrinsics bring their own: before each tile's first load (the operands'
producers are done), before its store (no warp still reads an operand whose memory the result may reuse: with
one tile per warp the stage is no longer one loop, and the shared-memory planner, reasoning in program order,
may lay the result over an operand it considers dead, as seen on the H200 as NaN at L = 32), and after it (the
readers of the result wait for every warp).

Precision: operands are rounded to fp16 (bf16 inputs too: fp16 keeps 3 more mantissa bits, and the products'
operands are fp32 intermediates of moderate range: states, probabilities in [0, 1], constants). Emulated on
the CPU against the float64 reference (W=512 N=M=63, W=16 N=7 M=9, N=W=128, M=512): relative error 3e-4 to
7e-4 with every product's operands in fp16, 3e-3 to 6e-3 with bf16 operands. Values beyond fp16's range
(|x| > 65504) would overflow.

The intrinsics are registered here, not taken from ``tvm.s_tir.tensor_intrin.cuda``, whose import takes 15-50 s.
"""

from __future__ import annotations

import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

#: operand dtype on the tensor cores; accumulation is float32
OPERAND_DTYPE = "float16"
#: input dtypes whose kernels use tensor cores (fp32 kernels stay SIMT: fp16 operands would lose precision)
TENSOR_CORE_DTYPES = ("float16", "bfloat16")
TILE = 16
WARP = 32
_SCOPE = "shared.dyn"


def _pointer(buffer, c_type: str):
    """The address of a tile in shared memory, as ``(T*)(tile[0, 0], &tile[0, 0])``: the comma expression reads
    the first element as an ordinary load, so that TVM's passes see the access (an ``address_of`` alone is
    invisible to the shared-memory planner, which then reuses the tile's memory while warps still read it, and
    to the barrier pass); the ``call_extern`` also keeps the call from being dropped as side-effect free."""
    return T.call_extern(buffer.dtype, f"({c_type}*)", buffer[0, 0], T.address_of(buffer[0, 0]))


def _fragment_index(buffer, stride, rows, cols):
    return buffer.elem_offset // stride // rows * (stride // cols) + buffer.elem_offset % stride // cols


def _load_intrin(fragment: str, col_major: bool):
    """Shared fp16 [16, 16] -> a WMMA fragment ("matrix_a" row-major, "matrix_b" row- or col-major)."""
    dtype, scope, layout = OPERAND_DTYPE, f"wmma.matrix_{fragment}", "col_major" if col_major else "row_major"

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope=_SCOPE)
        C = T.match_buffer(c, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope=scope)
        with T.sblock("root"):
            T.reads(A[0:TILE, 0:TILE])
            T.writes(C[0:TILE, 0:TILE])
            for i, j in T.grid(TILE, TILE):
                with T.sblock("load"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(a, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope=_SCOPE, strides=[s1, s0])
        C = T.match_buffer(c, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope=scope, strides=[d1, d0])
        with T.sblock("root"):
            T.reads(A[0:TILE, 0:TILE])
            T.writes(C[0:TILE, 0:TILE])
            T.evaluate(
                T.tvm_load_matrix_sync(
                    C.data, TILE, TILE, TILE, _fragment_index(C, d1, TILE, TILE),
                    _pointer(A, "half"), s1, layout, dtype="void",
                )
            )  # fmt: skip

    return desc, impl


def _sync_intrin(b_transposed: bool, a_first: bool):
    """acc[i, j] += f32(A[i, k]) * f32(B[k, j]) (B stored [j, k] when ``b_transposed``; the product written
    B * A when not ``a_first``: tensorize matches the expression as written)."""
    dtype, acc = OPERAND_DTYPE, "float32"
    b_shape = (TILE, TILE)

    def product(a_value, b_value):
        a_value, b_value = T.Cast(acc, a_value), T.Cast(acc, b_value)
        return a_value * b_value if a_first else b_value * a_value

    def operand_regions(A, B):  # in the order the product reads them, as the block's reads list them
        regions = [A[0:TILE, 0:TILE], B[0:TILE, 0:TILE]]
        return regions if a_first else regions[::-1]

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope="wmma.matrix_a")
        B = T.match_buffer(b, b_shape, dtype, align=64, offset_factor=TILE, scope="wmma.matrix_b")
        C = T.match_buffer(c, (TILE, TILE), acc, align=64, offset_factor=TILE, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads(C[0:TILE, 0:TILE], *operand_regions(A, B))
            T.writes(C[0:TILE, 0:TILE])
            for i, j, k in T.grid(TILE, TILE, TILE):
                with T.sblock(""):
                    vi, vj, vk = T.axis.remap("SSR", [i, j, k])
                    C[vi, vj] = C[vi, vj] + product(A[vi, vk], B[vj, vk] if b_transposed else B[vk, vj])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        a1, a0, b1, b0, c1, c0 = T.int32(), T.int32(), T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(
            a, (TILE, TILE), dtype, align=64, offset_factor=TILE, scope="wmma.matrix_a", strides=[a1, a0]
        )
        B = T.match_buffer(b, b_shape, dtype, align=64, offset_factor=TILE, scope="wmma.matrix_b", strides=[b1, b0])
        C = T.match_buffer(
            c, (TILE, TILE), acc, align=64, offset_factor=TILE, scope="wmma.accumulator", strides=[c1, c0]
        )
        with T.sblock("root"):
            T.reads(C[0:TILE, 0:TILE], *operand_regions(A, B))
            T.writes(C[0:TILE, 0:TILE])
            T.evaluate(
                T.tvm_mma_sync(
                    C.data, _fragment_index(C, c1, TILE, TILE), A.data, _fragment_index(A, a1, TILE, TILE),
                    B.data, _fragment_index(B, b1, TILE, TILE), C.data, _fragment_index(C, c1, TILE, TILE),
                    dtype="void",
                )
            )  # fmt: skip

    return desc, impl


def _fill_intrin():
    @T.prim_func(s_tir=True)
    def desc(c: T.handle) -> None:
        C = T.match_buffer(c, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope="wmma.accumulator")
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:TILE, 0:TILE])
            for i, j in T.grid(TILE, TILE):
                with T.sblock("init"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = T.float32(0)

    @T.prim_func(s_tir=True)
    def impl(c: T.handle) -> None:
        d1, d0 = T.int32(), T.int32()
        C = T.match_buffer(
            c, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope="wmma.accumulator", strides=[d1, d0]
        )
        with T.sblock("root"):
            T.reads()
            T.writes(C[0:TILE, 0:TILE])
            T.evaluate(T.tvm_storage_sync("shared"))  # operands written by other warps (see ``tensorize``)
            T.evaluate(
                T.tvm_fill_fragment(C.data, TILE, TILE, TILE, _fragment_index(C, d1, TILE, TILE), T.float32(0),
                                    dtype="void")
            )  # fmt: skip

    return desc, impl


def _store_intrin():
    @T.prim_func(s_tir=True)
    def desc(a: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope="wmma.accumulator")
        C = T.match_buffer(c, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope=_SCOPE)
        with T.sblock("root"):
            T.reads(A[0:TILE, 0:TILE])
            T.writes(C[0:TILE, 0:TILE])
            for i, j in T.grid(TILE, TILE):
                with T.sblock("store"):
                    vi, vj = T.axis.remap("SS", [i, j])
                    C[vi, vj] = A[vi, vj]

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, c: T.handle) -> None:
        s1, s0, d1, d0 = T.int32(), T.int32(), T.int32(), T.int32()
        A = T.match_buffer(
            a, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope="wmma.accumulator", strides=[d1, d0]
        )
        C = T.match_buffer(c, (TILE, TILE), "float32", align=64, offset_factor=TILE, scope=_SCOPE, strides=[s1, s0])
        with T.sblock("root"):
            T.reads(A[0:TILE, 0:TILE])
            T.writes(C[0:TILE, 0:TILE])
            # every warp has finished reading the operands: where the tile loops vanish (one tile per warp), the
            # planner may lay the result over an operand that is dead in program order (see ``tensorize``)
            T.evaluate(T.tvm_storage_sync("shared"))
            T.evaluate(
                T.tvm_store_matrix_sync(
                    A.data, TILE, TILE, TILE, _fragment_index(A, d1, TILE, TILE),
                    _pointer(C, "float"), s1, "row_major", dtype="void",
                )
            )  # fmt: skip
            T.evaluate(T.tvm_storage_sync("shared"))  # results read by other warps (see ``tensorize``)

    return desc, impl


def _intrin_name(kind: str) -> str:
    return f"bla_wmma_16x16x16_{kind}"


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    intrins = {
        "load_a": _load_intrin("a", False),
        "load_b": _load_intrin("b", False),
        "load_b_trans": _load_intrin("b", True),
        "fill": _fill_intrin(),
        "store": _store_intrin(),
    }
    for b_transposed in (False, True):
        for a_first in (False, True):
            intrins[f"sync_{int(b_transposed)}{int(a_first)}"] = _sync_intrin(b_transposed, a_first)
    for kind, (desc, impl) in intrins.items():
        TensorIntrin.register(_intrin_name(kind), desc, impl, override=True)
    _REGISTERED = True


def _operands(sch, block):
    """(a_index, b_index, b_transposed, a_first) of a contraction block [.., row, col, red]: which read is the
    row operand A [row, red], whether B is stored [col, red], and whether A comes first in the product."""
    stmt = sch.get(block)
    row, col, red = (iv.var for iv in stmt.iter_vars[-3:])
    reads = list(stmt.reads)
    a_index = next(i for i, region in enumerate(reads) if _last_two(region) == (row, red))
    b_index = next(i for i, region in enumerate(reads) if _last_two(region) in ((red, col), (col, red)))
    b_transposed = _last_two(reads[b_index]) == (col, red)
    product = stmt.body.value.b  # acc + product
    first = product.a.value if isinstance(product.a, tvm.tirx.Cast) else product.a
    a_first = _buffer(first).same_as(_buffer(reads[a_index]))
    return a_index, b_index, b_transposed, a_first


def _buffer(access):
    """The buffer of a load or a region (``.buffer`` or, in TVM 0.27's tensor IR, ``.source``)."""
    return access.buffer if hasattr(access, "buffer") else access.source


def _last_two(region):
    """The block variables indexing a read's last two dimensions (None where not a plain variable)."""
    out = []
    for rng in list(region.region)[-2:]:
        out.append(rng.min if isinstance(rng.min, tvm.tirx.Var) and int(rng.extent) == 1 else None)
    return tuple(out)


def plan_padding(sch, block, warps: int):
    """The padded extents (rows, cols, red) of contraction ``block`` if it can run on the tensor cores with
    ``warps`` warps, else None."""
    stmt = sch.get(block)
    extents = [iv.dom.extent for iv in stmt.iter_vars[-3:]]
    if not all(isinstance(e, tvm.tirx.IntImm) for e in extents):
        return None
    padded = [-(-int(e) // TILE) * TILE for e in extents]
    if padded[0] == TILE:  # one row of tiles: compute_at then fails to solve the tile's domain (TVM 0.27)
        return None
    if _warp_grid(padded[0] // TILE, padded[1] // TILE, warps) is None:
        return None
    try:
        _operands(sch, block)
    except (StopIteration, AttributeError):
        return None
    return padded


def _warp_grid(row_tiles: int, col_tiles: int, warps: int):
    """(warp rows, warp columns) dividing the output tiles exactly (each warp then owns the same number of
    tiles, and the tile loops stay affine, which tensorize needs), the squarer the better; None if none."""
    grids = [(r, warps // r) for r in range(1, warps + 1) if warps % r == 0]
    grids = [(r, c) for r, c in grids if row_tiles % r == 0 and col_tiles % c == 0]
    return min(grids, key=lambda rc: abs(rc[0] - rc[1]), default=None)


def _is_elementwise(sch, block) -> bool:
    return all(iv.iter_type == tvm.tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def _producer_of(sch, block, buffer):
    for producer in sch.get_producers(block):
        if any(_buffer(region).same_as(buffer) for region in sch.get(producer).writes):
            return producer
    return None


def _only_consumer(sch, producer, block) -> bool:
    consumers = sch.get_consumers(producer)
    return len(consumers) == 1 and sch.get(consumers[0]).same_as(sch.get(block))


def prepare(sch, names, warps: int) -> list:
    """Step 1 and 2 for the contractions ``names`` that qualify (see the module docstring), on the function
    before any stage is moved under the chunk's block. Returns the blocks to tensorize (``tensorize``)."""
    _register()
    chosen = []
    for name in names:
        block = sch.get_sblock(name)
        if plan_padding(sch, block, warps) is None:
            continue
        rank = len(sch.get(block).iter_vars)
        sch.pad_einsum(block, [1] * (rank - 3) + [TILE] * 3)
        for consumer in sch.get_consumers(block):  # the copy back to the unpadded buffer: read the padded one
            if sch.get(consumer).name_hint.endswith("_pad") and _is_elementwise(sch, consumer):
                sch.compute_inline(consumer)
        a_index, b_index, _, _ = _operands(sch, block)
        for index in (a_index, b_index):
            buffer = _buffer(sch.get(block).reads[index])
            producer = _producer_of(sch, block, buffer)
            if producer is not None and _is_elementwise(sch, producer) and _only_consumer(sch, producer, block):
                stage = producer
            else:
                stage = sch.cache_read(block, index, _SCOPE, consumer_blocks=[block])
            sch.unsafe_set_dtype(stage, 0, OPERAND_DTYPE)
            for upstream in sch.get_producers(stage):  # an elementwise stage read only here: computed in place
                if _is_elementwise(sch, upstream) and _only_consumer(sch, upstream, stage):
                    sch.compute_inline(upstream)
        a_index, b_index, b_transposed, a_first = _operands(sch, block)
        operands = [_buffer(sch.get(block).reads[i]) for i in (a_index, b_index)]
        # 16 x 16 x 16 steps as blocks of their own, so that moving the contraction under the chunk's block
        # (compute_at) trims its loops to whole tiles, never inside one
        *_, row, col, red = sch.get_loops(block)
        row_o, row_i = sch.split(row, factors=[None, TILE])
        col_o, col_i = sch.split(col, factors=[None, TILE])
        red_o, red_i = sch.split(red, factors=[None, TILE])
        sch.reorder(row_o, col_o, red_o, row_i, col_i, red_i)
        step = sch.blockize(row_i)
        reads = [_buffer(region) for region in sch.get(step).reads]
        indices = [next(i for i, buffer in enumerate(reads) if buffer.same_as(operand)) for operand in operands]
        chosen.append((step, (*indices, b_transposed, a_first)))
    return chosen


def tensorize(sch, prepared, warps: int) -> None:
    """Step 3 for a contraction prepared by ``prepare`` (its 16 x 16 x 16 step block; its operands' positions
    among the step block's reads, which later primitives keep, and layout), already computed under the chunk's
    thread block."""
    step, (a_index, b_index, b_transposed, a_first) = prepared  # positions in the step block's reads
    *_, row_o, col_o, red_o = sch.get_loops(step)
    rows, cols = _warp_grid(int(sch.get(row_o).extent), int(sch.get(col_o).extent), warps)
    row_oo, row_w = sch.split(row_o, factors=[None, rows])
    col_oo, col_w = sch.split(col_o, factors=[None, cols])
    sch.reorder(row_oo, col_oo, row_w, col_w)
    warp = sch.fuse(row_w, col_w)
    sch.bind(warp, "threadIdx.y")
    a_fragment = sch.cache_read(step, a_index, "wmma.matrix_a", consumer_blocks=[step])
    b_fragment = sch.cache_read(step, b_index, "wmma.matrix_b", consumer_blocks=[step])
    for fragment in (a_fragment, b_fragment):
        sch.compute_at(fragment, red_o)
    accumulator = sch.cache_write(step, 0, "wmma.accumulator")
    sch.reverse_compute_at(accumulator, warp)
    init = sch.decompose_reduction(step, red_o)
    sch.tensorize(step, _intrin_name(f"sync_{int(b_transposed)}{int(a_first)}"))
    sch.tensorize(init, _intrin_name("fill"))
    sch.tensorize(sch.get_loops(a_fragment)[-2], _intrin_name("load_a"))
    sch.tensorize(sch.get_loops(b_fragment)[-2], _intrin_name("load_b_trans" if b_transposed else "load_b"))
    sch.tensorize(sch.get_loops(accumulator)[-2], _intrin_name("store"))
