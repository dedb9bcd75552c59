"""CPU cost of the exhaustive mask proof (passes/mask_proofs.py), which sets ``EXHAUSTIVE_LIMIT``.

    python benchmarks/bench_exhaustive_check.py --out benchmarks/results

A mask with no symbolic or per-axis proof is classified only by checking every (p, m) pair. This
times, at N·M = 2^20 … 2^24 (square), the whole classification of predicates that need it
(``masks.classify`` with sizes): a 1-D band with one hole (evaluated, fitted, refused), tril with
an attention-sink column (proven causal), NATTEN's clamped 1-D window (proven), a blocked layout
(proven), and the raw evaluation of a 3-D neighborhood predicate (every pair, as a grid would
cost if its per-axis proof failed). Median of ``--reps`` runs, one thread as the test suite uses.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import sympy
import torch

from rewrite.ir import m, p
from rewrite.passes import mask_proofs, masks


def _cases(n: int) -> dict:
    t = p - m
    hole = sympy.And(sympy.Abs(t) <= 64, sympy.Or(sympy.Ne(p, n // 2), sympy.Ne(m, n // 2 + 3)))
    sink = sympy.Or(m <= p, sympy.Eq(m, 0))
    k, L = 9, n
    start = sympy.Min(sympy.Max(p - k // 2, 0), L - k)
    natten = sympy.And(m >= start, m < start + k)
    blocked = sympy.Eq(sympy.floor(p / 64), sympy.floor(m / 64))
    bp, bm = sympy.floor(p / 64), sympy.floor(m / 64)
    pairs = [(a * 7 % (n // 64), a * 13 % (n // 64)) for a in range(40)]
    layout = sympy.Or(*[sympy.And(sympy.Eq(bp, a), sympy.Eq(bm, b)) for a, b in pairs])
    return {"1-D band with a hole (refused)": hole, "tril + sink column (causal)": sink,
            "NATTEN clamped k=9 (proven)": natten, "blocks of 64 (proven)": blocked,
            "40 blocks of 64, no family (refused; over the work limit at 2^24)": layout}


def _cube(n: int) -> sympy.Basic:
    s = round(n ** (1 / 3))
    parts = []
    for div in (s * s, s):
        a, b = sympy.floor(p / div), sympy.floor(m / div)
        parts.append(sympy.Abs(sympy.Mod(a, s) - sympy.Mod(b, s)) <= 3)
    parts.append(sympy.Abs(sympy.Mod(p, s) - sympy.Mod(m, s)) <= 3)
    return sympy.And(*parts)


def _time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for log2 in (20, 22, 24):
        n = 1 << (log2 // 2)
        for name, pred in _cases(n).items():
            spec = masks.classify(pred, n, n)
            sec = _time(lambda pred=pred, n=n: masks.classify(pred, n, n), args.reps)
            rows.append(dict(case=name, n=n, pairs=n * n, seconds=round(sec, 3), kind=spec.kind, proof=spec.proof))
            print(rows[-1], flush=True)
        s = round(n ** (1 / 3))
        cube = _cube(s ** 3)
        keep = mask_proofs.evaluator(cube)
        sec = _time(lambda keep=keep, c=s ** 3: mask_proofs.keep_matrix(keep, c, c), args.reps)
        rows.append(dict(case=f"3-D {s}³ predicate, every pair evaluated", n=s ** 3, pairs=s ** 6,
                         seconds=round(sec, 3), kind="-", proof="-"))
        print(rows[-1], flush=True)
    meta = dict(date=datetime.date.today().isoformat(), torch=torch.__version__, sympy=sympy.__version__,
                python=platform.python_version(), machine=platform.processor() or platform.machine(),
                limit=mask_proofs.EXHAUSTIVE_LIMIT, command=" ".join([sys.executable.split("/")[-1], *sys.argv]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"exhaustive_check_cpu_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Exhaustive mask proof: CPU cost ({meta['date']})", "",
             f"torch {meta['torch']}, sympy {meta['sympy']}, Python {meta['python']}, one thread. "
             f"Command: `{meta['command']}`. EXHAUSTIVE_LIMIT = {meta['limit']} pairs.", "",
             "| case | N | pairs | seconds (median) | classified | proof |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['case']} | {r['n']} | {r['pairs']} | {r['seconds']} | {r['kind']} | {r['proof']} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
