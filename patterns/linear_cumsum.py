"""Causal linear attention written with a cumsum of outer products (Katharopoulos' "causal
linear" reference, Flowformer's ``causal_dot_product``):

    KV  = cumsum_n(φK ⊗ V)                      [.., N, E, F]: one outer product per position
    out = Σ_e φQ · KV   [÷ (Σ_e φQ · cumsum_n(φK) + eps)]

Each query reads the prefix state at its own position: exactly causal linear attention
(m ≤ p), rewritten to rewrite::linear_attention, which never materialises the [N, E, F] cumsum.
Written without layout ops between the outer product, the cumsum and the query product.
"""

from __future__ import annotations

import torch

from .axes import AtomSizes, NoMatch, shape_of
from .contraction import Contraction, as_contraction
from .linear_den import key_sum_den
from .linear_readers import cumsum_of
from .linear_site import LinearSite, broadcasts_as, finish_linear_site, plan_operand, rejected_site
from .softmax_attention import location_of

aten = torch.ops.aten


def match_cumsum(c2: Contraction) -> LinearSite:
    for q_node, kv_node, q_labels, kv_labels in ((c2.a, c2.b, c2.a_labels, c2.b_labels),
                                                 (c2.b, c2.a, c2.b_labels, c2.a_labels)):
        cs = cumsum_of(kv_node)
        if cs is None:
            continue
        c1 = as_contraction(cs[0])
        if c1 is None or c1.contracted or c1.added is not None:
            continue
        try:
            return _match(c2, c1, cs[1], q_node, q_labels, kv_labels)
        except NoMatch as exc:
            if not _outer(c1):
                raise
            return rejected_site(c2.node, f"{c1.spelling} → cumsum → {c2.spelling}", "cumsum",
                                 f"a query product with a cumsum of outer products, but {exc}")
    raise NoMatch("not a query product with a cumsum of outer products")


def _outer(c1) -> bool:
    """An outer product of two tensors per position: each has a (non-trivial) axis the other lacks."""
    so = dict(zip(c1.out_labels, shape_of(c1.node) or ()))
    own_a = [lab for lab in c1.a_labels if lab and lab not in c1.b_labels and so.get(lab, 1) != 1]
    own_b = [lab for lab in c1.b_labels if lab and lab not in c1.a_labels and so.get(lab, 1) != 1]
    return len(own_a) == 1 and len(own_b) == 1


def _match(c2, c1, cs_dim, q_node, q_labels, kv_labels) -> LinearSite:
    so = shape_of(c1.node)
    if so is None or len(kv_labels) != len(c1.out_labels):
        raise NoMatch("shapes unknown")
    n_lab = c1.out_labels[cs_dim]
    if not n_lab or n_lab not in c1.a_labels or n_lab not in c1.b_labels:
        raise NoMatch("the cumsum does not run along the shared sequence axis")
    size = {lab: s for lab, s in zip(c1.out_labels, so) if lab}
    only_a = [lab for lab in c1.a_labels if lab and lab not in c1.b_labels and size.get(lab, 1) != 1]
    only_b = [lab for lab in c1.b_labels if lab and lab not in c1.a_labels and size.get(lab, 1) != 1]
    batch = [lab for lab in c1.out_labels if lab and lab in c1.a_labels and lab in c1.b_labels and lab != n_lab
             and size[lab] != 1]
    if len(only_a) != 1 or len(only_b) != 1 or not batch:
        raise NoMatch("not an outer product of keys and values per position")
    # C2 labels → C1 labels, position by position (no layout op between).
    to1 = {l2: l1 for l2, l1 in zip(kv_labels, c1.out_labels) if l2}
    contracted = [lab for lab in kv_labels if lab and lab in q_labels and lab not in c2.out_labels]
    if len(contracted) != 1 or to1[contracted[0]] not in (only_a[0], only_b[0]):
        raise NoMatch("the query product does not contract a key feature")
    e1 = to1[contracted[0]]
    f1 = only_b[0] if e1 == only_a[0] else only_a[0]
    k_node, v_node = (c1.a, c1.b) if e1 == only_a[0] else (c1.b, c1.a)
    k_labels, v_labels = (c1.a_labels, c1.b_labels) if e1 == only_a[0] else (c1.b_labels, c1.a_labels)
    names = {n_lab: "m", e1: "e", f1: "f", **{lab: f"b{i}" for i, lab in enumerate(batch)}}
    sizes = AtomSizes({names[lab]: size[lab] for lab in names})
    sizes.sizes["p"] = size[n_lab]
    # The query product must keep the sequence label as a shared (diagonal) batch axis.
    n2 = [l2 for l2, l1 in to1.items() if l1 == n_lab]
    if len(n2) != 1 or n2[0] not in q_labels or n2[0] not in c2.out_labels:
        raise NoMatch("each query does not read the state at its own position")
    q_map = {lab: ("p" if to1.get(lab) == n_lab else names.get(to1.get(lab))) for lab in q_labels if lab}

    def axes(labels, shape, table):
        return tuple((table[lab],) if lab in table and table[lab] and s != 1 else () for lab, s in zip(labels, shape))

    batch_atoms = sorted(a for a in sizes.sizes if a.startswith("b"))
    q_axes = axes(q_labels, shape_of(q_node), q_map)
    k_axes = axes(k_labels, shape_of(k_node), names)
    v_axes = axes(v_labels, shape_of(v_node), names)
    out_map = {lab: ("p" if to1.get(lab) == n_lab else names.get(to1.get(lab))) for lab in c2.out_labels if lab}
    out_axes = axes(c2.out_labels, shape_of(c2.node), out_map)
    if sorted(a for ax in out_axes for a in ax) != sorted([*batch_atoms, "p", "f"]):
        raise NoMatch("the output does not keep batch, query and value axes")
    site = LinearSite(spelling=f"{c1.spelling} → cumsum → {c2.spelling}", location=location_of(c2.node),
                      form="cumsum", fq=None, fk=None, v=None, out_node=c2.node, atom_sizes=dict(sizes.sizes),
                      batch_atoms=batch_atoms, scale=c1.alpha * c2.alpha)
    site.n = site.m = size[n_lab]
    site.e, site.f = size[e1], size[f1]
    site.fq = plan_operand(q_node, q_axes, (batch_atoms, ["p"], ["e"]), sizes, "the queries")
    site.fk = plan_operand(k_node, k_axes, (batch_atoms, ["m"], ["e"]), sizes, "the keys")
    site.v = plan_operand(v_node, v_axes, (batch_atoms, ["m"], ["f"]), sizes, "the values")
    site.mask_pred = True  # causal by construction: the prefix state at p holds m ≤ p
    site.mask_const = torch.ones(site.n, site.m, dtype=torch.bool).tril()
    out, out_ax, cur = c2.node, out_axes, c2.node
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if u.op == "call_function" and u.target == aten.div.Tensor and u.args[0] is cur:
            den = key_sum_den(u.args[1], q_node, q_axes, k_node, k_axes, sizes, causal=True)
            if den is not None and broadcasts_as(den[0], out_ax):
                site.normalize, site.eps, out, out_axes = True, den[1], u, out_ax
                site.spelling += " ÷ φQ·cumsum(φK)"
        break
    replaced = [c1.node, c2.b if c2.a is q_node else c2.a, c2.node]
    return finish_linear_site(site, out, out_axes, replaced, q_node, k_node, True, "causal, cumsum of outer products")
