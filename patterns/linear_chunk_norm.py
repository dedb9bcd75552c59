"""The normaliser of chunked causal linear attention (linear_chunked.py):

    out = (inter + intra) ÷ (φQ_c · z_c + Σ_l' W + eps),   z_c = Σ_{c' < c} Σ_l φK_{c'}   (an exclusive prefix)

where W are the intra-chunk weights (the very weights that multiply V_c, up to layout ops)."""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import AtomSizes, Axes, NoMatch, shape_of
from .linear_prefix import exclusive_prefix
from .linear_readers import (
    axes_from_labels,
    back_to_contraction,
    forward_axes,
    is_call,
    labels_to_atoms,
    norm_dim,
    operand_axes,
    to_source,
)
from .linear_site import LinearSite, den_axes, row_sum, same_weights
from .softmax_chain import scalar_value

aten = torch.ops.aten


def chunked_denominator(node: Node, qs: LinearSite, src: dict, chunk: str, sizes: AtomSizes,
                 batch: list[str]) -> tuple[list[Axes], float, list[Node]] | None:
    """den = φQ_c · z_c + Σ_l' W (+ eps), z_c an exclusive prefix over chunks of Σ_l φK:
    ([axes of each term], eps, the nodes), else None."""
    bnd = qs.bindings
    terms: list[Node] = []
    eps = 0.0
    nodes: list[Node] = []
    stack = [node]
    while stack:
        t = stack.pop()
        if is_call(t, aten.add.Tensor) and t.kwargs.get("alpha", 1) == 1 and len(nodes) < 8:
            nodes.append(t)
            for a in t.args[:2]:
                if scalar_value(a) is not None:
                    eps += scalar_value(a)
                elif isinstance(a, Node):
                    stack.append(a)
                else:
                    return None
        else:
            terms.append(t)
    if len(terms) != 2:
        return None
    axes_list: list[Axes] = []
    kinds = set()
    for t in terms:
        rs = row_sum(t)
        if rs is not None:
            w, dim, _ = rs
            axes_of = bnd["axes_of"]
            if w not in axes_of or not same_weights(w, bnd["weights"]):
                return None
            ax = den_axes(w, dim, axes_of[w])
            if ax is None:
                return None
            axes_list.append(ax)
            kinds.add("intra")
            nodes.append(t)
            continue
        found = _inter_den(t, src, chunk, sizes, batch)
        if found is None:
            return None
        axes_list.append(found[0])
        kinds.add("inter")
        nodes.extend(found[1])
    if kinds != {"intra", "inter"}:
        return None
    need = sorted([*batch, "p"])
    if any(sorted(a for ax in axes for a in ax) != need for axes in axes_list):
        return None
    return axes_list, eps, nodes


def _inter_den(t: Node, src: dict, chunk: str, sizes: AtomSizes,
               batch: list[str]) -> tuple[Axes, list[Node]] | None:
    """t = φQ_c · z_c through layout ops: (t's axes, the nodes)."""
    (q_src, q_ax), (k_src, k_ax) = src["q"], src["k"]
    c, steps, scale = back_to_contraction(t)
    if c is None or scale != 1.0 or c.added is not None or c.alpha != 1.0:
        return None
    if to_source(c.a)[0] is q_src:
        q_op, z_node, q_labels, z_labels = c.a, c.b, c.a_labels, c.b_labels
    elif to_source(c.b)[0] is q_src:
        q_op, z_node, q_labels, z_labels = c.b, c.a, c.b_labels, c.a_labels
    else:
        return None
    try:
        tab = labels_to_atoms(q_labels, operand_axes(q_op, q_src, q_ax, sizes), "the queries")
        if [tab.get(lab) for lab in c.contracted] != ["e"]:
            return None
        z_shape = shape_of(z_node)
        if any(s != 1 and (lab not in tab or tab[lab] == "p") for lab, s in zip(z_labels, z_shape)):
            return None
        z_axes = axes_from_labels(z_labels, z_shape, tab)
        if sorted(a for ax in z_axes for a in ax) != sorted([*batch, "e"]):
            return None
        x, d, prefix_nodes, _ = exclusive_prefix(z_node)
        if z_axes[d] != ((chunk,) if chunk else ()) or shape_of(x) != z_shape:
            return None
        # x = Σ over the positions of a chunk of the keys, keeping (or dropping) that dim.
        if not is_call(x, aten.sum.dim_IntList) or len(x.args[1]) != 1 or x.kwargs.get("dtype") is not None:
            return None
        xa = operand_axes(x.args[0], k_src, k_ax, sizes)
        if xa is None:
            return None
        sd = norm_dim(x.args[1][0], len(xa))
        keep = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
        if xa[sd] != ("m",):
            return None
        x_axes = tuple(() if i == sd else ax for i, ax in enumerate(xa) if keep or i != sd)
        if x_axes != z_axes:
            return None
        out_axes = forward_axes(axes_from_labels(c.out_labels, shape_of(c.node), tab), steps, sizes)
    except NoMatch:
        return None
    return out_axes, [t, c.node, *steps, *prefix_nodes, x]
