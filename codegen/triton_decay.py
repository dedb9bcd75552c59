"""Triton kernels for decay-gated causal linear attention in the canonical layout [B·H, N, D]:

    out_p = Σ_{m ≤ p} exp(G_p − G_m) (q_p · k_m) v_m          G: cumulative log decay per (bh, position)

RetNet's retention and Lightning Attention have G_p = p·log γ (one γ per head); simple gated linear
attention has G = cumsum of a per-step log gate. Only differences of G enter, so any offset of G is
harmless. As a recurrence: S_p = exp(G_p − G_{p−1}) S_{p−1} + k_pᵀ v_p, out_p = q_p S_p.

The work is split as in codegen/triton_linear.py (segments so that a [B·H] grid fills the GPU):

1. ``_segment_state``: per (bh, segment j), its state decayed to the segment's last position,
   Σ_{m ∈ j} exp(G_last − G_m) k_mᵀ v_m (fp32); REV: the reverse-time state used by the backward,
   Σ_{p ∈ j} exp(G_p − G_{first−1}) q_pᵀ dO_p, referenced at the position before the segment.
2. ``_scan_states``: the states entering each segment, H_{j+1} = d_j H_j + S_j with the segment's
   total decay d_j = exp(G_{last_j} − G_{first_j − 1}) (REV: the same recurrence from the last segment).
3. ``_decay_out`` (forward; also dq = out(dO, v, k)): per chunk of C rows, with the running state H
   referenced at the position before the chunk (G_ref):
       out_P = (q_P ⊙ exp(G_P − G_ref)) H + (q_P k_Pᵀ ⊙ exp(G_P − G_Pᵀ) ⊙ [m ≤ p]) v_P
       H ← exp(G_last − G_ref) H + (k_P ⊙ exp(G_last − G_P))ᵀ v_P
   ``_decay_dkdv`` (backward): the same walk backwards in time with R = Σ_{p > ref} exp(G_p − G_ref) q_pᵀ dO_p,
       dv_m = exp(G_ref − G_m) k_m R + Σ_{p ≥ m in chunk} exp(G_p − G_m)(k_m · q_p) dO_p
       dk_m = exp(G_ref − G_m) v_m Rᵀ + Σ_{p ≥ m in chunk} exp(G_p − G_m)(v_m · dO_p) q_p
   and dG_p = q_p · dq_p − k_p · dk_p (the diagonal term cancels).

Exponents are always differences G_x − G_y with x later than y inside a causal pair or across a state step,
so for decays ≤ 1 every factor is ≤ 1; pairs outside the causal triangle get exp(−inf) = 0 before any
product. Products take operands in the input dtype (fp32 accumulation), the decayed operands rounded to it
as flash-linear-attention does; fp32 inputs use IEEE fp32.
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
    rows3d,
    segments,
    tuned,
    upcast_dots,
)

CHUNK = 64


@triton.jit
def _g_at(G, base, idx, lo, hi):
    """G at positions idx clamped to [lo, hi) (rows past the end reuse the last G: their q, k, v are 0)."""
    return tl.load(G + base + tl.minimum(tl.maximum(idx, lo), hi - 1))


@triton.jit(do_not_specialize=["N", "seg_len", "nseg"])
def _segment_state(A, B, G, S, N, seg_len, nseg, sab, san, sbb, sbn, sgb, E: tl.constexpr, F: tl.constexpr,
                   BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr, BLOCK: tl.constexpr, REV: tl.constexpr,
                   PREC: tl.constexpr, UPCAST: tl.constexpr):
    """S[bh, seg, :, F-tile] = Σ_x w_x A_xᵀ B_x over the segment, w_x = exp(G_last − G_x)
    (REV: exp(G_x − G_{first−1}))."""
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    acc = tl.zeros((BE, BFT), dtype=tl.float32)
    start = seg * seg_len
    end = tl.minimum(start + seg_len, N)
    gb = bh * sgb
    if REV:
        g_ref = _g_at(G, gb, start - 1, 0, N)
    else:
        g_ref = _g_at(G, gb, end - 1, 0, N)
    for x0 in range(start, end, BLOCK):
        rows = x0 + tl.arange(0, BLOCK)
        rmask = rows < end
        a = tl.load(A + bh * sab + rows[:, None] * san + offs_e[None, :],
                    mask=rmask[:, None] & (offs_e[None, :] < E), other=0.0)
        b = tl.load(B + bh * sbb + rows[:, None] * sbn + offs_f[None, :],
                    mask=rmask[:, None] & (offs_f[None, :] < F), other=0.0)
        g = _g_at(G, gb, rows, 0, end)
        w = tl.exp(g - g_ref) if REV else tl.exp(g_ref - g)
        acc += dot(tl.trans((a.to(tl.float32) * w[:, None]).to(a.dtype)), b, PREC, UPCAST)
    tl.store(S + (bh * nseg + seg) * BE * BF + offs_e[:, None] * BF + offs_f[None, :], acc)


@triton.jit(do_not_specialize=["N", "seg_len", "nseg"])
def _scan_states(S, G, N, seg_len, nseg, sgb, BEF: tl.constexpr, TILE: tl.constexpr, REV: tl.constexpr):
    """In place over the segments j of one bh, TILE state entries at a time: S[j] ← the state entering j,
    H_{j+1} = d_j H_j + S_j (REV: from the last segment down), d_j = exp(G_{last_j} − G_{first_j − 1})."""
    bh = tl.program_id(0)
    t = tl.program_id(1)
    offs = t * TILE + tl.arange(0, TILE)
    h = tl.zeros((TILE,), dtype=tl.float32)
    gb = bh * sgb
    for i in range(0, nseg):
        j = nseg - 1 - i if REV else i
        first = j * seg_len
        last = tl.minimum(first + seg_len, N) - 1
        d = tl.exp(_g_at(G, gb, last, 0, N) - _g_at(G, gb, first - 1, 0, N))
        ptrs = S + (bh * nseg + j) * BEF + offs
        x = tl.load(ptrs)
        tl.store(ptrs, h)
        h = h * d + x


@triton.jit(do_not_specialize=["N", "seg_len", "nseg"])
def _decay_out(Q, K, V, G, H0, Out, N, seg_len, nseg, sqb, sqn, skb, skm, svb, svm, sgb, sob, son,
               E: tl.constexpr, F: tl.constexpr, BE: tl.constexpr, BF: tl.constexpr, BFT: tl.constexpr,
               C: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """out_P = (q_P ⊙ exp(G_P − G_ref)) H + (q_P k_Pᵀ ⊙ exp(G_P − G_Pᵀ) ⊙ [m ≤ p]) v_P per chunk, H carried."""
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    ft = tl.program_id(2)
    offs_e = tl.arange(0, BE)
    offs_f = ft * BFT + tl.arange(0, BFT)
    offs_c = tl.arange(0, C)
    state = tl.load(H0 + (bh * nseg + seg) * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    start = seg * seg_len
    end = tl.minimum(start + seg_len, N)
    gb = bh * sgb
    g_ref = _g_at(G, gb, start - 1, 0, N)
    causal = offs_c[:, None] >= offs_c[None, :]
    for c0 in range(start, end, C):
        rows = c0 + offs_c
        rmask = rows < end
        fmask = rmask[:, None] & (offs_f[None, :] < F)
        q = load_rows(Q, bh * sqb, rows, sqn, offs_e, rmask, E)
        k = load_rows(K, bh * skb, rows, skm, offs_e, rmask, E)
        v = load_rows(V, bh * svb, rows, svm, offs_f, rmask, F)
        g = _g_at(G, gb, rows, 0, end)
        g_last = _g_at(G, gb, c0 + C - 1, 0, end)
        s = dot(q, tl.trans(k), PREC, UPCAST)
        s = s * tl.exp(tl.where(causal, g[:, None] - g[None, :], float("-inf")))
        qd = (q.to(tl.float32) * tl.exp(g - g_ref)[:, None]).to(q.dtype)
        num = dot(qd, state.to(q.dtype), PREC, UPCAST)
        num += dot(s.to(v.dtype), v, PREC, UPCAST)
        tl.store(Out + bh * sob + rows[:, None] * son + offs_f[None, :], num.to(Out.dtype.element_ty), mask=fmask)
        kd = (k.to(tl.float32) * tl.exp(g_last - g)[:, None]).to(k.dtype)
        state = state * tl.exp(g_last - g_ref) + dot(tl.trans(kd), v, PREC, UPCAST)
        g_ref = g_last


@triton.jit(do_not_specialize=["N", "seg_len", "nseg"])
def _decay_dkdv(Q, K, V, DO, G, R0, DK, DV, DQ, DG, N, seg_len, nseg, sqb, sqn, skb, skn, svb, svn, sdb, sdn, sgb,
                sdqb, sdqn, E: tl.constexpr, F: tl.constexpr, BE: tl.constexpr, BF: tl.constexpr, C: tl.constexpr,
                WANT_DG: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """dk, dv of one (bh, segment), walking its chunks from the last; R (E×F, fp32) is referenced at the
    position before the chunk walked next (R0: at the segment's last position). WANT_DG: also
    dG_p = q_p · dq_p − k_p · dk_p (dq from the pass before, dk unrounded), [bh, N] fp32."""
    bh = tl.program_id(0)
    seg = tl.program_id(1)
    offs_e = tl.arange(0, BE)
    offs_f = tl.arange(0, BF)
    offs_c = tl.arange(0, C)
    state = tl.load(R0 + (bh * nseg + seg) * BE * BF + offs_e[:, None] * BF + offs_f[None, :])
    start = seg * seg_len
    end = tl.minimum(start + seg_len, N)
    gb = bh * sgb
    g_ref = _g_at(G, gb, end - 1, 0, N)
    later = offs_c[:, None] <= offs_c[None, :]  # [m, p]: p at or after m
    nchunks = (end - start + C - 1) // C
    for i in range(0, nchunks):
        c0 = start + (nchunks - 1 - i) * C
        rows = c0 + offs_c
        rmask = rows < end
        emask = rmask[:, None] & (offs_e[None, :] < E)
        fmask = rmask[:, None] & (offs_f[None, :] < F)
        q = load_rows(Q, bh * sqb, rows, sqn, offs_e, rmask, E)
        k = load_rows(K, bh * skb, rows, skn, offs_e, rmask, E)
        v = load_rows(V, bh * svb, rows, svn, offs_f, rmask, F)
        do = load_rows(DO, bh * sdb, rows, sdn, offs_f, rmask, F)
        g = _g_at(G, gb, rows, 0, end)
        g_prev = _g_at(G, gb, c0 - 1, 0, N)
        decay = tl.exp(tl.where(later, g[None, :] - g[:, None], float("-inf")))  # [m, p]
        kq = dot(k, tl.trans(q), PREC, UPCAST) * decay
        vdo = dot(v, tl.trans(do), PREC, UPCAST) * decay
        w = tl.exp(g_ref - g)[:, None]
        kd = (k.to(tl.float32) * w).to(k.dtype)
        vd = (v.to(tl.float32) * w).to(v.dtype)
        st = state.to(k.dtype)
        dv = dot(kd, st, PREC, UPCAST) + dot(kq.to(do.dtype), do, PREC, UPCAST)
        dk = dot(vd, tl.trans(st), PREC, UPCAST) + dot(vdo.to(q.dtype), q, PREC, UPCAST)
        tl.store(DV + bh * svb + rows[:, None] * svn + offs_f[None, :], dv.to(DV.dtype.element_ty), mask=fmask)
        tl.store(DK + bh * skb + rows[:, None] * skn + offs_e[None, :], dk.to(DK.dtype.element_ty), mask=emask)
        if WANT_DG:
            dq = load_rows(DQ, bh * sdqb, rows, sdqn, offs_e, rmask, E)
            dg = tl.sum(q.to(tl.float32) * dq.to(tl.float32), 1) - tl.sum(k.to(tl.float32) * dk, 1)
            tl.store(DG + bh * N + rows, dg, mask=rmask)
        qd = (q.to(tl.float32) * tl.exp(g - g_prev)[:, None]).to(q.dtype)
        state = state * tl.exp(g_ref - g_prev) + dot(tl.trans(qd), do, PREC, UPCAST)
        g_ref = g_prev


def _states(a3, b3, g2, nseg: int, seg_len: int, rev: bool, cfg: dict) -> torch.Tensor:
    """The state entering each segment, [bh, nseg, BE, BF] fp32 (forward: from the left; REV: from the right)."""
    bh, n, e = a3.shape
    f = b3.shape[-1]
    be, bf = pad_dim(e), pad_dim(f)
    s = torch.zeros(bh, nseg, be, bf, device=a3.device, dtype=torch.float32)
    if nseg == 1:
        return s
    prec, _ = dot_precisions(a3.dtype)
    bft = min(bf, cfg["state_bft"])
    _segment_state[(bh, nseg, bf // bft)](a3, b3, g2, s, n, seg_len, nseg, a3.stride(0), a3.stride(1),
                                          b3.stride(0), b3.stride(1), g2.stride(0), E=e, F=f, BE=be, BF=bf,
                                          BFT=bft, BLOCK=cfg["state_block"], REV=rev, PREC=prec,
                                          UPCAST=upcast_dots(a3), num_warps=cfg["warps"], num_stages=2)
    tile = min(be * bf, 1024)
    _scan_states[(bh, be * bf // tile)](s, g2, n, seg_len, nseg, g2.stride(0), BEF=be * bf, TILE=tile, REV=rev,
                                        num_warps=4)
    return s


def default_config(e: int, f: int) -> dict:
    big = max(e, f) > 64
    return {"chunk": CHUNK, "bft": 64, "warps": 8 if big else 4, "stages": 2, "target": 264,
            "state_block": 64, "state_bft": 128, "bwd_warps": 8 if big else 4, "bwd_target": 132, "bwd_stages": 1}


def candidate_configs(e: int, f: int) -> list[dict]:
    """Launch configurations timed once per shape on a GPU (``tuned``); duplicates after clipping dropped."""
    base = default_config(e, f)
    variants = [{}, {"bft": 128, "target": 528}, {"stages": 3}, {"target": 528}, {"bft": 128, "warps": 8},
                {"target": 1056}]
    seen, out = set(), []
    for v in variants:
        cfg = {**base, **v}
        key = tuple(sorted({**cfg, "bft": min(pad_dim(f), cfg["bft"])}.items()))
        if key not in seen:
            seen.add(key)
            out.append(cfg)
    return out


def backward_configs(e: int, f: int, forward: dict) -> list[dict]:
    """Backward launch configurations timed once per shape: how many (bh, segment) programs walk the
    chunks backwards (more segments: more parallel walks, each shorter, for a few more states), and
    their warps; the dq pass keeps the forward's tuned configuration."""
    base = {**default_config(e, f), **forward}
    warps, other = base["bwd_warps"], 8 if base["bwd_warps"] == 4 else 4
    return [{**base, "bwd_target": t, "bwd_warps": w, "bwd_stages": st}
            for t, w, st in ((132, warps, 1), (528, warps, 1), (1056, warps, 1), (528, warps, 2), (1056, other, 1))]


def _prep(q, k, v, g):
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    n = q.shape[-2]
    if k.shape[-2] != n or v.shape[-2] != n or g.shape[-1] != n:
        raise ValueError(f"decay-gated linear attention needs as many queries as keys and one G per position "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, G {tuple(g.shape)})")
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], g.shape[:-1])
    g2 = g.to(torch.float32).expand(*lead, n).reshape(-1, n).contiguous()
    q, k, v = (t.to(dt).expand(*lead, *t.shape[-2:]) for t in (q, k, v))
    return dt, rows3d(q), rows3d(k), rows3d(v), g2


