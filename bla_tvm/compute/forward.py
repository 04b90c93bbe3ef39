"""BLA forward as TVM tensor-expression compute: what is computed, with no schedule (bla-math.md, "Chunked form").

Three kernels keep the chunks parallel (bla-math.md, "A kernel decomposition"):

1. ``chunk_state_contribution``: U[b, c, h] = state_in (K_c | V_c), all chunks at once (TE, here);
2. the state scan X_{c+1} = A^L X_c + U_c, sequential over chunks (TVMScript, ``scan.py``);
3. ``chunk_output``: steps 1-5 of the chunked form for every chunk, given the state at its start (TE, here).

Letters: B batch, T tokens, H heads, K/V head dims, F = K + V, N resolution, M slots, L chunk length,
NC = ceil(T / L) chunks; t = c L + j. B, T and H are symbolic: one compiled kernel serves every size.
Key and value states travel together as one [.., N, F] tensor (columns 0..K-1 keys, K..F-1 values).
"""

from __future__ import annotations

from tvm import te, tirx

from ..spec import KernelSpec


def _symbolic_sizes(L: int):
    """B, T, H and the chunk count NC = ceil(T / L).

    NC is written (T - 1) // L + 1, the exact form of the last chunk read by o[t] (chunk t // L): the
    schedules' region analysis then sees the chunk loop cover every chunk with no min/max in the bindings.
    """
    B, T, H = te.var("B"), te.var("T"), te.var("H")
    return B, T, H, (T - 1) // L + 1


def _kv_chunks(k, v, spec: KernelSpec, B, T, H, NC):
    """kv[b, c, h, j, f] = (k | v)[b, c L + j, h, f] in the accumulation dtype, zero past the end (t >= T)."""
    K, L, acc = spec.head_k, spec.chunk_size, spec.acc_dtype

    def load(b, c, h, j, f):
        t = te.min(c * L + j, T - 1)
        value = te.if_then_else(f < K, k[b, t, h, te.min(f, K - 1)], v[b, t, h, te.max(f - K, 0)])
        return te.if_then_else(c * L + j < T, value.astype(acc), tirx.const(0, acc))

    return te.compute((B, NC, H, L, spec.state_width), load, name="bla_fwd_kv_chunk")


def _q_chunks(q, spec: KernelSpec, B, T, H, NC):
    """q[b, c, h, j, k] = q[b, c L + j, h, k] in the accumulation dtype, zero past the end (t >= T)."""
    L, acc = spec.chunk_size, spec.acc_dtype

    def load(b, c, h, j, kk):
        t = c * L + j
        return te.if_then_else(t < T, q[b, te.min(t, T - 1), h, kk].astype(acc), tirx.const(0, acc))

    return te.compute((B, NC, H, L, spec.head_k), load, name="bla_fwd_q_chunk")


def _partner(n, N):
    """Index of the other row of n's (cos, sin) pair; n itself for phi_0 (rot_off is 0 there)."""
    return te.if_then_else(n == 0, 0, te.if_then_else((n - 1) % 2 == 0, te.min(n + 1, N - 1), n - 1))


