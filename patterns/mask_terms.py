"""Read every mask and bias operand of a matched softmax site into a `MaskTerm`.

This is where the graph is read for the mask proofs, once: each operand is lifted to its keep
predicate over the query/key positions (patterns/lift.py), its value is made available as a
thunk (constant-folded when it depends on no input, or the first call's value), and a run-time
bool mask that is a table read per block is recognised. The passes then decide from the terms
and never look at the graph (passes/plan.py).
"""

from __future__ import annotations

import functools
import math

import sympy
import torch
from torch.fx import Node

from rewrite.ir.cascade import Cascade
from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.site import MaskTerm, Site, TensorPlan

from . import lift
from .constants import constant_value
from .softmax_chain import scalar_value

aten = torch.ops.aten


def canonical_value(tp: TensorPlan, inputs: dict[Node, object] | None = None) -> torch.Tensor | None:
    """The operand's value in the canonical layout ([*batch, N, M] broadcastable): constant-folded,
    or on ``inputs`` (placeholder → the first call's value) when given. None if it cannot be had."""
    val = constant_value(tp.node, inputs=inputs)
    if val is None:
        return None
    return val.permute(tp.perm).reshape(tp.shape)


def _keep_term(kp: TensorPlan, inputs) -> MaskTerm:
    pred, failure, table = None, "", None
    try:
        pred, v = lift.keep_predicate_and_axes(kp.node, kp.invert, kp.rows_dim, kp.cols_dim)
        table = _block_table(kp, pred, v)
    except lift.Opaque as exc:
        failure = str(exc) or "an op the lifter does not model"
    except (TypeError, ValueError, AttributeError) as exc:  # a lifter bug must not make a proof: not lifted
        pred, table, failure = None, None, f"lifter error ({type(exc).__name__}: {str(exc).strip()[:80]})"
    return MaskTerm(kp, False, pred, None, failure, constant=lambda: _bool_value(kp, None),
                    first_value=lambda: _bool_value(kp, inputs), block_table=table)


def _bias_term(bp: TensorPlan, inputs) -> MaskTerm:
    pred, fill, failure = None, None, ""
    try:
        res = lift.bias_predicate(bp.node, bp.rows_dim, bp.cols_dim)
    except lift.Opaque as exc:
        res, failure = None, str(exc) or "an op the lifter does not model"
    except (TypeError, ValueError, AttributeError) as exc:  # a lifter bug must not make a proof: not lifted
        res, failure = None, f"lifter error ({type(exc).__name__}: {str(exc).strip()[:80]})"
    if res is None and (split := _fill_over_values(bp)) is not None:
        res = split
        why = failure or "not a where(keep, 0, fill)"
        failure = (f"a constant fill outside a lifted keep, over values the lifter does not model ({why}): "
                   "the keep gives the structure, the tensor is applied as given")
    if res is not None:
        pred, fill = res
        fill = (-fill if bp.negate else fill) * bp.factor
    elif not failure:
        failure = "not of the form where(keep, 0, fill)"

    def value(ins):
        val = canonical_value(bp, ins)
        return None if val is None else (-val if bp.negate else val)

    return MaskTerm(bp, True, pred, fill, failure, constant=lambda: value(None), first_value=lambda: value(inputs))


def _fill_over_values(bp: TensorPlan) -> tuple[sympy.Basic, float] | None:
    """A bias that is a constant fill outside a liftable keep and run-time values inside it
    (Falcon's ALiBi folded into its mask: ``masked_fill(alibi, mask < -1, finfo.min)``):
    (keep ∧ R_<bias>(p, m), fill). The opaque factor marks the values: the tensor stays, applied
    as the graph computes it, and the keep's position-only factors give the tiles."""
    node = bp.node
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
        values, cond, fill, keep_where = node.args[0], node.args[1], scalar_value(node.args[2]), False
    elif node.target in (aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar):
        cond, a, b = node.args[:3]
        fa, fb = scalar_value(a), scalar_value(b)
        if (fa is None) == (fb is None):
            return None
        values, fill, keep_where = (b, fa, False) if fa is not None else (a, fb, True)
    else:
        return None
    out, c_val = node.meta.get("val"), getattr(cond, "meta", {}).get("val")
    if fill is None or not isinstance(values, Node) or not isinstance(out, torch.Tensor) \
            or not isinstance(c_val, torch.Tensor) or c_val.dtype != torch.bool:
        return None
    shift = out.dim() - c_val.dim()

    def own(dim):
        return None if dim is None or dim < shift else dim - shift

    try:
        keep = lift.keep_predicate(cond, not keep_where, own(bp.rows_dim), own(bp.cols_dim))
    except (lift.Opaque, TypeError, ValueError, AttributeError):
        return None
    fill = float(torch.tensor(fill, dtype=torch.float64).to(out.dtype))  # as the bias holds it
    return sympy.And(keep, sympy.Ne(sympy.Function(f"R_{node.name}")(P_SYM, M_SYM), 0)), fill


