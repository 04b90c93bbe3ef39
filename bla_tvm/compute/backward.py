"""BLA backward as TVM tensor-expression compute (bla-math.md, "Backward"), chunk-parallel like the forward.

Three kernels, mirroring the forward's:

1. ``chunk_backward``: per chunk, recompute the forward stages from the saved state at the chunk start and run
   them backward given dO: dq, the chunk-local part of d(k | v), and D_c, the gradient of the chunk's outputs
   with respect to the state at its start (TE, here);
2. the reverse state scan G_c = D_c + (A^L)^T G_{c+1} (``scan.py``, TVMScript);
3. ``input_gradient``: dq, and d(k | v) = local part + state_in^T G_{c+1}, the gradient reaching each chunk's
   inputs through the state the chunk hands on (TE, here; one kernel per tensor).
With GQA the per-chunk gradients are per query head; the scan and d(k | v) sum them over each group.

Forward of a chunk (``forward.chunk_forward_stages``), with P the normalised softmax and mixn = mix / rowsum:
    kv_eff = E [kv; X|Y]   qx = q [k'; X]^T   z = lag(qx) Rb^T + rot(qx)   P = softmax(scale C z)
    w = P C   g = w Rb   mixn = [scatter(g) | w R^{j+1}]   o = mixn [v'; Y]
Backward, stage by stage (the same letters, d for gradients):
    dmix = dO [v'; Y]^T        d[v'; Y] = mixn^T dO
    dw   = lag(dmix) Rb + rot^T(dmix)          dP = dw C^T
    dlogit = P (dP - rowsum(P dP))              dz = scale dlogit C
    dqx  = [scatter(dz Rb) | rot^T(dz)]         dq = dqx [k'; X]    d[k'; X] = dqx^T q
    d[kv; X|Y] = E^T dkv_eff,  dkv_eff = (dk' | dv')
    D_c = d[X|Y] from both paths (direct state reads)
The products over a chunk's rows read their row operand ``finite`` and are ``poisoned`` where the masked product
would read a non-finite row (``forward``'s scheme), so a non-finite output gradient or token reaches only the
gradients the definition's own would.
"""

from __future__ import annotations

from tvm import te, tirx

from ..layer import KernelSpec
from .forward import (
    causal, chunk_forward_stages, chunk_inputs, finite, last_non_finite, partner, poisoned, reaches_back,
    symbolic_sizes,
)  # fmt: skip


