"""Custom ops for the linear-time families: ``rewrite::linear_attention`` and ``rewrite::flow_attention``.

``rewrite::linear_attention(fq, fk, v, causal, normalize, eps, kernel, out_dtype)`` takes the
feature-mapped queries and keys (the graph keeps φ, which is elementwise) in the canonical layout
``fq [*batch, N, E]``, ``fk [*batch, M, E]``, ``v [*batch, M, F]`` and computes

    out = (φQ φKᵀ ⊙ mask) V  ÷  ((φQ φKᵀ ⊙ mask) 1 + eps)       (the division only if normalize)

with mask = m ≤ p when causal, in O(N·E·F) instead of O(N·M·(E+F)): φQ (φKᵀ V) ÷ (φQ (φKᵀ 1) + eps).

``rewrite::flow_attention(q, k, v, causal, clamp, eps, kernel, out_dtype)`` is Flowformer's
Flow-Attention on the *raw* q, k (it applies the sigmoid feature map itself), following the
official code line for line, optionally with its clamp of the conserved outgoing flow.

Kernels: "torch" (chunked / reassociated PyTorch, the CPU path), "triton" (codegen/triton_linear.py,
codegen/triton_flow.py), "reference" (the quadratic eager form for linear attention, the official
code for flow). Both ops carry fake kernels and autograd by recomputation through the torch path.
"""

from __future__ import annotations

import torch

from .backward import recompute_grads

KERNELS = ("torch", "triton", "reference")
CHUNK = 64


def acc_dtype(*ts: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    dt = ts[0].dtype
    for t in ts[1:]:
        dt = torch.promote_types(dt, t.dtype)
    return dt, (torch.float32 if dt in (torch.bfloat16, torch.float16) else dt)


# ---- linear attention ------------------------------------------------------------------------
def linear_reference(fq, fk, v, causal: bool = False, normalize: bool = True, eps: float = 0.0) -> torch.Tensor:
    """The quadratic form, as eager writes it: O(N²) memory and time."""
    s = fq @ fk.transpose(-1, -2)
    if causal:
        n, m = s.shape[-2:]
        s = s * torch.ones(n, m, dtype=torch.bool, device=s.device).tril()
    out = s @ v
    if normalize:
        out = out / (s.sum(-1, keepdim=True) + eps)
    return out


def linear_torch(fq, fk, v, causal: bool = False, normalize: bool = True, eps: float = 0.0) -> torch.Tensor:
    """Reassociated (non-causal) or chunked (causal) PyTorch: O(N·E·F), accumulating in fp32
    for half-precision inputs. Differentiable, so it is also the backward's recomputation."""
    dt, acc = acc_dtype(fq, fk, v)
    q, k, vv = fq.to(acc), fk.to(acc), v.to(acc)
    if not causal:
        state = k.transpose(-1, -2) @ vv  # [*, E, F]
        out = q @ state
        if normalize:
            out = out / ((q @ k.sum(-2).unsqueeze(-1)) + eps)
        return out.to(dt)
    n, e = q.shape[-2:]
    f = vv.shape[-1]
    if k.shape[-2] != n:
        raise ValueError("causal linear attention needs as many queries as keys")
    c = min(CHUNK, n)
    pad = (-n) % c
    if pad:
        q, k, vv = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (q, k, vv))
    nc = (n + pad) // c
    qc = q.reshape(*q.shape[:-2], nc, c, e)
    kc = k.reshape(*k.shape[:-2], nc, c, e)
    vc = vv.reshape(*vv.shape[:-2], nc, c, f)
    local = kc.transpose(-1, -2) @ vc  # [*, nc, E, F]: one state per chunk, never per position
    prefix = torch.cat([torch.zeros_like(local[..., :1, :, :]), local[..., :-1, :, :].cumsum(-3)], -3)
    s = (qc @ kc.transpose(-1, -2)) * torch.ones(c, c, dtype=torch.bool, device=q.device).tril()
    out = s @ vc + qc @ prefix
    if normalize:
        zl = kc.sum(-2)  # [*, nc, E]
        zp = torch.cat([torch.zeros_like(zl[..., :1, :]), zl[..., :-1, :].cumsum(-2)], -2)
        den = s.sum(-1) + (qc @ zp.unsqueeze(-1)).squeeze(-1) + eps
        out = out / den.unsqueeze(-1)
    out = out.reshape(*out.shape[:-3], nc * c, f)[..., :n, :]
    return out.to(dt)


