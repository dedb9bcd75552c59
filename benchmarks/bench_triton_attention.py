"""GPU benchmark: the fused Triton attention forward vs F.scaled_dot_product_attention.

Times (triton.testing.do_bench, median) the kernel alone, SDPA's cuDNN backend and SDPA's flash
backend, dense and causal, B=2, H=16, D in {64, 128}, N in {4096, 16384}, bf16, layout
[B, H, N, D]. TFLOP/s counts 4·B·H·N·M·D flops dense, half of that causal.

    python benchmarks/bench_triton_attention.py --out benchmarks/results
    python benchmarks/bench_triton_attention.py --sweep      # also try the block-size candidates

Writes triton_attention_<card>_<date>.{json,md} under --out, with the card, the date, the torch
and triton versions and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import re
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rewrite.codegen.triton_attention import AttentionConfig, choose_config, triton_attention, use_tma_for

# Candidates for --sweep (H100 guidance: BLOCK_M=128, BLOCK_N 64/128, 4/8 warps, 3/4 stages).
_BASE: dict[int, list[tuple[int, int, int, int]]] = {  # (BLOCK_M, BLOCK_N, warps, stages)
    64: [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 4, 3), (128, 64, 8, 3),
         (256, 64, 8, 3), (256, 128, 8, 2), (256, 64, 16, 3)],
    128: [(128, 64, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2), (64, 64, 4, 3),
          (128, 128, 8, 3), (256, 64, 16, 3), (256, 64, 16, 2)],
}
SWEEP: dict[int, list[AttentionConfig]] = {
    d: [AttentionConfig(*c) for c in cs] for d, cs in _BASE.items()
}


def flops(b: int, h: int, n: int, m: int, d: int, causal: bool) -> float:
    f = 4.0 * b * h * n * m * d
    return f / 2 if causal else f


def bench(fn, ms_rep: int = 200) -> float:  # noqa: ANN001
    return float(triton.testing.do_bench(fn, warmup=50, rep=ms_rep, return_mode="median"))


def sdpa_ms(backend: SDPBackend, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            causal: bool) -> float | None:
    try:
        with sdpa_kernel(backend):
            F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            torch.cuda.synchronize()
            return bench(functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=causal))
    except RuntimeError as e:  # backend not available for this shape / build
        print(f"  {backend}: unavailable ({str(e).splitlines()[0][:80]})", file=sys.stderr)
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sweep", action="store_true", help="time the block-size candidates first")
    ap.add_argument("--sweep-only", action="store_true", help="stop after the sweep")
    ap.add_argument("--ns", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)

    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    card = torch.cuda.get_device_name()
    b, h, dtype = 2, 16, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)

    if args.sweep:
        print("sweep (N=16384, ms):")
        for d in args.ds:
            q, k, v = (torch.randn(b, h, 16384, d, device="cuda", generator=gen, dtype=dtype)
                       for _ in range(3))
            for causal in (False, True):
                for cfg in SWEEP[d]:
                    try:
                        ms = bench(functools.partial(triton_attention, q, k, v, scale=d**-0.5,
                                                     causal=causal, config=cfg), 100)
                    except Exception as e:  # noqa: BLE001 - out of shared memory etc.: report, go on
                        print(f"  D={d} causal={causal} {cfg}: failed {type(e).__name__}")
                        continue
                    tf = flops(b, h, 16384, 16384, d, causal) / ms / 1e9
                    print(f"  D={d} causal={int(causal)} BM={cfg.block_m} BN={cfg.block_n} "
                          f"w={cfg.num_warps} s={cfg.num_stages}: "
                          f"{ms:.3f} ms {tf:.0f} TFLOP/s")

    if args.sweep_only:
        return
    rows = []
    for d in args.ds:
        for n in args.ns:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", generator=gen, dtype=dtype) for _ in range(3))
            for causal in (False, True):
                out = triton_attention(q, k, v, scale=d**-0.5, causal=causal)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                err = float((out.float() - ref.float()).norm() / ref.float().norm())
                # accuracy of both against float64 on one head (the whole float64 S would not fit)
                s64 = (q[0, 0].double() @ k[0, 0].double().T) * d**-0.5
                if causal:
                    s64 = s64.masked_fill(torch.ones(n, n, dtype=torch.bool, device="cuda").triu(1),
                                          float("-inf"))
                ref64 = torch.softmax(s64, -1) @ v[0, 0].double()
                err64 = [float((o[0, 0].double() - ref64).norm() / ref64.norm()) for o in (out, ref)]
                del s64, ref64
                t_ours = bench(functools.partial(triton_attention, q, k, v, scale=d**-0.5, causal=causal))
                t_cudnn = sdpa_ms(SDPBackend.CUDNN_ATTENTION, q, k, v, causal)
                t_flash = sdpa_ms(SDPBackend.FLASH_ATTENTION, q, k, v, causal)
                f = flops(b, h, n, n, d, causal)
                cfg = choose_config(d, d, dtype, q.device, causal)
                used_tma = use_tma_for(cfg, q.device, (q, k, v, out), (d, d, d, d))
                rows.append(dict(d=d, n=n, causal=causal,
                                 triton_ms=t_ours, cudnn_ms=t_cudnn, flash_ms=t_flash,
                                 triton_tflops=f / t_ours / 1e9,
                                 cudnn_tflops=f / t_cudnn / 1e9 if t_cudnn else None,
                                 flash_tflops=f / t_flash / 1e9 if t_flash else None,
                                 rel_err_vs_cudnn=err, tma=used_tma, rel_err_vs_fp64=err64[0],
                                 cudnn_rel_err_vs_fp64=err64[1], config=cfg.__dict__))
                del out, ref

    def cell(ms: float | None, tf: float | None) -> str:
        return "—" if ms is None else f"{ms:.3f} ({tf:.0f})"

    header = ("| D | N | mask | triton ms (TFLOP/s) | cuDNN | flash | triton / cuDNN time | "
              "rel err vs fp64: triton / cuDNN | config |")
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        ratio = f"{r['triton_ms'] / r['cudnn_ms']:.2f}x" if r["cudnn_ms"] else "—"
        c = r["config"]
        lines.append(f"| {r['d']} | {r['n']} | {'causal' if r['causal'] else 'dense'} | "
                     f"{cell(r['triton_ms'], r['triton_tflops'])} | "
                     f"{cell(r['cudnn_ms'], r['cudnn_tflops'])} | "
                     f"{cell(r['flash_ms'], r['flash_tflops'])} | {ratio} | "
                     f"{r['rel_err_vs_fp64']:.1e} / {r['cudnn_rel_err_vs_fp64']:.1e} | "
                     f"BM{c['block_m']} BN{c['block_n']} w{c['num_warps']} s{c['num_stages']}"
                     f"{' tma' if r['tma'] else ''} |")
    table = "\n".join(lines)
    print(table)

    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    meta = dict(card=card, date=date, torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), command=command, b=b, h=h, dtype=str(dtype),
                timing="triton.testing.do_bench median, warmup 50 ms, rep 200 ms")
    args.out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_")
    stem = args.out / f"triton_attention_{slug}_{date}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows), indent=1))
    md = [f"# Triton attention forward vs SDPA — {card}, {date}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}; B={b}, H={h}, bf16, "
          "[B,H,N,D] contiguous; " + meta["timing"] + "; TFLOP/s = 4·B·H·N²·D (half for causal) / time.",
          "", f"Command: `{command}`", "", table, ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
