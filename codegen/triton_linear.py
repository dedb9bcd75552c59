"""Triton kernels for linear attention in the canonical layout [B·H, N, D] (contiguous rows).

    out_p = φQ_p · S / (φQ_p · z + eps)      S = Σ_m φK_mᵀ V_m,  z = Σ_m φK_m
    causal: the sums run over m ≤ p only.

The feature maps are applied by the graph before the call (they are elementwise); the
kernels take φQ and φK. Work is split in *segments* of the sequence so that a [B·H]
grid still fills the GPU:

1. ``_segment_state``: per (bh, segment), the segment's Σ φKᵀV (fp32 [E, F]) and Σ φK.
2. ``_combine_states``: non-causal, the segment states summed into one state per bh (split-K),
   written once in the compute dtype; causal, turned in place into the exclusive prefix over
   segments (the state entering each segment: a handful per row, never one per position).
3. non-causal ``_noncausal_out``: out = φQ·S ÷ φQ·z; each program loads the state once and
   walks a run of query blocks, the normaliser fused.
   causal ``_causal_out`` (Lightning Attention's order): per (bh, segment, F-tile), walk the
   segment's chunks in order; inside a chunk the masked quadratic form, across chunks the
   running state, so no per-position cumsum of outer products is ever materialised.

Precision: states and normalisers are accumulated in fp32. Products take their operands in
the input dtype on tensor cores (fp32 accumulation), as eager and flash-linear-attention do:
for bf16/fp16 inputs the fp32 state is rounded to the input dtype where it is multiplied by
φQ (eager's bf16 einsum and fla's ``b_h.to(b_q.dtype)`` round it the same way); fp32 inputs
use IEEE fp32 throughout.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_kernel_utils import (
    TUNED,
    dot,
    dot_precisions,
    load_rows,
    pad_dim,
    pow2,
    rows3d,
    segments,
    tuned,
    upcast_dots,
)

CHUNK = 64
COMBINE_ELEMENTS = 4096  # segments × state entries per program of ``_combine_states``


@triton.jit(do_not_specialize=["M", "seg_len", "nseg"])
def _segment_state(K, V, S, Z, M, seg_len, nseg, skb, skm, svb, svm, E: tl.constexpr, F: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr, BLOCK_M: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S[bh, seg, :, F-tile] = Σ_{m in seg} φK_mᵀ V_m (fp32),  Z[bh, seg] = Σ_{m in seg} φK_m."""
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    acc = tl.zeros((BE, BFT), dtype=tl.float32)
    z = tl.zeros((BE,), dtype=tl.float32)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, M)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < end
        k = tl.load(K + bh * skb + rows[:, None] * skm + offs_e[None, :],
                    mask=rmask[:, None] & (offs_e[None, :] < E), other=0.0)
        v = tl.load(V + bh * svb + rows[:, None] * svm + offs_f[None, :],
                    mask=rmask[:, None] & (offs_f[None, :] < F), other=0.0)
        acc += dot(tl.trans(k), v, PREC, UPCAST)
        z += tl.sum(k.to(tl.float32), 0)
    base = bh * nseg + seg
    tl.store(S + base * BE * BF + offs_e[:, None] * BF + offs_f[None, :], acc)
    if ft == 0:
        tl.store(Z + base * BE + offs_e, z)


