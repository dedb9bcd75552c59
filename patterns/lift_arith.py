"""Lifter rules for elementwise ops: arithmetic, division in each rounding mode, comparisons,
logic, where/masked_fill, tril/triu and clamps, each with torch's dtype semantics.

Operands are promoted as torch promotes them (`torch.result_type`), every conversion and every
result is checked to be exact in its dtype (patterns/lift_exact.py), and comparisons are kept as
relations between integers. An op on a run-time value whose exactness cannot be shown takes the
node's own value as an opaque run-time value (exact by definition, it proves nothing).
"""

from __future__ import annotations

import sympy
import torch

from .lift_core import (
    RULES,
    Opaque,
    SymVal,
    arg,
    as_bool,
    aten,
    broadcast,
    dtype_of,
    fold_piecewise,
    fresh,
    has_runtime,
    make,
    runtime,
    value,
)
from .lift_exact import FLOAT_FORMATS, as_boolean, check, convert, integer_bounds, integer_relation, stored


def _dummy(v: SymVal):
    if v.dtype is None:
        return v.scalar
    return torch.empty((1,) * len(v.shape), dtype=v.dtype) if v.shape else torch.empty((), dtype=v.dtype)


def promote(*vals: SymVal) -> torch.dtype:
    """The dtype torch computes an elementwise op of these operands in."""
    out = None
    for v in vals:
        d = _dummy(v)
        if out is None:
            out = d if isinstance(d, torch.Tensor) else torch.tensor(d)
        else:
            out = torch.empty((1,), dtype=torch.result_type(out, d))
    return out.dtype


def _what(node) -> str:
    return f"{node.name} ({node.target})"


def _converted(node, env, vals, dtype):
    """Operands converted to the compute dtype, or None where a run-time operand cannot be."""
    try:
        return [convert(v, dtype, _what(node)) for v in vals]
    except Opaque:
        if any(has_runtime(v.expr) for v in vals):
            return None
        raise


def _float_integer_ok(exprs, rng, dtype) -> bool:
    """Float operands of a rounding division or remainder: integer values of at most 2^bits
    (then every intermediate torch computes is an exact integer)."""
    bits = FLOAT_FORMATS[dtype][0]
    for e in exprs:
        b = integer_bounds(e, rng) if e.is_integer else None
        if b is None or max(abs(b[0]), abs(b[1])) > 1 << bits:
            return False
    return True


def _nonzero(e, rng) -> bool:
    b = integer_bounds(e, rng) if e.is_integer else None
    return b is not None and (b[0] > 0 or b[1] < 0)


def _trunc_div(a, b):
    return sympy.Piecewise((sympy.floor(a / b), a * b >= 0), (-sympy.floor(-a / b), True))


def _arith(kind: str):
    def rule(node, env):
        vals = [value(x, env) for x in node.args[:2]]
        if kind == "rsub":
            vals = vals[::-1]
        out = dtype_of(node)
        if any(has_runtime(v.expr) for v in vals):
            return runtime(node)
        if out == torch.bool:
            if kind not in ("add", "mul"):
                raise Opaque(f"{_what(node)}: {kind} of booleans")
            (ea, eb), axes, shape = broadcast(*vals)
            fn = sympy.Or if kind == "add" else sympy.And
            return make(fn(as_boolean(SymVal(ea, (), (), out)), as_boolean(SymVal(eb, (), (), out))), axes, shape, out)
        a, b = (convert(v, out, _what(node)) for v in vals)
        alpha = node.kwargs.get("alpha", 1)
        if alpha != 1:
            b = check(make(b.expr * value(alpha, env).expr, b.axes, b.shape, out), _what(node))
        (ea, eb), axes, shape = broadcast(a, b)
        probe = make(ea + eb, axes, shape, out)
        rng = {ax: (0, s - 1) for ax, s in zip(probe.axes, probe.shape) if ax is not None}
        if kind in ("add",):
            e = ea + eb
        elif kind in ("sub", "rsub"):
            e = ea - eb
        elif kind == "mul":
            e = ea * eb
        else:
            e = _division(node, kind, ea, eb, rng, out)
        if e.has(sympy.Piecewise) and not isinstance(e, sympy.Piecewise):
            e = sympy.piecewise_fold(e)
        return check(make(e, axes, shape, out), _what(node))
    return rule


