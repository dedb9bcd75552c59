"""`torch.library` custom ops that rewritten graphs call.

`rewrite::attention` is softmax attention in the canonical layout
``q [*batch, N, E]``, ``k [*batch, M, E]``, ``v [*batch, M, F]`` (batch dims broadcast),
with exactly eager PyTorch's semantics for the spelling it replaced:

    S   = scale · q kᵀ + bias                 (bias broadcast to [*batch, N, M])
    S   = fill where mask is False or (causal and m > p + causal_offset)
    out = softmax(S, -1) @ v

``fill`` (None: −inf) is the value the spelling gives removed scores, written over the score
(masked_fill, where) or, with ``additive``, added to it (a where-built bias). ``masked_row`` names
the spelling's answer for a row with no kept key: "nan" (eager softmax over all −inf), "mean" (a
finite fill: softmax over equal scores averages v; ``fill`` gives its value, finfo.min if None),
"zero" (an F.scaled_dot_product_attention call: SDPA's own semantics, 0 there; "zero_masked": one
that passed an attn_mask, which the op passes again on inputs that are not finite; "biased_fill": a
finite fill written over the score and the bias added over it, GPT-Neo's order). codegen/eager.py
holds every kernel to this (settled rows, inputs a kernel cannot take exactly).

The op carries a fake kernel (so graphs that call it still export and compile under Inductor) and
an autograd formula that recomputes the forward through SDPA in backward (its fused backward, no
N×M scores kept) where that gradient is eager's, else through the eager spelling
(codegen/backward.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import counters
from .backward import grad_forward, one_per_passed_input, recompute_grads
from .bias_verdict import bias_settles
from .eager import (
    MASKED_ROWS,
    Removed,
    Spelling,
    checks_inputs,
    coarse_rows,
    eager_attention,
    excess_of,
    keep_floor,
    lse_floor,
    sdpa_call,
    settle,
    tame,
)
from .identity_cache import IdentityCache
from .settle_bound import settled_by_norms

KERNELS = ("sdpa", "triton", "reference")
__all__ = ["KERNELS", "MASKED_ROWS", "attention", "as_bhnd", "dense_forward", "out_shape"]


def _batch_shape(*tensors: torch.Tensor | None) -> torch.Size:
    return torch.broadcast_shapes(*(t.shape[:-2] for t in tensors if t is not None))


def out_shape(q, k, v, bias, mask) -> list[int]:
    """The op's output shape, [*batch, N, F]."""
    batch = _batch_shape(q, bias, mask) if gqa_groups(q, k) > 1 else _batch_shape(q, k, v, bias, mask)
    return [*batch, q.shape[-2], v.shape[-1]]


def query_order(q: torch.Tensor, rank: int) -> list[int]:
    """The output's dim order, outermost first: q's (SDPA lays its output out like q: [B, N, H, D] in
    memory for HF's ``view(B, N, H, D).transpose(1, 2)``), row-major where the ranks differ."""
    if q.dim() != rank:
        return list(range(rank))
    return sorted(range(rank), key=lambda d: (-q.stride(d), d))


def output_strides(shape, order: list[int]) -> tuple[int, ...]:
    """Dense strides of ``shape`` laid out in ``order`` (as ``torch.empty_permuted``; sizes 0 and 1
    step like 1, as c10 does)."""
    strides, step = [0] * len(shape), 1
    for d in reversed(order):
        strides[d] = step
        step *= max(int(shape[d]), 1)
    return tuple(strides)


