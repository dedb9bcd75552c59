"""Sparse softmax attention in PyTorch: the CPU default of ``rewrite::sparse_attention``.

Only kept tiles are computed:

- "neighborhood" / "blocked" specs: each query tile gathers one key set (the union of its queries'
  kept key intervals, padded to a fixed width W; codegen/tile_plans.py plans them); all tiles of a
  chunk then run as batched matmuls [tiles, bq, D] × [tiles, D, W].
- "causal" and dense (spec None or "dense"): blocks of query rows against the contiguous key
  prefix they can keep (nothing gathered); only columns past a block's first diagonal entry
  evaluate the causal mask.
- a ``BlockMap`` (codegen/block_map.py): exactly its full and partial tiles, every pair of a
  query tile merged by the split-softmax (max, sum) rule. Partial tiles evaluate spec ∧ ``mask``
  ∧ ``block_map.mask``; full tiles are trusted (the map's contract) to keep every pair and
  evaluate nothing but the bias. Per-batch/per-head maps run slice by slice.

``mask`` (bool) and ``bias`` (float) apply everywhere else. Every mask is applied by selection (a
removed pair's score becomes −inf whatever q·k was, as eager's masked_fill makes it: a NaN or ±inf
key that the mask removes stays out of the row); only ``bias`` is added. GQA: the query heads of one
kv head are folded into a tile's rows (K/V are never repeated). Half types compute in float32,
float32/float64 in their own precision; the result is in q's dtype. A row with no kept key is
NaN (eager softmax over all −inf) and its LSE −inf. Neighborhood plans are cached per (spec, N, M).
"""

from __future__ import annotations

import torch

from rewrite.ir.mask import MaskSpec

from .block_map import BlockMap
from .tile_plans import PairGroup, TilePlan, band_plan, map_plan

CHUNK_ELEMS = 1 << 22  # score entries (all batch·heads together) computed at once: cache-sized chunks
ROW_ELEMS = 1 << 23  # causal/dense: score entries (all batch·heads) of one block of query rows


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}
_NEG_INF_BITS = {dt: int(torch.tensor(float("-inf"), dtype=dt).view(it)) for dt, it in _BITS.items()}


def _select_(s: torch.Tensor, sel: torch.Tensor) -> None:
    """s = where(sel, s, −inf) in place, ``sel`` a ``keep_pattern`` broadcast against s. A selection,
    not an addition: the score of a removed pair becomes −inf whatever it was (NaN or ±inf from such
    a key included), as masked_fill makes it in eager, where adding −inf would give NaN. Done on the
    bits (keep & s | ~keep & −inf): masked_fill_ of a broadcast mask is several times slower on the
    CPU, as slow as the tile's matmul. Under autograd (the backward's recomputation) masked_fill_."""
    if s.requires_grad or s.dtype not in _BITS:
        s.masked_fill_(sel == 0, float("-inf"))
        return
    keep = sel.to(_BITS[s.dtype])
    s.view(_BITS[s.dtype]).bitwise_and_(keep).bitwise_or_(keep.bitwise_not().bitwise_and_(_NEG_INF_BITS[s.dtype]))



# ---------------------------------------------------------------- the kernel

def _gather(t: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, hkv: int, g: int) -> torch.Tensor:
    """t (broadcastable to [B, Hq, N, M]) at rows [P, bq] × cols [P, W], arranged to
    broadcast against scores viewed as [B, Hkv, P, G, bq, W]."""
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    b1, h1, n1, m1 = t.shape
    p, bq = rows.shape
    if n1 > 1 and m1 > 1:
        x = t[:, :, rows[:, :, None], cols[:, None, :]]
    elif m1 > 1:
        x = t[:, :, 0][:, :, cols].unsqueeze(3)
    elif n1 > 1:
        x = t[:, :, rows, 0].unsqueeze(-1)
    else:
        x = t.reshape(b1, h1, 1, 1, 1)
    if h1 == 1:
        return x.unsqueeze(3)
    return x.reshape(b1, hkv, g, *x.shape[2:]).transpose(2, 3)


