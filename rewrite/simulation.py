"""``rewrite.simulate``: map the attention a model contains (or a cascade, or a workload given
by shape) onto spatial accelerators and predict cycles, utilisation, traffic and energy.

    sim = rewrite.simulate("bert", seq_lens=[1024, 2**20])          # FuseMax's BERT workload
    sim = rewrite.simulate(model, x, seq_lens=[4096, 65536])        # what inspect finds in model
    sim = rewrite.simulate(Cascade.gemm(256, 128, 512), array=(32, 32), dataflow="ws")
    print(sim); sim.plot("speedup.png"); sim.to_dict()
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

from .codegen.spatial.arch import Architecture, load_architecture
from .codegen.spatial.cost import evaluate
from .codegen.spatial.mapper import MAPPING_KINDS, map_cascade
from .codegen.spatial.result import SimPoint, SimulationResult, breakdown_table
from .codegen.spatial.work import MappingError
from .codegen.spatial.workloads import Workload, workload
from .ir.cascade import Cascade

log = logging.getLogger("rewrite")

FUSEMAX_SEQ_LENS = (2**10, 2**12, 2**14, 2**16, 2**18, 2**20)
# Each mapping on the accelerator it was designed for, as FuseMax's evaluation compares them.
DEFAULT_ARCH = {"unfused": "flat_cloud", "flat": "flat_cloud", "fusemax": "fusemax_cloud",
                "sparse": "fusemax_cloud"}
PROGRESS_THRESHOLD = 24  # points; longer sweeps show a progress bar


def _arch_for(arch: Any, mapping: str, array: tuple[int, int] | None) -> Architecture:
    """``arch`` may name one architecture for every mapping or be {mapping: architecture}."""
    per_mapping = isinstance(arch, dict) and set(arch) <= set(MAPPING_KINDS)
    if per_mapping:
        spec = arch.get(mapping, DEFAULT_ARCH[mapping])
    else:
        spec = DEFAULT_ARCH[mapping] if arch is None else arch
    a = load_architecture(spec)
    return a.with_array(*array) if array else a


def _density(cascade: Cascade, reported: float) -> float | None:
    """None (the mapper measures the mask's tiles at each size) when the cascade carries a
    mask; else the density reported for the site (a run-time block map), if below 1."""
    if any(e.mask is not None for e in cascade.einsums):
        return None
    return reported if reported < 1.0 else None


def _sites(target: Any, args: tuple) -> list[tuple[str, Cascade, float | None]]:
    """(name, sized cascade, density or None) for each attention site of the target."""
    if isinstance(target, Cascade):
        return [(target.name, target, _density(target, 1.0))]
    if isinstance(target, (str, Workload)):
        w = workload(target) if isinstance(target, str) else target
        c = w.cascade(1024)
        return [(w.name, c, _density(c, w.density))]
    if callable(target):
        from . import inspect

        report = inspect(target, *args)
        # Identical sites (every layer of a stack) are simulated once, named with their count.
        groups: dict[tuple, list[int]] = {}
        found = {}
        for i, s in enumerate(report.sites):
            if s.cascade_ir is None:
                continue
            key = (str(s.cascade_ir), tuple(sorted(s.cascade_ir.rank_sizes.items())), s.variant, s.density)
            groups.setdefault(key, []).append(i)
            found.setdefault(key, s)
        if not groups:
            raise MappingError("inspect found no attention site with a cascade to simulate in "
                               f"{type(target).__name__}; nothing to map")
        sites = []
        for key, idx in groups.items():
            s = found[key]
            name = f"site {idx[0]} ({s.variant})" if len(idx) == 1 else \
                f"{len(idx)}× sites {idx[0]}…{idx[-1]} ({s.variant})"
            sites.append((name, s.cascade_ir, _density(s.cascade_ir, float(s.density))))
        return sites
    raise TypeError(f"simulate() takes a model, a function, a Cascade or a workload name, "
                    f"not {type(target).__name__}")


def _resize(cascade: Cascade, seq_len: int | None) -> Cascade:
    """The site at another sequence length. Self-attention (as many queries as keys) gets
    ``seq_len`` of both; any other site (decoding, cross-attention) keeps its queries and
    gets ``seq_len`` keys."""
    sizes = cascade.rank_sizes
    if seq_len is None or "p" not in sizes:
        return cascade
    P, M = int(sizes["p"]), int(sizes.get("m", sizes["p"]))
    return cascade.with_sizes(p=seq_len, m=seq_len) if P == M else cascade.with_sizes(m=seq_len)


def simulate(target: Any = "bert", *args: Any, arch: Any = None,
             mappings: Sequence[str] | None = None, seq_lens: Iterable[int] | None = None,
             baseline: str | None = None, dataflow: str | None = None, density: float | None = None,
             array: tuple[int, int] | None = None, progress: bool | None = None) -> SimulationResult:
    """Simulate attention (or any cascade) on spatial accelerators.

    target: an ``nn.Module`` or function (run through ``rewrite.inspect`` with ``*args``),
        a sized ``Cascade`` (``Cascade.gemm(M, N, K)`` for a GEMM), or a workload name
        ("bert", "trxl", "t5", "xlm", "gpt2") or ``Workload``.
    arch: a preset name, YAML/JSON path, dict or ``Architecture`` for every mapping, or a dict
        {mapping: arch}; default: unfused and flat on ``flat_cloud``, fusemax and sparse on
        ``fusemax_cloud``.
    mappings: any of "unfused", "flat", "fusemax", "sparse" (default: the first three; a cascade
        without query/key ranks, e.g. a GEMM, defaults to "unfused").
    seq_lens: sequence lengths to sweep (default: the site's own length; FuseMax's 1K…1M for
        a named workload). Self-attention sites get that many queries and keys; other sites
        (decoding, cross-attention) keep their queries and get that many keys.
    baseline: the mapping speedups and energy ratios are relative to (default: "flat" when
        simulated, else the first mapping).
    dataflow: force "os", "ws" or "is" for every contraction (default: the fastest per Einsum).
    density: kept fraction of score tiles for the sparse mapping (default: measured from the
        site's mask at each size, or the density inspect reports for a run-time block map).
    array: (rows, cols) of the 2-D array, overriding the architecture's.
    """
    sites = _sites(target, args)
    has_seq = all("p" in c.rank_sizes for _, c, _ in sites)
    if mappings is None:
        mappings = ["unfused", "flat", "fusemax"] if has_seq else ["unfused"]
    mappings = list(mappings)
    for mname in mappings:
        if mname not in MAPPING_KINDS:
            raise MappingError(f"unknown mapping {mname!r}; use any of {MAPPING_KINDS}")
    if seq_lens is None:
        seq_lens = FUSEMAX_SEQ_LENS if isinstance(target, (str, Workload)) else [None]
    seq_lens = [None if s is None else int(s) for s in seq_lens] if has_seq else [None]
    if baseline is None:
        baseline = "flat" if "flat" in mappings else mappings[0]
    if baseline not in mappings:
        raise MappingError(f"baseline {baseline!r} is not among the simulated mappings {mappings}")
    archs = {mname: _arch_for(arch, mname, array) for mname in mappings}
    jobs = [(name, c, d, L) for name, c, d in sites for L in seq_lens]
    show = progress if progress is not None else len(jobs) * len(mappings) > PROGRESS_THRESHOLD
    points: list[SimPoint] = []
    with _progress(show, len(jobs)) as advance:
        for name, cascade, site_density, L in jobs:
            sized = _resize(cascade, L)
            dens = density if density is not None else site_density
            costs = {mname: evaluate(map_cascade(sized, archs[mname], mname, density=dens, dataflow=dataflow))
                     for mname in mappings}
            log.debug("simulated %s at %s: %s", name, L,
                      {k: f"{c.cycles:.4g} cycles ({c.bound})" for k, c in costs.items()})
            base = costs.get(baseline)
            for mname, c in costs.items():
                points.append(SimPoint(
                    site=name, seq_len=L if L is not None else sized.rank_sizes.get("p"), mapping=mname,
                    cost=c, speedup=base.seconds / c.seconds if base and c.seconds else None,
                    energy_ratio=c.energy_pj / base.energy_pj if base and base.energy_pj else None))
            advance()
    meta = {"archs": {k: a.to_dict() for k, a in archs.items()}, "mappings": mappings,
            "seq_lens": seq_lens, "dataflow": dataflow}
    return SimulationResult(points=points, baseline=baseline, meta=meta)


class _progress:
    """A rich progress bar over the sweep (a no-op context when not shown)."""

    def __init__(self, show: bool, total: int) -> None:
        self.show, self.total, self.bar = show, total, None

    def __enter__(self):
        if not self.show:
            return lambda: None
        from rich.progress import Progress

        self.bar = Progress(transient=True)
        self.bar.start()
        task = self.bar.add_task("simulating", total=self.total)
        return lambda: self.bar.advance(task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


# ---- command line ----------------------------------------------------------------------------
def _parse_len(text: str) -> int:
    t = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20}.get(t[-1:], 1)
    return int(t[:-1] if scale > 1 else t) * scale


def cli_main(argv: list[str]) -> int:
    """``python -m rewrite simulate ...``: argv is what follows ``simulate``."""
    ap = argparse.ArgumentParser(prog="python -m rewrite simulate",
                                 description="map attention onto spatial accelerators and report speedups")
    ap.add_argument("target", nargs="?", default="bert",
                    help="workload name (bert, trxl, t5, xlm, gpt2), gemm:M,N,K, or FILE.py:NAME")
    ap.add_argument("--seq-lens", default=None, help="comma list, e.g. 1K,4K,64K,1M")
    ap.add_argument("--mappings", default=None, help=f"comma list of {', '.join(MAPPING_KINDS)}")
    ap.add_argument("--arch", default=None, help="preset name or YAML/JSON file for every mapping")
    ap.add_argument("--array", default=None, help="2-D array size ROWSxCOLS")
    ap.add_argument("--dataflow", default=None, choices=["os", "ws", "is"])
    ap.add_argument("--density", type=float, default=None)
    ap.add_argument("--baseline", default=None)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--breakdown", action="store_true",
                    help="also print cycles per Einsum and per pipeline stage for every point")
    ap.add_argument("--plot", default=None, help="save the speedup/utilisation plot to this file")
    a = ap.parse_args(argv)
    args: tuple = ()
    if a.target.startswith("gemm:"):
        M, N, K = (int(x) for x in a.target[5:].split(","))
        target: Any = Cascade.gemm(M, N, K)
    elif ":" in a.target and a.target.split(":")[0].endswith(".py"):
        from .__main__ import load_callable

        target, inputs = load_callable(a.target)
        args = tuple(inputs)
    else:
        target = a.target
    try:
        sim = simulate(
            target, *args, arch=a.arch,
            mappings=a.mappings.split(",") if a.mappings else None,
            seq_lens=[_parse_len(s) for s in a.seq_lens.split(",")] if a.seq_lens else None,
            baseline=a.baseline, dataflow=a.dataflow, density=a.density,
            array=tuple(int(x) for x in a.array.lower().split("x")) if a.array else None)
    except (MappingError, ValueError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps(sim.to_dict(), indent=2, default=str) if a.json else sim)
    if a.breakdown and not a.json:
        from rich.console import Console

        console = Console(width=200)
        for pt in sim.points:
            console.print(breakdown_table(pt))
    if a.plot:
        sim.plot(a.plot)
        print(f"plot saved to {a.plot}")
    return 0
