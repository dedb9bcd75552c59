"""Flow-Attention sites: pass count, kernel choice, the fx rewrite, the report."""

from __future__ import annotations

import logging
import math

import torch
from torch.fx import Graph, Node

import rewrite.codegen.linear_ops  # noqa: F401  (registers torch.ops.rewrite.flow_attention)
from rewrite.ir.cascade import Cascade
from rewrite.ir.mask import MaskSpec
from rewrite.ir.plan import Plan
from rewrite.report import SiteReport

from .kernels import choose_kernel

log = logging.getLogger("rewrite")
aten = torch.ops.aten


def fused_passes(cascade: Cascade) -> str:
    """The cascade with the pass over the sequence each Einsum runs in (FuseMax's pass analysis)."""
    levels = cascade.pass_levels("m")
    return "\n".join(f"{e}   [pass {levels[e.name] or '-'}]" for e in cascade.einsums)


def _operand(graph: Graph, plan) -> Node:
    """[*batch, rows, cols]: the value viewed with one dim per atom, then permuted (patterns' OperandPlan)."""
    node = plan.node
    if list(node.meta["val"].shape) != plan.atom_shape:
        node = graph.call_function(aten.reshape.default, (node, plan.atom_shape))
    if plan.perm != list(range(len(plan.perm))):
        node = graph.call_function(aten.permute.default, (node, plan.perm))
    return node


def _flow_call(graph: Graph, site, kernel: str) -> Node:
    """rewrite::flow_attention on the canonical [*batch, N, D] operands, the output in the site's layout."""
    q, k, v = (_operand(graph, plan) for plan in (site.qp, site.kp, site.vp))
    out = graph.call_function(torch.ops.rewrite.flow_attention.default, (
        q, k, v, bool(site.causal), bool(site.clamp), float(site.eps), kernel, site.out_dtype))
    out = graph.call_function(aten.reshape.default, (out, [*site.batch_sizes, site.n, site.f]))
    if site.out_perm != list(range(len(site.out_perm))):
        out = graph.call_function(aten.permute.default, (out, site.out_perm))
    return graph.call_function(aten.reshape.default, (out, list(site.out_shape)))


def rewrite_flow_site(graph: Graph, site, backend: str) -> SiteReport:
    cascade = site.cascade or Cascade.flow_attention()
    eager = site.eager_passes
    rep = SiteReport(variant="flow", location=site.location, spelling=site.spelling, rewritten=False,
                     cascade=str(cascade), shapes={"batch": math.prod(site.batch_sizes),
                                                   "batch_dims": list(site.batch_sizes), "n": site.n, "m": site.m,
                                                   "e": site.e, "f": site.f},
                     pass_count={"original": eager}, notes=list(site.notes), cascade_ir=cascade)
    if site.rejected:
        rep.reason = site.rejected
        return rep
    kernel, why = choose_kernel("flow", backend, site.device is not None and site.device.type == "cuda")
    plan = Plan(site, "flow", kernel, MaskSpec("causal") if site.causal else MaskSpec("dense"), causal=site.causal,
                notes=[f"kernel {kernel}: {why}"])
    rep.notes += [f"proof: {site.proof}", *plan.notes]
    with graph.inserting_before(site.out_node):
        out = _flow_call(graph, site, kernel)
    out.meta["rewrite_site"] = site.location
    site.out_node.replace_all_uses_with(out)
    rep.rewritten = True
    rep.kernel = f"rewrite::flow_attention[{kernel}]"
    rep.flops = plan.flops
    if site.causal:
        rep.pass_count["rewritten"] = 1
        rep.complexity = "O(N·D²) memory ([N, D, D] cumsum) → O(N·D) memory, O(N·D²) time"
        if kernel == "triton":
            rep.rewritten_cascade = ("every sum of the flow cascade becomes a prefix sum: one scan, run as one "
                                     "fused Triton kernel walking the sequence in chunks (vector prefix sums by "
                                     "tl.cumsum plus carries, the [D, D] state Lightning-style)")
        else:
            rep.rewritten_cascade = ("every sum of the flow cascade becomes a prefix sum: one scan in the cascade; "
                                     "the torch path runs the vector prefix sums as PyTorch cumsums and the [D, D] "
                                     "state chunked (no [N, D, D] cumsum)")
            rep.notes.append("causal, torch path: ~15 passes over the sequence (PyTorch prefix sums of vectors, "
                             "then the chunked state), not the cascade's 1; the Triton kernel makes 1")
    else:
        rep.pass_count["rewritten"] = cascade.pass_count("m")
        rep.rewritten_cascade = fused_passes(cascade)
        rep.complexity = (f"O(N·D²) → O(N·D²) in {cascade.pass_count('m')} fused passes over the sequence "
                          f"(eager: {eager} ops over it)")
        if kernel == "triton":
            rep.notes.append("Triton: 4 kernels, one per pass (Σφk; Σφq and conservation; competition + state; "
                             "output), 6 tensor reads/writes")
    rep.notes.append(f"eps = {site.eps:g}, clamp of the conserved outgoing flow: {'yes' if site.clamp else 'no'}")
    return rep
