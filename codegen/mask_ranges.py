"""Kept key intervals of a structured mask, per grid axis: what a sparse kernel visits.

For every axis rule of passes/mask_classes.py (``_axis_keep``) the keys a query coordinate q
keeps form an arithmetic progression

    keys(q) = {lo(q), lo(q) + step, …, hi(q)}        (empty when lo(q) > hi(q))

with ``step`` the axis's dilation (1 for ``blocked``), ``lo``/``hi`` already clipped to the key
range [0, keys) and on the progression's residue class:

- ``window`` (half-width w, dilation d, 1-D ``offset``): c = q + offset, keys ≡ c (mod d) in
  [c − w, c + w], or [c − w, c] when causal.
- ``clamped`` (NATTEN kernel k, dilation d, GNA stride s): with r = q mod d, i = q // d,
  L_r = ⌈(size − r) / d⌉, leader = min((i // s)·s + (s − 1)//2, L_r − 1),
  start = min(max(leader − k//2, 0), L_r − k): keys r + d·j for max(start, 0) ≤ j ≤
  min(start + k, L_r) − 1.
- ``blocked`` (block B, halo h): [B·⌊q/B⌋ − h, B·⌊q/B⌋ + B − 1 + h].

The residue class of the progression depends on q only through q mod step (window: (q + offset)
mod d; clamped: q mod d), so queries of one residue class share one key progression: a tile of
them gathers keys with that stride. lo and hi are non-decreasing in q within a residue class.
A pair (q, key) is kept by the axis iff ``lo(q) <= key <= hi(q)`` and ``key ≡ lo(q) (mod step)``
(``axis_keep``), which tests/test_sparse_torch.py checks against ``_axis_keep`` by brute force.
A flat position pair is kept iff every axis keeps its coordinates (``spec_keep_torch``).
"""

from __future__ import annotations

import math

import torch

from rewrite.passes.mask_classes import Axis, axes_of
from rewrite.passes.masks import MaskSpec


def axis_interval(ax: Axis, q: torch.Tensor, size: int, keys: int, offset: int = 0
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(lo, hi, step) of the keys that query coordinates ``q`` (int64) keep on one axis.

    ``size``: the axis length (NATTEN's L_r is computed from it), ``keys``: the number of key
    coordinates (differs from size only in 1-D), ``offset``: the 1-D window shift."""
    if ax.kind == "window":
        d = ax.dilation
        c = q + offset
        lo = torch.clamp(c - ax.window, min=0)
        hi = torch.clamp(c if ax.causal else c + ax.window, max=keys - 1)
        lo = lo + (c - lo) % d  # first key ≥ lo on c's residue class
        hi = hi - (hi - c) % d  # last key ≤ hi on it
        return lo, hi, d
    if ax.kind == "blocked":
        first = (q // ax.block) * ax.block
        lo = torch.clamp(first - ax.halo, min=0)
        hi = torch.clamp(first + ax.block - 1 + ax.halo, max=keys - 1)
        return lo, hi, 1
    if ax.kind != "clamped":
        raise ValueError(f"unknown axis kind {ax.kind!r}")
    d, k = ax.dilation, ax.window
    r, i = q % d, q // d
    length = (size - r + d - 1) // d
    leader = torch.minimum((i // ax.stride) * ax.stride + (ax.stride - 1) // 2, length - 1)
    start = torch.minimum(torch.clamp(leader - k // 2, min=0), length - k)
    lo = torch.clamp(start, min=0) * d + r
    hi = (torch.minimum(start + k, length) - 1) * d + r
    top = torch.full_like(hi, keys - 1)
    hi = torch.where(hi > top, top - (top - r) % d, hi)  # M < size (1-D only): last key < M
    return lo, hi, d


def in_interval(lo: torch.Tensor, hi: torch.Tensor, step: int, key: torch.Tensor) -> torch.Tensor:
    """key ∈ {lo, lo + step, …, hi} (broadcast)."""
    kept = (key >= lo) & (key <= hi)
    return kept if step == 1 else kept & ((key - lo) % step == 0)


def axis_keep(ax: Axis, q: torch.Tensor, key: torch.Tensor, size: int, keys: int, offset: int = 0
              ) -> torch.Tensor:
    """The axis rule on coordinate tensors (broadcast), through its intervals."""
    lo, hi, step = axis_interval(ax, q, size, keys, offset)
    return in_interval(lo, hi, step, key)


def grid_of(spec: MaskSpec, n: int, m: int) -> tuple[int, ...]:
    """The spec's token grid for n queries and m keys (a 1-D grid of unknown length is n)."""
    grid = tuple(spec.grid or (None,))
    if len(grid) == 1:
        if grid[0] not in (None, n):
            raise ValueError(f"mask spec {spec.describe()} is for {grid[0]} queries, got {n}")
        return (n,)
    if math.prod(grid) != n or n != m:
        raise ValueError(f"mask spec {spec.describe()} is for a grid {grid} ({math.prod(grid)} tokens), "
                         f"got {n} queries and {m} keys")
    return grid


def coords(x: torch.Tensor, grid: tuple[int, ...]) -> list[torch.Tensor]:
    """Row-major grid coordinates of flat positions."""
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    return [(x // s) % g if a else x // s for a, (s, g) in enumerate(zip(strides, grid))]


def spec_keep_torch(spec: MaskSpec, p: torch.Tensor, k: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``spec``'s keep predicate on flat query/key positions (broadcast int64 tensors):
    the torch twin of ``mask_classes.spec_keep``, plus "causal" and "dense"."""
    if spec.kind == "dense":
        return torch.ones(torch.broadcast_shapes(p.shape, k.shape), dtype=torch.bool, device=p.device)
    if spec.kind == "causal":
        return k <= p + spec.offset
    if spec.kind not in ("neighborhood", "blocked"):
        raise ValueError(f"no closed-form predicate for a {spec.kind!r} mask spec")
    grid = grid_of(spec, n, m)
    axes = axes_of(spec)
    if len(grid) == 1:
        return axis_keep(axes[0], p, k, n, m, spec.offset)
    out = None
    for ax, g, qc, kc in zip(axes, grid, coords(p, grid), coords(k, grid)):
        cur = axis_keep(ax, qc, kc, g, g)
        out = cur if out is None else out & cur
    return out
