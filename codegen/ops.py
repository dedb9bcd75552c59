"""`torch.library` custom ops that rewritten graphs call.

`rewrite::attention` is softmax attention in the canonical layout
``q [*batch, N, E]``, ``k [*batch, M, E]``, ``v [*batch, M, F]`` (batch dims broadcast),
with exactly eager PyTorch's semantics:

    S   = scale · q kᵀ + bias                 (bias broadcast to [*batch, N, M])
    S   = -inf where mask is False or (causal and m > p + causal_offset)
    out = softmax(S, -1) @ v                  (a row whose S is all -inf is NaN, as in eager)

``masked_row`` says what a row with no kept key holds, as the original spelling gave:
"nan" (eager softmax over all -inf), "mean" (spellings that fill masked scores with a
finite value such as finfo.min: softmax over equal scores averages v), "zero" (what
F.scaled_dot_product_attention itself returns).

The op carries a fake kernel (so graphs that call it still export and compile under
Inductor) and an autograd formula that recomputes the forward through SDPA in backward (its fused
backward, no N×M scores kept), or the eager reference where a row keeps no key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .identity_cache import IdentityCache

KERNELS = ("sdpa", "triton", "reference")
MASKED_ROWS = ("nan", "mean", "zero")


def _batch_shape(*tensors: torch.Tensor | None) -> torch.Size:
    return torch.broadcast_shapes(*(t.shape[:-2] for t in tensors if t is not None))


def _out_shape(q, k, v, bias, mask) -> list[int]:
    batch = _batch_shape(q, bias, mask) if gqa_groups(q, k) > 1 else _batch_shape(q, k, v, bias, mask)
    return [*batch, q.shape[-2], v.shape[-1]]


def causal_keep(n: int, m: int, offset: int, device) -> torch.Tensor:
    """[n, m] bool: key j is kept for query i iff j <= i + offset."""
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(m, device=device)[None, :]
    return j <= i + offset


def keep_mask(bias, mask, causal: bool, causal_offset: int, n: int, m: int, device) -> torch.Tensor | None:
    """Every kept (p, m) entry as one broadcastable bool tensor, or None when all are kept."""
    keep = None
    if mask is not None:
        keep = mask
    if bias is not None and bias.is_floating_point():
        finite = bias != float("-inf")
        keep = finite if keep is None else keep & finite
    if causal:
        c = causal_keep(n, m, causal_offset, device)
        keep = c if keep is None else keep & c
    return keep


def gqa_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """Query heads per key head when k has fewer heads than q (GQA/MQA), else 1.
    Shapes that broadcast (a head dim of 1) need no grouping."""
    if q.dim() < 3 or k.dim() < 3:
        return 1
    hq, hk = q.shape[-3], k.shape[-3]
    if hk in (hq, 1) or hq % hk:
        return 1
    return hq // hk


def _ungroup(q, k, v):
    g = gqa_groups(q, k)
    if g == 1:
        return k, v
    return k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)


def fix_empty_rows(out, v, bias, mask, causal, causal_offset, masked_row):
    """Write eager's value into rows that keep no key (kernels disagree there)."""
    n, m = out.shape[-2], v.shape[-2]
    keep = keep_mask(bias, mask, causal, causal_offset, n, m, out.device)
    if keep is None or (causal and causal_offset >= 0 and mask is None and bias is None):
        return out
    empty = ~keep.any(-1, keepdim=True)
    if masked_row == "mean":
        k_unused, v_full = _ungroup(out, v, v)
        return torch.where(empty, v_full.mean(-2, keepdim=True).to(out.dtype), out)
    return out.masked_fill(empty, float("nan") if masked_row == "nan" else 0.0)


