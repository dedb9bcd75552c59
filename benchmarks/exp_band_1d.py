"""Experiment: can a dedicated 1-D band kernel beat the general neighborhood kernel at N = 64k?

    python -P benchmarks/exp_band_1d.py [--ns 65536] [--ds 64,128]

Kernel (|p − m| ≤ W, N = M, no bias): per query block of BLOCK_M rows the key range
[start − W, start + BLOCK_M − 1 + W] is walked in three loops: left partial tiles (predicate),
full tiles (no predicate), right partial tiles. SPLIT=True runs two independent row halves through
each key tile (FlashAttention-3's intra-warpgroup overlap: the second half's Q·Kᵀ can run on the
tensor cores while the first half's softmax runs). Compared in one run with the general kernel
(codegen/triton_neighborhood.py) and compiled FlexAttention; prints a table.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from rewrite.codegen.triton_attention import LOG2E


@triton.jit
def _scores(q, kt, rows, cols, W, M, PARTIAL: tl.constexpr):
    s = tl.dot(q, kt)
    if PARTIAL:
        keep = (cols[None, :] - rows[:, None] <= W) & (rows[:, None] - cols[None, :] <= W) & (cols[None, :] < M)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _update(acc, rd, rm, s, v, qk_scale):
    # online softmax in log2 units (qk_scale = scale · log2 e): RM' = max(RM, max S), PRM = 2^(RM − RM')
    lm = tl.max(s, 1) * qk_scale
    rm_new = tl.maximum(rm, lm)
    rm_safe = tl.where(rm_new == float("-inf"), 0.0, rm_new)
    sln = tl.math.exp2(s * qk_scale - rm_safe[:, None])
    prm = tl.math.exp2(rm - rm_safe)
    rd = rd * prm + tl.sum(sln, 1)
    acc = acc * prm[:, None]
    acc = tl.dot(sln.to(v.dtype), v, acc)
    return acc, rd, rm_new


@triton.jit
def _band_tiles(acc_a, rd_a, rm_a, acc_b, rd_b, rm_b, qa, qb, rows_a, rows_b, K, V, stride_kn, stride_vn,
                t_lo, t_hi, key0, W, M, qk_scale, offs_n, offs_d,
                PARTIAL: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr):
    for t in range(t_lo, t_hi):
        cols = key0 + t * BLOCK_N + offs_n
        if PARTIAL:
            kt = tl.load(K + offs_d[:, None] + cols[None, :] * stride_kn, mask=cols[None, :] < M, other=0.0)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :], mask=cols[:, None] < M, other=0.0)
        else:
            kt = tl.load(K + offs_d[:, None] + cols[None, :] * stride_kn)
            v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :])
        sa = _scores(qa, kt, rows_a, cols, W, M, PARTIAL)
        if SPLIT:
            sb = _scores(qb, kt, rows_b, cols, W, M, PARTIAL)
        acc_a, rd_a, rm_a = _update(acc_a, rd_a, rm_a, sa, v, qk_scale)
        if SPLIT:
            acc_b, rd_b, rm_b = _update(acc_b, rd_b, rm_b, sb, v, qk_scale)
    return acc_a, rd_a, rm_a, acc_b, rd_b, rm_b


@triton.jit
def _band_kernel(Q, K, V, Out, N, W, qk_scale, num_m_blocks, stride_bh, stride_n,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    bh = (pid // num_m_blocks).to(tl.int64)
    start = (pid % num_m_blocks) * BLOCK_M
    HALF: tl.constexpr = BLOCK_M // 2 if SPLIT else BLOCK_M
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    rows_a = start + tl.arange(0, HALF)
    rows_b = rows_a + HALF
    Qb, Kb, Vb, Ob = Q + bh * stride_bh, K + bh * stride_bh, V + bh * stride_bh, Out + bh * stride_bh
    qa = tl.load(Qb + rows_a[:, None] * stride_n + offs_d[None, :])
    qb = qa
    if SPLIT:
        qb = tl.load(Qb + rows_b[:, None] * stride_n + offs_d[None, :])
    acc_a = tl.zeros([HALF, D], tl.float32)
    acc_b = tl.zeros([HALF, D], tl.float32)
    rd_a = tl.zeros([HALF], tl.float32)
    rd_b = tl.zeros([HALF], tl.float32)
    rm_a = tl.full([HALF], float("-inf"), tl.float32)
    rm_b = tl.full([HALF], float("-inf"), tl.float32)
    key0 = tl.maximum(start - W, 0)
    key_end = tl.minimum(start + BLOCK_M + W, N)
    n_tiles = tl.cdiv(key_end - key0, BLOCK_N)
    full_lo = tl.maximum(start + BLOCK_M - 1 - W, 0)  # keys every row keeps: [full_lo, full_hi)
    full_hi = tl.minimum(start + W + 1, N)
    f0 = tl.minimum(tl.cdiv(full_lo - key0, BLOCK_N), n_tiles)
    f1 = tl.maximum(tl.minimum((full_hi - key0) // BLOCK_N, n_tiles), f0)
    acc_a, rd_a, rm_a, acc_b, rd_b, rm_b = _band_tiles(
        acc_a, rd_a, rm_a, acc_b, rd_b, rm_b, qa, qb, rows_a, rows_b, Kb, Vb, stride_n, stride_n,
        0, f0, key0, W, N, qk_scale, offs_n, offs_d, True, SPLIT, BLOCK_N)
    acc_a, rd_a, rm_a, acc_b, rd_b, rm_b = _band_tiles(
        acc_a, rd_a, rm_a, acc_b, rd_b, rm_b, qa, qb, rows_a, rows_b, Kb, Vb, stride_n, stride_n,
        f0, f1, key0, W, N, qk_scale, offs_n, offs_d, False, SPLIT, BLOCK_N)
    acc_a, rd_a, rm_a, acc_b, rd_b, rm_b = _band_tiles(
        acc_a, rd_a, rm_a, acc_b, rd_b, rm_b, qa, qb, rows_a, rows_b, Kb, Vb, stride_n, stride_n,
        f1, n_tiles, key0, W, N, qk_scale, offs_n, offs_d, True, SPLIT, BLOCK_N)
    tl.store(Ob + rows_a[:, None] * stride_n + offs_d[None, :], (acc_a / rd_a[:, None]).to(Out.dtype.element_ty))
    if SPLIT:
        tl.store(Ob + rows_b[:, None] * stride_n + offs_d[None, :], (acc_b / rd_b[:, None]).to(Out.dtype.element_ty))


def band_attention(q, k, v, w: int, scale: float, block_m=128, block_n=64, warps=4, stages=3, split=False):
    """Experiment only: contiguous [B, H, N, D], N a multiple of block_m, D a power of two."""
    B, H, N, D = q.shape
    assert N % block_m == 0 and q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    out = torch.empty_like(q)
    nmb = N // block_m
    _band_kernel[(B * H * nmb,)](q, k, v, out, N, w, scale * LOG2E, nmb, N * D, D, D=D, BLOCK_M=block_m,
                                 BLOCK_N=block_n, SPLIT=split, num_warps=warps, num_stages=stages)
    return out


def _band_mod(b, h, i, j):
    return (i - j).abs() <= 512


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ns", default="65536")
    ap.add_argument("--ds", default="64,128")
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from rewrite.codegen.triton_neighborhood import neighborhood_attention
    from rewrite.ir.mask import MaskSpec

    flex = torch.compile(flex_attention, dynamic=False)
    cbm = torch.compile(create_block_mask, dynamic=False)
    B, H, W = 2, 16, 512
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        for d in (int(x) for x in args.ds.split(",")):
            g = torch.Generator(device="cuda").manual_seed(n + d)
            q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            scale = d ** -0.5
            spec = MaskSpec("neighborhood", grid=(n,), window=(W,), dilation=(1,), causal=(False,),
                            clamped=(False,), stride=(1,))
            ref = neighborhood_attention(q, k, v, spec, scale=scale)
            bm = cbm(_band_mod, None, None, n, n, device="cuda")
            timings = {"general": functools.partial(neighborhood_attention, q, k, v, spec, scale=scale),
                       "flex": functools.partial(flex, q, k, v, block_mask=bm, scale=scale)}
            for bmk, bnk, wk, st, sp in ((128, 64, 4, 3, False), (128, 64, 4, 3, True), (128, 64, 8, 3, True),
                                         (128, 128, 8, 3, True), (64, 64, 4, 3, False), (256, 64, 8, 3, True),
                                         (128, 64, 4, 4, True), (128, 128, 4, 3, False)):
                if d == 128 and (bmk, bnk) == (256, 64) and wk == 4:
                    continue
                name = f"band BM{bmk} BN{bnk} w{wk} s{st}{' split' if sp else ''}"
                fn = functools.partial(band_attention, q, k, v, W, scale, bmk, bnk, wk, st, sp)
                try:
                    err = float((fn().float() - ref.float()).norm() / ref.float().norm())
                except Exception as exc:  # a configuration that does not fit (shared memory)
                    print(name, "failed:", str(exc)[:200])
                    continue
                if err > 1e-2:
                    print(name, "WRONG", err)
                    continue
                timings[name] = fn
            res = {}
            for _ in range(2):  # two interleaved rounds: the spread is the noise
                for name, fn in timings.items():
                    fn()
                    res.setdefault(name, []).append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
            for name, ts in res.items():
                row = {"n": n, "d": d, "kernel": name, "ms": min(ts), "spread": max(ts) - min(ts),
                       "vs_flex": min(res["flex"]) / min(ts)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| N | D | kernel | ms | vs Flex |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']} | {r['d']} | {r['kernel']} | {r['ms']:.3f} (±{r['spread']:.3f}) | {r['vs_flex']:.2f}× |")


if __name__ == "__main__":
    main()
