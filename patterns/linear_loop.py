"""Causal linear attention written as a Python *loop over chunks* (Lightning Attention's / RetNet's reference
without decay). torch.compile unrolls the loop, so the ATen graph holds one copy of the body per chunk:

    for i, [a_i, b_i) in enumerate(chunks):             the chunks tile [0, N) in order
        Q_i, K_i, V_i = φQ[a_i:b_i], φK[a_i:b_i], V[a_i:b_i]  slices of the same three tensors, same axis
        O_i = Q_i S_i + (Q_i K_iᵀ ⊙ [l' ≤ l]) V_i          S_i = Σ_{j < i} K_jᵀ V_j   (S_0 = 0 or absent)
        S_{i+1} = S_i + K_iᵀ V_i                          (or S += …)
    out = cat(O_0, …, O_{T-1})                          (or o[a_i:b_i] = O_i into a buffer)

so out[p] = Σ_{m ≤ p} (φq_p·φk_m) v_m: causal linear attention over the whole sequences, rewritten to one
rewrite::linear_attention (causal) call on φQ, φK, V.

Proven, not guessed: each piece's intra part is the quadratic form (linear_attention.py) over the slices
[a_i, b_i) of the same φQ, φK, V nodes along their sequence axes, with its mask's value exactly l' ≤ l
(rewrite.ir.mask.check_causal); the output ranges are the query ranges and tile [0, N) contiguously along the
output's query-position axis; the state multiplying piece i's queries is a chain of adds whose leaves are zeros
and products K_jᵀ V_j of the very slices of chunks j, exactly {0, …, i-1}, each once; the inter product
contracts the query features; scales agree between the two parts and across chunks. A chain with this shape
that fails a proof becomes a site left alone with the reason (its per-chunk quadratic parts are then not
rewritten on their own either).

The graph is functional (rewrite/capture.py): ``S += …`` is an SSA chain of adds, and slice assignment into a
buffer is a chain of slice_scatter, read by linear_writes.py as the pieces the buffer shows (in position
order, with the overlap or gap that keeps it from being their cat). Both assemblies, cat and slice writes,
reach the proof as one `_Assembly`.

Out of scope (not matched): per-chunk normalisation, decay (γ·S: the state is then not a plain sum of chunk
products, so the site is left alone), φ or scales applied to the slices inside the loop.

The site's ``form`` is "chunked" (passes/linear_apply.py's complexity line for a chunked causal form); its
spelling names the loop and its notes give the chunk count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from .axes import AtomSizes, Axes, NoMatch, shape_of
from .linear_attention import match_quadratic
from .linear_readers import (
    axes_from_labels,
    back_to_contraction,
    forward_axes,
    is_call,
    is_zero,
    labels_to_atoms,
    norm_dim,
    slice_range,
    source_axes,
    to_source,
)
from .linear_site import LinearSite, NotOurs, finish_linear_site, plan_operand
from .linear_writes import continues, slice_writes, tiling
from .softmax_attention import location_of

aten = torch.ops.aten


@dataclass
class _Piece:
    """One chunk's output: intra (the quadratic form over slices) [+ inter = Q_i · S_i]."""

    node: Node
    qs: LinearSite
    src: dict  # name → (slice node, its axes)
    rng: dict  # name → (base, dim, a, b)
    sizes: AtomSizes
    intra_scale: float
    out_axes: Axes
    nodes: list[Node]
    inter: tuple | None = None  # (contraction, steps, scale, q operand, state node, q labels, state labels)
    state: dict = field(default_factory=dict)  # filled by _state_terms


def _chunk_slice(node) -> tuple[Node, tuple[Node, int, int, int]] | None:
    """``node`` reads a slice of a tensor through permutation-like ops: (the slice, (base, dim, a, b))."""
    src, _ = to_source(node)
    rng = slice_range(src)
    return (src, rng) if rng is not None else None


