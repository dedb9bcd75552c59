"""Decay-gated linear attention written recurrently (RetNet / Lightning: ``S = γ·S + k_tᵀ v_t; o_t = q_t S``,
a Python loop over steps that torch.compile unrolls) or chunk by chunk (chunkwise retention: an intra-chunk
(q kᵀ ⊙ D) v plus q_i·γ^(l+1)·S, the state carried as S = γ^C·S + Σ_j γ^(C−1−j) k_jᵀ v_j), in any order
of ops, any einsum letters, collected by cat or stack.

Every such output is read back into the quadratic form Σ_m W[p, m] (q_p · k_m) v_m by the rules of
patterns/decay_terms.py (exact float64 coefficients from the graph's constants), and W is then proven
γ_h^(p−m) on and below the diagonal, 0 above, entry by entry, by the same reader as the quadratic decay
spelling (linear_decay.read_decay); a constant scale (D^−½ on q) is the diagonal's one value. The site
runs as the quadratic spelling's op, rewrite::decay_linear_attention.

Left alone with the reason: a W that is not γ^(p−m) (an off-by-one γ^(p−m+1) when γ multiplies the state
after the update, a γ varying per step, a state reset inside the loop, a decay missing between or inside the
chunks, a chunk update with γ^C where γ^(C−1−j) is due), each naming the first entry that differs. A W that
is the plain causal mask (no decay) is linear_loop.py's / linear_chunked.py's to read: skipped here.
"""

from __future__ import annotations

import math

import sympy
import torch
from torch.fx import Graph, Node

from rewrite.ir.cascade import Cascade

from .axes import AtomSizes, NoMatch, dtype_of, shape_of
from .decay_terms import DecayTerms, Val
from .linear_decay import DecayFactor, read_decay
from .linear_readers import is_call
from .linear_site import LinearSite, finish_linear_site, plan_operand
from .softmax_attention import location_of

aten = torch.ops.aten


def find_decay_loop_sites(graph: Graph) -> list[LinearSite]:
    """Every cat/stack that reads as a whole decayed causal output (rewritten, or left alone with a reason)."""
    sites: list[LinearSite] = []
    claimed: set[Node] = set()
    runtime: dict[Node, bool] = {}  # which nodes depend on an input: shared, the rest is per candidate
    for node in graph.nodes:
        if node in claimed or not is_call(node, aten.cat.default, aten.stack.default):
            continue
        ev = DecayTerms(runtime)
        try:
            val = ev.eval(node)
        except NoMatch:
            continue
        if val.kind != "out" or val.pos != tuple(range(ev.n)):
            continue  # a part of an output (one chunk's rows): its whole is read at the later cat
        site = _site(node, val, ev)
        if site is not None:
            sites.append(site)
            claimed.update(site.nodes)
    return sites


def _spelling(node: Node, ev: DecayTerms) -> str:
    products = sum(1 for nd in ev.visited if nd.target in (aten.einsum.default, aten.matmul.default,
                                                           aten.bmm.default, aten.mm.default))
    parts = len(node.args[0])
    how = "stack" if node.target == aten.stack.default else "cat"
    single = all(len(ev.memo[p].pos) == 1 for p in node.args[0])
    form = f"recurrent, {parts} steps" if single else f"chunked, {parts} chunks"
    return f"decay loop ({form}, {how}, {products} products): state decayed and carried → q · state"


def read_weights(w: torch.Tensor, dtype) -> tuple[object | None, float, str | None]:
    """(the op's DecayPlan, the scale, None), (None, 1, None) for a plain causal W, or (None, 1, reason)."""
    n = w.shape[-1]
    causal = torch.ones(n, n, dtype=torch.float64).tril()
    diag = w.diagonal(dim1=-2, dim2=-1)
    c = float(diag.flatten()[0])
    scale = 1.0
    if c != 0 and bool(torch.isclose(diag, torch.full_like(diag, c), rtol=1e-9, atol=0).all()):
        scale, w = c, w / c
    elif not bool(diag.any()):
        return None, 1.0, ("each query reads the state before its own key is added (the weight of a position on "
                           "itself is 0, m < p): not the causal m ≤ p form the op computes")
    elif bool((diag == diag[..., :1]).all()) and bool((diag[..., 0] > 0).all()):
        per = w / diag[..., :1, None]
        plan, why = read_decay([DecayFactor(None, value=per)], None, n, n, dtype)
        if plan is not None:
            gamma = plan.log_rate.exp()
            what = ("γ^(p−m+1): one γ more than the quadratic γ^(p−m) (γ multiplies the state after the update, "
                    "so each step's own key is decayed once)") if torch.allclose(
                gamma, diag[..., 0].reshape(gamma.shape), rtol=1e-6) else "c_h·γ^(p−m) with a per-head factor c_h"
            return None, 1.0, (f"the decay is {what}: the op takes γ^(p−m) and one scale for all heads")
        return None, 1.0, f"the weight of each position on itself differs per head, and {why}"
    if torch.equal(w, causal.expand_as(w)):
        return None, 1.0, None
    plan, why = read_decay([DecayFactor(None, value=w)], None, n, n, dtype)
    if plan is not None and not bool((plan.log_rate != 0).any()):
        return None, 1.0, None
    return plan, scale, why


