"""What the per-target schedules ask of a stage: its shape of computation, read off its block."""

from __future__ import annotations

import tvm


def is_elementwise(sch, block) -> bool:
    return all(iv.iter_type == tvm.tirx.IterVar.DataPar for iv in sch.get(block).iter_vars)


def is_contraction(sch, block) -> bool:
    """One reduction axis, innermost, under a row and a column axis of fixed size: a small matrix product
    (a row reduction such as a softmax's max has no column axis)."""
    iter_vars = sch.get(block).iter_vars
    reduce = [iv for iv in iter_vars if iv.iter_type != tvm.tirx.IterVar.DataPar]
    if len(reduce) != 1 or iter_vars[-1].iter_type == tvm.tirx.IterVar.DataPar:
        return False
    row, col = iter_vars[-3], iter_vars[-2]
    return all(isinstance(iv.dom.extent, tvm.tirx.IntImm) and iv.dom.extent.value > 1 for iv in (row, col))


def intermediate_buffers(sch) -> set[str]:
    """Names of the buffers a kernel allocates (as opposed to its parameters)."""
    return {buf.name for buf in sch.get(sch.get_sblock("root")).alloc_buffers}


def output_name(sch) -> str:
    """The name of a kernel's single output block (the last block of the root)."""
    return sch.get(sch.get_child_blocks(sch.get_sblock("root"))[-1]).name_hint


def chunk_loops(sch, anchor: str, spec):
    """The (chunk, batch, head) loops of the ``anchor`` block, outermost in that order: its t axis split into
    (chunk, position) when it is token-indexed [B, T, H, X], taken as is when chunk-indexed [B, NC, H, R, X]."""
    loops = sch.get_loops(sch.get_sblock(anchor))
    if len(loops) == 4:
        b, t, h, x = loops
        c, j = sch.split(t, factors=[None, spec.chunk_size])
        sch.reorder(c, b, h, j, x)
    else:
        b, c, h, *rest = loops
        sch.reorder(c, b, h, *rest)
    return c, b, h


def _children(stmt):
    if isinstance(stmt, tvm.tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, tvm.tirx.IfThenElse):
        return [stmt.then_case] + ([stmt.else_case] if stmt.else_case is not None else [])
    return [stmt.body] if hasattr(stmt, "body") else []


def unguarded_write_backs(func) -> list[tuple[str, str, str, int]]:
    """(block, buffer, index, extent) of every register write-back (a store of a "local" value into a shared or
    global buffer) whose index is not provably inside the buffer's static extents, given the loop ranges, block
    bindings and predicates around it. TVM 0.27's ``reverse_compute_at`` of a register cache into a kernel's
    output relaxes the write-back to whole tiles and drops the bound check: partial tiles then write past the
    output (a race between blocks); write-backs into shared intermediates keep theirs. Empty when sound.

    The arithmetic analyzer proves most indices; where it cannot (a fused thread index divided by a column
    count, under a predicate on the fused index), every value of the loop variables involved is tried."""
    from tvm.ir import Range
    from tvm.sym.analyzer import Analyzer

    found = []

    def loads_register(value) -> bool:  # a BufferLoad (``.buffer``) or, in TVM 0.27's tensor IR, ``.source``
        buffer = getattr(value, "buffer", None) or getattr(value, "source", None)
        return buffer is not None and hasattr(buffer, "scope") and buffer.scope() == "local"

    def walk(stmt, analyzer, block, loops, predicates):
        if isinstance(stmt, tvm.tirx.For):
            analyzer.bind(stmt.loop_var, Range.from_min_extent(stmt.min, stmt.extent))
            loops = {**loops, stmt.loop_var.name: (stmt.min, stmt.extent)}
            walk(stmt.body, analyzer, block, loops, predicates)
        elif isinstance(stmt, tvm.s_tir.SBlockRealize):
            inner = analyzer.clone()
            for iter_var, value in zip(stmt.block.iter_vars, stmt.iter_values):
                inner.bind(iter_var.var, value)
            with inner.constraint_scope(stmt.predicate):
                for part in (stmt.block.init, stmt.block.body):
                    if part is not None:
                        walk(part, inner, stmt.block.name_hint, loops, [*predicates, stmt.predicate])
        elif isinstance(stmt, tvm.tirx.BufferStore):
            if stmt.buffer.scope() != "local" and loads_register(stmt.value):
                for index, extent in zip(stmt.indices, stmt.buffer.shape):
                    if not isinstance(extent, tvm.tirx.IntImm):
                        continue
                    index = analyzer.simplify(index)
                    if analyzer.can_prove(tvm.tirx.all(0 <= index, index < extent)):
                        continue
                    if not _inside_by_enumeration(index, int(extent), predicates, loops):
                        found.append((block, stmt.buffer.name, str(index), int(extent)))
        else:
            for child in _children(stmt):
                walk(child, analyzer, block, loops, predicates)

    walk(func.body, Analyzer(), "root", {}, [])
    return found


class _Script:
    """What TVMScript's printed integer expressions call, for evaluating them with Python ints."""

    max = staticmethod(max)
    min = staticmethod(min)

    @staticmethod
    def if_then_else(condition, then, otherwise):
        return then if condition else otherwise

    @staticmethod
    def Cast(dtype, value):  # TVMScript's name
        return value


def _inside_by_enumeration(index, extent: int, predicates, loops, limit: int = 1 << 20) -> bool:
    """0 <= index < extent wherever the predicates hold, trying every value of the loop variables involved
    (their ranges static, at most ``limit`` points); False when that cannot be decided."""
    import itertools
    import re

    index_text = str(index)
    condition_text = " and ".join(f"({p})" for p in predicates if str(p) != "True") or "True"
    words = set(re.findall(r"\b[A-Za-z_]\w*\b", index_text + " " + condition_text))
    names = sorted(words - {"T", "and", "or", "not", "True", "False", "max", "min", "if_then_else", "Cast"})
    ranges = []
    for name in names:
        if name not in loops or not all(isinstance(x, tvm.tirx.IntImm) for x in loops[name]):
            return False
        start, count = (int(x) for x in loops[name])
        ranges.append(range(start, start + count))
    if any(len(r) == 0 for r in ranges) or _product(len(r) for r in ranges) > limit:
        return False
    try:
        index_fn = eval(f"lambda {', '.join(names)}: {index_text}", {"T": _Script})
        condition_fn = eval(f"lambda {', '.join(names)}: {condition_text}", {"T": _Script})
        return all(0 <= index_fn(*point) < extent for point in itertools.product(*ranges) if condition_fn(*point))
    except Exception:  # noqa: BLE001 (an expression Python cannot evaluate: undecided)
        return False


def _product(values) -> int:
    result = 1
    for value in values:
        result *= value
    return result
