"""CPU benchmark: linear attention written in its quadratic form, eager vs rewrite.compile.

    python benchmarks/bench_linear_cpu.py --out benchmarks/results

The eager code materialises the [N, N] score matrix per head (O(N²·D)); the rewritten graph
calls rewrite::linear_attention (kernel "torch": reassociated, or chunked when causal, O(N·D²)).
fp32, B=1, H=4, D=64, median of repeated wall-clock timings after one warm-up call.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rewrite


def noncausal(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = q @ k.transpose(-2, -1)
    return (s @ v) / s.sum(-1, keepdim=True)


def causal(q, k, v):
    q, k = F.elu(q) + 1, F.elu(k) + 1
    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * torch.tril(torch.ones(n, n))
    return (s @ v) / (s.sum(-1, keepdim=True) + 1e-6)


def timed(fn, *args, reps: int = 3) -> float:
    fn(*args)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ns", default="2048,8192")
    args = ap.parse_args()
    rows = []
    for n in (int(x) for x in args.ns.split(",")):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, n, 64, generator=g) for _ in range(3))
        for name, fn in (("non-causal", noncausal), ("causal (tril)", causal)):
            torch._dynamo.reset()
            fast = rewrite.compile(fn)
            got = fast(q, k, v)
            want = fn(q.double(), k.double(), v.double())
            err = float((got.double() - want).abs().max() / want.abs().max())
            eager_ms, rewritten_ms = timed(fn, q, k, v), timed(fast, q, k, v)
            rows.append({"form": name, "N": n, "eager_ms": eager_ms, "rewritten_ms": rewritten_ms,
                         "speedup": eager_ms / rewritten_ms, "max_rel_err_vs_fp64": err})
            print(json.dumps(rows[-1]), flush=True)
    meta = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "command": "python benchmarks/bench_linear_cpu.py --out benchmarks/results",
            "shape": "B=1, H=4, D=64, fp32"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"linear_cpu_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# Quadratic-written linear attention on the CPU, eager vs rewrite.compile", "",
             f"{meta['date']}, torch {meta['torch']}, {meta['threads']} threads ({meta['cpu']}), {meta['shape']}, "
             "median wall-clock ms.", "", f"Command: `{meta['command']}`", "",
             "| form | N | eager ms | rewritten ms | speed-up | max rel. error vs fp64 |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['form']} | {r['N']} | {r['eager_ms']:.1f} | {r['rewritten_ms']:.2f} | {r['speedup']:.0f}× | "
              f"{r['max_rel_err_vs_fp64']:.1e} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
