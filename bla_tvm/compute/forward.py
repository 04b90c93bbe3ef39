"""BLA forward as TVM tensor-expression compute: what is computed, with no schedule (bla-math.md, "Chunked form").

Three kernels keep the chunks parallel (bla-math.md, "A kernel decomposition"):

1. ``chunk_state_contribution``: U[b, c, h] = state_in (K_c | V_c), all chunks at once (TE, here);
2. the state scan X_{c+1} = A^L X_c + U_c, sequential over chunks (TVMScript, ``scan.py``);
3. ``chunk_output``: steps 1-5 of the chunked form for every chunk, given the state at its start (TE, here).

Letters: B batch, T tokens, H key/value heads, HQ = H G query heads (GQA group size G, static; query head hq
reads key/value head hq // G), K/V head dims, F = K + V, N resolution, M slots, L chunk length,
NC = ceil(T / L) chunks; t = c L + j. B, T, H and HQ are symbolic: one compiled kernel serves every size.
Key and value states travel together as one [.., N, F] tensor (columns 0..K-1 keys, K..F-1 values).
Where a chunk stands in its sequence comes from the caller: positions[b, c], the tokens its sequence saw
before the chunk (for the slot mask), and, for the scan, which chunks start a sequence (``scan.py``). So one
row b may hold several sequences, each starting at a chunk boundary (``cu_seqlens``), and a sequence may
continue from a carried state.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import NamedTuple

from tvm import te, tirx

from ..layer import KernelSpec


def symbolic_sizes(L: int):
    """B, T, H and the chunk count NC = ceil(T / L).

    NC is written (T - 1) // L + 1, the exact form of the last chunk read by o[t] (chunk t // L): the
    schedules' region analysis then sees the chunk loop cover every chunk with no min/max in the bindings.
    """
    B, T, H = te.var("B"), te.var("T"), te.var("H")
    return B, T, H, (T - 1) // L + 1


def _kv_chunks(k, v, spec: KernelSpec, B, T, heads, NC, group: int = 1):
    """kv[b, c, h, j, f] = (k | v)[b, c L + j, h // group, f] in the accumulation dtype, zero past the end
    (t >= T), for h < heads: per key/value head with group 1, per query head with group G."""
    K, L, acc = spec.head_k, spec.chunk_size, spec.acc_dtype

    def load(b, c, h, j, f):
        t = te.min(c * L + j, T - 1)
        hk = h // group if group > 1 else h
        value = te.if_then_else(f < K, k[b, t, hk, te.min(f, K - 1)], v[b, t, hk, te.max(f - K, 0)])
        return te.if_then_else(c * L + j < T, value.astype(acc), tirx.const(0, acc))

    return te.compute((B, NC, heads, L, spec.state_width), load, name="bla_fwd_kv_chunk")


def _q_chunks(q, spec: KernelSpec, B, T, H, NC):
    """q[b, c, h, j, k] = q[b, c L + j, h, k] in the accumulation dtype, zero past the end (t >= T)."""
    L, acc = spec.chunk_size, spec.acc_dtype

    def load(b, c, h, j, kk):
        t = c * L + j
        return te.if_then_else(t < T, q[b, te.min(t, T - 1), h, kk].astype(acc), tirx.const(0, acc))

    return te.compute((B, NC, H, L, spec.head_k), load, name="bla_fwd_q_chunk")


def causal(j, r, L: int):
    """Whether row j of a chunk reads row r of a stacked [chunk rows (r < L); state rows (r >= L)] operand: a token
    at or before it, or a state row."""
    return te.any(r <= j, r >= L)


# A product over a chunk's rows whose causal mask is exact zeros of one operand (Inv's upper triangle, mix's
# masked lags) would multiply them by the other operand's later rows: 0 * NaN = NaN, so one non-finite token
# made every output of its chunk NaN. Selecting on the mask inside the product would take it off the tensor
# cores; instead the product reads its other operand ``finite`` and its result is ``poisoned`` (NaN) exactly
# where the masked product would read a non-finite row: from the ``first_non_finite`` row on for a causal
# product, up to the ``last_non_finite`` row for the backward's transposed ones. Non-finite values thus reach
# exactly the outputs (and gradients) that the definition's own arithmetic makes non-finite.


def finite(x, dtype: str):
    """x (of ``dtype``) where it is finite, else 0."""
    return te.if_then_else(te.isfinite(x), x, tirx.const(0, dtype))


def poisoned(bad, x, dtype: str):
    """NaN where ``bad``, else x (of ``dtype``)."""
    return te.if_then_else(bad, tirx.const(float("nan"), dtype), x)


def first_non_finite(name: str, shape, rows: int, L: int, value):
    """[B, NC, H, X] int32 (``shape``): per column x, the first row r < L at which ``value(b, c, h, r, x)`` is
    non-finite, 0 where a state row (L <= r < ``rows``) is, L where none is: a causal product is non-finite
    from that row on."""
    r = te.reduce_axis((0, rows), name=f"{name}_r")
    return te.compute(
        shape,
        lambda b, c, h, x: te.min(
            te.if_then_else(te.isfinite(value(b, c, h, r, x)), L, te.if_then_else(r < L, r, 0)), axis=r
        ),
        name=name,
    )


def last_non_finite(name: str, shape, L: int, value):
    """[B, NC, H, X] int32 (``shape``): per column x, the last row j < L at which ``value(b, c, h, j, x)`` is
    non-finite, -1 where none is: a transposed causal product (row r < L reads the rows j >= r, a state row
    r >= L every row) is non-finite at the rows r < L up to it, and at every state row once it is >= 0."""
    j = te.reduce_axis((0, L), name=f"{name}_j")
    return te.compute(
        shape, lambda b, c, h, x: te.max(te.if_then_else(te.isfinite(value(b, c, h, j, x)), -1, j), axis=j), name=name
    )


def reaches_back(last, r, L: int):
    """Whether row r of a transposed causal product reads a non-finite row, given ``last_non_finite``'s value."""
    return last >= te.if_then_else(r < L, r, 0)


def scale_sign(scale, acc: str):
    """sign(scale) (1 for 0), so that scale s = |scale| sign(scale) s. A softmax over scale s_i takes its maximum
    over sign(scale) s_i (exact) and computes exp(|scale| (sign(scale) s_i - max)): the maximum and the exponent
    read the same rounded value, and no multiply-add can fuse a product into the subtraction (with scale s_i
    rounded for the maximum but fused unrounded into exp's argument, large logits overflowed exp: NaN)."""
    return te.if_then_else(scale[0] < tirx.const(0, acc), tirx.const(-1, acc), tirx.const(1, acc))


def partner(n, N):
    """Index of the other row of n's (cos, sin) pair; n itself for phi_0 (rot_off is 0 there)."""
    return te.if_then_else(n == 0, 0, te.if_then_else((n - 1) % 2 == 0, te.min(n + 1, N - 1), n - 1))


def chunk_state_contribution(spec: KernelSpec):
    """U[b, c, h, n, f] = sum_j state_in[n, j] (k | v)[b, c L + j, h, f].

    k [B, T, H, K], v [B, T, H, V], state_in [N, L] = Bm^T Inv  ->  U [B, NC, H, N, F] (accumulation dtype).
    Returns the tensors in argument order (inputs, then output).
    """
    B, T, H, NC = symbolic_sizes(spec.chunk_size)
    L, N, F, acc = spec.chunk_size, spec.resolution, spec.state_width, spec.acc_dtype
    k = te.placeholder((B, T, H, spec.head_k), spec.dtype, name="k")
    v = te.placeholder((B, T, H, spec.head_v), spec.dtype, name="v")
    state_in = te.placeholder((N, L), acc, name="state_in")
    kv = _kv_chunks(k, v, spec, B, T, H, NC)
    j = te.reduce_axis((0, L), name="j")
    U = te.compute(
        (B, NC, H, N, F),
        lambda b, c, h, n, f: te.sum(state_in[n, j] * kv[b, c, h, j, f], axis=j),
        name="bla_fwd_chunk_state",
    )
    return [k, v, state_in, U]


def chunk_output(spec: KernelSpec):
    """o[b, t, h, :] for every token, given the states at every chunk start.

    Inputs: q [B, T, HQ, K], k [B, T, H, K], v [B, T, H, V], states [B, NC, H, N, F] (X | Y before chunk c),
    positions [B, NC] int32 (tokens seen before chunk c, clipped at W), scale [1], input_map [L, L + N],
    lag_basis [N, L], C [M, N], rot_diag [L, N], rot_off [L, N].
    Output: o [B, T, HQ, V] in the input dtype.

    Per chunk, steps 1-5 of the chunked form regrouped into products over concatenated axes
    (j, D < L; r < L + N; i < M; n < N; Rb = lag_basis, so H = C Rb), each operand a stage of its own:
      kv_eff  = input_map [kv; X | Y]                     k', v' = Inv (kv - Psi X)          [L, F]
      qx      = q [k'; X]^T                               (Q K'^T | X q_j)                   [L, L + N]
      z[j, n] = sum_{D<=j} Rb[n, D] qx[j, j-D] + (R^{j+1} X q_j)[n]                          [L, N]
      u       = sign(scale) C z, -inf where slot lag i W / M > positions[c] + j               [L, M]
      E       = exp(|scale| (u - rowmax u))             the softmax numerators of scale C z  [L, M]
      w       = E C,  g = w Rb                                                               [L, N], [L, L]
      o_j     = mix_j [v'; Y] / rowsum(E)_j, mix_j = [g[j, j-s] (s<=j) | w_j R^{j+1}]       [L, V]
    The slot count M enters only the two [L, N] x [N, M] products and the softmax. The products over stacked
    rows (kv_eff, o) read their row operand ``finite`` and are ``poisoned`` from its first non-finite row on:
    a non-finite token reaches no earlier output.
    """
    inputs = chunk_inputs(spec)
    fwd = chunk_forward_stages(spec, inputs)
    L, dt = spec.chunk_size, spec.dtype
    B, T, H, _ = inputs.q.shape
    o = te.compute(
        (B, T, H, spec.head_v),
        lambda b, t, h, vv: poisoned(
            t % L >= fwd.values_bad[b, t // L, h, vv],
            fwd.out_chunk[b, t // L, h, t % L, vv] / fwd.row_sum[b, t // L, h, t % L],
            spec.acc_dtype,
        ).astype(dt),
        name="bla_fwd_out",
    )
    return [*inputs, o]


class ChunkInputs(NamedTuple):
    """The inputs every per-chunk kernel (forward output, backward) reads; shapes as in ``chunk_output``."""

    q: te.Tensor
    k: te.Tensor
    v: te.Tensor
    states: te.Tensor
    positions: te.Tensor
    scale: te.Tensor
    input_map: te.Tensor
    lag_basis: te.Tensor
    C: te.Tensor
    rot_diag: te.Tensor
    rot_off: te.Tensor


def chunk_inputs(spec: KernelSpec) -> ChunkInputs:
    """Placeholders of ``ChunkInputs`` over symbolic B, T, H (and HQ = H G with GQA)."""
    B, T, H, NC = symbolic_sizes(spec.chunk_size)
    HQ = te.var("HQ") if spec.group_size > 1 else H
    N, M, L, K, V, F = spec.resolution, spec.num_slots, spec.chunk_size, spec.head_k, spec.head_v, spec.state_width
    acc, dt = spec.acc_dtype, spec.dtype
    q = te.placeholder((B, T, HQ, K), dt, name="q")
    k = te.placeholder((B, T, H, K), dt, name="k")
    v = te.placeholder((B, T, H, V), dt, name="v")
    states = te.placeholder((B, NC, H, N, F), acc, name="states")
    positions = te.placeholder((B, NC), "int32", name="positions")
    scale = te.placeholder((1,), acc, name="scale")
    input_map = te.placeholder((L, L + N), acc, name="input_map")
    lag_basis = te.placeholder((N, L), acc, name="lag_basis")
    C = te.placeholder((M, N), acc, name="C")
    rot_diag = te.placeholder((L, N), acc, name="rot_diag")
    rot_off = te.placeholder((L, N), acc, name="rot_off")
    return ChunkInputs(q, k, v, states, positions, scale, input_map, lag_basis, C, rot_diag, rot_off)


def chunk_forward_stages(spec: KernelSpec, inputs: ChunkInputs) -> SimpleNamespace:
    """The per-chunk stages of the forward (see ``chunk_output``), shared with the backward, which recomputes
    them from the saved states instead of storing them."""
    q, k, v, states, positions, scale, input_map, lag_basis, C, rot_diag, rot_off = inputs
    B, T, H, _ = q.shape  # H here counts query heads (HQ)
    NC = states.shape[1]
    W, N, M, G = spec.window, spec.resolution, spec.num_slots, spec.group_size
    L, K, V, F, acc = spec.chunk_size, spec.head_k, spec.head_v, spec.state_width, spec.acc_dtype
    zero = tirx.const(0, acc)
    q_chunk = _q_chunks(q, spec, B, T, H, NC)
    kv = _kv_chunks(k, v, spec, B, T, H, NC, G)

    def stacked(chunk_rows, offset):
        """(b, c, h, r, f) -> [chunk_rows(b, c, h, r, .) (r < L); state rows X | Y from column ``offset`` (r >= L)]."""
        return lambda b, c, h, r, f: te.if_then_else(
            r < L,
            chunk_rows(b, c, h, te.min(r, L - 1), offset + f),
            states[b, c, h // G if G > 1 else h, te.max(r - L, 0), offset + f],
        )

    def stack_state(name, chunk_rows, columns, offset, clean=False):
        """``stacked`` as a stage [L + N, columns]; ``finite`` with ``clean`` (a product's operand)."""
        value = stacked(chunk_rows, offset)
        return te.compute(
            (B, NC, H, L + N, columns), lambda *i: finite(value(*i), acc) if clean else value(*i), name=name
        )

    def kv_at(b, c, h, j, f):
        return kv[b, c, h, j, f]

    kv_state = stack_state("bla_fwd_kv_state", kv_at, F, 0, clean=True)
    kv_bad = first_non_finite("bla_fwd_kv_bad", (B, NC, H, F), L + N, L, stacked(kv_at, 0))
    r1 = te.reduce_axis((0, L + N), name="r1")
    kv_eff = te.compute(  # Inv is lower triangular: row j reads the tokens up to j and the state
        (B, NC, H, L, F),
        lambda b, c, h, j, f: te.sum(input_map[j, r1] * kv_state[b, c, h, r1, f], axis=r1),
        name="bla_fwd_kv_eff",
    )

    def kv_eff_at(b, c, h, j, f):  # k' | v', non-finite from the first non-finite row they read on
        return poisoned(j >= kv_bad[b, c, h, f], kv_eff[b, c, h, j, f], acc)

    keys = stack_state("bla_fwd_keys", kv_eff_at, K, 0)
    keys_clean = stack_state("bla_fwd_keys_clean", kv_eff_at, K, 0, clean=True)  # for the backward's dq
    keys_bad = first_non_finite("bla_fwd_keys_bad", (B, NC, H, K), L + N, L, stacked(kv_eff_at, 0))
    k1 = te.reduce_axis((0, K), name="k1")
    qx = te.compute(
        (B, NC, H, L, L + N),
        lambda b, c, h, j, r: te.sum(q_chunk[b, c, h, j, k1] * keys[b, c, h, r, k1], axis=k1),
        name="bla_fwd_qx",
    )
    d1 = te.reduce_axis((0, L), name="d1")
    z_intra = te.compute(
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(
            te.if_then_else(d1 <= j, lag_basis[n, d1] * qx[b, c, h, j, te.max(j - d1, 0)], zero), axis=d1
        ),
        name="bla_fwd_z_intra",
    )
    z = te.compute(
        (B, NC, H, L, N),
        lambda b, c, h, j, n: z_intra[b, c, h, j, n]
        + rot_diag[j, n] * qx[b, c, h, j, L + n]
        + rot_off[j, n] * qx[b, c, h, j, L + partner(n, N)],
        name="bla_fwd_z",
    )
    n1 = te.reduce_axis((0, N), name="n1")
    scores = te.compute(
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.sum(C[i, n1] * z[b, c, h, j, n1], axis=n1),
        name="bla_fwd_scores",
    )

    def masked(b, c, j, i):  # slot lag tau_i = i W / M lies before the sequence start: i W > t M
        return tirx.Cast("int64", i) * W > tirx.Cast("int64", positions[b, c] + j) * M

    logits = te.compute(  # u = sign(scale) C z: the maximum and the exponent read it (``scale_sign``)
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.if_then_else(
            masked(b, c, j, i), te.min_value(acc), scale_sign(scale, acc) * scores[b, c, h, j, i]
        ),
        name="bla_fwd_logits",
    )
    i1 = te.reduce_axis((0, M), name="i1")
    row_max = te.compute(
        (B, NC, H, L), lambda b, c, h, j: te.max(logits[b, c, h, j, i1], axis=i1), name="bla_fwd_row_max"
    )
    probs = te.compute(  # unnormalised softmax numerators
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.if_then_else(
            masked(b, c, j, i), zero, te.exp(te.abs(scale[0]) * (logits[b, c, h, j, i] - row_max[b, c, h, j]))
        ),
        name="bla_fwd_probs",
    )
    i2 = te.reduce_axis((0, M), name="i2")
    row_sum = te.compute(
        (B, NC, H, L), lambda b, c, h, j: te.sum(probs[b, c, h, j, i2], axis=i2), name="bla_fwd_row_sum"
    )
    i3 = te.reduce_axis((0, M), name="i3")
    w = te.compute(  # (E C)[j, n]
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(probs[b, c, h, j, i3] * C[i3, n], axis=i3),
        name="bla_fwd_w",
    )
    n2 = te.reduce_axis((0, N), name="n2")
    g = te.compute(  # (E H)[j, D] = (w Rb)[j, D]
        (B, NC, H, L, L),
        lambda b, c, h, j, d: te.sum(w[b, c, h, j, n2] * lag_basis[n2, d], axis=n2),
        name="bla_fwd_g",
    )
    mix = te.compute(  # [g scattered to s = j - D | w_j R^{j+1}]
        (B, NC, H, L, L + N),
        lambda b, c, h, j, r: te.if_then_else(
            r < L,
            te.if_then_else(r <= j, g[b, c, h, j, te.max(j - r, 0)], zero),
            rot_diag[j, te.max(r - L, 0)] * w[b, c, h, j, te.max(r - L, 0)]
            - rot_off[j, te.max(r - L, 0)] * w[b, c, h, j, partner(te.max(r - L, 0), N)],
        ),
        name="bla_fwd_mix",
    )
    values = stack_state("bla_fwd_values", kv_eff_at, V, K)  # for the backward's dmix
    values_clean = stack_state("bla_fwd_values_clean", kv_eff_at, V, K, clean=True)
    values_bad = first_non_finite("bla_fwd_values_bad", (B, NC, H, V), L + N, L, stacked(kv_eff_at, K))
    r2 = te.reduce_axis((0, L + N), name="r2")
    out_chunk = te.compute(  # non-finite from values_bad on (``chunk_output``)
        (B, NC, H, L, V),
        lambda b, c, h, j, vv: te.sum(mix[b, c, h, j, r2] * values_clean[b, c, h, r2, vv], axis=r2),
        name="bla_fwd_out_chunk",
    )
    return SimpleNamespace(**{name: value for name, value in locals().items() if isinstance(value, te.Tensor)})
