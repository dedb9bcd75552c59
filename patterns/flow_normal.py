"""Lift an fx sub-graph into the canonical expression form of patterns/flow_expr.py.

Two phases. First every node gets its axes: each leaf dim a fresh atom, layout ops carried by the axis
algebra (patterns/axes.py), and every elementwise broadcast or contraction unifies the atoms it aligns
(union-find: after it, ``q``'s key axis and ``v``'s are one atom however the code transposed them).
Then each node's Expr is built over the final atoms, so a sum's atoms are known before anything is
pulled out of it. Every einsum, matmul, bmm and mul+sum is one contraction here (``as_contraction``).

What is lifted: the modelled ops that depend on a feature map (Flow-Attention's sigmoids) and the
constant expressions (``arange`` and arithmetic on it). Everything else met on the way is a leaf: the
inputs of the feature maps, the values, and any op the lifter does not model (a projection, a
``where``): an opaque value, which the proof then needs to be q, k or v.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from . import flow_expr as E
from .axes import LAYOUT_IDENTITY, AtomSizes, Axes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import as_contraction

aten = torch.ops.aten
UNARY = {aten.sigmoid.default: "sigmoid", aten.exp.default: "exp", aten.relu.default: "relu",
         aten.tanh.default: "tanh", aten.elu.default: "elu", aten.log.default: "log",
         aten.abs.default: "abs", aten.softplus.default: "softplus"}
# The lift starts at these (Flow-Attention's sigmoid, and the maps a near-miss may use instead of it).
FEATURE_MAPS = {aten.sigmoid.default, aten.relu.default, aten.elu.default, aten.softplus.default, aten.exp.default}
ARANGE = {aten.arange.default, aten.arange.start, aten.arange.start_step}
ELEMENTWISE = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.rsub.Scalar,
               aten.add.Scalar, aten.sub.Scalar, aten.mul.Scalar, aten.div.Scalar, aten.neg.default,
               aten.reciprocal.default, aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default,
               aten.clamp_max.default, aten.cumsum.default, aten.softmax.int, aten._softmax.default, *UNARY}
SUMS = {aten.sum.dim_IntList, aten.sum.default, aten.mean.dim, aten.amax.default}
CONTRACTIONS = {aten.einsum.default, aten.matmul.default, aten.bmm.default, aten.mm.default}
MAX_NODES = 400  # Flow-Attention is ~40-60 ATen ops; a larger region is a model, not one site


@dataclass
class GraphContext:
    """Per graph, once: which nodes depend on a feature map, which are constant, and graph order."""

    sig_desc: set
    const_like: set
    order: dict

    @staticmethod
    def of(graph: Graph) -> GraphContext:
        sig, const, order = set(), set(), {}
        for i, n in enumerate(graph.nodes):
            order[n] = i
            if n.op != "call_function":
                continue
            ins = [a for a in n.all_input_nodes]
            if n.target in FEATURE_MAPS or any(a in sig for a in ins):
                sig.add(n)
            if all(a in const for a in ins) and (ins or n.target in ARANGE or "full" in str(n.target)
                                                 or "scalar_tensor" in str(n.target)):
                const.add(n)
        return GraphContext(sig, const, order)


@dataclass
class Lifted:
    out: Expr
    axes: dict  # node → its axes over the final atoms
    exprs: dict  # node → its Expr
    leaves: list  # the tensor leaves, in graph order
    sizes: dict  # atom → size
    nodes: list  # the lifted call_function nodes, in graph order
    opaque: list = field(default_factory=list)  # leaves that depend on a feature map: ops the lifter does not model


Expr = E.Expr


class _SplitSizes(AtomSizes):
    """Atom sizes where a reshape may split an atom ([B, L, H·D] viewed as [B, L, H, D]: a sigmoid taken
    before the head split); each part is a new atom of the union-find."""

    def __init__(self, atoms: _Atoms):
        super().__init__({}, splittable=True)
        self.atoms = atoms

    def split(self, atom: str, outer: int) -> tuple[str, str]:
        names = super().split(atom, outer)
        for name in names:
            self.atoms.parent[name] = name
        return names


class _Atoms:
    def __init__(self):
        self.parent: dict[str, str] = {}
        self.sizes = _SplitSizes(self)

    def fresh(self, size: int) -> tuple[str, ...]:
        if size == 1:
            return ()
        name = f"a{len(self.parent)}"
        self.parent[name] = name
        self.sizes.sizes[name] = size
        return (name,)

    def find(self, a: str) -> str:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def expand(self, a: str) -> tuple[str, ...]:
        """``a``'s class, as the atoms it has been split into (itself when never split)."""
        r = self.find(a)
        parts = self.sizes.parts.get(r)
        return (r,) if parts is None else tuple(x for p in parts for x in self.expand(p))

    def canon(self, axes: Axes) -> Axes:
        return tuple(tuple(x for a in ax for x in self.expand(a)) for ax in axes)

    def unify(self, x: tuple, y: tuple) -> tuple:
        """Align two axes atom by atom, splitting an atom where the other axis holds it in parts."""
        if not x:
            return y
        if not y:
            return x
        xs, ys = [b for a in x for b in self.expand(a)], [b for a in y for b in self.expand(a)]
        i = 0
        while i < len(xs) and i < len(ys):
            sa, sb = self.sizes.sizes[xs[i]], self.sizes.sizes[ys[i]]
            if sa != sb:
                longer, short = (xs, sb) if sa > sb else (ys, sa)
                if self.sizes.sizes[longer[i]] % short:
                    raise NoMatch("two tensors align axes that merge different atoms")
                longer[i:i + 1] = self.sizes.split(longer[i], short)
                continue
            ra, rb = self.find(xs[i]), self.find(ys[i])
            if ra != rb:
                self.parent[rb] = ra
            i += 1
        if len(xs) != len(ys):
            raise NoMatch("two tensors align axes that merge different atoms")
        return x

    def broadcast(self, all_axes: list[Axes]) -> Axes:
        rank = max((len(a) for a in all_axes), default=0)
        out = []
        for i in range(rank):
            ax: tuple = ()
            for axes in all_axes:
                j = i - (rank - len(axes))
                if j >= 0:
                    ax = self.unify(ax, axes[j])
            out.append(ax)
        return tuple(out)


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _tensor_args(node: Node) -> list[Node]:
    return [a for a in node.args if isinstance(a, Node)]


