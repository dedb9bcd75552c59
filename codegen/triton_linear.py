"""Triton kernels for linear attention in the canonical layout [B·H, N, D] (contiguous rows).

    out_p = φQ_p · S / (φQ_p · z + eps)      S = Σ_m φK_mᵀ V_m,  z = Σ_m φK_m
    causal: the sums run over m ≤ p only.

The feature maps are applied by the graph before the call (they are elementwise); the
kernels take φQ and φK. Work is split in *segments* of the sequence so that a [B·H]
grid still fills the GPU:

1. ``_segment_state``: per (bh, segment), the segment's Σ φKᵀV (fp32 [E, F]) and Σ φK.
   Non-causal: the segment states are summed (split-K); causal: exclusive prefix over
   segments (a handful per row, never one per position).
2. non-causal ``_noncausal_out``: out = φQ·S ÷ φQ·z per query tile, the normaliser fused.
   causal ``_causal_out`` (Lightning Attention's order): per (bh, segment, F-tile), walk
   the segment's chunks in order; inside a chunk the masked quadratic form, across chunks
   the running state, so no per-position cumsum of outer products is ever materialised.

Precision: products and sums in fp32; low-precision operands go through tensor cores in
their dtype where eager does the same (φK ᵀ V, the intra-chunk scores times V), the fp32
state products in tf32 (bf16/fp16 inputs) or IEEE fp32 (fp32 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """tl.dot; UPCAST for Triton's CPU interpreter, which multiplies bfloat16 dot operands as their
    uint16 bit patterns (triton 3.8, also noted in triton_attention.py): bf16 → fp32 is exact."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _segment_state(K, V, S, Z, M, seg_len, skb, skm, svb, svm, E: tl.constexpr, F: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr, BLOCK_M: tl.constexpr, NSEG: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
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
        acc += _dot(tl.trans(k), v, PREC, UPCAST)
        z += tl.sum(k.to(tl.float32), 0)
    base = (bh * NSEG + seg)
    tl.store(S + base * BE * BF + offs_e[:, None] * BF + offs_f[None, :], acc)
    if ft == 0:
        tl.store(Z + base * BE + offs_e, z)


@triton.jit
def _noncausal_out(Q, S, Z, Out, N, eps, sqb, sqn, sob, son, E: tl.constexpr, F: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr, BLOCK_N: tl.constexpr, NORM: tl.constexpr,
                   PREC: tl.constexpr):
    bh = tl.program_id(0)
    nb = tl.program_id(1)
    ft = tl.program_id(2)
    rows = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    rmask = rows < N
    q = tl.load(Q + bh * sqb + rows[:, None] * sqn + offs_e[None, :],
                mask=rmask[:, None] & (offs_e[None, :] < E), other=0.0).to(tl.float32)
    s = tl.load(S + bh * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    num = tl.dot(q, s, input_precision=PREC)
    if NORM:
        z = tl.load(Z + bh * BE + offs_e)
        den = tl.sum(q * z[None, :], 1) + eps
        num = num / den[:, None]
    tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], num.to(Out.dtype.element_ty),
             mask=rmask[:, None] & (offs_f[None, :] < F))


@triton.jit
def _causal_out(Q, K, V, S0, Z0, Out, N, seg_len, eps, sqb, sqn, skb, skm, svb, svm, sob, son,
                E: tl.constexpr, F: tl.constexpr, BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr,
                C: tl.constexpr, NSEG: tl.constexpr, NORM: tl.constexpr, PREC: tl.constexpr,
                PREC_LOW: tl.constexpr, UPCAST: tl.constexpr):
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    offs_c = tl.arange(0, C)
    base = bh * NSEG + seg
    state = tl.load(S0 + base * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    z = tl.load(Z0 + base * BE + offs_e)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, N)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rmask = rows < end
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fmask = rmask[:, None] & (offs_f[None, :] < F)
        q = tl.load(Q + bh * sqb + rows[:, None] * sqn + offs_e[None, :], mask=emask, other=0.0)
        k = tl.load(K + bh * skb + rows[:, None] * skm + offs_e[None, :], mask=emask, other=0.0)
        v = tl.load(V + bh * svb + rows[:, None] * svm + offs_f[None, :], mask=fmask, other=0.0)
        s = _dot(q, tl.trans(k), PREC_LOW, UPCAST)
        s = tl.where(causal, s, 0.0)
        qf = q.to(tl.float32)
        num = _dot(s.to(v.dtype), v, PREC_LOW, UPCAST)
        num += tl.dot(qf, state, input_precision=PREC)
        if NORM:
            den = tl.sum(s, 1) + tl.sum(qf * z[None, :], 1) + eps
            num = num / den[:, None]
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], num.to(Out.dtype.element_ty), mask=fmask)
        state += _dot(tl.trans(k), v, PREC_LOW, UPCAST)
        z += tl.sum(k.to(tl.float32), 0)


