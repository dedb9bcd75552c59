"""Exactness of the lifter's arithmetic: value bounds, representability, casts.

The lifter models a tensor's values as exact integers or rationals. That is the value the graph
computes only where every operation is exact in the tensor's dtype: an integer result must lie in
the dtype's range (no wrap-around), a float result must be representable (then IEEE's correctly
rounded operations give it exactly, whatever the internal precision). These checks decide that on
the given sizes, by interval arithmetic over the coordinate ranges or, for small domains, by
evaluating every element; what they cannot prove raises `Opaque`.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import sympy
import torch

from rewrite.ir.predicate import integer_function

from .lift_core import Opaque, SymVal, as_bool, constant, fold_piecewise, has_runtime, is_bool, make, ranges

# Significand bits (with the implicit one) and the smallest normal exponent.
FLOAT_FORMATS = {torch.float16: (11, -14), torch.bfloat16: (8, -126), torch.float32: (24, -126),
                 torch.float64: (53, -1022)}
INT_RANGES = {dt: (int(torch.iinfo(dt).min), int(torch.iinfo(dt).max))
              for dt in (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)}
EXHAUSTIVE_VALUES = 1 << 16  # elements evaluated one by one when bounds do not decide


def _frac(x) -> Fraction | None:
    if isinstance(x, sympy.Integer):
        return Fraction(int(x))
    if isinstance(x, sympy.Rational):
        return Fraction(int(x.p), int(x.q))
    return None


def bounds(expr, rng: dict) -> tuple[Fraction, Fraction] | None:
    """Inclusive bounds of a numeric expression over the coordinate ranges, or None."""
    if isinstance(expr, sympy.Number):
        f = _frac(expr)
        return None if f is None else (f, f)
    if isinstance(expr, sympy.Symbol):
        r = rng.get(expr)
        return None if r is None else (Fraction(r[0]), Fraction(r[1]))
    args = [bounds(a, rng) for a in expr.args] if not isinstance(expr, sympy.Piecewise) else None
    if isinstance(expr, sympy.Add):
        if any(a is None for a in args):
            return None
        return sum(a[0] for a in args), sum(a[1] for a in args)
    if isinstance(expr, sympy.Mul):
        if any(a is None for a in args):
            return None
        lo, hi = Fraction(1), Fraction(1)
        for a, b in args:
            c = [lo * a, lo * b, hi * a, hi * b]
            lo, hi = min(c), max(c)
        return lo, hi
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        if args[0] is None:
            return None
        f = math.floor if isinstance(expr, sympy.floor) else math.ceil
        return Fraction(f(args[0][0])), Fraction(f(args[0][1]))
    if isinstance(expr, sympy.Abs):
        if args[0] is None:
            return None
        lo, hi = args[0]
        return (min(abs(lo), abs(hi)) if lo * hi > 0 else Fraction(0)), max(abs(lo), abs(hi))
    if isinstance(expr, (sympy.Min, sympy.Max)):
        if any(a is None for a in args):
            return None
        pick = min if isinstance(expr, sympy.Min) else max
        return pick(a[0] for a in args), pick(a[1] for a in args)
    if isinstance(expr, sympy.Mod):
        x, k = args
        if x is None or k is None or k[0] != k[1] or k[0] == 0:
            return None
        k = k[0]
        if k > 0 and x[0].denominator == 1 and x[1].denominator == 1 and x[0] // k == x[1] // k:
            base = (x[0] // k) * k
            return x[0] - base, x[1] - base
        return (Fraction(0), k) if k > 0 else (k, Fraction(0))
    if isinstance(expr, sympy.Pow) and expr.args[1].is_Integer and int(expr.args[1]) > 0:
        if args[0] is None:
            return None
        lo, hi, k = args[0][0], args[0][1], int(expr.args[1])
        if k % 2:
            return lo ** k, hi ** k
        return (Fraction(0) if lo <= 0 <= hi else min(lo ** k, hi ** k)), max(lo ** k, hi ** k)
    if isinstance(expr, sympy.Piecewise):
        parts = [bounds(v, rng) for v, _ in expr.args]
        if any(p is None for p in parts):
            return None
        return min(p[0] for p in parts), max(p[1] for p in parts)
    return None


def integer_bounds(expr, rng: dict) -> tuple[int, int] | None:
    b = bounds(expr, rng)
    return None if b is None else (math.ceil(b[0]), math.floor(b[1]))


def representable(x: Fraction, dtype: torch.dtype) -> bool:
    """Is the rational x exactly a finite value of the float dtype?"""
    bits, emin = FLOAT_FORMATS[dtype]
    if x == 0:
        return True
    num, den = abs(x.numerator), x.denominator
    if den & (den - 1):
        return False  # not dyadic
    k = den.bit_length() - 1
    tz = (num & -num).bit_length() - 1  # strip factors of two from the numerator
    odd, e = num >> tz, tz - k  # x = odd · 2^e
    if odd.bit_length() > bits:
        return False
    if e < emin - bits + 1:
        return False  # below the smallest subnormal's grid
    return x <= Fraction(float(torch.finfo(dtype).max))


def _integer_valued(expr) -> bool:
    return bool(expr.is_integer)


def check(v: SymVal, what: str) -> SymVal:
    """``v`` unchanged when its expression is exactly a value of its dtype at every element
    (no overflow, no rounding), else `Opaque` naming ``what``."""
    dt, e = v.dtype, v.expr
    if dt is None or dt == torch.bool or is_bool(e):
        return v
    if e.has(sympy.nan, sympy.zoo):
        raise Opaque(f"{what}: not a number")
    for part in _alternatives(e):
        _check_one(part, ranges(v), dt, what)
    return v


def _alternatives(e) -> list:
    """The expressions whose values the value always is one of (Piecewise branches, Min/Max args)."""
    if isinstance(e, sympy.Piecewise):
        return [x for val, _ in e.args for x in _alternatives(val)]
    if isinstance(e, (sympy.Min, sympy.Max)):
        return [x for a in e.args for x in _alternatives(a)]
    return [e]


def _check_one(e, rng: dict, dt: torch.dtype, what: str) -> None:
    if e in (sympy.oo, -sympy.oo):
        if dt.is_floating_point:
            return
        raise Opaque(f"{what}: an infinity in an integer tensor")
    if e.has(sympy.oo, -sympy.oo):
        raise Opaque(f"{what}: arithmetic on an infinity")
    if dt in INT_RANGES:
        lo, hi = INT_RANGES[dt]
        b = integer_bounds(e, rng) if _integer_valued(e) else None
        if b is None:
            raise Opaque(f"{what}: cannot bound the {dt} values (overflow not excluded)")
        if b[0] < lo or b[1] > hi:
            raise Opaque(f"{what}: values in [{b[0]}, {b[1]}] overflow {dt}")
        return
    if dt not in FLOAT_FORMATS:
        raise Opaque(f"{what}: dtype {dt} is not modelled")
    if e.is_Number:
        if not (e.is_Rational and representable(_frac(e), dt)):
            raise Opaque(f"{what}: the constant {e} is not representable in {dt}")
        return
    num, den = sympy.fraction(sympy.together(e))
    if not (den.is_Integer and _integer_valued(num)):
        raise Opaque(f"{what}: a value that is not a rational of an integer expression")
    if den < 0:
        num, den = -num, -den
    den = int(den)
    b = integer_bounds(num, rng)
    bits, emin = FLOAT_FORMATS[dt]
    if b is not None and not den & (den - 1):
        big = max(abs(b[0]), abs(b[1]))
        k = den.bit_length() - 1
        if big <= 1 << bits and k <= bits - 1 - emin and Fraction(big, den) <= Fraction(float(torch.finfo(dt).max)):
            return
    vals = _every_value(num, rng)
    if vals is None:
        raise Opaque(f"{what}: cannot prove every value is exactly representable in {dt}")
    bad = next((int(x) for x in vals if not representable(Fraction(int(x), den), dt)), None)
    if bad is not None:
        raise Opaque(f"{what}: {Fraction(bad, den)} is not representable in {dt}")


def _every_value(num, rng: dict) -> np.ndarray | None:
    """Every value of an integer expression over its (small) domain, exactly, or None."""
    syms = sorted(num.free_symbols, key=str)
    if any(s not in rng for s in syms):
        return None
    sizes = [rng[s][1] - rng[s][0] + 1 for s in syms]
    if math.prod(sizes) > EXHAUSTIVE_VALUES:
        return None
    b = integer_bounds(num, rng)
    if b is None or max(abs(b[0]), abs(b[1])) >= 1 << 62:
        return None
    grids = np.meshgrid(*[np.arange(rng[s][0], rng[s][1] + 1, dtype=np.int64) for s in syms], indexing="ij")
    fn = integer_function(syms, num)
    return np.unique(np.broadcast_to(np.asarray(fn(*grids)), grids[0].shape if grids else ()))


# ---------------------------------------------------------------- casts

def convert(v: SymVal, dtype: torch.dtype, what: str) -> SymVal:
    """``v`` cast to ``dtype`` exactly as torch casts (bool: ≠ 0; float → integer: toward zero),
    or `Opaque` where the cast could round or overflow."""
    src = v.dtype
    e = v.expr
    if src == dtype:
        return v
    if dtype == torch.bool:
        return make(as_boolean(v), v.axes, v.shape, dtype)
    if src == torch.bool or (src is None and isinstance(v.scalar, bool)):
        e = sympy.Piecewise((sympy.Integer(1), e), (sympy.Integer(0), True)) if is_bool(e) else e
        return make(e, v.axes, v.shape, dtype)
    if has_runtime(e):
        raise Opaque(f"{what}: a cast of a run-time value")  # the caller takes the node's value
    if dtype in INT_RANGES and src is not None and src.is_floating_point or (
            dtype in INT_RANGES and src is None and isinstance(v.scalar, float)):
        if not _integer_valued(e):
            e = sympy.Piecewise((sympy.floor(e), e >= 0), (-sympy.floor(-e), True))
    return check(make(e, v.axes, v.shape, dtype), what)


def as_boolean(v: SymVal):
    """A value as a Boolean: x ≠ 0 (torch's cast to bool)."""
    if v.dtype == torch.bool or is_bool(v.expr):
        return as_bool(v.expr)
    if v.expr in (sympy.oo, -sympy.oo):
        return sympy.true
    return as_bool(v.expr)


def integer_relation(rel):
    """A relation between rational expressions as one between integer expressions (both sides
    times their positive common denominator), so that evaluating it on int64 is exact. A
    relation of where-built values is split by branch first."""
    if not isinstance(rel, sympy.core.relational.Relational):
        return rel
    if rel.has(sympy.Piecewise):
        folded = sympy.piecewise_fold(rel)
        if isinstance(folded, sympy.Piecewise):
            return fold_piecewise(sympy.Piecewise(*[(integer_relation(r), c) for r, c in folded.args]))
        if not isinstance(folded, sympy.core.relational.Relational):
            return folded
        rel = folded
    if rel.has(sympy.oo, -sympy.oo, sympy.nan, sympy.zoo):
        raise Opaque(f"a comparison with an infinity sympy does not decide: {rel}")
    d = rel.lhs - rel.rhs
    if d.is_integer:
        return rel
    num, den = sympy.fraction(sympy.together(d))
    if not (den.is_Integer and num.is_integer):
        raise Opaque(f"a comparison of {d} (not a rational of integers)")
    if den < 0:
        num = -num
    return type(rel)(sympy.expand(num), 0)


def stored(v: SymVal, dtype: torch.dtype) -> SymVal:
    """A Python float scalar as the value a ``dtype`` tensor stores for it (rounded as torch
    rounds it); anything else unchanged."""
    if v.dtype is None and isinstance(v.scalar, float) and dtype.is_floating_point:
        return constant(float(torch.tensor(v.scalar, dtype=torch.float64).to(dtype).item()))
    return v
