"""Triton Flow-Attention (Flowformer), canonical layout [B·H, L, D].

φ = sigmoid, applied in-kernel (q and k are never written back). Notation: n queries (sinks),
m keys (sources), Sx = Σ over the sequence.

Non-causal: 4 dependent passes over the sequence (``PASSES_NONCAUSAL``), 6 tensor reads/writes
(k; q; k and v; q and out), each pass split in (bh, segment) programs:

1. ``_flow_sum_k``:   per segment Σ_m φK_m                                     (reads k)
                      (and zeroes the fp32 accumulators the next passes add into)
2. ``_flow_sum_q``:   SK = Σ of the segments' partials (in-kernel), I_p = (φQ_p+ε)·(SK+ε),
                      SQ = Σ_p φQ_p, SQI = Σ_p φQ_p / I_p                      (reads q)
3. ``_flow_state``:   O_m = (φK_m+ε)·(SQ+ε), SKO = Σ_m φK_m / O_m,
                      Ô_m = (φK_m+ε)·(SQI+ε) (clamped to [−1, 1] if clamp),
                      KV = Σ_m φK_m ⊗ V_m e^{Ô_m}, SE = Σ_m e^{Ô_m}            (reads k, v)
4. ``_flow_out``:     Î_p = (φQ_p+ε)·(SKO+ε),
                      out_p = (φQ_p / I_p)·KV · m/SE · sigmoid(Î_p · n/m)       (reads q, writes out)

The segments' vector and state sums of passes 2 and 3 are fp32 atomic adds into one workspace
(no PyTorch glue between the kernels). Softmax without a running max: Ô > 0 always (φK+ε > 0,
SQI+ε > 0), and with the official clamp Ô ≤ 1, so e^{Ô} ∈ (1, e] and the segments' sums are
simply additive. Without the clamp e^{Ô} may overflow: each segment keeps an online max and
writes its partial (max, Σe, state); ``_flow_softmax_combine`` (one extra small launch, not a
pass over the sequence) rescales and adds them, as torch.softmax would.

Causal (``_flow_causal``): ONE kernel per (bh, F-tile) walks the sequence in chunks of C rows.
Every sum of the official code is a prefix sum (positions l ≤ p, ``normal_p = p + 1``):

    CQ_p = Σ φQ, CK_p = Σ φK;  1/I_p = 1/((φQ_p+ε)·(CK_p+ε)),  1/O_p = 1/((φK_p+ε)·(CQ_p+ε))
    sink_p = (φQ_p+ε)·(Σ φK_l·normal_l/O_l + ε) / normal_p,  src_p = (φK_p+ε)·(Σ φQ_l·normal_l/I_l + ε) / normal_p
    (src clamped to [−1, 1] if clamp), comp_p = e^{src_p} / Σ_{l≤p} e^{src_l} · normal_p
    out_p = sigmoid(sink_p) · (φQ_p/I_p) · Σ_{l≤p} φK_l ⊗ V_l comp_l

Inside a chunk the vector prefix sums are tl.cumsum plus the carry from the previous chunks,
and the state part is Lightning-style: the masked C×C quadratic form inside the chunk, the
running [E, F] state across chunks. Like the official fp32 code, e^{src} is not shifted: where
it overflows (unclamped src > 88.7), eager's comp is inf/inf = NaN there and the NaN reaches
every later position through its cumsum; the kernel counts non-finite e^{src} in a prefix
count and returns NaN rows from the first overflow on (the same rows eager makes NaN).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .linear_kernel_utils import cdiv, dot, dot_precisions, pow2, rows3d, segments, tuned, upcast_dots

PASSES_NONCAUSAL = 4  # passes over the sequence of the non-causal kernels (k; q; k+v; q+out)
_ACCS = 5  # [BE] vectors in the workspace after the pass-1 partials: SK, SQ, SQI, SKO, SE (SE uses 1 slot)


@triton.jit
def _load_sig(X, bh, sxb, sxn, rows, offs, rmask, D: tl.constexpr):
    """φ(x) = sigmoid(x) of a [rows, D] tile in fp32, 0 outside (rows < end, cols < D)."""
    m = rmask[:, None] & (offs[None, :] < D)
    x = tl.load(X + bh * sxb + rows[:, None] * sxn + offs[None, :], mask=m, other=0.0).to(tl.float32)
    return tl.where(m, tl.sigmoid(x), 0.0), m


@triton.jit
def _rowdot_eps(x, vec, m, eps):
    """Σ_d (x_d + ε)·(vec_d + ε) per row, over the valid entries m."""
    return tl.sum(tl.where(m, (x + eps) * (vec + eps)[None, :], 0.0), 1)


@triton.jit
def _rowdot_prefix(x, carry, y, m, eps):
    """Σ_d (x_pd + ε)·(carry_d + Σ_{l≤p in the chunk} y_ld + ε) per row p: a dot with an inclusive prefix sum."""
    return tl.sum(tl.where(m, (x + eps) * (carry[None, :] + tl.cumsum(y, 0) + eps), 0.0), 1)


@triton.jit
def _flow_sum_k(K, WS, M, seg_k, wsb, skb, skm, E: tl.constexpr, BE: tl.constexpr, BLOCK: tl.constexpr,
                nseg, ZERO: tl.constexpr, STAGES: tl.constexpr):
    # pass 1: WS[bh, seg, :] = Σ_{m in seg} φK_m ; program seg 0 zeroes the ZERO accumulators behind the partials
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    # Column sums accumulate elementwise in a [BLOCK, BE] tile and are reduced across rows once
    # after the loop: a reduction over rows per iteration costs shared-memory round trips and barriers.
    acc = tl.zeros((BLOCK, BE), dtype=tl.float32)
    end = tl.minimum(seg * seg_k + seg_k, M)
    for r0 in tl.range(seg * seg_k, end, BLOCK, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK)
        k, _ = _load_sig(K, bh, skb, skm, rows, offs, rows < end, E)
        acc += k
    tl.store(WS + bh * wsb + seg * BE + offs, tl.sum(acc, 0))
    if seg == 0:
        zb = tl.arange(0, 1024)
        for z0 in range(0, ZERO, 1024):
            tl.store(WS + bh * wsb + nseg * BE + z0 + zb, tl.zeros((1024,), tl.float32), mask=z0 + zb < ZERO)


@triton.jit
def _flow_sum_q(Q, WS, N, seg_q, eps, wsb, sqb, sqn, E: tl.constexpr, BE: tl.constexpr, BLOCK: tl.constexpr,
                nseg, NSEG_POW2: tl.constexpr, STAGES: tl.constexpr):
    # pass 2: SK = Σ_seg partials; SQ += Σ φQ_p, SQI += Σ φQ_p / ((φQ_p+ε)·(SK+ε))   (atomics over segments)
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    emask = offs < E
    ws = WS + bh * wsb
    segs = tl.arange(0, NSEG_POW2)
    sk = tl.sum(tl.load(ws + segs[:, None] * BE + offs[None, :], mask=(segs < nseg)[:, None], other=0.0), 0)
    acc = ws + nseg * BE  # SK, SQ, SQI, SKO, SE, KV
    if seg == 0:
        tl.store(acc + offs, sk)
    aq = tl.zeros((BLOCK, BE), dtype=tl.float32)  # column sums reduced after the loop (see pass 1)
    aqi = tl.zeros((BLOCK, BE), dtype=tl.float32)
    end = tl.minimum(seg * seg_q + seg_q, N)
    for r0 in tl.range(seg * seg_q, end, BLOCK, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK)
        q, m = _load_sig(Q, bh, sqb, sqn, rows, offs, rows < end, E)
        inc = 1.0 / _rowdot_eps(q, sk, m, eps)  # 1 / I_p
        aq += q
        aqi += tl.where(m, q * inc[:, None], 0.0)
    tl.atomic_add(acc + BE + offs, tl.sum(aq, 0), mask=emask, sem="relaxed")
    tl.atomic_add(acc + 2 * BE + offs, tl.sum(aqi, 0), mask=emask, sem="relaxed")


@triton.jit
def _flow_state(K, V, WS, KVP, M, seg_k, eps, wsb, skb, skm, svb, svm, E: tl.constexpr, F: tl.constexpr,
                BE: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr, nseg, CLAMP: tl.constexpr,
                ATOMIC: tl.constexpr, STAGES: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # pass 3: SKO += Σ φK_m / ((φK_m+ε)·(SQ+ε)); Ô_m = (φK_m+ε)·(SQI+ε) (clamped);
    #         KV += Σ φK_m ⊗ V_m e^{Ô_m}, SE += Σ e^{Ô_m}   (ATOMIC, needs CLAMP: atomics; else per-segment
    #         partials with an online max, added by _flow_softmax_combine)
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    offs_f = tl.arange(0, BF)
    acc = WS + bh * wsb + nseg * BE
    sq = tl.load(acc + BE + offs)
    sqi = tl.load(acc + 2 * BE + offs)
    ako = tl.zeros((BLOCK, BE), dtype=tl.float32)  # column sums reduced after the loop (see pass 1)
    state = tl.zeros((BE, BF), dtype=tl.float32)
    run_max = tl.full((1,), float("-inf"), tl.float32)
    run_sum = tl.zeros((1,), dtype=tl.float32)
    w_rows = tl.zeros((BLOCK,), dtype=tl.float32)  # ATOMIC: Σe per row slot, reduced after the loop
    end = tl.minimum(seg * seg_k + seg_k, M)
    for r0 in tl.range(seg * seg_k, end, BLOCK, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK)
        rmask = rows < end
        k, m = _load_sig(K, bh, skb, skm, rows, offs, rmask, E)
        v = tl.load(V + bh * svb + rows[:, None] * svm + offs_f[None, :],
                    mask=rmask[:, None] & (offs_f[None, :] < F), other=0.0)
        outg = 1.0 / _rowdot_eps(k, sq, m, eps)  # 1 / O_m
        ako += tl.where(m, k * outg[:, None], 0.0)
        src = _rowdot_eps(k, sqi, m, eps)  # conserved source Ô_m
        if CLAMP:
            src = tl.minimum(tl.maximum(src, -1.0), 1.0)
        if ATOMIC:
            w = tl.where(rmask, tl.exp(src), 0.0)
            w_rows += w
        else:
            src = tl.where(rmask, src, float("-inf"))
            new_max = tl.maximum(run_max, tl.max(src, 0))
            alpha = tl.exp(run_max - new_max)
            w = tl.exp(src - new_max)
            run_sum = run_sum * alpha + tl.sum(w, 0)
            state = state * alpha[:, None]
            run_max = new_max
        vw = (v.to(tl.float32) * w[:, None]).to(v.dtype)
        state += dot(tl.trans(k.to(v.dtype)), vw, PREC, UPCAST)
    kv_offs = offs[:, None] * BF + offs_f[None, :]
    tl.atomic_add(acc + 3 * BE + offs, tl.sum(ako, 0), mask=offs < E, sem="relaxed")
    if ATOMIC:
        tl.atomic_add(acc + 4 * BE + tl.arange(0, 1), run_sum + tl.sum(w_rows, 0), sem="relaxed")
        tl.atomic_add(acc + 5 * BE + kv_offs, state, sem="relaxed")
    else:  # partial (state, max, Σe) of this segment, combined by _flow_softmax_combine
        base = KVP + (bh * nseg + seg) * (BE * BF + 2)
        tl.store(base + kv_offs, state)
        tl.store(base + BE * BF + tl.arange(0, 1), run_max)
        tl.store(base + BE * BF + 1 + tl.arange(0, 1), run_sum)


@triton.jit
def _flow_softmax_combine(WS, KVP, wsb, BE: tl.constexpr, BF: tl.constexpr, nseg, NSEG_POW2: tl.constexpr,
                          ROWS: tl.constexpr):
    # g = max over segments of their max; SE = Σ_s Σe_s e^{max_s − g}; KV = Σ_s state_s e^{max_s − g}
    # one program per (bh, ROWS rows of the state)
    bh = tl.program_id(0)
    tile = tl.program_id(1)
    segs = tl.arange(0, NSEG_POW2)
    rec = BE * BF + 2
    part = KVP + bh * nseg * rec
    mx = tl.load(part + segs * rec + BE * BF, mask=segs < nseg, other=float("-inf"))
    se = tl.load(part + segs * rec + BE * BF + 1, mask=segs < nseg, other=0.0)
    g = tl.max(mx, 0)
    acc = WS + bh * wsb + nseg * BE
    if tile == 0:
        tl.store(acc + 4 * BE, tl.sum(se * tl.exp(mx - g), 0))
    kv_offs = (tile * ROWS + tl.arange(0, ROWS))[:, None] * BF + tl.arange(0, BF)[None, :]
    state = tl.zeros((ROWS, BF), dtype=tl.float32)
    for s in range(nseg):
        scale = tl.exp(tl.load(part + s * rec + BE * BF) - g)
        state += tl.load(part + s * rec + kv_offs) * scale
    tl.store(acc + 5 * BE + kv_offs, state)


@triton.jit
def _flow_out(Q, WS, Out, N, seg_q, eps, ratio, m_keys, wsb, sqb, sqn, sob, son, E: tl.constexpr, F: tl.constexpr,
              BE: tl.constexpr, BF: tl.constexpr, BLOCK: tl.constexpr, nseg, STAGES: tl.constexpr,
              LOW: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # pass 4: out_p = (φQ_p / ((φQ_p+ε)·(SK+ε)))·KV · m/SE · sigmoid((φQ_p+ε)·(SKO+ε) · n/m)
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs = tl.arange(0, BE)
    offs_f = tl.arange(0, BF)
    acc = WS + bh * wsb + nseg * BE
    sk = tl.load(acc + offs)
    sko = tl.load(acc + 3 * BE + offs)
    kv = tl.load(acc + 5 * BE + offs[:, None] * BF + offs_f[None, :]) * (m_keys / tl.load(acc + 4 * BE))
    if LOW:  # half-precision inputs: the product in their dtype on tensor cores (as eager's einsum)
        kv = kv.to(Q.dtype.element_ty)
    end = tl.minimum(seg * seg_q + seg_q, N)
    for r0 in tl.range(seg * seg_q, end, BLOCK, num_stages=STAGES):
        rows = r0 + tl.arange(0, BLOCK)
        rmask = rows < end
        q, m = _load_sig(Q, bh, sqb, sqn, rows, offs, rmask, E)
        inc = 1.0 / _rowdot_eps(q, sk, m, eps)
        alloc = tl.sigmoid(_rowdot_eps(q, sko, m, eps) * ratio)  # sigmoid(Î_p · n/m)
        a = q * inc[:, None]
        if LOW:
            a = a.to(Q.dtype.element_ty)
        out = dot(a, kv, PREC, UPCAST) * alloc[:, None]
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], out.to(Out.dtype.element_ty),
                 mask=rmask[:, None] & (offs_f[None, :] < F))


@triton.jit
def _flow_causal(Q, K, V, Out, N, eps, sqb, sqn, skb, skn, svb, svn, sob, son, E: tl.constexpr, F: tl.constexpr,
                 BE: tl.constexpr, BFT: tl.constexpr, C: tl.constexpr, CLAMP: tl.constexpr, STAGES: tl.constexpr,
                 PREC: tl.constexpr, UPCAST: tl.constexpr):
    # causal Flow-Attention, one program per (bh, F-tile): prefix sums of the module docstring, chunk by chunk
    bh = tl.program_id(0)
    offs_e = tl.arange(0, BE)
    offs_f = tl.program_id(1) * BFT + tl.arange(0, BFT)
    offs_c = tl.arange(0, C)
    lower = offs_c[:, None] >= offs_c[None, :]
    cq = tl.zeros((BE,), dtype=tl.float32)  # carries: Σ φQ, Σ φK, Σ φQ·normal/I, Σ φK·normal/O over earlier chunks
    ck = tl.zeros((BE,), dtype=tl.float32)
    cqi = tl.zeros((BE,), dtype=tl.float32)
    cko = tl.zeros((BE,), dtype=tl.float32)
    esum = tl.zeros((1,), dtype=tl.float32)  # Σ e^{src}
    bad = tl.zeros((1,), dtype=tl.int32)  # how many e^{src} overflowed so far
    state = tl.zeros((BE, BFT), dtype=tl.float32)  # Σ φK ⊗ V·comp
    for c0 in tl.range(0, N, C, num_stages=STAGES):
        rows = c0 + offs_c
        rmask = rows < N
        q, m = _load_sig(Q, bh, sqb, sqn, rows, offs_e, rmask, E)
        k, _ = _load_sig(K, bh, skb, skn, rows, offs_e, rmask, E)
        v = tl.load(V + bh * svb + rows[:, None] * svn + offs_f[None, :],
                    mask=rmask[:, None] & (offs_f[None, :] < F), other=0.0)
        normal = (rows + 1).to(tl.float32)
        inc = tl.where(rmask, 1.0 / _rowdot_prefix(q, ck, k, m, eps), 0.0)  # 1/I_p
        outg = tl.where(rmask, 1.0 / _rowdot_prefix(k, cq, q, m, eps), 0.0)  # 1/O_p
        qi = q * (inc * normal)[:, None]
        ko = k * (outg * normal)[:, None]
        sink = _rowdot_prefix(q, cko, ko, m, eps) / normal
        src = _rowdot_prefix(k, cqi, qi, m, eps) / normal
        if CLAMP:
            src = tl.minimum(tl.maximum(src, -1.0), 1.0)
        e = tl.where(rmask, tl.exp(src), 0.0)
        over = (e == float("inf")).to(tl.int32)
        nan_row = (bad + tl.cumsum(over, 0)) > 0  # eager: NaN from the first overflow on
        comp = e / (esum + tl.cumsum(e, 0)) * normal
        w = tl.where(nan_row[:, None], 0.0, v.to(tl.float32) * comp[:, None]).to(v.dtype)
        a = q * inc[:, None]
        kl = k.to(v.dtype)
        scores = tl.where(lower, dot(a.to(v.dtype), tl.trans(kl), PREC, UPCAST), 0.0)
        x = dot(scores.to(v.dtype), w, PREC, UPCAST) + dot(a, state, PREC, UPCAST)
        x = tl.where(nan_row[:, None], float("nan"), x * tl.sigmoid(sink)[:, None])
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], x.to(Out.dtype.element_ty),
                 mask=rmask[:, None] & (offs_f[None, :] < F))
        state += dot(tl.trans(kl), w, PREC, UPCAST)
        cq += tl.sum(q, 0)
        ck += tl.sum(k, 0)
        cqi += tl.sum(qi, 0)
        cko += tl.sum(ko, 0)
        esum += tl.sum(e, 0)
        bad += tl.sum(over, 0)


def noncausal_candidates(e: int, f: int) -> list[dict]:
    big = max(e, f) > 64
    base = {"block": 64 if big else 128, "warps": 8 if big else 4, "target": 1056, "stages": 1}
    return [base, {**base, "stages": 2}, {**base, "target": 528}, {**base, "atomic": False},
            {**base, "block": 128 if big else 256, "warps": 8, "target": 528, "stages": 2},
            {**base, "target": 2112}, {**base, "block": 64, "warps": 4, "stages": 3}]


def causal_candidates(e: int, f: int) -> list[dict]:
    big = max(e, f) > 64
    base = {"chunk": 64, "bft": 32, "warps": 8 if big else 4, "stages": 1}
    return [base, {**base, "bft": 16}, {**base, "bft": 64}, {**base, "stages": 2},
            {**base, "chunk": 32, "bft": 16, "warps": 4}, {**base, "chunk": 128, "bft": 32, "warps": 8}]


def flow_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                          clamp: bool = True, eps: float = 1e-6, cfg: dict | None = None) -> torch.Tensor:
    """Flow-Attention of raw q [..., N, E], k [..., M, E], v [..., M, F] (sigmoid applied here).
    On a GPU the launch configuration is picked per shape among a few candidates (timed once)."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    lead = q.shape[:-2]
    n, e = q.shape[-2:]
    m, f = v.shape[-2:]
    if causal and n != m:
        raise ValueError("causal Flow-Attention needs as many queries as keys")
    q3, k3, v3 = rows3d(q.to(dt)), rows3d(k.to(dt)), rows3d(v.to(dt))
    launch = causal_launch if causal else flow_launch
    if cfg is None and q3.is_cuda:
        cands = (causal_candidates if causal else noncausal_candidates)(e, f)
        cfg = tuned(("flow", causal, clamp, q3.shape[0], n, m, e, f, dt), cands,
                     lambda c: launch(q3, k3, v3, clamp, eps, c))
    return launch(q3, k3, v3, clamp, eps, cfg or {}).reshape(*lead, n, f)


