"""GPU benchmark: Gemma 2's soft-capped causal attention, written as the model writes it, rewritten
by `rewrite.compile` (the score modifier inferred and generated into the fused Triton kernel) vs
FlexAttention given the same modifier by hand, vs eager, with cuDNN SDPA (no cap) as the
speed-of-light reference.

bf16, B=2, Hq=16, Hkv=8 (GQA, as Gemma 2), D in {128, 256}, N = M in {4k, 16k}, cap 50. Timed
with triton.testing.do_bench (median ms), forward only:

* rewrite: ``rewrite.compile(gemma2_attention)`` (the additive finfo.min causal mask is proven causal;
  the kernel skips the tiles above the diagonal and settles rows a finite fill could change);
* Flex: ``flex_attention`` under ``torch.compile`` with ``score_mod = cap·tanh(s/cap)`` and a causal
  block mask built once outside the timing;
* eager: the same function uncompiled (N = 4k only: its N×N scores in float32 at 16k take 32 GiB);
* kernel alone: the generated kernel called directly on the lifted modifier (the op's overhead
  is the difference);
* SDPA: cuDNN causal without the cap (what the kernel would cost without a modifier).

TFLOP/s count the causal half: 2 · B · Hq · N² · D. Correctness: rewrite and Flex vs a float32
eager run, max abs error, at N = 4k.

    python -P benchmarks/bench_score_mod.py --out benchmarks/results

Writes score_mod_<card>_<date>.{json,md} under --out (card, date, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import rewrite
from rewrite.codegen.score_mod_gen import triton_function
from rewrite.codegen.triton_attention import triton_attention
from rewrite.ir.score_mod import ModStep, ScoreMod

CAP = 50.0


def gemma2_attention(q, k, v):
    """Gemma 2's eager attention (transformers' eager_attention_forward with soft-capping)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    n, m = q.shape[-2], k.shape[-2]
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = w / CAP
    w = torch.tanh(w)
    w = w * CAP
    mask = torch.full((n, m), torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device).triu(1 + m - n)
    w = w + mask
    return torch.matmul(F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype), v)


def bench(fn, rep: int = 100) -> float:  # noqa: ANN001
    return float(triton.testing.do_bench(fn, warmup=10, rep=rep, return_mode="median"))


def flex_fn(n: int, groups: int):  # noqa: ANN201
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def softcap(score, b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return CAP * torch.tanh(score / CAP)

    def causal(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return q_idx >= kv_idx

    block_mask = create_block_mask(causal, None, None, n, n, device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: flex(q, k, v, score_mod=softcap, block_mask=block_mask, enable_gqa=groups > 1)


def measure(b: int, hq: int, hkv: int, n: int, d: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=gen) for h in (hq, hkv, hkv))
    site = rewrite.inspect(gemma2_attention, q, k, v).sites[0]
    ours = rewrite.compile(gemma2_attention)
    flex = flex_fn(n, hq // hkv)
    row = {"D": d, "N": n, "variant": site.variant, "kernel": site.kernel, "score_mod": site.score_mod}
    row["rewrite_ms"] = bench(lambda: ours(q, k, v))
    row["flex_ms"] = bench(lambda: flex(q, k, v))
    # the generated kernel alone, on the modifier the rewrite lifts (tanh(s·d^-½/cap), then × cap)
    mod = ScoreMod((ModStep("mul", ("s", d ** -0.5 / CAP)), ModStep("tanh", ("r0",))))
    fn = triton_function(mod)
    row["kernel_ms"] = bench(lambda: triton_attention(q, k, v, scale=CAP, causal=True, score_mod=fn))
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        row["sdpa_nocap_ms"] = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    if n <= 4096:
        row["eager_ms"] = bench(lambda: gemma2_attention(q, k, v), rep=20)
        ref = gemma2_attention(q.float(), k.float(), v.float())
        row["rewrite_err"] = float((ours(q, k, v).float() - ref).abs().max())
        row["flex_err"] = float((flex(q, k, v).float() - ref).abs().max())
    flops = 2 * b * hq * n * n * d
    row["rewrite_tflops"] = flops / row["rewrite_ms"] / 1e9
    row["flex_tflops"] = flops / row["flex_ms"] / 1e9
    row["vs_flex"] = row["flex_ms"] / row["rewrite_ms"]
    print(json.dumps(row), flush=True)
    return row


def run(args: argparse.Namespace) -> list[dict]:
    return [measure(2, 16, 8, n, d) for d in args.ds for n in args.ns]


def write(rows: list[dict], out: Path) -> None:
    card = torch.cuda.get_device_name()
    date = dt.date.today().isoformat()
    stem = f"score_mod_{re.sub(r'[^A-Za-z0-9]+', '_', card).strip('_')}_{date}"
    meta = {"card": card, "date": date, "torch": torch.__version__, "triton": triton.__version__,
            "command": "python -P " + shlex.join(sys.argv)}
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    lines = [f"# Gemma 2 soft-capped causal attention: rewrite vs FlexAttention ({card})", "",
             f"{date}, torch {meta['torch']}, triton {meta['triton']}; `{meta['command']}`", "",
             "bf16, B=2, Hq=16, Hkv=8, cap 50; forward, do_bench median ms. TFLOP/s: 2·B·Hq·N²·D.", "",
             "| D | N | kernel | rewrite ms | kernel alone ms | Flex ms | rewrite / Flex speedup | eager ms "
             "| SDPA no cap ms | rewrite TFLOP/s | err rewrite | err Flex |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['D']} | {r['N']} | {r['kernel']} ({r['variant']}) | {r['rewrite_ms']:.3f} | "
                     f"{r['kernel_ms']:.3f} | "
                     f"{r['flex_ms']:.3f} | {r['vs_flex']:.2f}× | {r.get('eager_ms', float('nan')):.2f} | "
                     f"{r['sdpa_nocap_ms']:.3f} | {r['rewrite_tflops']:.0f} | {r.get('rewrite_err', float('nan')):.2e} "
                     f"| {r.get('flex_err', float('nan')):.2e} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--ns", type=lambda s: [int(x) for x in s.split(",")], default=[4096, 16384])
    p.add_argument("--ds", type=lambda s: [int(x) for x in s.split(",")], default=[128, 256])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    write(run(args), args.out)


if __name__ == "__main__":
    main()
