"""GPU benchmark: linear and Flow-Attention kernels (codegen/triton_linear.py, triton_flow.py)
against the baselines of ../shared/REFERENCES.md, side by side in one run.

    python benchmarks/bench_linear.py --out benchmarks/results

B=2, H=16, bf16, D in (64, 128), N in (16k, 64k), layout [B, H, N, D] (fla gets its native
[B, N, H, D], made contiguous outside the timing). Kernel only: the feature map (elu+1) is
applied before timing, for every contender. ``triton.testing.do_bench`` median.

Rows:
- causal linear: ours (rewrite::linear_attention, kernel="triton") vs fla ``chunk_linear_attn``
  (scale=1, so both compute the same sums), normalised and not; chunked PyTorch C=64 for scale.
- non-causal linear: ours vs the eager einsum form (state, then queries, normaliser).
- flow (non-causal, official clamp): ours vs eager PyTorch (Flowformer's official code);
  GB/s over the minimum traffic (read q, k, v, write out once) and over the kernels' real traffic
  (4 passes: q 3×, k 3×, v 1×, out 1×), against the 3.0 TB/s copy ceiling.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from rewrite.codegen.linear_ops import flow_reference, linear_torch
from rewrite.codegen.triton_flow import flow_attention_triton
from rewrite.codegen.triton_linear import _TUNED, linear_attention_triton


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
    sl = slice(0, 1)
    ref = linear_torch(fq[sl, :2].float(), fk[sl, :2].float(), v[sl, :2].float(), True, True)
    r["causal_err_vs_fp32"] = relerr(linear_attention_triton(fq, fk, v, True, True)[sl, :2], ref)
    # non-causal linear
    r["noncausal_ours"] = bench(lambda: linear_attention_triton(fq, fk, v, False, True, 1e-6))
    r["noncausal_eager"] = bench(lambda: eager_linear(fq, fk, v))
    r["noncausal_err_vs_eager"] = relerr(linear_attention_triton(fq, fk, v, False, True, 1e-6),
                                         eager_linear(fq.float(), fk.float(), v.float()))
    # flow
    r["flow_ours"] = bench(lambda: flow_attention_triton(q, k, v, False, True))
    r["flow_eager"] = bench(lambda: flow_reference(q, k, v, False, True))
    r["flow_err_vs_fp32"] = relerr(flow_attention_triton(q, k, v, False, True),
                                   flow_reference(q.float(), k.float(), v.float(), False, True))
    r["causal_flow_ours"] = bench(lambda: flow_attention_triton(q, k, v, True, True))
    # The official causal code does not run in bf16 (its float32 `normal` meets bf16 in an einsum): fp32 here.
    qf, kf, vf = q.float(), k.float(), v.float()
    r["causal_flow_eager_fp32"] = bench(lambda: flow_reference(qf, kf, vf, True, True)) if n * d <= 16384 * 64 \
        else None
    tensor_bytes = B * H * n * d * 2
    r["flow_GBps_min_traffic"] = 4 * tensor_bytes / (r["flow_ours"] * 1e-3) / 1e9
    r["flow_GBps_kernel_traffic"] = 8 * tensor_bytes / (r["flow_ours"] * 1e-3) / 1e9
    return r


def profile(n: int = 16384, d: int = 64) -> None:
    """Kernel-by-kernel CUDA time of one call (after warm-up), to see where the time goes."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 16, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    for name, fn in (("flow", lambda: flow_attention_triton(q, k, v, False, True)),
                     ("causal", lambda: linear_attention_triton(fq, fk, v, True, True)),
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
        profile()
    card = torch.cuda.get_device_name()
    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "fla": fla_version, "python": platform.python_version(),
            "command": "python benchmarks/bench_linear.py --out benchmarks/results", "B": B, "H": H,
            "dtype": "bfloat16", "timing": "triton.testing.do_bench median, ms",
            "tuned_configs": {str(k): v for k, v in _TUNED.items()}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"linear_flow_{card.replace(' ', '_')}_{meta['date']}"
    (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{stem}.md").write_text(_markdown(meta, rows))
    print(_markdown(meta, rows))


def _fmt(x):
    return "—" if x is None else f"{x:.3f}"


def _markdown(meta, rows) -> str:
    lines = [f"# Linear and Flow-Attention kernels on {meta['card']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, fla-core {meta['fla']}, "
             f"B={meta['B']}, H={meta['H']}, {meta['dtype']}, {meta['timing']}.", "",
             f"Command: `{meta['command']}`", "",
             "| D | N | causal ours (norm) | fla chunk (norm) | × | causal ours | fla chunk | × | torch chunked | "
             "non-causal ours | eager einsum | × | flow ours | flow eager | × | flow GB/s (min / real traffic) "
             "| causal flow ours | causal flow eager (fp32) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        def ratio(a, b, r=r):
            return "—" if r.get(a) is None or r.get(b) is None else f"{r[b] / r[a]:.2f}"
        lines.append(
            f"| {r['D']} | {r['N']} | {_fmt(r['causal_ours_norm'])} | {_fmt(r.get('causal_fla_norm'))} | "
            f"{ratio('causal_ours_norm', 'causal_fla_norm')} | {_fmt(r['causal_ours'])} | "
            f"{_fmt(r.get('causal_fla'))} | "
            f"{ratio('causal_ours', 'causal_fla')} | {_fmt(r['causal_torch_chunked'])} | "
            f"{_fmt(r['noncausal_ours'])} | "
            f"{_fmt(r['noncausal_eager'])} | {ratio('noncausal_ours', 'noncausal_eager')} | {_fmt(r['flow_ours'])} | "
            f"{_fmt(r['flow_eager'])} | {ratio('flow_ours', 'flow_eager')} | {r['flow_GBps_min_traffic']:.0f} / "
            f"{r['flow_GBps_kernel_traffic']:.0f} | {_fmt(r['causal_flow_ours'])} | "
            f"{_fmt(r['causal_flow_eager_fp32'])} |")
    lines += ["", "× = baseline time ÷ ours (higher is better). Max relative errors per row are in the JSON "
              "(`*_err_*`). Copy ceiling on this card: 3.0 TB/s (REFERENCES.md)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