def attention_reference(q, k, v, bias=None, mask=None, scale: float = 1.0, causal: bool = False,
                        causal_offset: int = 0, masked_row: str = "nan") -> torch.Tensor:
    """The eager spelling itself, in the inputs' promoted dtype: the semantics every kernel matches."""
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    k, v = _ungroup(q, k, v)
    s = (q.to(dt) @ k.to(dt).transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias
    keep = keep_mask(None, mask, causal, causal_offset, q.shape[-2], k.shape[-2], q.device)
    if keep is not None:
        if masked_row == "mean":
            s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        else:
            s = s.masked_fill(~keep, float("-inf"))
    a = torch.softmax(s, -1)  # as eager: fp32 inside for half types, the input's precision otherwise
    out = a @ v.to(dt)
    if masked_row == "zero":
        out = fix_empty_rows(out, v, bias, mask, causal, causal_offset, masked_row)
    return out


def _sdpa(q, k, v, bias, mask, scale, causal, causal_offset, masked_row) -> torch.Tensor:
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)
    n, m = q.shape[-2], k.shape[-2]
    groups = gqa_groups(q, k)
    if groups > 1 and q.dim() != 4:
        k, v = _ungroup(q, k, v)
        groups = 1
    batch = _batch_shape(q, bias, mask) if groups > 1 else _batch_shape(q, k, v, bias, mask)
    q = q.expand(*batch, *q.shape[-2:])
    if groups == 1:
        k = k.expand(*batch, *k.shape[-2:])
        v = v.expand(*batch, *v.shape[-2:])
    attn_mask = None
    is_causal = False
    if causal and causal_offset == 0 and bias is None and mask is None:
        is_causal = True  # SDPA's is_causal is the top-left aligned mask m <= p
    elif causal:
        c = causal_keep(n, m, causal_offset, q.device)
        mask = c if mask is None else mask & c
    if mask is not None and bias is not None:
        attn_mask = bias.to(dt).masked_fill(~mask, float("-inf"))
    elif mask is not None:
        attn_mask = mask
    elif bias is not None:
        attn_mask = bias.to(dt)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=groups > 1)
    return fix_empty_rows(out, v, bias, mask, False, 0, masked_row)


def as_bhnd(q, k, v, bias, mask):
    """The operands as the fused kernels take them: q [B, Hq, N, D], k/v [B, Hkv, M, D],
    bias/mask broadcastable to [B, Hq, N, M]; any other batch rank is folded into that form.
    Returns them and the batch shape to give the output back."""
    groups = gqa_groups(q, k)
    batch = _batch_shape(q, bias, mask) if groups > 1 else _batch_shape(q, k, v, bias, mask)
    lead = list(batch)
    if len(lead) == 0:
        lead = [1, 1]
    elif len(lead) == 1:
        lead = [1, lead[0]]
    elif len(lead) > 2:
        lead = [math.prod(lead[:-1]), lead[-1]]

    def four(t, heads=None):
        if t is None:
            return None
        shape = batch if heads is None else (*batch[:-1], heads)
        t = t.expand(*shape, *t.shape[-2:])
        return t.reshape(*lead[:-1], shape[-1] if shape else 1, *t.shape[-2:])

    kv_heads = k.shape[-3] if groups > 1 else None
    return (four(q), four(k, kv_heads), four(v, kv_heads), four(bias), four(mask)), batch