def _intra(y: Node):
    """y = the quadratic form over slices (through layout ops and scalar scales): (qs, steps, scale, src, rng)."""
    c, steps, scale = back_to_contraction(y)
    if c is None:
        return None
    try:
        qs = match_quadratic(c)
    except (NoMatch, NotOurs):
        return None
    bnd = qs.bindings
    if not bnd or qs.out_node is not c.node:
        return None
    try:
        src = {name: source_axes(bnd[name], bnd[f"{name}_axes"]) for name in ("q", "k", "v")}
    except NoMatch:
        return None
    rng = {name: slice_range(s) for name, (s, _) in src.items()}
    # Chunks of the sequence (a cat of heads sliced along the features is several sites, not one loop).
    if any(r is None or src[name][1][r[1]] != (atom,) for (name, r), atom in zip(rng.items(), "pmm")):
        return None
    return qs, steps, scale, src, rng


def _piece(node: Node) -> _Piece | None:
    """``node`` = one chunk's output (intra, or inter + intra in either order), else None."""
    options = []
    if is_call(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1 and \
            all(isinstance(a, Node) for a in node.args[:2]):
        options = [(node.args[0], node.args[1]), (node.args[1], node.args[0])]
    found = []
    for x, y in [*options, (None, node)]:
        got = _intra(y)
        if got is None:
            continue
        qs, steps, scale, src, rng = got
        sizes = AtomSizes(dict(qs.atom_sizes))
        try:
            out_axes = forward_axes(qs.bindings["out_axes"], steps, sizes)
        except NoMatch:
            continue
        piece = _Piece(node, qs, src, rng, sizes, scale * qs.scale, out_axes, [*qs.nodes, *steps])
        if x is not None:
            c, isteps, iscale = back_to_contraction(x)
            if c is None:
                found.append((1, piece))
                continue
            for op, other, ol, sl in ((c.a, c.b, c.a_labels, c.b_labels), (c.b, c.a, c.b_labels, c.a_labels)):
                cs = _chunk_slice(op)
                if cs is not None and cs[1] == rng["q"]:
                    piece.inter = (c, isteps, iscale, op, other, ol, sl)
                    piece.nodes += [c.node, *isteps, node]
                    break
            found.append((2 if piece.inter else 1, piece))
        else:
            found.append((2, piece))
        if found[-1][0] == 2:
            break
    return max(found, key=lambda f: f[0])[1] if found else None


@dataclass
class _Assembly:
    """How the chunk outputs make the result: pieces in position order, each landing on one range along dim."""

    pieces: list[Node]
    ranges: list[tuple[int, int]]
    dim: int
    how: str  # "cat" | "slice assignment"
    nodes: list[Node]  # the assembly's own nodes
    problem: str | None = None  # why the result is not cat(pieces) (overlap, gap, cast), found by linear_writes


def _assembly(node: Node) -> _Assembly | None:
    """The assembled output ``node``: a cat of pieces, or the last of a chain of slice writes."""
    shape = shape_of(node)
    if shape is None:
        return None
    if is_call(node, aten.cat.default):
        parts = list(node.args[0])
        d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), len(shape))
        if len(parts) < 2 or any(shape_of(p) is None or len(shape_of(p)) != len(shape) for p in parts):
            return None
        ranges, start = [], 0
        for p in parts:
            ranges.append((start, start + shape_of(p)[d]))
            start += shape_of(p)[d]
        return _Assembly(parts, ranges, d, "cat", [])
    if continues(node):
        return None  # a later write of the same chain: the chain is read from its last node
    sw = slice_writes(node)
    if sw is None or len(sw.writes) < 2:
        return None
    t = tiling(sw)
    return _Assembly([w.value for w in t.pieces], [(w.start, w.end) for w in t.pieces], sw.dim, "slice assignment",
                     sw.nodes, t.problem)


def find_loop_sites(graph: Graph) -> list[LinearSite]:
    """Every loop-over-chunks causal linear-attention site (matched, or left alone with a reason)."""
    sites: list[LinearSite] = []
    claimed: set[Node] = set()
    for node in list(graph.nodes):
        if node in claimed:
            continue
        asm = _assembly(node)
        if asm is None:
            continue
        pieces = [_piece(p) if isinstance(p, Node) else None for p in asm.pieces]
        if sum(p is not None for p in pieces) < 2:
            continue
        nodes = list(dict.fromkeys([nd for p in pieces if p is not None for nd in p.nodes] + asm.nodes + [node]))
        if claimed.intersection(nodes):
            continue
        try:
            site = _prove(node, pieces, asm, nodes)
        except NoMatch as exc:
            site = LinearSite(spelling=f"loop over chunks ({asm.how}): inter-chunk state + intra-chunk quadratic",
                              location=location_of(node), form="chunked", fq=None, fk=None, v=None, out_node=node,
                              rejected=f"loop over chunks: {exc}")
            qs = next(p for p in pieces if p is not None).qs
            site.n, site.m, site.e, site.f = qs.n, qs.m, qs.e, qs.f
            site.nodes = nodes
        sites.append(site)
        claimed.update(site.nodes)
    return sites


