"""The host side of the CUDA tile backward's gradient layout (``ops``): the TE chunk_backward's grads converted for
the tile reverse scan, and the final states' gradient added to either layout, compared element by element on the
CPU (the kernels that read them run on the GPU, tests/test_gpu.py)."""

from __future__ import annotations

import torch

from bla_tvm.layer import LayerSpec
from bla_tvm.layout import packed_layout
from bla_tvm.ops import add_final_gradients, chunk_tensors, local_gradients, tile_scan_gradients

SPEC = LayerSpec(16, 3, 4, 8, 24, "bfloat16", 2).kernel(16)  # K != V, GQA: heads 0, 2, .. take the final's part
L, N, K, F, G = SPEC.chunk_size, SPEC.resolution, SPEC.head_k, SPEC.state_width, SPEC.group_size


def te_to_tile(te_grads: torch.Tensor) -> dict[str, torch.Tensor]:
    """The reference conversion, one element at a time: grads [B, NC, HQ, L + N, >= F] to the tile layout."""
    B, NC, HQ = te_grads.shape[:3]
    tile = {"grads": torch.zeros(B, NC, HQ, N, F), "local_k": torch.zeros(B, NC * L, HQ, K),
            "local_v": torch.zeros(B, NC * L, HQ, F - K)}  # fmt: skip
    for b, c, h, f in torch.cartesian_prod(*(torch.arange(n) for n in (B, NC, HQ, F))).tolist():
        tile["grads"][b, c, h, :, f] = te_grads[b, c, h, L:, f]
        part, column = ("local_k", f) if f < K else ("local_v", f - K)
        tile[part][b, c * L : (c + 1) * L, h, column] = te_grads[b, c, h, :L, f]
    return tile


def test_te_grads_reach_the_tile_scan_in_its_layout():
    te_grads = torch.randn(2, 3, 4, L + N, F + K)  # with the TE kernel's dq columns, which are dropped
    converted = tile_scan_gradients(te_grads, SPEC)
    for name, expected in te_to_tile(te_grads).items():
        assert converted[name].dtype == torch.float16 and converted[name].is_contiguous(), name
        torch.testing.assert_close(converted[name].float(), expected.half().float(), rtol=0, atol=0)


def test_final_gradient_lands_alike_in_both_layouts():
    cu_seqlens = torch.tensor([0, 20, 21, 45])  # three sequences packed, the last chunk of each partial
    layout = packed_layout(cu_seqlens, 45, L, SPEC.window, None)
    rows, chunks = layout.positions.shape
    q = torch.zeros(rows, chunks * L, 4, K)
    final_grads = torch.randn(3, 4 // G, L + N, F)
    te = {"grads": chunk_tensors(q, SPEC, L + N, F + K).zero_()}
    add_final_gradients(te, final_grads, layout, SPEC)
    tile = {"grads": chunk_tensors(q, SPEC, N, F, torch.float16).zero_(),
            **{name: x.zero_() for name, x in local_gradients(q, SPEC).items()}}  # fmt: skip
    add_final_gradients(tile, final_grads, layout, SPEC)
    for name, expected in te_to_tile(te["grads"]).items():
        torch.testing.assert_close(tile[name].float(), expected.half().float(), rtol=0, atol=0)
    assert te["grads"][:, :, 1::G].abs().sum() == 0, "only the first query head of each group takes the final's part"
    assert te["grads"].abs().sum() > 0


def test_in_place_local_gradients_are_dk_and_dv_themselves():
    dk, dv = torch.empty(2, 40, 2, K, dtype=torch.bfloat16), torch.empty(2, 40, 2, F - K, dtype=torch.bfloat16)
    local = local_gradients(torch.empty(2, 40, 4, K), SPEC, dk, dv)
    assert local["local_k"].data_ptr() == dk.data_ptr() and local["local_v"].data_ptr() == dv.data_ptr()
    assert local["local_k"].dtype == local["local_v"].dtype == torch.float16
    assert local["local_k"].shape == dk.shape and local["local_v"].shape == dv.shape
