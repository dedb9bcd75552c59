"""The normaliser of the reassociated and cumsum forms, read off the graph:

    den = φQ · Σ_m φK           (non-causal)     den = φQ · cumsum_m φK   (causal: the prefix at p)

as one contraction (any spelling the normal form turns into one: einsum, matmul, product-then-sum) of the very
queries with the key sum, ``[+ eps]`` and unsqueezed on either side of the eps. Every label is named by the axes
of the operands it labels (the user's letters are their own), so a normaliser whose queries and key sums are paired
along the wrong axes, or whose layout does not broadcast against the output position by position, is not read.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import AtomSizes, Axes, NoMatch, is_layout_op, propagate
from .contraction import as_contraction
from .linear_readers import cumsum_of, is_call, norm_dim, operand_axes, source_axes
from .linear_site import peel_den

aten = torch.ops.aten


def _key_sum_axes(node, k_node: Node, k_axes: Axes, sizes: AtomSizes, causal: bool) -> Axes | None:
    """The axes of Σ_m φK (causal: cumsum_m φK) reached through layout ops, or None."""
    chain: list[Node] = []
    while isinstance(node, Node) and is_layout_op(node) and len(chain) < 8:
        chain.append(node)
        node = node.args[0]
    if causal:
        cs = cumsum_of(node)
        if cs is None:
            return None
        x, d, keep = cs[0], cs[1], True
    else:
        if not is_call(node, aten.sum.dim_IntList) or len(node.args) < 2 or len(node.args[1]) != 1 or \
                node.kwargs.get("dtype") is not None:
            return None
        x = node.args[0]
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    try:
        src, src_axes = source_axes(k_node, k_axes)
        axes = operand_axes(x, src, src_axes, sizes)
    except NoMatch:
        return None
    if axes is None:
        return None
    if not causal:
        d = norm_dim(node.args[1][0], len(axes))
    if axes[d] != ("m",):
        return None  # a sum over some other axis, or over a slice of the keys
    if not causal:
        axes = tuple(() if i == d else ax for i, ax in enumerate(axes) if keep or i != d)
    try:
        for step in reversed(chain):
            axes = propagate(step, axes, sizes)
    except NoMatch:
        return None
    return axes


def key_sum_den(node, q_node: Node, q_axes: Axes, k_node: Node, k_axes: Axes, sizes: AtomSizes,
                causal: bool) -> tuple[Axes, float] | None:
    """(the denominator's axes, eps) when ``node`` is φQ · Σ_m φK [+ eps] (causal: · cumsum_m φK), else None."""
    node, eps, unsq = peel_den(node)
    c = as_contraction(node) if isinstance(node, Node) else None
    if c is None or c.added is not None or c.alpha != 1.0:
        return None
    if c.a is q_node:
        q_labels, other, o_labels = c.a_labels, c.b, c.b_labels
    elif c.b is q_node:
        q_labels, other, o_labels = c.b_labels, c.a, c.a_labels
    else:
        return None
    o_axes = _key_sum_axes(other, k_node, k_axes, sizes, causal)
    if o_axes is None or len(q_labels) != len(q_axes) or len(o_labels) != len(o_axes):
        return None
    atom: dict[str, str] = {}
    for labels, axes, is_keys in ((q_labels, q_axes, False), (o_labels, o_axes, True)):
        for lab, ax in zip(labels, axes):
            if not ax:
                continue
            if len(ax) != 1 or not lab:
                return None
            a = "p" if is_keys and ax[0] == "m" else ax[0]  # the prefix is read at the query's own position
            if atom.setdefault(lab, a) != a:
                return None
    if [atom.get(lab) for lab in c.contracted] != ["e"]:
        return None
    out = [(atom[lab],) if lab in atom else () for lab in c.out_labels]
    if any(ax in (("e",), ("m",)) for ax in out):
        return None
    for u in unsq:
        out.insert(u + len(out) + 1 if u < 0 else u, ())
    return tuple(out), eps
