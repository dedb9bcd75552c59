"""GPU benchmark: sparse attention for structured masks (codegen/triton_neighborhood.py) against
FlexAttention and cuDNN SDPA.

B=2, H=16, bf16, [B, H, N, D] contiguous, D in {64, 128}:

  (a) 1-D neighborhood |i − j| ≤ 512, N in {16384, 65536}: ours vs FlexAttention (torch.compile'd
      flex_attention, block mask built once outside the timing; create_block_mask, compiled, timed
      on its own) and dense cuDNN SDPA.
  (b) 2-D neighborhood on a 256 × 256 grid (N = 65536), 13 × 13 window (|dy| ≤ 6, |dx| ≤ 6), and
      the same 13 taps per axis dilated by 2 (|dy|, |dx| ≤ 12, even): ours vs Flex with the
      row-major mask_mod (q // 256, q % 256 …).
  (c) causal vs cuDNN causal SDPA, N in {16384, 65536}.

Times: triton.testing.do_bench medians (warmup 25 ms, rep 100 ms). TFLOP/s counts the kept entries
only, 4·B·H·kept·D; speed of light (SOL) = dense cuDNN time × density / our time (GNA's model).
Correctness: at N = 16384 (the 2-D cases on a 128 × 128 grid) ours, on 2 heads, against float32
SDPA with the materialised bool mask.

    python benchmarks/bench_sparse.py --out benchmarks/results [--sweep]

Writes sparse_neighborhood_<card>_<date>.{json,md} under --out (card, date, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import re
import shlex
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rewrite.codegen.neighborhood_tiles import NeighborhoodConfig, choose_config, kernel_axes, plan_tiles
from rewrite.codegen.triton_neighborhood import neighborhood_attention
from rewrite.ir.mask import MaskSpec, kept_count

B, H, DTYPE = 2, 16, torch.bfloat16
G2 = 256  # 2-D grid side


def nbhd(grid, window, dilation=None) -> MaskSpec:
    nd = len(grid)
    return MaskSpec("neighborhood", grid=tuple(grid), window=tuple(window), dilation=tuple(dilation or (1,) * nd),
                    causal=(False,) * nd, clamped=(False,) * nd, stride=(1,) * nd)


def mm_1d(b, h, q, kv):
    return (q - kv).abs() <= 512


@functools.cache  # one function object per mask: torch.compile caches by it
def _mm_2d(side: int, w: int, dil: int):
    def mask_mod(b, h, q, kv):
        dy = q // side - kv // side
        dx = q % side - kv % side
        keep = (dy.abs() <= w) & (dx.abs() <= w)
        if dil > 1:
            keep = keep & (dy % dil == 0) & (dx % dil == 0)
        return keep
    return mask_mod


def mm_causal(b, h, q, kv):
    return kv <= q


# name → (spec at N, flex mask_mod at N or None, Ns)
CASES = {
    "1d_w512": (lambda n: nbhd((n,), (512,)), lambda n: mm_1d, [16384, 65536]),
    "2d_13x13": (lambda n: nbhd((int(n**0.5),) * 2, (6, 6)), lambda n: _mm_2d(int(n**0.5), 6, 1), [65536]),
    "2d_13x13_dil2": (lambda n: nbhd((int(n**0.5),) * 2, (12, 12), (2, 2)),
                      lambda n: _mm_2d(int(n**0.5), 12, 2), [65536]),
    "causal": (lambda n: MaskSpec("causal"), None, [16384, 65536]),
}
GOALS = {"1d_w512": ("flex", 1.25), "2d_13x13": ("flex", 5.0), "2d_13x13_dil2": ("flex", 5.0)}

SWEEP = {  # (block_m, block_n, warps, stages) tried with --sweep at the given N
    ("1d_w512", 64): [(128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 128, 4, 3), (64, 64, 4, 3),
                      (64, 64, 4, 4), (64, 32, 4, 3), (32, 64, 4, 3), (64, 128, 4, 3)],
    ("1d_w512", 128): [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
                       (64, 32, 4, 3), (64, 64, 8, 3)],
    ("2d_13x13", 64): [(128, 64, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3)],
    ("2d_13x13", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 2), (64, 32, 4, 3), (128, 32, 8, 3)],
    ("2d_13x13_dil2", 64): [(128, 64, 4, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
    ("2d_13x13_dil2", 128): [(128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3)],
}


def bench(fn, rep: int = 100) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def wall_ms(fn, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def log(*a) -> None:
    print(*a, flush=True)


def guarded(what: str, fn, errors: list):
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - a benchmark reports what failed and goes on
        msg = f"{what}: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        log("ERROR", msg)
        traceback.print_exc()
        errors.append(msg)
        return None


def sdpa_dense(q, k, v, causal: bool):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def correctness(name: str, d: int, errors: list) -> dict | None:
    """Ours vs float32 SDPA with the materialised mask at N = 16384, 2 heads."""
    n = 16384
    spec = CASES[name][0](n)
    if name.startswith("2d"):
        side = 128
        spec = nbhd((side, side), spec.window, spec.dilation)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, d, generator=gen, device="cuda", dtype=DTYPE) for _ in range(3))
    out = neighborhood_attention(q, k, v, spec, scale=d**-0.5).float()
    i = torch.arange(n, device="cuda")
    if spec.kind == "causal":
        keep = i[None, :] <= i[:, None]
    elif len(spec.grid) == 1:
        keep = (i[:, None] - i[None, :]).abs() <= spec.window[0]
    else:
        side, w, dl = spec.grid[1], spec.window[0], spec.dilation[0]
        dy = i[:, None] // side - i[None, :] // side
        dx = i[:, None] % side - i[None, :] % side
        keep = (dy.abs() <= w) & (dx.abs() <= w) & (dy % dl == 0) & (dx % dl == 0)
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep, scale=d**-0.5)
    err = float((out - ref).norm() / ref.norm())
    mx = float((out - ref).abs().max())
    ok = err < 1e-2 and not torch.isnan(out).any().item()
    log(f"correctness {name} d={d}: rel {err:.2e} max {mx:.2e} ok={ok}")
    if not ok:
        errors.append(f"correctness {name} d={d}: rel err {err:.3g}")
    return {"case": name, "d": d, "n": n, "grid": spec.grid, "rel_err_vs_fp32_sdpa": err, "max_abs_err": mx,
            "ok": ok}


def run_one(name: str, n: int, d: int, args, flex, cbm, dense: dict, sweep_rows: list, errors: list) -> dict:
    spec_fn, mm_fn, _ = CASES[name]
    spec = spec_fn(n)
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v = (torch.randn(B, H, n, d, generator=gen, device="cuda", dtype=DTYPE) for _ in range(3))
    scale = d**-0.5
    kept = kept_count(spec, n, n)
    density = kept / (n * n)
    causal = spec.kind == "causal"
    row = {"case": name, "n": n, "d": d, "density": density, "kept": kept}
    if (n, d) not in dense:
        dense[(n, d)] = guarded(f"cudnn dense {n} {d}", lambda: bench(
            functools.partial(sdpa_dense, q, k, v, False), rep=50 if n > 20000 else 100), errors)
    row["cudnn_dense_ms"] = dense[(n, d)]
    if causal:
        row["cudnn_causal_ms"] = guarded(f"cudnn causal {n} {d}", lambda: bench(
            functools.partial(sdpa_dense, q, k, v, True)), errors)

    axes = tuple(kernel_axes(spec, n, n))
    cfg = choose_config(d, d, DTYPE, q.device, axes)
    qp, kp, _, tiles, full = plan_tiles(axes, cfg.block_m, cfg.block_n)
    row["config"] = f"BM{cfg.block_m} BN{cfg.block_n} w{cfg.num_warps} s{cfg.num_stages} q{qp} k{kp}"
    row["tiles_per_bh"], row["full_tiles_per_bh"] = tiles, full
    ours = functools.partial(neighborhood_attention, q, k, v, spec, scale=scale)
    out = guarded(f"ours {name} {n} {d}", ours, errors)
    row["ours_ms"] = guarded(f"ours bench {name}", lambda: bench(ours), errors)
    if args.sweep and (name, d) in SWEEP and (n == 16384 or name.startswith("2d") or args.ns):
        configs = SWEEP[(name, d)]
        if args.ns:  # a focused re-run: the candidates not yet measured at this N, and the table's
            configs = [c for c in configs if c[:2] != (128, 128) and c != (128, 64, 4, 4)]
        for c in configs:
            c = NeighborhoodConfig(*c)
            cq, ck, _, ct, _ = plan_tiles(axes, c.block_m, c.block_n)
            fn = functools.partial(neighborhood_attention, q, k, v, spec, scale=scale, config=c)
            ms = guarded(f"sweep {name} {c}", functools.partial(bench, fn), errors)
            sweep_rows.append({"case": name, "n": n, "d": d, "config": str(c), "q_patch": cq,
                               "k_patch": ck, "tiles_per_bh": ct, "ms": ms})
            log(f"  sweep {name} n={n} d={d} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages} "
                f"q{cq} k{ck} tiles {ct}: {ms}")
    if mm_fn is not None and not args.no_flex:
        mask_mod = mm_fn(n)
        build = functools.partial(cbm, mask_mod, None, None, n, n, device="cuda")
        bm = guarded(f"block mask {name} {n}", build, errors)
        if bm is not None:
            row["flex_block_mask_ms"] = guarded("block mask time", functools.partial(wall_ms, build), errors)
            fx = functools.partial(flex, q, k, v, block_mask=bm, scale=scale)
            fout = guarded(f"flex {name} {n} {d}", fx, errors)
            row["flex_ms"] = guarded("flex bench", functools.partial(bench, fx), errors)
            if fout is not None and out is not None:
                o, f = out.float(), fout.float()
                row["ours_vs_flex_rel_err"] = float((o - f).norm() / f.norm())
    fl = 4.0 * B * H * kept * d
    if row.get("ours_ms"):
        row["ours_tflops"] = fl / row["ours_ms"] / 1e9
        if row.get("cudnn_dense_ms"):
            row["sol_pct"] = 100.0 * row["cudnn_dense_ms"] * density / row["ours_ms"]
            row["speedup_vs_dense_cudnn"] = row["cudnn_dense_ms"] / row["ours_ms"]
        if row.get("flex_ms"):
            row["speedup_vs_flex"] = row["flex_ms"] / row["ours_ms"]
        if causal and row.get("cudnn_causal_ms"):
            row["ours_over_cudnn_causal_time"] = row["ours_ms"] / row["cudnn_causal_ms"]
    if row.get("flex_ms"):
        row["flex_tflops"] = fl / row["flex_ms"] / 1e9
    log(json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--sweep", action="store_true", help="also time the SWEEP block-size candidates")
    ap.add_argument("--cases", nargs="+", default=list(CASES))
    ap.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--ns", type=int, nargs="+", default=None, help="only these N (default: each case's own)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--date", default=dt.date.today().isoformat())
    args = ap.parse_args()
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    card = torch.cuda.get_device_name()
    errors: list[str] = []
    rows: list[dict] = []
    sweep_rows: list[dict] = []
    checks: list[dict] = []
    dense: dict[tuple[int, int], float | None] = {}

    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)  # one compile per (mask, N, D): more than the default 8
    flex = torch.compile(flex_attention, dynamic=False)
    cbm = torch.compile(create_block_mask, dynamic=False)

    for d in args.ds:
        for name in args.cases:
            c = guarded(f"correctness {name} d={d}", functools.partial(correctness, name, d, errors), errors)
            if c:
                checks.append(c)
    if errors:  # the kernel does not compile or is wrong: stop before the long part
        write(args.out, card, args.date, command, rows, sweep_rows, checks, errors)
        sys.exit(1)

    for name in args.cases:
        for n in CASES[name][2]:
            if args.ns and n not in args.ns:
                continue
            for d in args.ds:
                rows.append(run_one(name, n, d, args, flex, cbm, dense, sweep_rows, errors))
                torch.cuda.empty_cache()
                write(args.out, card, args.date, command, rows, sweep_rows, checks, errors)  # a time box keeps each row

    write(args.out, card, args.date, command, rows, sweep_rows, checks, errors)


def fmt(x, spec=".3f") -> str:
    return "—" if x is None else format(x, spec)


def write(out_dir: Path, card: str, date: str, command: str, rows, sweep_rows, checks, errors) -> None:
    tag = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_")
    meta = {"card": card, "date": date, "torch": torch.__version__, "triton": triton.__version__,
            "cudnn": torch.backends.cudnn.version(), "command": command, "B": B, "H": H, "dtype": str(DTYPE)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"sparse_neighborhood_{tag}_{date}.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "sweep": sweep_rows, "correctness": checks, "errors": errors}, indent=1))
    lines = [f"# Sparse neighborhood attention vs FlexAttention / cuDNN — {card}, {date}", "",
             f"torch {torch.__version__}, triton {triton.__version__}, cuDNN {torch.backends.cudnn.version()}; "
             f"B={B}, H={H}, bf16, [B,H,N,D] contiguous; triton.testing.do_bench median (warmup 25 ms, rep 100 ms). "
             "TFLOP/s = 4·B·H·kept·D / time (kept entries only); SOL = dense cuDNN time × density / our time.", "",
             f"Command: `{command}`", "",
             "| case | N | D | density | ours ms | TFLOP/s | SOL % | Flex ms | vs Flex | Flex block mask ms "
             "| cuDNN dense ms | cuDNN causal ms | ours / cuDNN causal | goal | config |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        goal = GOALS.get(r["case"])
        g = "—"
        if goal and r.get("speedup_vs_flex"):
            g = f"≥{goal[1]}× Flex: {'met' if r['speedup_vs_flex'] >= goal[1] else 'MISSED'}"
        lines.append(
            f"| {r['case']} | {r['n']} | {r['d']} | {r['density']:.4f} | {fmt(r.get('ours_ms'))} | "
            f"{fmt(r.get('ours_tflops'), '.0f')} | {fmt(r.get('sol_pct'), '.0f')} | {fmt(r.get('flex_ms'))} | "
            f"{fmt(r.get('speedup_vs_flex'), '.2f')}× | {fmt(r.get('flex_block_mask_ms'), '.1f')} | "
            f"{fmt(r.get('cudnn_dense_ms'))} | {fmt(r.get('cudnn_causal_ms'))} | "
            f"{fmt(r.get('ours_over_cudnn_causal_time'), '.2f')} | {g} | {r.get('config', '')} |")
    if checks:
        lines += ["", "Correctness (N = 16384; 2-D on a 128 × 128 grid; 2 heads; vs float32 SDPA with the "
                  "materialised bool mask):", "", "| case | D | rel. error | max abs error | ok |",
                  "|---|---|---|---|---|"]
        lines += [f"| {c['case']} | {c['d']} | {c['rel_err_vs_fp32_sdpa']:.2e} | {c['max_abs_err']:.2e} | {c['ok']} |"
                  for c in checks]
    if sweep_rows:
        lines += ["", "Sweep (ms; patches from the planner):", "", "| case | N | D | config | q patch | k patch "
                  "| tiles / (b,h) | ms |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {s['case']} | {s['n']} | {s['d']} | {s['config']} | {s['q_patch']} | {s['k_patch']} | "
                  f"{s['tiles_per_bh']} | {fmt(s['ms'])} |" for s in sweep_rows]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {e}" for e in errors]
    (out_dir / f"sparse_neighborhood_{tag}_{date}.md").write_text("\n".join(lines) + "\n")
    log("\n".join(lines))


if __name__ == "__main__":
    main()
