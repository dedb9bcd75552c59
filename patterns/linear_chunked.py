"""Causal linear attention written *chunked* (flash-linear-attention's naive ``chunk_linear_attn``,
Lightning Attention's reference): the sequence is split into NC chunks of C positions, p = c·C + l,

    q, k, v  → [.., NC, C, D] chunk views
    S_c      = Σ_{c' < c} φK_{c'}ᵀ V_{c'}             an exclusive prefix over the chunk axis
    inter    = φQ_c S_c                                the earlier chunks
    intra    = (φQ_c φK_cᵀ ⊙ [l' ≤ l]) V_c             the own chunk, causal inside it
    out      = inter + intra   [÷ (φQ_c z_c + Σ_l' (φQ_c φK_cᵀ ⊙ [l' ≤ l]) + eps)],  z_c = Σ_{c' < c} Σ_l' φK_{c'}

so out[(c,l)] = Σ_{(c',l') ≤ (c,l)} (φq·φk) v: causal linear attention over the flattened positions,
rewritten to rewrite::linear_attention (causal) on the chunk views flattened with the chunk index outer.

Proven, not guessed: the intra part is the quadratic form (linear_attention.py) with its mask's value
exactly l' ≤ l (rewrite.ir.mask.check_causal on the constant); the state is an exclusive prefix over the chunk
axis (a cumsum shifted by one chunk with zeros, by cat or pad + slice, either side of the cumsum, or the
cumsum minus the per-chunk state); all products read the same q, k, v nodes with the same named axes;
and where the chunk views are made from a sequence axis, the chunk index is that axis's outer part.
A chain that has this shape but fails a proof becomes a site left alone with the reason (its intra part
is then not rewritten on its own either: the graph runs unchanged).

The exclusive prefix is read by linear_prefix.py, the optional normaliser by linear_chunk_norm.py. The site's
``form`` is "chunked" (passes/linear_apply.py's complexity line), its spelling names the prefix, and its notes
give the chunk count, the prefix spelling and the sequence split that was proven.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from .axes import AtomSizes, Axes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import as_contraction
from .linear_attention import match_quadratic
from .linear_chunk_norm import chunked_denominator
from .linear_prefix import exclusive_prefix
from .linear_readers import (
    axes_from_labels,
    back_to_contraction,
    forward_axes,
    is_call,
    labels_to_atoms,
    operand_axes,
    source_axes,
    to_source,
)
from .linear_site import LinearSite, NotOurs, broadcasts_as, finish_linear_site, plan_operand
from .softmax_attention import location_of

aten = torch.ops.aten


def _reads(node, targets: set[Node], cumsum: bool = False, depth: int = 0) -> bool:
    """A product of ``targets`` feeds ``node`` through a cumsum, a few steps up (an attention-like state)."""
    if not isinstance(node, Node) or node.op != "call_function" or depth > 8:
        return False
    c = as_contraction(node)
    if c is not None and cumsum and (to_source(c.a)[0] in targets or to_source(c.b)[0] in targets):
        return True
    cumsum = cumsum or node.target == aten.cumsum.default
    return any(_reads(a, targets, cumsum, depth + 1) for a in node.all_input_nodes)


# ---- the recogniser ----------------------------------------------------------------------------------
def find_chunked_sites(graph: Graph) -> list[LinearSite]:
    """Every chunked causal linear-attention site (matched, or attention-like and left alone with a reason)."""
    sites: list[LinearSite] = []
    claimed: set[Node] = set()
    for node in list(graph.nodes):
        if node in claimed or not is_call(node, aten.add.Tensor):
            continue
        try:
            site = match_chunked(node)
        except NoMatch:
            continue
        if claimed.intersection(site.nodes):
            continue
        sites.append(site)
        claimed.update(site.nodes)
    return sites


def match_chunked(add: Node) -> LinearSite:
    """``add`` = inter + intra of the chunked form (either order); NoMatch when it is not that shape."""
    a, b = add.args[:2]
    if not (isinstance(a, Node) and isinstance(b, Node)) or add.kwargs.get("alpha", 1) != 1:
        raise NoMatch("not a sum of two products")
    for x, y in ((a, b), (b, a)):
        c_intra, intra_steps, intra_scale = back_to_contraction(y)
        c_inter, inter_steps, inter_scale = back_to_contraction(x)
        if c_intra is None or c_inter is None:
            continue
        try:
            qs = match_quadratic(c_intra)
        except (NoMatch, NotOurs):
            continue
        bnd = qs.bindings
        if not bnd or qs.out_node is not c_intra.node:
            continue
        try:
            src = {name: source_axes(bnd[name], bnd[f"{name}_axes"]) for name in ("q", "k", "v")}
        except NoMatch:
            continue
        q_src = src["q"][0]
        if to_source(c_inter.a)[0] is q_src:
            q_op, s_node, q_labels, s_labels = c_inter.a, c_inter.b, c_inter.a_labels, c_inter.b_labels
        elif to_source(c_inter.b)[0] is q_src:
            q_op, s_node, q_labels, s_labels = c_inter.b, c_inter.a, c_inter.b_labels, c_inter.a_labels
        else:
            continue
        if not _reads(s_node, {src["k"][0], src["v"][0]}):
            continue
        # Attention-like from here on: a failed proof leaves the whole chain alone, with the reason.
        parts = [*qs.nodes, *intra_steps, c_inter.node, *inter_steps, add]
        try:
            return _prove(add, qs, src, intra_steps, intra_scale, c_inter, inter_steps, inter_scale,
                          q_op, s_node, q_labels, s_labels, parts)
        except NoMatch as exc:
            return _rejected(add, qs, parts, str(exc))
    raise NoMatch("not the chunked form")


def _rejected(add: Node, qs: LinearSite, parts: list[Node], reason: str) -> LinearSite:
    site = LinearSite(spelling="chunked: inter-chunk state product + intra-chunk " + qs.spelling,
                      location=location_of(add), form="chunked", fq=None, fk=None, v=None, out_node=add,
                      rejected=f"chunked linear attention: {reason}")
    site.n, site.m, site.e, site.f = qs.n, qs.m, qs.e, qs.f
    site.nodes = list(dict.fromkeys(parts))
    return site


def _prove(add, qs, src, intra_steps, intra_scale, c_inter, inter_steps, inter_scale, q_op, s_node, q_labels,
           s_labels, parts) -> LinearSite:
    bnd = qs.bindings
    (q_src, q_ax), (k_src, k_ax), (v_src, v_ax) = src["q"], src["k"], src["v"]
    C = qs.n
    # 1. Inside a chunk: the quadratic form, unnormalised, with the mask's value exactly l' <= l.
    if qs.rejected:
        raise NoMatch(f"inside a chunk, {qs.rejected}")
    if qs.normalize:
        raise NoMatch("the scores inside a chunk are normalised on their own")
    if qs.n != qs.m:
        raise NoMatch("queries and keys of a chunk differ in length")
    from rewrite.ir.mask import check_causal

    if qs.mask_pred is None or qs.mask_const is None:
        raise NoMatch("the scores inside a chunk are not masked: each position would see later ones of its chunk")
    if tuple(qs.mask_const.shape) != (C, C) or not check_causal(qs.mask_const, 0):
        raise NoMatch("the mask inside a chunk is not l' <= l (its value differs from the lower triangle)")
    sizes = AtomSizes(dict(qs.atom_sizes))
    batch = list(qs.batch_atoms)
    # 2. The inter-chunk product: φQ_c · S_c, contracting the query features.
    qtab = labels_to_atoms(q_labels, operand_axes(q_op, q_src, q_ax, sizes), "the queries")
    contracted = [lab for lab in c_inter.contracted if lab]
    if c_inter.added is not None or len(contracted) != 1 or qtab.get(contracted[0]) != "e":
        raise NoMatch("the product with the state does not contract the query features")
    s_shape = shape_of(s_node)
    if any(s != 1 and lab in q_labels and qtab.get(lab) == "p" for lab, s in zip(s_labels, s_shape)):
        raise NoMatch("the state varies with the query position")
    free = [lab for lab, s in zip(s_labels, s_shape) if s != 1 and lab and lab not in q_labels]
    if len(free) != 1 or free[0] not in c_inter.out_labels:
        raise NoMatch("the state is not [.., chunk, key feature, value feature]")
    stab = {**qtab, free[0]: "f"}
    s_axes = axes_from_labels(s_labels, s_shape, stab)
    if sorted(a for ax in s_axes for a in ax) != sorted([*batch, "e", "f"]):
        raise NoMatch("the state is not one [key feature, value feature] matrix per chunk and batch")
    inter_axes = axes_from_labels(c_inter.out_labels, shape_of(c_inter.node), stab)
    # 3. The state: an exclusive prefix over one batch axis (the chunk axis) of φKᵀ V per chunk.
    p_node, p_axes = source_axes(s_node, s_axes)  # the state may be transposed after the prefix
    parts.extend(to_source(s_node)[1])
    p_shape = shape_of(p_node)
    x, d, prefix_nodes, how = exclusive_prefix(p_node)
    parts.extend(prefix_nodes)
    # One chunk only (a size-1 axis, no atom): the exclusive prefix is zero and the intra part is all there is.
    chunk = p_axes[d][0] if len(p_axes[d]) == 1 else None
    if (chunk not in batch and not (chunk is None and p_shape[d] == 1)) or shape_of(x) != p_shape:
        raise NoMatch("the prefix does not run over a chunk axis of the products")
    c_kv, kv_steps, kv_scale = back_to_contraction(x)
    if c_kv is None or c_kv.added is not None:
        raise NoMatch("the state is not a product of keys and values")
    parts.extend([c_kv.node, *kv_steps])
    if to_source(c_kv.a)[0] is k_src and to_source(c_kv.b)[0] is v_src:
        ko, kl, vo, vl = c_kv.a, c_kv.a_labels, c_kv.b, c_kv.b_labels
    elif to_source(c_kv.b)[0] is k_src and to_source(c_kv.a)[0] is v_src:
        ko, kl, vo, vl = c_kv.b, c_kv.b_labels, c_kv.a, c_kv.a_labels
    else:
        raise NoMatch("the state is not a product of the very keys and values the chunks use")
    ktab = labels_to_atoms(kl, operand_axes(ko, k_src, k_ax, sizes), "the keys")
    vtab = labels_to_atoms(vl, operand_axes(vo, v_src, v_ax, sizes), "the values")
    if any(vtab[lab] != atom for lab, atom in ktab.items() if lab in vtab):
        raise NoMatch("keys and values are paired along different axes in the state product")
    kvtab = {**ktab, **vtab}
    if [kvtab.get(lab) for lab in c_kv.contracted] != ["m"]:
        raise NoMatch("the state product does not sum over the positions of a chunk")
    if len(set(kvtab.values())) != len(kvtab):
        raise NoMatch("the state product pairs keys and values of different chunks or heads")
    kv_axes = forward_axes(axes_from_labels(c_kv.out_labels, shape_of(c_kv.node), kvtab), kv_steps, sizes)
    if kv_axes != p_axes:
        raise NoMatch("the state's axes are not the ones the queries read")
    # 4. The two halves agree: scales, axes, shapes.
    inter_scale *= c_inter.alpha * c_kv.alpha * kv_scale
    intra_scale *= qs.scale
    if not math.isclose(inter_scale, intra_scale, rel_tol=1e-9):
        raise NoMatch(f"the earlier chunks are scaled by {inter_scale:g} and the own chunk by {intra_scale:g}")
    inter_axes = forward_axes(inter_axes, inter_steps, sizes)
    intra_axes = forward_axes(bnd["out_axes"], intra_steps, sizes)
    if inter_axes != intra_axes or shape_of(add.args[0]) != shape_of(add) or shape_of(add.args[1]) != shape_of(add):
        raise NoMatch("the inter- and intra-chunk parts do not line up position by position")
    # 5. p = c·C + l: where a chunk view is made from one sequence axis, the chunk index is its outer part.
    split = [_split(n, ax, chunk, inner, sizes) if chunk else "given"
             for n, ax, inner in ((q_src, q_ax, "p"), (k_src, k_ax, "m"), (v_src, v_ax, "m"))]
    if "inner" in split:
        raise NoMatch("the chunk index is the inner part of the sequence split (chunks are strided, not contiguous)")
    if "unknown" in split:
        raise NoMatch("cannot prove how the chunk views split the sequence")
    # 6. Optionally normalised: ÷ (φQ_c z_c + Σ_l' W + eps), through layout ops after the sum.
    out, out_axes = add, intra_axes
    normalize, eps, den_how = False, 0.0, ""
    num_axes, cur, walked = intra_axes, add, []
    while len(cur.users) == 1:
        u = next(iter(cur.users))
        if is_layout_op(u):
            try:
                num_axes = propagate(u, num_axes, sizes)
            except NoMatch:
                break
            walked.append(u)
            cur = u
            continue
        if is_call(u, aten.div.Tensor) and u.args[0] is cur and isinstance(u.args[1], Node):
            den = chunked_denominator(u.args[1], qs, src, chunk, sizes, batch)
            if den is not None and all(broadcasts_as(ax, num_axes) for ax in den[0]):
                normalize, eps, den_how = True, den[1], " ÷ (φQ·z + Σ_l' W + eps)"
                parts.extend([*walked, *den[2], u])
                out, out_axes = u, num_axes
        break
    # 7. The output: chunk index just outside the in-chunk position, so the two flatten to p = c·C + l.
    flat = [a for ax in out_axes for a in ax]
    if chunk and (chunk not in flat or flat.index(chunk) + 1 >= len(flat) or flat[flat.index(chunk) + 1] != "p"):
        raise NoMatch("the output does not keep the chunk index just outside the in-chunk position")
    rest = [a for a in batch if a != chunk]
    rows = [chunk] if chunk else []
    n_chunks = sizes.sizes[chunk] if chunk else 1
    n = n_chunks * C
    site = LinearSite(spelling=f"chunked (C = {C}): {c_kv.spelling} → {how} → {c_inter.spelling} + intra "
                      f"{qs.spelling}{den_how}", location=location_of(add), form="chunked", fq=None, fk=None, v=None,
                      out_node=out, batch_atoms=rest, scale=intra_scale, normalize=normalize, eps=eps)
    site.fq = plan_operand(q_src, q_ax, (rest, [*rows, "p"], ["e"]), sizes, "the queries")
    site.fk = plan_operand(k_src, k_ax, (rest, [*rows, "m"], ["e"]), sizes, "the keys")
    site.v = plan_operand(v_src, v_ax, (rest, [*rows, "m"], ["f"]), sizes, "the values")
    site.atom_sizes = {**{a: sizes.sizes[a] for a in rest}, "p": n, "m": n, "e": sizes.sizes["e"],
                       "f": sizes.sizes["f"]}
    site.n = site.m = n
    site.e, site.f = sizes.sizes["e"], sizes.sizes["f"]
    site.mask_pred = qs.mask_pred  # l' <= l inside a chunk and every earlier chunk: m <= p over p = c·C + l
    site.mask_const = torch.ones(n, n, dtype=torch.bool).tril()
    seq = "chunk index outer" if "outer" in split else "none visible (the chunk views are the operands)"
    site.notes.append(f"chunked: {n_chunks} chunk{'s' if n_chunks > 1 else ''} of {C}; state = {how}; "
                      f"mask inside a chunk proven l' <= l; sequence split: {seq}")
    site.notes.append("original: O(N·C·D) intra-chunk scores and O(N/C·D²) chunk states; rewritten: one causal "
                      "linear-attention pass, O(N·D²) time, O(N·D) memory")
    nodes = list(dict.fromkeys(nd for nd in parts if nd is not out))
    site = finish_linear_site(site, out, out_axes, [*nodes, out], q_src, k_src, True, "causal, chunked")
    if chunk:
        atoms = list(site.out_atoms)
        i = atoms.index(chunk)
        site.out_atoms = [*atoms[:i], "p", *atoms[i + 2:]]
    return site


def _split(node: Node, axes: Axes, chunk: str, inner: str, sizes: AtomSizes) -> str:
    """How the chunk view ``node`` was made: "outer" (the chunk index is the outer part of a split sequence
    axis), "inner" (the inner part), "given" (no layout op splits a sequence axis), or "unknown"."""
    chain: list[Node] = []
    cur = node
    while isinstance(cur, Node) and is_layout_op(cur) and len(chain) < 16:
        chain.append(cur)
        cur = cur.args[0]
    dc, di = axes.index((chunk,)) if (chunk,) in axes else None, axes.index((inner,)) if (inner,) in axes else None
    if not chain or dc is None or di is None:
        return "given"
    n = sizes.sizes[chunk] * sizes.sizes[inner]
    seen_n = False
    # The nearest ancestor whose sequence axis splits into the chunk view's two dims decides (farther up, a
    # head split such as [B, N, H·D] → [B, N, H, D] would not follow from fresh atoms).
    for j in range(1, len(chain) + 1):
        root_shape = shape_of(chain[j - 1].args[0])
        if root_shape is None:
            break
        found = []
        for i, s in enumerate(root_shape):
            if s != n:
                continue
            seen_n = True
            for split, order in (("outer", ("c@", "l@")), ("inner", ("l@", "c@"))):
                trial = AtomSizes({"c@": sizes.sizes[chunk], "l@": sizes.sizes[inner]})
                root_axes = []
                for r, sr in enumerate(root_shape):
                    if r == i:
                        root_axes.append(order)
                    elif sr == 1:
                        root_axes.append(())
                    else:
                        trial.sizes[f"r{r}@"] = sr
                        root_axes.append((f"r{r}@",))
                try:
                    out = forward_axes(tuple(root_axes), list(reversed(chain[:j])), trial)
                except NoMatch:
                    continue
                if out[dc] == ("c@",) and out[di] == ("l@",):
                    found.append(split)
        if found:
            return "outer" if "outer" in found else "inner"
    return "unknown" if seen_n else "given"
