"""One recurrent step of BLA for one-token decoding, as TVM tensor-expression compute (bla-math.md, "Recurrent
form"): what the decode kernel computes, with no schedule.

Per (batch b, key/value head h), with t = seen[b] the new token's position and G query heads per kv head:

    X' = A X + b k^T,  Y' = A Y + b v^T          (A = P R, P = I - b b^T / W)
    s_g = scale C X' q_g, -inf where i W > t M    p_g = softmax(s_g)         o_g = p_g^T C Y'

A is never formed: R is block diagonal (1, then 2x2 rotations, then the Nyquist -1 when N = W is even), so
A X = R X - b (b^T R X / W): a pair-by-pair rotation of the rows and one removal vector per column. The step
then costs O(N F) instead of O(N^2 F), and every column of the state is updated from that column alone.
The readout is regrouped around the state: z_g = X' q_g [N], s_g = C z_g, w_g = p_g C [N], o_g = w_g Y'.

Letters: B batch, H key/value heads, G query heads per kv head (static, ``KernelSpec.group_size``), K/V head
dims, F = K + V, N resolution, M slots. Key and value states are stacked as one [N, F] tile (columns 0..K-1
keys, K..F-1 values) inside the kernel, so one thread can own any column; in memory they are the two tensors of
``bla_tvm.state.BLAState``. B and H are symbolic: one compiled kernel serves every batch and head count.
"""

from __future__ import annotations

from tvm import te, tirx

from ..layer import KernelSpec
from .forward import partner, scale_sign


