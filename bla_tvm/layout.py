"""Where each sequence lies in the kernels' grid of chunks, and the index tables that tell the kernels.

The kernels see rows b of NC chunks of L tokens ([B, NC * L, H, D] inputs). A sequence starts at a chunk
boundary and may continue from a carried state, so each chunk needs the number of tokens its sequence saw
before it (the slot mask), and the scans need which chunks start a sequence.

- Batch layout (no ``cu_seqlens``): row b is sequence b; chunk c starts at token c L.
- Packed layout (``cu_seqlens``, B = 1): sequence s of length n_s takes ceil(n_s / L) chunks of one row, in
  order, its last chunk padded with zeros; the row has NC = T // L + S chunks (an upper bound that depends on
  shapes only, so compiled graphs see static shapes); spare chunks at the end start a throwaway sequence.
  q, k, v are scattered into that row and o gathered back (``pack``, ``unpack``).

Sequences of length 0 own no chunk: their final state is their initial state.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from .runtime import kernel_ready
from .state import check_seen


class ChunkLayout(NamedTuple):
    """Index tables over the chunk grid [rows, NC] and the S sequences (int32 unless said).

    positions [rows, NC]: tokens the chunk's sequence saw before the chunk, clipped at W;
    starts [rows, NC]: s where chunk c starts sequence s, else -1;
    ends [rows, NC]: s where chunk c is the last chunk of sequence s, else -1;
    start_row, start_chunk [S]: the first chunk of sequence s (any chunk for an empty sequence);
    end_row, end_chunk, end_length [S]: its last chunk and how many of its tokens are in it (0: empty);
    token_index [T] int64: where packed token t sits in the padded row (packed layout only, else None).
    """

    positions: torch.Tensor
    starts: torch.Tensor
    ends: torch.Tensor
    start_row: torch.Tensor
    start_chunk: torch.Tensor
    end_row: torch.Tensor
    end_chunk: torch.Tensor
    end_length: torch.Tensor
    token_index: torch.Tensor | None

    @property
    def num_chunks(self) -> int:
        return self.positions.shape[1]

    @property
    def empty(self) -> torch.Tensor:
        """[S] bool: sequences with no token."""
        return self.end_length == 0

    def as_tensor(self) -> torch.Tensor:
        """Every table in one int32 tensor [3 rows NC + 5 S (+ T packed)], as the forward op returns it for the
        backward (``from_tensor``), so the backward needs no second look at ``cu_seqlens``."""
        tables = [self.positions.flatten(), self.starts.flatten(), self.ends.flatten(), *self[3:8]]
        if self.token_index is not None:
            tables.append(self.token_index.to(torch.int32))
        return torch.cat(tables)

    @classmethod
    def from_tensor(cls, tables: torch.Tensor, rows: int, chunks: int, packed_tokens: int | None) -> "ChunkLayout":
        """The layout ``as_tensor`` stored, given its grid [rows, NC] and, for a packed layout, its T tokens."""
        grid = rows * chunks
        S = cls.sequences(tables.shape[0], rows, chunks, packed_tokens)
        sizes = [grid, grid, grid, S, S, S, S, S] + ([packed_tokens] if packed_tokens is not None else [])
        parts = [kernel_ready(x) for x in torch.split(tables, sizes)]  # views where aligned for the kernels
        token_index = parts[8].to(torch.int64) if packed_tokens is not None else None
        return cls(*(x.view(rows, chunks) for x in parts[:3]), *parts[3:8], token_index)

    @staticmethod
    def tensor_size(rows: int, chunks: int, sequences: int, packed_tokens: int | None) -> int:
        """Elements of ``as_tensor``'s result."""
        return 3 * rows * chunks + 5 * sequences + (packed_tokens or 0)

    @staticmethod
    def sequences(tensor_size: int, rows: int, chunks: int, packed_tokens: int | None) -> int:
        """S of a layout whose ``as_tensor`` has ``tensor_size`` elements (the inverse of ``tensor_size``)."""
        return (tensor_size - 3 * rows * chunks - (packed_tokens or 0)) // 5


def packed_chunks(total_tokens: int, num_sequences: int, chunk_size: int) -> int:
    """NC of the packed layout: T // L + S >= sum_s ceil(n_s / L) for any split of T tokens into S sequences."""
    return total_tokens // chunk_size + num_sequences


