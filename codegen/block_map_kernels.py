"""Triton kernels that build block maps (codegen/block_map.py, where the launchers and the torch
fallbacks live).

* ``classify_mask_kernel`` reads an element mask once, in words of 1, 4 or 8 bytes, and writes
  each (query tile, key tile) class: 0 empty, 1 partial, 2 full.
* ``compress_kernel`` turns one row of classes into the map's compressed form (counts and
  ascending index lists, the unused tail zeroed).
* ``block_keep_kernel`` classifies and compresses in one pass from a mask given per block, reading
  only the small block grid.

Kept apart from the builders so that block_map.py reads as the map's format and its host side.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["block_keep_kernel", "classify_mask_kernel", "compress_kernel"]


@triton.jit
def _append(idx_ptr, count, tiles, flag):
    # Compressed append: flagged tiles go to idx_ptr[count + rank], in ascending order.
    f = flag.to(tl.int32)
    pos = count + tl.cumsum(f, 0) - f
    tl.store(idx_ptr + pos, tiles, mask=flag)
    return count + tl.sum(f, 0)


@triton.jit
def _zero_tail(idx_ptr, count, TK, CK: tl.constexpr):
    for j0 in range(0, TK, CK):
        t = j0 + tl.arange(0, CK)
        tl.store(idx_ptr + t, tl.zeros([CK], dtype=tl.int32), mask=(t >= count) & (t < TK))


@triton.jit
def classify_mask_kernel(
    Mask, Cls, HM, TQ, TK, N, MW,
    s_b, s_h, s_n, s_m,
    ALL: tl.constexpr, BLOCK_M: tl.constexpr, TILE_W: tl.constexpr, KT: tl.constexpr,
    CHECK_N: tl.constexpr, CHECK_M: tl.constexpr,
):
    # One program: query tile i of (b, h) x KT key tiles. The mask is read in words of W bytes
    # (W = 1, 4 or 8: a bool byte is 0 or 1, so a word is all-kept iff it equals ALL = 0x01..01,
    # and any-kept iff it is nonzero). Writes the tile classes 0 empty / 1 partial / 2 full.
    row = tl.program_id(0)
    jc = tl.program_id(1)
    i = row % TQ
    bh = row // TQ
    b = (bh // HM).to(tl.int64)
    h = (bh % HM).to(tl.int64)
    rows = i * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = jc * (KT * TILE_W) + tl.arange(0, KT * TILE_W)
    ptrs = Mask + b * s_b + h * s_h + rows.to(tl.int64)[:, None] * s_n + cols[None, :] * s_m
    if CHECK_N or CHECK_M:
        inb = (rows[:, None] < N) & (cols[None, :] < MW)
        w = tl.load(ptrs, mask=inb, other=0)
        w_all = tl.where(inb, w, ALL)
    else:
        w = tl.load(ptrs)
        w_all = w
    a = tl.max(tl.reshape(tl.max(w, 0), [KT, TILE_W]), 1)
    z = tl.min(tl.reshape(tl.min(w_all, 0), [KT, TILE_W]), 1)
    cls = tl.where(z == ALL, 2, tl.where(a != 0, 1, 0)).to(tl.int8)
    t = jc * KT + tl.arange(0, KT)
    tl.store(Cls + row.to(tl.int64) * TK + t, cls, mask=t < TK)


@triton.jit
def compress_kernel(Cls, FullCnt, FullIdx, PartCnt, PartIdx, TK, CK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    nf = 0
    npart = 0
    for j0 in range(0, TK, CK):
        t = j0 + tl.arange(0, CK)
        c = tl.load(Cls + row * TK + t, mask=t < TK, other=0)
        nf = _append(FullIdx + row * TK, nf, t, c == 2)
        npart = _append(PartIdx + row * TK, npart, t, c == 1)
    _zero_tail(FullIdx + row * TK, nf, TK, CK)
    _zero_tail(PartIdx + row * TK, npart, TK, CK)
    tl.store(FullCnt + row, nf)
    tl.store(PartCnt + row, npart)


@triton.jit
def block_keep_kernel(
    Keep, FullCnt, FullIdx, PartCnt, PartIdx,
    HM, TQ, TK, N, M, BQ, BK,
    s_b, s_h, s_n, s_m,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, LQ: tl.constexpr, LK: tl.constexpr, CK: tl.constexpr,
):
    # One program: query tile i of (b, h). Its rows span keep rows qb0..qb1 (at most LQ); key
    # tile j spans keep columns kb0..kb1 (at most LK). Full iff every spanned entry is kept,
    # partial iff some is. Classification and compression in one pass.
    row = tl.program_id(0)
    i = row % TQ
    bh = row // TQ
    b = (bh // HM).to(tl.int64)
    h = (bh % HM).to(tl.int64)
    base = Keep + b * s_b + h * s_h
    q_lo = i * BLOCK_M
    q_hi = tl.minimum(q_lo + BLOCK_M, N) - 1
    qb = q_lo // BQ + tl.arange(0, LQ)
    qvalid = qb <= q_hi // BQ
    out = row.to(tl.int64) * TK
    nf = 0
    npart = 0
    for j0 in range(0, TK, CK):
        t = j0 + tl.arange(0, CK)
        tvalid = t < TK
        k_lo = t * BLOCK_N
        kb0 = k_lo // BK
        kb1 = (tl.minimum(k_lo + BLOCK_N, M) - 1) // BK
        any_ = tl.zeros([CK], dtype=tl.int32)
        all_ = tl.full([CK], 1, dtype=tl.int32)
        for dk in tl.static_range(LK):
            kb = kb0 + dk
            kvalid = (kb <= kb1) & tvalid
            x = tl.load(base + qb.to(tl.int64)[:, None] * s_n + kb[None, :] * s_m,
                        mask=qvalid[:, None] & kvalid[None, :], other=0).to(tl.int32)
            any_ = tl.maximum(any_, tl.max(x, 0))
            x_all = tl.where(qvalid[:, None] & kvalid[None, :], x, 1)
            all_ = tl.minimum(all_, tl.min(x_all, 0))
        full = (all_ != 0) & tvalid
        part = (any_ != 0) & (all_ == 0) & tvalid
        nf = _append(FullIdx + out, nf, t, full)
        npart = _append(PartIdx + out, npart, t, part)
    _zero_tail(FullIdx + out, nf, TK, CK)
    _zero_tail(PartIdx + out, npart, TK, CK)
    tl.store(FullCnt + row, nf)
    tl.store(PartCnt + row, npart)
