"""Simulate BERT-Base attention from 1K to 1M tokens on FuseMax's and FLAT's accelerators.

    /tmp/venv/bin/python examples/simulate_bert.py [--out bert_speedup.png]

The workload is FuseMax's (batch 64, 12 heads, E = F = 64). FLAT runs on its cloud
accelerator (exp in one cycle, 32 MiB buffer), FuseMax and the sparse variant (causal
tiles skipped) on FuseMax's (no exp unit, 16 MB buffer). Prints the table and saves a plot
of the speedup over FLAT and the 2-D array's utilisation against sequence length.
"""

from __future__ import annotations

import argparse

import rewrite


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bert_speedup.png")
    args = ap.parse_args()
    seq_lens = [2**k for k in range(10, 21, 2)]  # 1K, 4K, 16K, 64K, 256K, 1M
    sim = rewrite.simulate("bert", seq_lens=seq_lens, mappings=["unfused", "flat", "fusemax"],
                           arch={"unfused": "flat_cloud", "flat": "flat_cloud", "fusemax": "fusemax_cloud"})
    print(sim)
    for n in seq_lens:
        pt = sim.point("fusemax", n)
        print(f"{n:>8} tokens: FuseMax {pt.speedup:.2f}× faster than FLAT at {pt.energy_ratio:.0%} of its "
              f"energy; 2-D utilisation {sim.point('flat', n).cost.util_2d:.3f} → {pt.cost.util_2d:.3f}")
    sim.plot(args.out)
    print(f"plot saved to {args.out}")


if __name__ == "__main__":
    main()
