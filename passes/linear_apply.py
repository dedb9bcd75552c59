"""The fx rewrite and the report for the linear-time families (linear and flow attention)."""

from __future__ import annotations

import logging

import torch
from torch.fx import Graph, Node

import rewrite.codegen.decay_ops  # noqa: F401  (registers torch.ops.rewrite.decay_linear_attention)
import rewrite.codegen.linear_ops  # noqa: F401  (registers torch.ops.rewrite.linear_attention / flow_attention)
from rewrite.ir.cascade import Cascade
from rewrite.ir.plan import Plan
from rewrite.report import SiteReport

from .apply import canonical_operand, constant_buffer
from .linearize import NotLinearizable, normal_form_cascade, plan_linear

log = logging.getLogger("rewrite")
aten = torch.ops.aten

QUADRATIC_TO_LINEAR = "O(N²·D) → O(N·D²)"


def _restore_layout(graph: Graph, out: Node, site) -> Node:
    """The op returns [*batch atoms, N, F]; give the original output's layout back."""
    canon = [*site.batch_atoms, "p", "f"]
    out = graph.call_function(aten.reshape.default, (out, [site.atom_sizes[a] for a in canon]))
    perm = [canon.index(a) for a in site.out_atoms]
    if perm != list(range(len(perm))):
        out = graph.call_function(aten.permute.default, (out, perm))
    return graph.call_function(aten.reshape.default, (out, list(site.out_shape)))


def apply_linear(graph: Graph, plan: Plan) -> Node:
    site = plan.site
    with graph.inserting_before(site.out_node):
        fq = canonical_operand(graph, site.fq)
        if site.scale != 1.0:
            fq = graph.call_function(aten.mul.Tensor, (fq, float(site.scale)))
        fk = canonical_operand(graph, site.fk)
        v = canonical_operand(graph, site.v)
        if site.decay is not None:
            out = graph.call_function(torch.ops.rewrite.decay_linear_attention.default, (
                fq, fk, v, _log_decay(graph, site), plan.kernel, site.out_dtype))
        else:
            out = graph.call_function(torch.ops.rewrite.linear_attention.default, (
                fq, fk, v, bool(plan.causal), bool(site.normalize), float(site.eps), plan.kernel, site.out_dtype))
        out = _restore_layout(graph, out, site)
    out.meta["rewrite_site"] = site.location
    site.out_node.replace_all_uses_with(out)
    return out


def _log_decay(graph: Graph, site) -> Node:
    """G [*batch, N] for the op: a buffer λ·p for a constant decay, else the graph's own G."""
    n = site.n
    if site.decay.g is not None:
        g = canonical_operand(graph, site.decay.g)
        return graph.call_function(aten.reshape.default, (g, [*(site.decay.g.shape[:-2]), n]))
    lam = site.decay.log_rate.reshape(*site.decay.log_rate.shape, 1)
    return constant_buffer(graph, (lam * torch.arange(n, dtype=torch.float64)).to(torch.float32))


def _shapes(site) -> dict:
    b = 1
    for s in site.batch_sizes:
        b *= s
    return {"batch": b, "batch_dims": list(site.batch_sizes), "n": site.n, "m": site.m, "e": site.e, "f": site.f}


def rewrite_linear_site(graph: Graph, site, backend: str) -> SiteReport:
    """Plan, prove and apply one linear or flow site; the SiteReport either way."""
    if site.kind == "flow":
        from .flow import rewrite_flow_site

        return rewrite_flow_site(graph, site, backend)
    val = site.out_node.meta.get("val")
    device = val.device if isinstance(val, torch.Tensor) else None
    rewritten = Cascade.linear_attention(causal=False)
    original_passes = site.cascade.pass_count() if site.cascade is not None else None
    complexity = {"quadratic": QUADRATIC_TO_LINEAR, "reassociated": "O(N·D²) → O(N·D²) (one fused pass)",
                  "cumsum": "O(N·D²) memory ([N, D, D] cumsum) → O(N·D) memory, O(N·D²) time",
                  "chunked": "O(N·C·D + N·D²) with [N/C, D, D] states in memory → one fused pass, O(N·D) memory"
                  }[site.form]
    rep = SiteReport(variant="linear", location=site.location, spelling=site.spelling, rewritten=False,
                     cascade=str(site.cascade) if site.cascade is not None else "", shapes=_shapes(site),
                     pass_count={"original": original_passes} if original_passes is not None else {},
                     notes=list(site.notes), cascade_ir=site.cascade)
    try:
        plan = plan_linear(site, backend, device)
    except NotLinearizable as exc:
        log.info("linear site at %s left alone: %s", site.location, exc)
        rep.reason = str(exc)
        return rep
    rewritten = normal_form_cascade(site, plan)
    rep.rewritten = True
    op = "decay_linear_attention" if site.decay is not None else "linear_attention"
    rep.kernel = f"rewrite::{op}[{plan.kernel}]"
    rep.rewritten_cascade = str(rewritten)
    rep.mask = plan.mask.describe()
    rep.flops = plan.flops
    rep.pass_count["rewritten"] = rewritten.pass_count()
    rep.complexity = complexity
    rep.notes += ["proof: " + "; ".join(plan.proof), *plan.notes]
    if site.normalize:
        rep.notes.append(f"normalised (eps = {site.eps:g})")
    apply_linear(graph, plan)
    return rep
