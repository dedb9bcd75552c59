"""A simulation's results: one point per (site, sequence length, mapping); table, dict, plot."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .cost import Cost


@dataclass(frozen=True)
class SimPoint:
    site: str
    seq_len: int | None
    mapping: str
    cost: Cost
    speedup: float | None = None        # baseline cycles-time ÷ this mapping's
    energy_ratio: float | None = None   # this mapping's energy ÷ the baseline's

    @property
    def cycles(self) -> float:
        return self.cost.cycles

    def to_dict(self) -> dict[str, Any]:
        c = self.cost
        return {"site": self.site, "seq_len": self.seq_len, "mapping": self.mapping, "arch": c.arch,
                "cycles": c.cycles, "seconds": c.seconds, "bound": c.bound, "util_2d": c.util_2d,
                "util_1d": c.util_1d, "dram_bytes": c.dram_bytes, "buffer_bytes": c.buffer_bytes,
                "energy_pj": c.energy_pj, "buffer_required_bytes": c.buffer_required_bytes,
                "passes": c.passes, "tile_p": c.tile_p, "spill_fraction": c.spill_fraction,
                "speedup": self.speedup, "energy_ratio": self.energy_ratio,
                "stage_cycles": dict(c.stage_cycles), "energy_breakdown_pj": dict(c.energy_breakdown_pj),
                "einsums": [asdict(e) for e in c.einsums], "notes": list(c.notes)}


def breakdown_table(pt: SimPoint):
    """Per Einsum (array, pass, dataflow, cycles, fill/drain) and per pipeline stage."""
    from rich.table import Table

    c = pt.cost
    t = Table(title=f"{pt.site} · {_fmt_len(pt.seq_len)} · {pt.mapping} on {c.arch}: {_fmt(c.cycles)} cycles, "
                    f"{c.bound}-bound" + (f" ({'; '.join(c.notes)})" if c.notes else ""))
    for col in ("Einsum", "array", "pass", "dataflow", "points", "PE cycles of work", "cycles",
                "fill+drain", "share of latency"):
        t.add_column(col, justify="left" if col in ("Einsum", "array", "dataflow") else "right")
    for e in c.einsums:
        t.add_row(e.einsum, e.array, str(e.pass_index), e.dataflow or "-", _fmt(e.points), _fmt(e.ops),
                  _fmt(e.cycles), _fmt(e.fill_drain), f"{e.cycles / c.cycles:.3f}" if c.cycles else "-")
    for stage, cyc in c.stage_cycles.items():
        t.add_row(f"stage: {stage}", "", "", "", "", "", _fmt(cyc), "",
                  f"{cyc / c.cycles:.3f}" if c.cycles else "-")
    return t


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def _fmt_len(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


@dataclass
class SimulationResult:
    points: list[SimPoint]
    baseline: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # ---- access ------------------------------------------------------------------------
    @property
    def cycles(self) -> float:
        """Cycles of the single simulated point (a GEMM, one cascade at one size)."""
        if len(self.points) != 1:
            raise ValueError(f"{len(self.points)} points were simulated; pick one with .point(...)")
        return self.points[0].cycles

    def point(self, mapping: str | None = None, seq_len: int | None = None, site: str | None = None
              ) -> SimPoint:
        hits = [pt for pt in self.points if (mapping is None or pt.mapping == mapping)
                and (seq_len is None or pt.seq_len == seq_len) and (site is None or pt.site == site)]
        if len(hits) != 1:
            raise KeyError(f"{len(hits)} points match mapping={mapping} seq_len={seq_len} site={site}")
        return hits[0]

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "meta": self.meta, "points": [p.to_dict() for p in self.points]}

    # ---- presentation ------------------------------------------------------------------
    def table(self):
        from rich.table import Table

        t = Table(title=f"spatial-array simulation (speedup and energy vs {self.baseline})")
        for col in ("site", "seq", "mapping", "arch", "time (s)", "cycles", "bound", "util 2-D",
                    "util 1-D", "DRAM (B)", "energy (J)", "buffer need (B)", "speedup", "energy ×"):
            t.add_column(col, justify="left" if col in ("site", "mapping", "arch", "bound") else "right")
        for pt in self.points:
            c = pt.cost
            t.add_row(pt.site, _fmt_len(pt.seq_len), pt.mapping, c.arch, _fmt(c.seconds), _fmt(c.cycles),
                      c.bound, f"{c.util_2d:.3f}", f"{c.util_1d:.3f}", _fmt(c.dram_bytes),
                      _fmt(c.energy_pj * 1e-12), _fmt(c.buffer_required_bytes),
                      "-" if pt.speedup is None else f"{pt.speedup:.2f}×",
                      "-" if pt.energy_ratio is None else f"{pt.energy_ratio:.3f}")
        return t

    def __str__(self) -> str:
        import io

        from rich.console import Console

        buf = io.StringIO()
        Console(file=buf, width=200, force_terminal=False).print(self.table())
        return buf.getvalue()

    def plot(self, path: str | None = None):
        """Speedup over the baseline and 2-D utilisation against sequence length."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, (ax_s, ax_u) = plt.subplots(1, 2, figsize=(11, 4.2))
        keys = sorted({(pt.site, pt.mapping) for pt in self.points})
        for site, mapping in keys:
            pts = sorted((pt for pt in self.points if pt.site == site and pt.mapping == mapping
                          and pt.seq_len is not None), key=lambda pt: pt.seq_len)
            if not pts:
                continue
            xs = [pt.seq_len for pt in pts]
            label = mapping if len({s for s, _ in keys}) == 1 else f"{site}: {mapping}"
            if all(pt.speedup is not None for pt in pts):
                ax_s.plot(xs, [pt.speedup for pt in pts], marker="o", label=label)
            ax_u.plot(xs, [pt.cost.util_2d for pt in pts], marker="o", label=label)
        for ax, title in ((ax_s, f"speedup over {self.baseline}"), (ax_u, "2-D array utilisation")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length (tokens)")
            ax.set_title(title)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        ax_u.set_ylim(0, 1.05)
        fig.tight_layout()
        if path:
            fig.savefig(path, dpi=120)
        return fig
