"""Every spelling of a two-operand contraction, read as one einsum.

``@``, ``torch.matmul``, ``bmm``, ``mm``, ``baddbmm`` and ``einsum`` (any letters) all
become a `Contraction`: one label per axis of each operand and of the output. The
recogniser works on labels only, so the spelling stops mattering here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from .axes import NoMatch, shape_of

aten = torch.ops.aten


@dataclass(frozen=True)
class Contraction:
    node: Node
    a: Node
    b: Node
    a_labels: tuple[str, ...]
    b_labels: tuple[str, ...]
    out_labels: tuple[str, ...]
    spelling: str
    added: Node | float | None = None  # baddbmm's input, added to the product
    beta: float = 1.0
    alpha: float = 1.0

    @property
    def contracted(self) -> tuple[str, ...]:
        return tuple(x for x in self.a_labels if x in self.b_labels and x not in self.out_labels)


def _matmul_labels(sa: tuple[int, ...], sb: tuple[int, ...]):
    if len(sa) < 2 or len(sb) < 2:
        raise NoMatch("a matrix-vector product")
    ba, bb = sa[:-2], sb[:-2]
    nb = max(len(ba), len(bb))
    batch = [f"_b{i}" for i in range(nb)]

    def lab(own, other):
        out = []
        for i, s in enumerate(own):
            j = nb - len(own) + i
            k = j - (nb - len(other))
            other_s = other[k] if 0 <= k < len(other) else 1
            out.append("" if (s == 1 and other_s != 1) else batch[j])
        return out

    la = [*lab(ba, bb), "_n", "_c"]
    lb = [*lab(bb, ba), "_c", "_f"]
    lo = [*batch, "_n", "_f"]
    return tuple(la), tuple(lb), tuple(lo)


def as_contraction(node: Node) -> Contraction | None:
    if node.op != "call_function":
        return None
    t = node.target
    try:
        if t in (aten.matmul.default, aten.bmm.default, aten.mm.default):
            a, b = node.args[:2]
            sa, sb = shape_of(a), shape_of(b)
            if sa is None or sb is None:
                return None
            la, lb, lo = _matmul_labels(sa, sb)
            name = {aten.matmul.default: "matmul", aten.bmm.default: "bmm", aten.mm.default: "mm"}[t]
            return Contraction(node, a, b, la, lb, lo, name)
        if t == aten.baddbmm.default:
            added, a, b = node.args[:3]
            beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1.0)
            alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1.0)
            la, lb, lo = _matmul_labels(shape_of(a), shape_of(b))
            return Contraction(node, a, b, la, lb, lo, "baddbmm", added, float(beta), float(alpha))
        if t == aten.einsum.default:
            eq, operands = node.args[:2]
            if len(operands) != 2 or "->" not in eq:
                return None
            shapes = [shape_of(o) for o in operands]
            if any(sh is None for sh in shapes):
                return None
            labels = einsum_labels(eq.replace(" ", ""), shapes)
            if labels is None:
                return None
            (ia, ib), out = labels
            if len(set(ia)) != len(ia) or len(set(ib)) != len(ib):
                return None  # a diagonal, not a contraction
            return Contraction(node, operands[0], operands[1], ia, ib, out, f"einsum('{eq}')")
    except NoMatch:
        return None
    return None


def einsum_labels(eq: str, shapes) -> tuple[tuple[tuple[str, ...], ...], tuple[str, ...]] | None:
    """Split an einsum equation into one label per axis; ``...`` becomes fresh labels,
    right-aligned across operands as numpy broadcasting aligns them."""
    lhs, out = eq.split("->")
    subs = lhs.split(",")
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    counts = []
    for sub, shape in zip(subs, shapes):
        if "..." in sub:
            pre, post = sub.split("...")
            counts.append(len(shape) - len(pre) - len(post))
        else:
            counts.append(0)
    n_ell = max(counts + [0])
    if n_ell > len(free) or any(c < 0 for c in counts):
        return None
    ell = free[:n_ell]

    def expand(sub, count):
        if "..." not in sub:
            return tuple(sub)
        pre, post = sub.split("...")
        return (*pre, *ell[n_ell - count:], *post)

    operands = tuple(expand(sub, c) for sub, c in zip(subs, counts))
    return operands, expand(out, n_ell)
