"""Tile plans of the CPU sparse path (codegen/sparse_torch.py runs them): which query tiles meet
which gathered key sets, and the keep pattern of each pair.

- "neighborhood" / "blocked" specs (``band_plan``): queries are cut into tiles and each tile gathers
  one key set, the union of its queries' kept key intervals, padded to a fixed width W. Each grid
  axis is tiled on its own, by residue class under a dilation (the gathered keys are then a strided
  progression), and tiles of a 2-D/3-D grid are patches (products of axis tiles). The exact
  predicate is evaluated per axis on the gathered coordinates, ANDed, and stored as keep patterns
  per distinct tile pattern (a sliding window has a handful: interior + edges). Tile sizes minimise
  padded work plus a per-tile cost. Cached per (spec, N, M).
- a ``BlockMap`` slice (``map_plan``): exactly its full and partial tiles.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from rewrite.ir.mask import MaskSpec, axes_of, axis_interval, grid_of, in_interval, spec_keep

from .block_map import BlockMap

__all__ = ["PairGroup", "TilePlan", "band_plan", "keep_pattern", "map_plan"]

TILE_OVERHEAD = 8192  # per-tile cost, in score entries, when choosing neighborhood tile sizes


@dataclass(frozen=True)
class PairGroup:
    tile: torch.Tensor  # [P] query tile of each pair, non-decreasing
    kidx: torch.Tensor  # [P, W] flat key positions (padding: position 0)
    sel: torch.Tensor | None  # [U, bq | 1, W] int32 keep patterns (structure, key padding): −1 (all
    #                          bits) where kept, 0 where not, applied by _select_; None = all kept
    masks: bool  # evaluate the run-time masks (mask, block_map.mask) in these pairs
    one_per_tile: bool  # tile == arange(Tq)
    pattern: torch.Tensor | None = None  # [P] each pair's row of neg; None = row p for pair p


@dataclass(frozen=True)
class TilePlan:
    qidx: torch.Tensor  # [Tq, bq] flat query positions (padding: a repeated valid position)
    qpos: torch.Tensor | None  # [N] row of each query in the tiled order; None = rows 0..N-1
    groups: tuple[PairGroup, ...]

    def to(self, device) -> TilePlan:
        def mv(t):
            return None if t is None else t.to(device)
        groups = tuple(PairGroup(mv(g.tile), mv(g.kidx), mv(g.sel), g.masks, g.one_per_tile, mv(g.pattern))
                       for g in self.groups)
        return TilePlan(self.qidx.to(device), mv(self.qpos), groups)


# ---------------------------------------------------------------- plans

def _axis_tiling(ax, size: int, keys: int, offset: int, bq: int):
    """One axis tiled by ``bq`` query coordinates of one residue class: (query coords [T, bq],
    query valid [T, bq], per-tile union (lo, count), step, per-query (lo, hi))."""
    q = torch.arange(size)
    lo, hi, step = axis_interval(ax, q, size, keys, offset)
    rows, valid = [], []
    for c in range(min(step, size)):
        members = torch.arange(c, size, step)
        t = -(-len(members) // bq)
        pad = t * bq - len(members)
        rows.append(torch.cat([members, members[-1:].expand(pad)]).view(t, bq))
        valid.append((torch.arange(t * bq) < len(members)).view(t, bq))
    qc, qv = torch.cat(rows), torch.cat(valid)
    live = qv & (lo[qc] <= hi[qc])
    big = keys + step
    t_lo = torch.where(live, lo[qc], big).amin(1)
    t_hi = torch.where(live, hi[qc], -1).amax(1)
    count = torch.where(t_hi >= t_lo, (t_hi - t_lo) // step + 1, 0)
    return qc, qv, torch.where(count > 0, t_lo, 0), count, step, lo, hi


def _axis_candidates(ax, members: int) -> list[int]:
    out = {1 << i for i in range(max(1, math.ceil(math.log2(max(members, 1)))) + 1)}
    if ax.kind == "blocked":
        out |= {ax.block * i for i in range(1, 9) if ax.block * i <= max(256, ax.block)}
    return sorted(b for b in out if b <= max(members, 1) * 2)


@lru_cache(maxsize=32)
def band_plan(spec: MaskSpec, n: int, m: int) -> TilePlan:
    """Tiles for a neighborhood/blocked spec: one gathered key set per query tile."""
    grid = grid_of(spec, n, m)
    axes = axes_of(spec)
    nd = len(grid)
    keys = [m] if nd == 1 else list(grid)
    offset = spec.offset if nd == 1 else 0
    options = []
    for ax, g, kk in zip(axes, grid, keys):
        step = axis_interval(ax, torch.zeros(1, dtype=torch.long), g, kk, offset)[2]
        opts = []
        for bq in _axis_candidates(ax, -(-g // step)):
            _, _, _, count, _, _, _ = _axis_tiling(ax, g, kk, offset, bq)
            opts.append((bq, len(count), max(int(count.max()), 1)))
        options.append(opts)
    best, best_cost = None, None
    for combo in _product(options):
        b, t, w = (math.prod(x[i] for x in combo) for i in range(3))
        cost = t * (b * w + TILE_OVERHEAD)
        if b <= 1024 and (best_cost is None or cost < best_cost):
            best, best_cost = combo, cost
    strides = [math.prod(grid[a + 1:]) for a in range(nd)]
    qflat = kflat = qvalid = keep = pat = None
    for a, (ax, g, kk, (bq, _, w)) in enumerate(zip(axes, grid, keys, best)):
        qc, qv, t_lo, count, step, lo, hi = _axis_tiling(ax, g, kk, offset, bq)
        j = torch.arange(w)
        kv = j < count[:, None]
        kc = torch.where(kv, t_lo[:, None] + step * j, 0)
        # Tiles whose queries keep the same keys relative to the tile's first key share one mask
        # pattern (all interior tiles of a sliding window do): masks are stored per pattern.
        live = qv & (lo[qc] <= hi[qc])
        sig = torch.cat([torch.where(live, lo[qc] - t_lo[:, None], -1), torch.where(live, hi[qc] - t_lo[:, None], -1),
                         count[:, None]], 1)
        _, inv = torch.unique(sig, dim=0, return_inverse=True)
        rep = torch.full((int(inv.max()) + 1,), len(inv), dtype=torch.long).scatter_reduce_(
            0, inv, torch.arange(len(inv)), "amin")  # a tile of each pattern
        q_rep = qc[rep][:, :, None]
        kp = in_interval(lo[q_rep], hi[q_rep], step, kc[rep][:, None, :]) & kv[rep][:, None, :]
        shape = [1] * (3 * nd)
        shape[a], shape[nd + a], shape[2 * nd + a] = len(rep), bq, w
        t_sh, q_sh, k_sh = [1] * nd, [1] * (2 * nd), [1] * (2 * nd)
        t_sh[a], q_sh[a], q_sh[nd + a], k_sh[a], k_sh[nd + a] = len(count), len(count), bq, len(count), w
        qa, ka = (qc * strides[a]).view(q_sh), (kc * strides[a]).view(k_sh)
        qflat = qa if qflat is None else qflat + qa
        kflat = ka if kflat is None else kflat + ka
        qvalid = qv.view(q_sh) if qvalid is None else qvalid & qv.view(q_sh)
        keep = kp.view(shape) if keep is None else keep & kp.view(shape)
        pat = inv.view(t_sh) if pat is None else pat * len(rep) + inv.view(t_sh)
    tiles = math.prod(x[1] for x in best)
    bq_all, w_all = math.prod(x[0] for x in best), math.prod(x[2] for x in best)
    qidx = qflat.reshape(tiles, bq_all)
    qpos = _query_rows(qidx, qvalid.reshape(tiles, bq_all), n)
    keep = keep.reshape(-1, bq_all, w_all)
    group = PairGroup(torch.arange(tiles), kflat.reshape(tiles, w_all), keep_pattern(keep), True, True,
                      pat.reshape(tiles))
    return TilePlan(qidx, qpos, (group,))


def keep_pattern(keep: torch.Tensor) -> torch.Tensor | None:
    """A keep mask as the bit pattern the kernel selects with (sparse_torch.py): −1 (all bits set)
    kept, 0 removed; None when every pair is kept."""
    return None if bool(keep.all()) else keep.to(torch.int32).neg_()


def _product(options):
    if not options:
        yield ()
        return
    for head in options[0]:
        for rest in _product(options[1:]):
            yield (head, *rest)


def _query_rows(qidx: torch.Tensor, qvalid: torch.Tensor, n: int) -> torch.Tensor | None:
    flat, ok = qidx.flatten(), qvalid.flatten()
    qpos = torch.empty(n, dtype=torch.long)
    qpos[flat[ok]] = torch.nonzero(ok).flatten()
    return None if torch.equal(qpos, torch.arange(n)) else qpos


def _row_tiles(n: int, bq: int) -> torch.Tensor:
    t = -(-n // bq)
    return torch.clamp(torch.arange(t * bq), max=n - 1).view(t, bq)


def _key_tiles(j: torch.Tensor, bk: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    kidx = j[:, None] * bk + torch.arange(bk)
    valid = kidx < m
    return torch.where(valid, kidx, 0), valid


def map_plan(bmap: BlockMap, b: int, h: int, spec: MaskSpec | None) -> TilePlan:
    """The tiles of one (batch, head) slice of a block map."""
    qidx = _row_tiles(bmap.n, bmap.block_m)
    groups = []
    for count, index, partial in ((bmap.full_count, bmap.full_index, False),
                                  (bmap.partial_count, bmap.partial_index, True)):
        count, index = count[b, h].cpu().long(), index[b, h].cpu().long()
        ti, slot = torch.nonzero(torch.arange(index.shape[-1]) < count[:, None], as_tuple=True)
        if not len(ti):
            continue
        kidx, kvalid = _key_tiles(index[ti, slot], bmap.block_n, bmap.m)
        keep = kvalid[:, None, :]
        if partial and spec is not None and spec.kind != "dense":
            keep = keep & spec_keep(spec, qidx[ti][:, :, None], kidx[:, None, :], bmap.n, bmap.m)
        groups.append(PairGroup(ti, kidx, keep_pattern(keep), partial, False))
    return TilePlan(qidx, None, tuple(groups))
