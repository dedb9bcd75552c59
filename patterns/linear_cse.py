"""One node per value in the normal form of linear attention (linear_normal.py): a value computed twice by the
same deterministic op on the same inputs (``F.elu(k) + 1`` written at each use, ``k.sum(3)`` in the state and
again in the normaliser) becomes one node, so the recognisers see one φK and one key sum."""

from __future__ import annotations

import torch
from torch.fx import Graph


def merge_duplicates(graph: Graph) -> None:
    """A value computed twice by the same pure op on the same inputs (``k.sum(3)`` in the state and again in
    the normaliser) is one node: the second reads the first."""
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or not _pure(node.target):
            continue
        try:
            key = (node.target, _hashable(node.args), _hashable(sorted(node.kwargs.items())))
            first = seen.setdefault(key, node)
        except TypeError:
            continue
        a, b = first.meta.get("val"), node.meta.get("val")
        if first is not node and isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
                a.shape == b.shape and a.dtype == b.dtype:
            node.replace_all_uses_with(first)
            graph.erase_node(node)


def _pure(target) -> bool:
    """A deterministic op that writes nothing and allocates no uninitialised memory."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    name = target.name()
    return (torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable
            and "empty" not in name and "rand" not in name and "dropout" not in name)


def _hashable(x):
    if isinstance(x, (list, tuple)):
        return tuple(_hashable(a) for a in x)
    hash(x)
    return x
