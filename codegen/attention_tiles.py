"""The shared tile code of the fused softmax-attention kernels (dense, neighborhood, block-sparse).

One key tile of the 1-pass online softmax (FlashAttention-2 form), written once: every kernel's
program loops over the key tiles it must visit (all of them, an analytic range, or a block map's
list) and calls ``attn_tile`` for each, then ``store_rows``. The recurrences are named as in
FuseMax (REFERENCES.md).
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x · log2 e)


# --------------------------------------------------------------------------------------------------
# The math (FuseMax / REFERENCES.md names). The key rank m is split into tiles (m1, m0) of BLOCK_N
# keys; a program owns BLOCK_M queries p and walks the tiles m1 once, carrying per query row:
#
#   RM  running max of the scores seen so far          (starts at −inf)
#   RD  running denominator  Σ exp(S − RM)             (starts at 0)
#   RNV running numerator    Σ exp(S − RM) · V         (starts at 0, [BLOCK_M, Dv] in registers)
#
# For each tile:
#   BQK  = scale · Q · BKᵀ (+ bias; masked entries −inf)
#   LM   = max_m0 BQK                RM' = max(RM, LM)
#   SLN  = exp(BQK − RM')            SLD = Σ_m0 SLN        SLNV = SLN · BV
#   PRM  = exp(RM − RM')             (rescales what was accumulated under the old max)
#   RD'  = SLD + RD · PRM            RNV' = SLNV + RNV · PRM
# and at the end AV = RNV ÷ RD, LSE = RM + ln RD.
#
# exp is exp2 with log2(e) folded into the scale (no bias: BQK is kept in log2 units, so
# SLN = exp2(BQK − RM'); with scale > 0 the scale itself moves past the row max into exp2's
# argument, one FMA per score, as in the Triton tutorial). With a bias the scores stay in natural
# units and the difference is scaled by log2(e) after the subtraction: folding log2(e) into a bias
# of finfo.min would overflow it to −inf and turn eager's uniform row into a NaN row.
#
# Empty rows: while RM' is still −inf (every score so far −inf) the subtraction uses 0 instead of
# RM', so SLN = exp2(−inf) = 0 and PRM = 0 rather than exp2(−inf − −inf) = NaN. A row that never
# sees a finite score ends with RD = 0 and RNV = 0, and AV = 0 ÷ 0 = NaN: eager's answer. Any
# row with a finite score has RD ≥ 1 (its max contributes exp(0)).
# --------------------------------------------------------------------------------------------------


@triton.jit
def load_tile(ptrs, rows, cols, n_rows, n_cols, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    # Bounds checks only where a constexpr says the tile can stick out: full interior tiles load
    # unpredicated, which keeps the hot loop's loads wide.
    if CHECK_ROWS and CHECK_COLS:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        x = tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def attn_tile(
    acc, rd, rm, q,
    k_base, v_base, bias_base, mask_base,
    start_n, offs_m, offs_n, offs_d, offs_dv,
    N, M, D, DV, qk_scale, causal_offset,
    stride_kn, stride_kd, stride_vn, stride_vd,
    stride_bn, stride_bm, stride_mn, stride_mm,
    HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr, ON_DIAGONAL: tl.constexpr,
    KEY_BOUND: tl.constexpr, ROW_BOUND: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, FOLD_SCALE: tl.constexpr,
    kv_b, kv_h, USE_TMA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    MASK_DIV_N: tl.constexpr = 1, MASK_DIV_M: tl.constexpr = 1,
    keep_pred=0, HAS_PRED: tl.constexpr = False,
    SCORE_MOD: tl.constexpr = None, mod_args=None, mod_b=0, mod_h=0,
):
    # SCORE_MOD (optional): a generated ``score_mod(s, rows, cols, b, h, N, M, args)``
    # (codegen/score_mod_gen.py) applied to the raw products before the scale, the bias and the
    # masks; with it the scores are kept in natural units, as with a bias.
    # HAS_PRED (optional): ``keep_pred`` is a bool [BLOCK_M, BLOCK_N] predicate the caller computed
    # in closed form (triton_neighborhood.py's structured masks), ANDed like the bool mask. There
    # offs_m and start_n + offs_n are gathered flat indices of grid patches, N / M where invalid.
    # MASK_DIV_N / MASK_DIV_M (optional): the mask is given per block of MASK_DIV_N queries by
    # MASK_DIV_M keys (token (p, m) reads mask[p // MASK_DIV_N, m // MASK_DIV_M]; block-sparse
    # layouts); 1 = an element mask.
    cols = start_n + offs_n
    # BKᵀ tile [BLOCK_D, BLOCK_N] and BV tile [BLOCK_N, BLOCK_DV]. With TMA (k_base, v_base are
    # tensor descriptors) the copy engine zero-fills rows past M and columns past D.
    if USE_TMA:
        kt = tl.trans(k_base.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_D))
    else:
        kt = load_tile(k_base + offs_d[:, None] * stride_kd + cols[None, :] * stride_kn,
                        offs_d, cols, D, M, PAD_D, KEY_BOUND)
    if UPCAST_DOT:
        kt = kt.to(tl.float32)
    bqk = tl.dot(q, kt, input_precision=DOT_PRECISION)
    if SCORE_MOD is not None:
        bqk = SCORE_MOD(bqk, offs_m, cols, mod_b, mod_h, N, M, mod_args)
    if HAS_BIAS:
        bias = load_tile(bias_base + offs_m[:, None] * stride_bn + cols[None, :] * stride_bm,
                          offs_m, cols, N, M, ROW_BOUND, KEY_BOUND)
        s = bqk * qk_scale + bias.to(tl.float32)  # natural units (see the header)
    elif SCORE_MOD is not None:
        s = bqk * qk_scale  # natural units
    elif FOLD_SCALE:
        s = bqk  # scale > 0 commutes with max and −inf: applied inside exp2's FMA below
    else:
        s = bqk * qk_scale  # log2 units: qk_scale = scale · log2 e
    if HAS_MASK:
        if MASK_DIV_N == 1 and MASK_DIV_M == 1:
            keep = load_tile(mask_base + offs_m[:, None] * stride_mn + cols[None, :] * stride_mm,
                              offs_m, cols, N, M, ROW_BOUND, KEY_BOUND)
        else:
            keep = load_tile(mask_base + (offs_m // MASK_DIV_N)[:, None] * stride_mn
                              + (cols // MASK_DIV_M)[None, :] * stride_mm,
                              offs_m, cols, N, M, ROW_BOUND, KEY_BOUND)
        s = tl.where(keep != 0, s, float("-inf"))
    if HAS_PRED:
        s = tl.where(keep_pred, s, float("-inf"))
    if ON_DIAGONAL:
        s = tl.where(cols[None, :] <= offs_m[:, None] + causal_offset, s, float("-inf"))
    if KEY_BOUND:
        s = tl.where(cols[None, :] < M, s, float("-inf"))

    if FOLD_SCALE:
        lm = tl.max(s, 1) * qk_scale
    else:
        lm = tl.max(s, 1)
    rm_new = tl.maximum(rm, lm)
    rm_safe = tl.where(rm_new == float("-inf"), 0.0, rm_new)  # empty-so-far rows: no −inf − −inf
    if HAS_BIAS:
        sln = tl.math.exp2((s - rm_safe[:, None]) * 1.4426950408889634)
        prm = tl.math.exp2((rm - rm_safe) * 1.4426950408889634)
    elif SCORE_MOD is not None:
        sln = tl.math.exp2((s - rm_safe[:, None]) * 1.4426950408889634)
        prm = tl.math.exp2((rm - rm_safe) * 1.4426950408889634)
    elif FOLD_SCALE:
        sln = tl.math.exp2(s * qk_scale - rm_safe[:, None])  # one FMA per score
        prm = tl.math.exp2(rm - rm_safe)
    else:
        sln = tl.math.exp2(s - rm_safe[:, None])
        prm = tl.math.exp2(rm - rm_safe)
    rd = rd * prm + tl.sum(sln, 1)
    if USE_TMA:
        v = v_base.load([kv_b, kv_h, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    else:
        v = load_tile(v_base + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                       cols, offs_dv, M, DV, KEY_BOUND, PAD_DV)
    p = sln.to(v.dtype)  # P rounded to the input dtype, as the tensor cores take it
    if UPCAST_DOT:
        p = p.to(tl.float32)
        v = v.to(tl.float32)
    acc = acc * prm[:, None]
    acc = tl.dot(p, v, acc, input_precision=DOT_PRECISION)
    return acc, rd, rm_new


@triton.jit
def store_rows(out, rm, rd, o_ptrs, lse_ptrs, offs_m, offs_dv, N, DV, STORE_OUT: tl.constexpr,
                HAS_BIAS: tl.constexpr, RETURN_LSE: tl.constexpr, EVEN_ROWS: tl.constexpr, PAD_DV: tl.constexpr):
    """Every fused kernel's epilogue: the output rows (AV, already RNV ÷ RD) and, when asked, the
    natural-log LSE of S: −inf for empty rows (RM = −inf, ln 0 = −inf). Without a bias RM is kept in
    log2 units (see the header), so the whole sum is converted; with one only ln RD is."""
    if STORE_OUT:
        if EVEN_ROWS and not PAD_DV:
            tl.store(o_ptrs, out)
        else:
            tl.store(o_ptrs, out, mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV))
    if RETURN_LSE:
        if HAS_BIAS:
            lse = rm + tl.math.log2(rd) * 0.6931471805599453
        else:
            lse = (rm + tl.math.log2(rd)) * 0.6931471805599453
        if EVEN_ROWS:
            tl.store(lse_ptrs, lse)
        else:
            tl.store(lse_ptrs, lse, mask=offs_m < N)
