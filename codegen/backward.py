"""The attention ops' backward: recompute the forward under autograd, through the fused SDPA
backward (no N×M scores kept) where its gradient is eager's, else through the eager spelling
(codegen/eager.py decides which, from the same conditions as the forward).

Eager's gradients depend on the spelling where a row keeps no key: masked_fill(−inf) gives a NaN
row whose weights make every grad_v NaN while grad_q and grad_k stay finite (masked_fill's backward
zeroes the removed scores' gradient); an additive −inf bias lets the NaN through to grad_q (that
row) and grad_k (every key) too; a finite fill gives finite gradients; F.scaled_dot_product_attention
gives 0 for such a row and finite gradients. ``eager_attention`` applies each spelling's op, so its
autograd is eager's; SDPA's own backward is an SDPA spelling's.
"""

from __future__ import annotations

import torch

from . import counters
from .eager import (
    NEG_INF,
    Removed,
    Spelling,
    checks_inputs,
    compute_dtype,
    eager_attention,
    excess_of,
    keep_floor,
    score_bound,
    sdpa_call,
    tame,
    unsettled,
)


def concrete(*tensors: torch.Tensor | None) -> bool:
    """Real values in hand (an eager backward, as rewritten graphs run it), not a trace (AOTAutograd,
    export, opcheck), where a backward must not branch on data."""
    from torch._subclasses.fake_tensor import is_fake

    return not torch.compiler.is_compiling() and not any(is_fake(t) for t in tensors if t is not None)


def one_per_passed_input(ctx, *grads) -> tuple:
    """The gradients an op's backward returns, one per input the caller passed. The dispatcher drops
    trailing arguments left at their defaults, and torch before 2.14 checks an op with a tensor-list
    input against the passed inputs ("Expected the return from backward to be of the same structure
    as the inputs"), so the tail of Nones is cut or padded to that count."""
    n = len(ctx.needs_input_grad)
    return tuple(grads[:n]) + (None,) * (n - len(grads))


def recompute_grads(forward, tensors, needs, grad) -> list | None:
    """Gradients of ``tensors`` (q, k, v, bias, …; None where ``needs`` says no) by running ``forward``
    (a differentiable function of them) again under autograd: every attention op's backward.
    ``forward`` may return None (its path does not apply to these inputs); then so does this."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) if t is not None and t.is_floating_point() else t
                  for t, n in zip(tensors, needs)]
        out = forward(*leaves)
        if out is None:
            return None
        wrt = [t for t, n in zip(leaves, needs) if t is not None and n]
        grads = iter(torch.autograd.grad(out, wrt, grad.to(out.dtype), allow_unused=True) if wrt else [])
    result = []
    for t, n in zip(leaves, needs):
        g = next(grads) if t is not None and n else None
        # Broadcast inputs (a [B,1,1,M] bias, an MQA key) get their gradient summed back.
        result.append(g.sum_to_size(t.shape) if g is not None and g.shape != t.shape else g)
    return result


def _causal_flag(bias, removed: Removed) -> bool:
    """SDPA's is_causal (top-left m ≤ p) says all there is to remove."""
    return removed.causal_offset == 0 and removed.mask is None and removed.spec is None and bias is None


def _no_empty_rows(bias, removed: Removed) -> bool:
    """Every row keeps a key, known without looking at a tensor."""
    return (bias is None and removed.mask is None and removed.spec is None and removed.m > 0
            and (removed.causal_offset is None or removed.causal_offset >= 0))


def fused_is_eager(q, k, v, bias, removed: Removed, scale: float, sem: Spelling) -> bool:
    """Is the fused (SDPA) gradient eager's here? Values in hand, inputs tame (on the CPU), every row
    keeping a key and, with a finite fill, no row ``unsettled`` (codegen/eager.py)."""
    if not concrete(q, k, v, bias, removed.mask):
        return False
    cpu = checks_inputs(q)
    if cpu and not tame(q, k, v, scale):
        return False
    no_empty = _no_empty_rows(bias, removed)
    keep = None if no_empty else removed.rows(0, removed.n, q.device)
    if (cpu or bias is not None) and not lse_precise(q, k, bias, keep, scale):
        return False
    if no_empty and not sem.finite:
        return True
    floor = keep_floor(q, k, bias, keep, scale, bound=sem.finite)
    if bool((floor == NEG_INF).any()):
        return False
    return not sem.finite or not bool(unsettled(floor, sem, q.dtype, excess_of(q, k, scale, sem, bias)).any())


LSE_ULPS = 2.0 ** -12  # a row's largest score may be this many 1/eps: exp(s − LSE) is then exact to rounding


def lse_precise(q, k, bias, keep, scale: float) -> bool:
    """The fused backward rebuilds the weights as exp(s − LSE) from a float32 (or float64) LSE, whose
    rounding is ~eps·|max|: eager's weights to rounding only while every row's largest score is small,
    bounded here by its largest kept bias plus the Cauchy–Schwarz score bound. (A finfo.min bias over a
    row it masks entirely, or scores of ~10⁴, would make exp(s − LSE) of the winning key 1 ± 10⁻³.)
    On a GPU it is checked only where a bias is (the other bound costs a host sync per backward)."""
    top = score_bound(q, k, scale)
    if bias is not None:
        b = bias.detach().double()
        best = (b if keep is None else b.masked_fill(~keep, NEG_INF)).amax(-1)
        top = top + best.abs().nan_to_num(posinf=0.0).expand_as(top)
    return bool((top * torch.finfo(compute_dtype(q, k)).eps <= LSE_ULPS).all())


def fused(q, k, v, bias, removed: Removed, scale: float) -> torch.Tensor:
    """SDPA on [B, H, N, D] operands with the removed keys as its mask (is_causal where that is all)."""
    if _causal_flag(bias, removed):
        return sdpa_call(q, k, v, None, None, scale, is_causal=True)
    keep = None if removed.mask is None and removed.spec is None and removed.causal_offset is None else \
        removed.rows(0, removed.n, q.device)
    return sdpa_call(q, k, v, bias, keep, scale)


def grad_forward(q, k, v, bias, removed: Removed, scale: float, sem: Spelling) -> torch.Tensor:
    """The differentiable forward a backward recomputes: SDPA where its gradient is eager's (an SDPA
    spelling's always), else the eager spelling itself."""
    if sem.sdpa or fused_is_eager(q, k, v, bias, removed, scale, sem):
        counters.ran("backward: fused sdpa")
        return fused(q, k, v, bias, removed, scale)
    counters.ran("backward: eager spelling")
    return eager_attention(q, k, v, bias, removed, scale, sem)
