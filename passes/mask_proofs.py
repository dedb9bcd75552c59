"""The three ways a mask class is proven (passes/mask_classes.py fits the parameters):

- ``band_function``: a symbolic proof that a predicate is a 1-D band f(p − m), for every integer
  p, m (so at every size);
- ``prove_per_axis``: a grid predicate that separates into one factor per axis, each compared
  with the axis rule on its G_a × G_a coordinate pairs;
- ``keep_matrix``: every (p, m) pair evaluated exactly (vectorised, chunked), up to
  ``EXHAUSTIVE_LIMIT`` pairs.

All evaluation is exact integer arithmetic (rewrite/ir/predicate.py).
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction
from functools import reduce

import numpy as np
import sympy

from rewrite.ir.cascade import m as M_SYM
from rewrite.ir.cascade import p as P_SYM
from rewrite.ir.mask import Axis, MaskSpec, axes_of, axis_keep
from rewrite.ir.predicate import integer_function

# Pairs checked one by one at most: N·M ≤ 2^24, and N·M·max(ops, 24) ≤ 2^24·24 for a predicate of
# ``ops`` sympy operations (a large Or of blocks evaluates slower per pair). Measured on this
# project's 2-core CPU, one thread (benchmarks/results/exhaustive_check_cpu_2026-12-02.md): the
# whole classification at 2^24 pairs costs 0.2–1.2 s (blocks of 64 the most: evaluated, fitted
# on two grids, compared), evaluating a 3-D neighborhood's predicate (24 operations) 0.47 s.
EXHAUSTIVE_LIMIT = 1 << 24
_OPS = 24
_CHUNK = 1 << 20  # pairs evaluated at once, so intermediates stay small
MAX_BAND_SPAN = 1 << 22  # t values a band proof evaluates one by one at most


def evaluator(pred: sympy.Basic):
    """A numpy function keep(p, m) of the predicate (p, m broadcast int64 arrays), exact."""
    fn = integer_function((P_SYM, M_SYM), pred)

    def keep(p: np.ndarray, m: np.ndarray) -> np.ndarray:
        p, m = np.broadcast_arrays(np.asarray(p, dtype=np.int64), np.asarray(m, dtype=np.int64))
        return np.broadcast_to(np.asarray(fn(p, m), dtype=bool), p.shape)
    return keep


def exhaustive_ok(pred: sympy.Basic, n: int, m: int) -> bool:
    """Is checking every (p, m) pair of ``pred`` within the work limit?"""
    return n * m <= EXHAUSTIVE_LIMIT and n * m * max(sympy.count_ops(pred), _OPS) <= EXHAUSTIVE_LIMIT * _OPS


def keep_matrix(keep, n: int, m: int) -> np.ndarray | None:
    """The whole [n, m] bool matrix of a keep function, evaluated in row chunks; None above
    ``EXHAUSTIVE_LIMIT`` pairs."""
    if n * m > EXHAUSTIVE_LIMIT:
        return None
    out = np.empty((n, m), dtype=bool)
    cols = np.arange(m, dtype=np.int64)[None, :]
    step = max(1, _CHUNK // max(m, 1))
    for r in range(0, n, step):
        rows = np.arange(r, min(n, r + step), dtype=np.int64)[:, None]
        out[r:r + len(rows)] = keep(rows, cols)
    return out


def matches(full: np.ndarray, keep) -> bool:
    """Does the keep function equal the matrix ``full`` at every pair (row chunks)?"""
    n, m = full.shape
    cols = np.arange(m, dtype=np.int64)[None, :]
    step = max(1, _CHUNK // max(m, 1))
    for r in range(0, n, step):
        rows = np.arange(r, min(n, r + step), dtype=np.int64)[:, None]
        if not np.array_equal(np.broadcast_to(keep(rows, cols), (len(rows), m)), full[r:r + len(rows)]):
            return False
    return True


# ---------------------------------------------------------------- symbolic proof for 1-D bands

_T = sympy.Symbol("t", integer=True)


def _asymptote(e, side: int):
    """For side·t ≥ T: e(t) = a·t + b + B(t) with B periodic of period P and |B| ≤ β.
    (a, b, β, T, P) as exact numbers, or None for a piece that is not integer-linear."""
    if e == _T:
        return Fraction(1), Fraction(0), Fraction(0), 0, 1
    if e.is_Number:
        if not e.is_Rational:
            return None
        return Fraction(0), Fraction(int(e.p), int(e.q)), Fraction(0), 0, 1
    if isinstance(e, sympy.Add):
        parts = [_asymptote(x, side) for x in e.args]
        if any(x is None for x in parts):
            return None
        return (sum(x[0] for x in parts), sum(x[1] for x in parts), sum(x[2] for x in parts),
                max(x[3] for x in parts), reduce(math.lcm, [x[4] for x in parts], 1))
    if isinstance(e, sympy.Mul):
        nums = [x for x in e.args if x.is_Number]
        rest = [x for x in e.args if not x.is_Number]
        if len(rest) != 1 or not all(x.is_Rational for x in nums):
            return None
        c = Fraction(1)
        for x in nums:
            c *= Fraction(int(x.p), int(x.q))
        inner = _asymptote(rest[0], side)
        if inner is None:
            return None
        a, b, beta, t0, per = inner
        return c * a, c * b, abs(c) * beta, t0, per
    if isinstance(e, sympy.Mod):
        k = e.args[1]
        inner = _asymptote(e.args[0], side)
        if inner is None or not k.is_Integer or k == 0 or not e.args[0].is_integer:
            return None
        a, b, _, t0, per = inner
        if a.denominator != 1 or b.denominator != 1:
            return None
        k = abs(int(k))
        return Fraction(0), Fraction(0), Fraction(k - 1), t0, math.lcm(per, k)
    if isinstance(e, sympy.Abs):
        inner = _asymptote(e.args[0], side)
        if inner is None:
            return None
        a, b, beta, t0, per = inner
        if a == 0:
            return Fraction(0), Fraction(0), abs(b) + beta, t0, per
        s = 1 if a * side > 0 else -1  # the sign of the argument once |a·t| outgrows |b| + β
        t1 = max(t0, math.ceil((abs(b) + beta + 1) / abs(a)))
        return s * a, s * b, beta, t1, per
    return None


def _floors_as_mods(f):
    """floor(a/c) = (a − Mod(a, c))/c and ceiling(a/c) = (a + Mod(−a, c))/c for integer a and a
    constant c > 0, innermost first (a rounding division of t is then periodic pieces of t)."""
    for _ in range(64):
        atoms = [x for x in f.atoms(sympy.floor, sympy.ceiling) if not x.args[0].has(sympy.floor, sympy.ceiling)]
        if not atoms:
            return f
        reps = {}
        for x in atoms:
            num, den = sympy.fraction(sympy.together(x.args[0]))
            if not (den.is_Integer and den > 0 and num.is_integer):
                return None
            reps[x] = ((num - sympy.Mod(num, den)) / den if isinstance(x, sympy.floor)
                       else (num + sympy.Mod(-num, den)) / den)
        f = f.xreplace(reps)
    return None


def _integer_relation(r):
    """lhs − rhs REL 0 with integer coefficients (times the positive common denominator), so that
    m + t − m cancels and evaluation is exact; None when that is not possible."""
    num, den = sympy.fraction(sympy.together(sympy.expand(r.lhs - r.rhs)))
    if not (den.is_Integer and den > 0):
        return sympy.Eq(_T, sympy.Symbol("not_integer"))  # leaves a foreign symbol: no proof
    return type(r)(sympy.expand(num), 0)


def band_function(pred: sympy.Basic) -> tuple[list[int], int] | None:
    """Prove ``pred(p, m) == f(p − m)`` for every integer p, m, and give f's kept set.

    After p := m + t the predicate must lose m. Every relation is then E(t) REL 0 with E built
    from t, integer-linear operations, |·| and Mod by constants; on each side, beyond a threshold
    T computed from the constants, E = a·t + b + B(t) with B periodic and bounded, so the relation
    is constant (a ≠ 0: E's sign is a's) or periodic (a = 0). The predicate is therefore periodic
    beyond the largest threshold with period lcm of the periods: one period is evaluated there on
    each side (it must keep nothing: a finite band), and every t between the thresholds is
    evaluated. Returns (kept t values, period), or None when this does not prove a finite band."""
    f = _floors_as_mods(pred.xreplace({P_SYM: M_SYM + _T}))
    if f is None:
        return None
    rels = f.atoms(sympy.core.relational.Relational)
    f = f.xreplace({r: _integer_relation(r) for r in rels})
    if M_SYM in f.free_symbols or f.free_symbols - {_T}:
        return None
    rels = f.atoms(sympy.core.relational.Relational)
    if f.atoms(sympy.core.function.AppliedUndef, sympy.floor, sympy.ceiling, sympy.Piecewise, sympy.Min, sympy.Max) \
            or any(not x.is_Integer for x in f.atoms(sympy.Number)):
        return None
    reach, period = [0, 0], 1
    for r in rels:
        for k, side in enumerate((1, -1)):
            asym = _asymptote(r.lhs - r.rhs, side)
            if asym is None:
                return None
            a, b, beta, t0, per = asym
            if a != 0:
                t0 = max(t0, math.ceil((abs(b) + beta + 1) / abs(a)))
            else:
                period = math.lcm(period, per)
            reach[k] = max(reach[k], t0)
    if sum(reach) + 2 * period > MAX_BAND_SPAN:
        return None
    fn = integer_function((_T,), f)
    ts = np.arange(-reach[1] - period, reach[0] + period + 1, dtype=np.int64)
    vals = np.broadcast_to(np.asarray(fn(ts), dtype=bool), ts.shape)
    tail = (ts >= reach[0]) | (ts <= -reach[1])  # one full period past each threshold
    if vals[tail].any():
        return None  # not a finite band (e.g. an anti-causal half plane, or a periodic one)
    return ts[vals].tolist(), period


def band_axis(kept: list[int]) -> tuple[Axis, int] | None:
    """A window axis (and 1-D offset) whose kept t set is exactly ``kept``: a centred
    window when one fits, else a causal window shifted by the offset."""
    if not kept:
        return None
    lo, hi = min(kept), max(kept)
    tries = [(Axis("window", hi), 0)] if lo == -hi else []
    tries.append((Axis("window", hi - lo, causal=True), -lo))
    for ax, off in tries:
        d = reduce(math.gcd, [abs(t + off) for t in kept if t + off], 0) or 1
        if [t for t in range(lo, hi + 1) if (t + off) % d == 0] == sorted(kept):
            return replace(ax, dilation=d), off
    return None


# ---------------------------------------------------------------- per-axis proof for grids

def _interval(expr: sympy.Basic, ranges: dict) -> tuple[int, int] | None:
    """Integer bounds of a linear expression in the coordinate symbols, or None."""
    expr = sympy.expand(expr)
    lo = hi = 0
    for term, coeff in expr.as_coefficients_dict().items():
        if not coeff.is_Integer:
            return None
        c = int(coeff)
        if term == 1:
            lo, hi = lo + c, hi + c
        elif term in ranges:
            a, b = ranges[term]
            lo, hi = lo + min(c * a, c * b), hi + max(c * a, c * b)
        else:
            return None
    return lo, hi


def _split_div(expr: sympy.Basic, w: int, ranges: dict):
    """expr = w·A + R with A an integer combination of the coordinates and R's bounds known:
    (A, R, bounds of R), or None."""
    expr = sympy.expand(expr)
    whole, rest = sympy.Integer(0), sympy.Integer(0)
    for term, coeff in expr.as_coefficients_dict().items():
        if not coeff.is_Integer:
            return None
        q, r = divmod(int(coeff), w)
        whole += q * term
        rest += r * term
    bounds = _interval(rest, ranges)
    return None if bounds is None else (whole, rest, bounds)


def _reduce_coordinates(expr: sympy.Basic, ranges: dict) -> sympy.Basic:
    """Simplify floor(x / w) and Mod(x, w) of linear x over bounded integer coordinates:
    floor((w·A + R)/w) = A + floor(R/w), exactly A + f when R's whole range lies in one
    w-interval [w·f, w·f + w); Mod(w·A + R, w) = R − w·f likewise. Innermost first."""
    if not expr.args:
        return expr
    expr = expr.func(*[_reduce_coordinates(a, ranges) for a in expr.args])
    if isinstance(expr, sympy.floor):
        num, den = sympy.fraction(sympy.together(expr.args[0]))
        if den.is_Integer and int(den) > 0:
            split = _split_div(num, int(den), ranges)
            if split is not None:
                whole, _, (lo, hi) = split
                if lo // int(den) == hi // int(den):
                    return whole + lo // int(den)
    if isinstance(expr, sympy.Mod) and expr.args[1].is_Integer and int(expr.args[1]) > 0:
        w = int(expr.args[1])
        split = _split_div(expr.args[0], w, ranges)
        if split is not None:
            _, rest, (lo, hi) = split
            if lo // w == hi // w:
                return rest - w * (lo // w)
    return expr


def prove_per_axis(pred: sympy.Basic, spec: MaskSpec) -> bool:
    """Prove ``pred == spec`` on the whole N×N grid without N² work: substitute the row-major
    coordinates (p = Σ c_a·S_a, 0 ≤ c_a < G_a, likewise m), reduce every floor/Mod exactly over
    those bounds, and require a conjunction whose factors each read one axis's (query, key)
    coordinate pair; then compare each axis's factors with the spec's rule exhaustively on
    G_a × G_a. False means "not proven this way" (the caller falls back to evaluation)."""
    grid = spec.grid
    if len(grid) < 2 or any(g is None for g in grid):
        return False
    strides = [math.prod(grid[a + 1:]) for a in range(len(grid))]
    cq = [sympy.Symbol(f"cq{a}", integer=True) for a in range(len(grid))]
    ck = [sympy.Symbol(f"ck{a}", integer=True) for a in range(len(grid))]
    ranges = {s: (0, g - 1) for syms in (cq, ck) for s, g in zip(syms, grid)}
    flat_q = sum(s * c for s, c in zip(strides, cq))
    flat_k = sum(s * c for s, c in zip(strides, ck))
    try:
        reduced = _reduce_coordinates(pred.xreplace({P_SYM: flat_q, M_SYM: flat_k}), ranges)
    except (TypeError, ValueError):
        return False
    factors = list(reduced.args) if isinstance(reduced, sympy.And) else [reduced]
    per_axis: list[list] = [[] for _ in grid]
    for f in factors:
        if f is sympy.true:
            continue
        axes = {a for a in range(len(grid)) if {cq[a], ck[a]} & f.free_symbols}
        if len(axes) != 1 or f.free_symbols - {cq[a] for a in axes} - {ck[a] for a in axes}:
            return False
        per_axis[axes.pop()].append(f)
    for a, (ax, g) in enumerate(zip(axes_of(spec), grid)):
        c = np.arange(g, dtype=np.int64)
        want = axis_keep(ax, c[:, None], c[None, :], g, g)
        if per_axis[a]:
            fn = integer_function((cq[a], ck[a]), sympy.And(*per_axis[a]))
            got = np.broadcast_to(np.asarray(fn(c[:, None], c[None, :]), dtype=bool), want.shape)
        else:
            got = np.ones_like(want)
        if not np.array_equal(got, want):
            return False
    return True
