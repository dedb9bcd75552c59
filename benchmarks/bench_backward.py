"""GPU benchmark: forward + backward of rewritten attention sites vs the eager spelling, time and
peak memory, side by side in one run.

    python -P benchmarks/bench_backward.py --out benchmarks/results

B=1, H=8, D=64, bf16, q/k/v requiring grad, loss = (out · g).sum() with a fixed random g.
Cases (the eager spelling is the model code; "rewrite" is its op as the rewritten graph calls it):
- causal N=16384: rewrite::attention (SDPA forward, SDPA's fused backward by recomputation)
  vs eager softmax(q kᵀ masked) v;
- 1-D window |i−j| ≤ 256, N=16384: rewrite::sparse_attention (Triton forward, backward through the
  kept tiles) vs the eager masked spelling, and vs FlexAttention (compiled, same mask_mod).
Peak memory is torch.cuda.max_memory_allocated over one forward+backward, minus the inputs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import math
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

from rewrite.codegen.sparse_ops import op_spec
from rewrite.ir.mask import MaskSpec

B, H, D = 1, 8, 64
DTYPE = torch.bfloat16


def eager(q, k, v, keep, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def step(fn, q, k, v, g):
    out = fn(q, k, v)
    torch.autograd.grad((out * g).sum(), (q, k, v))


def measure(fn, q, k, v, g) -> tuple[float | None, float | None]:
    try:
        step(fn, q, k, v, g)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(fn, q, k, v, g)
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2**30
        return do_bench(functools.partial(step, fn, q, k, v, g), warmup=10, rep=50, return_mode="median"), peak
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, None


def write(out_dir: Path, n: int, rows: list[dict]) -> str:
    card = torch.cuda.get_device_name()
    date = datetime.date.today().isoformat()
    lines = [f"# Forward + backward of rewritten sites — {card}, {date}", "",
             f"torch {torch.__version__}, triton {triton.__version__}; B={B}, H={H}, D={D}, bf16, N={n}; "
             "do_bench median of forward + autograd.grad; peak = max_memory_allocated above the inputs.", "",
             "Command: `python -P benchmarks/bench_backward.py --out $OUT`", "",
             "| case | impl | fwd+bwd ms | peak GiB | rel. err. of out vs rewrite |", "|---|---|---|---|---|"]
    for r in rows:
        ms = "OOM" if r["fwd_bwd_ms"] is None else f"{r['fwd_bwd_ms']:.2f}"
        gib = "—" if r["peak_GiB"] is None else f"{r['peak_GiB']:.2f}"
        lines.append(f"| {r['case']} | {r['impl']} | {ms} | {gib} | {r['rel_err_vs_rewrite']:.1e} |")
    text = "\n".join(lines) + "\n"
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"backward_{card.replace(' ', '_')}_{date}"
    (out_dir / f"{stem}.md").write_text(text)
    (out_dir / f"{stem}.json").write_text(json.dumps({"card": card, "date": date, "torch": torch.__version__,
                                                      "triton": triton.__version__, "rows": rows}, indent=1))
    return text


def _window_mod(b, h, qi, ki):
    return (qi - ki).abs() <= 256


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--n", type=int, default=16384)
    args = ap.parse_args()
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n, scale = args.n, 1 / math.sqrt(D)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(B, H, n, D, device="cuda", dtype=DTYPE, generator=gen)
    i = torch.arange(n, device="cuda")
    rows = []

    causal_keep = i[None, :] <= i[:, None]
    cases = {"causal": {
        "rewrite": lambda q, k, v: torch.ops.rewrite.attention(q, k, v, None, None, scale, True, 0, "nan", "sdpa",
                                                               DTYPE),
        "eager": lambda q, k, v: eager(q, k, v, causal_keep, scale)}}
    w = 256
    spec = MaskSpec("neighborhood", grid=(n,), window=(w,), dilation=(1,), causal=(False,), clamped=(False,),
                    stride=(1,))
    band_keep = (i[:, None] - i[None, :]).abs() <= w
    flex = torch.compile(flex_attention, dynamic=False)
    block_mask = {}

    def flex_window(q, k, v):  # the block mask is built (compiled) on the first call, outside the timing
        if "bm" not in block_mask:
            block_mask["bm"] = torch.compile(create_block_mask)(_window_mod, None, None, n, n, device="cuda")
        return flex(q, k, v, block_mask=block_mask["bm"], scale=scale)

    cases["window_256"] = {
        "rewrite": lambda q, k, v: torch.ops.rewrite.sparse_attention(q, k, v, None, None, scale,
                                                                      op_spec(spec, False), "nan", "triton", DTYPE),
        "eager": lambda q, k, v: eager(q, k, v, band_keep, scale),
        "flex": flex_window}
    for case, fns in cases.items():
        ref = None
        for name, fn in fns.items():
            ms, gib = measure(fn, q, k, v, g)
            row = {"case": case, "n": n, "impl": name, "fwd_bwd_ms": ms, "peak_GiB": gib}
            with torch.no_grad():
                out = fn(q, k, v).float()
            ref = out if ref is None else ref
            row["rel_err_vs_rewrite"] = float((out - ref).norm() / ref.norm())
            rows.append(row)
            print(json.dumps(row), flush=True)
            write(Path(args.out), n, rows)  # after every row: a run cut short keeps what it measured
            torch.cuda.empty_cache()
    print(write(Path(args.out), n, rows))


if __name__ == "__main__":
    main()
