"""Loading a chunk's rows into the tile programs' shared memory, 16 bytes at a time.

A thread loads 8 columns of two adjacent rows (two 16-byte global loads, ``fetch_row_pair``) and stores them
as 32-bit words: whole to a row-major copy (two 16-byte stores), or as (row r, row r + 1) float16 pairs to a
transposed copy (``pair_word``: eight 32-bit stores), the layout the mma B operands read. Lanes take
consecutive row pairs, so a transposed store of a warp hits 32 consecutive words: no bank conflicts. A lane's
rows of an mma A operand come straight from global memory, one 32-bit load per element pair
(``load_row_fragment``). Used by the backward (``cuda_tile_backward``); the forward keeps scalar loads, with which
it measured faster (benchmarks/NOTES.md, 2026-12-04).
"""

from __future__ import annotations

from tvm.script import tirx as T


def half_bits(word, half: int, dtype: str):
    """The float16 bits (uint32, low 16 set) of 16-bit element ``half`` (0 low, 1 high) of a 32-bit ``word``
    holding two ``dtype`` values (float16: the bits themselves; bfloat16: rounded to float16)."""
    bits = T.shift_right(word, T.uint32(16 * half)) & T.uint32(0xFFFF)
    if dtype == "float16":
        return bits
    value = T.Cast("float16", T.reinterpret("bfloat16", T.Cast("uint16", bits)))
    return T.Cast("uint32", T.reinterpret("uint16", value))


def half_value(word, half: int, dtype: str = "float16"):
    """The float32 value of 16-bit element ``half`` (0 low, 1 high) of a 32-bit ``word`` of two ``dtype`` values
    (float16 or bfloat16: the top half of a float32)."""
    if dtype == "bfloat16":  # ``half`` may be a loop variable: shifts, no Python branch on it
        return T.reinterpret("float32", T.shift_left(T.shift_right(word, T.uint32(16) * half), T.uint32(16)))
    return T.Cast("float32", T.reinterpret("float16", T.Cast("uint16", half_bits(word, half, "float16"))))


def half_pair(low, high):
    """The 32-bit word holding two float16 values, ``low`` in the low half."""
    bits = [T.Cast("uint32", T.reinterpret("uint16", x)) for x in (low, high)]
    return bits[0] | T.shift_left(bits[1], T.uint32(16))


def pair_word(rows, i: int, half: int, dtype: str):
    """The 32-bit word (row 0's element, row 1's element) in float16 of column 2 i + half of ``rows`` [2, 4]
    (uint32: 8 ``dtype`` columns of two rows): a word of a transposed copy."""
    return half_bits(rows[0, i], half, dtype) | T.shift_left(half_bits(rows[1, i], half, dtype), T.uint32(16))


@T.macro
def fetch_row_pair(rows, source, row_valid):
    """rows [2, 4] uint32 = ``source(r)`` (a 4-word ramp load of row r of the pair, r = 0, 1), zero where
    ``row_valid(r)`` is false (``source`` must clamp its index to a row that exists)."""
    for r in T.unroll(2):
        rows[r, T.ramp(0, 1, 4)] = source(r)
        for i in T.unroll(4):
            rows[r, i] = T.if_then_else(row_valid(r), rows[r, i], T.uint32(0))


def state_row(p, resolution: int):
    """The row n of a [N, F] state at position p of bla-math.md's basis order, in which the tile programs keep
    the state: the pairs' rows n = 1 .. 2 P (p < 2 P, P = (N - 1) // 2), then n = 0, then n = N - 1 (N even)."""
    pairs = (resolution - 1) // 2
    return T.if_then_else(p < 2 * pairs, p + 1, T.if_then_else(p == 2 * pairs, 0, resolution - 1))