def _bool_value(kp: TensorPlan, inputs) -> torch.Tensor | None:
    """A bool mask's keep value (True = kept) in the canonical layout."""
    val = canonical_value(kp, inputs)
    if val is None:
        return None
    if val.dtype != torch.bool:
        val = val != 0
    return ~val if kp.invert else val


def read_terms(site: Site, inputs: dict[Node, object] | None) -> Site:
    """Fill ``site.terms`` (keeps, then biases) and ``site.cascade``."""
    site.terms = [_keep_term(kp, inputs) for kp in site.keeps] + [_bias_term(bp, inputs) for bp in site.biases]
    factors = []
    for i, t in enumerate(site.terms):
        if t.predicate is not None and (not t.is_bias or t.fill == float("-inf")):
            factors.append(_boolean(t.predicate))
        elif not t.is_bias:
            factors.append(_boolean(sympy.Function(f"R_term{i}")(P_SYM, M_SYM)))
    pred = sympy.And(*factors) if factors else None
    if site.causal:
        causal = sympy.Le(M_SYM, P_SYM + site.causal_offset)
        pred = causal if pred is None else sympy.And(pred, causal)
    lead = site.batch_sizes or [1]
    sizes = dict(p=site.n, m=site.m, e=site.e, f=site.f, b=math.prod(lead[:-1]), h=lead[-1])
    site.cascade = Cascade.softmax_attention(mask=pred, batch="bh").with_sizes(**sizes)
    dtypes = [tp.node.meta["val"].dtype for tp in (site.q, site.k, site.v)
              if isinstance(tp.node.meta.get("val"), torch.Tensor)]
    site.dtype = functools.reduce(torch.promote_types, dtypes) if len(dtypes) == 3 else None
    return site


def _boolean(f: sympy.Basic) -> sympy.Basic:
    """A run-time tensor's opaque value R(…) as a Boolean factor (sympy's And takes no functions)."""
    return f if isinstance(f, sympy.logic.boolalg.Boolean) and not isinstance(f, sympy.Function) else sympy.Ne(f, 0)


def _block_table(kp: TensorPlan, pred, v: lift.SymVal) -> tuple[TensorPlan, int, int] | None:
    """A run-time bool mask that is a table read per block, ``T[.., ⌊p/bq⌋, ⌊m/bk⌋]``
    (repeat_interleave, expand+reshape): (a plan giving T as [*batch, ⌈N/bq⌉, ⌈M/bk⌉], bq, bk)."""
    if isinstance(pred, sympy.Ne) and pred.rhs == 0:
        pred = pred.lhs  # a bool table read as a keep: T[…] ≠ 0
    if not isinstance(pred, sympy.core.function.AppliedUndef):
        return None
    name = type(pred).__name__[2:]  # R_<node name>
    src = next((n for n in kp.node.graph.nodes if n.name == name), None)
    shape = list(src.meta["val"].shape) if src is not None and "val" in src.meta else None
    if shape is None or src.meta["val"].dtype != torch.bool:
        return None
    canon = {ax: kp.perm.index(d) for d, ax in enumerate(v.axes) if ax is not None}  # symbol → canonical dim
    rank = len(kp.shape)
    src_dims = [d for d, sz in enumerate(shape) if sz != 1]
    if len(src_dims) != len(pred.args):
        return None
    target = [1] * rank
    order: list[tuple[int, int]] = []  # (canonical dim, source dim)
    bq = bk = None
    for d, arg in zip(src_dims, pred.args):
        if arg in (P_SYM, M_SYM):
            blk, sym = 1, arg
        elif isinstance(arg, sympy.floor) and len(arg.args[0].free_symbols) == 1:
            sym = next(iter(arg.args[0].free_symbols))
            blk = sympy.simplify(sym / arg.args[0])
            if not blk.is_Integer or int(blk) < 1:
                return None
            blk = int(blk)
        elif arg in canon and arg not in (P_SYM, M_SYM):
            c = canon[arg]
            if c >= rank - 2 or kp.shape[c] != shape[d]:
                return None
            target[c] = shape[d]
            order.append((c, d))
            continue
        else:
            return None
        if sym == P_SYM and bq is None:
            bq, c = blk, rank - 2
        elif sym == M_SYM and bk is None:
            bk, c = blk, rank - 1
        else:
            return None
        target[c] = shape[d]
        order.append((c, d))
    n, m = kp.shape[-2], kp.shape[-1]
    bq = bq if bq is not None else n  # no query index: one block of all rows
    if bk is None or bk == 1 and bq == 1 or target[-2] != -(-n // bq) or target[-1] != -(-m // bk):
        return None
    perm = [d for _, d in sorted(order)] + [d for d in range(len(shape)) if d not in {d for _, d in order}]
    return TensorPlan(src, perm, target), bq, bk
