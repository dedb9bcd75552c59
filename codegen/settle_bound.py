"""The scalar settle check of a finite-fill site: one bound for the whole site which, when it holds,
implies that ``unsettled`` (codegen/eager.py) flags no row, so the fast kernel's output is eager's."""

from __future__ import annotations

import math

import torch

from .eager import Spelling, capturing, compute_dtype, underflow


def settled_by_norms(q, k, scale: float, sem: Spelling, dtype: torch.dtype) -> bool:
    """A sufficient check, a few small reductions and one host sync, that every row of a site with no
    bias and no removed row (each row keeps a key) is settled (``unsettled`` false for all): there
    floor ≥ −B and excess ≤ B (added fill), B ≥ |scale|·max‖q‖·max‖k‖ ≥ every row's bound, and
    ``unsettled``'s test grows with B. First B = |scale|·D·max|q|·max|k| (‖x‖ ≤ √D·max|x|; one
    ``aminmax`` per operand, exact, NaN and inf propagated); only where that is too loose, the row
    norms (float32, widened by their rounding bound of (D+4) ulps). A bound that is not finite fails
    the check (the per-row path decides then)."""
    if capturing():
        return False
    q, k = q.detach(), k.detach()
    if q.dtype == k.dtype:
        ends = torch.stack([*torch.aminmax(q), *torch.aminmax(k)]).tolist()
        widest = abs(scale) * q.shape[-1] * max(-ends[0], ends[1]) * max(-ends[2], ends[3]) * (1 + 1e-12)
        if bound_settles(widest, sem, dtype):
            return True
        if not math.isfinite(widest):
            return False  # a NaN or an infinity: the row norms would not be finite either
    norms = torch.stack([torch.linalg.vector_norm(t, dim=-1, dtype=compute_dtype(t)).amax() for t in (q, k)])
    nq, nk = norms.tolist()
    widen = 1 + (q.shape[-1] + 4) * torch.finfo(torch.float32).eps
    return bound_settles(abs(scale) * nq * nk * widen * widen * (1 + 1e-12), sem, dtype)


def bound_settles(bound: float, sem: Spelling, dtype: torch.dtype) -> bool:
    """Does a score bound ``bound`` keep every removed score's weight at exactly 0 (``settled_by_norms``)?"""
    if not math.isfinite(bound):
        return False
    gap = sem.fill + bound + (bound if sem.additive else 0.0)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    return gap + 4 * eps * (abs(sem.fill) + bound) < underflow(dtype)