def batch_layout(
    batch: int, tokens: int, chunk_size: int, window: int, seen: torch.Tensor | None, device: torch.device | None = None
) -> ChunkLayout:  # fmt: skip
    """Row b holds sequence b, which saw seen[b] tokens before this call (None: none, on ``device``); ``tokens``
    of its own. seen >= 0 is checked here for CPU tensors; on CUDA the caller checks a user's state (``api``) so
    that a call never waits for the device (positions are clipped to [0, W] either way). The layout of fresh
    sequences depends on the shapes alone and is built once per shape."""
    if seen is None:
        return fresh_batch_layout(batch, tokens, chunk_size, window, torch.device(device))
    if not seen.is_cuda:
        check_seen(seen, tokens)
    return _batch_layout(batch, tokens, chunk_size, window, seen)


@functools.lru_cache(maxsize=64)
def fresh_batch_layout(batch: int, tokens: int, chunk_size: int, window: int, device: torch.device) -> ChunkLayout:
    """``batch_layout`` of sequences that saw no token before (its tables are shared: kernels only read them)."""
    return _batch_layout(batch, tokens, chunk_size, window, torch.zeros(batch, dtype=torch.int64, device=device))


def _batch_layout(batch: int, tokens: int, chunk_size: int, window: int, seen: torch.Tensor) -> ChunkLayout:
    L, device = chunk_size, seen.device
    num_chunks = (tokens + L - 1) // L
    offsets = torch.arange(num_chunks, device=device, dtype=torch.int64) * L
    positions = (seen[:, None].to(torch.int64) + offsets).clamp(min=0, max=window).to(torch.int32)
    starts = torch.full((batch, num_chunks), -1, dtype=torch.int32, device=device)
    ends = torch.full_like(starts, -1)
    rows = torch.arange(batch, dtype=torch.int32, device=device)
    if num_chunks:
        starts[:, 0] = rows
        ends[:, -1] = rows
    last = max(num_chunks - 1, 0)
    length = tokens - last * L
    return ChunkLayout(
        positions,
        starts,
        ends,
        rows,
        torch.zeros_like(rows),
        rows,
        torch.full_like(rows, last),
        torch.full_like(rows, length),
        None,
    )


def packed_layout(
    cu_seqlens: torch.Tensor, tokens: int, chunk_size: int, window: int, seen: torch.Tensor | None
) -> ChunkLayout:
    """Sequences s = 0..S-1 are tokens cu_seqlens[s]:cu_seqlens[s+1] of one row of ``tokens`` (see the module
    docstring); the offsets must run from 0 to ``tokens``, non-decreasing."""
    if seen is not None:
        check_seen(seen, tokens)  # at most ``tokens`` each
    L, device = chunk_size, cu_seqlens.device
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != tokens:
        raise ValueError(f"cu_seqlens must start at 0 and end at T = {tokens}, got {bounds[0]} ... {bounds[-1]}")
    if any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing (sorted offsets), got {bounds}")
    S, T = len(bounds) - 1, tokens
    num_chunks = packed_chunks(T, S, L)
    seen_host = [0] * (len(bounds) - 1) if seen is None else seen.tolist()
    positions = [window] * num_chunks
    starts = [0] * num_chunks  # spare chunks each start the throwaway sequence 0
    ends = [-1] * num_chunks  # and end none
    first, last, lengths = [0] * S, [0] * S, [0] * S
    token_index = []
    chunk = 0
    for s in range(S):
        n = bounds[s + 1] - bounds[s]
        count = (n + L - 1) // L
        for i in range(count):
            positions[chunk + i] = min(seen_host[s] + i * L, window)
            starts[chunk + i] = -1
        if count:
            starts[chunk] = s
            ends[chunk + count - 1] = s
            first[s], last[s], lengths[s] = chunk, chunk + count - 1, n - (count - 1) * L
        token_index.extend(range(chunk * L, chunk * L + n))
        chunk += count
    for c in range(chunk, num_chunks):
        starts[c] = 0

    def table(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

    zeros = table([0] * S)
    return ChunkLayout(
        table([positions]),
        table([starts]),
        table([ends]),
        zeros,
        table(first),
        zeros,
        table(last),
        table(lengths),
        table(token_index, torch.int64),
    )


def pack(x: torch.Tensor, layout: ChunkLayout, chunk_size: int) -> torch.Tensor:
    """[1, T, H, D] packed tokens -> [1, NC L, H, D] with each sequence starting at a chunk boundary, zeros
    elsewhere; x itself in the batch layout."""
    if layout.token_index is None:
        return x
    padded = x.new_zeros(1, layout.num_chunks * chunk_size, *x.shape[2:])
    padded[0, layout.token_index] = x[0]
    return padded


def unpack(x: torch.Tensor, layout: ChunkLayout) -> torch.Tensor:
    """The inverse of ``pack`` on the tokens: [1, NC L, H, D] -> [1, T, H, D]."""
    if layout.token_index is None:
        return x
    return x[:, layout.token_index]
