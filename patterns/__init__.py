"""fx recognisers, one file per family, over a graph normalised to ATen."""

from __future__ import annotations

from torch.fx import Graph

from rewrite.ir.site import Site, TensorPlan

from .axes import NoMatch
from .mask_terms import read_terms
from .position_bias import PositionsUnaligned
from .sdpa import SDPA_OPS, match_sdpa
from .softmax_attention import location_of, match_softmax_attention
from .softmax_chain import find_softmax_candidates
from .unfollowed import reaches_product, unfollowed_product

__all__ = ["NoMatch", "Site", "TensorPlan", "find_sites"]


def find_sites(graph: Graph, inputs: dict | None = None) -> list[tuple[Site | None, tuple[str, str, str] | None]]:
    """Every attention site: (site, None) when matched, (None, (location, spelling, reason))
    for a softmax between two products that could not be proven to be attention. ``inputs``
    (placeholder → the first call's value) give run-time masks their first values."""
    out: list = []
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target in SDPA_OPS:
            try:
                out.append((read_terms(match_sdpa(node), inputs), None))
            except NoMatch as exc:
                out.append((None, (location_of(node), "F.scaled_dot_product_attention", str(exc))))
    from .flow_attention import find_flow_sites

    flow = find_flow_sites(graph)  # Flow-Attention's competition softmax is not softmax attention
    taken = {n for s in flow for n in s.nodes}
    out.extend((s, None) for s in flow)
    for sm in find_softmax_candidates(graph):
        if sm in taken:
            continue
        try:
            site = read_terms(_match_softmax(sm), inputs)
            out.append((site, None))
            taken.update(site.nodes)
        except NoMatch as exc:
            if _looks_like_attention(sm):
                out.append((None, (location_of(sm), "softmax between two products", str(exc))))
                taken.add(sm)
            elif (why := unfollowed_product(sm)) is not None:
                out.append((None, (location_of(sm), "softmax after a product it cannot follow", why)))
                taken.add(sm)
    # The linear-time families (sites with kind "linear" or "flow", planned by passes/linear_apply.py), read on
    # their normal form (linear_find.py). A chain that holds a softmax belongs to the softmax family.
    from .linear_find import find_linear_sites

    failures: list = []
    out.extend((s, None) for s in find_linear_sites(graph, failures)
               if s.out_node not in taken and not taken.intersection(s.nodes))
    out.extend((None, f) for f in failures)
    return out


def _match_softmax(sm) -> Site:
    try:
        return match_softmax_attention(sm)
    except PositionsUnaligned as e:  # the bias is then read as a tensor, as the graph computes it
        site = match_softmax_attention(sm, positions=False)
        site.notes.append(f"a bias built from positions stays a tensor: {e}")
        return site


def _looks_like_attention(sm) -> bool:
    """A softmax whose input comes from a product and whose output reaches another one."""
    from .axes import is_layout_op
    from .softmax_chain import mixes_products, reaches_contraction, softmax_of

    found = softmax_of(sm)
    if found is None:
        return False
    cur = found[0]
    while is_layout_op(cur):
        cur = cur.args[0]
    return (reaches_contraction(found[0], {}) or mixes_products(cur)) and reaches_product(sm)
