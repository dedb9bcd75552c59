"""An independent, direct statement of what each mask family keeps, for tests.

The product's one keep predicate (rewrite/ir/mask.py ``spec_keep``) is written through per-axis
key intervals, the form kernels and tile planners need. This file states the same rules directly
(a window is |t| ≤ w with t ≡ 0 mod d, NATTEN's clamp through its leader and start, a HaloNet
block through ⌊q/B⌋), so the two are checked against each other by brute force
(tests/test_sparse_torch.py) and kernels are compared with a reference that shares no code with
them."""

from __future__ import annotations

import math

import numpy as np
import torch

from rewrite.ir.mask import Axis, MaskSpec, axes_of


def naive_axis_keep(ax: Axis, q: np.ndarray, k: np.ndarray, size: int, offset: int = 0) -> np.ndarray:
    """One axis's rule on integer coordinate arrays (broadcast)."""
    if ax.kind == "window":
        t = q + offset - k
        inside = (t >= 0) & (t <= ax.window) if ax.causal else np.abs(t) <= ax.window
        return inside & (t % ax.dilation == 0)
    if ax.kind == "blocked":
        lo = (q // ax.block) * ax.block
        return (k >= lo - ax.halo) & (k <= lo + ax.block - 1 + ax.halo)
    d, kk = ax.dilation, ax.window
    r, i = q % d, q // d
    length = (size - r + d - 1) // d
    leader = np.minimum((i // ax.stride) * ax.stride + (ax.stride - 1) // 2, length - 1)
    start = np.minimum(np.maximum(leader - kk // 2, 0), length - kk)
    return (k % d == r) & (k // d >= start) & (k // d < start + kk)


def naive_spec_keep(spec: MaskSpec, p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """A neighborhood/blocked/causal spec's keep predicate on position arrays (broadcast)."""
    if spec.kind == "causal":
        return m <= p + spec.offset
    grid, axes = spec.grid, axes_of(spec)
    if len(grid) == 1:
        return naive_axis_keep(axes[0], p, m, grid[0] if grid[0] is not None else int(np.max(p)) + 1, spec.offset)
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    out = None
    for a, (ax, g) in enumerate(zip(axes, grid)):
        qc, kc = (p // strides[a]) % g, (m // strides[a]) % g
        cur = naive_axis_keep(ax, qc, kc, g)
        out = cur if out is None else out & cur
    return out


def naive_keep_matrix(spec: MaskSpec | None, n: int, m: int) -> torch.Tensor:
    """[n, m] bool: every kept (query, key) pair of ``spec`` (None or dense: all)."""
    if spec is None or spec.kind == "dense":
        return torch.ones(n, m, dtype=torch.bool)
    p, k = np.arange(n)[:, None], np.arange(m)[None, :]
    if spec.grid and len(spec.grid) == 1 and spec.grid[0] is None:
        spec = MaskSpec(**{**spec.__dict__, "grid": (n,)})
    return torch.from_numpy(np.ascontiguousarray(np.broadcast_to(naive_spec_keep(spec, p, k), (n, m))))