def in_query_layout(out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``out`` with the strides the fake kernel declares (Inductor trusts the fake's strides and
    checks them): a copy only where the path that ran chose another layout."""
    order = query_order(q, out.dim())
    if out.stride() == output_strides(out.shape, order):
        return out
    return torch.empty_permuted(out.shape, order, dtype=out.dtype, device=out.device).copy_(out)


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


def dense_forward(q, k, v, bias, removed: Removed, scale: float, sem: Spelling, kernel: str) -> torch.Tensor:
    """One [B, Hq, N, D] problem (k, v [B, Hkv, M, *]) on ``kernel`` ("sdpa", "triton", "reference"),
    held to eager (codegen/eager.py): kernel "reference", and inputs a kernel cannot take exactly
    (``tame``, on the CPU), run the eager spelling itself; every kernel's rows are settled.
    The result is in the kernels' dtype; the caller casts."""
    n, m = q.shape[2], k.shape[2]
    if m == 0:  # no keys: every spelling's product with an empty V is 0
        return q.new_zeros(*q.shape[:3], v.shape[-1])
    selecting = kernel == "triton" and not sem.sdpa
    if kernel == "reference" or (checks_inputs(q) and not tame(q, k, v, scale, selecting, sem.additive)):
        counters.ran("eager spelling" if kernel == "reference" else
                     "eager spelling (inputs not finite, or scores that may overflow)")
        return eager_attention(q, k, v, bias, removed, scale, sem)
    dt = torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)
    q, k, v = q.to(dt), k.to(dt), v.to(dt)

    def recompute(out, rows):
        return eager_attention(q, k, v, bias, removed, scale, sem, rows, out)

    def coarse():
        return None if sem.sdpa or bias is None else coarse_rows(q, k, bias, removed.rows(0, n, q.device), sem)

    if kernel == "triton":
        from rewrite.codegen.triton_attention import triton_attention

        counters.ran("triton")
        want = sem.sdpa or sem.finite or coarse is not None  # the row LSE only serves to settle rows
        res = triton_attention(q, k, v, scale=scale, bias=bias, mask=removed.mask,
                               causal=removed.causal_offset is not None, causal_offset=removed.causal_offset or 0,
                               return_lse=want)
        return (settle(res[0], lse_floor(res[1], m), sem, dt, recompute, excess_of(q, k, scale, sem, bias), coarse())
                if want else res)
    if kernel != "sdpa":
        raise ValueError(f"rewrite::attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    counters.ran("sdpa")
    plain = removed.mask is None and removed.spec is None and bias is None
    if plain and removed.causal_offset in (None, 0):
        out = sdpa_call(q, k, v, None, None, scale, is_causal=removed.causal_offset == 0)
        keep = None  # every row keeps a key
        if sem.sdpa or not sem.finite or removed.causal_offset is None:
            return out  # nothing removed, or only −inf scores of rows that keep a key
        if settled_by_norms(q, k, scale, sem, dt):
            return out  # a finite fill that no row's softmax can see (the common case: finfo.min)
    else:
        keep = removed.rows(0, n, q.device)
        out = sdpa_call(q, k, v, bias, keep, scale)
        if sem.sdpa:
            return out  # SDPA is the spelling
        if keep is None and bias_settles(q, k, bias, sem):
            return out  # a run-time bias with nothing to settle, known from an earlier call (codegen/bias_verdict.py)
    return settle(out, keep_floor(q, k, bias, keep, scale, bound=sem.finite), sem, dt, recompute,
                  excess_of(q, k, scale, sem, bias), coarse())


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


def spelling_of(q, k, masked_row: str, fill: float | None, additive: bool) -> Spelling:
    return Spelling.of(masked_row, fill, additive, torch.promote_types(q.dtype, k.dtype))


@torch.library.custom_op("rewrite::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
              mask: torch.Tensor | None, scale: float, causal: bool, causal_offset: int,
              masked_row: str, kernel: str, out_dtype: torch.dtype,
              mask_causal_hint: int | None = None, fill: float | None = None,
              additive: bool = False, site: str = "") -> torch.Tensor:
    if kernel not in KERNELS:
        raise ValueError(f"rewrite::attention: unknown kernel {kernel!r}; choose from {KERNELS}")
    with counters.running(site):
        return _attention(q, k, v, bias, mask, scale, causal, causal_offset, masked_row, kernel, out_dtype,
                          mask_causal_hint, fill, additive)


def _attention(q, k, v, bias, mask, scale, causal, causal_offset, masked_row, kernel, out_dtype,
               mask_causal_hint, fill, additive) -> torch.Tensor:
    sem = spelling_of(q, k, masked_row, fill, additive)
    if (mask_causal_hint is not None and mask is not None and not causal
            and mask_is_causal(mask, mask_causal_hint, q.shape[-2], k.shape[-2])
            and not (sem.sdpa and checks_inputs(q) and not tame(q, k, v, scale))):
        # A run-time mask (a registered tril buffer) that is causal: skip it, run causal. (Not for an
        # SDPA call on inputs that are not finite: SDPA adds a bool mask, is_causal hides.)
        mask, causal, causal_offset = None, True, mask_causal_hint
        counters.ran("run-time mask causal: causal kernel")
    finite_causal = causal and sem.finite
    if (kernel == "sdpa" and bias is None and mask is None and q.dim() == 4 and q.dtype == k.dtype == v.dtype
            and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and (not causal or causal_offset == 0)
            and k.shape[-2] > 0
            and ((sem.sdpa and not sem.sdpa_masked) or not checks_inputs(q)
                 or tame(q, k, v, scale, False, sem.additive))
            and (not finite_causal or settled_by_norms(q, k, scale, sem, q.dtype))):
        # The common case, without the general path's bookkeeping: nothing removed, or causal with
        # every row keeping a key and removed scores −inf, or a finite fill the scalar bound shows no
        # row's softmax can see (dense_forward's plain branch, decided before the kernel runs).
        counters.ran("sdpa")
        return in_query_layout(F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale).to(out_dtype), q)
    (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, bias, mask)
    removed = Removed(q.shape[-2], k.shape[-2], m4, causal_offset if causal else None)
    out = dense_forward(q4, k4, v4, b4, removed, scale, sem, kernel)
    return in_query_layout(out.reshape(*batch, *out.shape[-2:]).to(out_dtype), q)


@attention.register_fake
def _attention_fake(q, k, v, bias, mask, scale, causal, causal_offset, masked_row, kernel, out_dtype,
                    mask_causal_hint=None, fill=None, additive=False, site=""):
    shape = out_shape(q, k, v, bias, mask)
    return torch.empty_permuted(shape, query_order(q, len(shape)), dtype=out_dtype, device=q.device)


def _setup_context(ctx, inputs, output):
    q, k, v, bias, mask, scale, causal, causal_offset, masked_row, _kernel, _dtype, _hint, fill, additive, site = inputs
    ctx.save_for_backward(q, k, v, bias, mask)
    ctx.args = (scale, causal, causal_offset, spelling_of(q, k, masked_row, fill, additive), site)


def _backward(ctx, grad):
    q, k, v, bias, mask = ctx.saved_tensors
    scale, causal, causal_offset, sem, site = ctx.args

    def forward(q, k, v, b):
        (q4, k4, v4, b4, m4), batch = as_bhnd(q, k, v, b, mask)
        removed = Removed(q.shape[-2], k.shape[-2], m4, causal_offset if causal else None)
        out = grad_forward(q4, k4, v4, b4, removed, scale, sem)
        return out.reshape(*batch, *out.shape[-2:])

    with counters.running(site):
        grads = recompute_grads(forward, (q, k, v, bias), ctx.needs_input_grad, grad)
    return one_per_passed_input(ctx, *grads)


attention.register_autograd(_backward, setup_context=_setup_context)
