"""Host side of the neighborhood kernel (codegen/triton_neighborhood.py): a ``MaskSpec`` in kernel
terms (``kernel_axes``: per grid axis its kind, sizes, dilation, offset and parameters), the query /
key patch planner (``plan_tiles``: patch shapes minimising the visited tiles, counted exactly per axis
by ``axis_patches`` the way the kernel's ``axis_setup`` (neighborhood_geometry.py) computes them) and the launch table
(``choose_config``). The kernel's geometry is explained in triton_neighborhood.py's docstring.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from rewrite.ir.mask import MaskSpec, axes_of

__all__ = ["NeighborhoodConfig", "axis_patches", "choose_config", "kernel_axes", "plan_tiles"]

# axis kinds in the kernel (constexpr); 0 is a size-1 axis padding a 1-D / 2-D grid to three
TRIVIAL_AXIS, _WINDOW, _CAUSAL, _CLAMPED, _BLOCKED = 0, 1, 2, 3, 4


@dataclass(frozen=True)
class _Axis:
    """One kernel axis: query / key grid sizes, NATTEN's size, dilation, offset, parameters."""

    kind: int
    qg: int = 1
    kg: int = 1
    g: int = 1
    d: int = 1
    off: int = 0
    pa: int = 0
    pb: int = 1


