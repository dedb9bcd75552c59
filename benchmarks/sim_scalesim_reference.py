"""Record SCALE-Sim 3.0.0 GEMM cycle counts as the reference for our analytic systolic model.

Run in SCALE-Sim's own environment (it needs numpy < 2.3), not the project's:

    python3 -m venv /tmp/scalesim-venv
    /tmp/scalesim-venv/bin/pip install "numpy<2.3" scalesim==3.0.0
    /tmp/scalesim-venv/bin/python benchmarks/sim_scalesim_reference.py

Writes benchmarks/reference/scalesim_gemm.csv. Cycles come from the per-layer
COMPUTE_REPORT.csv ("Total Cycles", i.e. without the initial prefetch), because
`get_total_cycles()` is broken in 3.0.0. The topology row ``name, M, N, K,`` means
C[M,N] = A[M,K]·B[K,N]. Matrices are kept small: SCALE-Sim materialises whole operand
and trace matrices in memory.
"""

from __future__ import annotations

import csv
import datetime
import io
import itertools
import os
import sys
import tempfile
from contextlib import redirect_stdout
from importlib.metadata import version

from scalesim.scale_sim import scalesim

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference", "scalesim_gemm.csv")

# (M, N, K): square, tall, wide, deep and odd shapes, none a multiple of every array size.
GEMMS = [(64, 64, 64), (128, 256, 64), (256, 128, 512), (200, 300, 100), (512, 64, 256),
         (96, 480, 32), (1024, 128, 64)]
ARRAYS = [(16, 16), (32, 32), (64, 32), (128, 128)]
DATAFLOWS = ["os", "ws", "is"]

CONFIG = """[general]
run_name = ref

[architecture_presets]
ArrayHeight: {rows}
ArrayWidth: {cols}
IfmapSramSzkB: 4096
FilterSramSzkB: 4096
OfmapSramSzkB: 4096
IfmapOffset: 0
FilterOffset: 10000000
OfmapOffset: 20000000
Dataflow: {df}
Bandwidth: 256
ReadRequestBuffer: 32
WriteRequestBuffer: 32

[layout]
IfmapCustomLayout: False
IfmapSRAMBankBandwidth: 10
IfmapSRAMBankNum: 10
IfmapSRAMBankPort: 2
FilterCustomLayout: False
FilterSRAMBankBandwidth: 10
FilterSRAMBankNum: 10
FilterSRAMBankPort: 2

[sparsity]
SparsitySupport: false
SparseRep: ellpack_block
OptimizedMapping: false
BlockSize: 8
RandomNumberGeneratorSeed: 40

[run_presets]
InterfaceBandwidth: USER
UseRamulatorTrace: False
"""

LAYOUT = ("Layer name, IFMAP Height Intraline Factor, IFMAP Width Intraline Factor, "
          "Filter Height Intraline Factor, Filter Width Intraline Factor, Channel Intraline Factor, "
          "Num Filter Intraline Factor, IFMAP Height Intraline Order, IFMAP Width Intraline Order, "
          "Channel Intraline Order, IFMAP Height Interline Order, IFMAP Width Interline Order, "
          "Channel Interline Order, Filter Height Intraline Order, Filter Width Intraline Order, "
          "Channel Intraline Order, Num Filter Intraline Order, Filter Height Interline Order, "
          "Filter Width Interline Order, Channel Interline Order, Num Filter Interline Order,\n"
          "gemm, 1, 1, 1, 1, 1, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3,\n")


def run_one(M: int, N: int, K: int, rows: int, cols: int, df: str) -> tuple[int, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = os.path.join(tmp, "scale.cfg")
        topo = os.path.join(tmp, "gemm.csv")
        layout = os.path.join(tmp, "layout.csv")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(rows=rows, cols=cols, df=df))
        with open(topo, "w") as f:
            f.write(f"Layer, M, N, K,\ngemm, {M}, {N}, {K},\n")
        with open(layout, "w") as f:
            f.write(LAYOUT)
        sim = scalesim(save_disk_space=True, verbose=False, config=cfg, topology=topo, layout=layout,
                       input_type_gemm=True)
        with redirect_stdout(io.StringIO()):
            sim.run_scale(top_path=tmp)
        report = next(os.path.join(r, "COMPUTE_REPORT.csv") for r, _, fs in os.walk(tmp)
                      if "COMPUTE_REPORT.csv" in fs)
        with open(report) as f:
            row = next(csv.DictReader(f, skipinitialspace=True))
        return int(float(row["Total Cycles"])), float(row["Compute Util %"])


def main() -> int:
    rows_out = []
    for (M, N, K), (r, c), df in itertools.product(GEMMS, ARRAYS, DATAFLOWS):
        cycles, util = run_one(M, N, K, r, c, df)
        rows_out.append((M, N, K, r, c, df, cycles, util))
        print(f"M={M} N={N} K={K} array={r}x{c} {df}: {cycles} cycles", file=sys.stderr)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w", newline="") as f:
        f.write(f"# SCALE-Sim {version('scalesim')} (numpy {version('numpy')}), "
                f"{datetime.date.today().isoformat()}; cycles = COMPUTE_REPORT 'Total Cycles'.\n")
        f.write("# command: /tmp/scalesim-venv/bin/python benchmarks/sim_scalesim_reference.py\n")
        w = csv.writer(f)
        w.writerow(["M", "N", "K", "rows", "cols", "dataflow", "cycles", "compute_util_pct"])
        w.writerows(rows_out)
    print(f"wrote {OUT} ({len(rows_out)} rows)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
