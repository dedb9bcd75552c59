"""The torch.compile backend: each captured graph → ATen → sites → plans → rewritten graph.

Dynamo hands over one fx graph per captured region (graph breaks give several). On the
first call of each we lower it to ATen with ``make_fx`` (pre-dispatch, so it stays
differentiable and keeps composite ops such as ``scaled_dot_product_attention``),
recognise attention, plan, rewrite, and from then on run the rewritten graph. A graph with
symbolic sizes is rewritten per concrete size signature instead (rewrite/specialise.py).
"""

from __future__ import annotations

import copy
import functools
import logging

import torch
from torch.fx import GraphModule

from .capture import CaptureError, specialised, to_aten, to_symbolic_aten
from .errors import RewriteMismatch
from .inductor import compile_rest, inductor_on
from .options import Options
from .report import Report, SiteReport
from .specialise import SpecialisedGraph, is_dynamic

log = logging.getLogger("rewrite")


class RewrittenGraph:
    """A Dynamo graph, rewritten lazily on its first call (with real inputs in hand)."""

    def __init__(self, gm: GraphModule, backend: str, verify: bool, report: Report | None,
                 options: Options | None = None):
        self.gm = gm
        self.options = options  # Inductor around the rewrite (rewrite/inductor.py); None: plain fx
        self.per_size = False  # rewritten per size signature (a dynamic graph)
        self.backend = backend
        self.verify = verify
        self.report = report
        self.graph_index = report.graphs if report is not None else 0
        if report is not None:
            report.graphs += 1
        self.run = None
        self.skip_reported = False
        self.lower = functools.partial(to_aten, gm)  # args → the functional ATen graph at their sizes

    def __call__(self, *args):
        if self.run is None:
            self.run = self._first_build(args)
        return self.run(*args)

    def _first_build(self, args):
        if is_dynamic(self.gm):
            # Symbolic sizes: rewritten per concrete size signature (rewrite/specialise.py), each
            # size traced from one symbolic ATen graph where that trace assumed nothing.
            symbolic = to_symbolic_aten(self.gm)
            if symbolic is not None:
                self.lower = functools.partial(specialised, symbolic)
            log.info("rewrite: graph %d has symbolic sizes: rewritten per size, each %s", self.graph_index,
                     "evaluated from its symbolic ATen graph" if symbolic is not None else "lowered on its own")
            self.per_size = True
            return SpecialisedGraph(self.graph_index, self._build, self.report, self._compile_hot)
        run, sites, _ = self._build(args)
        if self.report is not None:
            self.report.sites.extend(sites)
        return run

    def _build(self, args):
        """The callable running the rewritten graph for these inputs' sizes, its site reports, and the
        rewritten graph where Inductor would compile it once the size recurs (else None)."""
        from rewrite.passes.pipeline import rewrite_graph

        log.debug("graph %d: %d fx nodes, lowered for sizes %s", self.graph_index, len(self.gm.graph.nodes),
                  [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)])
        try:
            aten_gm = self.lower(args)
        except CaptureError as exc:  # a graph that cannot be lowered is left exactly as it was
            self._skip(str(exc))
            return self.gm.forward, [], None
        original = GraphModule(aten_gm, copy.deepcopy(aten_gm.graph)) if self.verify else None
        try:
            new_gm, sites = rewrite_graph(aten_gm, self.backend, args,
                                          count_calls=self.options is not None and self.options.count_calls)
        except Exception as exc:  # a bug of ours must never break the user's model: run it as it was
            log.warning("rewrite: graph %d left alone after an internal error: %r", self.graph_index, exc)
            self._skip(f"internal error while rewriting ({type(exc).__name__}: {str(exc)[:160]}); "
                       "the graph runs unchanged. Please report this model.")
            return self.gm.forward, [], None
        for s in sites:
            s.graph = self.graph_index
        if self.verify and any(s.rewritten for s in sites):
            _verify(original, new_gm, sites, args)
        run = compile_rest(new_gm, args, self.options, self.report, self.graph_index, self.per_size)
        later = (self.per_size and self.options is not None and not inductor_on(self.options, args, True, new_gm)[0]
                 and inductor_on(self.options, args, True, new_gm, hot=True)[0])
        return run, sites, new_gm if later else None

    def _compile_hot(self, gm: GraphModule, args):
        """A size of a per-size graph that recurs: the rest of its rewritten graph compiled by Inductor."""
        return compile_rest(gm, args, self.options, self.report, self.graph_index, per_size=True, hot=True)

    def _skip(self, why: str) -> None:
        log.info("graph %d left alone: %s", self.graph_index, why)
        if self.report is not None and not self.skip_reported:  # once per graph, not once per size
            self.skip_reported = True
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
        return RewrittenGraph(gm, options.backend, options.verify, report, options)

    return compiler


def rewrite_backend(gm: GraphModule, example_inputs, mode: str | None = None, options: dict | None = None):
    """``torch.compile(model, backend="rewrite", options={...})`` (registered as an entry point).
    torch.compile hands ``mode`` and ``options`` over as keywords; both are validated here: a mode
    is Inductor's (it compiles the rest of the rewritten graph), options are ours or Inductor's config."""
    where = 'torch.compile(..., backend="rewrite")'
    options = dict(options or {})
    if mode not in (None, "default"):
        options["mode"] = mode  # torch.compile refuses mode and options together: no clash here
    return make_backend(Options.from_mapping(options, where))(gm, example_inputs)
