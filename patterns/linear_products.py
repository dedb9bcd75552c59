"""Products of tensors in every spelling, read as one labelled sum of products (a `Product`: what an einsum
says), for the normal form of linear attention (linear_normal.py): a broadcast multiplication, a matmul or bmm
(its unsqueezed operands read at their sources), an einsum of any number of operands; and the reciprocal 1/d in
its spellings."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch.fx import Node

from .axes import is_layout_op, shape_of
from .contraction import as_contraction, einsum_labels

aten = torch.ops.aten
LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
MAX_OPERANDS = 5


@dataclass
class Product:
    """Σ over the labels not in ``out`` of the product of the operands (each with one label per dim)."""

    operands: list[tuple[Node, tuple[str, ...]]]
    out: tuple[str, ...]


def is_call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _scalar(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def reciprocal_of(node) -> Node | None:
    """d when ``node`` is 1/d: ``reciprocal(d)`` (· 1), ``d ** -1``."""
    if is_call(node, aten.mul.Tensor, aten.mul.Scalar):
        a, b = node.args[:2]
        if _scalar(b) == 1.0:
            node = a
        elif _scalar(a) == 1.0:
            node = b
    if is_call(node, aten.reciprocal.default) and isinstance(node.args[0], Node):
        return node.args[0]
    if is_call(node, aten.pow.Tensor_Scalar) and _scalar(node.args[1]) == -1.0 and isinstance(node.args[0], Node):
        return node.args[0]
    return None


def fresh_label(used: set[str]) -> str:
    c = next(x for x in LETTERS if x not in used)
    used.add(c)
    return c


def _peel_unsqueeze(node: Node, labels: tuple[str, ...]) -> tuple[Node, tuple[str, ...]]:
    """An unsqueezed operand reads its source: the inserted size-1 dim's label is dropped (broadcast)."""
    labels = list(labels)
    while is_call(node, aten.unsqueeze.default) and isinstance(node.args[0], Node):
        d = node.args[1]
        d = d + len(labels) if d < 0 else d
        labels.pop(d)
        node = node.args[0]
    return node, tuple(labels)


def product_of_mul(node: Node, used: set[str]) -> Product | None:
    """``a · b`` (broadcasting, both tensors) as a Product with nothing summed."""
    if not is_call(node, aten.mul.Tensor) or not all(isinstance(a, Node) for a in node.args[:2]):
        return None
    out_shape = shape_of(node)
    if out_shape is None:
        return None
    out = tuple(fresh_label(used) for _ in out_shape)
    operands = []
    for x in node.args[:2]:
        sx = shape_of(x)
        if sx is None or len(sx) > len(out_shape):
            return None
        off = len(out_shape) - len(sx)
        labels = []
        for j, s in enumerate(sx):
            if s == out_shape[off + j]:
                labels.append(out[off + j])
            elif s == 1:
                labels.append(fresh_label(used))  # broadcast: a size-1 dim summed away
            else:
                return None
        operands.append(_peel_unsqueeze(x, tuple(labels)))
    return Product(operands, out)


def product_of_matmul(node: Node, used: set[str]) -> Product | None:
    """A matmul/bmm as a Product (its batch broadcasting as size-1 labels)."""
    if not is_call(node, aten.matmul.default, aten.bmm.default):
        return None
    c = as_contraction(node)
    if c is None:
        return None
    names: dict[str, str] = {}

    def letters(labels):
        return tuple(fresh_label(used) if not lab else names.setdefault(lab, fresh_label(used)) for lab in labels)

    a, b = letters(c.a_labels), letters(c.b_labels)
    return Product([_peel_unsqueeze(c.a, a), _peel_unsqueeze(c.b, b)], letters(c.out_labels))


def product_of_einsum(node: Node) -> Product | None:
    if not is_call(node, aten.einsum.default):
        return None
    eq, operands = node.args[:2]
    if "->" not in eq or not 2 <= len(operands) <= MAX_OPERANDS or not all(isinstance(o, Node) for o in operands):
        return None
    shapes = [shape_of(o) for o in operands]
    if any(s is None for s in shapes):
        return None
    labels = einsum_labels(eq.replace(" ", ""), shapes)
    if labels is None:
        return None
    ins, out = labels
    if any(len(set(lab)) != len(lab) for lab in (*ins, out)):
        return None  # a diagonal
    return Product(list(zip(operands, ins)), tuple(out))


def equation(labels: list[tuple[str, ...]], out: tuple[str, ...]) -> str:
    return ",".join("".join(lab) for lab in labels) + "->" + "".join(out)


def from_product(x) -> bool:
    """``x`` is a contraction's output, through layout ops and scalings (scores, not a mask being built)."""
    for _ in range(8):
        if not (isinstance(x, Node) and x.op == "call_function"):
            return False
        if as_contraction(x) is not None:
            return True
        if x.target in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar) and \
                not isinstance(x.args[1], Node):
            x = x.args[0]
        elif is_layout_op(x):
            x = x.args[0]
        else:
            return False
    return False


# ---- association orders of an n-operand product ----------------------------------------------------
def leaves(t) -> list[int]:
    """The operand indices of a binary tree (an int is an operand, a pair a product)."""
    return [t] if isinstance(t, int) else [*leaves(t[0]), *leaves(t[1])]


def kept_labels(t, labels: list[tuple[str, ...]], out: tuple[str, ...]) -> set[str]:
    """The labels the product ``t`` must keep: the output's and those of every operand outside it."""
    inside = set(leaves(t))
    keep = set(out)
    for i, lab in enumerate(labels):
        if i not in inside:
            keep |= set(lab)
    return keep


def _all_trees(ids: list[int]):
    if len(ids) == 1:
        yield ids[0]
        return
    first, rest = ids[0], ids[1:]
    for r in range(len(rest) + 1):
        for left_rest in itertools.combinations(rest, r):
            right = [i for i in rest if i not in left_rest]
            if not right:
                continue
            for a in _all_trees([first, *left_rest]):
                for b in _all_trees(right):
                    yield (a, b)


def association_orders(labels: list[tuple[str, ...]], out: tuple[str, ...]) -> list:
    """Every binary tree over the operands, the one with the smallest largest intermediate (in labels) first."""

    def cost(t) -> int:
        if isinstance(t, int):
            return 0
        keep = kept_labels(t, labels, out)
        here = len({x for i in leaves(t) for x in labels[i] if x in keep})
        return max(here, cost(t[0]), cost(t[1]))

    return sorted(_all_trees(list(range(len(labels)))), key=cost)