def _prove(out: Node, pieces: list[_Piece | None], asm: _Assembly, nodes: list[Node]) -> LinearSite:
    from rewrite.ir.mask import check_causal

    how, d_out = asm.how, asm.dim
    if asm.problem:
        raise NoMatch(asm.problem)  # what the slice writes compute is not the cat of what they write
    if any(p is None for p in pieces):
        raise NoMatch(f"part {[p is None for p in pieces].index(True)} of the {how} is not a chunk's attention")
    first = pieces[0]
    bases = {name: first.rng[name][:2] for name in ("q", "k", "v")}
    axes = {name: first.src[name][1] for name in ("q", "k", "v")}
    # 1. Every piece: the quadratic causal form over slices of the same tensors along the sequence axes.
    for i, p in enumerate(pieces):
        qs = p.qs
        if any(p.rng[name][:2] != bases[name] or p.src[name][1] != axes[name] for name in bases):
            raise NoMatch(f"chunk {i} reads other tensors (or other axes) than chunk 0")
        if qs.rejected:
            raise NoMatch(f"inside chunk {i}, {qs.rejected}")
        if qs.normalize:
            raise NoMatch(f"the scores inside chunk {i} are normalised on their own (not plain linear attention)")
        if qs.mask_pred is None or qs.mask_const is None:
            raise NoMatch(f"the scores inside chunk {i} are not masked: each position would see later ones")
        if tuple(qs.mask_const.shape) != (qs.n, qs.m) or qs.n != qs.m or not check_causal(qs.mask_const, 0):
            raise NoMatch(f"the mask inside chunk {i} is not l' <= l (its value differs from the lower triangle)")
        if not math.isclose(p.intra_scale, first.intra_scale, rel_tol=1e-9):
            raise NoMatch(f"chunk {i} is scaled by {p.intra_scale:g}, chunk 0 by {first.intra_scale:g}")
        if p.out_axes != first.out_axes:
            raise NoMatch(f"chunk {i}'s output is laid out differently from chunk 0's")
    q_ax, k_ax, v_ax = axes["q"], axes["k"], axes["v"]
    dq, dk, dv = (bases[name][1] for name in ("q", "k", "v"))
    if q_ax[dq] != ("p",) or k_ax[dk] != ("m",) or v_ax[dv] != ("m",):
        raise NoMatch("the chunks are not slices along the sequence axes")
    if first.out_axes[d_out] != ("p",):
        raise NoMatch(f"the {how} does not run along the query-position axis")
    # 2. The chunks tile [0, N) in order, queries, keys and values alike, and land where the queries are.
    n = shape_of(bases["q"][0])[dq]
    if shape_of(bases["k"][0])[dk] != n or shape_of(bases["v"][0])[dv] != n:
        raise NoMatch("queries, keys and values differ in length")
    ranges: list[tuple[int, int]] = []
    for i, (p, o) in enumerate(zip(pieces, asm.ranges)):
        r = {name: p.rng[name][2:] for name in ("q", "k", "v")}
        if not r["q"] == r["k"] == r["v"]:
            raise NoMatch(f"chunk {i} pairs queries, keys and values of different positions")
        end = ranges[-1][1] if ranges else 0
        if r["q"][0] != end:
            raise NoMatch(f"the chunks {'overlap' if r['q'][0] < end else 'leave a gap'}: chunk {i} starts at "
                          f"position {r['q'][0]}, the chunks before it end at {end}")
        if r["q"] != tuple(o):
            raise NoMatch(f"chunk {i}'s queries [{r['q'][0]}, {r['q'][1]}) are written to positions [{o[0]}, {o[1]})")
        ranges.append(r["q"])
    if ranges[-1][1] != n or shape_of(out)[d_out] != n:
        raise NoMatch(f"the chunks end at {ranges[-1][1]}, the sequence at {n}")
    # 3./4./5. Each piece's state: exactly the earlier chunks' K_jᵀ V_j; inter contracts the query features.
    state_nodes: list[Node] = []
    kv_scales: set[float] = set()
    for i, p in enumerate(pieces):
        terms, chain = _state_terms(p, i, pieces, ranges)
        if sorted(terms) != list(range(i)):
            seen = sorted(terms)
            raise NoMatch(f"the state chunk {i}'s queries read sums the products of chunks {seen}, "
                          f"not exactly chunks 0..{i - 1} once each")
        state_nodes += chain
        kv_scales.update(s for s in terms.values())
        if p.inter is not None and terms and not math.isclose(p.state["inter_scale"] * terms[0], p.intra_scale,
                                                                rel_tol=1e-9):
            raise NoMatch(f"chunk {i}'s earlier chunks are scaled by {p.state['inter_scale'] * terms[0]:g} and its "
                          f"own by {p.intra_scale:g}")
    if any(not math.isclose(s, next(iter(kv_scales)), rel_tol=1e-9) for s in kv_scales):
        raise NoMatch(f"the chunk products of the state are scaled differently ({sorted(kv_scales)})")
    qs = first.qs
    C = ranges[0][1] - ranges[0][0]
    batch = list(qs.batch_atoms)
    sizes = AtomSizes({**first.sizes.sizes, "p": n, "m": n})
    site = LinearSite(spelling=f"loop over {len(pieces)} chunks (C = {C}, {how}): state += K_jᵀ V_j → "
                      f"φQ_i · state + intra {qs.spelling}", location=location_of(out), form="chunked",
                      fq=None, fk=None, v=None, out_node=out, batch_atoms=batch, scale=first.intra_scale)
    site.fq = plan_operand(bases["q"][0], q_ax, (batch, ["p"], ["e"]), sizes, "the queries")
    site.fk = plan_operand(bases["k"][0], k_ax, (batch, ["m"], ["e"]), sizes, "the keys")
    site.v = plan_operand(bases["v"][0], v_ax, (batch, ["m"], ["f"]), sizes, "the values")
    site.atom_sizes = {**{a: sizes.sizes[a] for a in batch}, "p": n, "m": n, "e": qs.e, "f": qs.f}
    site.n = site.m = n
    site.e, site.f = qs.e, qs.f
    site.mask_pred = qs.mask_pred  # l' <= l inside each chunk and every earlier chunk whole: m <= p
    site.mask_const = torch.ones(n, n, dtype=torch.bool).tril()
    last = ranges[-1][1] - ranges[-1][0]
    site.notes.append(f"loop over chunks: {len(pieces)} chunks of {C}" + (f" (the last {last})" if last != C else "")
                      + f", output by {how}; mask inside each chunk proven l' <= l; state of chunk i proven "
                      "Σ_{j<i} φK_jᵀ V_j")
    site.notes.append("original: T unrolled chunk bodies, O(N·C·D + N·D²); rewritten: one causal linear-attention "
                      "pass, O(N·D²) time, O(N·D) memory")
    body = [nd for nd in dict.fromkeys([*nodes, *state_nodes]) if nd is not out]
    return finish_linear_site(site, out, first.out_axes, [*body, out], bases["q"][0], bases["k"][0], True,
                              "causal, loop over chunks")