def decay_forward(q3, k3, v3, g2, cfg: dict) -> torch.Tensor:
    """out [bh, N, F] of the canonical operands (see the module docstring)."""
    bh, n, e = q3.shape
    f = v3.shape[-1]
    cfg = {**default_config(e, f), **cfg}
    be, bf = pad_dim(e), pad_dim(f)
    nseg, seg_len = segments(bh, n, cfg["chunk"], cfg["target"])
    h0 = _states(k3, v3, g2, nseg, seg_len, False, cfg)
    out = torch.empty(bh, n, f, device=q3.device, dtype=q3.dtype)
    bft = min(bf, cfg["bft"])
    _, prec = dot_precisions(q3.dtype)
    _decay_out[(bh, nseg, bf // bft)](q3, k3, v3, g2, h0, out, n, seg_len, nseg, q3.stride(0), q3.stride(1),
                                      k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1), g2.stride(0),
                                      out.stride(0), out.stride(1), E=e, F=f, BE=be, BF=bf, BFT=bft,
                                      C=cfg["chunk"], PREC=prec, UPCAST=upcast_dots(q3), num_warps=cfg["warps"],
                                      num_stages=cfg["stages"])
    return out


def decay_backward(q3, k3, v3, g2, do3, cfg: dict, want_dg: bool = True) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dG) of the canonical operands; dG [bh, N] fp32 (None unless ``want_dg``)."""
    bh, n, e = q3.shape
    f = v3.shape[-1]
    cfg = {**default_config(e, f), **cfg}
    do3 = do3.to(q3.dtype).contiguous()
    dq = decay_forward(do3, v3, k3, g2, cfg)  # dq_p = Σ_{m≤p} exp(G_p − G_m)(dO_p · v_m) k_m
    nseg, seg_len = segments(bh, n, cfg["chunk"], cfg["bwd_target"])
    r0 = _states(q3, do3, g2, nseg, seg_len, True, cfg)
    dk, dv = torch.empty_like(k3), torch.empty_like(v3)
    dg = torch.empty(bh, n, device=q3.device, dtype=torch.float32) if want_dg else None
    _, prec = dot_precisions(q3.dtype)
    _decay_dkdv[(bh, nseg)](q3, k3, v3, do3, g2, r0, dk, dv, dq, dg if want_dg else g2, n, seg_len, nseg,
                            q3.stride(0), q3.stride(1), k3.stride(0), k3.stride(1), v3.stride(0), v3.stride(1),
                            do3.stride(0), do3.stride(1), g2.stride(0), dq.stride(0), dq.stride(1), E=e, F=f,
                            BE=pad_dim(e), BF=pad_dim(f), C=cfg["chunk"], WANT_DG=want_dg, PREC=prec,
                            UPCAST=upcast_dots(q3), num_warps=cfg["bwd_warps"], num_stages=cfg["bwd_stages"])
    return dq, dk, dv, dg


def decay_attention_triton(q, k, v, g, cfg: dict | None = None) -> torch.Tensor:
    """Decay-gated causal linear attention of [..., N, E] × [..., N, E] × [..., N, F] with G [..., N]
    (broadcast over the leading dims). On a GPU the launch configuration is picked per shape (timed once)."""
    dt, q3, k3, v3, g2 = _prep(q, k, v, g)
    n, e = q3.shape[-2:]
    f = v3.shape[-1]
    if cfg is None and q3.is_cuda:
        key = ("decay", q3.shape[0], n, e, f, dt)
        cfg = TUNED.get(key) or tuned(key, candidate_configs(e, f) if dt != torch.float32 else [default_config(e, f)],
                                      lambda c: decay_forward(q3, k3, v3, g2, c))
    out = decay_forward(q3, k3, v3, g2, cfg or {})
    lead = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2], g.shape[:-1])
    return out.reshape(*lead, n, f)


def decay_attention_triton_backward(q, k, v, g, grad, cfg: dict | None = None,
                                    want_dg: bool = True) -> tuple[torch.Tensor, ...]:
    """(dq, dk, dv, dG) in the shapes of q, k, v and of G broadcast to q's leading dims (dG None unless
    ``want_dg``)."""
    dt, q3, k3, v3, g2 = _prep(q, k, v, g)
    do3 = rows3d(grad)
    if cfg is None and q3.is_cuda:
        bh, n, e = q3.shape
        f = v3.shape[-1]
        forward = TUNED.get(("decay", bh, n, e, f, dt), {})
        key = ("decay_bwd", bh, n, e, f, dt, want_dg)  # the dG work changes the timing
        cfg = TUNED.get(key) or tuned(key, backward_configs(e, f, forward) if dt != torch.float32 else [forward],
                                      lambda c: decay_backward(q3, k3, v3, g2, do3, c, want_dg))
    dq, dk, dv, dg = decay_backward(q3, k3, v3, g2, do3, cfg or {}, want_dg)
    lead = grad.shape[:-1]
    return (dq.reshape(*lead, q.shape[-1]).sum_to_size(q.shape), dk.reshape(*lead, k.shape[-1]).sum_to_size(k.shape),
            dv.reshape(*lead, v.shape[-1]).sum_to_size(v.shape), dg.reshape(lead) if want_dg else None)
