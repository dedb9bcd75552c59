"""Recognise Flow-Attention (Flowformer) in an ATen graph by what it computes.

Flow-Attention has no single contraction chain to key on: it is ~40 ATen ops of sums, reciprocals and
contractions around two sigmoids. Each candidate output (a product reachable from a sigmoid) is lifted
into a canonical expression over named axes (patterns/flow_normal.py: layout gone, contractions of any
spelling one form, products and sums flat and sorted), and that form must equal Flow-Attention's
equations built in the same algebra at the candidate's roles, eps and sizes
(patterns/flow_equations.py): equal canonical forms are the proof. The official thuml/Flowformer
forward (`official_flow`, `official_flow_causal`, kept here as the reference spelling and used by
the tests) is one spelling among many. A candidate that looks like Flow-Attention (two sigmoids, an
exp, four sums) but is not is reported with the first step of the cascade it does not compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.fx import Graph, Node

from rewrite.ir.cascade import Cascade

from .axes import NoMatch, dtype_of, shape_of
from .flow_equations import FlowRoles, looks_like_flow, looks_like_flow_nodes, prove_flow
from .flow_normal import GraphContext, Lifted, collect, lift
from .softmax_attention import location_of

aten = torch.ops.aten
CANDIDATE_OPS = {aten.mul.Tensor, aten.div.Tensor, aten.einsum.default, aten.matmul.default, aten.bmm.default}

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
class OperandPlan:
    """A canonical operand [*batch atoms, rows, cols] from a graph value: view it with one dim per atom
    (this splits [B, L, H·D] when the sigmoid came before the head split), then permute."""

    node: Node
    atom_shape: list[int]
    perm: list[int]


@dataclass
class FlowSite:
    location: str
    spelling: str
    q: Node | None
    k: Node | None
    v: Node | None
    out_node: Node
    causal: bool = False
    clamp: bool = False
    eps: float = 0.0
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
    proof: str = ""
    # canonical operands [*batch, N, E] / [*batch, M, E] / [*batch, M, F] and how to give the output its layout
    qp: OperandPlan | None = None
    kp: OperandPlan | None = None
    vp: OperandPlan | None = None
    out_perm: list[int] = field(default_factory=list)  # canonical [*batch, p, f] → the output's atom order
    out_shape: list[int] = field(default_factory=list)

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


def _operand(lifted: Lifted, node: Node, order: list[str]) -> OperandPlan:
    atoms = [a for ax in lifted.axes[node] for a in ax]
    return OperandPlan(node, [lifted.sizes[a] for a in atoms], [atoms.index(a) for a in order])


def _plans(site: FlowSite, lifted: Lifted, r: FlowRoles) -> None:
    site.qp = _operand(lifted, r.q, [*r.batch, r.p, r.e])
    site.kp = _operand(lifted, r.k, [*r.batch, r.m, r.e])
    site.vp = _operand(lifted, r.v, [*r.batch, r.m, r.f])
    canon = [*r.batch, r.p, r.f]
    out_atoms = [a for ax in lifted.axes[site.out_node] for a in ax]
    site.out_perm = [canon.index(a) for a in out_atoms]
    site.out_shape = list(shape_of(site.out_node))


def _site(out: Node, lifted: Lifted, proven) -> FlowSite:
    r, eps, clamp, proof = proven
    kind = "Flow_Attention_Causal" if r.causal else "Flow_Attention"
    site = FlowSite(location=location_of(out), spelling=(
        f"Flowformer {kind} (from its equations{', clamped' if clamp else ', no clamp'}, eps={eps:g})"),
        q=r.q, k=r.k, v=r.v, out_node=out, causal=r.causal, clamp=clamp, eps=eps, nodes=list(lifted.nodes),
        out_dtype=dtype_of(out) or torch.float32, proof=proof)
    sz = lifted.sizes
    site.batch_sizes = [sz[a] for a in r.batch]
    site.n, site.m, site.e, site.f = sz[r.p], sz[r.m], sz[r.e], sz[r.f]
    site.cascade = Cascade.flow_attention()
    _plans(site, lifted, r)
    return site


def _rejected(out: Node, lifted: Lifted, why: str) -> FlowSite:
    shape = shape_of(out) or ()
    site = FlowSite(location=location_of(out), spelling="Flow-Attention-like (two sigmoids, an exp, sums)",
                    q=None, k=None, v=None, out_node=out, nodes=list(lifted.nodes), rejected=why,
                    out_dtype=dtype_of(out) or torch.float32, cascade=Cascade.flow_attention())
    site.batch_sizes = list(shape[:-2])
    site.n, site.f = (shape[-2], shape[-1]) if len(shape) >= 2 else (0, 0)
    site.m = site.n
    return site


def find_flow_sites(graph: Graph) -> list[FlowSite]:
    """Every Flow-Attention site (proven), and every flow-like candidate refused, with its reason."""
    if sum(1 for n in graph.nodes if n.op == "call_function" and n.target == aten.sigmoid.default) < 2:
        return []
    ctx = GraphContext.of(graph)
    candidates = sorted((n for n in ctx.sig_desc if n.target in CANDIDATE_OPS), key=ctx.order.get, reverse=True)
    sites: list[FlowSite] = []
    taken: set[Node] = set()
    refused: list[tuple[Node, Lifted, str]] = []
    for out in candidates:  # latest first: the whole site before any part of it
        if out in taken:
            continue
        try:
            lifted = lift(out, ctx)
        except NoMatch as exc:
            try:
                nodes = collect(out, ctx)[0]
            except NoMatch:
                continue
            if looks_like_flow_nodes(nodes):
                refused.append((out, Lifted(None, {}, {}, [], {}, nodes), f"not proven Flow-Attention: {exc}"))
            continue
        if not looks_like_flow(lifted):
            continue
        try:
            proven = prove_flow(lifted, out)
        except NoMatch as exc:
            refused.append((out, lifted, str(exc)))
            continue
        sites.append(_site(out, lifted, proven))
        taken.update(lifted.nodes)
    # A refused candidate is reported once, the widest first; its parts are not reported again.
    for out, lifted, why in sorted(refused, key=lambda t: -len(t[1].nodes)):
        if out in taken or taken.intersection(lifted.nodes):
            continue
        sites.append(_rejected(out, lifted, why))
        taken.update(lifted.nodes)
    return sites


def batch_count(site: FlowSite) -> int:
    return math.prod(site.batch_sizes)