def _state_terms(p: _Piece, i: int, pieces: list[_Piece], ranges) -> tuple[dict[int, float], list]:
    """The chunks whose K_jᵀ V_j the state of piece ``p`` sums ({j: scale}) and the state's nodes; NoMatch
    when the state holds anything else or a product twice."""
    if p.inter is None:
        return {}, []
    c, isteps, iscale, q_op, s_node, q_labels, s_labels = p.inter
    qs, sizes = p.qs, p.sizes
    q_src, q_ax = p.src["q"]
    if c.added is not None:
        raise NoMatch(f"chunk {i}'s product with the state adds a term (baddbmm)")
    qtab = labels_to_atoms(q_labels, forward_axes(q_ax, to_source(q_op)[1], sizes), "the queries")
    contracted = [lab for lab in c.contracted if lab]
    if len(contracted) != 1 or qtab.get(contracted[0]) != "e":
        raise NoMatch(f"chunk {i}'s product with the state does not contract the query features")
    s_shape = shape_of(s_node)
    free = [lab for lab, s in zip(s_labels, s_shape) if s != 1 and lab and lab not in q_labels]
    if len(free) != 1 or free[0] not in c.out_labels or any(
            s != 1 and lab in q_labels and qtab.get(lab) == "p" for lab, s in zip(s_labels, s_shape)):
        raise NoMatch(f"chunk {i}'s state is not [.., key feature, value feature]")
    stab = {**qtab, free[0]: "f"}
    s_axes = axes_from_labels(s_labels, s_shape, stab)
    if sorted(a for ax in s_axes for a in ax) != sorted([*qs.batch_atoms, "e", "f"]):
        raise NoMatch(f"chunk {i}'s state is not one [key feature, value feature] matrix per batch")
    inter_axes = forward_axes(axes_from_labels(c.out_labels, shape_of(c.node), stab), isteps, sizes)
    if inter_axes != p.out_axes or shape_of(p.node) != shape_of(c.node if not isteps else isteps[-1]):
        raise NoMatch(f"chunk {i}'s inter- and intra-chunk parts do not line up position by position")
    p.state["inter_scale"] = iscale * c.alpha
    head, head_axes = source_axes(s_node, s_axes)
    chain = [*to_source(s_node)[1]]
    terms: dict[int, float] = {}
    stack = [head]
    while stack:
        nd = stack.pop()
        if len(chain) > 4 * len(pieces) + 16:
            raise NoMatch("the state chain is too long")
        if is_call(nd, aten.add.Tensor) and nd.kwargs.get("alpha", 1) == 1 and shape_of(nd) == shape_of(head) and \
                all(isinstance(a, Node) for a in nd.args[:2]):
            chain.append(nd)
            stack.extend(nd.args[:2])
            continue
        if is_zero(nd):
            chain.append(nd)
            continue
        j, scale, kv_nodes = _chunk_product(nd, i, pieces, ranges, head_axes)
        if j in terms:
            raise NoMatch(f"the state chunk {i}'s queries read adds chunk {j}'s product twice")
        terms[j] = scale
        chain.extend(kv_nodes)
    return terms, chain