def _division(node, kind, a, b, rng, out):
    mode = kind
    if kind == "div":
        mode = node.kwargs.get("rounding_mode", None) if len(node.args) < 3 else node.args[2]
    if not _nonzero(b, rng) and not (b.is_Number and b != 0):
        raise Opaque(f"{_what(node)}: the divisor may be zero")
    if mode is None:
        return a / b  # true division; check() decides whether the quotient is representable
    if out.is_floating_point and not _float_integer_ok((a, b), rng, out):
        raise Opaque(f"{_what(node)}: a rounding division of {out} values that are not small integers")
    if not (a.is_integer and b.is_integer):
        raise Opaque(f"{_what(node)}: a rounding division of non-integers")
    if mode == "floor":
        return sympy.floor(a / b)
    if mode == "trunc":
        lo = integer_bounds(a, rng)
        if b.is_Number and lo is not None and lo[0] >= 0:
            return sympy.floor(a / b) if b > 0 else -sympy.floor(a / -b)
        return _trunc_div(a, b)
    if mode == "mod":
        return sympy.Mod(a, b)  # Python's modulus: the sign of the divisor, as torch.remainder
    if mode == "fmod":
        return a - b * _trunc_div(a, b)
    raise Opaque(f"{_what(node)}: rounding mode {mode!r}")


def _unary(kind: str):
    def rule(node, env):
        a = value(node.args[0], env)
        out = dtype_of(node)
        if has_runtime(a.expr):
            return runtime(node)
        if out == torch.bool or a.dtype == torch.bool:
            if kind == "not":
                return make(sympy.Not(as_boolean(a)), a.axes, a.shape, torch.bool)
            raise Opaque(f"{_what(node)}: {kind} of a boolean")
        a = convert(a, out, _what(node))
        e = a.expr
        if kind == "neg":
            e = -e
        elif kind == "abs":
            e = sympy.Abs(e)
        elif kind == "not":
            if out.is_floating_point:
                raise Opaque(f"{_what(node)}: bitwise not of a float")
            e = -e - 1  # two's complement
        elif kind == "floor":
            e = sympy.floor(e)
        elif kind == "ceil":
            e = sympy.ceiling(e)
        elif kind == "trunc":
            e = e if e.is_integer else sympy.Piecewise((sympy.floor(e), e >= 0), (sympy.ceiling(e), True))
        elif kind == "round" and not e.is_integer:
            raise Opaque(f"{_what(node)}: rounding half to even is not modelled")
        return check(make(e, a.axes, a.shape, out), _what(node))
    return rule


_RELATIONS = {"eq": sympy.Eq, "ne": sympy.Ne, "lt": sympy.Lt, "le": sympy.Le, "gt": sympy.Gt, "ge": sympy.Ge}


def _bool_relation(kind, a, b):
    na, nb = sympy.Not(a), sympy.Not(b)
    return {"eq": sympy.Or(sympy.And(a, b), sympy.And(na, nb)), "ne": sympy.Xor(a, b),
            "lt": sympy.And(na, b), "le": sympy.Or(na, b), "gt": sympy.And(a, nb), "ge": sympy.Or(a, nb)}[kind]


def runtime_values(expr) -> bool:
    """A value read at run time (possibly NaN), not only a run-time choice between constants: HF's
    ``where(causal & padding, 0, finfo.min)`` selects by a run-time bool but its values are the two
    constants, so comparing it (Falcon's ``mask < −1``) is a comparison of each."""
    if isinstance(expr, sympy.Piecewise):
        return any(has_runtime(val) for val, _ in expr.args)
    return has_runtime(expr)