def _site(node: Node, val: Val, ev: DecayTerms) -> LinearSite | None:
    n = ev.n
    dtype = dtype_of(node)
    bs = ev.bs
    w = val.coef  # [*bs, N, N]
    keep_batch = [i for i, s in enumerate(bs) if s != 1]
    w = w.reshape(*[bs[i] for i in keep_batch], n, n)
    plan, scale, why = read_weights(w, dtype)
    if val.gated:
        plan, why = None, (f"the state is multiplied by a run-time factor ({val.gated}: a gate such as simple GLA's "
                           "exp(g_t), written recurrently): only constant decays are read in this form; the "
                           "quadratic exp(G_p − G_m) spelling is rewritten")
    if plan is None and why is None:
        return None
    spelling = _spelling(node, ev)
    site = LinearSite(spelling=spelling, location=location_of(node), form="chunked", fq=None, fk=None, v=None,
                      out_node=node)
    q, k, v = val.bases
    e, f = shape_of(q)[-1], shape_of(v)[-1]
    batch = [f"b{i}" for i in keep_batch]
    site.n = site.m = n
    site.e, site.f = e, f
    site.batch_atoms = batch
    site.atom_sizes = {**{f"b{i}": bs[i] for i in keep_batch}, "p": n, "m": n, "e": e, "f": f}
    site.nodes = [nd for nd in ev.visited if nd is not node] + [node]
    site.notes.append("decay loop: the output read back, rule by rule, as Σ_m W[p, m] (q_p·k_m) v_m with W "
                      "exact in the graph's constants; W proven entry by entry")
    if shape_of(k)[-1] != e or shape_of(k)[:-1] != shape_of(v)[:-1] or shape_of(q)[:-1] != shape_of(k)[:-1]:
        site.rejected = "decay loop: q, k and v are not of one layout"
        return site
    if plan is None:
        site.rejected = f"decay loop: {why}"
        return site
    rank, d, _ = ev.layout
    sizes = AtomSizes(dict(site.atom_sizes))

    def axes(node_shape, row, feat):
        out, j = [], 0
        for i, s in enumerate(node_shape):
            if i == d:
                out.append((row,))
            elif i == rank - 1:
                out.append((feat,))
            else:
                out.append((f"b{j}",) if s != 1 else ())
                j += 1
        return tuple(out)

    try:
        site.fq = plan_operand(q, axes(shape_of(q), "p", "e"), (batch, ["p"], ["e"]), sizes, "the queries")
        site.fk = plan_operand(k, axes(shape_of(k), "m", "e"), (batch, ["m"], ["e"]), sizes, "the keys")
        site.v = plan_operand(v, axes(shape_of(v), "m", "f"), (batch, ["m"], ["f"]), sizes, "the values")
    except NoMatch as exc:
        site.rejected = f"decay loop: {exc}"
        return site
    site.scale = scale
    site.decay = plan
    site.mask_pred = sympy.Symbol("m") <= sympy.Symbol("p")
    site.mask_const = torch.ones(n, n, dtype=torch.bool).tril()
    site.notes.append(f"decay loop: W = {'' if scale == 1 else f'{scale:g}·'}{plan.describe}")
    out_axes = tuple({"P": ("p",), "F": ("f",)}.get(r, (r,) if r else ()) for r in val.dims)
    finish_linear_site(site, node, out_axes, site.nodes, q, k, True, "decay loop")
    es = Cascade.linear_attention(causal=True, decay=True).einsums
    site.cascade = Cascade(tuple(e for e in es if e.name not in ("KS", "DEN", "AV")),
                           name="decay-gated linear attention (loop, as written)")
    if not math.isfinite(scale):
        site.rejected = "decay loop: a non-finite scale"
    return site
