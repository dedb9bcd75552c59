"""Exact evaluation of integer sympy expressions and predicates on NumPy int64 arrays.

``lambdify`` would compute ``floor(p/49)`` as ``floor((1/49)·p)`` in floating point, and
49·(1/49) < 1: a proof needs exact integer division. Here floor/ceiling of a rational of integers
become NumPy's floor division, Mod is NumPy's (Python's) modulus, and everything else is integer
arithmetic; expressions handed in are integer-valued with relations between integers (the lifter,
patterns/lift.py, clears denominators from comparisons).
"""

from __future__ import annotations

import numpy as np
import sympy

_FDIV = sympy.Function("_fdiv")
_CDIV = sympy.Function("_cdiv")


def _ceil_div(a, b):
    return -np.floor_divide(-a, b)


def integer_floors(expr: sympy.Basic) -> sympy.Basic:
    """floor(a/b) → _fdiv(a, b), ceiling(a/b) → _cdiv(a, b) with a, b integer expressions."""
    reps = {}
    for f in expr.atoms(sympy.floor, sympy.ceiling):
        num, den = sympy.fraction(sympy.together(f.args[0]))
        fn = _FDIV if isinstance(f, sympy.floor) else _CDIV
        reps[f] = fn(integer_floors(num), integer_floors(den))
    return expr.xreplace(reps) if reps else expr


def integer_function(symbols, expr: sympy.Basic):
    """A NumPy function of ``symbols`` computing ``expr`` exactly on int64 arrays."""
    return sympy.lambdify(tuple(symbols), integer_floors(expr),
                          modules=[{"_fdiv": np.floor_divide, "_cdiv": _ceil_div}, "numpy"])
