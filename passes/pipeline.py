"""The pass pipeline over one ATen graph: find sites, plan each, rewrite, report."""

from __future__ import annotations

import logging

import torch
from torch.fx import GraphModule

from rewrite.codegen import counters
from rewrite.ir.cascade import Cascade
from rewrite.patterns import find_sites
from rewrite.report import SiteReport

from .apply import apply_plan
from .plan import plan_site

log = logging.getLogger("rewrite")


def _shapes(site) -> dict:
    b = 1
    for s in site.batch_sizes:
        b *= s
    return {"batch": b, "batch_dims": list(site.batch_sizes), "n": site.n, "m": site.m, "e": site.e,
            "f": site.f, "q": list(site.q.shape), "k": list(site.k.shape), "v": list(site.v.shape)}


def rewrite_graph(gm: GraphModule, backend: str, example_inputs=None,
                  count_calls: bool = False) -> tuple[GraphModule, list[SiteReport]]:
    """Rewrite every proven site of ``gm``; ``example_inputs`` (the first call's arguments)
    let run-time mask tensors be checked on real values; ``count_calls`` keeps every site on its
    counted op (no direct aten SDPA calls: passes/direct.py)."""
    inputs = None
    if example_inputs is not None:
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = dict(zip(phs, example_inputs))
    reports: list[SiteReport] = []
    original_passes = Cascade.softmax_attention().pass_count()
    online_passes = Cascade.online_softmax_attention().pass_count()
    changed = False
    replaced: list = []  # the nodes of every rewritten site
    # Values the caller never reads (MultiheadAttention's averaged weights when the
    # caller drops them) must not keep a site from being rewritten.
    gm.graph.eliminate_dead_code()
    for site, reason in find_sites(gm.graph, inputs):
        if getattr(site, "kind", "softmax") in ("linear", "flow"):
            from .linear_apply import rewrite_linear_site

            rep = rewrite_linear_site(gm.graph, site, backend)
            changed |= rep.rewritten
            if rep.rewritten:
                replaced.extend(site.nodes)
            reports.append(rep)
            log_decision(rep)
            continue
        if site is None:
            log.info("site at %s left alone: %s (%s)", reason[0], reason[2], reason[1])
            reports.append(SiteReport(variant="unknown", location=reason[0], spelling=reason[1],
                                      rewritten=False, reason=reason[2],
                                      pass_count={"original": original_passes}))
            continue
        device = node_device(site.out_node)
        try:
            plan = plan_site(site, backend, device, direct=not count_calls)
        except Exception as exc:  # a site the passes cannot prove is left untouched
            log.info("site at %s left alone: %s", site.location, exc)
            reports.append(SiteReport(variant="unknown", location=site.location, spelling=site.spelling,
                                      rewritten=False, reason=f"analysis failed: {exc}",
                                      pass_count={"original": original_passes}))
            continue
        cascade = plan.cascade
        rep = SiteReport(
            variant=plan.variant, location=site.location, spelling=site.spelling, rewritten=True,
            kernel=plan.kernel, cascade=str(cascade),
            rewritten_cascade=str(Cascade.online_softmax_attention(
                mask=next((e.mask for e in cascade if e.mask is not None), None))),
            mask=plan.mask.describe(), proof=plan.mask.proof, shapes=_shapes(site), flops=plan.flops,
            density=plan.density,
            pass_count={"original": original_passes, "rewritten": online_passes},
            ideal_speedup=1.0 / plan.density if plan.density > 0 else None, gqa=site.gqa_groups > 1,
            notes=list(plan.notes), cascade_ir=cascade, mask_spec=plan.mask,
            site_id=counters.register(site.location, plan.kernel),
            score_mod=str(site.score_mod or ""), direct=plan.direct,
            kernel_source=modifier_source(site.score_mod, plan.kernel))
        apply_plan(gm.graph, plan, rep.site_id)
        replaced.extend(site.nodes)
        changed = True
        reports.append(rep)
        log_decision(rep)
    if changed:
        erase_unused(gm.graph, replaced)
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return gm, reports


def erase_unused(graph, replaced: list) -> None:
    """Erase the replaced sites' nodes nothing reads any more. Dead-code elimination alone keeps an
    original ``scaled_dot_product_attention`` call (fx counts it impure: a dropout op, seeded), so it
    would still run beside the op that replaced it."""
    doomed = set(replaced)
    for node in reversed(list(graph.nodes)):
        if node in doomed and not node.users and node.op in ("call_function", "call_method", "call_module"):
            graph.erase_node(node)


def log_decision(rep: SiteReport) -> None:
    """One INFO record per site: what was found and what runs, or why it is left alone."""
    if rep.rewritten:
        log.info("site at %s: %s (%s), mask %s, kernel %s", rep.location, rep.variant, rep.spelling, rep.mask,
                 rep.kernel)
    else:
        log.info("site at %s left alone: %s", rep.location, rep.reason)


def modifier_source(mod, kernel: str) -> str:
    """The generated code a score-modified site runs, and where the Triton file lives."""
    if mod is None:
        return ""
    from rewrite.codegen.score_mod_gen import source_path, triton_source

    text = triton_source(mod)
    return f"# {source_path(mod)}\n{text}" if kernel == "triton" else f"# runs on the torch path; Triton form:\n{text}"


def node_device(node) -> torch.device | None:
    val = node.meta.get("val")
    return val.device if isinstance(val, torch.Tensor) else None