def _compare(kind: str):
    def rule(node, env):
        vals = [value(x, env) for x in node.args[:2]]
        ct = promote(*vals)
        if ct.is_floating_point and any(runtime_values(v.expr) for v in vals):
            return runtime(node)  # NaN: ¬(x ≥ y) is not x < y
        conv = _converted(node, env, vals, ct)
        if conv is None:
            return runtime(node)
        (ea, eb), axes, shape = broadcast(*conv)
        if ct == torch.bool:
            e = _bool_relation(kind, as_bool(ea), as_bool(eb))
        elif has_runtime(ea) or has_runtime(eb):
            e = fold_piecewise(_RELATIONS[kind](ea, eb))  # integers read at run time: an opaque relation
        else:
            e = fold_piecewise(integer_relation(_RELATIONS[kind](ea, eb)))
        return make(e, axes, shape, torch.bool)
    return rule


def _logic(kind: str):
    def rule(node, env):
        vals = [value(x, env) for x in node.args[:2 if kind != "not" else 1]]
        out = dtype_of(node)
        if out != torch.bool:
            if kind == "not":
                return _unary("not")(node, env)
            raise Opaque(f"{_what(node)}: a bitwise {kind} of integers")
        if len(vals) == 1:
            return make(sympy.Not(as_boolean(vals[0])), vals[0].axes, vals[0].shape, out)
        bools = [make(as_boolean(v), v.axes, v.shape, out) for v in vals]
        (ea, eb), axes, shape = broadcast(*bools)
        fn = {"and": sympy.And, "or": sympy.Or, "xor": sympy.Xor}[kind]
        return make(fn(ea, eb), axes, shape, out)
    return rule


def select(node, env, c: SymVal, a: SymVal, b: SymVal, out: torch.dtype) -> SymVal:
    """where(c, a, b) in dtype ``out`` (a scalar operand is stored: rounded to ``out``)."""
    conv = _converted(node, env, [stored(a, out), stored(b, out)], out)
    if conv is None:
        return runtime(node)
    cb = make(as_boolean(c), c.axes, c.shape, torch.bool)
    (ec, ea, eb), axes, shape = broadcast(cb, *conv)
    e = sympy.Piecewise((ea, ec), (eb, True))
    if out == torch.bool:
        e = fold_piecewise(e)
    return check(make(e, axes, shape, out), _what(node))


def _where(node, env):
    c, a, b = (value(x, env) for x in node.args[:3])
    return select(node, env, c, a, b, dtype_of(node))


def _fill_value(node, v: SymVal, out: torch.dtype) -> SymVal:
    if out.is_floating_point or out == torch.bool or v.expr.is_integer or is_boolean_value(v):
        return v
    raise Opaque(f"{_what(node)}: a non-integer value written into a {out} tensor")


def is_boolean_value(v: SymVal) -> bool:
    return v.dtype == torch.bool or isinstance(v.scalar, bool)


def _masked_fill(node, env):
    x, c, v = (value(a, env) for a in node.args[:3])
    return select(node, env, c, _fill_value(node, v, x.dtype), x, x.dtype)


def _tri(lower: bool):
    def rule(node, env):
        a = value(node.args[0], env)
        k = arg(node, 1, "diagonal", 0)
        axes, coord = list(a.axes), []
        for d in (-2, -1):
            if axes[d] is None and a.shape[d] > 1:
                axes[d] = fresh()
            coord.append(axes[d] if axes[d] is not None else sympy.Integer(0))
        row, col = coord
        cond = sympy.Le(col, row + k) if lower else sympy.Ge(col, row + k)
        if a.dtype == torch.bool:
            return make(sympy.And(as_boolean(a), cond), axes, a.shape, a.dtype)
        return make(sympy.Piecewise((a.expr, cond), (0, True)), axes, a.shape, a.dtype)
    return rule