def max_values_of(node: Node) -> Node | None:
    """The ``aten.max.dim`` node when ``node`` is ``torch.max(x, d)[0]`` (its values), else None."""
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        if isinstance(src, Node) and src.op == "call_function" and src.target == aten.max.dim:
            return src
    return None


def _inputs(node: Node) -> list[Node]:
    mx = max_values_of(node)
    return [mx.args[0]] if mx is not None else list(node.all_input_nodes)


def modelled(node: Node) -> bool:
    """An op the lifter reads; any other is a leaf (an opaque value: the proof then needs it to be q, k or v)."""
    t = node.target
    return (max_values_of(node) is not None or t in ELEMENTWISE or t in SUMS or t in ARANGE or t in CONTRACTIONS
            or t in LAYOUT_IDENTITY or t == aten.expand.default or is_layout_op(node))


def collect(out: Node, ctx: GraphContext) -> tuple[list[Node], list[Node]]:
    """(the nodes to lift, the leaves), in graph order; NoMatch past MAX_NODES (not one attention site)."""
    lifted, leaves, seen, stack = set(), set(), set(), [out]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_function" and (n in ctx.sig_desc or n in ctx.const_like) and modelled(n):
            lifted.add(n)
            if len(lifted) > MAX_NODES:
                raise NoMatch(f"more than {MAX_NODES} ops depend on a sigmoid here")
            stack.extend(_inputs(n))
        else:
            leaves.add(n)
    by = ctx.order.get
    return sorted(lifted, key=by), sorted(leaves, key=by)


