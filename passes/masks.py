"""Classify a lifted keep predicate (a sympy Boolean over p, m; patterns/lift.py) into a MaskSpec.

Classification is proven, not guessed: a predicate is called causal only when it is exactly
``m <= p + c`` as a linear relation over the integers; neighborhoods and blocks are proven in
passes/mask_classes.py.
"""

from __future__ import annotations

from dataclasses import replace

import sympy
import torch

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.mask import MaskSpec, kept_count


def _linear_causal(rel) -> int | None:
    """``m <= p + c`` in any spelling of one integer relation: return c."""
    if not isinstance(rel, (sympy.Le, sympy.Lt, sympy.Ge, sympy.Gt)):
        return None
    d = sympy.expand(rel.lhs - rel.rhs)
    if d.free_symbols - {P_SYM, M_SYM}:
        return None
    cp, cm = d.coeff(P_SYM), d.coeff(M_SYM)
    c0 = d - cp * P_SYM - cm * M_SYM
    if not (cp.is_Number and cm.is_Number and c0.is_Number) or cp != -cm or cp == 0:
        return None
    # Normalise to k·(m − p) + c0 REL 0 with k > 0.
    if cm < 0:
        c0 = -c0
        rel = {sympy.Le: sympy.Ge, sympy.Lt: sympy.Gt, sympy.Ge: sympy.Le, sympy.Gt: sympy.Lt}[type(rel)]
        k = -cm
    else:
        rel, k = type(rel), cm
    # m − p REL −c0/k over integers.
    bound = -c0 / k
    if rel is sympy.Le:
        return int(sympy.floor(bound))
    if rel is sympy.Lt:
        return int(sympy.ceiling(bound)) - 1
    return None  # m − p >= c: an upper-triangular (anti-causal) mask


def classify(pred: sympy.Basic, n: int | None = None, m: int | None = None,
             structured: bool | None = None) -> MaskSpec:
    """Split a keep predicate into position-only and run-time factors and name it.

    With the concrete query/key lengths ``n``, ``m`` the position-only part is also tried
    against the neighborhood/blocked families (passes/mask_classes.py, proven there) and
    ``density`` is exact. ``structured`` (default: only when sizes are given) enables that
    attempt without sizes too, where only a symbolic proof is accepted. The default keeps
    callers that pass no sizes (passes/plan.py) on the three kinds they fold."""
    from rewrite.passes import mask_classes  # imports this module: late import avoids a cycle

    if structured is None:
        structured = n is not None and m is not None
    sized = n is not None and m is not None
    if pred.free_symbols and len(pred.free_symbols) < 8 and not (sized and sympy.count_ops(pred) > 80):
        # With sizes, structure is proven on the grid: skip simplifying every relation
        # (deep=True), which costs seconds on a 3-D neighborhood and proves nothing more, and
        # skip the normal form of a large Or of block terms (exponential in its atoms).
        pred = sympy.simplify_logic(pred, deep=not sized)
    if pred is sympy.true:
        return MaskSpec("dense", proof="symbolic")
    factors = list(pred.args) if isinstance(pred, sympy.And) else [pred]
    runtime = [f for f in factors if f.atoms(sympy.core.function.AppliedUndef) or
               (f.free_symbols - {P_SYM, M_SYM})]
    positional = [f for f in factors if f not in runtime]
    if not positional:
        return MaskSpec("dense", predicate=str(pred), runtime=bool(runtime))
    offsets = [_linear_causal(f) for f in positional]
    if all(o is not None for o in offsets):
        # Several causal relations keep their intersection: the smallest offset.
        spec = MaskSpec("causal", predicate=str(pred), offset=min(offsets), runtime=bool(runtime), proof="symbolic")
        if sized:
            spec = replace(spec, density=kept_count(spec, n, m) / (n * m))
        return spec
    if structured:
        found = mask_classes.classify_structured(sympy.And(*positional), bool(runtime), n, m)
        if found is not None:
            return _causal_if_unbounded(replace(found, predicate=str(pred)), n, m)
    return MaskSpec("arbitrary", predicate=str(pred), runtime=bool(runtime))


def _causal_if_unbounded(spec: MaskSpec, n: int | None, m: int | None) -> MaskSpec:
    """A 1-D causal window wider than every query's history is causal: 0 ≤ p + o − m ≤ w with
    w ≥ N − 1 + o never binds below (an edit that changes nothing of a tril, proven on the sizes)."""
    if (n is None or spec.kind != "neighborhood" or len(spec.grid) != 1 or not spec.causal[0]
            or spec.dilation[0] != 1 or spec.window[0] < n - 1 + spec.offset):
        return spec
    return MaskSpec("causal", predicate=spec.predicate, offset=spec.offset, runtime=spec.runtime,
                    density=spec.density, proof=spec.proof)


def check_causal(mask: torch.Tensor, offset: int) -> bool:
    """The concrete check behind a causal classification: the tensor the graph computed
    (keep = True) equals m <= p + offset everywhere."""
    n, m = mask.shape[-2], mask.shape[-1]
    i = torch.arange(n, device=mask.device)[:, None]
    j = torch.arange(m, device=mask.device)[None, :]
    return bool(torch.equal(mask.to(torch.bool), (j <= i + offset).expand_as(mask)))