def _clamp(node, env):
    """clamp / clamp_min / clamp_max (scalar or tensor bounds): Min(Max(x, lo), hi), torch's order."""
    t = node.target
    if t in (aten.clamp_min.default, aten.clamp_min.Tensor):
        lo, hi = node.args[1], None
    elif t in (aten.clamp_max.default, aten.clamp_max.Tensor):
        lo, hi = None, node.args[1]
    else:
        lo, hi = arg(node, 1, "min"), arg(node, 2, "max")
    vals = [value(node.args[0], env)] + [value(b, env) for b in (lo, hi) if b is not None]
    return _extremum(node, env, vals, [fn for b, fn in ((lo, sympy.Max), (hi, sympy.Min)) if b is not None])


def _extremum(node, env, vals, fns):
    out = dtype_of(node)
    if out == torch.bool or any(v.dtype == torch.bool for v in vals):
        raise Opaque(f"{_what(node)}: a clamp of booleans")
    if any(has_runtime(v.expr) for v in vals):
        return runtime(node)
    conv = [convert(v, out, _what(node)) for v in vals]
    exprs, axes, shape = broadcast(*conv)
    e = exprs[0]
    for fn, b in zip(fns, exprs[1:]):
        e = fn(e, b)
    return check(make(e, axes, shape, out), _what(node))


def _minmax(fn):
    def rule(node, env):
        return _extremum(node, env, [value(x, env) for x in node.args[:2]], [fn])
    return rule


for _op, _kind in ((aten.add.Tensor, "add"), (aten.add.Scalar, "add"), (aten.sub.Tensor, "sub"),
                   (aten.sub.Scalar, "sub"), (aten.rsub.Scalar, "rsub"), (aten.rsub.Tensor, "rsub"),
                   (aten.mul.Tensor, "mul"), (aten.mul.Scalar, "mul"), (aten.div.Tensor, "div"),
                   (aten.div.Scalar, "div"), (aten.div.Tensor_mode, "div"), (aten.div.Scalar_mode, "div"),
                   (aten.floor_divide.default, "floor"), (aten.floor_divide.Scalar, "floor"),
                   (aten.remainder.Tensor, "mod"), (aten.remainder.Scalar, "mod"),
                   (aten.fmod.Tensor, "fmod"), (aten.fmod.Scalar, "fmod")):
    RULES[_op] = _arith(_kind)
for _op, _kind in ((aten.neg.default, "neg"), (aten.abs.default, "abs"), (aten.floor.default, "floor"),
                   (aten.ceil.default, "ceil"), (aten.trunc.default, "trunc"), (aten.round.default, "round")):
    RULES[_op] = _unary(_kind)
for _name, _rel in _RELATIONS.items():
    RULES[getattr(aten, _name).Tensor] = _compare(_name)
    RULES[getattr(aten, _name).Scalar] = _compare(_name)
for _ops, _kind in (((aten.logical_and.default, aten.bitwise_and.Tensor, aten.bitwise_and.Scalar,
                      aten.__and__.Tensor, aten.__and__.Scalar), "and"),
                    ((aten.logical_or.default, aten.bitwise_or.Tensor, aten.bitwise_or.Scalar,
                      aten.__or__.Tensor, aten.__or__.Scalar), "or"),
                    ((aten.logical_xor.default, aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar,
                      aten.__xor__.Tensor, aten.__xor__.Scalar), "xor"),
                    ((aten.logical_not.default, aten.bitwise_not.default), "not")):
    for _op in _ops:
        RULES[_op] = _logic(_kind)
RULES.update({
    aten.where.self: _where, aten.where.ScalarOther: _where, aten.where.ScalarSelf: _where, aten.where.Scalar: _where,
    aten.masked_fill.Scalar: _masked_fill, aten.masked_fill.Tensor: _masked_fill,
    aten.tril.default: _tri(True), aten.triu.default: _tri(False),
    aten.clamp.default: _clamp, aten.clamp.Tensor: _clamp, aten.clamp_min.default: _clamp,
    aten.clamp_min.Tensor: _clamp, aten.clamp_max.default: _clamp, aten.clamp_max.Tensor: _clamp,
    aten.minimum.default: _minmax(sympy.Min), aten.maximum.default: _minmax(sympy.Max),
})
