"""Small readers of ATen nodes shared by the linear-attention recognisers (linear_chunked.py,
linear_loop.py, linear_cumsum.py, linear_prefix.py): calls, dims, slices, zeros, cumsums, scalar
scales, and the named axes of operands read through permutation-like ops (axes.py's atoms)."""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import AtomSizes, Axes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import Contraction, as_contraction
from .softmax_chain import scalar_value

aten = torch.ops.aten

ZERO_OPS = {aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default}
FULL_OPS = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}


def is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def cumsum_of(node) -> tuple[Node, int] | None:
    """``cumsum(x, d)`` (no dtype change): (x, d)."""
    if not is_call(node, aten.cumsum.default) or node.kwargs.get("dtype") is not None or len(node.args) > 2:
        return None
    x, d = node.args[:2]
    shape = shape_of(x)
    return (x, norm_dim(d, len(shape))) if shape is not None else None


def is_zero(node) -> bool:
    """A tensor that is zero everywhere whatever the inputs (zeros_like, new_zeros, full(…, 0), a constant)."""
    for _ in range(8):
        if isinstance(node, Node) and is_layout_op(node):
            node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target in ZERO_OPS:
        return True
    if node.target in FULL_OPS:
        i = FULL_OPS[node.target]
        return len(node.args) > i and scalar_value(node.args[i]) == 0.0
    from rewrite.patterns.constants import constant_value

    val = constant_value(node)
    return val is not None and not bool(val.any())


def slice_range(node) -> tuple[Node, int, int, int] | None:
    """``x[.., a:b, ..]`` with step 1: (x, dim, a, b), a and b normalised to 0 ≤ a ≤ b ≤ size."""
    if not is_call(node, aten.slice.Tensor):
        return None
    x = node.args[0]
    shape = shape_of(x)
    if shape is None:
        return None
    d = norm_dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    size = shape[d]
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if step != 1:
        return None

    def norm(i, default):
        if i is None:
            return default
        i = i + size if i < 0 else i
        return min(max(i, 0), size)

    return x, d, norm(start, 0), norm(end, size)


def back_to_contraction(node) -> tuple[Contraction | None, list[Node], float]:
    """Walk back through layout ops and scalar scales: (the contraction, the steps in forward order, scale)."""
    steps: list[Node] = []
    scale = 1.0
    cur = node
    for _ in range(16):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None, [], 1.0
        c = as_contraction(cur)
        if c is not None:
            return c, list(reversed(steps)), scale
        if is_layout_op(cur):
            steps.append(cur)
            cur = cur.args[0]
            continue
        s = scalar_step(cur)
        if s is None:
            return None, [], 1.0
        steps.append(cur)
        scale *= s[1]
        cur = s[0]
    return None, [], 1.0


def scalar_step(node) -> tuple[Node, float] | None:
    """``x · c`` or ``x ÷ c`` by a number: (x, the factor)."""
    if not is_call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        return None
    a, b = node.args[:2]
    if node.target in (aten.mul.Tensor, aten.mul.Scalar):
        if scalar_value(b) is not None and isinstance(a, Node):
            return a, scalar_value(b)
        if scalar_value(a) is not None and isinstance(b, Node):
            return b, scalar_value(a)
        return None
    v = scalar_value(b)
    return (a, 1.0 / v) if v not in (None, 0.0) and isinstance(a, Node) else None


def forward_axes(axes: Axes, steps: list[Node], sizes: AtomSizes) -> Axes:
    for s in steps:
        if is_layout_op(s):
            axes = propagate(s, axes, sizes)
    return axes


# Ops that only move or name dims (every dim keeps its own atom): the operands of the four products may
# each reach the same chunk view through their own transposes.
PERMUTE_OPS = {aten.transpose.int, aten.t.default, aten.permute.default, aten.numpy_T.default, aten.alias.default,
               aten.clone.default, aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim,
               aten.squeeze.dims, aten.squeeze.default}


def to_source(node) -> tuple[Node, list[Node]]:
    """The node ``node`` reads through permutation-like ops, and those ops in forward order."""
    chain: list[Node] = []
    while is_call(node, *PERMUTE_OPS) and len(chain) < 16:
        chain.append(node)
        node = node.args[0]
    return node, list(reversed(chain))


def source_axes(node: Node, axes: Axes) -> tuple[Node, Axes]:
    """(the source of ``node``, the source's axes) given ``node``'s axes."""
    src, chain = to_source(node)
    shape = shape_of(src)
    if shape is None:
        raise NoMatch("shapes unknown")
    trial = AtomSizes({f"d{i}@": s for i, s in enumerate(shape) if s != 1})
    fresh = tuple(() if s == 1 else (f"d{i}@",) for i, s in enumerate(shape))
    out = forward_axes(fresh, chain, trial)
    where = {o[0]: ax for o, ax in zip(out, axes) if o}
    return src, tuple(where.get(f"d{i}@", ()) for i in range(len(shape)))


def operand_axes(node, src: Node, src_axes: Axes, sizes: AtomSizes) -> Axes | None:
    """``node``'s axes when it reads ``src`` through permutation-like ops, else None."""
    s, chain = to_source(node)
    return forward_axes(src_axes, chain, sizes) if s is src else None


def labels_to_atoms(labels, axes: Axes, what: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for lab, ax in zip(labels, axes):
        if not ax:
            continue
        if len(ax) != 1 or not lab:
            raise NoMatch(f"{what} merge logical axes within one dim")
        if table.setdefault(lab, ax[0]) != ax[0]:
            raise NoMatch(f"{what}: one label names two axes")
    return table


def axes_from_labels(labels, shape, table: dict[str, str]) -> Axes:
    return tuple((table[lab],) if s != 1 and lab in table else () for lab, s in zip(labels, shape))
