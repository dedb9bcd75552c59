"""Linear attention written already reassociated (non-causal):

    KV = φKᵀ V   (a product over the keys)   →   out = φQ KV   [÷ (φQ · Σ_m φK + eps)]

It is already O(N·D²); the rewrite runs it as one fused pass (rewrite::linear_attention) and
reports it. The user's einsum letters are kept apart from the recogniser's own atom names.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .axes import AtomSizes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import Contraction, as_contraction
from .linear_den import key_sum_den
from .linear_site import LinearSite, broadcasts_as, finish_linear_site, plan_operand
from .softmax_attention import location_of

aten = torch.ops.aten


def match_reassociated(c2: Contraction) -> LinearSite:
    """out = φQ · (φKᵀ V) [÷ φQ · Σ_m φK]: C1 contracts the key axis, C2 the features."""
    for q_node, kv_node, q_labels, kv_labels in ((c2.a, c2.b, c2.a_labels, c2.b_labels),
                                                 (c2.b, c2.a, c2.b_labels, c2.a_labels)):
        cur, layout = kv_node, []
        while isinstance(cur, Node) and is_layout_op(cur):
            layout.append(cur)
            cur = cur.args[0]
        c1 = as_contraction(cur) if isinstance(cur, Node) else None
        if c1 is None:
            continue
        return _match_reassoc(c2, c1, list(reversed(layout)), q_node, q_labels, kv_labels)
    raise NoMatch("no state product feeds this one")


def _match_reassoc(c2, c1, layout, q_node, q_labels, kv_labels) -> LinearSite:
    # C1: KV[b, e, f] = Σ_m K[b, m, e] V[b, m, f]
    sa, sb, so = shape_of(c1.a), shape_of(c1.b), shape_of(c1.node)
    if sa is None or sb is None or so is None:
        raise NoMatch("shapes unknown")
    size: dict[str, int] = {}
    for labels, shape in ((c1.a_labels, sa), (c1.b_labels, sb), (c1.out_labels, so)):
        for lab, s in zip(labels, shape):
            if lab and s != 1:
                size.setdefault(lab, s)
    contracted = [lab for lab in size if lab in c1.a_labels and lab in c1.b_labels and lab not in c1.out_labels]
    batch = [lab for lab in size if lab in c1.a_labels and lab in c1.b_labels and lab in c1.out_labels]
    only_a = [lab for lab in size if lab in c1.a_labels and lab not in c1.b_labels]
    only_b = [lab for lab in size if lab in c1.b_labels and lab not in c1.a_labels]
    if len(contracted) != 1 or len(only_a) != 1 or len(only_b) != 1 or not batch:
        raise NoMatch("not a state product φKᵀ V")
    sizes = AtomSizes({})
    names = {contracted[0]: "m", **{lab: f"b{i}" for i, lab in enumerate(batch)}}

    def atom(lab):  # the user's letters live in their own namespace ("m@"), never clash with ours
        return names.get(lab, f"{lab}@")

    # Which of C1's free axes does C2 contract with the queries? That one is e (keys' side).
    kv_axes = tuple((atom(lab),) if lab and s != 1 else () for lab, s in zip(c1.out_labels, so))
    for lab in size:
        sizes.sizes[atom(lab)] = size[lab]
    for node in layout:
        kv_axes = propagate(node, kv_axes, sizes)
    lab2atom = {lab: ax[0] for lab, ax in zip(kv_labels, kv_axes) if lab and len(ax) == 1}
    contracted2 = [lab for lab in kv_labels if lab and lab in q_labels and lab not in c2.out_labels]
    if len(contracted2) != 1 or lab2atom.get(contracted2[0]) not in (atom(only_a[0]), atom(only_b[0])):
        raise NoMatch("the query product does not contract a feature axis of the state")
    e_lab = only_a[0] if lab2atom[contracted2[0]] == atom(only_a[0]) else only_b[0]
    f_lab = only_b[0] if e_lab == only_a[0] else only_a[0]
    k_node, v_node = (c1.a, c1.b) if e_lab == only_a[0] else (c1.b, c1.a)
    k_labels, v_labels = (c1.a_labels, c1.b_labels) if e_lab == only_a[0] else (c1.b_labels, c1.a_labels)
    ren = {atom(e_lab): "e", atom(f_lab): "f"}
    sizes.sizes["e"], sizes.sizes["f"] = size[e_lab], size[f_lab]
    for a in ren:
        sizes.sizes.pop(a, None)
    lab2atom = {lab: ren.get(a, a) for lab, a in lab2atom.items()}

    def axes_of(labels, shape, table):
        return tuple((table[lab],) if lab in table and s != 1 else () for lab, s in zip(labels, shape))

    tab1 = {**names, e_lab: "e", f_lab: "f"}
    k_axes = axes_of(k_labels, shape_of(k_node), tab1)
    v_axes = axes_of(v_labels, shape_of(v_node), tab1)
    sq = shape_of(q_node)
    q_axes, p_seen = [], False
    for lab, s in zip(q_labels, sq):
        if s == 1 or not lab:
            q_axes.append(())
        elif lab in lab2atom:
            q_axes.append((lab2atom[lab],))
        elif not p_seen:
            q_axes.append(("p",))
            sizes.sizes["p"] = s
            lab2atom[lab] = "p"
            p_seen = True
        else:
            raise NoMatch("the queries have an extra axis")
    if not p_seen:
        raise NoMatch("the queries have no sequence axis")
    out_axes = tuple((lab2atom[lab],) if lab in lab2atom and s != 1 else ()
                     for lab, s in zip(c2.out_labels, shape_of(c2.node)))
    batch_atoms = sorted(a for a in sizes.sizes if a.startswith("b"))
    if sorted(a for ax in out_axes for a in ax) != sorted([*batch_atoms, "p", "f"]):
        raise NoMatch("the output does not keep batch, query and value axes")
    site = LinearSite(spelling=f"{c1.spelling} → {c2.spelling}", location=location_of(c2.node), form="reassociated",
                      fq=None, fk=None, v=None, out_node=c2.node, atom_sizes=dict(sizes.sizes),
                      batch_atoms=batch_atoms, scale=c1.alpha * c2.alpha)
    site.n, site.m, site.e, site.f = (sizes.sizes[a] for a in ("p", "m", "e", "f"))
    site.fq = plan_operand(q_node, tuple(q_axes), (batch_atoms, ["p"], ["e"]), sizes, "the queries")
    site.fk = plan_operand(k_node, k_axes, (batch_atoms, ["m"], ["e"]), sizes, "the keys")
    site.v = plan_operand(v_node, v_axes, (batch_atoms, ["m"], ["f"]), sizes, "the values")
    out, out_ax = c2.node, out_axes
    cur = out
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if is_layout_op(u):
            out_ax = propagate(u, out_ax, sizes)
            cur = u
            continue
        if u.op == "call_function" and u.target == aten.div.Tensor and u.args[0] is cur:
            den = key_sum_den(u.args[1], q_node, tuple(q_axes), k_node, k_axes, sizes, causal=False)
            if den is not None and broadcasts_as(den[0], out_ax):
                site.normalize, site.eps, out, out_axes = True, den[1], u, out_ax
                site.spelling += " → ÷ φQ·ΣφK"
        break
    return finish_linear_site(site, out, out_axes, [c1.node, *layout, c2.node], q_node, k_node, False,
                              "reassociated")