def chunk_state_contribution(spec: KernelSpec):
    """U[b, c, h, n, f] = sum_j state_in[n, j] (k | v)[b, c L + j, h, f].

    k [B, T, H, K], v [B, T, H, V], state_in [N, L] = Bm^T Inv  ->  U [B, NC, H, N, F] (accumulation dtype).
    Returns the tensors in argument order (inputs, then output).
    """
    B, T, H, NC = _symbolic_sizes(spec.chunk_size)
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

    Inputs: q [B, T, H, K], k [B, T, H, K], v [B, T, H, V], states [B, NC, H, N, F] (state before chunk c),
    scale [1], Inv [L, L], Psi [L, N], Hk [M, L], C [M, N], rot_diag [L, N], rot_off [L, N].
    Output: o [B, T, H, V] in the input dtype.

    Per chunk (j, s < L; i < M; n < N):
      KVp[j]     = sum_s Inv[j, s] ((k | v)[s] - Psi[s] X)                   effective inputs k', v'
      QK[j, s]   = q_j . k'_s
      Z[j, n]    = (R^{j+1} X q_j)[n]                                          rotated inter term
      logit[j,i] = scale (sum_{D<=j} Hk[i, D] QK[j, j-D] + sum_n C[i, n] Z[j, n]),  -inf where i W > t M
      E = exp(logit - rowmax),  den = rowsum(E)
      o_j        = (sum_{s<=j} (E Hk)[j, j-s] v'_s + ((E C)[j] R^{j+1}) Y) / den_j
    """
    B, T, H, NC = _symbolic_sizes(spec.chunk_size)
    W, N, M = spec.window, spec.resolution, spec.num_slots
    L, K, V, F, acc, dt = spec.chunk_size, spec.head_k, spec.head_v, spec.state_width, spec.acc_dtype, spec.dtype
    q = te.placeholder((B, T, H, K), dt, name="q")
    k = te.placeholder((B, T, H, K), dt, name="k")
    v = te.placeholder((B, T, H, V), dt, name="v")
    states = te.placeholder((B, NC, H, N, F), acc, name="states")
    scale = te.placeholder((1,), acc, name="scale")
    Inv = te.placeholder((L, L), acc, name="Inv")
    Psi = te.placeholder((L, N), acc, name="Psi")
    Hk = te.placeholder((M, L), acc, name="Hk")
    C = te.placeholder((M, N), acc, name="C")
    rot_diag = te.placeholder((L, N), acc, name="rot_diag")
    rot_off = te.placeholder((L, N), acc, name="rot_off")

    q_chunk = _q_chunks(q, spec, B, T, H, NC)
    kv = _kv_chunks(k, v, spec, B, T, H, NC)
    n_r = te.reduce_axis((0, N), name="n_r")
    psi_x = te.compute(  # Psi[s] X: the part of each token that the window drops, per column
        (B, NC, H, L, F),
        lambda b, c, h, s, f: te.sum(Psi[s, n_r] * states[b, c, h, n_r, f], axis=n_r),
        name="bla_fwd_psi_x",
    )
    s_r = te.reduce_axis((0, L), name="s_r")
    kv_eff = te.compute(
        (B, NC, H, L, F),
        lambda b, c, h, j, f: te.sum(
            Inv[j, s_r] * (kv[b, c, h, s_r, f] - psi_x[b, c, h, s_r, f]), axis=s_r
        ),
        name="bla_fwd_kv_eff",
    )
    k_r = te.reduce_axis((0, K), name="k_r")
    qk = te.compute(
        (B, NC, H, L, L),
        lambda b, c, h, j, s: te.sum(q_chunk[b, c, h, j, k_r] * kv_eff[b, c, h, s, k_r], axis=k_r),
        name="bla_fwd_qk",
    )
    k_r2 = te.reduce_axis((0, K), name="k_r2")
    xq = te.compute(
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(q_chunk[b, c, h, j, k_r2] * states[b, c, h, n, k_r2], axis=k_r2),
        name="bla_fwd_xq",
    )
    rotated_q = te.compute(
        (B, NC, H, L, N),
        lambda b, c, h, j, n: rot_diag[j, n] * xq[b, c, h, j, n] + rot_off[j, n] * xq[b, c, h, j, _partner(n, N)],
        name="bla_fwd_rotated_q",
    )
    d_r = te.reduce_axis((0, L), name="d_r")
    intra = te.compute(
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.sum(
            te.if_then_else(d_r <= j, Hk[i, d_r] * qk[b, c, h, j, te.max(j - d_r, 0)], tirx.const(0, acc)),
            axis=d_r,
        ),
        name="bla_fwd_intra_scores",
    )
    n_r2 = te.reduce_axis((0, N), name="n_r2")
    inter = te.compute(
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.sum(C[i, n_r2] * rotated_q[b, c, h, j, n_r2], axis=n_r2),
        name="bla_fwd_inter_scores",
    )

    def masked(c, j, i):  # slot lag tau_i = i W / M lies before the sequence start: i W > t M
        return tirx.Cast("int64", i) * W > tirx.Cast("int64", c * L + j) * M

    logits = te.compute(
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.if_then_else(
            masked(c, j, i), te.min_value(acc), scale[0] * (intra[b, c, h, j, i] + inter[b, c, h, j, i])
        ),
        name="bla_fwd_logits",
    )
    i_r = te.reduce_axis((0, M), name="i_r")
    row_max = te.compute(
        (B, NC, H, L), lambda b, c, h, j: te.max(logits[b, c, h, j, i_r], axis=i_r), name="bla_fwd_row_max"
    )
    probs = te.compute(  # unnormalised softmax numerators
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.if_then_else(
            masked(c, j, i), tirx.const(0, acc), te.exp(logits[b, c, h, j, i] - row_max[b, c, h, j])
        ),
        name="bla_fwd_probs",
    )
    i_r2 = te.reduce_axis((0, M), name="i_r2")
    row_sum = te.compute(
        (B, NC, H, L), lambda b, c, h, j: te.sum(probs[b, c, h, j, i_r2], axis=i_r2), name="bla_fwd_row_sum"
    )
    i_r3 = te.reduce_axis((0, M), name="i_r3")
    probs_h = te.compute(  # (E Hk)[j, D]
        (B, NC, H, L, L),
        lambda b, c, h, j, d: te.sum(probs[b, c, h, j, i_r3] * Hk[i_r3, d], axis=i_r3),
        name="bla_fwd_probs_h",
    )
    i_r4 = te.reduce_axis((0, M), name="i_r4")
    probs_c = te.compute(  # (E C)[j, n]
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(probs[b, c, h, j, i_r4] * C[i_r4, n], axis=i_r4),
        name="bla_fwd_probs_c",
    )
    readout = te.compute(  # (E C)[j] R^{j+1}
        (B, NC, H, L, N),
        lambda b, c, h, j, n: rot_diag[j, n] * probs_c[b, c, h, j, n]
        - rot_off[j, n] * probs_c[b, c, h, j, _partner(n, N)],
        name="bla_fwd_readout",
    )
    s_r2 = te.reduce_axis((0, L), name="s_r2")
    out_intra = te.compute(
        (B, NC, H, L, V),
        lambda b, c, h, j, vv: te.sum(
            te.if_then_else(
                s_r2 <= j, probs_h[b, c, h, j, te.max(j - s_r2, 0)] * kv_eff[b, c, h, s_r2, K + vv], tirx.const(0, acc)
            ),
            axis=s_r2,
        ),
        name="bla_fwd_out_intra",
    )
    n_r3 = te.reduce_axis((0, N), name="n_r3")
    out_inter = te.compute(
        (B, NC, H, L, V),
        lambda b, c, h, j, vv: te.sum(readout[b, c, h, j, n_r3] * states[b, c, h, n_r3, K + vv], axis=n_r3),
        name="bla_fwd_out_inter",
    )
    out_chunk = te.compute(
        (B, NC, H, L, V),
        lambda b, c, h, j, vv: (out_intra[b, c, h, j, vv] + out_inter[b, c, h, j, vv]) / row_sum[b, c, h, j],
        name="bla_fwd_out_chunk",
    )
    o = te.compute(
        (B, T, H, V),
        lambda b, t, h, vv: out_chunk[b, t // L, h, t % L, vv].astype(dt),
        name="bla_fwd_out",
    )
    return [q, k, v, states, scale, Inv, Psi, Hk, C, rot_diag, rot_off, o]
