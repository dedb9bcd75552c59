"""The symbolic lifter: a mask (or where-built bias) node of an ATen graph → a sympy value.

A mask built from ``arange``, arithmetic, comparisons, ``tril``/``triu``, logical operators,
``where`` and in-place edits depends only on positions: it is evaluated symbolically, over one
integer symbol per tensor axis. Anything that reads a run-time tensor (a padding mask indexed by
batch and key, a model input) becomes an opaque predicate ``R_k(axes)``, so a mask such as
Hugging Face's ``causal & padding[b, m]`` splits into a proven causal part and a run-time part.

Every op modelled is modelled exactly, at every size the graph was traced with, in the dtype it
computes in (patterns/lift_exact.py): integer arithmetic without overflow, float arithmetic only
where every value is exactly representable, division in each rounding mode, Python's slice
normalisation, casts as torch casts. An op that is not (or not exactly) modelled raises `Opaque`
naming the op and why, and the mask is then applied as the graph computes it. The rules live in
patterns/lift_arith.py (elementwise), lift_layout.py (sizes, views, casts), lift_edits.py
(indexing, scatters); the passes classify what this returns (passes/masks.py).
"""

from __future__ import annotations

import sympy
from torch.fx import Node

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM

from . import lift_arith, lift_edits, lift_layout  # noqa: F401 - they register their rules
from .lift_core import Opaque, SymVal, fold_piecewise, is_bool, value
from .lift_exact import as_boolean

__all__ = ["Opaque", "SymVal", "at_positions", "bias_predicate", "is_bool", "keep_predicate",
           "keep_predicate_and_axes", "lift"]


def lift(node: Node) -> SymVal:
    """The symbolic value of a mask (or a where-built bias) node."""
    return value(node, {})


def keep_predicate(node: Node, invert: bool, row_axis: int, col_axis: int) -> sympy.Basic:
    """The keep predicate of a bool mask over the score position symbols (p, m).
    row_axis/col_axis: which dims of the mask tensor line up with queries and keys (or None)."""
    return keep_predicate_and_axes(node, invert, row_axis, col_axis)[0]


def keep_predicate_and_axes(node: Node, invert: bool, row_axis: int, col_axis: int) -> tuple[sympy.Basic, SymVal]:
    """``keep_predicate`` and the lifted value whose axis symbols it uses."""
    v = lift(node)
    expr = at_positions(as_boolean(v), v, row_axis, col_axis)
    return (sympy.Not(expr) if invert else expr), v


def at_positions(expr: sympy.Basic, v: SymVal, row_axis: int | None, col_axis: int | None) -> sympy.Basic:
    """Rename the symbols of the dims that line up with queries and keys to p and m (a dim of
    size 1 has no symbol: the mask is the same for every query, or key, there)."""
    subs = {}
    if row_axis is not None and v.axes[row_axis] is not None:
        subs[v.axes[row_axis]] = P_SYM
    if col_axis is not None and v.axes[col_axis] is not None:
        subs[v.axes[col_axis]] = M_SYM
    return expr.xreplace(subs)


def bias_predicate(node: Node, row_axis, col_axis) -> tuple[sympy.Basic, float] | None:
    """A bias that is 0 where it keeps and one fill elsewhere (``where(keep, 0, fill)``, a
    ``masked_fill`` of zeros, edited in place or not): (keep predicate over p, m, fill)."""
    v = lift(node)
    e = sympy.piecewise_fold(v.expr) if isinstance(v.expr, sympy.Piecewise) else v.expr
    if not isinstance(e, sympy.Piecewise):
        return None
    if not all(val.is_Number for val, _ in e.args) or e.args[-1][1] is not sympy.true:
        return None
    fills = {float(val) for val, _ in e.args if not val.is_zero}  # (0.0 == 0 is False in sympy)
    if len(fills) != 1:
        return None
    keep = fold_piecewise(sympy.Piecewise(*[(sympy.true if val.is_zero else sympy.false, c) for val, c in e.args]))
    return at_positions(keep, v, row_axis, col_axis), fills.pop()
