"""Recognise Flow-Attention (Flowformer, thuml/Flowformer's ``Flow_Attention`` and
``Flow_Attention_Causal``) in an ATen graph.

Flow-Attention has no single contraction chain to key on: it is ~40 ATen ops of sums,
reciprocals and einsums around two sigmoids. The recogniser therefore matches the
official forward as a whole: the official code (with and without its clamp of the conserved
outgoing flow, causal and not) is traced to ATen at the candidate's own shapes, and the
candidate sub-graph must be the same graph op for op, argument for argument (fx's
SubgraphMatcher, then a strict literal comparison), with eps free (it must be the same
positive number everywhere). An identical ATen graph computes the identical function: that
is the proof. Spellings that lower to a different ATen graph (dims written negative, the
sums reordered) are not recognised.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import Graph, GraphModule, Node

from rewrite.ir.cascade import Cascade

from .axes import dtype_of, shape_of
from .softmax_attention import location_of

aten = torch.ops.aten
SENTINEL_EPS = 1.2345678e-6


def official_flow(eps: float, clamp: bool):
    """thuml/Flowformer Flow_Attention.forward after the projections (layout n, h, l, d)."""
    def flow(queries, keys, values):
        queries = torch.sigmoid(queries)
        keys = torch.sigmoid(keys)
        sink_incoming = 1.0 / (torch.einsum("nhld,nhd->nhl", queries + eps, keys.sum(dim=2) + eps))
        source_outgoing = 1.0 / (torch.einsum("nhld,nhd->nhl", keys + eps, queries.sum(dim=2) + eps))
        conserved_sink = torch.einsum("nhld,nhd->nhl", queries + eps,
                                      (keys * source_outgoing[:, :, :, None]).sum(dim=2) + eps)
        conserved_source = torch.einsum("nhld,nhd->nhl", keys + eps,
                                        (queries * sink_incoming[:, :, :, None]).sum(dim=2) + eps)
        if clamp:
            conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
        sink_allocation = torch.sigmoid(conserved_sink * (float(queries.shape[2]) / float(keys.shape[2])))
        source_competition = torch.softmax(conserved_source, dim=-1) * float(keys.shape[2])
        kv = torch.einsum("nhld,nhlm->nhdm", keys, values * source_competition[:, :, :, None])
        qkv = torch.einsum("nhld,nhdm->nhlm", queries * sink_incoming[:, :, :, None], kv)
        return qkv * sink_allocation[:, :, :, None]
    return flow


def official_flow_causal(eps: float, clamp: bool):
    """thuml/Flowformer Flow_Attention_Causal.forward after the projections (layout n, h, l, d)."""
    def flow(queries, keys, values):
        queries = torch.sigmoid(queries)
        keys = torch.sigmoid(keys)
        sink_incoming = 1.0 / (torch.einsum("nhld,nhld->nhl", queries + eps, keys.cumsum(dim=2) + eps))
        source_outgoing = 1.0 / (torch.einsum("nhld,nhld->nhl", keys + eps, queries.cumsum(dim=2) + eps))
        normal = ((torch.arange(queries.shape[2])).float() + 1.0).to(queries.device)[None, None, :]
        sink_incoming = sink_incoming * normal
        source_outgoing = source_outgoing * normal
        conserved_sink = torch.einsum("nhld,nhld->nhl", queries + eps,
                                      (keys * source_outgoing[:, :, :, None]).cumsum(dim=2) + eps) / normal
        conserved_source = torch.einsum("nhld,nhld->nhl", keys + eps,
                                        (queries * sink_incoming[:, :, :, None]).cumsum(dim=2) + eps) / normal
        if clamp:
            conserved_source = torch.clamp(conserved_source, min=-1.0, max=1.0)
        sink_allocation = torch.sigmoid(conserved_sink)
        conserved_source = torch.exp(conserved_source)
        source_competition = (conserved_source / conserved_source.cumsum(dim=-1)) * normal
        q = queries * (sink_incoming[:, :, :, None] / normal[:, :, :, None])
        v = values * source_competition[:, :, :, None]
        kv = torch.einsum("nhld,nhlm->nhldm", keys, v)
        kv = torch.cumsum(kv, dim=2)
        qkv = torch.einsum("nhld,nhldm->nhlm", q, kv)
        return qkv * sink_allocation[:, :, :, None]
    return flow


@dataclass
class FlowSite:
    location: str
    spelling: str
    q: Node
    k: Node
    v: Node
    out_node: Node
    causal: bool
    clamp: bool
    eps: float
    nodes: list[Node] = field(default_factory=list)
    out_dtype: torch.dtype = torch.float32
    n: int = 0
    m: int = 0
    e: int = 0
    f: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    kind: str = "flow"
    rejected: str | None = None
    cascade: Cascade | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def eager_passes(self) -> int:
        """Ops of the matched eager graph that read or write a tensor with a sequence axis."""
        n = 0
        for node in self.nodes:
            val = node.meta.get("val")
            if isinstance(val, torch.Tensor) and any(s in (self.n, self.m) for s in val.shape):
                n += 1
        return n

    @property
    def device(self) -> torch.device | None:
        val = self.out_node.meta.get("val")
        return val.device if isinstance(val, torch.Tensor) else None


def _trace(fn, shapes, device="cpu", dtype=torch.float32) -> GraphModule:
    """The template's ATen graph on fake tensors of the candidate's shapes, device and dtype."""
    from rewrite.capture import to_aten  # the template is captured exactly as user graphs are

    args = [torch.randn(s, dtype=dtype) for s in shapes]
    return to_aten(fn, args)


def _same_literals(pa, ta, nodes_map, eps_seen: list) -> bool:
    if isinstance(pa, Node):
        return isinstance(ta, Node) and nodes_map.get(pa) is ta
    if isinstance(pa, (list, tuple)):
        return (isinstance(ta, (list, tuple)) and len(pa) == len(ta)
                and all(_same_literals(x, y, nodes_map, eps_seen) for x, y in zip(pa, ta)))
    if isinstance(pa, float) and pa == SENTINEL_EPS:
        if not isinstance(ta, (int, float)) or isinstance(ta, bool):
            return False
        eps_seen.append(float(ta))
        return True
    return type(pa) is type(ta) and pa == ta


def _strict(pattern: GraphModule, match, target_q: Node) -> float | None:
    """Every pattern node's literal arguments equal the target's (eps free): the eps, or None."""
    eps_seen: list[float] = []
    for pn in pattern.graph.nodes:
        if pn.op != "call_function":
            continue
        tn = match.nodes_map.get(pn)
        if tn is None or tn.target != pn.target:
            return None
        pk, tk = dict(pn.kwargs), dict(tn.kwargs)
        if not _same_literals(list(pn.args), list(tn.args), match.nodes_map, eps_seen):
            return None
        if set(pk) != set(tk) or not all(_same_literals(pk[k], tk[k], match.nodes_map, eps_seen) for k in pk):
            return None
    if not eps_seen or len(set(eps_seen)) != 1 or not eps_seen[0] > 0:
        return None
    return eps_seen[0]


def find_flow_sites(graph: Graph) -> list[FlowSite]:
    from torch.fx.passes.utils.matcher_utils import SubgraphMatcher

    sig = [n for n in graph.nodes if n.op == "call_function" and n.target == aten.sigmoid.default
           and shape_of(n) is not None and len(shape_of(n)) == 4]
    if len(sig) < 2:
        return []
    sites: list[FlowSite] = []
    taken: set[Node] = set()
    for causal in (False, True):
        for clamp in (True, False):
            make = official_flow_causal if causal else official_flow
            loose = _trace(make(SENTINEL_EPS, clamp), [(1, 2, 8, 4)] * 3)
            matcher = SubgraphMatcher(loose.graph, match_output=False, match_placeholder=False,
                                      remove_overlapping_matches=True, ignore_literals=True)
            try:
                matches = matcher.match(graph)
            except Exception:  # the matcher is best-effort on odd graphs: no flow site there
                continue
            for mt in matches:
                q, k, v = mt.placeholder_nodes[:3]
                shapes = [shape_of(x) for x in (q, k, v)]
                if any(s is None or len(s) != 4 for s in shapes) or any(n in taken for n in mt.nodes_map.values()):
                    continue
                val = q.meta.get("val")
                try:
                    pattern = _trace(make(SENTINEL_EPS, clamp), shapes, val.device, val.dtype)
                except Exception:
                    continue
                strict = SubgraphMatcher(pattern.graph, match_output=False, match_placeholder=False,
                                         remove_overlapping_matches=True, ignore_literals=True)
                try:
                    found = [x for x in strict.match(graph) if x.placeholder_nodes[:3] == [q, k, v]]
                except Exception:  # best-effort matcher: no flow site here
                    continue
                if not found:
                    continue
                eps = _strict(pattern, found[0], q)
                if eps is None:
                    continue
                out = found[0].returning_nodes[0]
                nodes = [n for p, n in found[0].nodes_map.items() if p.op == "call_function"]
                taken.update(nodes)
                site = FlowSite(location=location_of(out), spelling=(
                    f"Flowformer Flow_Attention{'_Causal' if causal else ''} (official code"
                    f"{', clamped' if clamp else ', no clamp'}, eps={eps:g})"),
                    q=q, k=k, v=v, out_node=out, causal=causal, clamp=clamp, eps=eps, nodes=nodes,
                    out_dtype=dtype_of(out) or torch.float32)
                site.batch_sizes = list(shapes[0][:2])
                site.n, site.e = shapes[0][2:]
                site.m, site.f = shapes[2][2:]
                site.cascade = Cascade.flow_attention()
                if causal and site.n != site.m:
                    site.rejected = "causal flow with different query and key lengths"
                sites.append(site)
    return sites
