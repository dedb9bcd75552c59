"""Triton Flow-Attention (Flowformer), canonical layout [B·H, L, D].

Non-causal: the cascade (``Cascade.flow_attention``) needs 4 passes over the sequence
(each pass needs a sum over the *whole* previous one), and these are the 4 kernels, each
one read of its operands, with every elementwise step fused into them:

1. ``_flow_sums``:   Σ_p φQ, Σ_m φK                                       (reads q, k)
2. ``_flow_cons``:   I_p, O_m and Σ_p φQ/I, Σ_m φK/O                        (reads q, k)
3. ``_flow_kv``:     Ô_m (clamped), online softmax over m, Σ_m φK ⊗ V·e^{Ô−max}  (reads k, v)
4. ``_flow_out``:    out_p = (φQ_p/I_p)·KV̂ · M/Σe · sigmoid(Î_p·N/M)       (reads q, writes out)

Each pass is split in (bh, segment) programs; the per-segment partial sums (vectors, and
one [E, F] state per segment) are combined in fp32 between kernels. φ = sigmoid is applied
in-kernel, so q and k are never written back.

Causal: every step is a prefix sum; the vector prefix sums (O(N·D)) run in PyTorch and the
[D, D] state recurrence runs in the chunked causal linear-attention kernel of
codegen/triton_linear.py (no [N, D, D] cumsum).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_linear import _dot, _precisions, _rows, _segments, _tuned, _upcast, linear_attention_triton

PASSES_NONCAUSAL = 4


@triton.jit
def _load_sig(X, bh, sxb, sxn, rows, offs, rmask, D: tl.constexpr):
    m = rmask[:, None] & (offs[None, :] < D)
    x = tl.load(X + bh * sxb + rows[:, None] * sxn + offs[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, tl.sigmoid(x), 0.0), m


@triton.jit
def _flow_sums(Q, K, SQ, SK, N, M, seg_q, seg_k, sqb, sqn, skb, skm, E: tl.constexpr, BE: tl.constexpr,
               BLOCK: tl.constexpr, NSEG: tl.constexpr):
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    aq = tl.zeros((BE,), dtype=tl.float32)
    ak = tl.zeros((BE,), dtype=tl.float32)
    for r0 in range(seg * seg_q, tl.minimum(seg * seg_q + seg_q, N), BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        q, _ = _load_sig(Q, bh, sqb, sqn, rows, offs, rows < tl.minimum(seg * seg_q + seg_q, N), E)
        aq += tl.sum(q, 0)
    for r0 in range(seg * seg_k, tl.minimum(seg * seg_k + seg_k, M), BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        k, _ = _load_sig(K, bh, skb, skm, rows, offs, rows < tl.minimum(seg * seg_k + seg_k, M), E)
        ak += tl.sum(k, 0)
    tl.store(SQ + (bh * NSEG + seg) * BE + offs, aq)
    tl.store(SK + (bh * NSEG + seg) * BE + offs, ak)


@triton.jit
def _flow_cons(Q, K, SQ, SK, SQI, SKO, N, M, seg_q, seg_k, eps, sqb, sqn, skb, skm, E: tl.constexpr,
               BE: tl.constexpr, BLOCK: tl.constexpr, NSEG: tl.constexpr):
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    emask = offs < E
    sq = tl.load(SQ + bh * BE + offs)
    sk = tl.load(SK + bh * BE + offs)
    aq = tl.zeros((BE,), dtype=tl.float32)
    ak = tl.zeros((BE,), dtype=tl.float32)
    for r0 in range(seg * seg_q, tl.minimum(seg * seg_q + seg_q, N), BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        q, m = _load_sig(Q, bh, sqb, sqn, rows, offs, rows < tl.minimum(seg * seg_q + seg_q, N), E)
        inc = 1.0 / tl.sum(tl.where(m, (q + eps) * (sk + eps)[None, :], 0.0), 1)  # sink_incoming 1/I
        aq += tl.sum(tl.where(m, q * inc[:, None], 0.0), 0)
    for r0 in range(seg * seg_k, tl.minimum(seg * seg_k + seg_k, M), BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        k, m = _load_sig(K, bh, skb, skm, rows, offs, rows < tl.minimum(seg * seg_k + seg_k, M), E)
        out = 1.0 / tl.sum(tl.where(m, (k + eps) * (sq + eps)[None, :], 0.0), 1)  # source_outgoing 1/O
        ak += tl.sum(tl.where(m, k * out[:, None], 0.0), 0)
    tl.store(SQI + (bh * NSEG + seg) * BE + offs, tl.where(emask, aq, 0.0))
    tl.store(SKO + (bh * NSEG + seg) * BE + offs, tl.where(emask, ak, 0.0))


@triton.jit
def _flow_kv(K, V, SQI, KV, MX, SE, M, seg_k, eps, skb, skm, svb, svm, E: tl.constexpr, F: tl.constexpr,
             BE: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr, NSEG: tl.constexpr, CLAMP: tl.constexpr,
             PREC: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    offs_f = tl.arange(0, BF)
    sqi = tl.load(SQI + bh * BE + offs)
    acc = tl.zeros((BE, BF), dtype=tl.float32)
    run_max = tl.full((1,), float("-inf"), tl.float32)
    run_sum = tl.zeros((1,), dtype=tl.float32)
    end = tl.minimum(seg * seg_k + seg_k, M)
    for r0 in range(seg * seg_k, end, BLOCK):
        rows = r0 + tl.arange(0, BLOCK)
        rmask = rows < end
        k, m = _load_sig(K, bh, skb, skm, rows, offs, rmask, E)
        v = tl.load(V + bh * svb + rows[:, None] * svm + offs_f[None, :],
                    mask=rmask[:, None] & (offs_f[None, :] < F), other=0.0)
        src = tl.sum(tl.where(m, (k + eps) * (sqi + eps)[None, :], 0.0), 1)  # conserved source Ô
        if CLAMP:
            src = tl.minimum(tl.maximum(src, -1.0), 1.0)
        src = tl.where(rmask, src, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(src, 0))
        alpha = tl.exp(run_max - new_max)
        w = tl.exp(src - new_max)  # [BLOCK]
        run_sum = run_sum * alpha + tl.sum(w, 0)
        vw = (v.to(tl.float32) * w[:, None]).to(v.dtype)
        acc = acc * alpha[:, None] + _dot(tl.trans(k.to(v.dtype)), vw, PREC, UPCAST)
        run_max = new_max
    base = bh * NSEG + seg
    tl.store(KV + base * BE * BF + offs[:, None] * BF + offs_f[None, :], acc)
    tl.store(MX + base + tl.arange(0, 1), run_max)
    tl.store(SE + base + tl.arange(0, 1), run_sum)


@triton.jit
def _flow_out(Q, SK, SKO, KV, Out, N, eps, ratio, sqb, sqn, sob, son, E: tl.constexpr, F: tl.constexpr,
              BE: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr, PREC: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    offs = tl.arange(0, BE)
    offs_f = tl.arange(0, BF)
    rmask = rows < N
    q, m = _load_sig(Q, bh, sqb, sqn, rows, offs, rmask, E)
    sk = tl.load(SK + bh * BE + offs)
    sko = tl.load(SKO + bh * BE + offs)
    inc = 1.0 / tl.sum(tl.where(m, (q + eps) * (sk + eps)[None, :], 0.0), 1)
    sink = tl.sum(tl.where(m, (q + eps) * (sko + eps)[None, :], 0.0), 1)  # conserved sink Î
    alloc = tl.sigmoid(sink * ratio)
    kv = tl.load(KV + bh * BE * BF + offs[:, None] * BF + offs_f[None, :])  # already × M/Σe
    out = tl.dot(q * inc[:, None], kv, input_precision=PREC) * alloc[:, None]
    tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], out.to(Out.dtype.element_ty),
             mask=rmask[:, None] & (offs_f[None, :] < F))


def flow_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                          clamp: bool = True, eps: float = 1e-6, cfg: dict | None = None) -> torch.Tensor:
    """Flow-Attention of raw q [..., N, E], k [..., M, E], v [..., M, F] (sigmoid applied here)."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    if causal:
        from .linear_ops import flow_torch

        def linear(fq, fk, fv, causal, normalize, eps):  # the state recurrence in the inputs' dtype, as eager
            return linear_attention_triton(fq.to(dt), fk.to(dt), fv.to(dt), causal, normalize, eps)

        return flow_torch(q.to(dt), k.to(dt), v.to(dt), True, clamp, eps, linear=linear)
    lead = q.shape[:-2]
    n, e = q.shape[-2:]
    m, f = v.shape[-2:]
    q3, k3, v3 = _rows(q.to(dt)), _rows(k.to(dt)), _rows(v.to(dt))
    if cfg is None and q3.is_cuda:
        big = max(e, f) > 64
        cands = [{"block": 64 if big else 128, "warps": 8 if big else 4, "target": 1056},
                 {"block": 64, "warps": 4, "target": 1056}, {"block": 128, "warps": 8, "target": 2112},
                 {"block": 64 if big else 128, "warps": 8 if big else 4, "target": 528}]
        cfg = _tuned(("flow", clamp, q3.shape[0], n, m, e, f, dt), cands,
                     lambda c: _flow_launch(q3, k3, v3, clamp, eps, c))
    return _flow_launch(q3, k3, v3, clamp, eps, cfg or {}).reshape(*lead, n, f)