def _chunk_product(nd: Node, i: int, pieces: list[_Piece], ranges, axes: Axes) -> tuple[int, float, list[Node]]:
    """nd = [c ·] K_jᵀ V_j of one chunk j's very slices: (j, c, its nodes)."""
    c, steps, scale = back_to_contraction(nd)
    if c is None or c.added is not None:
        raise NoMatch(f"the state chunk {i}'s queries read holds something other than chunk products "
                      f"({nd.target}: a decay or another term is not plain linear attention)")
    a, b = _chunk_slice(c.a), _chunk_slice(c.b)
    first = pieces[0]
    for (ko, kl, ks), (vo, vl, vs) in (((c.a, c.a_labels, a), (c.b, c.b_labels, b)),
                                       ((c.b, c.b_labels, b), (c.a, c.a_labels, a))):
        if ks is None or vs is None or ks[1][:2] != first.rng["k"][:2] or vs[1][:2] != first.rng["v"][:2]:
            continue
        if ks[1][2:] != vs[1][2:] or ks[1][2:] not in ranges:
            raise NoMatch(f"a product in the state of chunk {i} pairs keys and values that are not one chunk's")
        j = ranges.index(ks[1][2:])
        p = pieces[j]
        ktab = labels_to_atoms(kl, forward_axes(p.src["k"][1], to_source(ko)[1], p.sizes), "the keys")
        vtab = labels_to_atoms(vl, forward_axes(p.src["v"][1], to_source(vo)[1], p.sizes), "the values")
        if any(vtab[lab] != atom for lab, atom in ktab.items() if lab in vtab):
            raise NoMatch("keys and values are paired along different axes in a state product")
        kvtab = {**ktab, **vtab}
        if [kvtab.get(lab) for lab in c.contracted] != ["m"] or len(set(kvtab.values())) != len(kvtab):
            raise NoMatch("a state product does not sum K_jᵀ V_j over the positions of its chunk")
        if forward_axes(axes_from_labels(c.out_labels, shape_of(c.node), kvtab), steps, p.sizes) != axes:
            raise NoMatch(f"a state product's axes are not the ones chunk {i}'s queries read")
        return j, scale * c.alpha, [c.node, *steps]
    raise NoMatch(f"a product in the state of chunk {i} is not of the very keys and values the chunks use")
