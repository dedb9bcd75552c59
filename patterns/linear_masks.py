"""The masks of the quadratic linear-attention form: which dims of a mask line up with the scores, its keep
predicate for the cascade (patterns/lift.py), and its value, which decides (passes/linearize.py).

The value is what the graph computes: the capture is functional, so a mask built by ``tril`` and then
edited (``keep[5, 3] = False``, ``keep[:, 0] = True``) reaches here as ``select_scatter``/``index_put``
of the built mask, and `constant_value` evaluates the edit with the rest. The predicate is only shown: an
edit the lifter does not model leaves it opaque (``mask(p,m)``), never wrong, and never decides.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy
import torch
from torch.fx import Node

from . import lift
from .axes import AtomSizes, Axes, NoMatch


def align(shape: tuple[int, ...], target: Axes, sizes: AtomSizes) -> tuple[int | None, int | None]:
    """Dims of a broadcast mask that line up with the p and m axes of ``target`` (or None)."""
    r = len(shape)
    off = len(target) - r
    rows = cols = None
    for i, s in enumerate(shape):
        j = i + off
        if j < 0:
            if s != 1:
                raise NoMatch("a mask has more dims than the scores")
            continue
        if s == 1:
            continue
        if s != sizes.of(target[j]):
            raise NoMatch("a mask does not broadcast to the scores")
        if target[j] == ("p",):
            rows = i
        elif target[j] == ("m",):
            cols = i
        else:
            raise NoMatch("a mask varies along a batch axis (a run-time mask)")
    return rows, cols


def mask_predicate(node: Node, invert: bool, rows, cols) -> sympy.Basic:
    """The keep predicate over (p, m) of a bool or 0/1 mask (patterns/lift.py), or NoMatch."""
    try:
        v = lift.lift(node)
    except lift.Opaque as exc:
        raise NoMatch(f"the mask cannot be analysed ({exc})") from exc
    expr = v.expr
    if isinstance(expr, sympy.Piecewise) and len(expr.args) == 2 and expr.args[1][0] == 0 and expr.args[0][0] == 1:
        expr = expr.args[0][1]
    if not lift.is_bool(expr):
        if expr == 1:
            expr = sympy.true
        else:
            raise NoMatch("the mask's values are not 0/1")
    expr = lift.at_positions(expr, v, rows, cols)
    expr = sympy.Not(expr) if invert else expr
    if not lift.is_bool(expr):  # e.g. an edit the lifter reads as a run-time value, R(p, m)
        raise NoMatch("the mask's keep predicate is not a boolean over positions")
    return expr


def mask_2d(val: torch.Tensor, rows, cols) -> torch.Tensor | None:
    """A constant mask as [n, m] (None when it varies along other dims)."""
    dims = [d for d in (rows, cols) if d is not None]
    other = [d for d in range(val.dim()) if d not in dims]
    if any(val.shape[d] != 1 for d in other):
        return None
    v = val.permute(*other, *dims).reshape(*(val.shape[d] for d in dims))
    if rows is None:
        v = v.unsqueeze(0)
    if cols is None:
        v = v.unsqueeze(-1)
    return v


@dataclass
class MaskReading:
    pred: sympy.Basic | None = None  # the conjunction of the keep predicates; None: no mask
    keep: torch.Tensor | None = None  # the conjunction of the masks' values
    rejected: str | None = None


def read_masks(masks: list[tuple[Node, bool, int | None, int | None]], n: int, m: int) -> MaskReading:
    """(mask node, inverted, row dim, col dim) of every mask step → predicate, value over the site's
    [n, m] scores (a mask broadcast along queries or keys is expanded: it keeps what it keeps there),
    or the reason."""
    from rewrite.patterns.constants import constant_value

    out = MaskReading()
    preds = []
    for node, invert, rows, cols in masks:
        try:
            preds.append(mask_predicate(node, invert, rows, cols))
        except NoMatch:
            preds.append(sympy.Symbol("mask(p,m)"))
        val = constant_value(node)
        if val is not None and val.dtype != torch.bool and not bool(((val == 0) | (val == 1)).all()):
            out.rejected = out.rejected or ("the scores are multiplied by a matrix whose values are not 0/1 "
                                            "(a weight; a float decay γ^(p−m) is read by linear_decay.py): not a mask")
            continue
        keep = None if val is None else mask_2d(~val.to(torch.bool) if invert else val.to(torch.bool), rows, cols)
        if keep is None:
            out.rejected = out.rejected or "the mask is a run-time tensor (or varies along batch): no O(N) form"
        else:
            keep = keep.expand(n, m)
            out.keep = keep if out.keep is None else out.keep & keep
    out.pred = sympy.And(*preds) if preds else None
    return out