def _upcast(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16)


def _precisions(dtype: torch.dtype) -> tuple[str, str]:
    """(state products, low-precision products): IEEE for fp32 inputs, tf32 / the input dtype otherwise."""
    return ("ieee", "ieee") if dtype == torch.float32 else ("tf32", "tf32")


def _segments(bh: int, n: int, block: int, target: int = 528) -> tuple[int, int]:
    """(segments, segment length): enough (bh, segment) programs to fill the GPU, each a
    whole number of blocks long."""
    blocks = triton.cdiv(n, block)
    nseg = max(1, min(blocks, triton.cdiv(target, bh)))
    seg_len = triton.cdiv(blocks, nseg) * block
    return triton.cdiv(n, seg_len), seg_len


def segment_states(k: torch.Tensor, v: torch.Tensor, nseg: int, seg_len: int, cfg: dict | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (bh, segment): Σ φKᵀV [bh, nseg, BE, BF] and Σ φK [bh, nseg, BE] in fp32 (padded to powers of 2)."""
    bh, m, e = k.shape
    f = v.shape[-1]
    be, bf = max(16, triton.next_power_of_2(e)), max(16, triton.next_power_of_2(f))
    cfg = {**default_config(e, f, False), **(cfg or {})}
    s = torch.empty(bh, nseg, be, bf, device=k.device, dtype=torch.float32)
    z = torch.empty(bh, nseg, be, device=k.device, dtype=torch.float32)
    prec, _ = _precisions(k.dtype)
    bft = min(bf, cfg["state_bft"])
    _segment_state[(bh, nseg, bf // bft)](k, v, s, z, m, seg_len, k.stride(0), k.stride(1), v.stride(0),
                                          v.stride(1), E=e, F=f, BE=be, BF=bf, BFT=bft, BLOCK_M=cfg["state_block"],
                                          NSEG=nseg, PREC=prec, UPCAST=_upcast(k), num_warps=cfg["state_warps"])
    return s, z


def default_config(e: int, f: int, causal: bool) -> dict:
    big = max(e, f) > 64
    return {"state_block": 64, "state_bft": 64, "state_warps": 8 if big else 4, "target": 528,
            "out_block": 64, "out_bft": 64, "out_warps": 8 if big else 4,
            "chunk": CHUNK, "causal_bft": 64, "causal_warps": 8 if big else 4, "causal_stages": 2,
            "causal_target": 264}


def candidate_configs(e: int, f: int, causal: bool) -> list[dict]:
    """A few launch configurations timed once per shape on a GPU (``_tuned``)."""
    base = default_config(e, f, causal)
    if causal:
        return [base, {**base, "causal_bft": 128, "causal_warps": 8},
                {**base, "causal_stages": 3, "causal_target": 528},
                {**base, "chunk": 128, "causal_warps": 8},
                {**base, "chunk": 32, "causal_bft": 128, "causal_target": 528}]
    return [base, {**base, "out_block": 128, "out_bft": 128, "out_warps": 8},
            {**base, "out_bft": 128, "state_bft": 128, "state_warps": 8},
            {**base, "out_block": 128, "state_block": 128, "target": 1056}]


_TUNED: dict = {}


def _tuned(key, candidates: list[dict], run) -> dict:
    """The fastest of ``candidates`` for ``key`` on this GPU (timed once, then cached)."""
    if key not in _TUNED:
        from triton.testing import do_bench

        times = []
        for cfg in candidates:
            try:
                times.append(do_bench(lambda cfg=cfg: run(cfg), warmup=5, rep=20, return_mode="median"))
            except Exception:  # a configuration that does not fit this GPU (shared memory)
                times.append(float("inf"))
        _TUNED[key] = candidates[min(range(len(times)), key=times.__getitem__)]
    return _TUNED[key]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N, D] → [B·H, N, D] with unit stride along D."""
    t = t.reshape(-1, *t.shape[-2:])
    return t if t.stride(-1) == 1 else t.contiguous()


def linear_attention_triton(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            normalize: bool = True, eps: float = 0.0, cfg: dict | None = None) -> torch.Tensor:
    """Linear attention of feature-mapped queries and keys, [..., N, E] × [..., M, E] × [..., M, F].
    On a GPU the launch configuration is picked per shape among a few candidates (timed once)."""
    lead = fq.shape[:-2]
    n, e = fq.shape[-2:]
    m, f = v.shape[-2:]
    dt = torch.promote_types(torch.promote_types(fq.dtype, fk.dtype), v.dtype)
    q3, k3, v3 = _rows(fq.to(dt)), _rows(fk.to(dt)), _rows(v.to(dt))
    if causal and n != m:
        raise ValueError("causal linear attention needs as many queries as keys")
    if cfg is None and q3.is_cuda:
        key = ("linear", causal, normalize, q3.shape[0], n, m, e, f, dt)
        cfg = _tuned(key, candidate_configs(e, f, causal),
                     lambda c: _launch(q3, k3, v3, causal, normalize, eps, c))
    out = _launch(q3, k3, v3, causal, normalize, eps, cfg or {})
    return out.reshape(*lead, n, f)


def _launch(q3, k3, v3, causal: bool, normalize: bool, eps: float, cfg: dict) -> torch.Tensor:
    bh, n, e = q3.shape
    m, f = v3.shape[-2:]
    dt = q3.dtype
    cfg = {**default_config(e, f, causal), **cfg}
    out = torch.empty(bh, n, f, device=q3.device, dtype=dt)
    be, bf = max(16, triton.next_power_of_2(e)), max(16, triton.next_power_of_2(f))
    prec, prec_low = _precisions(dt)
    if not causal:
        nseg, seg_len = _segments(bh, m, cfg["state_block"], cfg["target"])
        s, z = segment_states(k3, v3, nseg, seg_len, cfg)
        s, z = s.sum(1), z.sum(1)
        block_n, bft = cfg["out_block"], min(bf, cfg["out_bft"])
        _noncausal_out[(bh, triton.cdiv(n, block_n), bf // bft)](
            q3, s, z, out, n, float(eps), q3.stride(0), q3.stride(1), out.stride(0), out.stride(1),
            E=e, F=f, BE=be, BF=bf, BFT=bft, BLOCK_N=block_n, NORM=normalize, PREC=prec,
            num_warps=cfg["out_warps"])
        return out
    chunk = cfg["chunk"]
    nseg, seg_len = _segments(bh, n, chunk, cfg["causal_target"])
    s, z = segment_states(k3, v3, nseg, seg_len, cfg)
    s0 = torch.cat([torch.zeros_like(s[:, :1]), s[:, :-1].cumsum(1)], 1)  # the state entering each segment
    z0 = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1].cumsum(1)], 1)
    bft = min(bf, cfg["causal_bft"])
    _causal_out[(bh, nseg, bf // bft)](
        q3, k3, v3, s0, z0, out, n, seg_len, float(eps), q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1),
        v3.stride(0), v3.stride(1), out.stride(0), out.stride(1),
        E=e, F=f, BE=be, BF=bf, BFT=bft, C=chunk, NSEG=nseg, NORM=normalize, PREC=prec, PREC_LOW=prec_low,
        UPCAST=_upcast(q3), num_warps=cfg["causal_warps"], num_stages=cfg["causal_stages"])
    return out
