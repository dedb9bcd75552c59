"""A bias computed from the scores' positions, lifted into score-modifier steps (computed in the tile).

ALiBi and its relatives are written as a bias tensor the graph builds from ``arange``:
``slopes[h] · (pos_k[m] − pos_q[p])``, Bloom's ``slopes · arange(M)``, ``−slope·|p − m|``. Built
eagerly that is an N×M tensor; the kernels can instead compute it from the tile's row and column
indices. This module turns such a bias node into straight-line steps over the positions (``@atom``
placeholders until the site knows which atom is the query and which the key: `resolve_positions`),
constants and small leaf tensors (per-head slopes: whatever the graph computes, read as they are).

Exactness. The integer part of the expression (positions, offsets, differences, ``abs``, ``clamp``,
edits and slices of ``arange``) is evaluated exactly by the symbolic lifter (patterns/lift.py); it is
accepted when it is a polynomial / abs / min / max of positions with integer coefficients whose every
intermediate value lies within ±2²⁴ (exact in float32, where the tile computes it). The float part is
reproduced op for op in eager's dtype: float32 ops are correctly rounded on both sides; an op eager
computes in bfloat16 / float16 (operands converted to it first, as torch's type promotion does) is
computed in float32 and rounded (``round_bf16`` / ``round_f16``), which is what eager does. Refused,
with the reason (the bias then stays a tensor, exact as today): float64 arithmetic (the tile computes
float32), a division by anything but a power of two (Triton's float32 division is approximate), a
constant not exact in a half dtype, a position expression with cases (an edited position tensor, a
``where``), and anything that reads a run-time tensor along the query or key axis.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch.fx import Node

from .axes import AtomSizes, Axes, NoMatch, align_broadcast, dtype_of, shape_of
from .lift import Opaque, lift
from .lift_core import has_runtime, ranges
from .lift_exact import bounds
from .softmax_chain import CAST_OPS, scalar_value

aten = torch.ops.aten

EXACT_INT = 1 << 24  # integers exact in float32
HALF = {torch.bfloat16: "round_bf16", torch.float16: "round_f16"}
BINARY = {aten.add.Tensor: "add", aten.sub.Tensor: "sub", aten.mul.Tensor: "mul", aten.add.Scalar: "add",
          aten.sub.Scalar: "sub", aten.mul.Scalar: "mul", aten.maximum.default: "max", aten.minimum.default: "min"}
UNARY = {aten.neg.default: "neg", aten.abs.default: "abs"}
DIVS = {aten.div.Tensor, aten.div.Scalar}
CLAMPS = {aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default}
GATHERS = {aten.index.Tensor, aten.embedding.default}
SAME_ELEMENTS = {aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
                 aten.expand.default, aten.alias.default, aten.clone.default, aten.contiguous.default,
                 aten.detach.default, aten.lift_fresh_copy.default}


ARANGES = {aten.arange.default, aten.arange.start, aten.arange.start_step}
MASK_OPS = {aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.masked_fill.Scalar,
            aten.masked_fill.Tensor}


class NotPositional(Exception):
    """The bias is not (exactly) a function of positions and small leaves: it stays a tensor."""


class PositionsUnaligned(NoMatch):
    """A position the bias varies along is neither the query axis nor the key axis of the site."""


def ancestors(node: Node) -> list[Node]:
    seen, todo, out = set(), [node], []
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        out.append(n)
        todo += list(n.all_input_nodes)
    return out


def reads_positions(node: Node) -> bool:
    """Whether ``node`` is a bias built from ``arange`` (worth trying, and worth a note if refused);
    a mask written as a bias (``where`` / ``masked_fill`` of a fill, after views and casts) is a mask."""
    cur = node
    while cur.op == "call_function" and (cur.target in SAME_ELEMENTS or cur.target in CAST_OPS):
        cur = cur.args[0]
    if cur.op == "call_function" and cur.target in MASK_OPS:
        return False
    return any(n.op == "call_function" and n.target in ARANGES for n in ancestors(node))


def opaque_sources(expr, x: Node) -> str:
    """The graph values a lifted expression reads as run-time tensors (``R_<node>``), with their ops."""
    names = {str(f.func)[2:] for f in expr.atoms(sympy.core.function.AppliedUndef)}
    names |= {s.name[2:] for s in expr.free_symbols if s.name.startswith("R_")}
    nodes = {n.name: n for n in x.graph.nodes}
    return ", ".join(sorted(f"{n} ({nodes[n].target if nodes[n].op == 'call_function' else nodes[n].op})"
                            for n in names if n in nodes)) or "a run-time tensor"


def runtime_inputs(node: Node) -> str:
    names = sorted(n.name for n in ancestors(node) if n.op == "placeholder")
    return f" (it reads the run-time tensor(s) {', '.join(names)})" if names else ""


def suffix(a, ax: Axes) -> Axes | None:
    """The atoms of an operand broadcast (right-aligned) against a result with atoms ``ax``."""
    if not isinstance(a, Node) or shape_of(a) is None:
        return None
    shape = shape_of(a)
    if len(shape) > len(ax):
        raise NotPositional(f"{a.name} has more dims than the bias it is part of")
    return tuple(() if s == 1 else axis for s, axis in zip(shape, ax[len(ax) - len(shape):]))


def view_axes(src_shape, out_shape, ax: Axes, x: Node, sizes: AtomSizes) -> Axes:
    """The atoms of a view's input: an expand is a broadcast; otherwise the view keeps the elements'
    order, so the input's dims take the output's atoms in order (a merge or split of dims along atom
    boundaries; one that cuts an atom regroups the elements and is refused)."""
    if x.target == aten.expand.default:
        return tuple(() if s == 1 else axis for s, axis in zip(src_shape, ax[len(ax) - len(src_shape):]))
    if x.target == aten.permute.default:  # out dim j is input dim perm[j]
        perm = [d % len(src_shape) for d in x.args[1]]
        return tuple(ax[perm.index(d)] for d in range(len(src_shape)))
    atoms = [a for s, axis in zip(out_shape, ax) if s != 1 for a in axis if sizes.sizes.get(a, 1) != 1]
    out, i = [], 0
    for s in src_shape:
        take, prod = [], 1
        while s != 1 and prod < s and i < len(atoms):
            take.append(atoms[i])
            prod *= sizes.sizes[atoms[i]]
            i += 1
        if prod != s:
            raise NotPositional(f"{x.name}: a view that regroups the bias's elements ({x.target})")
        out.append(tuple(take))
    if i != len(atoms):
        raise NotPositional(f"{x.name}: a view that regroups the bias's elements ({x.target})")
    return tuple(out)


class PositionProgram:
    """One bias node translated into steps, recorded first (nothing is emitted unless the whole bias
    translates); `replay` then emits them into the caller's modifier through ``emit(op, *args)`` and
    ``leaf(node, axes, table_atom)``, each returning the operand's name."""

    def __init__(self, bias: Node, axes: Axes, sizes: AtomSizes, own_atoms: set[str]):
        self.axes, self.sizes, self.own = axes, sizes, own_atoms
        self.steps: list[tuple[str, tuple]] = []
        # each with its atoms against the scores, and a table's own atom (None for a broadcast leaf)
        self.leaves: list[tuple[Node, Axes, str | None]] = []
        self.last_bounds = None
        self.out, _ = self.term(bias)
        if not any(isinstance(a, str) and a.startswith("@") for _, args in self.steps for a in args):
            raise NotPositional("the bias does not vary with the positions")

    def replay(self, emit, leaf):
        env: dict[str, object] = {}

        def val(a):
            if isinstance(a, str) and a.startswith("t"):
                return env[a]
            if isinstance(a, str) and a.startswith("leaf"):
                return leaf(*self.leaves[int(a[4:])])
            return a

        for i, (op, args) in enumerate(self.steps):
            env[f"t{i}"] = emit(op, *(val(a) for a in args))
        return val(self.out)

    # ---- recording ----------------------------------------------------------------------------
    def emit(self, op, *args):
        self.steps.append((op, args))
        return f"t{len(self.steps) - 1}"

    def term(self, x, ax: Axes | None = None) -> tuple[object, torch.dtype | None]:
        """(operand, eager dtype) of ``x``, whose dims line up with the score atoms ``ax`` (right-aligned
        against the scores when not given); a Python scalar has dtype None."""
        val = scalar_value(x)
        if val is not None:
            return val, None
        if not isinstance(x, Node) or shape_of(x) is None:
            raise NotPositional(f"operand {x!r} is neither a constant nor a tensor")
        if x.op == "placeholder" and ax is not None and {a for axis in ax for a in axis} & self.own:
            raise NotPositional(f"it reads the run-time tensor {x.name} along the query or key axis")
        if ax is None:
            try:
                ax = align_broadcast(shape_of(x), self.axes, self.sizes)
            except NoMatch as e:
                raise NotPositional(f"{x.name} does not broadcast to the scores ({e})") from None
        dt = dtype_of(x)
        if not {a for axis in ax for a in axis} & self.own:
            if not dt.is_floating_point:
                raise NotPositional(f"{x.name}: an integer tensor along the batch or heads (not a position)")
            self.leaves.append((x, ax, None))
            return f"leaf{len(self.leaves) - 1}", dt
        whole = self.lifted(x, ax)
        if whole is not None:
            return whole, dt
        return self.pointwise(x, dt, ax), dt

    def lifted(self, x: Node, ax: Axes):
        """The integer position expression of ``x`` as steps, or None where it is not one."""
        try:
            v = lift(x)
        except Opaque:
            return None
        e = v.expr
        if has_runtime(e) and not dtype_of(x).is_floating_point:
            raise NotPositional(f"{x.name}: its integer values read {opaque_sources(e, x)}, not positions alone")
        if has_runtime(e) or not isinstance(e, sympy.Expr):
            return None
        if e.has(sympy.Piecewise):
            raise NotPositional(f"{x.name}: the position expression has cases (an edited or selected position "
                                f"tensor): {e}")
        if not e.is_integer:
            return None  # a float expression: translated op by op instead
        names = {}
        for sym, axis in zip(v.axes, ax):
            if sym is not None and sym in e.free_symbols:
                if len(axis) != 1 or axis[0] not in self.own:
                    raise NotPositional(f"{x.name}: a position expression along {axis or 'a broadcast dim'} "
                                        "(not one query or key axis)")
                names[sym] = "@" + axis[0]
        self.last_bounds = bounds(e, ranges(v))
        return self._expr(e, names, ranges(v), x)

    def _expr(self, e, names, rng, x):
        b = bounds(e, rng)
        if b is None or max(abs(b[0]), abs(b[1])) >= EXACT_INT:
            raise NotPositional(f"{x.name}: position expression {e} is not proven within ±2**24 "
                                "(exact in float32, where the tile computes it)")
        if e.is_Integer:
            return float(int(e))
        if e.is_Symbol:
            return names[e]
        args = [self._expr(a, names, rng, x) for a in e.args]
        kinds = {sympy.Add: "add", sympy.Mul: "mul", sympy.Max: "max", sympy.Min: "min"}
        if isinstance(e, sympy.Abs):
            return self.emit("abs", args[0])
        for kind, op in kinds.items():
            if isinstance(e, kind):
                out = args[0]
                for a in args[1:]:
                    out = self.emit(op, out, a)
                return out
        raise NotPositional(f"{x.name}: {type(e).__name__} in the position expression {e}")

    def gather(self, x: Node, ax: Axes):
        """A table read at an index computed from positions (a relative-position table per head,
        ``table[h, clamp(m − p + K, 0, 2K)]``): the table is a leaf [*batch, 1, T], the index the
        exact position expression, proven within [0, T) (a negative index would wrap)."""
        table, index, dim = gather_parts(x)
        tshape, ishape = shape_of(table), shape_of(index)
        if shape_of(x) != (*tshape[:dim], *ishape, *tshape[dim + 1:]):
            raise NotPositional(f"{x.name}: the gather's shape is not table[:dim] + index + table[dim+1:]")
        lead, trail = ax[:dim], ax[dim + len(ishape):]
        if {a for axis in (*lead, *trail) for a in axis} & self.own:
            raise NotPositional(f"{x.name}: the table varies along the query or key axis itself")
        idx = self.lifted(index, ax[dim:dim + len(ishape)])
        if idx is None or dtype_of(index).is_floating_point:
            raise NotPositional(f"{x.name}: its index {index.name} is not an exact integer position expression")
        lo, hi = self.last_bounds
        if lo < 0 or hi >= tshape[dim]:
            raise NotPositional(f"{x.name}: the index is not proven within [0, {tshape[dim]}) (its range is "
                                f"[{lo}, {hi}])")
        atom = f"{table.name}@table"
        self.sizes.sizes[atom] = tshape[dim]
        self.leaves.append((table, (*lead, (atom,), *trail), atom))
        return self.emit("gather", f"leaf{len(self.leaves) - 1}", idx)

    def convert(self, operand, src: torch.dtype | None, dst: torch.dtype, x: Node):
        """An operand as eager converts it to ``dst`` (the op's dtype) before the op."""
        if src is None:  # a Python scalar: exact in dst, or refused (its rounding is backend-dependent)
            c = float(operand)
            if dst in HALF and float(torch.tensor(c, dtype=dst)) != c:
                raise NotPositional(f"{x.name}: the constant {c!r} is not exact in {dst}")
            return float(torch.tensor(c, dtype=torch.float32))  # torch casts a scalar to the op's dtype
        if src == torch.float64:
            raise NotPositional(f"{x.name}: a float64 operand (the tile computes in float32)")
        if dst in HALF and src != dst:
            return self.emit(HALF[dst], operand)
        return operand

    def pointwise(self, x: Node, dt: torch.dtype, ax: Axes):
        t = x.target
        if dt == torch.float64 or not dt.is_floating_point:
            why = "in float64 (the tile computes float32: its rounding would differ)" if dt.is_floating_point \
                else f"in {dt}, not as an exact position expression"
            raise NotPositional(f"{x.name} ({t}) computes the bias {why}")
        if t in GATHERS:
            return self.gather(x, ax)
        if t in SAME_ELEMENTS or t == aten.permute.default:
            src = x.args[0]
            operand, src_dt = self.term(src, view_axes(shape_of(src), shape_of(x), ax, x, self.sizes))
            return self.convert(operand, src_dt, dt, x)
        if t in CAST_OPS:
            operand, src_dt = self.term(x.args[0], ax)
            out = self.convert(operand, src_dt, dt, x)
            return out
        if t in DIVS:
            c = scalar_value(x.args[1])
            if c is None or c == 0 or math.frexp(abs(c))[0] != 0.5:
                raise NotPositional(f"{x.name}: a division (by {x.args[1]}) — Triton's float32 division is not "
                                    "correctly rounded, eager's is; only a power of two is exact")
            t, args = aten.mul.Tensor, (x.args[0], 1.0 / c)
        else:
            args = x.args
        if t in BINARY or t in UNARY:
            if x.kwargs.get("alpha", 1) != 1:
                raise NotPositional(f"{x.name}: an add with alpha")
            ops = [self.convert(*self.term(a, suffix(a, ax)), dt, x) for a in args[:2 if t in BINARY else 1]]
            out = self.emit((BINARY | UNARY)[t], *ops)
        elif t in CLAMPS:
            lo = x.args[1] if len(x.args) > 1 else x.kwargs.get("min")
            hi = x.args[2] if len(x.args) > 2 else x.kwargs.get("max")
            if t == aten.clamp_max.default:
                lo, hi = None, x.args[1]
            out = self.convert(*self.term(x.args[0], ax), dt, x)
            for bound, op in ((lo, "max"), (hi, "min")):
                if bound is not None:
                    if scalar_value(bound) is None:
                        raise NotPositional(f"{x.name}: a clamp to a tensor")
                    out = self.emit(op, out, self.convert(scalar_value(bound), None, dt, x))
        else:
            raise NotPositional(f"{x.name}: {t} on a bias that varies with the positions (not modelled "
                                f"exactly){runtime_inputs(x)}")
        return self.emit(HALF[dt], out) if dt in HALF else out


def gather_parts(x: Node):
    """(table, index, dim): ``x`` reads ``table`` along ``dim`` at the integer tensor ``index`` —
    ``table[:, …, :, index]`` (leading full slices) or ``embedding(index)`` (dim 0)."""
    if x.target == aten.embedding.default:
        return x.args[0], x.args[1], 0
    table, indices = x.args[0], list(x.args[1])
    given = [i for i, a in enumerate(indices) if a is not None]
    if len(given) != 1 or given[0] != len(indices) - 1:
        raise NotPositional(f"{x.name}: an index by several tensors, or after one (only table[:, …, idx] is read)")
    return table, indices[-1], given[0]


def resolve_positions(steps, rows: list[str], cols: list[str]):
    """Steps with ``@atom`` placeholders → steps over ``p`` (the query axis) and ``m`` (the key axis)."""
    def name(a):
        if not (isinstance(a, str) and a.startswith("@")):
            return a
        if [a[1:]] == list(rows):
            return "p"
        if [a[1:]] == list(cols):
            return "m"
        raise PositionsUnaligned(f"the bias varies along {a[1:]}, which is not the site's query axis {rows} "
                                 f"or key axis {cols}")
    return [(op, tuple(name(a) for a in args)) for op, args in steps]
