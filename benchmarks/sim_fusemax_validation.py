"""Validate the spatial simulator against FuseMax's published results and SCALE-Sim.

    /tmp/venv/bin/python benchmarks/sim_fusemax_validation.py

Writes benchmarks/results/sim_fusemax_validation.{md,csv} (per model and sequence length:
FuseMax/FLAT speedup, energy ratio, 2-D utilisation of each, published vs ours) and
benchmarks/results/sim_scalesim_validation.csv (GEMM cycles vs SCALE-Sim 3.0.0).
"""

from __future__ import annotations

import csv
import datetime
import platform
from dataclasses import replace
from pathlib import Path

from rewrite.codegen.spatial import evaluate, load_architecture, map_cascade, workload
from rewrite.codegen.spatial.systolic import GemmShape, systolic_cycles
from rewrite.codegen.spatial.validation import METRICS, compare_fusemax, compare_unfused

HERE = Path(__file__).parent
GOAL = 0.25


def fusemax() -> list:
    rows = compare_fusemax(HERE / "reference" / "fusemax")
    out = HERE / "results"
    out.mkdir(exist_ok=True)
    with open(out / "sim_fusemax_validation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "seq_len", "metric", "published", "ours", "rel_error"])
        for r in rows:
            w.writerow([r.model, r.seq_len, r.metric, f"{r.published:.6g}", f"{r.ours:.6g}",
                        f"{r.rel_error:+.4f}"])
    return rows


def scalesim() -> float:
    ref = HERE / "reference" / "scalesim_gemm.csv"
    with open(ref) as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    worst = 0.0
    with open(HERE / "results" / "sim_scalesim_validation.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["M", "N", "K", "rows", "cols", "dataflow", "scalesim_cycles", "our_cycles", "rel_error"])
        for r in rows:
            ours = systolic_cycles(GemmShape(1, int(r["M"]), int(r["N"]), int(r["K"])), int(r["rows"]),
                                   int(r["cols"]), r["dataflow"]).cycles
            err = (ours - int(r["cycles"])) / int(r["cycles"])
            worst = max(worst, abs(err))
            w.writerow([r["M"], r["N"], r["K"], r["rows"], r["cols"], r["dataflow"], r["cycles"],
                        int(ours), f"{err:+.5f}"])
    return worst


EXPLANATION = """
## Where and why we differ

* **Speedup and FuseMax's utilisation** follow from op counts that both models share:
  FuseMax's 2-D array does E + F MACs plus 9 ops (max, exp(x − y) as 6 MACs + 1 add, sum)
  per score, its 1-D array 2F + 10 ops per (query, 256-key tile) plus F divisions per query,
  and the two are pipelined, so latency is the larger (the 1-D array at these shapes). Our
  mapper derives these counts from the 1-pass cascade and the architecture file, so the
  FuseMax side agrees to rounding at every point.
* **FLAT at 256K and 1M.** Both models make FLAT spill the score fiber to DRAM once a tile
  of 256 query rows no longer fits its 32 MiB buffer, and both charge 4 words per score
  (write after pass 1, read in pass 2, write after pass 2, read in pass 3: driven by the
  pass count). We spill only the part that does not fit (75% at 256K, 94% at 1M); the
  artifact's FLAT spills everything from 256K on (its dataflow search switches to a
  weight-stationary, fully off-chip schedule, flat_validation.csv). At 256K that keeps our
  FLAT 1-D-bound (utilisation 0.125 vs the artifact's 0.108, speedup −13.5%); at 1M our
  FLAT is DRAM-bound like theirs and the speedup is within a few percent (XLM: +12%,
  because our partial spill still moves more words than their schedule for E = F = 128).
* **Energy (the misses).** Per-action energies in our presets are public 45 nm estimates
  (fp16 MAC 2 pJ, 1-D op 1 pJ, 25 pJ per 16-bit word of a MB-scale SRAM, 62 pJ per 16-bit
  word of HBM2-class DRAM), not fitted to the artifact. From the artifact's own tables, its
  FLAT energy per score grows only ~5% between 1K and 1M while DRAM traffic grows from
  ~0 to ~8 bytes per score: its Accelergy DRAM costs about 2.5 MAC-equivalents per word,
  where ours costs 31. So up to 64K, where nothing spills, we are within 14%; at 256K and
  1M FLAT's spill traffic dominates our FLAT energy and our ratio is 32-47% lower than
  published. The spilled words also pass through the global buffer (25 pJ a word here), so
  even a much cheaper DRAM word leaves the gap near 25% (sensitivity table below). The
  artifact's energy unit is also unverified (README), so only ratios are compared. We did
  not retune the energies to the artifact: the long-sequence energy ratio is decided by the
  price of moving a spilled word, and that is an input, not something to fit.
* **Traffic** is not a validation target, but for the record: FuseMax's DRAM bytes agree
  within ~10% at 1M, because its query tile (32K queries for E = F = 64, 16K for 128)
  matches ours (31.8K and 15.9K: the buffer less the K/V staging tiles, shared by two
  double-buffered query tiles of Q, running max, sum and output rows); FLAT's at short
  lengths are lower in our model (we read K and V once per head when a head fits; the
  artifact's FLAT rereads them).
"""


def write_markdown(rows: list, worst_gemm: float) -> None:
    by = {(r.model, r.seq_len, r.metric): r for r in rows}
    keys = sorted({(r.model, r.seq_len) for r in rows}, key=lambda k: (k[0], SEQ_ORDER.index(k[1])))
    lines = [
        "# Spatial simulator vs FuseMax's published results",
        "",
        f"Generated by `/tmp/venv/bin/python benchmarks/sim_fusemax_validation.py` on "
        f"{datetime.date.today()} (Python {platform.python_version()}); reference tables: "
        "`benchmarks/reference/fusemax/` (FuseMax artifact, pregenerated results). FuseMax runs on "
        "the `fusemax_cloud` preset, FLAT on `flat_cloud`. Goal: within 25% at every point; "
        "**bold** marks a miss.",
        "",
        "| model | seq | speedup pub | ours | err | energy pub | ours | err | util2D FLAT pub | ours | err "
        "| util2D FuseMax pub | ours | err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, seq in keys:
        cells = [model, seq]
        for metric in METRICS:
            r = by[(model, seq, metric)]
            err = f"{r.rel_error:+.1%}"
            cells += [f"{r.published:.3f}", f"{r.ours:.3f}", f"**{err}**" if abs(r.rel_error) > GOAL else err]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for metric in METRICS:
        sel = [r for r in rows if r.metric == metric]
        misses = sum(abs(r.rel_error) > GOAL for r in sel)
        lines.append(f"- {metric}: max |error| {max(abs(r.rel_error) for r in sel):.1%}, mean ours "
                     f"{sum(r.ours for r in sel) / len(sel):.3f} vs published "
                     f"{sum(r.published for r in sel) / len(sel):.3f}; {misses} of {len(sel)} points over 25%")
    lines.append(f"- GEMM cycles vs SCALE-Sim 3.0.0 (84 points, `sim_scalesim_validation.csv`): "
                 f"max |error| {worst_gemm:.2%}")
    lines.append(EXPLANATION)
    lines += ["", "### Sensitivity: FuseMax/FLAT energy ratio (BERT) against the DRAM price per word", "",
              "| DRAM pJ per 16-bit word | 64K | 256K | 1M |", "|---|---|---|---|"]
    for pj, ratios in dram_sensitivity():
        lines.append(f"| {pj:g} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    lines.append("| published | " + " | ".join(f"{by[('BERT', q, 'energy_ratio')].published:.3f}"
                                             for q in ("64K", "256K", "1M")) + " |")
    lines += ["", "## Informational: unfused latency over FLAT's (not a validation target)", "",
              "The artifact's unfused baseline runs the softmax as one kernel, so only QK and A go "
              "through DRAM (4 score-sized transfers); ours gives every Einsum its own kernel, as the "
              "issue defines unfused (10 transfers, and stand-alone GEMMs that pay a systolic fill and "
              "drain per fold). Ours is therefore slower relative to FLAT.", "",
              "| model | seq | published | ours |", "|---|---|---|---|"]
    for r in compare_unfused(HERE / "reference" / "fusemax"):
        if r.model in ("BERT", "XLM"):
            lines.append(f"| {r.model} | {r.seq_len} | {r.published:.2f} | {r.ours:.2f} |")
    (HERE / "results" / "sim_fusemax_validation.md").write_text("\n".join(lines) + "\n")


SEQ_ORDER = ["1K", "4K", "16K", "64K", "256K", "1M"]


def dram_sensitivity() -> list[tuple[float, list[float]]]:
    """The BERT energy ratio at 64K, 256K and 1M with the presets' DRAM energy replaced."""
    out = []
    for pj in (62.0, 16.0, 4.0):
        fm, flat = (load_architecture(n) for n in ("fusemax_cloud", "flat_cloud"))
        fm, flat = (replace(a, energy=replace(a.energy, dram_access_pj=pj)) for a in (fm, flat))
        ratios = []
        for n in (2**16, 2**18, 2**20):
            c = workload("bert").cascade(n)
            ratios.append(evaluate(map_cascade(c, fm, "fusemax")).energy_pj
                          / evaluate(map_cascade(c, flat, "flat")).energy_pj)
        out.append((pj, ratios))
    return out


def main() -> int:
    rows = fusemax()
    worst_gemm = scalesim()
    write_markdown(rows, worst_gemm)
    for metric in METRICS:
        sel = [r for r in rows if r.metric == metric]
        misses = [r for r in sel if abs(r.rel_error) > GOAL]
        print(f"{metric:16s} max |error| {max(abs(r.rel_error) for r in sel):6.1%}  "
              f"mean ours {sum(r.ours for r in sel) / len(sel):.3f} "
              f"published {sum(r.published for r in sel) / len(sel):.3f}  points over 25%: {len(misses)}")
    print(f"SCALE-Sim GEMM cycles: max |error| {worst_gemm:.2%}")
    print(f"({datetime.date.today()}, Python {platform.python_version()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