def chunk_backward(spec: KernelSpec):
    """Per-chunk gradients given dO and the saved states.

    Inputs: ``forward.ChunkInputs`` (q, k, v, states, positions, scale, input_map, lag_basis, C, rot_diag,
    rot_off), then do [B, T, HQ, V] (the input dtype).
    Output (accumulation dtype), one tensor because TVM schedules one output per per-chunk kernel:
    grads [B, NC, HQ, L + N, F + K]: rows j < L hold (d(k | v) local | dq) of token j; rows L + n hold
    (D[n, :] | 0), D the gradient with respect to the state at the chunk start; per query head.
    """
    inputs = chunk_inputs(spec)
    fwd = chunk_forward_stages(spec, inputs)
    q, scale, input_map, lag_basis, C, rot_diag, rot_off = (
        inputs.q, inputs.scale, inputs.input_map, inputs.lag_basis, inputs.C, inputs.rot_diag, inputs.rot_off
    )
    B, T, H, _ = q.shape
    NC = inputs.states.shape[1]
    N, M, L, K, V, F = spec.resolution, spec.num_slots, spec.chunk_size, spec.head_k, spec.head_v, spec.state_width
    acc, dt = spec.acc_dtype, spec.dtype
    zero = tirx.const(0, acc)
    do = te.placeholder((B, T, H, V), dt, name="do")

    do_chunk = te.compute(
        (B, NC, H, L, V),
        lambda b, c, h, j, vv: te.if_then_else(
            c * L + j < T, do[b, te.min(c * L + j, T - 1), h, vv].astype(acc), zero
        ),
        name="bla_bwd_do_chunk",
    )
    prob = te.compute(  # normalised softmax P
        (B, NC, H, L, M),
        lambda b, c, h, j, i: fwd.probs[b, c, h, j, i] / fwd.row_sum[b, c, h, j],
        name="bla_bwd_prob",
    )
    mixn = te.compute(  # exact zeros past the mask, even on a non-finite row (dvalues sums over rows)
        (B, NC, H, L, L + N),
        lambda b, c, h, j, r: te.if_then_else(
            causal(j, r, L), fwd.mix[b, c, h, j, r] / fwd.row_sum[b, c, h, j], zero
        ),
        name="bla_bwd_mixn",
    )
    v1 = te.reduce_axis((0, V), name="v1")
    dmix = te.compute(
        (B, NC, H, L, L + N),
        lambda b, c, h, j, r: te.sum(do_chunk[b, c, h, j, v1] * fwd.values[b, c, h, r, v1], axis=v1),
        name="bla_bwd_dmix",
    )
    j1 = te.reduce_axis((0, L), name="j1")
    do_clean = te.compute((B, NC, H, L, V), lambda *i: finite(do_chunk[i], acc), name="bla_bwd_do_clean")
    do_bad = last_non_finite("bla_bwd_do_bad", (B, NC, H, V), L, lambda *i: do_chunk[i])
    dvalues = te.compute(  # d[v'; Y]: token r reaches the outputs j >= r (``dvalues_at``)
        (B, NC, H, L + N, V),
        lambda b, c, h, r, vv: te.sum(mixn[b, c, h, j1, r] * do_clean[b, c, h, j1, vv], axis=j1),
        name="bla_bwd_dvalues",
    )

    def dvalues_at(b, c, h, r, vv):
        return poisoned(reaches_back(do_bad[b, c, h, vv], r, L), dvalues[b, c, h, r, vv], acc)

    d1 = te.reduce_axis((0, L), name="d1")
    dw_lag = te.compute(  # sum_{D<=j} dmix[j, j-D] Rb[n, D]
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(
            te.if_then_else(d1 <= j, dmix[b, c, h, j, te.max(j - d1, 0)] * lag_basis[n, d1], zero), axis=d1
        ),
        name="bla_bwd_dw_lag",
    )
    dw = te.compute(  # + the transposed rotation of mix[j, L + m] = rd w[m] - ro w[p(m)]
        (B, NC, H, L, N),
        lambda b, c, h, j, n: dw_lag[b, c, h, j, n]
        + rot_diag[j, n] * dmix[b, c, h, j, L + n]
        - rot_off[j, partner(n, N)] * dmix[b, c, h, j, L + partner(n, N)],
        name="bla_bwd_dw",
    )
    n1 = te.reduce_axis((0, N), name="n1")
    dprob = te.compute(
        (B, NC, H, L, M),
        lambda b, c, h, j, i: te.sum(dw[b, c, h, j, n1] * C[i, n1], axis=n1),
        name="bla_bwd_dprob",
    )
    i1 = te.reduce_axis((0, M), name="i1")
    row_dot = te.compute(
        (B, NC, H, L),
        lambda b, c, h, j: te.sum(prob[b, c, h, j, i1] * dprob[b, c, h, j, i1], axis=i1),
        name="bla_bwd_row_dot",
    )
    dscores = te.compute(  # d(C z): scale * P (dP - rowdot); masked slots have P = 0
        (B, NC, H, L, M),
        lambda b, c, h, j, i: scale[0] * prob[b, c, h, j, i] * (dprob[b, c, h, j, i] - row_dot[b, c, h, j]),
        name="bla_bwd_dscores",
    )
    i2 = te.reduce_axis((0, M), name="i2")
    dz = te.compute(
        (B, NC, H, L, N),
        lambda b, c, h, j, n: te.sum(dscores[b, c, h, j, i2] * C[i2, n], axis=i2),
        name="bla_bwd_dz",
    )
    n2 = te.reduce_axis((0, N), name="n2")
    dqx_lag = te.compute(  # d qx[j, s] for s <= j: sum_n Rb[n, j - s] dz[j, n]
        (B, NC, H, L, L),
        lambda b, c, h, j, s: te.sum(
            te.if_then_else(s <= j, lag_basis[n2, te.max(j - s, 0)] * dz[b, c, h, j, n2], zero), axis=n2
        ),
        name="bla_bwd_dqx_lag",
    )

    def dqx_state(b, c, h, j, m):  # z[j, n] += rd[j, n] qx[L + n] + ro[j, n] qx[L + p(n)]
        p = partner(m, N)
        return rot_diag[j, m] * dz[b, c, h, j, m] + rot_off[j, p] * dz[b, c, h, j, p]

    dqx = te.compute(
        (B, NC, H, L, L + N),
        lambda b, c, h, j, r: te.if_then_else(
            r < L, dqx_lag[b, c, h, j, te.min(r, L - 1)], dqx_state(b, c, h, j, te.max(r - L, 0))
        ),
        name="bla_bwd_dqx",
    )
    r1 = te.reduce_axis((0, L + N), name="r1")
    dq_chunk = te.compute(  # non-finite from keys_bad on (``grads``)
        (B, NC, H, L, K),
        lambda b, c, h, j, kk: te.sum(dqx[b, c, h, j, r1] * fwd.keys_clean[b, c, h, r1, kk], axis=r1),
        name="bla_bwd_dq_chunk",
    )

    def dq_at(b, c, h, j, kk):
        return poisoned(j >= fwd.keys_bad[b, c, h, kk], dq_chunk[b, c, h, j, kk], acc)

    j2 = te.reduce_axis((0, L), name="j2")
    q_clean = te.compute((B, NC, H, L, K), lambda *i: finite(fwd.q_chunk[i], acc), name="bla_bwd_q_clean")
    q_bad = last_non_finite("bla_bwd_q_bad", (B, NC, H, K), L, lambda *i: fwd.q_chunk[i])
    dkeys = te.compute(  # d[k'; X] (``d_stacked``)
        (B, NC, H, L + N, K),
        lambda b, c, h, r, kk: te.sum(dqx[b, c, h, j2, r] * q_clean[b, c, h, j2, kk], axis=j2),
        name="bla_bwd_dkeys",
    )

    def d_stacked(b, c, h, r, f):  # gradient reaching row r of [k'|v'; X|Y] from qx and o
        key = te.min(f, K - 1)
        dkey = poisoned(reaches_back(q_bad[b, c, h, key], r, L), dkeys[b, c, h, r, key], acc)
        return te.if_then_else(f < K, dkey, dvalues_at(b, c, h, r, te.max(f - K, 0)))

    j3 = te.reduce_axis((0, L), name="j3")
    d_kv_state = te.compute(  # E^T d kv_eff, rows [kv; X|Y]; SIMT (it reads through d_stacked), so it selects
        (B, NC, H, L + N, F),
        lambda b, c, h, r, f: te.sum(
            te.if_then_else(causal(j3, r, L), input_map[j3, r] * d_stacked(b, c, h, j3, f), zero), axis=j3
        ),
        name="bla_bwd_d_kv_state",
    )
    grads = te.compute(
        (B, NC, H, L + N, F + K),
        lambda b, c, h, r, f: te.if_then_else(
            r < L,
            te.if_then_else(
                f < F, d_kv_state[b, c, h, r, te.min(f, F - 1)], dq_at(b, c, h, te.min(r, L - 1), te.max(f - F, 0))
            ),
            te.if_then_else(f < F, d_kv_state[b, c, h, r, te.min(f, F - 1)] + d_stacked(b, c, h, r, te.min(f, F - 1)), zero),
        ),
        name="bla_bwd_grads",
    )
    return [*inputs, do, grads]


