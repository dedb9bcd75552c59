"""What was found, what it proves, what runs: one entry per attention site."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .ir.cascade import Cascade


@dataclass
class SiteReport:
    variant: str
    location: str
    spelling: str
    rewritten: bool
    reason: str | None = None
    kernel: str | None = None
    cascade: str = ""
    rewritten_cascade: str = ""
    mask: str = "none"
    proof: str = ""  # how the mask's structure was proven (MaskSpec.proof); "" when it was not
    shapes: dict[str, Any] = field(default_factory=dict)
    flops: int = 0
    density: float = 1.0
    ideal_speedup: float | None = None  # dense time × kept fraction, as a speedup (GNA's speed of light)
    pass_count: dict[str, int] = field(default_factory=dict)
    gqa: bool = False
    notes: list[str] = field(default_factory=list)
    graph: int = 0  # which captured graph (graph breaks make several)
    complexity: str = ""  # e.g. "O(N²·D) → O(N·D²)" for the linear-time families
    cascade_ir: Cascade | None = field(default=None, repr=False, compare=False)
    mask_spec: Any = field(default=None, repr=False, compare=False)  # passes.masks.MaskSpec the kernel runs
    site_id: str = ""  # the site's name in the run-time kernel counters
    score_mod: str = ""  # the inferred score modifier s' = f(s, L…), "" when there is none
    direct: bool = False  # runs as a direct aten SDPA call in the graph: no op, no counts (passes/direct.py)
    kernel_source: str = ""  # generated kernel code (the score modifier's Triton function) and where it lives

    @property
    def ran(self) -> dict[str, int]:
        """Calls of this site so far by what really ran (the planned kernel, or what a run-time check
        chose instead: codegen/counters.py), e.g. {"sdpa": 3, "eager spelling (inputs not finite, …)": 1}."""
        from .codegen.counters import counts

        return counts(self.site_id) if self.site_id else {}

    @property
    def window(self) -> dict[str, Any] | None:
        """The neighborhood in NATTEN's terms (kernel_size, dilation, causal, edges, grid); None
        without a window. ``.mask`` keeps the IR's half-widths."""
        from .window_terms import window_terms

        return window_terms(self.mask_spec)

    @property
    def mask_text(self) -> str:
        """The mask as the report prints it: a window in NATTEN's terms, other masks as ``.mask``."""
        from .window_terms import window_text

        return window_text(self.mask_spec) or self.mask

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cascade_ir", None)
        d.pop("mask_spec", None)
        d["ran"] = self.ran
        d["window"] = self.window
        return d