def _triton(q, k, v, bias, mask, scale, causal, causal_offset, masked_row) -> torch.Tensor:
    from rewrite.codegen.triton_attention import triton_attention

    (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
    out = triton_attention(q4, k4, v4, scale=scale, bias=b4, mask=m4, causal=causal, causal_offset=causal_offset)
    out = out.reshape(*batch, *out.shape[-2:])
    # The kernel follows eager softmax (NaN for a row with no key); other spellings differ.
    return fix_empty_rows(out, v, bias, mask, causal, causal_offset, masked_row) if masked_row != "nan" else out


_CAUSAL_MASKS = IdentityCache(256)


def mask_is_causal(mask: torch.Tensor, offset: int, n: int, m: int) -> bool:
    """Is this run-time mask tensor, broadcast to the site's n queries and m keys, exactly
    m <= p + offset? (A mask of one row broadcast over n > 1 queries never is.) Checked once per
    tensor identity (codegen/identity_cache.py): a registered buffer is checked on the first call
    only, and any in-place change to it is seen through its version counter."""
    key = (offset, n, m)
    hit = _CAUSAL_MASKS.get(mask, key)
    if hit is None:
        full = mask.expand(*mask.shape[:-2], n, m)
        hit = bool(torch.equal(full, causal_keep(n, m, offset, mask.device).expand_as(full)))
        _CAUSAL_MASKS.put(mask, key, hit)
    return hit


@torch.library.custom_op("rewrite::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              mask: torch.Tensor | None, scale: float, causal: bool, causal_offset: int,
              masked_row: str, kernel: str, out_dtype: torch.dtype,
              mask_causal_hint: int | None = None) -> torch.Tensor:
    if (mask_causal_hint is not None and mask is not None and not causal
            and mask_is_causal(mask, mask_causal_hint, q.shape[-2], k.shape[-2])):
        # A run-time mask (a registered tril buffer) that is causal: skip it, run causal.
        mask, causal, causal_offset = None, True, mask_causal_hint
    if (kernel == "sdpa" and bias is None and mask is None and q.dim() == 4 and q.dtype == k.dtype == v.dtype
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and (not causal or causal_offset == 0)):
        # The common case, without the general path's bookkeeping.
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).to(out_dtype)
    if kernel == "sdpa":
        out = _sdpa(q, k, v, bias, mask, scale, causal, causal_offset, masked_row)
    elif kernel == "triton":
        out = _triton(q, k, v, bias, mask, scale, causal, causal_offset, masked_row)
    elif kernel == "reference":
        out = attention_reference(q, k, v, bias, mask, scale, causal, causal_offset, masked_row)
    else:
        raise ValueError(f"rewrite::attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    return out.to(out_dtype).contiguous()


@attention.register_fake
def _attention_fake(q, k, v, bias, mask, scale, causal, causal_offset, masked_row, kernel, out_dtype,
                    mask_causal_hint=None):
    return q.new_empty(_out_shape(q, k, v, bias, mask), dtype=out_dtype)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, causal, causal_offset, masked_row, _kernel, _dtype, *_hint = inputs
    ctx.save_for_backward(q, k, v, bias, mask)
    ctx.args = (scale, causal, causal_offset, masked_row)


def recompute_grads(forward, tensors, needs, grad) -> list | None:
    """Gradients of ``tensors`` (q, k, v, bias; None where not needed) by running ``forward`` (a
    differentiable function of them) again under autograd: every attention op's backward. ``forward``
    may return None (its path does not apply to these inputs); then so does this."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) if t is not None and t.is_floating_point() else t
                  for t, n in zip(tensors, needs[:4])]
        out = forward(*leaves)
        if out is None:
            return None
        wrt = [t for t, n in zip(leaves, needs[:4]) if t is not None and n]
        grads = iter(torch.autograd.grad(out, wrt, grad.to(out.dtype), allow_unused=True) if wrt else [])
    result = []
    for t, n in zip(leaves, needs[:4]):
        g = next(grads) if t is not None and n else None
        # Broadcast inputs (a [B,1,1,M] bias, an MQA key) get their gradient summed back.
        result.append(g.sum_to_size(t.shape) if g is not None and g.shape != t.shape else g)
    return result


def concrete(*tensors: torch.Tensor | None) -> bool:
    """Real values in hand (an eager backward, as rewritten graphs run it), not a trace (AOTAutograd,
    export, opcheck), where a backward must not branch on data."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and not any(is_fake(t) for t in tensors if t is not None)


def has_empty_rows(bias, mask, causal: bool, causal_offset: int, n: int, m: int, device) -> bool:
    """Does some query row keep no key (every score −inf)?"""
    if bias is None and mask is None:
        # no keys at all, or row 0 keeping keys ≤ offset: none when the offset is negative
        return n > 0 and (m == 0 or (causal and causal_offset < 0))
    keep = keep_mask(bias, mask, causal, causal_offset, n, m, device)
    return keep is not None and not bool(keep.any(-1).all())


def dense_grads(q, k, v, bias, keep, needs, grad, scale, causal, causal_offset, masked_row) -> list:
    """Gradients through SDPA (FlashAttention / memory-efficient / cuDNN backward where the device
    has them: no N×M scores kept) unless a row keeps no key. Eager's gradient there (NaN through the
    softmax of an all −inf row) is reproduced by recomputing the eager reference itself, as it is
    under tracing, where whether rows are empty is not known."""
    n, m = q.shape[-2], k.shape[-2]
    if not concrete(q, k, v, bias, keep) or has_empty_rows(bias, keep, causal, causal_offset, n, m, q.device):
        def forward(q, k, v, bias):
            return attention_reference(q, k, v, bias, keep, scale, causal, causal_offset, masked_row)
    else:
        def forward(q, k, v, bias):
            return _sdpa(q, k, v, bias, keep, scale, causal, causal_offset, masked_row)
    return recompute_grads(forward, (q, k, v, bias), needs, grad)


def _backward(ctx, grad):
    q, k, v, bias, mask = ctx.saved_tensors
    scale, causal, causal_offset, masked_row = ctx.args
    grads = dense_grads(q, k, v, bias, mask, ctx.needs_input_grad, grad, scale, causal, causal_offset, masked_row)
    return (*grads, None, None, None, None, None, None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)
