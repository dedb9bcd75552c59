"""GPU benchmark: the block-sparse Triton kernel vs FlexAttention and dense cuDNN SDPA.

B=2, H=16, bf16, D in {64, 128}, N = M in {16k, 64k}; a random 128 x 128 block layout per
(batch, head) keeping ~10 % of the blocks plus the diagonal (no empty row). Timed
(triton.testing.do_bench, median):

* ours: ``block_sparse_attention`` on a block map built from the block table
  (``block_map_from_block_keep``, outside the timing);
* Flex: ``flex_attention`` under ``torch.compile`` with a mask_mod that reads the same block table,
  ``create_block_mask(..., BLOCK_SIZE=128, _compile=True)`` built once outside the timing;
* cuDNN SDPA dense (no mask): the speed-of-light reference, % SOL = cuDNN ms × density / ours ms.

TFLOP/s count the kept entries only: 4 · (kept (q, k) pairs over all b, h) · D.
Also timed per call at 64k: our block map from the block table (B=2, H=16), from a dense
[N, N] bool mask (4 GiB; word widths and program sizes swept), a plain torch read of the same
bytes (the bandwidth floor), and Flex's create_block_mask. Correctness at 16k: ours and Flex vs
SDPA on the materialised bool mask (batch 0).

    python -P benchmarks/bench_block_sparse.py --out benchmarks/results [--sweep]

Writes block_sparse_<card>_<date>.{json,md} under --out (card, date, versions, command);
every measurement is also appended to <out>/block_sparse_log.jsonl as it is taken.
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
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from rewrite.codegen import block_map as bmod
from rewrite.codegen.block_map import block_map_from_block_keep, block_map_from_mask
from rewrite.codegen.triton_attention import AttentionConfig
from rewrite.codegen.triton_block_sparse import block_sparse_attention, choose_block_sparse_config

BLOCK = 128
SWEEP = {  # (BLOCK_M, BLOCK_N, warps, stages): kernel tiles dividing the 128 x 128 map tiles
    64: [(128, 128, 8, 3), (128, 64, 4, 3)],
    128: [(128, 128, 8, 2), (128, 64, 8, 3)],
}


def bench(fn, rep: int = 200) -> float:  # noqa: ANN001
    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def log(out: Path, **rec) -> None:  # noqa: ANN003
    print(json.dumps(rec), flush=True)
    with (out / "block_sparse_log.jsonl").open("a") as f:
        f.write(json.dumps(rec) + "\n")


def make_keep(b: int, h: int, nb: int, density: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand(b, h, nb, nb, device="cuda", generator=gen) < density
    return keep | torch.eye(nb, device="cuda", dtype=torch.bool)


def flex_setup(keep: torch.Tensor, n: int):  # noqa: ANN201
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):  # noqa: ANN001, ANN202
        return keep[b, h, q_idx // BLOCK, kv_idx // BLOCK]

    def build():  # noqa: ANN202
        return create_block_mask(mask_mod, keep.shape[0], keep.shape[1], n, n, device="cuda", BLOCK_SIZE=BLOCK,
                                 _compile=True)

    return build, torch.compile(flex_attention, dynamic=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--ns", type=int, nargs="+", default=[16384, 65536])
    ap.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--sweep", action="store_true", help="also time the block-size candidates at the largest N")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--no-builders", action="store_true")
    args = ap.parse_args()
    command = "python -P " + " ".join(shlex.quote(a) for a in sys.argv)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    args.out.mkdir(parents=True, exist_ok=True)
    card = torch.cuda.get_device_name()
    b, h, dtype = 2, 16, torch.bfloat16
    gen = torch.Generator(device="cuda").manual_seed(0)
    rows, builders, sweep, checks = [], [], [], []
    t_start = time.time()

    # ---------------------------------------------------------------- attention
    for n in args.ns:
        nb = triton.cdiv(n, BLOCK)
        keep = make_keep(b, h, nb, args.density, gen)
        kept_blocks = int(keep.sum())
        density = kept_blocks / keep.numel()
        kept_pairs = kept_blocks * BLOCK * BLOCK  # n is a multiple of 128 here
        flex_build, flex = (None, None) if args.no_flex else flex_setup(keep, n)
        flex_mask = None
        if flex_build is not None:
            flex_build()  # compile
            torch.cuda.synchronize()
            flex_mask = flex_build()
        # ------------------------------------------------------------ block-map builders
        if not args.no_builders and n == max(args.ns):
            cfg = choose_block_sparse_config(128, 128, dtype, torch.device("cuda"))
            t = bench(functools.partial(block_map_from_block_keep, keep, BLOCK, BLOCK, n, n, cfg.block_m, cfg.block_n))
            builders.append(dict(what=f"ours: block map from the block table [{b},{h},{nb},{nb}]", n=n, ms=t))
            log(args.out, kind="builder", **builders[-1])
            if flex_build is not None:
                ts = []
                for _ in range(5):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    flex_build()
                    torch.cuda.synchronize()
                    ts.append((time.perf_counter() - t0) * 1e3)
                builders.append(dict(what=f"Flex: create_block_mask(_compile=True), B={b}, H={h}", n=n,
                                     ms=sorted(ts)[len(ts) // 2]))
                log(args.out, kind="builder", **builders[-1])
            # a dense [N, N] bool mask (one for every b, h): the same layout as (b, h) = (0, 0)
            dense = keep[0, 0].repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :n].contiguous()
            gib = dense.numel() / 2**30
            ref_map = block_map_from_block_keep(keep[0, 0], BLOCK, BLOCK, n, n, cfg.block_m, cfg.block_n)
            t = bench(functools.partial(torch.amax, dense.view(torch.int64)), rep=100)
            builders.append(dict(what=f"torch read of the same {gib:.1f} GiB (int64 amax): bandwidth floor", n=n,
                                 ms=t, gbps=dense.numel() / t / 1e6))
            log(args.out, kind="builder", **builders[-1])
            for word in (1, 4, 8):
                for prog in (32768, 65536):
                    bmod.MASK_WORD_BYTES, bmod.MASK_PROGRAM_BYTES = word, prog
                    try:
                        m1 = block_map_from_mask(dense, cfg.block_m, cfg.block_n)
                        same = all(torch.equal(getattr(m1, f), getattr(ref_map, f)) for f in
                                   ("full_count", "full_index", "partial_count", "partial_index"))
                        t = bench(functools.partial(block_map_from_mask, dense, cfg.block_m, cfg.block_n), rep=100)
                        rec = dict(what=f"ours: block map from a dense [N, N] bool mask ({gib:.1f} GiB), "
                                        f"{word}-byte words, {prog // 1024} KiB/program", n=n, ms=t,
                                   gbps=dense.numel() / t / 1e6, same_as_block_table_map=same)
                    except Exception as e:  # noqa: BLE001
                        rec = dict(what=f"dense mask word={word} prog={prog}", n=n,
                                   error=f"{type(e).__name__}: {str(e)[:160]}")
                    builders.append(rec)
                    log(args.out, kind="builder", **rec)
            bmod.MASK_WORD_BYTES, bmod.MASK_PROGRAM_BYTES = 4, 32768
            del dense, ref_map
            torch.cuda.empty_cache()
        for d in args.ds:
            q, k, v = (torch.randn(b, h, n, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
            scale = d**-0.5
            cfg = choose_block_sparse_config(d, d, dtype, q.device)
            bmap = block_map_from_block_keep(keep, BLOCK, BLOCK, n, n, cfg.block_m, cfg.block_n)
            ours = functools.partial(block_sparse_attention, q, k, v, bmap, scale=scale)
            out = ours()
            torch.cuda.synchronize()
            if n <= 16384:  # correctness vs SDPA on the materialised mask, batch 0
                fo = flex(q, k, v, block_mask=flex_mask, scale=scale) if flex is not None else None
                num = [0.0, 0.0]
                den = 0.0
                for h0 in range(0, h, 4):  # 4 heads at a time: the fp32 mask bias is 4 GiB then
                    hs = slice(h0, h0 + 4)
                    tok = keep[0, hs].repeat_interleave(BLOCK, -2).repeat_interleave(BLOCK, -1)[:, :n, :n]
                    ref = F.scaled_dot_product_attention(q[:1, hs].float(), k[:1, hs].float(), v[:1, hs].float(),
                                                         attn_mask=tok, scale=scale)
                    den += float(ref.norm()) ** 2
                    num[0] += float((out[:1, hs].float() - ref).norm()) ** 2
                    if fo is not None:
                        num[1] += float((fo[:1, hs].float() - ref).norm()) ** 2
                    del tok, ref
                rec = dict(n=n, d=d, rel_err_ours_vs_sdpa_fp32=(num[0] / den) ** 0.5)
                if fo is not None:
                    rec["rel_err_flex_vs_sdpa_fp32"] = (num[1] / den) ** 0.5
                del fo
                checks.append(rec)
                log(args.out, kind="check", **rec)
            t_ours = bench(ours)
            t_flex = None
            if flex is not None:
                try:
                    flex(q, k, v, block_mask=flex_mask, scale=scale)
                    torch.cuda.synchronize()
                    t_flex = bench(functools.partial(flex, q, k, v, block_mask=flex_mask, scale=scale))
                except Exception as e:  # noqa: BLE001
                    print(f"flex failed: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                t_cudnn = bench(functools.partial(F.scaled_dot_product_attention, q, k, v, scale=scale),
                                rep=100 if n > 16384 else 200)
            flops = 4.0 * kept_pairs * d
            row = dict(n=n, d=d, density=density, ours_ms=t_ours, flex_ms=t_flex, cudnn_dense_ms=t_cudnn,
                       ours_tflops=flops / t_ours / 1e9, flex_tflops=flops / t_flex / 1e9 if t_flex else None,
                       speedup_vs_flex=t_flex / t_ours if t_flex else None,
                       sol_pct=100 * t_cudnn * density / t_ours, config=cfg.__dict__)
            rows.append(row)
            log(args.out, kind="attention", **row)
            if args.sweep and n == max(args.ns):
                for c in SWEEP[d]:
                    acfg = AttentionConfig(*c)
                    try:
                        fn = functools.partial(block_sparse_attention, q, k, v, bmap, scale=scale, config=acfg)
                        o2 = fn()
                        ok = float((o2.float() - out.float()).norm() / out.float().norm())
                        t = bench(fn, rep=100)
                        rec = dict(n=n, d=d, config=c, ms=t, tflops=flops / t / 1e9, diff_vs_default=ok)
                    except Exception as e:  # noqa: BLE001
                        rec = dict(n=n, d=d, config=c, error=f"{type(e).__name__}: {str(e)[:160]}")
                    sweep.append(rec)
                    log(args.out, kind="sweep", **rec)
            del q, k, v, out, bmap
            torch.cuda.empty_cache()

        del keep, flex_mask
        torch.cuda.empty_cache()

    # ---------------------------------------------------------------- report
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    meta = dict(card=card, date=date, torch=torch.__version__, triton=triton.__version__,
                cudnn=torch.backends.cudnn.version(), command=command, b=b, h=h, dtype=str(dtype),
                block=BLOCK, density_target=args.density, wall_s=time.time() - t_start,
                timing="triton.testing.do_bench median (warmup 25 ms, rep 200 ms; 100 ms for 64k cuDNN/sweeps)")
    slug = re.sub(r"[^A-Za-z0-9]+", "_", card).strip("_")
    stem = args.out / f"block_sparse_{slug}_{date}"
    stem.with_suffix(".json").write_text(json.dumps(dict(meta, rows=rows, builders=builders, sweep=sweep,
                                                         checks=checks), indent=1))

    def f(x, fmt=".2f"):  # noqa: ANN001, ANN202
        return "—" if x is None else format(x, fmt)

    md = [f"# Block-sparse attention vs FlexAttention and dense cuDNN — {card}, {date}", "",
          f"torch {meta['torch']}, triton {meta['triton']}, cuDNN {meta['cudnn']}; B={b}, H={h}, bf16, "
          f"128 x 128 blocks, random per (b, h) at {args.density:.0%} + the diagonal; {meta['timing']}.",
          "TFLOP/s = 4 · kept pairs · D / time; % SOL = dense cuDNN time × density / ours.", "",
          f"Command: `{command}`", "",
          "| D | N | density | ours ms (TFLOP/s) | Flex ms (TFLOP/s) | Flex / ours | cuDNN dense ms | % SOL | config |",
          "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c = r["config"]
        md.append(f"| {r['d']} | {r['n']} | {r['density']:.3f} | "
                  f"{f(r['ours_ms'], '.3f')} ({f(r['ours_tflops'], '.0f')}) "
                  f"| {f(r['flex_ms'], '.3f')} ({f(r['flex_tflops'], '.0f')}) | {f(r['speedup_vs_flex'])}x "
                  f"| {f(r['cudnn_dense_ms'], '.2f')} | {f(r['sol_pct'], '.0f')} | "
                  f"BM{c['block_m']} BN{c['block_n']} w{c['num_warps']} s{c['num_stages']} |")
    md += ["", "## Block maps per call", "", "| what | N | ms | GB/s read |", "|---|---|---|---|"]
    for r in builders:
        md.append(f"| {r['what']}{' — ' + r['error'] if 'error' in r else ''} | {r['n']} | {f(r.get('ms'), '.3f')} "
                  f"| {f(r.get('gbps'), '.0f')} |")
    if checks:
        md += ["", "## Correctness at 16k (batch 0, vs SDPA fp32 on the materialised bool mask)", ""]
        md += [f"- D={c['d']}: ours rel err {c['rel_err_ours_vs_sdpa_fp32']:.2e}"
               + (f", Flex {c['rel_err_flex_vs_sdpa_fp32']:.2e}" if "rel_err_flex_vs_sdpa_fp32" in c else "")
               for c in checks]
    if sweep:
        md += ["", "## Block-size sweep (largest N)", "", "| D | (BM, BN, warps, stages) | ms | TFLOP/s |",
               "|---|---|---|---|"]
        md += [f"| {s['d']} | {tuple(s['config'])} | {f(s.get('ms'), '.3f')} | {f(s.get('tflops'), '.0f')}"
               f"{' ' + s['error'] if 'error' in s else ''} |" for s in sweep]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