def _attend(qs, k, v, bias, masks, plan: TilePlan, want_lse: bool):
    """Run a plan. qs: scaled queries [B, Hq, N, D] in the compute dtype; k, v [B, Hkv, M, *]."""
    bsz, hq, n, d = qs.shape
    hkv, dv = k.shape[1], v.shape[-1]
    g = hq // hkv
    tq, bq = plan.qidx.shape
    r = g * bq
    qg = qs.view(bsz, hkv, g, n, d)
    if plan.qpos is None and tq * bq == n:
        qt = qg.view(bsz, hkv, g, tq, bq, d)
    else:
        qt = qg.index_select(3, plan.qidx.flatten()).view(bsz, hkv, g, tq, bq, d)
    qt = qt.transpose(2, 3).reshape(bsz, hkv, tq, r, d)
    out = qs.new_empty(bsz, hkv, tq, r, dv)
    lse = qs.new_empty(bsz, hkv, tq, r) if want_lse else None
    # Chunks of whole query tiles (every pair of a tile in one chunk), ~CHUNK_ELEMS scores each.
    work = torch.zeros(tq, dtype=torch.long)
    for grp in plan.groups:
        work.index_add_(0, grp.tile.cpu(), torch.full_like(grp.tile.cpu(), grp.kidx.shape[1] * r))
    cum = torch.cumsum(work, 0)
    ids = torch.div(cum - work, max(CHUNK_ELEMS // max(bsz * hkv, 1), 1), rounding_mode="floor")
    bounds = [0, *(torch.nonzero(ids[1:] != ids[:-1]).flatten() + 1).tolist(), tq]
    spans = [torch.searchsorted(grp.tile, torch.tensor(bounds, device=grp.tile.device)).tolist()
             for grp in plan.groups]
    for c in range(len(bounds) - 1):
        t0, t1 = bounds[c], bounds[c + 1]
        parts = []
        for grp, sp in zip(plan.groups, spans):
            p0, p1 = sp[c], sp[c + 1]
            if p1 > p0:
                parts.append(_scores(qt, k, v, bias, masks, plan, grp, p0, p1, t0, t1, g))
        o, lse_c = _merge(parts, qs, (bsz, hkv, t1 - t0, r, dv), want_lse)
        out[:, :, t0:t1] = o
        if want_lse:
            lse[:, :, t0:t1] = lse_c
    out = out.view(bsz, hkv, tq, g, bq, dv).transpose(2, 3).reshape(bsz, hq, tq * bq, dv)
    if want_lse:
        lse = lse.view(bsz, hkv, tq, g, bq).transpose(2, 3).reshape(bsz, hq, tq * bq)
    if plan.qpos is None:
        return out[:, :, :n], (lse[:, :, :n] if want_lse else None)
    return out.index_select(2, plan.qpos), (lse.index_select(2, plan.qpos) if want_lse else None)


def _scores(qt, k, v, bias, masks, plan, grp: PairGroup, p0, p1, t0, t1, g):
    """Masked scores [B, Hkv, P, R, W] of pairs p0:p1, their values and local tile indices."""
    bsz, hkv, _, r, d = qt.shape
    m = k.shape[2]
    tile = grp.tile[p0:p1]
    qp = qt[:, :, t0:t1] if grp.one_per_tile else qt[:, :, tile]
    p = qp.shape[2]
    kidx = grp.kidx[p0:p1]
    w = kidx.shape[1]
    flat = kidx.flatten()  # index_select on a 3-D view: far faster than on dim 2 of a 4-D one
    kp = k.view(bsz * hkv, m, d).index_select(1, flat).view(bsz, hkv, p, w, d)
    vp = v.view(bsz * hkv, m, -1).index_select(1, flat).view(bsz, hkv, p, w, v.shape[-1])
    s = qp @ kp.transpose(-1, -2)
    s6 = s.view(bsz, hkv, p, g, r // g, s.shape[-1])
    if grp.sel is not None:
        sel = grp.sel[p0:p1] if grp.pattern is None else grp.sel[grp.pattern[p0:p1]]
        _select_(s6, sel.unsqueeze(1))
    rows = plan.qidx[tile]
    if bias is not None:
        s6.add_(_gather(bias, rows, kidx, hkv, g).to(s.dtype))
    if grp.masks:
        for mk in masks:
            s6.masked_fill_(~_gather(mk, rows, kidx, hkv, g), float("-inf"))
    return s, vp, tile - t0, grp.one_per_tile


def _merge(parts, qs, shape, want_lse: bool):
    """Softmax over every pair of each tile: (out, lse or None) for the chunk's tiles."""
    bsz, hkv, tc, r, dv = shape
    neg = float("-inf")
    if len(parts) == 1 and parts[0][3]:  # one key set per tile: fused softmax (all −inf → NaN)
        s, vp, _, _ = parts[0]
        lse = torch.logsumexp(s, -1) if want_lse else None
        return torch.softmax(s, -1) @ vp, lse
    # The running max only shifts exp's argument (out and lse do not depend on it): detached, so
    # the in-place steps below stay out of autograd's way when the backward recomputes this.
    mx = qs.new_full((bsz, hkv, tc, r), neg)
    for s, _, loc, _ in parts:
        row_max = s.detach().amax(-1)
        mx.scatter_reduce_(2, loc.view(1, 1, -1, 1).expand_as(row_max), row_max, "amax")
    mx.masked_fill_(mx == neg, 0.0)
    den = qs.new_zeros(bsz, hkv, tc, r)
    o = qs.new_zeros(bsz, hkv, tc, r, dv)
    for s, vp, loc, _ in parts:
        s.sub_(mx[:, :, loc].unsqueeze(-1)).exp_()
        den.index_add_(2, loc, s.sum(-1))
        o.index_add_(2, loc, s @ vp)
    o.div_(den.unsqueeze(-1))  # a row with no kept key: 0 / 0 = NaN, as eager
    return o, (mx + den.log() if want_lse else None)


def _row_blocks(qs, k, v, bias, masks, offset: int | None, want_lse: bool):
    """Dense (offset None) or causal (key m kept iff m <= p + offset) attention by blocks of
    query rows, each against the contiguous key prefix it can keep: nothing is gathered, and
    only the block's last columns (those past its first row's diagonal) evaluate the mask."""
    bsz, hq, n, d = qs.shape
    hkv, m, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    bq = max(16, min(256, ROW_ELEMS // max(bsz * hq * m, 1)))
    out = qs.new_empty(bsz, hkv, g, n, dv)
    lse = qs.new_empty(bsz, hkv, g, n) if want_lse else None
    qg = qs.view(bsz, hkv, g, n, d)
    bias4, masks4 = _as4(bias), [_as4(mk) for mk in masks]
    for r0 in range(0, n, bq):
        r1 = min(n, r0 + bq)
        rows = r1 - r0
        hi = m if offset is None else max(0, min(m, r1 + offset))  # keys the block's last row keeps
        if hi == 0:
            out[:, :, :, r0:r1] = float("nan")
            if want_lse:
                lse[:, :, :, r0:r1] = float("-inf")
            continue
        s = qg[:, :, :, r0:r1].reshape(bsz, hkv, g * rows, d) @ k[:, :, :hi].transpose(-1, -2)
        s5 = s.view(bsz, hkv, g, rows, hi)
        if offset is not None and r0 + offset + 1 < hi:  # columns past the first row's diagonal
            c0 = max(0, r0 + offset + 1)
            cols = torch.arange(c0, hi, device=qs.device)
            past = cols[None, :] > torch.arange(r0, r1, device=qs.device)[:, None] + offset
            s5[..., c0:].masked_fill_(past, float("-inf"))  # selected, not added: see _select_
        if bias4 is not None:
            s5 += _rows_cols(bias4, r0, r1, hi, hkv, g).to(s.dtype)
        for mk in masks4:
            s5.masked_fill_(~_rows_cols(mk, r0, r1, hi, hkv, g), float("-inf"))
        if want_lse:
            lse[:, :, :, r0:r1] = torch.logsumexp(s5, -1)
        out[:, :, :, r0:r1] = (torch.softmax(s, -1) @ v[:, :, :hi]).view(bsz, hkv, g, rows, dv)
    out = out.view(bsz, hq, n, dv)
    return out, (lse.view(bsz, hq, n) if want_lse else None)


def _as4(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _rows_cols(t: torch.Tensor, r0: int, r1: int, hi: int, hkv: int, g: int) -> torch.Tensor:
    """Rows r0:r1 and keys :hi of a 4-D broadcastable t, as [b1, Hkv | 1, G | 1, rows, keys]."""
    b1, h1, n1, m1 = t.shape
    x = t[:, :, slice(r0, r1) if n1 > 1 else slice(None), slice(hi) if m1 > 1 else slice(None)]
    return x.unsqueeze(2) if h1 == 1 else x.reshape(b1, hkv, g, *x.shape[2:])


# ---------------------------------------------------------------- entry point

def sparse_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: MaskSpec | None, *,
                           scale: float, bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                           block_map: BlockMap | None = None, return_lse: bool = False):
    """softmax(scale·q kᵀ + bias, masked to spec ∧ mask) @ v, computing only kept tiles.

    q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (Hq a multiple of Hkv: GQA); ``bias``
    (float) and ``mask`` (bool, True = keep) broadcastable to [B, Hq, N, M]. ``spec``: a
    MaskSpec of kind "dense", "causal", "neighborhood" or "blocked", or None (dense).
    ``block_map``: visit only its tiles (see the module docstring). Returns out [B, Hq, N, Dv]
    in q's dtype, and with ``return_lse`` also the row log-sum-exp [B, Hq, N] (compute dtype,
    −inf where a row keeps nothing, where out is NaN)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("sparse_attention_torch: q, k, v must be [B, H, N, D]")
    bsz, hq, n, _ = q.shape
    hkv, m = k.shape[1], k.shape[2]
    if hq % hkv or k.shape[0] != bsz or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"sparse_attention_torch: shapes q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)} do not fit (B equal, Hq a multiple of Hkv)")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError("sparse_attention_torch: mask must be bool (True = keep); pass additive masks as bias")
    if spec is not None and spec.kind not in ("dense", "causal", "neighborhood", "blocked"):
        raise ValueError(f"sparse_attention_torch: a {spec.kind!r} spec has no closed form; pass spec=None "
                         "with the mask tensor (and its block map)")
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if dt in (torch.float16, torch.bfloat16):
        dt = torch.float32
    qs = q.to(dt) * scale
    kc, vc = k.to(dt).contiguous(), v.to(dt).contiguous()
    if n == 0 or m == 0:
        out = qs.new_full((bsz, hq, n, v.shape[-1]), float("nan"))
        return (out.to(q.dtype), qs.new_full((bsz, hq, n), float("-inf"))) if return_lse else out.to(q.dtype)
    if bias is not None and bias.dtype == torch.bool:
        mask, bias = (bias if mask is None else mask & bias), None
    masks = [mk for mk in (mask,) if mk is not None]
    if block_map is not None:
        out, lse = _with_block_map(qs, kc, vc, bias, masks, block_map, spec, return_lse)
    else:
        kind = "dense" if spec is None else spec.kind
        if kind in ("neighborhood", "blocked"):
            out, lse = _attend(qs, kc, vc, bias, masks, band_plan(spec, n, m).to(q.device), return_lse)
        else:
            out, lse = _row_blocks(qs, kc, vc, bias, masks, spec.offset if kind == "causal" else None, return_lse)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def _with_block_map(qs, k, v, bias, masks, bmap: BlockMap, spec, want_lse):
    bsz, hq, n, _ = qs.shape
    hkv = k.shape[1]
    if (bmap.n, bmap.m) != (n, k.shape[2]):
        raise ValueError(f"block map is for {bmap.n}×{bmap.m}, attention is {n}×{k.shape[2]}")
    bm, hm = bmap.full_count.shape[:2]
    if bm not in (1, bsz) or hm not in (1, hq):
        raise ValueError(f"block map batch/heads {bm}×{hm} do not broadcast to {bsz}×{hq}")
    if bmap.mask is not None:
        masks = [*masks, bmap.mask]
    if bm == 1 and hm == 1:
        return _attend(qs, k, v, bias, masks, map_plan(bmap, 0, 0, spec).to(qs.device), want_lse)
    out = qs.new_empty(bsz, hq, n, v.shape[-1])
    lse = qs.new_empty(bsz, hq, n) if want_lse else None
    for b in range(bm):
        for h in range(hm):
            bs = slice(b, b + 1) if bm > 1 else slice(None)
            hs = slice(h, h + 1) if hm > 1 else slice(None)
            ks = slice(h // (hq // hkv), h // (hq // hkv) + 1) if hm > 1 else slice(None)
            o, ls = _attend(qs[bs, hs], k[bs, ks], v[bs, ks], _slice(bias, bs, hs),
                            [_slice(mk, bs, hs) for mk in masks], map_plan(bmap, b, h, spec).to(qs.device),
                            want_lse)
            out[bs, hs] = o
            if want_lse:
                lse[bs, hs] = ls
    return out, lse


def _slice(t: torch.Tensor | None, bs: slice, hs: slice) -> torch.Tensor | None:
    if t is None:
        return None
    t = t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t[bs if t.shape[0] > 1 else slice(None), hs if t.shape[1] > 1 else slice(None)]