@dataclass
class Report:
    sites: list[SiteReport] = field(default_factory=list)
    graphs: int = 0
    skipped_graphs: list[str] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)  # Dynamo's reasons ("×n"), from rewrite.inspect
    notes: list[str] = field(default_factory=list)  # per graph: what compiled the rest of it (rewrite/inductor.py)
    break_points: list[str] = field(default_factory=list)  # where Dynamo resumed after a break (rewrite.explain)
    recompiles: list[str] = field(default_factory=list)  # Dynamo's recompile reasons (rewrite.explain)

    @property
    def rewritten(self) -> list[SiteReport]:
        return [s for s in self.sites if s.rewritten]

    def to_dict(self) -> dict[str, Any]:
        return {"graphs": self.graphs, "skipped_graphs": list(self.skipped_graphs),
                "graph_breaks": list(self.graph_breaks), "break_points": list(self.break_points),
                "recompiles": list(self.recompiles), "notes": list(self.notes),
                "sites": [s.to_dict() for s in self.sites]}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def table(self, compact: bool = False):
        """Every site as a row; ``compact`` keeps the columns that fit a terminal (#, variant,
        location, mask, kernel / reason)."""
        from rich.table import Table

        t = Table(title=f"rewrite: {len(self.sites)} attention site(s) in {self.graphs} graph(s)")
        cols = ("#", "variant", "location", "spelling", "mask", "shape (B·H, N, M, E, F)", "GFLOP",
                "passes", "kernel / reason")
        for col in cols:
            t.add_column(col, overflow="fold")
        for i, s in enumerate(self.sites):
            sh = s.shapes
            shape = f"{sh.get('batch')}, {sh.get('n')}, {sh.get('m')}, {sh.get('e')}, {sh.get('f')}"
            passes = f"{s.pass_count.get('original', '?')} → {s.pass_count.get('rewritten', '?')}"
            mask = s.mask_text + (f" [{s.proof}]" if s.proof else "")
            t.add_row(str(i), s.variant, s.location, s.spelling, mask, shape, f"{s.flops / 1e9:.3g}",
                      passes, s.kernel if s.rewritten else f"left alone: {s.reason}")
        if compact:
            for name in ("spelling", "shape (B·H, N, M, E, F)", "GFLOP", "passes"):
                t.columns.pop(cols.index(name) - (len(cols) - len(t.columns)))
        return t

    def __str__(self) -> str:
        """The summary (one line per group of sites), the table, and each site's details when there
        are at most ``DETAILED`` sites; ``details()`` always prints them."""
        return self.render(details=len(self.sites) <= self.DETAILED)

    DETAILED = 3

    def details(self) -> str:
        return self.render(details=True)

    def _repr_html_(self) -> str:
        return self.render(details=len(self.sites) <= self.DETAILED, html=True)

    def render(self, details: bool, html: bool = False, width: int | None = None) -> str:
        from rich.console import Console

        from .report_summary import summary_lines, terminal_width

        console = Console(width=width or terminal_width(), record=True, file=_Null(), highlight=False)
        for line in summary_lines(self):
            console.print(line, markup=False)
        if self.sites:
            console.print(self.table(compact=not details))
        if not details:
            console.print("(report.details() prints each site's cascade, proof, notes and what ran)", markup=False)
        else:
            self._print_details(console)
        for g in self.skipped_graphs:
            console.print(f"graph left alone: {g}", markup=False)
        for n in self.notes:
            console.print(f"note: {n}", markup=False)
        for g in self.graph_breaks:
            console.print(f"graph break (an attention split across graphs is not seen whole): {g}", markup=False)
        for g in self.break_points:
            console.print(f"  Dynamo resumed after a break in {g}", markup=False)
        for g in self.recompiles:
            console.print(f"recompiled: {g}", markup=False)
        if html:  # a fragment for a notebook cell, not a whole page
            return console.export_html(inline_styles=True, code_format='<pre style="line-height: 1.2">{code}</pre>')
        return console.export_text()

    def _print_details(self, console) -> None:
        for i, s in enumerate(self.sites):
            console.print(f"[bold]site {i}[/bold] ({s.variant}) at {s.location}")
            console.print("  cascade:\n    " + s.cascade.replace("\n", "\n    "), markup=False)
            if s.rewritten_cascade and s.variant in ("linear", "flow"):
                console.print(f"  runs as the {s.pass_count.get('rewritten')}-pass cascade in kernel {s.kernel}:"
                              "\n    " + s.rewritten_cascade.replace("\n", "\n    "), markup=False)
            elif s.rewritten_cascade:
                console.print(f"  runs as the {s.pass_count.get('rewritten')}-pass cascade "
                              f"(online softmax) in kernel {s.kernel}", markup=False)
            if s.variant in ("neighborhood", "block_sparse", "causal") and s.ideal_speedup:
                console.print(f"  mask: {s.mask_text}; kept {s.density:.4g} of the scores, ideal speedup over dense "
                              f"{s.ideal_speedup:.3g}× (dense time × kept fraction)", markup=False)
            if s.mask != "none" and s.variant not in ("linear", "flow"):
                proof = s.proof or "none (structure not proven: the mask is applied as the graph computes it)"
                console.print(f"  mask proof: {proof}", markup=False)
            if s.complexity:
                console.print(f"  complexity: {s.complexity}", markup=False)
            if not s.rewritten and s.reason and s.variant in ("linear", "flow"):
                console.print(f"  left alone: {s.reason}", markup=False)
            for n in s.notes:
                console.print(f"  note: {n}", markup=False)
            if s.ran:
                ran = ", ".join(f"{path} ×{c}" for path, c in s.ran.items())
                console.print(f"  ran (calls so far): {ran}", markup=False)

    def __repr__(self) -> str:
        return f"Report({len(self.sites)} sites, {len(self.rewritten)} rewritten)"


class _Null:
    def write(self, *_):
        return 0

    def flush(self):
        pass