@torch.library.custom_op("rewrite::linear_attention", mutates_args=())
def linear_attention(fq: torch.Tensor, fk: torch.Tensor, v: torch.Tensor, causal: bool, normalize: bool,
                     eps: float, kernel: str, out_dtype: torch.dtype) -> torch.Tensor:
    if kernel == "triton":
        from rewrite.codegen.triton_linear import linear_attention_triton

        out = linear_attention_triton(fq, fk, v, causal, normalize, eps)
    elif kernel == "torch":
        out = linear_torch(fq, fk, v, causal, normalize, eps)
    elif kernel == "reference":
        out = linear_reference(fq, fk, v, causal, normalize, eps)
    else:
        raise ValueError(f"rewrite::linear_attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    return out.to(out_dtype).contiguous()


@linear_attention.register_fake
def _linear_fake(fq, fk, v, causal, normalize, eps, kernel, out_dtype):
    batch = torch.broadcast_shapes(fq.shape[:-2], fk.shape[:-2], v.shape[:-2])
    return fq.new_empty((*batch, fq.shape[-2], v.shape[-1]), dtype=out_dtype)


def _linear_setup(ctx, inputs, output):
    fq, fk, v, causal, normalize, eps, _kernel, _dt = inputs
    ctx.save_for_backward(fq, fk, v)
    ctx.args = (causal, normalize, eps)


def _linear_backward(ctx, grad):
    return (*_recompute_grads(ctx, grad, linear_torch), None, None, None, None, None)


linear_attention.register_autograd(_linear_backward, setup_context=_linear_setup)


def _recompute_grads(ctx, grad, fn):
    return recompute_grads(lambda *t: fn(*t, *ctx.args), ctx.saved_tensors, ctx.needs_input_grad[:3], grad)


# ---- flow attention ----------------------------------------------------------------------------
def flow_reference(q, k, v, causal: bool = False, clamp: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Flowformer's official Flow_Attention / Flow_Attention_Causal forward (thuml/Flowformer), on
    [..., L, D] tensors after the projections: the same einsums in the same order."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    if not causal:
        si = 1.0 / torch.einsum("...ld,...d->...l", q + eps, k.sum(dim=-2) + eps)
        so = 1.0 / torch.einsum("...ld,...d->...l", k + eps, q.sum(dim=-2) + eps)
        c_sink = torch.einsum("...ld,...d->...l", q + eps, (k * so[..., None]).sum(dim=-2) + eps)
        c_src = torch.einsum("...ld,...d->...l", k + eps, (q * si[..., None]).sum(dim=-2) + eps)
        if clamp:
            c_src = torch.clamp(c_src, min=-1.0, max=1.0)
        alloc = torch.sigmoid(c_sink * (float(q.shape[-2]) / float(k.shape[-2])))
        comp = torch.softmax(c_src, dim=-1) * float(k.shape[-2])
        kv = torch.einsum("...ld,...lm->...dm", k, v * comp[..., None])
        return torch.einsum("...ld,...dm->...lm", q * si[..., None], kv) * alloc[..., None]
    si, so, normal, alloc, comp = _causal_flow_prework(q, k, clamp, eps)
    kv = torch.einsum("...ld,...lm->...ldm", k, v * comp[..., None]).cumsum(-3)
    x = torch.einsum("...ld,...ldm->...lm", q * (si / normal)[..., None], kv)
    return x * alloc[..., None]


def _rowdot(a, b):
    """Σ_d a·b per row, as the official einsum("nhld,nhld->nhl") computes it."""
    return torch.einsum("...ld,...ld->...l", a, b)


def _rowdot_fast(a, b):
    """The same sum as one elementwise product and one reduction (einsum lowers it to a bmm of
    N·B·H 1×D×1 products, which is slow on a GPU)."""
    return (a * b).sum(-1)


def _causal_flow_prework(q, k, clamp: bool, eps: float, dot=_rowdot):
    """The O(N·D) prefix-sum part of causal Flow-Attention (q, k already sigmoid)."""
    si = 1.0 / dot(q + eps, k.cumsum(dim=-2) + eps)
    so = 1.0 / dot(k + eps, q.cumsum(dim=-2) + eps)
    normal = torch.arange(q.shape[-2], device=q.device).float() + 1.0
    si = si * normal
    so = so * normal
    c_sink = dot(q + eps, (k * so[..., None]).cumsum(dim=-2) + eps) / normal
    c_src = dot(k + eps, (q * si[..., None]).cumsum(dim=-2) + eps) / normal
    if clamp:
        c_src = torch.clamp(c_src, min=-1.0, max=1.0)
    alloc = torch.sigmoid(c_sink)
    c_src = torch.exp(c_src)
    comp = (c_src / c_src.cumsum(dim=-1)) * normal
    return si, so, normal, alloc, comp


def flow_torch(q, k, v, causal: bool = False, clamp: bool = True, eps: float = 1e-6,
               linear=linear_torch) -> torch.Tensor:
    """O(N·D²) PyTorch: the official non-causal code (already linear), and for causal the prefix
    sums of vectors followed by chunked causal linear attention (no [N, D, D] cumsum)."""
    dt, acc = acc_dtype(q, k, v)
    if not causal:
        return flow_reference(q.to(acc), k.to(acc), v.to(acc), False, clamp, eps).to(dt)
    fq, fk = torch.sigmoid(q.to(acc)), torch.sigmoid(k.to(acc))
    si, _so, normal, alloc, comp = _causal_flow_prework(fq, fk, clamp, eps, dot=_rowdot_fast)
    x = linear(fq * (si / normal)[..., None], fk, v.to(acc) * comp[..., None], True, False, 0.0)
    return (x.to(acc) * alloc[..., None]).to(dt)


@torch.library.custom_op("rewrite::flow_attention", mutates_args=())
def flow_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, clamp: bool, eps: float,
                   kernel: str, out_dtype: torch.dtype) -> torch.Tensor:
    if kernel == "triton":
        from rewrite.codegen.triton_flow import flow_attention_triton

        out = flow_attention_triton(q, k, v, causal, clamp, eps)
    elif kernel == "torch":
        out = flow_torch(q, k, v, causal, clamp, eps)
    elif kernel == "reference":
        out = flow_reference(q, k, v, causal, clamp, eps)
    else:
        raise ValueError(f"rewrite::flow_attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    return out.to(out_dtype).contiguous()


@flow_attention.register_fake
def _flow_fake(q, k, v, causal, clamp, eps, kernel, out_dtype):
    batch = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    return q.new_empty((*batch, q.shape[-2], v.shape[-1]), dtype=out_dtype)


def _flow_setup(ctx, inputs, output):
    q, k, v, causal, clamp, eps, _kernel, _dt = inputs
    ctx.save_for_backward(q, k, v)
    ctx.args = (causal, clamp, eps)


def _flow_backward(ctx, grad):
    return (*_recompute_grads(ctx, grad, flow_torch), None, None, None, None, None)


flow_attention.register_autograd(_flow_backward, setup_context=_flow_setup)
