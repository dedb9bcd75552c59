"""``rewrite::decay_linear_attention``: decay-gated causal linear attention (RetNet retention, Lightning
Attention, simple gated linear attention).

``decay_linear_attention(q, k, v, g, kernel, out_dtype)`` takes q [*batch, N, E], k [*batch, N, E],
v [*batch, N, F] and the cumulative log decay g [*batch, N] (broadcast over the batch dims) and computes

    out_p = Σ_{m ≤ p} exp(g_p − g_m) (q_p · k_m) v_m

in O(N·E·F) instead of O(N²·(E+F)). RetNet/Lightning: g_p = p·log γ_h; simple GLA: g = cumsum(log gate).

Kernels: "triton" (codegen/triton_decay.py, forward and backward), "torch" (chunked
PyTorch, the CPU path: a C×C masked decay inside each chunk, chunk states combined by an [nc, nc] decay
matrix), "reference" (the quadratic form). The backward is the Triton one for "triton"; otherwise the torch
path recomputed under autograd. dG is returned as the gradient of g (it flows on to whatever built g).
"""

from __future__ import annotations

import torch

from .backward import recompute_grads
from .linear_ops import acc_dtype

KERNELS = ("torch", "triton", "reference")
CHUNK = 64


def _causal_decay(gp: torch.Tensor, gm: torch.Tensor) -> torch.Tensor:
    """exp(g_p − g_m) for m ≤ p, 0 above the diagonal (the exponent is −inf there, so no overflow)."""
    n = gp.shape[-1]
    lower = torch.ones(n, gm.shape[-1], dtype=torch.bool, device=gp.device).tril()
    diff = gp.unsqueeze(-1) - gm.unsqueeze(-2)
    return torch.where(lower, diff, torch.full_like(diff, float("-inf"))).exp()


def decay_reference(q, k, v, g) -> torch.Tensor:
    """The quadratic form: ((q kᵀ) ⊙ exp(g_p − g_m) ⊙ [m ≤ p]) v."""
    dt, acc = acc_dtype(q, k, v)
    gg = g.to(acc)
    s = (q.to(acc) @ k.to(acc).transpose(-1, -2)) * _causal_decay(gg, gg)
    return (s @ v.to(acc)).to(dt)


def decay_torch(q, k, v, g) -> torch.Tensor:
    """Chunked PyTorch, O(N·C·(E+F) + N·E·F + (N/C)²·E·F); accumulates in fp32 for half-precision inputs.
    Differentiable in q, k, v and g, so it is also the CPU backward's recomputation."""
    dt, acc = acc_dtype(q, k, v)
    n = q.shape[-2]
    gacc = torch.float64 if acc == torch.float64 else torch.float32
    lead = torch.broadcast_shapes(q.shape[:-1], k.shape[:-1], v.shape[:-1], g.shape)
    qq, kk, vv = q.to(acc), k.to(acc), v.to(acc)
    gg = g.to(gacc).expand(lead)
    c = min(CHUNK, n)
    pad = (-n) % c
    if pad:
        qq, kk, vv = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (qq, kk, vv))
        gg = torch.cat([gg, gg[..., -1:].expand(*gg.shape[:-1], pad)], -1)  # past the end: no decay, zero k, v
    nc = (n + pad) // c
    qc = qq.reshape(*qq.shape[:-2], nc, c, qq.shape[-1])
    kc = kk.reshape(*kk.shape[:-2], nc, c, kk.shape[-1])
    vc = vv.reshape(*vv.shape[:-2], nc, c, vv.shape[-1])
    gc = gg.reshape(*gg.shape[:-1], nc, c)
    intra = ((qc @ kc.transpose(-1, -2)) * _causal_decay(gc, gc).to(acc)) @ vc
    g_last = gc[..., -1]  # [*, nc]: each chunk's state is referenced at its last position
    local = (kc * (g_last.unsqueeze(-1) - gc).exp().unsqueeze(-1).to(acc)).transpose(-1, -2) @ vc  # [*, nc, E, F]
    # state entering chunk c: Σ_{c' < c} exp(g_last[c−1] − g_last[c']) local[c'], an [nc, nc] strictly lower map
    g_prev = torch.cat([gc[..., :1, 0], g_last[..., :-1]], -1)  # the position before each chunk (chunk 0: unused)
    strict = torch.ones(nc, nc, dtype=torch.bool, device=q.device).tril(-1)
    diff = g_prev.unsqueeze(-1) - g_last.unsqueeze(-2)
    mix = torch.where(strict, diff, torch.full_like(diff, float("-inf"))).exp().to(acc)
    entering = (mix @ local.flatten(-2)).reshape(local.shape)
    inter = (qc * (gc - g_prev.unsqueeze(-1)).exp().unsqueeze(-1).to(acc)) @ entering
    out = (intra + inter).reshape(*intra.shape[:-3], nc * c, vv.shape[-1])[..., :n, :]
    return out.to(dt)


@torch.library.custom_op("rewrite::decay_linear_attention", mutates_args=())
def decay_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, kernel: str,
                           out_dtype: torch.dtype) -> torch.Tensor:
    if kernel == "triton":
        from rewrite.codegen.triton_decay import decay_attention_triton

        out = decay_attention_triton(q, k, v, g)
    elif kernel == "torch":
        out = decay_torch(q, k, v, g)
    elif kernel == "reference":
        out = decay_reference(q, k, v, g)
    else:
        raise ValueError(f"rewrite::decay_linear_attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    return out.to(out_dtype).contiguous()


@decay_linear_attention.register_fake
def _decay_fake(q, k, v, g, kernel, out_dtype):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.new_empty((*batch, q.shape[-2], v.shape[-1]), dtype=out_dtype)


def _setup(ctx, inputs, output):
    q, k, v, g, kernel, _dt = inputs
    ctx.save_for_backward(q, k, v, g)
    ctx.kernel = kernel


def _backward(ctx, grad):
    q, k, v, g = ctx.saved_tensors
    needs = ctx.needs_input_grad[:4]
    if ctx.kernel == "triton" and grad.is_cuda:
        from rewrite.codegen.triton_decay import decay_attention_triton_backward

        dq, dk, dv, dg = decay_attention_triton_backward(q, k, v, g, grad, want_dg=needs[3])
        dg = dg.sum_to_size(g.shape) if needs[3] else None
        return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
                dv.to(v.dtype) if needs[2] else None, dg.to(g.dtype) if dg is not None else None, None, None)
    return (*recompute_grads(decay_torch, (q, k, v, g), needs, grad), None, None)


decay_linear_attention.register_autograd(_backward, setup_context=_setup)
