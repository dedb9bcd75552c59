"""The entry point of the linear-attention recognisers over one graph: the normal form first
(linear_normal.py), then the quadratic, reassociated and cumsum readers at every product of the copy, and the
sites mapped back to the user's graph.

An einsum of several operands is tried in each association order until one reads as linear attention whose
rewrite replaces the whole einsum; when none does, the first order that read as attention gives the site left
alone, with its reason.
"""

from __future__ import annotations

import torch
from torch.fx import Graph, Node

from .axes import NoMatch
from .contraction import as_contraction
from .decay_loop import find_decay_loop_sites
from .linear_attention import match_quadratic
from .linear_chunked import find_chunked_sites
from .linear_cumsum import match_cumsum
from .linear_loop import find_loop_sites
from .linear_normal import NormalForm
from .linear_readers import is_call
from .linear_reassociated import match_reassociated
from .linear_site import LinearSite, NotOurs
from .locations import location_of

aten = torch.ops.aten


def match_linear_at(node: Node) -> LinearSite | None:
    """The site whose second product is ``node`` (quadratic, reassociated or cumsum form), or None."""
    c2 = as_contraction(node)
    if c2 is None:
        return None
    for match in (match_quadratic, match_reassociated, match_cumsum):
        try:
            return match(c2)
        except (NoMatch, NotOurs):
            continue
    return None


def _scan(nodes, claimed: set[Node]) -> list[LinearSite]:
    sites = []
    for node in nodes:
        if node in claimed:
            continue
        site = match_linear_at(node)
        if site is not None and not site.normalize and not site.rejected and len(site.out_node.users) == 1:
            u = next(iter(site.out_node.users))
            if is_call(u, aten.div.Tensor) and u.args[0] is site.out_node:
                site.notes.append("the ÷ after the product is not its normaliser (φQ·ΣφK, causal: φQ·cumsum φK, of "
                                  "these queries and keys, + eps): it stays in the graph")
        if site is not None:
            sites.append(site)
            claimed.add(node)
    return sites


def _decay_reasons(decayed: list[LinearSite], others: list[LinearSite]) -> list[LinearSite]:
    """A decay loop refused (its W is not γ^(p−m)) over the same output as a refused loop/chunked site: its
    reason leads that site's (the other recogniser's reason follows); else it is a site of its own."""
    own = []
    for d in decayed:
        same = next((o for o in others if o.out_node is d.out_node and o.rejected), None)
        if same is not None:
            same.rejected = f"{d.rejected}; read as a plain {same.rejected}"
        else:
            own.append(d)
    return own


def find_linear_sites(graph: Graph, failures: list | None = None) -> list[LinearSite]:
    """Every linear-attention site (matched, or attention-like and left alone with a reason), on the normal form,
    mapped back to ``graph``. A Python loop over chunks first (unrolled, its per-chunk bodies are chunked-form and
    quadratic sites too), then the chunked form (its intra-chunk part alone is a small quadratic site), then the
    products one by one. ``failures`` gets (location, what, why) for each normal-form rule that raised (a bug of
    ours, not a spelling refused): that node was read as written, and the report says so."""
    nf = NormalForm(graph)
    if failures is not None:
        failures.extend((location_of(n), f"normal form of {n.target}",
                         f"a normal-form rule failed here ({why}): the node was read as written, so a linear "
                         "attention through it may be missed. Please report this spelling.") for n, why in nf.failures)
    taken: set[Node] = set()
    found: list[tuple[LinearSite | None, set[Node]]] = []
    decayed = find_decay_loop_sites(nf.graph)
    others = [*find_loop_sites(nf.graph), *find_chunked_sites(nf.graph)]
    refused = _decay_reasons([d for d in decayed if d.rejected], others)
    for s in [*(d for d in decayed if not d.rejected), *others, *refused]:
        if s.out_node not in taken and not taken.intersection(s.nodes):
            taken.update(s.nodes)
            found.append((nf.to_original(s), set()))
    for s in _scan(list(nf.graph.nodes), set()):
        if s.out_node in taken or taken.intersection(s.nodes):
            continue
        copied = {*s.nodes, s.out_node}  # before the site is mapped back in place
        found.append((nf.to_original(s), copied))
    for nary in nf.nary:
        chain = set(nary.chain)
        if chain & taken:
            continue
        mine = [f for f in found if f[1] & chain]
        if any(s is not None and not s.rejected for s, _ in mine):
            continue
        best = next((s for s, _ in mine if s is not None), None)
        for i in range(1, len(nary.trees)):
            try:
                nf.resplit(nary, i)
            except NoMatch:
                continue
            tried = [nf.to_original(s) for s in _scan(nary.chain, set())]
            ok = next((s for s in tried if s is not None and not s.rejected), None)
            if ok is not None:
                best = ok
                break
            best = best or next((s for s in tried if s is not None), None)
        found = [f for f in found if f not in mine] + ([(best, set())] if best is not None else [])
    return [s for s, _ in found if s is not None]