@triton.jit(do_not_specialize=["nseg", "nfilled"])
def _combine_states(S, Z, S_total, Z_total, nseg, nfilled, BE: tl.constexpr, BF: tl.constexpr, NSEG_P2: tl.constexpr,
                    TILE: tl.constexpr, EXCLUSIVE: tl.constexpr):
    """Over the segments j of one bh, for TILE consecutive state entries (all segments at once; only the
    first ``nfilled`` segments were written, the others count as 0):
    EXCLUSIVE: S[bh, j] ← Σ_{i<j} S[bh, i] and Z likewise, in place (the state entering segment j);
    else:      S_total[bh] = Σ_j S[bh, j] (in S_total's dtype), Z_total[bh] = Σ_j Z[bh, j] (fp32)."""
    bh = tl.program_id(0)
    t = tl.program_id(1)
    segs = bh * nseg + tl.arange(0, NSEG_P2)
    smask = (tl.arange(0, NSEG_P2) < nseg)[:, None]
    filled = (tl.arange(0, NSEG_P2) < nfilled)[:, None]
    offs = t * TILE + tl.arange(0, TILE)
    ptrs = S + segs[:, None] * (BE * BF) + offs[None, :]
    x = tl.load(ptrs, mask=filled, other=0.0)
    if EXCLUSIVE:
        tl.store(ptrs, tl.cumsum(x, 0) - x, mask=smask)
    else:
        tl.store(S_total + bh * BE * BF + offs, tl.sum(x, 0).to(S_total.dtype.element_ty))
    if t == 0:
        offs_e = tl.arange(0, BE)
        zptrs = Z + segs[:, None] * BE + offs_e[None, :]
        z = tl.load(zptrs, mask=filled, other=0.0)
        if EXCLUSIVE:
            tl.store(zptrs, tl.cumsum(z, 0) - z, mask=smask)
        else:
            tl.store(Z_total + bh * BE + offs_e, tl.sum(z, 0))