def _flow_launch(q3, k3, v3, clamp: bool, eps: float, cfg: dict) -> torch.Tensor:
    bh, n, e = q3.shape
    m, f = v3.shape[-2:]
    dt = q3.dtype
    be, bf = max(16, triton.next_power_of_2(e)), max(16, triton.next_power_of_2(f))
    prec, _ = _precisions(dt)
    block = cfg.get("block", 128 if max(be, bf) <= 64 else 64)
    warps = cfg.get("warps", 4 if max(be, bf) <= 64 else 8)
    nseg, seg_k = _segments(bh, m, block, target=cfg.get("target", 1056))
    seg_q = triton.cdiv(triton.cdiv(n, block), nseg) * block
    dev = q3.device

    def vec():
        return torch.empty(bh, nseg, be, device=dev, dtype=torch.float32)

    sq, sk = vec(), vec()
    _flow_sums[(bh, nseg)](q3, k3, sq, sk, n, m, seg_q, seg_k, q3.stride(0), q3.stride(1), k3.stride(0),
                           k3.stride(1), E=e, BE=be, BLOCK=block, NSEG=nseg, num_warps=warps)
    sq, sk = sq.sum(1).contiguous(), sk.sum(1).contiguous()
    sqi, sko = vec(), vec()
    _flow_cons[(bh, nseg)](q3, k3, sq, sk, sqi, sko, n, m, seg_q, seg_k, float(eps), q3.stride(0), q3.stride(1),
                           k3.stride(0), k3.stride(1), E=e, BE=be, BLOCK=block, NSEG=nseg, num_warps=warps)
    sqi, sko = sqi.sum(1).contiguous(), sko.sum(1).contiguous()
    kv = torch.empty(bh, nseg, be, bf, device=dev, dtype=torch.float32)
    mx = torch.empty(bh, nseg, device=dev, dtype=torch.float32)
    se = torch.empty(bh, nseg, device=dev, dtype=torch.float32)
    _flow_kv[(bh, nseg)](k3, v3, sqi, kv, mx, se, m, seg_k, float(eps), k3.stride(0), k3.stride(1),
                         v3.stride(0), v3.stride(1), E=e, F=f, BE=be, BF=bf, BLOCK=block, NSEG=nseg,
                         CLAMP=clamp, PREC=prec, UPCAST=_upcast(k3), num_warps=warps)
    # Combine the segments' online softmaxes; fold the competition's × M / Σ e^{Ô−max} into the state.
    gmax = mx.max(1, keepdim=True).values
    scale = torch.exp(mx - gmax)
    total = (se * scale).sum(1)
    kv = (kv * scale[..., None, None]).sum(1) * (float(m) / total)[:, None, None]
    out = torch.empty(bh, n, f, device=dev, dtype=dt)
    _flow_out[(bh, triton.cdiv(n, block))](q3, sk, sko, kv.contiguous(), out, n, float(eps), float(n) / float(m),
                                           q3.stride(0), q3.stride(1), out.stride(0), out.stride(1),
                                           E=e, F=f, BE=be, BF=bf, BLOCK=block, PREC=prec, num_warps=warps)
    return out