def kernel_axes(spec: MaskSpec, n: int, m: int) -> list[_Axis]:
    """The spec's grid axes in kernel terms, left-padded to three; raises on sizes that don't fit."""
    if spec.kind in ("causal", "dense"):
        big = n + m + abs(spec.offset) + 1  # an unbounded window: lo(i) < 0 for every i
        kind = _CAUSAL if spec.kind == "causal" else _WINDOW
        return [_Axis(TRIVIAL_AXIS), _Axis(TRIVIAL_AXIS), _Axis(kind, n, m, n, 1, spec.offset, big)]
    if spec.kind not in ("neighborhood", "blocked") or not spec.grid:
        raise ValueError(f"neighborhood_attention takes causal, dense, neighborhood or blocked specs; "
                         f"got {spec.describe()}")
    grid = tuple(spec.grid)
    if len(grid) == 1:
        if grid[0] not in (None, n):
            raise ValueError(f"1-D spec over {grid[0]} positions, but N = {n}")
        sizes = [(n, m, n)]
        offset = spec.offset
    else:
        if len(grid) > 3 or any(g is None or g < 1 for g in grid):
            raise ValueError(f"grids of 1-3 known axes only; got {grid}")
        if n != math.prod(grid) or m != n:
            raise ValueError(f"grid {grid} flattens to {math.prod(grid)} tokens; need N = M = that, "
                             f"got N = {n}, M = {m}")
        sizes = [(g, g, g) for g in grid]
        offset = 0
    out = []
    for ax, (qg, kg, g) in zip(axes_of(spec), sizes):
        if ax.kind == "window":
            if ax.dilation < 1 or ax.window < 0:
                raise ValueError(f"window axis needs dilation >= 1 and window >= 0: {ax}")
            out.append(_Axis(_CAUSAL if ax.causal else _WINDOW, qg, kg, g, ax.dilation, offset,
                             ax.window // ax.dilation))
        elif ax.kind == "clamped":
            if ax.dilation < 1 or ax.window < 1 or ax.stride < 1:
                raise ValueError(f"clamped axis needs dilation, kernel size and stride >= 1: {ax}")
            if len(grid) == 1 and m != n:
                raise ValueError("a clamped (NATTEN) axis attends within one grid: need N = M")
            out.append(_Axis(_CLAMPED, qg, kg, g, ax.dilation, 0, ax.window, ax.stride))
        else:
            if ax.block < 1 or ax.halo < 0:
                raise ValueError(f"blocked axis needs block >= 1 and halo >= 0: {ax}")
            out.append(_Axis(_BLOCKED, qg, kg, g, 1, 0, ax.block, ax.halo))
    return [_Axis(TRIVIAL_AXIS)] * (3 - len(out)) + out


def _interval_np(i: np.ndarray, ax: _Axis, c: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """The kernel's ``kept_interval`` (neighborhood_geometry.py) in numpy (i ≥ 0 wherever a floor division happens)."""
    if ax.kind == _CLAMPED:
        leader = np.minimum((i // ax.pb) * ax.pb + (ax.pb - 1) // 2, length - 1)
        lo = np.minimum(np.maximum(leader - ax.pa // 2, 0), length - ax.pa)
        return lo, lo + ax.pa - 1
    if ax.kind == _BLOCKED:
        first = (i // ax.pa) * ax.pa
        return first - ax.pb, first + ax.pa - 1 + ax.pb
    if ax.kind == _CAUSAL:
        return i + c - ax.pa, i + c
    return i + c - ax.pa, i + c + ax.pa


def patches_per_class(ax: _Axis, p: int) -> int:
    """Query patches of p class indices per residue class (the longest class, r = 0)."""
    return (ax.qg + ax.d - 1) // ax.d // p + ((ax.qg + ax.d - 1) // ax.d % p != 0)


def axis_patches(ax: _Axis, p: int, kp: int):
    """Per residue class r, the kernel's view of one axis (``axis_setup``) for all its query
    patches of p class indices: yields (r, rk, c, lq, lk, lf, i0, klo, nk, flo, fhi), the last five
    arrays over the patches (key tiles of kp from klo; [flo, fhi) full along the axis)."""
    nt = patches_per_class(ax, p)
    i0 = np.arange(nt, dtype=np.int64) * p
    for r in range(ax.d):
        rk = (r + ax.off) % ax.d if ax.kind in (_WINDOW, _CAUSAL) else r
        c = (r + ax.off - rk) // ax.d
        lq = (ax.qg - r + ax.d - 1) // ax.d
        lk = (ax.kg - rk + ax.d - 1) // ax.d
        lf = (ax.g - r + ax.d - 1) // ax.d
        imax = np.minimum(i0 + p - 1, lq - 1)
        lo_first, hi_first = _interval_np(i0, ax, c, lf)
        lo_last, hi_last = _interval_np(np.maximum(imax, 0), ax, c, lf)
        klo = np.maximum(lo_first, 0)
        khi = np.minimum(hi_last, lk - 1)
        nk = np.where((khi >= klo) & (i0 < lq), (khi - klo + kp) // kp, 0)
        fhi = np.minimum(np.maximum(np.minimum(hi_first, lk - 1) + 1 - klo, 0) // kp, nk)
        flo = np.minimum((np.maximum(lo_last - klo, 0) + kp - 1) // kp, fhi)
        yield r, rk, c, lq, lk, lf, i0, klo, nk, flo, fhi


@lru_cache(maxsize=4096)
def axis_tiles(ax: _Axis, p: int, kp: int) -> tuple[int, int]:
    """(key tiles visited, of them full) summed over the axis's query patches. Tile counts of a
    2-D/3-D grid multiply across axes (the patches and their tile boxes are products)."""
    total = full = 0
    for *_, nk, flo, fhi in axis_patches(ax, p, kp):
        total += int(nk.sum())
        full += int((fhi - flo).sum())
    return total, full


@dataclass(frozen=True)
class NeighborhoodConfig:
    """Launch parameters. ``q_patch`` / ``k_patch``: per spec axis (outermost first), powers of two
    with product block_m / block_n; None lets :func:`plan_tiles` choose them."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    q_patch: tuple[int, ...] | None = None
    k_patch: tuple[int, ...] | None = None


def _splits(total_log2: int, ndim: int) -> list[tuple[int, ...]]:
    return [tuple(1 << e for e in es) for es in itertools.product(range(total_log2 + 1), repeat=ndim)
            if sum(es) == total_log2]


# Relative cost of a partial tile over a full one (predicate, bounds, masked loads), and of a
# program's prologue/epilogue (q load, output store) in tile units: estimates, not fits (the H100
# sweep varied tile sizes with the planner's patches; patch shapes were not swept on their own).
_PARTIAL_COST = 0.15
_PROGRAM_COST = 0.5


@lru_cache(maxsize=1024)
def plan_tiles(axes: tuple[_Axis, ...], block_m: int, block_n: int
               ) -> tuple[tuple[int, ...], tuple[int, ...], float, int, int]:
    """Query and key patch shapes (per real axis) for these tile sizes, minimising the modelled
    work: visited tiles × (1 + _PARTIAL_COST if partial) + programs × _PROGRAM_COST, in units of a
    block_m × block_n tile. Returns (q_patch, k_patch, cost, tiles visited, of them full)."""
    real = [ax for ax in axes if ax.kind != TRIVIAL_AXIS]
    nd = len(real)
    best = None
    lm, ln = int(math.log2(block_m)), int(math.log2(block_n))
    for qp in _splits(lm, nd):
        programs = math.prod(ax.d * patches_per_class(ax, p) for ax, p in zip(real, qp))
        for kpatch in _splits(ln, nd):
            counts = [axis_tiles(ax, p, kp) for ax, p, kp in zip(real, qp, kpatch)]
            total = math.prod(t for t, _ in counts)
            full = math.prod(f for _, f in counts)
            cost = total + _PARTIAL_COST * (total - full) + _PROGRAM_COST * programs
            # ties: wider contiguous (last-axis) key rows, then query rows
            key = (cost, -kpatch[-1], -qp[-1])
            if best is None or key < best[0]:
                best = (key, qp, kpatch, total, full)
    (cost, _, _), qp, kpatch, total, full = best
    return qp, kpatch, cost, total, full


# Throughput per score entry of a tile shape relative to 128 × 64 on the GPU, for choosing between
# them with the planner's tile counts (2-D/3-D). H100, 256 × 256 grid, 13 × 13 window: 64 × 64 tiles
# ran 0.83 (D = 64) and 0.99 (D = 128) of 128 × 64's entries per ms; 0.8 is the conservative side.
_TILE_EFFICIENCY = {(128, 64): 1.0, (64, 64): 0.8}


def choose_config(d: int, dv: int, dtype: torch.dtype, device: torch.device, axes: tuple[_Axis, ...] | None = None,
                  has_bias_or_mask: bool = False) -> NeighborhoodConfig:
    """Tile sizes and warps from a small table; patch shapes are left to :func:`plan_tiles`.

    Measured on an H100, bf16, B=2, H=16 (benchmarks/bench_sparse.py --sweep; the sweep is listed in
    benchmarks/results/sparse_neighborhood_NVIDIA_H100_80GB_HBM3_2026-11-28.md), times in ms:

    - 1-D band (|i − j| ≤ 512, N = 16384): D = 64: 64×64 w4 s3 0.380, 128×64 w4 s3 0.418 (s4 0.429),
      128×128 w4 0.478 (w8 0.525); D = 128: 128×64 w8 s3 0.725, 64×64 w4 0.727, 128×128 w8 0.765,
      128×64 w4 1.016.
    - causal / windows as long as the sequence: dense attention's tiles (triton_attention's table:
      128×64 w4 for D ≤ 64, 128×128 w8 for D ≤ 128), 1.04-1.30x cuDNN's causal time.
    - 2-D 256×256, 13×13 window (plain and dilated alike): D = 64: 64×64 w4 s3 1.107 (s2 1.124),
      64×32 1.247, 128×64 1.310, 128×32 1.520; D = 128: 64×64 w4 s3 1.729 (s2 1.841), 64×32 1.805,
      128×64 w8 2.441, 128×32 2.837. 2-D/3-D take 128×64 or 64×64, whichever the planner's
      tile count × _TILE_EFFICIENCY says is cheaper (small windows: 64, fewer wasted keys a patch).
    """
    if device.type != "cuda":
        # Interpreter: the smallest tiles tl.dot takes, so small test grids span several patches.
        return NeighborhoodConfig(16, 16, 4, 1)
    dmax = max(d, dv)
    wide = dtype == torch.float32
    if wide or dmax > 128:
        return NeighborhoodConfig(64, 32, 4, 2) if dmax <= 128 or not wide else NeighborhoodConfig(32, 32, 4, 1)
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        return NeighborhoodConfig(128, 64, 4, 2) if dmax <= 64 else NeighborhoodConfig(64, 64, 4, 2)
    real = [ax for ax in axes or () if ax.kind != TRIVIAL_AXIS]
    if len(real) <= 1:
        ax = real[0] if real else None
        band = ax is not None and ax.kind in (_WINDOW, _CAUSAL) and ax.pa < ax.kg  # narrower than the keys
        if band and not has_bias_or_mask:
            return NeighborhoodConfig(64, 64, 4, 3) if dmax <= 64 else NeighborhoodConfig(128, 64, 8, 3)
        if dmax <= 64:
            return NeighborhoodConfig(128, 64, 4, 3)
        return NeighborhoodConfig(128, 64 if has_bias_or_mask else 128, 8, 3)
    cands = [NeighborhoodConfig(128, 64, 4 if dmax <= 64 else 8, 3), NeighborhoodConfig(64, 64, 4, 3)]
    return min(cands, key=lambda c: plan_tiles(tuple(axes), c.block_m, c.block_n)[2] * c.block_m * c.block_n
               / _TILE_EFFICIENCY[(c.block_m, c.block_n)])