@T.macro
def load_chunk_transposed(kv_raw_w, rows, k_w, v_w, b, hk, first, TT, tid, L, K, F, THREADS, dtype):
    """kv_raw [F, L + ...] (float16, as 32-bit words kv_raw_w) columns 0 .. L - 1 = [k | v]^T of rows
    first .. first + L - 1 of head hk (zero past TT); k_w, v_w: k and v [B, T, H, K | V] viewed as uint32;
    rows: a [2, 4] uint32 local buffer. Thread tid of THREADS takes items (row pair, 8-column group)."""
    for it in T.unroll((L // 2 * (F // 8) + THREADS - 1) // THREADS):
        if it * THREADS + tid < L // 2 * (F // 8):
            jp = (it * THREADS + tid) % (L // 2)
            fg = (it * THREADS + tid) // (L // 2)
            if fg * 8 < K:
                fetch_row_pair(rows, lambda r: k_w[b, T.min(first + 2 * jp + r, TT - 1), hk, T.ramp(fg * 4, 1, 4)],
                               lambda r: first + 2 * jp + r < TT)
            else:
                fetch_row_pair(
                    rows, lambda r: v_w[b, T.min(first + 2 * jp + r, TT - 1), hk, T.ramp(fg * 4 - K // 2, 1, 4)],
                    lambda r: first + 2 * jp + r < TT)
            for i, h in T.grid(4, 2):
                kv_raw_w[fg * 8 + 2 * i + h, jp] = pair_word(rows, i, h, dtype)


@T.macro
def load_rows_transposed(dst_w, rows, source_w, b, head, first, TT, tid, L, width, THREADS, dtype, scale, bad):
    """dst [width, L + ...] (float16, as 32-bit words dst_w) columns 0 .. L - 1 = (scale x rows first ..
    first + L - 1 of ``head`` of source [B, T, H, width] (``dtype``, as uint32 words source_w))^T, zero past TT
    and where not finite; ``bad`` (None, or 64-bit row masks per column, bad[2 f], bad[2 f + 1]) gets the bits of
    the non-finite elements. rows: a [2, 4] uint32 local buffer. Items (row pair, 8-column group) as above."""
    for it in T.unroll((L // 2 * (width // 8) + THREADS - 1) // THREADS):
        if it * THREADS + tid < L // 2 * (width // 8):
            jp = (it * THREADS + tid) % (L // 2)
            fg = (it * THREADS + tid) // (L // 2)
            fetch_row_pair(rows, lambda r: source_w[b, T.min(first + 2 * jp + r, TT - 1), head, T.ramp(fg * 4, 1, 4)],
                           lambda r: first + 2 * jp + r < TT)
            for i, h in T.grid(4, 2):
                x = [scale * half_value(rows[r, i], h, dtype) for r in range(2)]
                dst_w[fg * 8 + 2 * i + h, jp] = half_pair(
                    *[T.Select(T.isfinite(x[r]), T.Cast("float16", x[r]), T.float16(0)) for r in range(2)])
                if bad is not None:
                    for r in T.unroll(2):
                        if not T.isfinite(scale * half_value(rows[r, i], h, dtype)):
                            T.evaluate(T.cuda.atomic_add(T.address_of(bad[2 * (fg * 8 + 2 * i + h) + jp // 16]),
                                                         T.shift_left(1, (2 * jp + r) % 32)))


@T.macro
def load_row_fragment(a_w, source_w, b, t, head, TT, tq, width, dtype, scale):
    """This lane's words a_w of the [16, width] mma A operand (float16 pairs, fragment order of
    ``cuda_tile_forward``) of rows t + g (rM = 0) and t + g + 8 (``t`` given with the lane's g) of ``head`` of
    source [B, T, H, width] (``dtype``, as uint32 words source_w), times ``scale``; zero past TT. One 32-bit load
    per element pair."""
    for kt, kHi, rM in T.grid(width // 16, 2, 2):
        row = t + 8 * rM
        word = source_w[b, T.min(row, TT - 1), head, kt * 8 + kHi * 4 + tq]
        a_w[kt * 4 + kHi * 2 + rM] = T.Select(
            row < TT, half_pair(*[T.Cast("float16", scale * half_value(word, kp, dtype)) for kp in range(2)]),
            T.uint32(0))
