"""The symbolic lifter: a mask (or where-built bias) node of an ATen graph → a sympy value.

A mask built from ``arange``, comparisons, ``tril``/``triu``, logical operators and ``where``
depends only on positions: it is evaluated symbolically here, over one integer symbol per tensor
axis. Anything that reads a run-time tensor (a padding mask indexed by batch and key, a model
input) becomes an opaque predicate ``R_k(axes)``, so a mask such as Hugging Face's
``causal & padding[b, m]`` splits into a proven causal part and a run-time part.

Every op modelled here is modelled exactly, at every size; an op that is not (or not exactly)
raises `Opaque`, and the mask is then treated as a run-time tensor (applied as the graph
computes it). The passes classify what this returns (passes/masks.py).
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass

import sympy
import torch
from torch.fx import Node

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM

aten = torch.ops.aten


class Opaque(Exception):
    pass


@dataclass
class SymVal:
    expr: sympy.Basic  # a number, an integer expression or a Boolean over axis symbols
    axes: tuple  # one symbol (or None: broadcast) per dim
    shape: tuple[int, ...]


_counter = itertools.count()


def _fresh(prefix="i"):
    return sympy.Symbol(f"{prefix}{next(_counter)}", integer=True, nonnegative=True)


def _shape(node):
    v = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def _broadcast(a: SymVal, b: SymVal):
    """Align axes right, numpy style. Every result dim gets its own fresh position symbol:
    the same arange used as rows in one operand and as columns in the other
    (``i[:, None] - i[None, :]``) must stay two positions, not one."""
    ra, rb = len(a.axes), len(b.axes)
    r = max(ra, rb)
    ax_a = (None,) * (r - ra) + a.axes
    ax_b = (None,) * (r - rb) + b.axes
    sh_a = (1,) * (r - ra) + a.shape
    sh_b = (1,) * (r - rb) + b.shape
    sub_a, sub_b = {}, {}
    axes, shape = [], []
    for x, y, sx, sy in zip(ax_a, ax_b, sh_a, sh_b):
        t = _fresh() if (x is not None or y is not None) else None
        if x is not None:
            sub_a[x] = t
        if y is not None:
            sub_b[y] = t
        axes.append(t)
        shape.append(max(sx, sy))
    return a.expr.xreplace(sub_a), b.expr.xreplace(sub_b), tuple(axes), tuple(shape)


def _fold_piecewise(expr):
    """``Eq(Piecewise((1, c), (0, True)), 0)`` → ``¬c``: comparisons of a where-built tensor."""
    if not expr.has(sympy.Piecewise) or not is_bool(expr):
        return expr
    folded = sympy.piecewise_fold(expr)
    if not isinstance(folded, sympy.Piecewise):
        return folded
    terms, seen = [], sympy.false
    for val, cond in folded.args:
        val = sympy.true if val in (True, sympy.true) else sympy.false if val in (False, sympy.false) else val
        if not is_bool(val):
            return expr
        terms.append(sympy.And(cond, sympy.Not(seen), val))
        seen = sympy.Or(seen, cond)
    return sympy.Or(*terms)


def _binary(fn):
    def rule(node, env):
        a, b = (_value(x, env) for x in node.args[:2])
        ea, eb, axes, shape = _broadcast(a, b)
        return SymVal(_fold_piecewise(fn(ea, eb)), axes, shape)
    return rule


def _const(x) -> SymVal:
    if isinstance(x, bool):
        return SymVal(sympy.true if x else sympy.false, (), ())
    if isinstance(x, (int, float)):
        return SymVal(sympy.sympify(x), (), ())
    raise Opaque(str(x))


def _value(x, env) -> SymVal:
    if not isinstance(x, Node):
        return _const(x)
    if x in env:
        return env[x]
    env[x] = _evaluate(x, env)
    return env[x]


def _arange(node, env):
    args = list(node.args)
    if node.target == aten.arange.default:
        start, end, step = 0, args[0], 1
    elif node.target == aten.arange.start:
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args[0], args[1], args[2]
    i = _fresh()
    n = len(range(int(start), int(end), int(step)))
    return SymVal(start + step * i, (i,), (n,))


def _filled(node, env):
    shape = _shape(node)
    if node.target in (aten.full.default, aten.full_like.default, aten.new_full.default):
        value = node.args[1] if node.target != aten.new_full.default else node.args[2]
    elif node.target in (aten.zeros.default, aten.zeros_like.default, aten.new_zeros.default):
        value = 0
    else:
        value = 1
    if _shape(node) is not None and node.meta["val"].dtype == torch.bool:
        value = bool(value)
    v = _const(value)
    return SymVal(v.expr, (None,) * len(shape), shape)


def _layout(node, env):
    a = _value(node.args[0], env)
    t = node.target
    shape = _shape(node)
    if t in (aten.unsqueeze.default,):
        d = node.args[1]
        d = d + len(a.axes) + 1 if d < 0 else d
        return SymVal(a.expr, (*a.axes[:d], None, *a.axes[d:]), shape)
    if t in (aten.expand.default,):
        lead = len(shape) - len(a.axes)
        return SymVal(a.expr, (None,) * lead + a.axes, shape)
    if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.squeeze.dim,
             aten.squeeze.default, aten.squeeze.dims):
        return _reshape(a, shape)
    if t == aten.slice.Tensor:
        dim = node.args[1] if len(node.args) > 1 else 0
        dim = dim + len(a.axes) if dim < 0 else dim
        start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
        step = node.args[4] if len(node.args) > 4 else 1
        ax = a.axes[dim]
        if ax is None:
            return SymVal(a.expr, a.axes, shape)
        new = _fresh()
        axes = list(a.axes)
        axes[dim] = new
        return SymVal(a.expr.xreplace({ax: start + step * new}), tuple(axes), shape)
    if t in (aten.transpose.int, aten.permute.default, aten.t.default):
        if t == aten.permute.default:
            order = list(node.args[1])
        else:
            order = list(range(len(a.axes)))
            d0, d1 = (node.args[1:3] if t == aten.transpose.int else (0, 1))
            d0, d1 = (d % len(order) for d in (d0, d1))
            order[d0], order[d1] = order[d1], order[d0]
        return SymVal(a.expr, tuple(a.axes[d] for d in order), shape)
    return SymVal(a.expr, a.axes, shape)  # casts, clones, aliases


def _reshape(a: SymVal, shape: tuple[int, ...]) -> SymVal:
    """A row-major reshape: dims are grouped into runs of equal extent; inside a run the flat
    index F = Σ new_j · stride_j gives each old coordinate as ⌊F / stride_i⌋ mod size_i."""
    old = [(ax, sz) for ax, sz in zip(a.axes, a.shape) if sz != 1]
    new_sizes = [sz for sz in shape if sz != 1]
    if math.prod(sz for _, sz in old) != math.prod(new_sizes):
        raise Opaque("a reshape of another size")
    subs, new_axes, i, j = {}, [], 0, 0
    while i < len(old) or j < len(new_sizes):
        oi, nj = i + 1, j + 1
        po, pn = old[i][1] if i < len(old) else 1, new_sizes[j] if j < len(new_sizes) else 1
        while po != pn:  # grow the smaller side until both runs cover the same extent
            if po < pn:
                po *= old[oi][1]
                oi += 1
            else:
                pn *= new_sizes[nj]
                nj += 1
        syms = [_fresh() for _ in range(j, nj)]
        flat = sum(sym * math.prod(new_sizes[t + 1:nj]) for sym, t in zip(syms, range(j, nj)))
        for t in range(i, oi):
            ax, sz = old[t]
            if ax is not None:
                stride = math.prod(o[1] for o in old[t + 1:oi])
                coord = sympy.floor(flat / stride) if stride > 1 else flat
                subs[ax] = coord if t == i else sympy.Mod(coord, sz)
        new_axes += syms
        i, j = oi, nj
    it = iter(new_axes)
    axes = tuple(next(it) if sz != 1 else None for sz in shape)
    return SymVal(a.expr.xreplace(subs), axes, tuple(shape))


def _repeat_interleave(node, env):
    """repeat_interleave(x, r, dim): out[.., j, ..] = x[.., ⌊j / r⌋, ..] (block-granular masks)."""
    a = _value(node.args[0], env)
    reps, dim = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
    if not isinstance(reps, int) or dim is None:
        raise Opaque("repeat_interleave without an int count and a dim")
    dim = dim + len(a.axes) if dim < 0 else dim
    new = _fresh()
    axes = list(a.axes)
    expr = a.expr.xreplace({axes[dim]: sympy.floor(new / reps)}) if axes[dim] is not None else a.expr
    axes[dim] = new
    return SymVal(expr, tuple(axes), _shape(node))


def _tri(lower: bool):
    def rule(node, env):
        a = _value(node.args[0], env)
        k = node.args[1] if len(node.args) > 1 else node.kwargs.get("diagonal", 0)
        axes = list(a.axes)
        for d in (-2, -1):
            if axes[d] is None:
                axes[d] = _fresh()
        row, col = axes[-2], axes[-1]
        cond = sympy.Le(col, row + k) if lower else sympy.Ge(col, row + k)
        expr = a.expr
        if is_bool(expr):
            return SymVal(sympy.And(expr, cond), tuple(axes), a.shape)
        return SymVal(sympy.Piecewise((expr, cond), (0, True)), tuple(axes), a.shape)
    return rule


def _where(node, env):
    return _select(*(_value(x, env) for x in node.args[:3]))


def _masked_fill(node, env):
    """masked_fill(x, c, v) is where(c, v, x)."""
    x, c, v = (_value(a, env) for a in node.args[:3])
    return _select(c, v, x)


def _select(c: SymVal, a: SymVal, b: SymVal) -> SymVal:
    ec, ea, axes, shape = _broadcast(c, a)
    cc = SymVal(ec, axes, shape)
    ec, eb, axes, shape = _broadcast(cc, b)
    ec = _as_bool(ec)  # a run-time bool mask as the condition: R(…) ≠ 0
    ea = ea.xreplace({}) if ea is not None else ea
    return SymVal(sympy.Piecewise((ea, ec), (eb, True)), axes, shape)


def _logical_not(node, env):
    a = _value(node.args[0], env)
    return SymVal(sympy.Not(a.expr), a.axes, a.shape)


def _runtime(node, env):
    """A run-time tensor: an opaque predicate over its own axes."""
    shape = _shape(node)
    if shape is None:
        raise Opaque(node.name)
    axes = tuple(_fresh("r") if s != 1 else None for s in shape)
    fn = sympy.Function(f"R_{node.name}")
    args = [a for a in axes if a is not None]
    expr = fn(*args) if args else sympy.Symbol(f"R_{node.name}")
    return SymVal(expr, axes, shape)


def _index(node, env):
    """``t[i0, i1, ...]`` with index tensors built from aranges. If t itself is known
    symbolically (an expanded arange of positions), substitute; otherwise t is a run-time
    tensor and the result is the opaque ``R_t(i0, i1, ...)``."""
    src, indices = node.args[:2]
    if not isinstance(src, Node) or any(i is None for i in indices):
        raise Opaque("index")
    vals = [_value(i, env) for i in indices]
    cur = vals[0]
    exprs = [cur.expr]
    for v in vals[1:]:
        ea, eb, axes, shape = _broadcast(cur, v)
        exprs = [e.xreplace({}) for e in exprs] + [eb]
        cur = SymVal(ea, axes, shape)
    try:
        sv = _value(src, env)
    except Opaque:
        sv = None
    if sv is not None and not sv.expr.atoms(sympy.core.function.AppliedUndef) and len(sv.axes) >= len(exprs):
        subs = {ax: e for ax, e in zip(sv.axes, exprs) if ax is not None}
        return SymVal(sv.expr.xreplace(subs), cur.axes, _shape(node))
    fn = sympy.Function(f"R_{src.name}")
    return SymVal(fn(*exprs), cur.axes, _shape(node))


def _andor(fn):
    def rule(node, env):
        a, b = (_value(x, env) for x in node.args[:2])
        ea, eb, axes, shape = _broadcast(a, b)
        if is_bool(ea) or is_bool(eb) or isinstance(ea, sympy.Function) or isinstance(eb, sympy.Function):
            return SymVal(fn(_as_bool(ea), _as_bool(eb)), axes, shape)
        raise Opaque("bitwise op on integers")
    return rule


def is_bool(e) -> bool:
    return isinstance(e, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational))


def _as_bool(e):
    if is_bool(e):
        return e
    if isinstance(e, sympy.Number):
        return sympy.true if e != 0 else sympy.false
    if isinstance(e, (sympy.core.function.AppliedUndef, sympy.Symbol)):
        return sympy.Ne(e, 0)  # a run-time boolean
    return sympy.Ne(e, 0)


def _clamp(node, env):
    """clamp / clamp_min / clamp_max with scalar or tensor bounds: Min/Max (NATTEN's
    edge-clamped window start is written this way)."""
    a = _value(node.args[0], env)
    t = node.target
    if t in (aten.clamp_min.default, aten.clamp_min.Tensor):
        lo, hi = node.args[1], None
    elif t in (aten.clamp_max.default, aten.clamp_max.Tensor):
        lo, hi = None, node.args[1]
    else:
        lo = node.args[1] if len(node.args) > 1 else node.kwargs.get("min")
        hi = node.args[2] if len(node.args) > 2 else node.kwargs.get("max")
    expr, axes, shape = a.expr, a.axes, a.shape
    # torch.clamp applies min first, then max (so hi wins when lo > hi): Min(Max(x, lo), hi).
    for bound, fn in ((lo, sympy.Max), (hi, sympy.Min)):
        if bound is None:
            continue
        b = _value(bound, env)
        ea, eb, axes, shape = _broadcast(SymVal(expr, axes, shape), b)
        if is_bool(ea) or is_bool(eb):
            raise Opaque("clamp of a boolean")
        expr = fn(ea, eb)
    return SymVal(expr, axes, shape)


def _minmax(fn):
    def rule(node, env):
        a, b = (_value(x, env) for x in node.args[:2])
        ea, eb, axes, shape = _broadcast(a, b)
        if is_bool(ea) or is_bool(eb):
            raise Opaque("minimum of booleans")
        return SymVal(fn(ea, eb), axes, shape)
    return rule


def _mul(node, env):
    a, b = (_value(x, env) for x in node.args[:2])
    ea, eb, axes, shape = _broadcast(a, b)
    if is_bool(ea) or is_bool(eb):
        return SymVal(sympy.And(_as_bool(ea), _as_bool(eb)), axes, shape)
    return SymVal(ea * eb, axes, shape)


_RULES = {
    aten.arange.default: _arange, aten.arange.start: _arange, aten.arange.start_step: _arange,
    aten.ones.default: _filled, aten.zeros.default: _filled, aten.full.default: _filled,
    aten.ones_like.default: _filled, aten.zeros_like.default: _filled, aten.full_like.default: _filled,
    aten.new_ones.default: _filled, aten.new_zeros.default: _filled, aten.new_full.default: _filled,
    aten.add.Tensor: _binary(operator.add), aten.sub.Tensor: _binary(operator.sub),
    aten.rsub.Scalar: _binary(lambda a, b: b - a), aten.rsub.Tensor: _binary(lambda a, b: b - a),
    aten.mul.Tensor: _mul, aten.floor_divide.default: _binary(lambda a, b: sympy.floor(a / b)),
    aten.div.Tensor_mode: _binary(lambda a, b: sympy.floor(a / b)),
    aten.remainder.Tensor: _binary(sympy.Mod), aten.remainder.Scalar: _binary(sympy.Mod),
    aten.abs.default: lambda n, env: (lambda a: SymVal(sympy.Abs(a.expr), a.axes, a.shape))(_value(n.args[0], env)),
    aten.neg.default: lambda n, env: (lambda a: SymVal(-a.expr, a.axes, a.shape))(_value(n.args[0], env)),
    aten.le.Tensor: _binary(sympy.Le), aten.le.Scalar: _binary(sympy.Le),
    aten.lt.Tensor: _binary(sympy.Lt), aten.lt.Scalar: _binary(sympy.Lt),
    aten.ge.Tensor: _binary(sympy.Ge), aten.ge.Scalar: _binary(sympy.Ge),
    aten.gt.Tensor: _binary(sympy.Gt), aten.gt.Scalar: _binary(sympy.Gt),
    aten.eq.Tensor: _binary(sympy.Eq), aten.eq.Scalar: _binary(sympy.Eq),
    aten.ne.Tensor: _binary(sympy.Ne), aten.ne.Scalar: _binary(sympy.Ne),
    aten.logical_and.default: _andor(sympy.And), aten.bitwise_and.Tensor: _andor(sympy.And),
    aten.__and__.Tensor: _andor(sympy.And), aten.logical_or.default: _andor(sympy.Or),
    aten.bitwise_or.Tensor: _andor(sympy.Or), aten.__or__.Tensor: _andor(sympy.Or),
    aten.logical_not.default: _logical_not, aten.bitwise_not.default: _logical_not,
    aten.tril.default: _tri(True), aten.triu.default: _tri(False),
    aten.where.self: _where, aten.where.ScalarOther: _where, aten.where.ScalarSelf: _where, aten.where.Scalar: _where,
    aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.repeat_interleave.self_int: _repeat_interleave,
    aten.index.Tensor: _index,
    aten.clamp.default: _clamp, aten.clamp.Tensor: _clamp, aten.clamp_min.default: _clamp,
    aten.clamp_min.Tensor: _clamp, aten.clamp_max.default: _clamp, aten.clamp_max.Tensor: _clamp,
    aten.minimum.default: _minmax(sympy.Min), aten.maximum.default: _minmax(sympy.Max),
}
_LAYOUT = {aten.unsqueeze.default, aten.expand.default, aten.view.default, aten.reshape.default,
           aten._unsafe_view.default, aten.squeeze.dim, aten.squeeze.default, aten.squeeze.dims,
           aten.slice.Tensor, aten.transpose.int, aten.permute.default, aten.t.default, aten.clone.default,
           aten.contiguous.default, aten.alias.default, aten._to_copy.default, aten.to.dtype,
           aten.to.dtype_layout, aten.to.device, aten.lift_fresh_copy.default, aten.detach.default,
           aten.type_as.default}


def _evaluate(node: Node, env) -> SymVal:
    if node.op == "call_function":
        if node.target in _RULES:
            return _RULES[node.target](node, env)
        if node.target in _LAYOUT:
            return _layout(node, env)
    return _runtime(node, env)


def lift(node: Node) -> SymVal:
    """The symbolic value of a mask (or a where-built bias) node."""
    return _value(node, {})


def keep_predicate(node: Node, invert: bool, row_axis: int, col_axis: int) -> sympy.Basic:
    """The keep predicate of a bool mask over the score position symbols (p, m).
    row_axis/col_axis: which dims of the mask tensor line up with queries and keys (or None)."""
    return keep_predicate_and_axes(node, invert, row_axis, col_axis)[0]


def keep_predicate_and_axes(node: Node, invert: bool, row_axis: int, col_axis: int) -> tuple[sympy.Basic, SymVal]:
    """``keep_predicate`` and the lifted value whose axis symbols it uses."""
    v = lift(node)
    expr = at_positions(_as_bool(v.expr), v, row_axis, col_axis)
    return (sympy.Not(expr) if invert else expr), v


def at_positions(expr: sympy.Basic, v: SymVal, row_axis: int | None, col_axis: int | None) -> sympy.Basic:
    """Rename the symbols of the dims that line up with queries and keys to p and m. The
    coordinate of any other size-1 dim is 0 (a symbol of no dim left belonged to one)."""
    live = {ax for d, ax in enumerate(v.axes) if ax is not None and (v.shape[d] != 1 or d in (row_axis, col_axis))}
    subs = {s: sympy.Integer(0) for s in expr.free_symbols - live if s not in (P_SYM, M_SYM) and s.name[0] in "ir"}
    if row_axis is not None and v.axes[row_axis] is not None:
        subs[v.axes[row_axis]] = P_SYM
    if col_axis is not None and v.axes[col_axis] is not None:
        subs[v.axes[col_axis]] = M_SYM
    return expr.xreplace(subs)


def bias_predicate(node: Node, row_axis, col_axis) -> tuple[sympy.Basic, float] | None:
    """A bias written ``where(keep, 0, fill)``: (keep predicate over p, m, fill)."""
    v = lift(node)
    e = v.expr
    if not isinstance(e, sympy.Piecewise) or len(e.args) != 2:
        return None
    (a, cond), (b, _) = e.args
    if not (a.is_Number and b.is_Number):
        return None
    cond = at_positions(cond, v, row_axis, col_axis)
    if a.is_zero:  # (0.0 == 0 is False in sympy: a float zero is still zero)
        return cond, float(b)
    if b.is_zero:
        return sympy.Not(cond), float(a)
    return None