def _pads(e: int, f: int) -> tuple[int, int]:
    return max(16, pow2(e)), max(16, pow2(f))


def causal_launch(q3, k3, v3, clamp: bool, eps: float, cfg: dict) -> torch.Tensor:
    bh, n, e = q3.shape
    f = v3.shape[-1]
    be, bf = _pads(e, f)
    chunk = cfg.get("chunk", 64)
    bft = min(bf, cfg.get("bft", 32))
    out = torch.empty(bh, n, f, device=q3.device, dtype=q3.dtype)
    _flow_causal[(bh, bf // bft)](q3, k3, v3, out, n, float(eps), q3.stride(0), q3.stride(1), k3.stride(0),
                                  k3.stride(1), v3.stride(0), v3.stride(1), out.stride(0), out.stride(1),
                                  E=e, F=f, BE=be, BFT=bft, C=chunk, CLAMP=clamp, STAGES=cfg.get("stages", 1),
                                  PREC=dot_precisions(q3.dtype)[0], UPCAST=upcast_dots(q3),
                                  num_warps=cfg.get("warps", 4 if max(be, bf) <= 64 else 8))
    return out


def flow_launch(q3, k3, v3, clamp: bool, eps: float, cfg: dict) -> torch.Tensor:
    bh, n, e = q3.shape
    m, f = v3.shape[-2:]
    dt = q3.dtype
    be, bf = _pads(e, f)
    prec = dot_precisions(dt)[0]
    upcast = upcast_dots(q3)
    block = cfg.get("block", 128 if max(be, bf) <= 64 else 64)
    stages = cfg.get("stages", 1)
    kw = {"num_warps": cfg.get("warps", 4 if max(be, bf) <= 64 else 8)}
    nseg, seg_k = segments(bh, max(n, m), block, target=cfg.get("target", 1056))
    seg_k = cdiv(cdiv(m, block), nseg) * block
    seg_q = cdiv(cdiv(n, block), nseg) * block
    nsegp = pow2(nseg)
    # workspace per bh: pass-1 partials [NSEG, BE], then SK, SQ, SQI, SKO, SE ([BE] each), KV [BE, BF]
    zero = _ACCS * be + be * bf
    ws = torch.empty(bh, nseg * be + zero, device=q3.device, dtype=torch.float32)
    wsb = ws.stride(0)
    grid = (bh, nseg)
    _flow_sum_k[grid](k3, ws, m, seg_k, wsb, k3.stride(0), k3.stride(1), E=e, BE=be, BLOCK=block, nseg=nseg,
                      ZERO=zero, STAGES=stages, **kw)
    _flow_sum_q[grid](q3, ws, n, seg_q, float(eps), wsb, q3.stride(0), q3.stride(1), E=e, BE=be, BLOCK=block,
                      nseg=nseg, NSEG_POW2=nsegp, STAGES=stages, **kw)
    atomic = clamp and cfg.get("atomic", True)  # the state's segment sums: fp32 atomics, or partials + combine
    kvp = ws if atomic else torch.empty(bh, nseg, be * bf + 2, device=q3.device, dtype=torch.float32)
    _flow_state[grid](k3, v3, ws, kvp, m, seg_k, float(eps), wsb, k3.stride(0), k3.stride(1), v3.stride(0),
                      v3.stride(1), E=e, F=f, BE=be, BF=bf, BLOCK=block, nseg=nseg, CLAMP=clamp, ATOMIC=atomic,
                      STAGES=stages, PREC=prec, UPCAST=upcast, **kw)
    if not atomic:
        _flow_softmax_combine[(bh, be // 16)](ws, kvp, wsb, BE=be, BF=bf, nseg=nseg, NSEG_POW2=nsegp, ROWS=16,
                                              num_warps=4)
    out = torch.empty(bh, n, f, device=q3.device, dtype=dt)
    _flow_out[grid](q3, ws, out, n, seg_q, float(eps), float(n) / float(m), float(m), wsb, q3.stride(0),
                    q3.stride(1), out.stride(0), out.stride(1), E=e, F=f, BE=be, BF=bf, BLOCK=block, nseg=nseg,
                    STAGES=stages, LOW=dt in (torch.bfloat16,), PREC=prec, UPCAST=upcast, **kw)
    return out
