"""Recognise softmax attention, however it is spelled, in an ATen graph.

Inductor writes one torch function per pattern; we normalise first. The graph has
already been lowered to ATen (so methods, functions, modules and operators are one
op set); `contraction` reads every matmul spelling as an einsum; `axes` carries named
axes through layout ops; `softmax_chain` finds the softmax and walks the scores back to
their contraction; this module reads the one canonical chain

    contraction(Q, K) → [layout | scale | +bias | mask | cast | eval-dropout]*
        → softmax over the key axis → [layout | cast | eval-dropout]* → contraction(A, V)

and returns a `Site` with every binding in the canonical layout, or a reason.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from rewrite.ir.site import Site, TensorPlan

from .axes import (
    AtomSizes,
    Axes,
    NoMatch,
    align_broadcast,
    canonical_plan,
    dtype_of,
    is_layout_op,
    propagate,
    shape_of,
)
from .contraction import Contraction, as_contraction
from .locations import location_of  # noqa: F401 - re-exported: the recognisers import it from here
from .score_mod import lift_modifier
from .softmax_chain import (
    CAST_OPS,
    DROPOUT_OPS,
    as_stored,
    chain_back,
    demote_unshared_rows,
    deviation_notes,
    late_softmax,
    narrows,
    only_user,
    pass_through,
    repeat_factor,
    scalar_value,
    score_of,
    softmax_of,
)

aten = torch.ops.aten

# Finite fill values accepted for masked scores. Any finite fill is exact: the op recomputes, over
# every key with the fill, each row whose kept scores come close enough to it that eager's masked
# weights exp(fill − rowmax) are not zero (codegen/eager.py; in float32, within ~104 + ln M). At or
# below −1e4 that is rare (rows with no kept key, scores below ~−9880), so the kernels' skipping pays;
# a larger fill would send most rows to the recomputation and the site is left as it is.
FINITE_FILL_LIMIT = -1e4



# ---- the recogniser ----------------------------------------------------------------------------
def _atoms_for(c: Contraction, sizes: AtomSizes) -> tuple[Axes, Axes, Axes]:
    sa, sb, so = shape_of(c.a), shape_of(c.b), shape_of(c.node)
    if sa is None or sb is None or so is None:
        raise NoMatch("shapes unknown")
    # Every named axis gets an atom, size 1 included (a decode step has one query); an
    # axis of size 1 where the same label is longer elsewhere broadcasts and names nothing.
    label_size: dict[str, int] = {}
    for labels, shape in ((c.a_labels, sa), (c.b_labels, sb), (c.out_labels, so)):
        for lab, s in zip(labels, shape):
            if lab:
                if s != 1 and label_size.get(lab, 1) not in (1, s):
                    raise NoMatch("inconsistent contraction sizes")
                label_size[lab] = max(s, label_size.get(lab, 1))
    for lab, s in label_size.items():
        sizes.sizes[f"{lab}@qk"] = s

    def axes(labels, shape):
        return tuple((f"{lab}@qk",) if lab and s == label_size[lab] else () for lab, s in zip(labels, shape))

    return axes(c.a_labels, sa), axes(c.b_labels, sb), axes(c.out_labels, so)


def match_softmax_attention(sm: Node, positions: bool = True) -> Site:
    """Match the attention around softmax node ``sm`` (or a written-out softmax's div); ``positions``:
    lift biases computed from positions into the score modifier (patterns/position_bias.py)."""
    found = softmax_of(sm)
    late_sum = None
    if found is None:
        late = late_softmax(sm)
        if late is None:
            raise NoMatch("not a softmax")
        x, dim, sm_spelling, late_sum = late
    else:
        x, dim, sm_spelling = found
    for cast in (sm, *([x] if x.target in CAST_OPS else [])):
        if narrows(dtype_of(cast.args[0]), dtype_of(cast)):
            raise NoMatch(f"the scores are narrowed from {dtype_of(cast.args[0])} to {dtype_of(cast)} for the softmax "
                          "(that rounds them, and makes scores beyond its range ±inf)")
    qk, chain = chain_back(x)
    sizes = AtomSizes({}, splittable=True)
    a_axes, b_axes, axes = _atoms_for(qk, sizes)
    nodes = [qk.node]
    scale = qk.alpha
    keeps: list[tuple[Node, Axes, bool]] = []
    bias_raw: list[tuple[Node, Axes, bool, float, torch.dtype | None]] = []  # (.., the add's dtype)
    fill: float | None = None
    finite_fill_seen = fill_biased = False
    spelling = [qk.spelling]
    links = chain  # every link of the score chain (the modifier's part included)
    own = {a for ax in a_axes for a in ax} ^ {a for ax in b_axes for a in ax} if positions else set()
    position_notes: list[str] = []
    lifted = lift_modifier(qk, chain, axes, sizes, score_of, own, position_notes)
    if lifted is not None:  # the modifier takes the product's own scale and added input
        for node in lifted.nodes:
            only_user(node) if node is not links[-1] else None
        nodes += lifted.nodes
        chain, axes, scale = lifted.rest, lifted.axes, 1.0
        spelling += lifted.spelling
    elif qk.added is not None and qk.beta != 0:
        if isinstance(qk.added, Node):
            bias_raw.append((qk.added, align_broadcast(shape_of(qk.added), axes, sizes), False, qk.beta,
                             dtype_of(qk.node)))
        spelling.append("+bias")
    for node in chain:
        only_user(node) if node is not links[-1] else None
        nodes.append(node)
        t = node.target
        moved = pass_through(node, axes, sizes, "before the softmax")
        if moved is not None:
            axes = moved
            continue
        others = [a for a in node.args if a is not score_of(node, links)]
        if t in (aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
            val = scalar_value(others[0]) if others else None
            if val is None:
                raise NoMatch(f"scores multiplied by a tensor ({node.name}), not by a scalar")
            factor = val if t in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / val
            if factor <= 0:
                raise NoMatch("a non-positive scale")
            scale *= factor
            bias_raw = [(n, a, neg, f * factor, dt) for n, a, neg, f, dt in bias_raw]
            if fill is not None and math.isfinite(fill):
                fill = as_stored(fill * factor, dtype_of(node))
            spelling.append("scale")
            continue
        if t in (aten.add.Tensor, aten.sub.Tensor):
            other = others[0]
            alpha = node.kwargs.get("alpha", 1)
            neg = t == aten.sub.Tensor
            if neg and node.args[0] is not score_of(node, links):
                raise NoMatch("scores subtracted from a tensor")
            if isinstance(other, Node) and shape_of(other) is not None and len(shape_of(other)) > 0:
                if finite_fill_seen:  # GPT-Neo: where(causal, s, finfo.min) + mask; removed scores are fill + bias
                    if bias_raw and not fill_biased:
                        raise NoMatch("biases added both before and after a finite masked_fill")
                    fill_biased = True
                bias_raw.append((other, align_broadcast(shape_of(other), axes, sizes), neg, float(alpha),
                                 dtype_of(node)))
                spelling.append("+bias")
                continue
            val = scalar_value(other)
            if val is not None and math.isfinite(val):
                spelling.append("+const (softmax ignores it)")
                continue
            raise NoMatch(f"scores added to {other}")
        if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.where.self, aten.where.ScalarOther,
                 aten.where.ScalarSelf):
            if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
                mask_node, value, invert = node.args[1], node.args[2], True
            else:
                cond, a, b = node.args[:3]
                score = score_of(node, links)
                mask_node, value, invert = (cond, b, False) if a is score else (cond, a, True)
            if fill_biased:
                raise NoMatch(f"{node.name}: a masked_fill after a bias that was added over a finite fill")
            val = as_stored(scalar_value(value), dtype_of(node))  # -1e9 into float16 scores is -inf
            if val is None or not isinstance(mask_node, Node):
                raise NoMatch(f"{node.name}: masked with a non-constant value")
            if dtype_of(mask_node) != torch.bool:
                raise NoMatch(f"{node.name}: the mask is not boolean")
            if val == float("-inf"):
                if finite_fill_seen:
                    raise NoMatch("-inf and finite masked_fill values mixed")
                fill = val
            elif val <= FINITE_FILL_LIMIT or as_stored(FINITE_FILL_LIMIT, dtype_of(node)) == val:
                if fill is not None and fill != val:
                    raise NoMatch("masked_fill values differ")
                fill, finite_fill_seen = val, True
            else:
                raise NoMatch(f"masked_fill value {val} is above {FINITE_FILL_LIMIT:g}: most rows would need "
                              "recomputing with it")
            keeps.append((mask_node, align_broadcast(shape_of(mask_node), axes, sizes), invert))
            spelling.append("masked_fill" if t in (aten.masked_fill.Scalar, aten.masked_fill.Tensor)
                            else "where")
            continue
        raise NoMatch(f"unsupported op {t} between the two products")

    # The softmax axis names the keys; the operand holding them is K.
    if not (0 <= dim < len(axes)) or not axes[dim]:
        raise NoMatch("softmax over a size-1 axis")
    axes, a_axes, b_axes = (sizes.expand_axes(x_) for x_ in (axes, a_axes, b_axes))  # atoms a view split
    m_atoms = list(axes[dim])
    a_set = {a for ax in a_axes for a in ax}
    b_set = {a for ax in b_axes for a in ax}
    out_set = {a for ax in axes for a in ax}
    if all(a in b_set and a not in a_set for a in m_atoms):
        q_op, k_op, q_axes, k_axes = qk.a, qk.b, a_axes, b_axes
    elif all(a in a_set and a not in b_set for a in m_atoms):
        q_op, k_op, q_axes, k_axes = qk.b, qk.a, b_axes, a_axes
        spelling.append("scores transposed")
    else:
        raise NoMatch("softmax is not over the key axis of the product")
    q_set = {a for ax in q_axes for a in ax}
    k_set = {a for ax in k_axes for a in ax}
    e_atoms = [a for ax in q_axes for a in ax if a in k_set and a not in out_set]
    n_atoms = [a for ax in axes for a in ax if a in q_set and a not in k_set]
    batch = [a for ax in axes for a in ax if a in q_set and a in k_set]
    batch += [a for ax in axes for a in ax if a not in q_set and a not in k_set]
    batch += [a for ax in axes for a in ax if a in k_set and a not in q_set and a not in m_atoms]
    batch = list(dict.fromkeys(batch))
    if not n_atoms or not e_atoms:
        raise NoMatch("the product has no query or no contracted embedding axis")
    if [a for ax in q_axes for a in ax if a not in k_set and a not in out_set]:
        raise NoMatch("the query operand sums over an axis of its own")

    # Forward from the softmax to the product with V.
    a_chain_axes = axes
    cur = sm
    post = []
    for _ in range(32):
        users = [u for u in cur.users if u is not late_sum]
        if len(users) != 1:
            raise NoMatch("the attention weights are also used outside the product with V")
        nxt = users[0]
        if as_contraction(nxt) is not None:
            break
        if is_layout_op(nxt):
            a_chain_axes = propagate(nxt, a_chain_axes, sizes)
        elif nxt.target in DROPOUT_OPS:
            p = nxt.args[1] if len(nxt.args) > 1 else 0.5
            train = nxt.args[2] if len(nxt.args) > 2 else True
            if train and p > 0:
                raise NoMatch("dropout in training mode (its random mask is not reproduced)")
        else:
            raise NoMatch(f"the attention weights go through {nxt.target} before the product with V")
        post.append(nxt)
        cur = nxt
    else:
        raise NoMatch("no product with V")
    av = as_contraction(nxt)
    if av.a is cur:
        a_labels, v_node, v_labels = av.a_labels, av.b, av.b_labels
    elif av.b is cur:
        a_labels, v_node, v_labels = av.b_labels, av.a, av.a_labels
    else:
        raise NoMatch("the weights reach the product only through its added input")
    if av.added is not None and av.beta != 0:
        raise NoMatch("the product with V adds a tensor")
    label_atoms = {lab: ax for lab, ax in zip(a_labels, a_chain_axes) if lab}
    for lab in av.contracted:
        if set(label_atoms.get(lab, ())) - set(m_atoms):
            raise NoMatch("the product with V contracts an axis other than the keys")
    contracted_atoms = [a for lab in av.contracted for a in label_atoms.get(lab, ())]
    if sorted(contracted_atoms) != sorted(m_atoms):
        raise NoMatch("the product with V does not sum over every key")
    sv = shape_of(v_node)
    v_axes = []
    f_atoms = []
    for lab, s in zip(v_labels, sv):
        if lab in label_atoms:
            ax = label_atoms[lab]
            if s == 1 and sizes.of(ax) != 1:
                v_axes.append(())
            elif s != sizes.of(ax):
                raise NoMatch("V does not line up with the weights")
            else:
                v_axes.append(ax)
        elif not lab:
            v_axes.append(())
        else:
            atom = f"{lab}@v"
            sizes.sizes[atom] = s
            f_atoms.append(atom)
            v_axes.append((atom,))
    if not f_atoms:
        raise NoMatch("V has no value-embedding axis")
    so = shape_of(av.node)
    out_axes = []
    for lab, s in zip(av.out_labels, so):
        if lab in label_atoms:
            out_axes.append(label_atoms[lab] if s == sizes.of(label_atoms[lab]) else ())
        else:
            idx = list(v_labels).index(lab) if lab in v_labels else None
            out_axes.append(v_axes[idx] if idx is not None and s == sizes.of(v_axes[idx]) else ())
    if sizes.parts:  # a view after the softmax split atoms: name every axis in the refined atoms
        out_axes, q_axes, k_axes, v_axes, axes = (list(sizes.expand_axes(tuple(x_)))
                                                  for x_ in (out_axes, q_axes, k_axes, v_axes, axes))
        batch, n_atoms, m_atoms, e_atoms, f_atoms = (list(sizes.expand(tuple(x_)))
                                                     for x_ in (batch, n_atoms, m_atoms, e_atoms, f_atoms))
    out_atoms = [a for ax in out_axes for a in ax if sizes.sizes[a] != 1]
    if sorted(out_atoms) != sorted([a for a in batch + n_atoms + f_atoms if sizes.sizes[a] != 1]):
        raise NoMatch("the output of the product with V is not [batch, queries, values]")
    out_node = av.node
    nodes += [sm, *post, av.node]
    if late_sum is not None:
        # The division by Σ must line up with the product's output: [.., N, 1] against [.., N, F].
        divs = [u for u in av.node.users if u.target == aten.div.Tensor and u.args[0] is av.node
                and u.args[1] is late_sum]
        if len(divs) != 1 or len(av.node.users) != 1:
            raise NoMatch("the product with unnormalised weights is not divided by their sum")
        sum_axes = tuple(() if i == dim else ax for i, ax in enumerate(axes))
        try:
            aligned = align_broadcast([sizes.of(ax) for ax in sum_axes], tuple(out_axes), sizes)
        except NoMatch:
            raise NoMatch("the normaliser does not line up with the output") from None
        def real(axes_):
            return [a for ax in axes_ for a in ax if sizes.sizes[a] != 1]

        if real(aligned) != real(sum_axes):
            raise NoMatch("the normaliser does not line up with the output")
        out_node = divs[0]
        nodes += [late_sum, out_node]

    n_atoms, batch = demote_unshared_rows(n_atoms, batch, [x_[1] for x_ in [*bias_raw, *keeps, *(
        lifted.leaves if lifted is not None else [])]], sizes)

    def plan(node, node_axes, rows, cols, what, **kw):
        perm, shape = canonical_plan(node_axes, (batch, rows, cols), sizes, what,
                                     broadcast_ok=what in ("a bias", "a mask"))
        node_axes = sizes.expand_axes(node_axes)
        rows_dim = next((d for d, ax in enumerate(node_axes) if ax and list(ax) == list(rows)), None)
        cols_dim = next((d for d, ax in enumerate(node_axes) if ax and list(ax) == list(cols)), None)
        return TensorPlan(node, perm, shape, rows_dim=rows_dim, cols_dim=cols_dim, **kw)

    site = Site(
        spelling=" → ".join([*spelling, sm_spelling, av.spelling]),
        location=location_of(sm),
        q=plan(q_op, q_axes, n_atoms, e_atoms, "the query"),
        k=plan(k_op, k_axes, m_atoms, e_atoms, "the key"),
        v=plan(v_node, tuple(v_axes), m_atoms, f_atoms, "the value"),
        out_node=out_node, out_perm=[], out_shape=list(so), out_dtype=dtype_of(out_node),
        scale=scale, fill=fill, fill_biased=fill_biased, nodes=nodes,
        batch_sizes=[sizes.sizes[a] for a in batch],
        n=math.prod(sizes.sizes[a] for a in n_atoms), m=math.prod(sizes.sizes[a] for a in m_atoms),
        e=math.prod(sizes.sizes[a] for a in e_atoms), f=math.prod(sizes.sizes[a] for a in f_atoms),
    )
    # GQA/MQA: keys shared by several query heads, by broadcasting or by an explicit repeat.
    q_batch = math.prod(site.q.shape[:-2])
    k_batch = math.prod(site.k.shape[:-2])
    site.gqa_groups = max(q_batch // max(k_batch, 1), repeat_factor(k_op), 1)
    if len(n_atoms) > 1 and len(m_atoms) == 1:
        # Query heads grouped over one key head ([B, Hkv, R, N] against [B, Hkv, M]): the
        # group is folded into the query rows, so keys are read once per key head.
        site.gqa_groups = max(site.gqa_groups, math.prod(sizes.sizes[a] for a in n_atoms[:-1]))
        site.notes.append("grouped query heads folded into the query axis (keys read once per key head)")
    for node, node_axes, neg, factor, add_dtype in bias_raw:
        site.biases.append(plan(node, node_axes, n_atoms, m_atoms, "a bias", negate=neg, factor=factor,
                                dtype=add_dtype))
    for node, node_axes, invert in keeps:
        site.keeps.append(plan(node, node_axes, n_atoms, m_atoms, "a mask", invert=invert))
    if lifted is not None:
        site.score_mod = lifted.resolve(n_atoms, m_atoms)
        site.mod_leaves = [plan(n, ax, r, c, "a bias") for n, ax, r, c in lifted.leaf_groups(n_atoms, m_atoms)]
    # From canonical [*batch, N, F] back to the graph's layout of the output.
    canon_atoms = [*batch, *n_atoms, *f_atoms]
    order = [canon_atoms.index(a) for ax in out_axes for a in ax]
    site.out_perm = order + [i for i in range(len(canon_atoms)) if i not in order]
    site.out_atoms_sizes = [sizes.sizes[a] for a in canon_atoms]
    site.notes += deviation_notes(sm_spelling, dtype_of(qk.node), dtype_of(x)) + position_notes
    if fill_biased and lifted is not None:
        raise NoMatch("a bias added over a finite masked_fill in a site with a score modifier")
    if fill_biased:
        site.notes.append("the bias is added after the finite masked_fill: eager's removed scores are fill + bias")
    if fill is not None and math.isfinite(fill):
        site.notes.append(f"masked_fill({fill:g}) is exact: a row whose kept scores come within ~104 of the fill "
                          "(or that keeps no key: eager averages V) is recomputed over every key with the fill")
    return site