def input_gradient(spec: KernelSpec, part: str):
    """The gradient of q, k or v (``part``) in the input dtype, [B, T, HQ, K] or [B, T, H, K | V].

    dq[t] = grads[c, j, F:];  d(k | v)[t] = sum_g grads[c, j, :F] + sum_n state_in[n, j] G_next[c, n, :]
    (the sum over the G query heads of key/value head h), where G_next = G_{c+1}, the state gradient at the
    start of chunk c + 1 when that chunk continues chunk c's sequence, else zero: what reaches a chunk's
    inputs through the state it hands on.
    Inputs: grads [B, NC, HQ, L + N, F + K], and for k and v G [B, NC, H, N, F] (the reverse scan's), starts
    [B, NC] int32, state_in [N, L]; output: d<part>.
    """
    B, T, H, NC = symbolic_sizes(spec.chunk_size)
    Gq = spec.group_size
    HQ = te.var("HQ") if Gq > 1 else H
    N, L, K, V, F = spec.resolution, spec.chunk_size, spec.head_k, spec.head_v, spec.state_width
    acc, dt = spec.acc_dtype, spec.dtype
    grads = te.placeholder((B, NC, HQ, L + N, F + K), acc, name="grads")
    if part == "q":
        dq = te.compute(
            (B, T, HQ, K), lambda b, t, h, kk: grads[b, t // L, h, t % L, F + kk].astype(dt), name="bla_bwd_dq"
        )
        return [grads, dq]
    state_grad = te.placeholder((B, NC, H, N, F), acc, name="state_grad")
    starts = te.placeholder((B, NC), "int32", name="starts")
    state_in = te.placeholder((N, L), acc, name="state_in")
    offset, width = {"k": (0, K), "v": (K, V)}[part]
    if Gq > 1:
        g = te.reduce_axis((0, Gq), name="g")
        group_sum = te.compute(
            (B, NC, H, L, width),
            lambda b, c, h, j, f: te.sum(grads[b, c, h * Gq + g, j, offset + f], axis=g),
            name="bla_bwd_group_sum",
        )
        local = group_sum.__getitem__
    else:
        local = lambda index: grads[index[:4] + (offset + index[4],)]  # noqa: E731

    def handed_on(b, c, h, n, f):  # G_{c+1} if chunk c + 1 continues chunk c's sequence, else 0
        after = te.min(c + 1, NC - 1)
        continues = te.all(c + 1 < NC, starts[b, after] < 0)
        return te.if_then_else(continues, state_grad[b, after, h, n, offset + f], tirx.const(0, acc))

    n1 = te.reduce_axis((0, N), name="n1")
    carried = te.compute(
        (B, NC, H, L, width),
        lambda b, c, h, j, f: te.sum(state_in[n1, j] * handed_on(b, c, h, n1, f), axis=n1),
        name="bla_bwd_carried",
    )
    grad = te.compute(
        (B, T, H, width),
        lambda b, t, h, f: (local((b, t // L, h, t % L, f)) + carried[b, t // L, h, t % L, f]).astype(dt),
        name=f"bla_bwd_d{part}",
    )
    return [grads, state_grad, starts, state_in, grad]
