"""GPU benchmark: the linear-attention kernels (codegen/triton_linear.py) against the baselines of
../shared/REFERENCES.md, side by side in one run. (Flow-Attention has its own: bench_flow.py.)

    python benchmarks/bench_linear.py --out benchmarks/results [--sweep] [--profile]

B=2, H=16, bf16, D in (64, 128), N in (16k, 64k), layout [B, H, N, D] (fla gets its native
[B, N, H, D], made contiguous outside the timing). Kernel only: the feature map (elu+1) is
applied before timing, for every contender. ``triton.testing.do_bench`` median.

Rows:
- causal linear: ours (rewrite::linear_attention, kernel="triton") vs fla ``chunk_linear_attn``
  (scale=1, so both compute the same sums), normalised and not; chunked PyTorch C=64 for scale.
- non-causal linear (normalised, eps=1e-6): ours vs the eager einsum form (state, then queries,
  normaliser).
- ``--sweep``: every launch configuration the one-time tuner timed, per shape (always in the JSON).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rewrite.codegen.linear_kernel_utils import TIMINGS, TUNED
from rewrite.codegen.linear_ops import linear_torch
from rewrite.codegen.triton_linear import linear_attention_triton


def eager_linear(fq, fk, v, eps=1e-6):
    kv = torch.einsum("bhnd,bhne->bhde", fk, v)
    z = 1.0 / (torch.einsum("bhnd,bhd->bhn", fq, fk.sum(2)) + eps)
    return torch.einsum("bhnd,bhde,bhn->bhne", fq, kv, z)


def bench(fn):
    fn()  # the first call on a GPU times a few launch configurations per shape (rewrite's tuner)
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def relerr(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def run_one(d: int, n: int, chunk_linear_attn, B: int = 2, H: int = 16, dev: str = "cuda") -> dict:
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, device=dev, dtype=torch.bfloat16, generator=g) for _ in range(3))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    r = {"D": d, "N": n}
    # causal linear
    r["causal_ours_norm"] = bench(lambda: linear_attention_triton(fq, fk, v, True, True))
    r["causal_ours"] = bench(lambda: linear_attention_triton(fq, fk, v, True, False))
    r["causal_torch_chunked"] = bench(lambda: linear_torch(fq, fk, v, True, True))
    if chunk_linear_attn is not None:
        tq, tk, tv = (t.transpose(1, 2).contiguous() for t in (fq, fk, v))
        r["causal_fla_norm"] = bench(lambda: chunk_linear_attn(tq, tk, tv, scale=1.0, normalize=True))
        r["causal_fla"] = bench(lambda: chunk_linear_attn(tq, tk, tv, scale=1.0, normalize=False))
        o_fla = chunk_linear_attn(tq, tk, tv, scale=1.0, normalize=False)[0].transpose(1, 2)
        r["causal_err_vs_fla"] = relerr(linear_attention_triton(fq, fk, v, True, False), o_fla)
        del tq, tk, tv, o_fla
    sl = slice(0, 1)
    ref = linear_torch(fq[sl, :2].float(), fk[sl, :2].float(), v[sl, :2].float(), True, True)
    r["causal_err_vs_fp32"] = relerr(linear_attention_triton(fq, fk, v, True, True)[sl, :2], ref)
    ref = linear_torch(fq[sl, :2].float(), fk[sl, :2].float(), v[sl, :2].float(), True, False)
    r["causal_unnorm_err_vs_fp32"] = relerr(linear_attention_triton(fq, fk, v, True, False)[sl, :2], ref)
    # non-causal linear
    r["noncausal_ours"] = bench(lambda: linear_attention_triton(fq, fk, v, False, True, 1e-6))
    r["noncausal_eager"] = bench(lambda: eager_linear(fq, fk, v))
    r["noncausal_err_vs_fp32"] = relerr(linear_attention_triton(fq, fk, v, False, True, 1e-6),
                                        eager_linear(fq.float(), fk.float(), v.float()))
    r["noncausal_eager_err_vs_fp32"] = relerr(eager_linear(fq, fk, v), eager_linear(fq.float(), fk.float(),
                                                                                     v.float()))
    return r


def profile(n: int = 16384, d: int = 64) -> None:
    """Kernel-by-kernel CUDA time of one call (after warm-up), to see where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    for name, fn in (("causal", lambda: linear_attention_triton(fq, fk, v, True, False)),
                     ("noncausal", lambda: linear_attention_triton(fq, fk, v, False, True))):
        fn()
        torch.cuda.synchronize()
        with prof(activities=[ProfilerActivity.CUDA]) as p:
            fn()
            torch.cuda.synchronize()
        print(f"--- {name} N={n} D={d}")
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ns", default="16384,65536")
    ap.add_argument("--ds", default="64,128")
    ap.add_argument("--sweep", action="store_true", help="print every tuner candidate's time per shape")
    ap.add_argument("--profile", action="store_true", help="print per-kernel CUDA times of one call each")
    args = ap.parse_args()
    try:
        import fla
        from fla.ops.linear_attn import chunk_linear_attn
        fla_version = getattr(fla, "__version__", "?")
    except Exception as exc:  # recorded, not hidden
        chunk_linear_attn, fla_version = None, f"unavailable: {exc}"
    dev = "cuda"
    B, H = 2, 16
    rows = []
    for d in (int(x) for x in args.ds.split(",")):
        for n in (int(x) for x in args.ns.split(",")):
            r = run_one(d, n, chunk_linear_attn, B, H, dev)
            rows.append(r)
            print(json.dumps(r), flush=True)
            torch.cuda.empty_cache()
    if args.profile:
        for d in (int(x) for x in args.ds.split(",")):
            profile(d=d)
    card = torch.cuda.get_device_name()
    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "fla": fla_version, "python": platform.python_version(),
            "command": "python " + " ".join(sys.argv), "B": B, "H": H,
            "dtype": "bfloat16", "timing": "triton.testing.do_bench median, ms",
            "tuned_configs": {str(k): v for k, v in TUNED.items()}}
    sweep = [{"key": str(k), "candidates": [{"cfg": c, "ms": t} for c, t in v]} for k, v in TIMINGS.items()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"linear_{card.replace(' ', '_')}_{meta['date']}"
    table = _markdown(meta, rows)
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "sweep": sweep}, indent=1))
    (out / f"{stem}.md").write_text(table + (_sweep_markdown(sweep) if args.sweep else ""))
    if args.sweep:
        print(_sweep_markdown(sweep))
    print(table)