def _axes_of(node: Node, at: _Atoms, axes: dict) -> Axes:
    """Phase 1: the axes of one lifted node (and the unifications it implies)."""
    t, shape = node.target, shape_of(node)
    if t in ARANGE:
        return (at.fresh(shape[0]),) if shape else ()
    mx = max_values_of(node)
    if mx is not None:
        src_axes, d = axes[mx.args[0]], _dim(mx.args[1], len(axes[mx.args[0]]))
        keep = len(mx.args) > 2 and mx.args[2]
        return tuple(() if i == d else ax for i, ax in enumerate(src_axes) if keep or i != d)
    con = as_contraction(node) if t in CONTRACTIONS else None
    if con is not None:
        lab: dict[str, tuple] = {}
        for operand, labels in ((con.a, con.a_labels), (con.b, con.b_labels)):
            for ax, label in zip(at.canon(axes[operand]), labels):
                if label:
                    lab[label] = at.unify(lab.get(label, ()), ax)
        return tuple(lab.get(label, ()) for label in con.out_labels)
    src = node.args[0] if node.args and isinstance(node.args[0], Node) else None
    if t == aten.expand.default:
        lead = len(shape) - len(axes[src])
        old = [()] * lead + list(axes[src])
        return tuple(ax if (ax or s == 1) else at.fresh(s) for ax, s in zip(old, shape))
    if is_layout_op(node) and src is not None:
        return propagate(node, at.canon(axes[src]), at.sizes)
    if t in SUMS:
        src_axes = axes[src]
        dims = _reduced_dims(node, len(src_axes))
        keep = len(node.args) > 2 and node.args[2] or node.kwargs.get("keepdim", False)
        return tuple(() if i in dims else ax for i, ax in enumerate(src_axes) if keep or i not in dims)
    if t in ELEMENTWISE:
        return at.broadcast([at.canon(axes[a]) for a in _tensor_args(node)])
    if t in LAYOUT_IDENTITY:
        return axes[src]
    raise NoMatch(f"{t} is not modelled by the flow lifter")


def _reduced_dims(node: Node, rank: int) -> list[int]:
    dims = node.args[1] if len(node.args) > 1 and node.target != aten.sum.default else None
    if node.target == aten.amax.default and len(node.args) > 1 and not dims:
        dims = None  # amax over [] is over every dim
    if dims is None:
        return list(range(rank))
    return [_dim(d, rank) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]


def _one_atom(axes: Axes, d: int, what: str) -> str:
    ax = axes[_dim(d, len(axes))]
    if len(ax) != 1:
        raise NoMatch(f"{what} over an axis that is not one atom")
    return ax[0]


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _refuse_narrowing(node: Node) -> None:
    """A cast to a float type of fewer bits rounds what the flow op would compute in full precision."""
    src, dst = (a.meta.get("val") for a in (node.args[0], node))
    if (isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.dtype.is_floating_point
            and dst.dtype.is_floating_point and torch.finfo(dst.dtype).bits < torch.finfo(src.dtype).bits):
        raise NoMatch(f"a narrowing cast {src.dtype} → {dst.dtype} inside the flow")


