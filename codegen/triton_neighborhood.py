"""Fused sparse softmax attention for structured masks (causal, neighborhood, blocked) in Triton.

Public entry point: :func:`neighborhood_attention`. Per batch ``b`` and query head ``h`` it computes

    S = scale · q kᵀ + bias,   S[p, m] = −inf unless spec_keep(spec, p, m) and mask[p, m]
    O = softmax(S, dim=-1) @ v          (float32 arithmetic, cast to q.dtype)

exactly as eager float32 attention with the materialised mask would: a row that keeps no key is
NaN (softmax of all −inf), its LSE −inf. ``spec_keep`` (rewrite/ir/mask.py) is the reference.
The tile body (online softmax, names RM / RD / RNV) is ``attn_tile`` of attention_tiles.py; this
file only decides which key tiles a query tile visits and which of them need the predicate (the
per-axis device functions for that are in neighborhood_geometry.py, the host-side planner in
neighborhood_tiles.py).

Geometry. A spec is a token grid of 1-3 axes flattened row-major (flat = Σ_a coord_a · stride_a);
each axis keeps, for a query coordinate q, keys k with a per-axis rule. In kernel terms every axis
(window of half-width w and dilation d, causal or not; NATTEN ``clamped``; HaloNet ``blocked``):

    queries of residue class r = q mod d (q = r + d·i) keep keys of one residue class
    r_k = (r + offset) mod d (k = r_k + d·j), and there exactly the j in an interval
    [lo(i), hi(i)] whose ends are non-decreasing in i:
      window      |c + i − j| ≤ W   (0 ≤ c + i − j ≤ W causal), W = ⌊w/d⌋, c = (r + offset − r_k)/d
      clamped     j ∈ [start(i), start(i) + k − 1], NATTEN's start with GNA stride s (L_r = ⌈(G−r)/d⌉)
      blocked     k ∈ [B⌊q/B⌋ − h, B⌊q/B⌋ + B − 1 + h]  (d = 1)
    ("causal" specs are a 1-D causal window of unbounded W; 1-D grids may have N ≠ M.)

Tiling (all analytic, no block map in memory). A program owns a query *patch*: P_a consecutive
class indices i per axis (one residue class per axis, NATTEN's trick: a dilated window is a plain
window inside its class, so it gets full tiles as a plain one does). By monotonicity the patch's
keys along an axis lie in [lo(i_first), hi(i_last)] ∩ [0, L_k); key patches of KP_a indices tile
that range from its start (not grid-aligned: fewer tiles). A key tile is FULL along an axis when
lo(i_last) ≤ j_first and j_last ≤ min(hi(i_first), L_k − 1), i.e. every query of the patch keeps
every key; full along every axis means full: no predicate, no bounds checks. The full tiles form a
box in tile space; the kernel walks that box in one loop and the shell around it (partial tiles:
per-axis predicate from coordinates, plus bounds) in a second, each a single flat loop so Triton
software-pipelines it. Rows and columns are gathered by pointer arithmetic from their coordinates
(no permuted copy of q/k/v); out-of-grid rows/keys get the flat index N / M, which
``attn_tile``'s ROW_BOUND / KEY_BOUND checks mask.

The runtime ``mask`` (bool, True = keep) and ``bias`` are loaded in every visited tile; tiles the
spec skips are never read, which is exact because spec-masked entries are −inf whatever the bias.
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from rewrite.codegen.attention_tiles import LOG2E, attn_tile, load_tile, store_rows
from rewrite.codegen.neighborhood_geometry import axis_setup, kept_interval, row_coords, shell_tile_2d, tile_start
from rewrite.codegen.neighborhood_tiles import (
    TRIVIAL_AXIS,
    NeighborhoodConfig,
    choose_config,
    kernel_axes,
    patches_per_class,
    plan_tiles,
)
from rewrite.codegen.triton_attention import allocate_rows, check_operands, modifier_args, prepare_bias_mask
from rewrite.ir.mask import MaskSpec

__all__ = ["NeighborhoodConfig", "neighborhood_attention"]  # the planner: codegen/neighborhood_tiles.py


# --------------------------------------------------------------------------------------------------
# Kernel (its per-axis geometry helpers: codegen/neighborhood_geometry.py)
# --------------------------------------------------------------------------------------------------


@triton.jit
def _nbhd_fwd_kernel(
    Q, K, V, Bias, Mask, Out, Lse,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bn, stride_bm,
    stride_mb, stride_mh, stride_mn, stride_mm,
    stride_ob, stride_oh, stride_on, stride_od,
    HQ, GROUP, N, M, D, DV, qk_scale, OFF, mod_args,
    QG0, QG1, QG2, KG0, KG1, KG2, G0, G1, G2, D0, D1, D2,
    PA0, PA1, PA2, PB0, PB1, PB2, NT0, NT1, NT2, T1, T2,
    KIND0: tl.constexpr, KIND1: tl.constexpr, KIND2: tl.constexpr, NDIM: tl.constexpr,
    P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    KP0: tl.constexpr, KP1: tl.constexpr, KP2: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, RETURN_LSE: tl.constexpr, REVERSE: tl.constexpr,
    EVEN_Q: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    SCORE_MOD: tl.constexpr = None,
):
    # grid: (query patches of all residue classes, B · Hq); patches of one (b, h) are adjacent
    # (they share K/V in L2), axis 2 fastest. Axis 2 is the innermost (contiguous) grid axis; a
    # 1-D / 2-D grid pads on the left with trivial axes (KIND 0), which cost nothing.
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    idx2 = pid % T2
    if REVERSE:  # causal: the patches with the most key tiles start first (shorter tail)
        idx2 = T2 - 1 - idx2
    idx1 = (pid // T2) % T1
    idx0 = pid // (T2 * T1)
    b32 = bh // HQ
    h32 = bh % HQ
    b = b32.to(tl.int64)
    h = h32.to(tl.int64)
    hk = (h32 // GROUP).to(tl.int64)  # GQA / MQA

    r0, rk0, c0, i00, lq0, lk0, lf0, klo0, nk0, flo0, fhi0 = axis_setup(
        idx0, NT0, QG0, KG0, G0, D0, 0, PA0, PB0, KIND0, P0, KP0)
    r1, rk1, c1, i01, lq1, lk1, lf1, klo1, nk1, flo1, fhi1 = axis_setup(
        idx1, NT1, QG1, KG1, G1, D1, 0, PA1, PB1, KIND1, P1, KP1)
    r2, rk2, c2, i02, lq2, lk2, lf2, klo2, nk2, flo2, fhi2 = axis_setup(
        idx2, NT2, QG2, KG2, G2, D2, OFF, PA2, PB2, KIND2, P2, KP2)

    # Rows: the patch's query coordinates (flat index N where off the grid) and, per axis, the
    # kept key interval [lo, hi] of each row: the predicate of partial tiles.
    rows = tl.arange(0, BLOCK_M)
    qi2, x2, ok2 = row_coords(rows, i02, r2, D2, lq2, KIND2, P2, 1)
    qi1, x1, ok1 = row_coords(rows, i01, r1, D1, lq1, KIND1, P1, P2)
    qi0, x0, ok0 = row_coords(rows, i00, r0, D0, lq0, KIND0, P0, P2 * P1)
    if NDIM == 1:
        offs_m = x2
        row_ok = ok2
    elif NDIM == 2:
        offs_m = x1 * QG2 + x2
        row_ok = ok1 & ok2
    else:
        offs_m = (x0 * QG1 + x1) * QG2 + x2
        row_ok = ok0 & ok1 & ok2
    if not EVEN_Q:
        offs_m = tl.where(row_ok, offs_m, N)
    lo0, hi0 = kept_interval(qi0, KIND0, PA0, PB0, c0, lf0)
    lo1, hi1 = kept_interval(qi1, KIND1, PA1, PB1, c1, lf1)
    lo2, hi2 = kept_interval(qi2, KIND2, PA2, PB2, c2, lf2)

    # Columns: key patch offsets per axis; a tile's flat key index is one scalar plus col_base.
    cn = tl.arange(0, BLOCK_N)
    kc2 = cn % KP2
    kc1 = (cn // KP2) % KP1
    kc0 = cn // (KP2 * KP1)
    if NDIM == 1:
        col_base = D2 * kc2
    elif NDIM == 2:
        col_base = D1 * kc1 * KG2 + D2 * kc2
    else:
        col_base = (D0 * kc0 * KG1 + D1 * kc1) * KG2 + D2 * kc2
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                   offs_m, offs_d, N, D, not EVEN_Q, PAD_D)
    out_dtype = q.dtype
    if UPCAST_DOT:
        q = q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    bias_base = Bias + b * stride_bb + h * stride_bh
    mask_base = Mask + b * stride_mb + h * stride_mh

    rm = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    rd = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # FULL tiles: the box [flo, fhi) per axis, no predicate, no bounds.
    nf0 = fhi0 - flo0
    nf1 = fhi1 - flo1
    nf2 = fhi2 - flo2
    n_full = nf0 * nf1 * nf2
    for u in range(0, n_full):
        if NDIM == 1:
            t0 = 0
            t1 = 0
            t2 = flo2 + u
        elif NDIM == 2:
            t0 = 0
            t1 = flo1 + u // nf2
            t2 = flo2 + u % nf2
        else:
            t0 = flo0 + u // (nf2 * nf1)
            t1 = flo1 + (u // nf2) % nf1
            t2 = flo2 + u % nf2
        jb0, jb1, jb2, start = tile_start(t0, t1, t2, klo0, klo1, klo2, rk0, rk1, rk2, D0, D1, D2, KG1, KG2,
                                          NDIM, KP0, KP1, KP2)
        cols = col_base + start
        acc, rd, rm = attn_tile(
            acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
            0, offs_m, cols, offs_d, offs_dv, N, M, D, DV, qk_scale, 0,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
            HAS_BIAS, HAS_MASK, False, False, not EVEN_Q, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
            FOLD_SCALE, b32, h32, False, BLOCK_N, BLOCK_D, BLOCK_DV,
            SCORE_MOD=SCORE_MOD, mod_args=mod_args, mod_b=b32, mod_h=h32,
        )

    # PARTIAL tiles: the shell of the tile box around the full box (all of it when none is full).
    none_full = n_full == 0
    a0 = tl.where(none_full, 0, flo0)
    b0 = tl.where(none_full, 0, fhi0)
    a1 = tl.where(none_full, 0, flo1)
    b1 = tl.where(none_full, 0, fhi1)
    a2 = tl.where(none_full, 0, flo2)
    b2 = tl.where(none_full, 0, fhi2)
    n_shell = nk0 * nk1 * nk2 - n_full
    for v in range(0, n_shell):
        if NDIM == 1:
            pt0 = 0
            pt1 = 0
            pt2 = tl.where(v < a2, v, v + (b2 - a2))
        elif NDIM == 2:
            pt0 = 0
            pt1, pt2 = shell_tile_2d(v, nk1, nk2, a1, b1, a2, b2)
        else:
            plane = nk1 * nk2
            ps = plane - (b1 - a1) * (b2 - a2)  # shell tiles of a plane crossing the full box
            top = a0 * plane
            mid = (b0 - a0) * ps
            ps_c = tl.maximum(ps, 1)
            w = v - top
            wb = v - top - mid
            t1m, t2m = shell_tile_2d(w % ps_c, nk1, nk2, a1, b1, a2, b2)
            in_top = v < top
            in_mid = v < top + mid
            pt0 = tl.where(in_top, v // plane, tl.where(in_mid, a0 + w // ps_c, b0 + wb // plane))
            pt1 = tl.where(in_top, (v // nk2) % nk1, tl.where(in_mid, t1m, (wb // nk2) % nk1))
            pt2 = tl.where(in_top, v % nk2, tl.where(in_mid, t2m, wb % nk2))
        pj0, pj1, pj2, pstart = tile_start(pt0, pt1, pt2, klo0, klo1, klo2, rk0, rk1, rk2, D0, D1, D2, KG1, KG2,
                                           NDIM, KP0, KP1, KP2)
        # key k = jb + kc is kept by row i along an axis iff lo(i) ≤ k ≤ hi(i) and k < L_k
        keep = (kc2[None, :] >= (lo2 - pj2)[:, None]) & (kc2[None, :] <= (hi2 - pj2)[:, None])
        col_ok = kc2 < lk2 - pj2
        if NDIM >= 2:
            keep &= (kc1[None, :] >= (lo1 - pj1)[:, None]) & (kc1[None, :] <= (hi1 - pj1)[:, None])
            col_ok &= kc1 < lk1 - pj1
        if NDIM == 3:
            keep &= (kc0[None, :] >= (lo0 - pj0)[:, None]) & (kc0[None, :] <= (hi0 - pj0)[:, None])
            col_ok &= kc0 < lk0 - pj0
        pcols = tl.where(col_ok, col_base + pstart, M)
        acc, rd, rm = attn_tile(
            acc, rd, rm, q, k_base, v_base, bias_base, mask_base,
            0, offs_m, pcols, offs_d, offs_dv, N, M, D, DV, qk_scale, 0,
            stride_kn, stride_kd, stride_vn, stride_vd, stride_bn, stride_bm, stride_mn, stride_mm,
            HAS_BIAS, HAS_MASK, False, True, not EVEN_Q, PAD_D, PAD_DV, DOT_PRECISION, UPCAST_DOT,
            FOLD_SCALE, b32, h32, False, BLOCK_N, BLOCK_D, BLOCK_DV,
            keep_pred=keep, HAS_PRED=True, SCORE_MOD=SCORE_MOD, mod_args=mod_args, mod_b=b32, mod_h=h32,
        )

    # AV = RNV ÷ RD: 0 ÷ 0 = NaN for rows that never saw a finite score, as in eager.
    out = (acc / rd[:, None]).to(out_dtype)
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od
    store_rows(out, rm, rd, o_ptrs, Lse + bh.to(tl.int64) * N + offs_m, offs_m, offs_dv, N, DV,
                True, HAS_BIAS or SCORE_MOD is not None, RETURN_LSE, EVEN_Q, PAD_DV)


# --------------------------------------------------------------------------------------------------
# Python entry point
# --------------------------------------------------------------------------------------------------


def neighborhood_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    return_lse: bool = False,
    config: NeighborhoodConfig | None = None,
    score_mod=None,
    mod_leaves: tuple[torch.Tensor, ...] = (),
    mod_tables: frozenset[int] = frozenset(),
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale · q kᵀ + bias, −inf outside ``spec`` and ``mask``) @ v, fused and sparse.

    q [B, Hq, N, D], k [B, Hkv, M, D], v [B, Hkv, M, Dv] (Hq % Hkv == 0, head h reads kv head
    h // (Hq // Hkv)), any strides, fp16/bf16/fp32, D and Dv in 1..256. ``spec``: a causal,
    neighborhood or blocked ``MaskSpec`` (2-D/3-D grids need N = M = prod(grid)).
    bias: float, broadcastable to [B, Hq, N, M]. mask: bool, broadcastable, True = keep.
    Returns out [B, Hq, N, Dv] in q.dtype (NaN rows where no key is kept), and with
    ``return_lse`` the float32 row log-sum-exp [B, Hq, N] (−inf for such rows).
    ``config`` overrides the table (and, with patches given, the planner). ``score_mod`` (optional):
    a generated Triton score modifier over ``mod_leaves`` (codegen/score_mod_gen.py; those in ``mod_tables``
    are tables [B | 1, Hq | 1, 1, T] it gathers from), applied to the raw products inside the kept tiles, as
    in triton_attention."""
    B, HQ, N, D, HKV, M, DV = check_operands(q, k, v, "neighborhood_attention", _nbhd_fwd_kernel)
    axes = kernel_axes(spec, N, M)

    shape4 = (B, HQ, N, M)
    bias, mask = prepare_bias_mask(bias, mask, shape4)
    out, lse, done = allocate_rows(q, shape4, DV, return_lse)
    if done:
        return (out, lse) if return_lse else out

    ndim = sum(ax.kind != TRIVIAL_AXIS for ax in axes)
    has_bias, has_mask = bias is not None, mask is not None
    cfg = config or choose_config(D, DV, q.dtype, q.device, tuple(axes), has_bias or has_mask)
    if cfg.q_patch is not None and cfg.k_patch is not None:
        qp, kpatch = tuple(cfg.q_patch), tuple(cfg.k_patch)
        if (len(qp) != ndim or len(kpatch) != ndim or math.prod(qp) != cfg.block_m
                or math.prod(kpatch) != cfg.block_n):
            raise ValueError(f"patches {qp} / {kpatch} don't fit {ndim} axes and tiles "
                             f"{cfg.block_m} x {cfg.block_n}")
    else:
        qp, kpatch = plan_tiles(tuple(axes), cfg.block_m, cfg.block_n)[:2]
    qp = (1,) * (3 - ndim) + qp
    kpatch = (1,) * (3 - ndim) + kpatch
    nt = [patches_per_class(ax, p) for ax, p in zip(axes, qp)]
    tiles = [ax.d * t for ax, t in zip(axes, nt)]
    even_q = all(ax.qg % ax.d == 0 and (ax.qg // ax.d) % p == 0 for ax, p in zip(axes, qp))

    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(DV))
    bias_arg = bias if has_bias else q  # dummy pointer, never read
    mask_arg = mask if has_mask else q
    bs = bias.stride() if has_bias else (0, 0, 0, 0)
    ms = mask.stride() if has_mask else (0, 0, 0, 0)
    natural = has_bias or score_mod is not None  # scores in natural units, not log2 (attention_tiles.py)
    qk_scale = float(scale) if natural else float(scale) * LOG2E
    mod_args = modifier_args(mod_leaves, mod_tables, shape4)
    grid = (math.prod(tiles), B * HQ)
    a0, a1, a2 = axes
    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        _nbhd_fwd_kernel[grid](
            q, k, v, bias_arg, mask_arg, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *bs, *ms, *out.stride(),
            HQ, HQ // HKV, N, M, D, DV, qk_scale, a2.off, mod_args,
            a0.qg, a1.qg, a2.qg, a0.kg, a1.kg, a2.kg, a0.g, a1.g, a2.g, a0.d, a1.d, a2.d,
            a0.pa, a1.pa, a2.pa, a0.pb, a1.pb, a2.pb, nt[0], nt[1], nt[2], tiles[1], tiles[2],
            KIND0=a0.kind, KIND1=a1.kind, KIND2=a2.kind, NDIM=max(ndim, 1),
            P0=qp[0], P1=qp[1], P2=qp[2], KP0=kpatch[0], KP1=kpatch[1], KP2=kpatch[2],
            HAS_BIAS=has_bias, HAS_MASK=has_mask, RETURN_LSE=return_lse,
            REVERSE=spec.kind == "causal",
            EVEN_Q=even_q, PAD_D=block_d != D, PAD_DV=block_dv != DV,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            # the interpreter multiplies bf16 dot operands as raw bits (triton_attention.py)
            UPCAST_DOT=q.device.type == "cpu" and q.dtype == torch.bfloat16,
            FOLD_SCALE=not natural and scale > 0, SCORE_MOD=score_mod,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return (out, lse) if return_lse else out