def _fmt(x):
    return "—" if x is None else f"{x:.3f}"


def _markdown(meta, rows) -> str:
    lines = [f"# Linear-attention kernels on {meta['card']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, fla-core {meta['fla']}, "
             f"B={meta['B']}, H={meta['H']}, {meta['dtype']}, {meta['timing']}.", "",
             f"Command: `{meta['command']}`", "",
             "| D | N | causal ours (norm) | fla chunk (norm) | × | causal ours | fla chunk | × | torch chunked | "
             "non-causal ours | eager einsum | × |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(a, b, r=r):
            return "—" if r.get(a) is None or r.get(b) is None else f"{r[b] / r[a]:.2f}"
        lines.append(
            f"| {r['D']} | {r['N']} | {_fmt(r['causal_ours_norm'])} | {_fmt(r.get('causal_fla_norm'))} | "
            f"{ratio('causal_ours_norm', 'causal_fla_norm')} | {_fmt(r['causal_ours'])} | "
            f"{_fmt(r.get('causal_fla'))} | {ratio('causal_ours', 'causal_fla')} | "
            f"{_fmt(r['causal_torch_chunked'])} | {_fmt(r['noncausal_ours'])} | {_fmt(r['noncausal_eager'])} | "
            f"{ratio('noncausal_ours', 'noncausal_eager')} |")
    lines += ["", "× = baseline time ÷ ours (higher is better). Max relative errors per row are in the JSON "
              "(`*_err_*`, relative to the largest |reference|)."]
    return "\n".join(lines) + "\n"


def _sweep_markdown(sweep) -> str:
    lines = ["", "## Tuner candidates (ms, do_bench median over 20 ms; the fastest is used)", ""]
    for entry in sweep:
        lines.append(f"- `{entry['key']}`")
        best = min(c["ms"] for c in entry["candidates"])
        for c in entry["candidates"]:
            mark = " **(picked)**" if c["ms"] == best else ""
            lines.append(f"  - {c['ms']:.3f}{mark}: `{json.dumps(c['cfg'], sort_keys=True)}`")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
