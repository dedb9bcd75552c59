"""The torch.compile backend: each captured graph → ATen → sites → plans → rewritten graph.

Dynamo hands over one fx graph per captured region (graph breaks give several). On the
first call of each we lower it to ATen with ``make_fx`` (pre-dispatch, so it stays
differentiable and keeps composite ops such as ``scaled_dot_product_attention``),
recognise attention, plan, rewrite, and from then on run the rewritten graph.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch.fx import GraphModule

from .capture import CaptureError, to_aten
from .errors import RewriteMismatch
from .options import Options
from .report import Report, SiteReport

log = logging.getLogger("rewrite")

def _is_dynamic(gm: GraphModule) -> bool:
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.SymInt):
            return True
        if isinstance(ev, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in ev.shape):
            return True
    return False


class RewrittenGraph:
    """A Dynamo graph, rewritten lazily on its first call (with real inputs in hand)."""

    def __init__(self, gm: GraphModule, backend: str, verify: bool, report: Report | None):
        self.gm = gm
        self.backend = backend
        self.verify = verify
        self.report = report
        self.graph_index = report.graphs if report is not None else 0
        if report is not None:
            report.graphs += 1
        self.run = None

    def __call__(self, *args):
        if self.run is None:
            self.run = self._build(args)
        return self.run(*args)

    def _build(self, args):
        from rewrite.passes.pipeline import rewrite_graph

        log.debug("graph %d: %d fx nodes, first call", self.graph_index, len(self.gm.graph.nodes))
        if _is_dynamic(self.gm):
            self._skip("dynamic shapes: left alone (rewrite.compile marks shapes static; "
                       "pass dynamic=False to torch.compile)")
            return self.gm.forward
        try:
            aten_gm = to_aten(self.gm, args)
        except CaptureError as exc:  # a graph that cannot be lowered is left exactly as it was
            self._skip(str(exc))
            return self.gm.forward
        original = GraphModule(aten_gm, copy.deepcopy(aten_gm.graph)) if self.verify else None
        try:
            new_gm, sites = rewrite_graph(aten_gm, self.backend, args)
        except Exception as exc:  # a bug of ours must never break the user's model: run it as it was
            log.warning("rewrite: graph %d left alone after an internal error: %r", self.graph_index, exc)
            self._skip(f"internal error while rewriting ({type(exc).__name__}: {str(exc)[:160]}); "
                       "the graph runs unchanged. Please report this model.")
            return self.gm.forward
        for s in sites:
            s.graph = self.graph_index
        if self.report is not None:
            self.report.sites.extend(sites)
        if self.verify and any(s.rewritten for s in sites):
            _verify(original, new_gm, sites, args)
        return new_gm

    def _skip(self, why: str) -> None:
        log.info("graph %d left alone: %s", self.graph_index, why)
        if self.report is not None:
            self.report.skipped_graphs.append(why)


def _verify(original: GraphModule, rewritten: GraphModule, sites: list[SiteReport], args) -> None:
    """Run both graphs on the first call's inputs and compare every output."""
    with torch.no_grad():
        want = original(*args)
        got = rewritten(*args)
    want = want if isinstance(want, (tuple, list)) else (want,)
    got = got if isinstance(got, (tuple, list)) else (got,)
    for w, g in zip(want, got):
        if not isinstance(w, torch.Tensor) or not w.is_floating_point():
            continue
        tol = {torch.float64: 1e-7, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}
        t = tol.get(w.dtype, 1e-3)
        same_nan = torch.equal(torch.isnan(w), torch.isnan(g))
        ok = same_nan and torch.allclose(torch.nan_to_num(g.float()), torch.nan_to_num(w.float()),
                                         atol=t * 4, rtol=t * 4)
        if not ok:
            where = ", ".join(s.location for s in sites if s.rewritten)
            err = (g.float() - w.float()).abs().nan_to_num(float("inf")).max().item()
            raise RewriteMismatch(
                f"rewrite verify: the rewritten graph differs from the original (max abs error {err:.3g}, "
                f"NaNs {'match' if same_nan else 'differ'}) at site(s): {where}. Compile with "
                "backend='torch' or report this spelling.")


def make_backend(options: Options, report: Report | None = None):
    def compiler(gm: GraphModule, example_inputs):
        return RewrittenGraph(gm, options.backend, options.verify, report)

    return compiler


def rewrite_backend(gm: GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """``torch.compile(model, backend="rewrite", options={...})`` (registered as an entry point).
    torch.compile hands ``mode`` and ``options`` over as keywords; both are validated here."""
    where = 'torch.compile(..., backend="rewrite")'
    if mode not in (None, "default"):
        raise ValueError(f"{where}: mode={mode!r} is not supported; leave mode unset "
                         "(the rewritten graph runs as an fx graph)")
    return make_backend(Options.from_mapping(options, where))(gm, example_inputs)
