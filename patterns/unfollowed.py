"""Softmaxes fed by a product through ops the score chain cannot follow (Longformer's chunked bands:
as_strided windows, diagonal padding; BigBird's gathered key blocks), reported as sites left alone
with the ops that stopped the recogniser, instead of giving no site at all.

The walk goes back from the softmax's input through any op except a layer of weights, to a product
of two batched operands (a router's softmax over ``linear(x)`` or ``x @ W`` is not attention and stays
unreported), and forward from the softmax to a product; both must be met within a few ops.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import is_layout_op, shape_of
from .contraction import as_contraction
from .softmax_chain import softmax_of

aten = torch.ops.aten
BACK_DEPTH = 24
FORWARD_DEPTH = 16
# Ops that end the backward walk: a layer of weights (the input is then no score).
WEIGHT_OPS = {aten.linear.default, aten.embedding.default, aten.conv1d.default, aten.conv2d.default}


def unfollowed_product(sm: Node) -> str | None:
    """The reason to report for a softmax that is fed by a product of two activations through ops the
    chain cannot follow and whose output reaches another product; None when it is not such a softmax."""
    found = softmax_of(sm)
    if found is None:
        return None
    start = found[0]
    path = _path_to_product(start)
    if path is None or not reaches_product(sm):
        return None
    odd = [n for n in path if n.op == "call_function" and not is_layout_op(n)]
    names = list(dict.fromkeys(_op_name(n) for n in odd))[:4]
    return ("a softmax fed by a product through ops the score chain cannot follow ("
            + ", ".join(names or ["layout ops only"])
            + "): chunked or gathered windows (Longformer's sliding chunks, BigBird's key blocks) are not "
            "recognised; the attention runs as written")


def _op_name(n: Node) -> str:
    return str(n.target).replace("aten.", "").split(".")[0]


def _path_to_product(start: Node) -> list[Node] | None:
    """Nodes from ``start`` back to the nearest product of two activations (breadth first), or None."""
    frontier: list[tuple[Node, list[Node]]] = [(start, [])]
    seen: set[Node] = set()
    while frontier:
        node, path = frontier.pop(0)
        if node in seen or len(path) > BACK_DEPTH or not isinstance(node, Node) or node.op != "call_function":
            continue
        seen.add(node)
        c = as_contraction(node)
        if c is not None:
            if _batched(c.a) and _batched(c.b):
                return path
            continue
        if node.target in WEIGHT_OPS:
            continue
        for a in node.args:
            for x in (a if isinstance(a, (list, tuple)) else (a,)):
                if isinstance(x, Node):
                    frontier.append((x, [*path, node]))
    return None


def _batched(x) -> bool:
    """An operand with batch axes (queries or keys), not a weight matrix (a router's ``x @ W``)."""
    shape = shape_of(x) if isinstance(x, Node) else None
    return shape is not None and len(shape) >= 3


def reaches_product(sm: Node) -> bool:
    """Does the softmax's output reach a product within FORWARD_DEPTH ops (through any op)?"""
    frontier, seen = list(sm.users), set()
    while frontier:
        n = frontier.pop()
        if n in seen or len(seen) > FORWARD_DEPTH:
            continue
        seen.add(n)
        if as_contraction(n) is not None:
            return True
        frontier.extend(n.users)
    return False