def _expr_of(node: Node, ex: dict, axes: dict, sizes: dict) -> Expr:
    """Phase 2: the canonical Expr of one lifted node."""
    t, args = node.target, node.args

    def val(a):
        if isinstance(a, Node):
            return ex[a]
        c = _scalar(a)
        if c is None:
            raise NoMatch(f"{t}: an argument that is neither a tensor nor a number")
        return E.const(c)

    if t in ARANGE:
        nums = [_scalar(a) for a in args]
        start, step = (0.0, 1.0) if len(args) == 1 else (nums[0], nums[2] if len(args) > 2 else 1.0)
        return E.const(start) if not axes[node] else E.add(start, E.mul(step, E.pos(axes[node][0][0])))
    mx = max_values_of(node)
    if mx is not None:
        src = axes[mx.args[0]]
        return E.reduce_max(set(src[_dim(mx.args[1], len(src))]), ex[mx.args[0]])
    con = as_contraction(node) if t in CONTRACTIONS else None
    if con is not None:
        out_atoms = {a for ax in axes[node] for a in ax}
        inner = {a for op in (con.a, con.b) for ax in axes[op] for a in ax} - out_atoms
        return E.reduce_sum(inner, E.mul(ex[con.a], ex[con.b]), sizes)
    if is_layout_op(node) or t in LAYOUT_IDENTITY:
        _refuse_narrowing(node)
        return ex[args[0]]
    if t in UNARY:
        if t == aten.elu.default and len(args) > 1:
            raise NoMatch("elu with parameters")
        return E.fn(UNARY[t], ex[args[0]])
    if t in (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar):
        alpha = float(node.kwargs.get("alpha", 1.0)) * (-1.0 if t in (aten.sub.Tensor, aten.sub.Scalar) else 1.0)
        return E.add(val(args[0]), E.mul(alpha, val(args[1])))
    if t == aten.rsub.Scalar:
        return E.add(val(args[1]), E.mul(-float(node.kwargs.get("alpha", 1.0)), val(args[0])))
    if t in (aten.mul.Tensor, aten.mul.Scalar):
        return E.mul(val(args[0]), val(args[1]))
    if t in (aten.div.Tensor, aten.div.Scalar):
        if node.kwargs.get("rounding_mode") is not None:
            raise NoMatch("a rounding division")
        return E.mul(val(args[0]), E.power(val(args[1]), -1))
    if t == aten.neg.default:
        return E.mul(-1.0, ex[args[0]])
    if t == aten.reciprocal.default:
        return E.power(ex[args[0]], -1)
    if t == aten.pow.Tensor_Scalar:
        n = _scalar(args[1])
        if n is None or n != int(n):
            raise NoMatch("a power that is not an integer")
        return E.power(ex[args[0]], int(n))
    if t in (aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default):
        lo = _scalar(args[1]) if len(args) > 1 and t != aten.clamp_max.default else None
        hi = _scalar(args[2]) if len(args) > 2 else (_scalar(args[1]) if t == aten.clamp_max.default else None)
        lo, hi = node.kwargs.get("min", lo), node.kwargs.get("max", hi)
        return E.clamp(ex[args[0]], lo, hi)
    if t in SUMS:
        src = axes[args[0]]
        dims = _reduced_dims(node, len(src))
        if t == aten.amax.default:
            return E.reduce_max({a for d in dims for a in src[d]}, ex[args[0]])
        total = E.reduce_sum({a for d in dims for a in src[d]}, ex[args[0]], sizes)
        if t != aten.mean.dim:
            return total
        shape = shape_of(args[0])
        return E.mul(1.0 / float(math.prod(shape[d] for d in dims)), total)
    if t == aten.cumsum.default:
        return E.prefix_sum(_one_atom(axes[args[0]], args[1], "a prefix sum"), ex[args[0]])
    if t in (aten.softmax.int, aten._softmax.default):
        return E.softmax(_one_atom(axes[args[0]], args[1], "a softmax"), ex[args[0]], sizes)
    raise NoMatch(f"{t} is not modelled by the flow lifter")


def lift(out: Node, ctx: GraphContext) -> Lifted:
    """The canonical Expr of ``out``'s value over the atoms of its leaves, or NoMatch."""
    lifted, leaves = collect(out, ctx)
    at = _Atoms()
    axes: dict = {}
    for n in leaves:
        shape = shape_of(n)
        if shape is None:
            raise NoMatch(f"{n.name}: a leaf without a known shape")
        axes[n] = tuple(at.fresh(s) for s in shape)
    for n in lifted:
        if shape_of(n) is None:
            raise NoMatch(f"{n.name}: no known shape")
        axes[n] = _axes_of(n, at, axes)
    axes = {n: at.canon(a) for n, a in axes.items()}
    sizes = {at.find(a): s for a, s in at.sizes.sizes.items()}
    for n, a in axes.items():
        flat = [x for ax in a for x in ax]
        if len(set(flat)) != len(flat):
            raise NoMatch(f"{n.name} holds one axis twice (a diagonal)")
    ex: dict = {n: E.leaf(n.name, tuple(x for ax in axes[n] for x in ax)) for n in leaves}
    for n in lifted:
        ex[n] = _expr_of(n, ex, axes, sizes)
    return Lifted(ex[out], axes, ex, leaves, sizes, lifted, [n for n in leaves if n in ctx.sig_desc])
