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

The site's spelling names "chunked"; its ``form`` is "cumsum" (a prefix-state form: passes/linear_apply.py
keys its complexity line on the form and has no entry for "chunked"), and its notes give the chunk count,
the prefix spelling and the sequence split that was proven.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Graph, Node

from .axes import AtomSizes, Axes, NoMatch, is_layout_op, propagate, shape_of
from .contraction import Contraction, as_contraction
from .linear_attention import (
    LinearSite,
    NotOurs,
    _broadcasts_as,
    _den_axes,
    _plan,
    _row_sum,
    finish_linear_site,
    match_quadratic,
)
from .softmax_attention import location_of, scalar_value

aten = torch.ops.aten

ZERO_OPS = {aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default}
FULL_OPS = {aten.full.default: 1, aten.full_like.default: 1, aten.new_full.default: 2}
PAD_OPS = {aten.pad.default, aten.constant_pad_nd.default}


# ---- small readers -----------------------------------------------------------------------------------
def _call(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _cumsum_of(node) -> tuple[Node, int] | None:
    """``cumsum(x, d)`` (no dtype change): (x, d)."""
    if not _call(node, aten.cumsum.default) or node.kwargs.get("dtype") is not None or len(node.args) > 2:
        return None
    x, d = node.args[:2]
    shape = shape_of(x)
    return (x, _dim(d, len(shape))) if shape is not None else None


def _is_zero(node) -> bool:
    """A tensor that is zero everywhere whatever the inputs (zeros_like, new_zeros, full(…, 0), a constant)."""
    for _ in range(8):
        if isinstance(node, Node) and is_layout_op(node):
            node = node.args[0]
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    if node.target in ZERO_OPS:
        return True
    if node.target in FULL_OPS:
        i = FULL_OPS[node.target]
        return len(node.args) > i and scalar_value(node.args[i]) == 0.0
    from rewrite.patterns.constants import constant_value

    val = constant_value(node)
    return val is not None and not bool(val.any())


def _slice_range(node) -> tuple[Node, int, int, int] | None:
    """``x[.., a:b, ..]`` with step 1: (x, dim, a, b), a and b normalised to 0 ≤ a ≤ b ≤ size."""
    if not _call(node, aten.slice.Tensor):
        return None
    x = node.args[0]
    shape = shape_of(x)
    if shape is None:
        return None
    d = _dim(node.args[1] if len(node.args) > 1 else 0, len(shape))
    size = shape[d]
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    if step != 1:
        return None

    def norm(i, default):
        if i is None:
            return default
        i = i + size if i < 0 else i
        return min(max(i, 0), size)

    return x, d, norm(start, 0), norm(end, size)


def _pad_at(node) -> tuple[Node, int, int, int] | None:
    """A zero pad along one dim: (x, dim, before, after); None for any other pad."""
    if not _call(node, *PAD_OPS):
        return None
    x, pad = node.args[:2]
    if node.target == aten.pad.default:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value")
        if mode != "constant" or (value is not None and value != 0):
            return None
    else:
        value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value", 0)
        if value != 0:
            return None
    shape = shape_of(x)
    if shape is None or len(pad) % 2 or any(not isinstance(p, int) for p in pad):
        return None
    padded = [(len(shape) - 1 - i // 2, pad[i], pad[i + 1]) for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]]
    if len(padded) != 1:
        return None
    return x, *padded[0]


def _shift_of(node) -> tuple[Node, int, list[Node]] | None:
    """``node`` = y shifted by one step along d, zeros first (y[0 : L-1] after one zero slab):
    (y, d, the nodes that do it). Spelled cat([zeros, y[:-1]]), cat([zeros, y])[:L], pad(y)[:L],
    pad(y[:-1]) or pad(y, (1, -1))."""
    shape = shape_of(node)
    if shape is None:
        return None
    if _call(node, aten.cat.default):
        parts = node.args[0]
        d = _dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
        if len(parts) == 2 and _is_zero(parts[0]) and shape_of(parts[0])[d] == 1:
            sl = _slice_range(parts[1])
            if sl is not None and sl[1] == d and sl[2] == 0 and sl[3] == shape_of(sl[0])[d] - 1:
                return sl[0], d, [node, parts[1]]
        return None
    sl = _slice_range(node)
    if sl is not None:  # cat([zeros, y])[:L] or pad(y, before=1)[:L]
        inner, d, start, end = sl
        if start != 0 or end != shape[d] or end != shape_of(inner)[d] - 1:
            return None
        if _call(inner, aten.cat.default):
            parts = inner.args[0]
            cd = _dim(inner.args[1] if len(inner.args) > 1 else inner.kwargs.get("dim", 0), len(shape))
            if cd == d and len(parts) == 2 and _is_zero(parts[0]) and shape_of(parts[0])[d] == 1:
                return parts[1], d, [node, inner]
            return None
        pd = _pad_at(inner)
        if pd is not None and pd[1:] == (d, 1, 0):
            return pd[0], d, [node, inner]
        return None
    pd = _pad_at(node)
    if pd is not None:
        x, d, before, after = pd
        if (before, after) == (1, -1):
            return x, d, [node]
        sl = _slice_range(x)
        if (before, after) == (1, 0) and sl is not None and sl[1] == d and sl[2] == 0 and \
                sl[3] == shape_of(sl[0])[d] - 1:
            return sl[0], d, [node, x]
    return None


def _shift_name(nodes: list[Node]) -> str:
    if any(_call(n, aten.cat.default) for n in nodes):
        return "cat with zeros"
    return "pad + slice" if any(_call(n, aten.slice.Tensor) for n in nodes) else "pad"


def exclusive_prefix(node) -> tuple[Node, int, list[Node], str]:
    """``node`` = Σ_{c' < c} x[c'] along a dim d: (x, d, the nodes that compute it, how it is spelled),
    or NoMatch with what it is instead (an inclusive prefix counts the chunk's own keys twice)."""
    if _call(node, aten.sub.Tensor) and len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1:
        cs = _cumsum_of(node.args[0])
        if cs is not None and cs[0] is node.args[1]:
            return cs[0], cs[1], [node, node.args[0]], "cumsum − per-chunk state"
        raise NoMatch("the state the queries read is a difference, but not cumsum(x) − x")
    sh = _shift_of(node)
    if sh is not None:
        cs = _cumsum_of(sh[0])
        if cs is not None and cs[1] == sh[1]:
            how = _shift_name(sh[2])
            return cs[0], cs[1], [*sh[2], sh[0]], f"cumsum shifted by one chunk ({how})"
        raise NoMatch("the state the queries read is shifted by one chunk, but is not a cumsum along that axis")
    cs = _cumsum_of(node)
    if cs is not None:
        sh = _shift_of(cs[0])
        if sh is not None and sh[1] == cs[1]:
            how = _shift_name(sh[2])
            return sh[0], cs[1], [node, *sh[2]], f"cumsum of the states shifted by one chunk ({how})"
        raise NoMatch("the prefix over chunks is inclusive: each chunk's own keys are counted twice, once in "
                      "the state and once inside the chunk (an exclusive prefix is cat/pad-shifted or cumsum − x)")
    raise NoMatch("the state the queries read is not an exclusive prefix (cumsum) over the chunk axis")


def _back_to_contraction(node) -> tuple[Contraction | None, list[Node], float]:
    """Walk back through layout ops and scalar scales: (the contraction, the steps in forward order, scale)."""
    steps: list[Node] = []
    scale = 1.0
    cur = node
    for _ in range(16):
        if not isinstance(cur, Node) or cur.op != "call_function":
            return None, [], 1.0
        c = as_contraction(cur)
        if c is not None:
            return c, list(reversed(steps)), scale
        if is_layout_op(cur):
            steps.append(cur)
            cur = cur.args[0]
            continue
        s = _scalar_step(cur)
        if s is None:
            return None, [], 1.0
        steps.append(cur)
        scale *= s[1]
        cur = s[0]
    return None, [], 1.0


def _scalar_step(node) -> tuple[Node, float] | None:
    """``x · c`` or ``x ÷ c`` by a number: (x, the factor)."""
    if not _call(node, aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar):
        return None
    a, b = node.args[:2]
    if node.target in (aten.mul.Tensor, aten.mul.Scalar):
        if scalar_value(b) is not None and isinstance(a, Node):
            return a, scalar_value(b)
        if scalar_value(a) is not None and isinstance(b, Node):
            return b, scalar_value(a)
        return None
    v = scalar_value(b)
    return (a, 1.0 / v) if v not in (None, 0.0) and isinstance(a, Node) else None


def _forward(axes: Axes, steps: list[Node], sizes: AtomSizes) -> Axes:
    for s in steps:
        if is_layout_op(s):
            axes = propagate(s, axes, sizes)
    return axes


# Ops that only move or name dims (every dim keeps its own atom): the operands of the four products may
# each reach the same chunk view through their own transposes.
PERMUTE_OPS = {aten.transpose.int, aten.t.default, aten.permute.default, aten.numpy_T.default, aten.alias.default,
               aten.clone.default, aten.contiguous.default, aten.unsqueeze.default, aten.squeeze.dim,
               aten.squeeze.dims, aten.squeeze.default}


def _to_source(node) -> tuple[Node, list[Node]]:
    """The node ``node`` reads through permutation-like ops, and those ops in forward order."""
    chain: list[Node] = []
    while _call(node, *PERMUTE_OPS) and len(chain) < 16:
        chain.append(node)
        node = node.args[0]
    return node, list(reversed(chain))


def _source_axes(node: Node, axes: Axes) -> tuple[Node, Axes]:
    """(the source of ``node``, the source's axes) given ``node``'s axes."""
    src, chain = _to_source(node)
    shape = shape_of(src)
    if shape is None:
        raise NoMatch("shapes unknown")
    trial = AtomSizes({f"d{i}@": s for i, s in enumerate(shape) if s != 1})
    fresh = tuple(() if s == 1 else (f"d{i}@",) for i, s in enumerate(shape))
    out = _forward(fresh, chain, trial)
    where = {o[0]: ax for o, ax in zip(out, axes) if o}
    return src, tuple(where.get(f"d{i}@", ()) for i in range(len(shape)))


def _operand_axes(node, src: Node, src_axes: Axes, sizes: AtomSizes) -> Axes | None:
    """``node``'s axes when it reads ``src`` through permutation-like ops, else None."""
    s, chain = _to_source(node)
    return _forward(src_axes, chain, sizes) if s is src else None


def _reads(node, targets: set[Node], cumsum: bool = False, depth: int = 0) -> bool:
    """A product of ``targets`` feeds ``node`` through a cumsum, a few steps up (an attention-like state)."""
    if not isinstance(node, Node) or node.op != "call_function" or depth > 8:
        return False
    c = as_contraction(node)
    if c is not None and cumsum and (_to_source(c.a)[0] in targets or _to_source(c.b)[0] in targets):
        return True
    cumsum = cumsum or node.target == aten.cumsum.default
    return any(_reads(a, targets, cumsum, depth + 1) for a in node.all_input_nodes)


# ---- the recogniser ----------------------------------------------------------------------------------
def functional_masked_fill(graph: Graph) -> None:
    """``scores.masked_fill_(mask, 0)`` (flash-linear-attention's reference writes it in place) on a product
    nothing else reads is ``masked_fill``: make it so, so the recognisers read it as a mask and the node dies
    with the rest of a rewritten site (an in-place op is never dead code)."""
    for node in graph.nodes:
        if _call(node, aten.masked_fill_.Scalar) and scalar_value(node.args[2]) == 0.0 and not node.kwargs:
            x = node.args[0]
            if isinstance(x, Node) and as_contraction(x) is not None and len(x.users) == 1:
                node.target = aten.masked_fill.Scalar


def find_chunked_sites(graph: Graph) -> list[LinearSite]:
    """Every chunked causal linear-attention site (matched, or attention-like and left alone with a reason)."""
    sites: list[LinearSite] = []
    claimed: set[Node] = set()
    for node in list(graph.nodes):
        if node in claimed or not _call(node, aten.add.Tensor):
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
        c_intra, intra_steps, intra_scale = _back_to_contraction(y)
        c_inter, inter_steps, inter_scale = _back_to_contraction(x)
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
            src = {name: _source_axes(bnd[name], bnd[f"{name}_axes"]) for name in ("q", "k", "v")}
        except NoMatch:
            continue
        q_src = src["q"][0]
        if _to_source(c_inter.a)[0] is q_src:
            q_op, s_node, q_labels, s_labels = c_inter.a, c_inter.b, c_inter.a_labels, c_inter.b_labels
        elif _to_source(c_inter.b)[0] is q_src:
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


def _labels_to_atoms(labels, axes: Axes, what: str) -> dict[str, str]:
    table: dict[str, str] = {}
    for lab, ax in zip(labels, axes):
        if not ax:
            continue
        if len(ax) != 1 or not lab:
            raise NoMatch(f"{what} merge logical axes within one dim")
        if table.setdefault(lab, ax[0]) != ax[0]:
            raise NoMatch(f"{what}: one label names two axes")
    return table


def _axes_of(labels, shape, table: dict[str, str]) -> Axes:
    return tuple((table[lab],) if s != 1 and lab in table else () for lab, s in zip(labels, shape))


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
    qtab = _labels_to_atoms(q_labels, _operand_axes(q_op, q_src, q_ax, sizes), "the queries")
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
    s_axes = _axes_of(s_labels, s_shape, stab)
    if sorted(a for ax in s_axes for a in ax) != sorted([*batch, "e", "f"]):
        raise NoMatch("the state is not one [key feature, value feature] matrix per chunk and batch")
    inter_axes = _axes_of(c_inter.out_labels, shape_of(c_inter.node), stab)
    # 3. The state: an exclusive prefix over one batch axis (the chunk axis) of φKᵀ V per chunk.
    p_node, p_axes = _source_axes(s_node, s_axes)  # the state may be transposed after the prefix
    parts.extend(_to_source(s_node)[1])
    p_shape = shape_of(p_node)
    x, d, prefix_nodes, how = exclusive_prefix(p_node)
    parts.extend(prefix_nodes)
    # One chunk only (a size-1 axis, no atom): the exclusive prefix is zero and the intra part is all there is.
    chunk = p_axes[d][0] if len(p_axes[d]) == 1 else None
    if (chunk not in batch and not (chunk is None and p_shape[d] == 1)) or shape_of(x) != p_shape:
        raise NoMatch("the prefix does not run over a chunk axis of the products")
    c_kv, kv_steps, kv_scale = _back_to_contraction(x)
    if c_kv is None or c_kv.added is not None:
        raise NoMatch("the state is not a product of keys and values")
    parts.extend([c_kv.node, *kv_steps])
    if _to_source(c_kv.a)[0] is k_src and _to_source(c_kv.b)[0] is v_src:
        ko, kl, vo, vl = c_kv.a, c_kv.a_labels, c_kv.b, c_kv.b_labels
    elif _to_source(c_kv.b)[0] is k_src and _to_source(c_kv.a)[0] is v_src:
        ko, kl, vo, vl = c_kv.b, c_kv.b_labels, c_kv.a, c_kv.a_labels
    else:
        raise NoMatch("the state is not a product of the very keys and values the chunks use")
    ktab = _labels_to_atoms(kl, _operand_axes(ko, k_src, k_ax, sizes), "the keys")
    vtab = _labels_to_atoms(vl, _operand_axes(vo, v_src, v_ax, sizes), "the values")
    if any(vtab[lab] != atom for lab, atom in ktab.items() if lab in vtab):
        raise NoMatch("keys and values are paired along different axes in the state product")
    kvtab = {**ktab, **vtab}
    if [kvtab.get(lab) for lab in c_kv.contracted] != ["m"]:
        raise NoMatch("the state product does not sum over the positions of a chunk")
    if len(set(kvtab.values())) != len(kvtab):
        raise NoMatch("the state product pairs keys and values of different chunks or heads")
    kv_axes = _forward(_axes_of(c_kv.out_labels, shape_of(c_kv.node), kvtab), kv_steps, sizes)
    if kv_axes != p_axes:
        raise NoMatch("the state's axes are not the ones the queries read")
    # 4. The two halves agree: scales, axes, shapes.
    inter_scale *= c_inter.alpha * c_kv.alpha * kv_scale
    intra_scale *= qs.scale
    if not math.isclose(inter_scale, intra_scale, rel_tol=1e-9):
        raise NoMatch(f"the earlier chunks are scaled by {inter_scale:g} and the own chunk by {intra_scale:g}")
    inter_axes = _forward(inter_axes, inter_steps, sizes)
    intra_axes = _forward(bnd["out_axes"], intra_steps, sizes)
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
        if _call(u, aten.div.Tensor) and u.args[0] is cur and isinstance(u.args[1], Node):
            den = _denominator(u.args[1], qs, src, chunk, sizes, batch)
            if den is not None and all(_broadcasts_as(ax, num_axes) for ax in den[0]):
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
    site.fq = _plan(q_src, q_ax, (rest, [*rows, "p"], ["e"]), sizes, "the queries")
    site.fk = _plan(k_src, k_ax, (rest, [*rows, "m"], ["e"]), sizes, "the keys")
    site.v = _plan(v_src, v_ax, (rest, [*rows, "m"], ["f"]), sizes, "the values")
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
                    out = _forward(tuple(root_axes), list(reversed(chain[:j])), trial)
                except NoMatch:
                    continue
                if out[dc] == ("c@",) and out[di] == ("l@",):
                    found.append(split)
        if found:
            return "outer" if "outer" in found else "inner"
    return "unknown" if seen_n else "given"


def _denominator(node: Node, qs: LinearSite, src: dict, chunk: str, sizes: AtomSizes,
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
        if _call(t, aten.add.Tensor) and t.kwargs.get("alpha", 1) == 1 and len(nodes) < 8:
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
        rs = _row_sum(t)
        if rs is not None:
            w, dim, _ = rs
            axes_of = bnd["axes_of"]
            if w not in axes_of or not _same_weights_chain(w, bnd["weights"]):
                return None
            ax = _den_axes(w, dim, axes_of[w])
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


def _same_weights_chain(w: Node, weights: Node) -> bool:
    """w is the weights node, or a node of the layout chain that leads to it."""
    cur = weights
    for _ in range(8):
        if cur is w:
            return True
        if not (isinstance(cur, Node) and is_layout_op(cur)):
            return False
        cur = cur.args[0]
    return False


def _inter_den(t: Node, src: dict, chunk: str, sizes: AtomSizes,
               batch: list[str]) -> tuple[Axes, list[Node]] | None:
    """t = φQ_c · z_c through layout ops: (t's axes, the nodes)."""
    (q_src, q_ax), (k_src, k_ax) = src["q"], src["k"]
    c, steps, scale = _back_to_contraction(t)
    if c is None or scale != 1.0 or c.added is not None or c.alpha != 1.0:
        return None
    if _to_source(c.a)[0] is q_src:
        q_op, z_node, q_labels, z_labels = c.a, c.b, c.a_labels, c.b_labels
    elif _to_source(c.b)[0] is q_src:
        q_op, z_node, q_labels, z_labels = c.b, c.a, c.b_labels, c.a_labels
    else:
        return None
    try:
        tab = _labels_to_atoms(q_labels, _operand_axes(q_op, q_src, q_ax, sizes), "the queries")
        if [tab.get(lab) for lab in c.contracted] != ["e"]:
            return None
        z_shape = shape_of(z_node)
        if any(s != 1 and (lab not in tab or tab[lab] == "p") for lab, s in zip(z_labels, z_shape)):
            return None
        z_axes = _axes_of(z_labels, z_shape, tab)
        if sorted(a for ax in z_axes for a in ax) != sorted([*batch, "e"]):
            return None
        x, d, prefix_nodes, _ = exclusive_prefix(z_node)
        if z_axes[d] != ((chunk,) if chunk else ()) or shape_of(x) != z_shape:
            return None
        # x = Σ over the positions of a chunk of the keys, keeping (or dropping) that dim.
        if not _call(x, aten.sum.dim_IntList) or len(x.args[1]) != 1 or x.kwargs.get("dtype") is not None:
            return None
        xa = _operand_axes(x.args[0], k_src, k_ax, sizes)
        if xa is None:
            return None
        sd = _dim(x.args[1][0], len(xa))
        keep = x.args[2] if len(x.args) > 2 else x.kwargs.get("keepdim", False)
        if xa[sd] != ("m",):
            return None
        x_axes = tuple(() if i == sd else ax for i, ax in enumerate(xa) if keep or i != sd)
        if x_axes != z_axes:
            return None
        out_axes = _forward(_axes_of(c.out_labels, shape_of(c.node), tab), steps, sizes)
    except NoMatch:
        return None
    return out_axes, [t, c.node, *steps, *prefix_nodes, x]
