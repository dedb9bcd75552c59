"""Dynamic Dynamo graphs (symbolic sizes) run rewritten, specialised per concrete size signature.

Dynamo hands over a graph with SymInt sizes after a second distinct length (automatic dynamic),
under ``dynamic=True`` or for ``mark_dynamic`` inputs. The recognisers and proofs read concrete
sizes (a window that covers every key at small N is dense there and banded at large N), so such a
graph is lowered and rewritten per signature of its call (every input tensor's shape and strides,
every non-tensor input), once, and the rewritten graph is cached by that signature (bounded, least
recently used first out). Dynamo compiles the dynamic graph once; a new length costs one lowering
here, not a recompile, and never runs unrewritten.

Every specialisation is logged (logger "rewrite") and shown on its sites in the report: one entry
per site location and plan (not per size), with a note of the sizes it was specialised for.
"""

from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rewrite.codegen import counters

from .inductor import HOT_CALLS

log = logging.getLogger("rewrite")
CACHE_SIZE = 64  # rewritten specialisations kept per dynamic graph
MANY_SIZES = 8  # after this many sizes of one graph, say what each new size costs and what avoids it
_SHOWN_SIZES = 8  # sizes a site's note lists before "…"
NOTE_PREFIX = "dynamic graph: "


def is_dynamic(gm: torch.fx.GraphModule) -> bool:
    """Does any input of the Dynamo graph have a symbolic size (or is a symbolic int)?"""
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        ev = node.meta.get("example_value")
        if isinstance(ev, torch.SymInt):
            return True
        if isinstance(ev, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in ev.shape):
            return True
    return False


def signature(args) -> tuple:
    """What a specialisation depends on: shapes and strides of the tensors, values of the rest."""
    return tuple((a.shape, a.stride()) if isinstance(a, torch.Tensor) else a for a in args)


@dataclass
class Specialisation:
    """One size signature's rewritten graph: how it runs, the graph to hand Inductor once the size
    recurs (None: nothing to do then), and how many times it has run."""

    run: Callable
    later: object = None
    calls: int = 0


class SpecialisedGraph:
    """Runs a dynamic graph through ``build(args) -> (run, site reports, graph or None)`` (lower +
    rewrite for these concrete inputs), once per signature, from an LRU cache of ``CACHE_SIZE``
    rewritten graphs. A signature whose build returned a graph is recompiled by ``compile_hot(graph,
    args)`` on its ``HOT_CALLS``-th call (Inductor for a size that recurs, rewrite/inductor.py).
    ``report`` (or None) gets one entry per site location and plan, noted with its sizes."""

    def __init__(self, graph_index: int, build: Callable, report=None, compile_hot: Callable | None = None):
        self.graph_index = graph_index
        self.build = build
        self.report = report
        self.compile_hot = compile_hot
        self.cache: OrderedDict[tuple, Specialisation] = OrderedDict()
        self.built = 0
        self.evicted = 0
        self.build_s = 0.0  # time spent lowering and rewriting sizes
        self.entries: list = []  # this graph's entries in the report
        self.entry_sizes: dict[int, list[str]] = {}  # id(entry) → the sizes it was specialised for

    def __call__(self, *args):
        key = signature(args)
        entry = self.cache.get(key)
        if entry is None:
            entry = self._specialise(key, args)
        else:
            self.cache.move_to_end(key)
        entry.calls += 1
        if entry.calls == HOT_CALLS and entry.later is not None and self.compile_hot is not None:
            log.info("rewrite: dynamic graph %d: size %s has run %d times: the rest of its graph goes to Inductor",
                     self.graph_index, sizes_text(args), HOT_CALLS)
            entry.run, entry.later = self.compile_hot(entry.later, args), None
        return entry.run(*args)

    def _specialise(self, key: tuple, args) -> Specialisation:
        start = time.perf_counter()
        run, sites, later = self.build(args)
        self.build_s += time.perf_counter() - start
        self.built += 1
        if self.built == MANY_SIZES:
            self._say_many_sizes()
        entry = self.cache[key] = Specialisation(run, later)
        if len(self.cache) > CACHE_SIZE:
            self.cache.popitem(last=False)
            self.evicted += 1
            # Warned once per graph (a long generate() would say it at every step); counted in the notes.
            log.log(logging.WARNING if self.evicted == 1 else logging.DEBUG,
                    "rewrite: dynamic graph %d: more than %d size signatures; the least recently used "
                    "specialisation was dropped (%d so far) and is rewritten again when called",
                    self.graph_index, CACHE_SIZE, self.evicted)
        log.info("rewrite: dynamic graph %d specialised for input sizes %s: %d site(s), %d rewritten "
                 "(%s)", self.graph_index, sizes_text(args), len(sites), sum(s.rewritten for s in sites),
                 self.status())
        self._merge(sites)
        return entry

    def _say_many_sizes(self) -> None:
        """Once per graph: a new size is a new lowering and rewrite (plans are per size, not symbolic)."""
        note = (f"graph {self.graph_index}: dynamic: {self.built} sizes rewritten so far, "
                f"{1e3 * self.build_s / self.built:.0f} ms each on average (a new size is lowered and rewritten "
                "again: plans are per size). For Hugging Face generate(), cache_implementation='static' keeps "
                "decode at one size (one graph for prefill, one for decode)")
        log.warning("rewrite: %s", note)
        if self.report is not None and note not in self.report.notes:
            self.report.notes.append(note)

    def status(self) -> str:
        text = f"{len(self.cache)} cached, {self.built} built"
        if self.evicted:
            text += f", {self.evicted} dropped (cache of {CACHE_SIZE} full: a dropped size is rewritten again)"
        return text

    def _merge(self, sites: list) -> None:
        """A site whose location and plan already have an entry adds its sizes there and counts its
        calls there (the report does not grow with the number of sizes); a new plan gets its own."""
        for site in sites:
            same = next((e for e in self.entries if _plan_key(e) == _plan_key(site)), None)
            if same is None:
                self.entries.append(site)
                self.entry_sizes[id(site)] = []
                if self.report is not None:
                    self.report.sites.append(site)
                same = site
            elif site.site_id and same.site_id:
                counters.alias(site.site_id, same.site_id)
            sizes = self.entry_sizes[id(same)]
            size = f"(n={site.shapes.get('n', '?')}, m={site.shapes.get('m', '?')})"
            if size not in sizes:
                sizes.append(size)
        for entry in self.entries:
            sizes = self.entry_sizes[id(entry)]
            shown = ", ".join(sizes[:_SHOWN_SIZES]) + (f", … ({len(sizes)} in all)" if len(sizes) > _SHOWN_SIZES
                                                       else "")
            note = (f"{NOTE_PREFIX}specialised for sizes {shown} (shapes and mask above: the first); "
                    f"{self.status()}")
            i = next((i for i, n in enumerate(entry.notes) if n.startswith(NOTE_PREFIX)), None)
            if i is None:
                entry.notes.append(note)
            else:
                entry.notes[i] = note


def sizes_text(args) -> str:
    return ", ".join("×".join(map(str, a.shape)) if isinstance(a, torch.Tensor) else repr(a)
                     for a in args if isinstance(a, (torch.Tensor, int)))


def _plan_key(site) -> tuple:
    """A site's location and plan, sizes left out (a window's grid, a density, a reason's numbers)."""
    def sizeless(text):
        return re.sub(r"\d+(\.\d+)?", "#", text) if text else text

    return (site.location, site.variant, site.rewritten, site.kernel, sizeless(site.reason),
            sizeless(site.mask), sizeless(site.proof))
