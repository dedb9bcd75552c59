"""The lifter's core: symbolic tensor values, broadcasting and the rule registry.

A `SymVal` is a tensor as a sympy expression over one integer symbol per dim (the element's
coordinate along it, 0 ≤ coordinate < size), with the tensor's dtype. A dim of size 1, or one the
value does not vary along (an ``expand``), has no symbol. Rules (patterns/lift_arith.py,
lift_layout.py, lift_edits.py) register in `RULES`; a node no rule knows is a run-time tensor, the
opaque predicate ``R_<node>(coordinates)``.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import sympy
import torch
from torch.fx import Node

aten = torch.ops.aten


class Opaque(Exception):
    """The value cannot be modelled exactly: the mask is then applied as the graph computes it."""


@dataclass(frozen=True)
class SymVal:
    expr: sympy.Basic  # a number, an integer/rational expression, or a Boolean over axis symbols
    axes: tuple  # one symbol (or None: constant along the dim) per dim
    shape: tuple[int, ...]
    dtype: torch.dtype | None  # None for a Python scalar (then ``scalar`` is its value)
    scalar: object = None


RULES: dict = {}  # ATen op → rule(node, env) → SymVal

_counter = itertools.count()


def fresh(prefix: str = "i") -> sympy.Symbol:
    return sympy.Symbol(f"{prefix}{next(_counter)}", integer=True, nonnegative=True)


def meta(node) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, Node) else None
    return v if isinstance(v, torch.Tensor) else None


def shape_of(node) -> tuple[int, ...]:
    v = meta(node)
    if v is None:
        raise Opaque(f"{getattr(node, 'name', node)}: no recorded shape")
    return tuple(int(s) for s in v.shape)


def dtype_of(node) -> torch.dtype:
    v = meta(node)
    if v is None:
        raise Opaque(f"{getattr(node, 'name', node)}: no recorded dtype")
    return v.dtype


def arg(node: Node, i: int, name: str, default=None):
    """Positional argument i or keyword ``name`` of a call."""
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def make(expr, axes, shape, dtype, scalar=None) -> SymVal:
    """A SymVal with the invariant: a dim of size 1 has no symbol (its coordinate is 0)."""
    axes, shape = tuple(axes), tuple(int(s) for s in shape)
    if len(axes) != len(shape):
        raise Opaque(f"internal: {len(axes)} axes for shape {shape}")
    subs = {ax: sympy.Integer(0) for ax, sz in zip(axes, shape) if ax is not None and sz == 1}
    if subs:
        expr = expr.xreplace(subs)
        axes = tuple(None if ax in subs else ax for ax in axes)
    return SymVal(expr, axes, shape, dtype, scalar)


def ranges(v: SymVal) -> dict:
    """Each axis symbol's range (inclusive)."""
    return {ax: (0, sz - 1) for ax, sz in zip(v.axes, v.shape) if ax is not None}


def constant(x) -> SymVal:
    """A Python scalar argument, exactly (a float is its binary value)."""
    if isinstance(x, bool):
        return SymVal(sympy.true if x else sympy.false, (), (), None, x)
    if isinstance(x, int):
        return SymVal(sympy.Integer(x), (), (), None, x)
    if isinstance(x, float):
        if x != x:
            raise Opaque("a NaN constant")
        e = sympy.oo if x == float("inf") else -sympy.oo if x == float("-inf") else sympy.Rational(x)
        return SymVal(e, (), (), None, x)
    raise Opaque(f"an argument {x!r} of type {type(x).__name__}")


def value(x, env: dict) -> SymVal:
    if not isinstance(x, Node):
        return constant(x)
    if x not in env:
        env[x] = evaluate(x, env)
    return env[x]


def evaluate(node: Node, env: dict) -> SymVal:
    if node.op == "call_function" and node.target in RULES:
        return RULES[node.target](node, env)
    return runtime(node)


def runtime(node: Node) -> SymVal:
    """A run-time tensor (or a value at this node that is not modelled further): an opaque
    function of its coordinates, exactly the values the graph computes there."""
    shape = shape_of(node)
    axes = tuple(fresh("r") if s != 1 else None for s in shape)
    fn = sympy.Function(f"R_{node.name}")
    args = [a for a in axes if a is not None]
    expr = fn(*args) if args else sympy.Symbol(f"R_{node.name}")
    return SymVal(expr, axes, shape, dtype_of(node))


def has_runtime(expr) -> bool:
    return bool(expr.atoms(sympy.core.function.AppliedUndef)) or any(
        s.name.startswith("R_") for s in expr.free_symbols)


def broadcast(*vals: SymVal) -> tuple[list, tuple, tuple]:
    """Align dims right, numpy style. Every result dim gets its own fresh symbol: the same
    arange used as rows in one operand and as columns in the other (``i[:, None] - i[None, :]``)
    stays two positions."""
    r = max(len(v.shape) for v in vals)
    padded = [((None,) * (r - len(v.axes)) + v.axes, (1,) * (r - len(v.shape)) + v.shape) for v in vals]
    subs = [{} for _ in vals]
    axes, shape = [], []
    for d in range(r):
        sizes = {sh[d] for _, sh in padded} - {1}
        if len(sizes) > 1:
            raise Opaque(f"internal: shapes {[v.shape for v in vals]} do not broadcast")
        size = sizes.pop() if sizes else 1
        t = fresh() if size > 1 and any(ax[d] is not None for ax, _ in padded) else None
        for k, (ax, _) in enumerate(padded):
            if ax[d] is not None:
                subs[k][ax[d]] = t
        axes.append(t)
        shape.append(size)
    return [v.expr.xreplace(s) for v, s in zip(vals, subs)], tuple(axes), tuple(shape)


def is_bool(e) -> bool:
    """A sympy Boolean value (a sympy Symbol is a Boolean to sympy, but here it is a position)."""
    if isinstance(e, sympy.Symbol) and not e.name.startswith("R_"):
        return False
    return isinstance(e, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational))


def as_bool(e):
    """A value as a Boolean (≠ 0)."""
    if e in (True, False):
        return sympy.true if e else sympy.false
    if isinstance(e, (sympy.logic.boolalg.BooleanTrue, sympy.logic.boolalg.BooleanFalse)):
        return e
    if isinstance(e, (sympy.logic.boolalg.Boolean, sympy.core.relational.Relational)) and not isinstance(
            e, sympy.Symbol):
        return e
    if isinstance(e, sympy.Number):
        return sympy.true if e != 0 else sympy.false
    return sympy.Ne(e, 0)


def fold_piecewise(expr):
    """A Boolean Piecewise as And/Or: ``Piecewise((a, c), (b, True))`` → ``(c ∧ a) ∨ (¬c ∧ b)``."""
    if not expr.has(sympy.Piecewise):
        return expr
    folded = sympy.piecewise_fold(expr)
    if not isinstance(folded, sympy.Piecewise):
        return folded
    terms, seen = [], sympy.false
    for val, cond in folded.args:
        val = as_bool(val) if not isinstance(val, sympy.Piecewise) else fold_piecewise(val)
        terms.append(sympy.And(cond, sympy.Not(seen), val))
        seen = sympy.Or(seen, cond)
    return sympy.Or(*terms)
