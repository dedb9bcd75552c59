"""Triton device functions for the geometry of the neighborhood kernel (codegen/triton_neighborhood.py).

They turn a program's query patch into key tiles along each grid axis: the kept key interval of a
query class index (``kept_interval``), the per-axis patch setup with its full / partial tile ranges
(``axis_setup``), the row coordinates of the patch (``row_coords``), the first key of a tile
(``tile_start``) and the enumeration of the partial-tile shell of a 2-D tile box
(``shell_tile_2d``). The geometry itself (residue classes, monotone intervals, full-tile box) is
explained in triton_neighborhood.py's docstring; neighborhood_tiles.py mirrors ``kept_interval`` /
``axis_setup`` in numpy for the planner, so the two must change together.

Axis kinds (constexpr ``KIND``, codes of neighborhood_tiles.py): 0 a size-1 axis padding a 1-D /
2-D grid to three, 1 window, 2 causal window, 3 NATTEN clamped, 4 HaloNet blocked.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["axis_setup", "kept_interval", "row_coords", "shell_tile_2d", "tile_start"]


@triton.jit
def kept_interval(i, KIND: tl.constexpr, pa, pb, c, length):
    # Kept key class indices [lo, hi] of query class index i (scalar or vector), not clipped to
    # [0, L_k). pa / pb: W / − (window), k / s (clamped), B / h (blocked); length: NATTEN's L_r.
    if KIND == 3:
        leader = tl.minimum((i // pb) * pb + (pb - 1) // 2, length - 1)
        lo = tl.minimum(tl.maximum(leader - pa // 2, 0), length - pa)
        hi = lo + pa - 1
    elif KIND == 4:
        first = (i // pa) * pa
        lo = first - pb
        hi = first + pa - 1 + pb
    elif KIND == 2:
        lo = i + c - pa
        hi = i + c
    else:  # window (and the trivial axis: pa = 0, c = 0)
        lo = i + c - pa
        hi = i + c + pa
    return lo, hi


@triton.jit
def axis_setup(idx, NT, QG, KG, G, d, off, pa, pb,
                KIND: tl.constexpr, P: tl.constexpr, KP: tl.constexpr):
    # One axis of the program's query patch: class r (keys of class rk), first class index i0,
    # class lengths, and the key tiles: nk tiles of KP from klo, of which [flo, fhi) are full along
    # this axis. A trivial (size-1) axis: one query, one key, one full tile.
    if KIND == 0:
        r, rk, c, i0, lq, lk, lf, klo, nk, flo, fhi = 0, 0, 0, 0, 1, 1, 1, 0, 1, 0, 1
    else:
        r = idx // NT
        i0 = (idx % NT) * P
        if KIND == 1 or KIND == 2:
            rk = ((r + off) % d + d) % d
        else:
            rk = r
        c = (r + off - rk) // d  # exact
        lq = (QG - r + d - 1) // d
        lk = (KG - rk + d - 1) // d
        lf = (G - r + d - 1) // d
        imax = tl.minimum(i0 + P - 1, lq - 1)
        lo_first, hi_first = kept_interval(i0, KIND, pa, pb, c, lf)
        lo_last, hi_last = kept_interval(imax, KIND, pa, pb, c, lf)
        klo = tl.maximum(lo_first, 0)
        khi = tl.minimum(hi_last, lk - 1)
        nk = tl.where((khi >= klo) & (i0 < lq), (khi - klo + KP) // KP, 0)
        fhi = tl.minimum(tl.maximum(tl.minimum(hi_first, lk - 1) + 1 - klo, 0) // KP, nk)
        flo = tl.minimum((tl.maximum(lo_last - klo, 0) + KP - 1) // KP, fhi)
    return r, rk, c, i0, lq, lk, lf, klo, nk, flo, fhi


@triton.jit
def shell_tile_2d(v, n1, n2, a1, b1, a2, b2):
    # v-th tile (row-major) of the n1 × n2 box minus [a1, b1) × [a2, b2).
    mw = n2 - (b2 - a2)
    top = a1 * n2
    mid = (b1 - a1) * mw
    mwc = tl.maximum(mw, 1)
    w = v - top
    cm = w % mwc
    wb = v - top - mid
    t1 = tl.where(v < top, v // n2, tl.where(v < top + mid, a1 + w // mwc, b1 + wb // n2))
    t2 = tl.where(v < top, v % n2, tl.where(v < top + mid, tl.where(cm < a2, cm, cm + (b2 - a2)), wb % n2))
    return t1, t2


@triton.jit
def row_coords(rows, i0, r, d, lq, KIND: tl.constexpr, P: tl.constexpr, INNER: tl.constexpr):
    # Class index and grid coordinate of the patch rows along one axis (INNER: product of the
    # patch sizes of the axes inside this one).
    if KIND == 0:
        qi = rows * 0
        coord = qi
        ok = qi == 0
    else:
        if INNER == 1:
            qi = i0 + rows % P
        else:
            qi = i0 + (rows // INNER) % P
        coord = r + d * qi
        ok = qi < lq
    return qi, coord, ok


@triton.jit
def tile_start(t0, t1, t2, klo0, klo1, klo2, rk0, rk1, rk2, D0, D1, D2, KG1, KG2,
                NDIM: tl.constexpr, KP0: tl.constexpr, KP1: tl.constexpr, KP2: tl.constexpr):
    # First key class index of tile (t0, t1, t2) along each axis, and the flat index of its
    # first key (the tile's keys are that plus col_base).
    jb2 = klo2 + t2 * KP2
    base = rk2 + D2 * jb2
    jb1 = 0
    jb0 = 0
    if NDIM >= 2:
        jb1 = klo1 + t1 * KP1
        base += (rk1 + D1 * jb1) * KG2
    if NDIM == 3:
        jb0 = klo0 + t0 * KP0
        base += (rk0 + D0 * jb0) * (KG1 * KG2)
    return jb0, jb1, jb2, base