@triton.jit(do_not_specialize=["N", "run_len", "eps"])
def _noncausal_out(Q, S, Z, Out, N, run_len, eps, sqb, sqn, sob, son, E: tl.constexpr, F: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out_p = φQ_p · S[bh] / (φQ_p · z[bh] + eps) for the rows p of one run of query blocks (the
    state, already in the compute dtype, is loaded once per program)."""
    bh = tl.program_id(0)
    run = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    s = tl.load(S + bh * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    z = tl.load(Z + bh * BE + offs_e)
    start = run * run_len
    end = tl.minimum(start + run_len, N)
    for r0 in range(start, end, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        rmask = rows < end
        q = tl.load(Q + bh * sqb + rows[:, None] * sqn + offs_e[None, :],
                    mask=rmask[:, None] & (offs_e[None, :] < E), other=0.0)
        num = dot(q, s, PREC, UPCAST)
        if NORM:
            den = tl.sum(q.to(tl.float32) * z[None, :], 1) + eps
            num = num / den[:, None]
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], num.to(Out.dtype.element_ty),
                 mask=rmask[:, None] & (offs_f[None, :] < F))


@triton.jit(do_not_specialize=["N", "seg_len", "nseg", "eps"])
def _causal_out(Q, K, V, S0, Z0, Out, N, seg_len, nseg, eps, sqb, sqn, skb, skm, svb, svm, sob, son,
                E: tl.constexpr, F: tl.constexpr, BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr,
                C: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """Per chunk c of the segment (rows P, state S_c = S0[seg] + Σ_{chunks before c} φKᵀV, z_c likewise):
    out_P = (tril(φQ_P φK_Pᵀ) V_P + φQ_P · S_c) / (rowsum tril(φQ_P φK_Pᵀ) + φQ_P · z_c + eps);
    S_c is rounded to the input dtype for the product (kept and accumulated in fp32)."""
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    offs_c = tl.arange(0, C)
    base = bh * nseg + seg
    state = tl.load(S0 + base * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    z = tl.load(Z0 + base * BE + offs_e)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, N)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rmask = rows < end
        fmask = rmask[:, None] & (offs_f[None, :] < F)
        q = load_rows(Q, bh * sqb, rows, sqn, offs_e, rmask, E)
        k = load_rows(K, bh * skb, rows, skm, offs_e, rmask, E)
        v = load_rows(V, bh * svb, rows, svm, offs_f, rmask, F)
        s = dot(q, tl.trans(k), PREC, UPCAST)
        s = tl.where(causal, s, 0.0)
        num = dot(q, state.to(q.dtype), PREC, UPCAST)
        num += dot(s.to(v.dtype), v, PREC, UPCAST)
        if NORM:
            den = tl.sum(s, 1) + tl.sum(q.to(tl.float32) * z[None, :], 1) + eps
            num = num / den[:, None]
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], num.to(Out.dtype.element_ty), mask=fmask)
        state += dot(tl.trans(k), v, PREC, UPCAST)
        z += tl.sum(k.to(tl.float32), 0)


def segment_states(k: torch.Tensor, v: torch.Tensor, nseg: int, seg_len: int, cfg: dict | None = None,
                   filled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (bh, segment): Σ φKᵀV [bh, nseg, BE, BF] and Σ φK [bh, nseg, BE] in fp32 (padded to powers of 2);
    only the first ``filled`` segments (default all) are computed, the others are left unwritten."""
    bh, m, e = k.shape
    f = v.shape[-1]
    be, bf = pad_dim(e), pad_dim(f)
    cfg = {**default_config(e, f, False), **(cfg or {})}
    s = torch.empty(bh, nseg, be, bf, device=k.device, dtype=torch.float32)
    z = torch.empty(bh, nseg, be, device=k.device, dtype=torch.float32)
    prec, _ = dot_precisions(k.dtype)
    bft = min(bf, cfg["state_bft"])
    filled = nseg if filled is None else filled
    if filled == 0:
        return s, z
    _segment_state[(bh, filled, bf // bft)](k, v, s, z, m, seg_len, nseg, k.stride(0), k.stride(1), v.stride(0),
                                          v.stride(1), E=e, F=f, BE=be, BF=bf, BFT=bft, BLOCK_M=cfg["state_block"],
                                          PREC=prec, UPCAST=upcast_dots(k), num_warps=cfg["state_warps"],
                                          num_stages=cfg["state_stages"])
    return s, z


def combine_states(s: torch.Tensor, z: torch.Tensor, exclusive: bool, dtype: torch.dtype = torch.float32,
                   filled: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Segment states [bh, nseg, BE, BF] (the first ``filled`` written, the rest taken as 0) → the exclusive
    prefix over segments (in place, returns s, z) or the total per bh ([bh, BE, BF] in ``dtype``, [bh, BE] fp32)."""
    bh, nseg, be, bf = s.shape
    s_total = s if exclusive else torch.empty(bh, be, bf, device=s.device, dtype=dtype)
    z_total = z if exclusive else torch.empty(bh, be, device=s.device, dtype=torch.float32)
    nseg_p2 = max(2, pow2(nseg))
    tile = min(be * bf, max(64, COMBINE_ELEMENTS // nseg_p2))
    filled = nseg if filled is None else filled
    _combine_states[(bh, be * bf // tile)](s, z, s_total, z_total, nseg, filled, BE=be, BF=bf, NSEG_P2=nseg_p2,
                                           TILE=tile, EXCLUSIVE=exclusive, num_warps=4)
    return s_total, z_total


def default_config(e: int, f: int, causal: bool) -> dict:
    big = max(e, f) > 64
    return {"state_block": 64, "state_bft": 128, "state_warps": 8 if big else 4, "state_stages": 3, "target": 528,
            "out_block": 64, "out_bft": 128, "out_warps": 8 if big else 4, "out_stages": 3, "out_target": 528,
            "chunk": CHUNK, "causal_bft": 64, "causal_warps": 8 if big else 4, "causal_stages": 2,
            "causal_target": 264}


def _effective(cfg: dict, e: int, f: int, causal: bool) -> tuple:
    """The launch parameters a configuration really changes (block widths clipped to the padded dims)."""
    bf = pad_dim(f)
    keys = (("chunk", "causal_bft", "causal_warps", "causal_stages", "causal_target") if causal else
            ("out_block", "out_bft", "out_warps", "out_stages", "out_target", "target"))
    keys += ("state_block", "state_bft", "state_warps", "state_stages")
    return tuple(min(bf, cfg[k]) if k.endswith("bft") else cfg[k] for k in keys)


def candidate_configs(e: int, f: int, causal: bool) -> list[dict]:
    """The launch configurations timed once per shape on a GPU (``tuned``); duplicates (a block width
    clipped to the head dim) are dropped. The list keeps the configurations that won, or came within noise,
    at some (D, N) of the H100 sweep (benchmarks/results/linear_NVIDIA_H100_80GB_HBM3_2026-11-28.md):
    causal D=64 favours 64-wide F tiles, 4 warps; D=128 a 128-wide F tile (q·kᵀ computed once per chunk)."""
    base = default_config(e, f, causal)
    if causal:
        variants = [{}, {"causal_stages": 3, "causal_target": 528},
                    {"causal_bft": 128, "causal_warps": 4, "causal_target": 528},
                    {"causal_bft": 128, "causal_warps": 8, "causal_stages": 3, "causal_target": 528}]
    else:
        variants = [{}, {"out_block": 128, "out_warps": 8}, {"out_target": 1056}, {"target": 1056},
                    {"state_block": 128, "state_warps": 8}]
    seen, out = set(), []
    for v in variants:
        cfg = {**base, **v}
        key = _effective(cfg, e, f, causal)
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def linear_attention_triton(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            normalize: bool = True, eps: float = 0.0, cfg: dict | None = None) -> torch.Tensor:
    """Linear attention of feature-mapped queries and keys, [..., N, E] × [..., M, E] × [..., M, F].
    On a GPU the launch configuration is picked per shape among a few candidates (timed once)."""
    lead = fq.shape[:-2]
    n, e = fq.shape[-2:]
    m, f = v.shape[-2:]
    dt = torch.promote_types(torch.promote_types(fq.dtype, fk.dtype), v.dtype)
    q3, k3, v3 = rows3d(fq.to(dt)), rows3d(fk.to(dt)), rows3d(v.to(dt))
    if causal and n != m:
        raise ValueError("causal linear attention needs as many queries as keys")
    if cfg is None and q3.is_cuda:
        key = ("linear", causal, normalize, q3.shape[0], n, m, e, f, dt)
        # fp32 (IEEE products, not a speed path): the default configuration, nothing compiled or timed besides
        cfg = TUNED.get(key) or tuned(key, candidate_configs(e, f, causal) if dt != torch.float32 else
                                        [default_config(e, f, causal)],
                                        lambda c: _launch(q3, k3, v3, causal, normalize, eps, c))
    out = _launch(q3, k3, v3, causal, normalize, eps, cfg or {})
    return out.reshape(*lead, n, f)


def _launch(q3, k3, v3, causal: bool, normalize: bool, eps: float, cfg: dict) -> torch.Tensor:
    bh, n, e = q3.shape
    m, f = v3.shape[-2:]
    dt = q3.dtype
    cfg = {**default_config(e, f, causal), **cfg}
    out = torch.empty(bh, n, f, device=q3.device, dtype=dt)
    be, bf = pad_dim(e), pad_dim(f)
    _, prec = dot_precisions(dt)
    upcast = upcast_dots(q3)
    if not causal:
        nseg, seg_len = segments(bh, m, cfg["state_block"], cfg["target"])
        s, z = combine_states(*segment_states(k3, v3, nseg, seg_len, cfg), exclusive=False, dtype=dt)
        block_n, bft = cfg["out_block"], min(bf, cfg["out_bft"])
        nrun, run_len = segments(bh, n, block_n, cfg["out_target"])
        _noncausal_out[(bh, nrun, bf // bft)](
            q3, s, z, out, n, run_len, float(eps), q3.stride(0), q3.stride(1), out.stride(0), out.stride(1),
            E=e, F=f, BE=be, BF=bf, BFT=bft, BLOCK_N=block_n, NORM=normalize, PREC=prec, UPCAST=upcast,
            num_warps=cfg["out_warps"], num_stages=cfg["out_stages"])
        return out
    chunk = cfg["chunk"]
    nseg, seg_len = segments(bh, n, chunk, cfg["causal_target"])
    # the last segment's own state enters no output: not computed
    s0, z0 = combine_states(*segment_states(k3, v3, nseg, seg_len, cfg, filled=nseg - 1), exclusive=True,
                            filled=nseg - 1)
    bft = min(bf, cfg["causal_bft"])
    _causal_out[(bh, nseg, bf // bft)](
        q3, k3, v3, s0, z0, out, n, seg_len, nseg, float(eps), q3.stride(0), q3.stride(1), k3.stride(0),
        k3.stride(1), v3.stride(0), v3.stride(1), out.stride(0), out.stride(1),
        E=e, F=f, BE=be, BF=bf, BFT=bft, C=chunk, NORM=normalize, PREC=prec, UPCAST=upcast,
        num_warps=cfg["causal_warps"], num_stages=cfg["causal_stages"])
    return out
