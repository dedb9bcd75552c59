"""Predictions past FuseMax: causal (tile-skipping), banded, linear and flow cascades.

    /tmp/venv/bin/python benchmarks/sim_variants.py

Writes benchmarks/results/sim_variants.{md,csv}: per variant and sequence length, the
latency, bound, 2-D utilisation and energy of each mapping (FLAT and unfused on
flat_cloud, FuseMax and sparse on fusemax_cloud), BERT-Base head shapes, batch 64. No
published anchor exists for these; they are model predictions, not measurements.
"""

from __future__ import annotations

import csv
import datetime
import platform
from pathlib import Path

import sympy

from rewrite.ir.cascade import Cascade, m, p
from rewrite.simulation import simulate

HERE = Path(__file__).parent
SEQ = [2**12, 2**16, 2**20]
SIZES = dict(b=64, h=12, e=64, f=64)
VARIANTS = {
    "dense softmax": Cascade.softmax_attention(),
    "causal softmax": Cascade.softmax_attention(mask=m <= p),
    "window |p−m| ≤ 512": Cascade.softmax_attention(mask=sympy.Abs(p - m) <= 512),
    "linear (non-causal)": Cascade.linear_attention(),
    "linear (causal)": Cascade.linear_attention(causal=True),
    "flow": Cascade.flow_attention(),
}


def main() -> int:
    rows, lines = [], [
        "# Simulated attention variants past FuseMax (predictions)", "",
        f"`/tmp/venv/bin/python benchmarks/sim_variants.py`, {datetime.date.today()}, Python "
        f"{platform.python_version()}. BERT-Base heads (H = 12, E = F = 64), batch 64; unfused and FLAT "
        "on `flat_cloud`, FuseMax and sparse (FuseMax skipping masked 256×256 tiles) on "
        "`fusemax_cloud`. Speedup is over FLAT. No published numbers anchor these rows.", "",
        "| variant | seq | mapping | time (s) | bound | util 2-D | util 1-D | DRAM (GB) | energy (J) | speedup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, cascade in VARIANTS.items():
        sim = simulate(cascade.with_sizes(p=SEQ[0], m=SEQ[0], **SIZES), seq_lens=SEQ,
                       mappings=["unfused", "flat", "fusemax", "sparse"])
        for pt in sim.points:
            c = pt.cost
            rows.append([name, pt.seq_len, pt.mapping, c.arch, f"{c.cycles:.6g}", f"{c.seconds:.6g}", c.bound,
                         f"{c.util_2d:.4f}", f"{c.util_1d:.4f}", f"{c.dram_bytes:.6g}", f"{c.energy_pj:.6g}",
                         f"{c.buffer_required_bytes:.6g}", f"{pt.speedup:.4f}"])
            lines.append(f"| {name} | {pt.seq_len} | {pt.mapping} | {c.seconds:.3g} | {c.bound} | "
                         f"{c.util_2d:.3f} | {c.util_1d:.3f} | {c.dram_bytes / 1e9:.3g} | "
                         f"{c.energy_pj * 1e-12:.3g} | {pt.speedup:.2f}× |")
    lines += ["", "Reading the table: causal and windowed softmax gain only under the sparse mapping "
              "(the others compute every tile); linear attention is bound by DRAM or by the 1-D array's "
              "divisions, not by the 2-D array; Flow-Attention needs four passes over the keys and its "
              "sigmoid feature maps are expensive on FuseMax's exp-less arrays (9 cycles a sigmoid), so "
              "FLAT's special-function unit wins there. Causal linear attention is modelled by its "
              "recurrence (a running φK·Vᵀ state per key, read at each query's position); the reads are "
              "costed as one matrix product per head, as a chunked (Lightning-style) schedule runs them, "
              "so the fused rows are optimistic for a literal per-query state read. Unfused "
              "materialises that state for every position, hence its DRAM traffic.", ""]
    out = HERE / "results"
    (out / "sim_variants.md").write_text("\n".join(lines))
    with open(out / "sim_variants.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "seq_len", "mapping", "arch", "cycles", "seconds", "bound", "util_2d", "util_1d",
                    "dram_bytes", "energy_pj", "buffer_required_bytes", "speedup_over_flat"])
        w.writerows(rows)
    print("\n".join(lines[:8]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
