"""Sparse masks written in model code, end to end through `rewrite.compile` on a GPU.

The masks are written the way users write them (row-major grid coordinates with // and %,
|i − j| bands); `rewrite.compile` must prove them (MaskSpec) and run the neighborhood kernel.
Reported per case: the first call (capture + proof + kernel compile), the rewritten call, the
kernel called directly with the same spec (the rewrite's overhead is the difference), the
eager spelling where it fits in memory, and the variant/mask/proof the report gives.
B=2, H=16, bf16, D=64.

    python benchmarks/bench_sparse_rewrite.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path

import torch

import rewrite


def band_1d(q, k, v, w=512):
    i = torch.arange(q.shape[-2], device=q.device)
    keep = (i[:, None] - i[None, :]).abs() <= w
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def grid_2d(q, k, v, width=256, r=6, d=1):
    i = torch.arange(q.shape[-2], device=q.device)
    y, x = i // width, i % width
    dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
    keep = (dy.abs() <= r * d) & (dx.abs() <= r * d) & (dy % d == 0) & (dx % d == 0)
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def grid_2d_dilated(q, k, v):
    return grid_2d(q, k, v, d=2)


def bench(fn) -> float | None:
    import triton.testing

    try:
        return triton.testing.do_bench(fn, warmup=10, rep=50)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None


def run_case(name: str, fn, n: int, dev) -> dict:
    from rewrite.codegen.triton_neighborhood import neighborhood_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 16, n, 64, device=dev, dtype=torch.bfloat16) for _ in range(3))
    torch._dynamo.reset()
    site = rewrite.inspect(fn, q, k, v).sites[0]
    torch._dynamo.reset()
    fast = rewrite.compile(fn)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fast(q, k, v)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    t_rw = bench(lambda: fast(q, k, v))
    t_kernel = None
    if site.variant == "neighborhood":
        spec = site.mask_spec
        t_kernel = bench(lambda: neighborhood_attention(q, k, v, spec, scale=64 ** -0.5))
        direct = neighborhood_attention(q, k, v, spec, scale=64 ** -0.5)
        assert torch.equal(direct, out), "rewrite and direct kernel differ"
    t_eager = None
    if n <= 16384:
        q4, k4, v4 = q[:, :4], k[:, :4], v[:, :4]  # 4 heads: the N×N scores of 16 would not fit
        with torch.no_grad():
            try:
                torch.testing.assert_close(out[:, :4].float(), fn(q4, k4, v4).float(), atol=2e-2, rtol=2e-2)
                t_eager = bench(lambda: fn(q4, k4, v4))
                t_eager = t_eager * 4 if t_eager else None  # scaled to 16 heads
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
    return dict(case=name, n=n, variant=site.variant, mask=site.mask, kernel=site.kernel, proof=site.mask_spec.proof,
                density=site.density, first_call_s=round(first, 2), rewritten_ms=t_rw, kernel_ms=t_kernel,
                eager_ms_x4heads=t_eager, notes=site.notes)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sizes", default="16384,65536")
    args = ap.parse_args()
    dev = torch.device("cuda")
    card = torch.cuda.get_device_name(dev)
    rows = []
    cases = [("1-D |i-j|<=512", band_1d), ("2-D 13x13 (width 256)", grid_2d),
             ("2-D 13x13 dilated d=2 (width 256)", grid_2d_dilated)]
    for n in (int(s) for s in args.sizes.split(",")):
        for name, fn in cases:
            rows.append(run_case(name, fn, n, dev))
            print(rows[-1], flush=True)
            torch.cuda.empty_cache()
    meta = dict(card=card, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=__import__("triton").__version__, python=platform.python_version(),
                command=" ".join([sys.executable.split("/")[-1], *sys.argv]))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"sparse_rewrite_{card.replace(' ', '_')}_{meta['date']}"
    (out_dir / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    lines = [f"# Sparse masks through rewrite.compile ({card})", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}. Command: `{meta['command']}`.",
             "B=2, H=16, D=64, bf16. Eager: 4 heads timed (the N×N scores of 16 fit nowhere), ×4.", "",
             "| case | N | variant | mask (proof) | first call s | rewritten ms | kernel ms | eager ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = (lambda x: "—" if x is None else f"{x:.3f}")
        lines.append(f"| {r['case']} | {r['n']} | {r['variant']} | {r['mask']} ({r['proof']}) | {r['first_call_s']} | "
                     f"{f(r['rewritten_ms'])} | {f(r['kernel_ms'])} | {f(r['eager_ms_x4heads'])} |")
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
