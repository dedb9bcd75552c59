"""Block maps: for each query tile, which key tiles a sparse kernel visits.

A ``BlockMap`` is FlexAttention's BlockMask in our terms. Query tile ``i`` covers rows
``[i·block_m, (i+1)·block_m)``, key tile ``j`` covers keys ``[j·block_n, (j+1)·block_n)``.
A key tile is *empty* (every pair masked: never visited), *full* (every pair kept: visited
without evaluating the mask) or *partial* (visited, mask evaluated element by element).

Compressed form, per (batch, head, query tile), ascending tile indices:

    full_count    int32 [Bm, Hm, Tq]        number of full key tiles
    full_index    int32 [Bm, Hm, Tq, Tk]    their indices (first full_count entries valid)
    partial_count int32 [Bm, Hm, Tq]
    partial_index int32 [Bm, Hm, Tq, Tk]

Bm / Hm are 1 when the mask broadcasts over batch / heads. ``mask`` (bool, broadcastable to
[B, H, N, M], True = keep) is the element mask a kernel evaluates in partial tiles; None when
the partial tiles' predicate is known to the kernel in closed form (a MaskSpec).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class BlockMap:
    block_m: int
    block_n: int
    n: int
    m: int
    full_count: torch.Tensor
    full_index: torch.Tensor
    partial_count: torch.Tensor
    partial_index: torch.Tensor
    mask: torch.Tensor | None = None

    @property
    def tiles_q(self) -> int:
        return self.full_count.shape[-1]

    @property
    def tiles_k(self) -> int:
        return self.full_index.shape[-1]

    def visited_fraction(self) -> float:
        """Visited key tiles over all tiles: the kernel's work relative to dense."""
        total = self.full_count.numel() * self.tiles_k
        return float((self.full_count.sum() + self.partial_count.sum()).item()) / max(1, total)