def decode_step(spec: KernelSpec, state_dtype: str | None = None):
    """The tensors of one decode step, in argument order (inputs, then outputs).

    Inputs: q [B, H, G, K], k [B, H, K], v [B, H, V] (``spec.dtype``); key_state [B, H, N, K], value_state
    [B, H, N, V] (``state_dtype``, default the accumulation dtype); seen [B] int64 (tokens before this one);
    scale [1]; rot_diag [N], rot_off [N] (R[n, n] and R[n, partner(n)]); basis [N] (b = phi(0)); removal [N]
    (b / W); C [M, N] and its transpose C_t [N, M] (accumulation dtype; each product reads the layout whose
    rows its threads walk along).
    Outputs: o [B, H, G, V] (``spec.dtype``); key_state_out [B, H, N, K], value_state_out [B, H, N, V]
    (``state_dtype``): X' and Y'. The readout reads X', Y' as stored (rounded to ``state_dtype``), as the next
    step will.
    """
    N, M, W, G = spec.resolution, spec.num_slots, spec.window, spec.group_size
    K, V, F, acc, dt = spec.head_k, spec.head_v, spec.state_width, spec.acc_dtype, spec.dtype
    sdt = state_dtype or acc
    B, H = te.var("B"), te.var("H")
    q = te.placeholder((B, H, G, K), dt, name="q")
    k = te.placeholder((B, H, K), dt, name="k")
    v = te.placeholder((B, H, V), dt, name="v")
    key_state = te.placeholder((B, H, N, K), sdt, name="key_state")
    value_state = te.placeholder((B, H, N, V), sdt, name="value_state")
    seen = te.placeholder((B,), "int64", name="seen")
    scale = te.placeholder((1,), acc, name="scale")
    rot_diag = te.placeholder((N,), acc, name="rot_diag")
    rot_off = te.placeholder((N,), acc, name="rot_off")
    basis = te.placeholder((N,), acc, name="basis")
    removal = te.placeholder((N,), acc, name="removal")
    C = te.placeholder((M, N), acc, name="C")
    C_t = te.placeholder((N, M), acc, name="C_t")  # C transposed: the scores' reads run along a row
    zero = tirx.const(0, acc)

    # -- the state update, column by column of the stacked X | Y [N, F]: S -> R S -> minus the token leaving,
    # plus the new one
    loaded = te.compute(
        (B, H, N, F),
        lambda b, h, n, f: te.if_then_else(
            f < K, key_state[b, h, n, te.min(f, K - 1)], value_state[b, h, n, te.max(f - K, 0)]
        ).astype(acc),
        name="bla_dec_loaded",
    )
    rotated = te.compute(  # R S
        (B, H, N, F),
        lambda b, h, n, f: rot_diag[n] * loaded[b, h, n, f] + rot_off[n] * loaded[b, h, partner(n, N), f],
        name="bla_dec_rotated",
    )
    n1 = te.reduce_axis((0, N), name="n1")
    removed = te.compute(  # b^T R S / W: the blurry token that falls out of the window
        (B, H, F), lambda b, h, f: te.sum(removal[n1] * rotated[b, h, n1, f], axis=n1), name="bla_dec_removed"
    )
    state = te.compute(  # A S + b (k | v)^T, rounded to the state dtype
        (B, H, N, F),
        lambda b, h, n, f: (
            rotated[b, h, n, f]
            + basis[n]
            * (te.if_then_else(f < K, k[b, h, te.min(f, K - 1)], v[b, h, te.max(f - K, 0)]).astype(acc)
               - removed[b, h, f])
        ).astype(sdt),
        name="bla_dec_state",
    )  # fmt: skip
    key_out = te.compute((B, H, N, K), lambda b, h, n, kk: state[b, h, n, kk], name="bla_dec_key_out")
    value_out = te.compute((B, H, N, V), lambda b, h, n, vv: state[b, h, n, K + vv], name="bla_dec_value_out")

    # -- the readout: z = X' q, scores = scale C z (masked), softmax, w = p C, o = w Y' / sum(p)
    k1 = te.reduce_axis((0, K), name="k1")
    z = te.compute(
        (B, H, G, N),
        lambda b, h, g, n: te.sum(q[b, h, g, k1].astype(acc) * state[b, h, n, k1].astype(acc), axis=k1),
        name="bla_dec_z",
    )
    n2 = te.reduce_axis((0, N), name="n2")
    scores = te.compute(
        (B, H, G, M), lambda b, h, g, i: te.sum(C_t[n2, i] * z[b, h, g, n2], axis=n2), name="bla_dec_scores"
    )

    def masked(b, i):  # slot lag tau_i = i W / M lies before the sequence start: i W > t M (t >= W: none is)
        return tirx.Cast("int64", i) * W > te.min(seen[b], tirx.const(W, "int64")) * M  # no int64 overflow

    logits = te.compute(  # u = sign(scale) C z: the maximum and the exponent read it (``forward.scale_sign``)
        (B, H, G, M),
        lambda b, h, g, i: te.if_then_else(
            masked(b, i), te.min_value(acc), scale_sign(scale, acc) * scores[b, h, g, i]
        ),
        name="bla_dec_logits",
    )
    i1 = te.reduce_axis((0, M), name="i1")
    row_max = te.compute((B, H, G), lambda b, h, g: te.max(logits[b, h, g, i1], axis=i1), name="bla_dec_row_max")
    probs = te.compute(  # unnormalised softmax numerators of scale C z: exp(|scale| (u - max u))
        (B, H, G, M),
        lambda b, h, g, i: te.if_then_else(
            masked(b, i), zero, te.exp(te.abs(scale[0]) * (logits[b, h, g, i] - row_max[b, h, g]))
        ),
        name="bla_dec_probs",
    )
    i2 = te.reduce_axis((0, M), name="i2")
    row_sum = te.compute((B, H, G), lambda b, h, g: te.sum(probs[b, h, g, i2], axis=i2), name="bla_dec_row_sum")
    i3 = te.reduce_axis((0, M), name="i3")
    w = te.compute(
        (B, H, G, N), lambda b, h, g, n: te.sum(probs[b, h, g, i3] * C[i3, n], axis=i3), name="bla_dec_w"
    )
    n3 = te.reduce_axis((0, N), name="n3")
    mix = te.compute(
        (B, H, G, V),
        lambda b, h, g, vv: te.sum(w[b, h, g, n3] * state[b, h, n3, K + vv].astype(acc), axis=n3),
        name="bla_dec_mix",
    )
    o = te.compute(
        (B, H, G, V), lambda b, h, g, vv: (mix[b, h, g, vv] / row_sum[b, h, g]).astype(dt), name="bla_dec_out"
    )
    inputs = [q, k, v, key_state, value_state, seen, scale, rot_diag, rot_off, basis, removal, C, C_t]
    return [*inputs, o, key_out, value_out]
