"""Per-call cost of a rewritten attention where the kernel is short: decode steps and small prefills.

Issue 12 item 5: the rewritten call should add at most a few microseconds of host work over the
kernel it runs. Side by side, in one process, per point (bf16, B=2, H=16, D=64 by default):

* ``sdpa``: the direct ``F.scaled_dot_product_attention`` call (the anchor);
* ``rewrite``: ``rewrite.compile`` of the attention as a model writes it (matmul, a causal additive
  mask from arange for prefills, softmax, matmul);
* ``inductor``: ``torch.compile`` of the same spelling (Inductor alone);
* ``rewrite+inductor``: ``rewrite.compile(..., inductor=True)`` where that option exists;
* each of them again replayed from a CUDA graph captured by hand (``--cudagraphs``), which removes
  the host path: what is left is the kernels.

Points: decode N=1 against M = 4k and 32k keys (no mask: one query sees every key), prefills N = M
in {128, 1024, 4096} (causal), each written two ways: Hugging Face's additive finfo.min mask ("hf":
a finite fill, whose rows the op settles against eager, a host sync today) and nanoGPT's −inf
masked_fill ("neginf": nothing to settle). Time per call: CUDA events around ``--calls`` back-to-back calls after
a warm-up, the median of 5 such loops (so a host-bound call shows its host time). A variant that
fails (an option that does not exist, a capture that syncs) is recorded with its error, not dropped.

    python -P benchmarks/bench_overhead.py --out benchmarks/results [--cudagraphs]
    python -P benchmarks/bench_overhead.py --device cpu --smoke      # tiny sizes: host time on a CPU

Writes overhead_<card>_<date>.{json,md} under --out (card, date, versions, command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import rewrite


def decode_attention(q, k, v):
    """One new query against the cache: every key is visible."""
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def prefill_attention(q, k, v):
    """Hugging Face's eager order: an additive finfo.min causal mask built from positions."""
    n = q.shape[-2]
    pos = torch.arange(n, device=q.device)
    mask = torch.zeros(n, n, device=q.device, dtype=q.dtype).masked_fill(pos[None, :] > pos[:, None],
                                                                         torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + mask
    return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


def prefill_neg_inf(q, k, v):
    """nanoGPT's order: a tril buffer, masked_fill with −inf (no finite fill for the kernel to settle)."""
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.matmul(F.softmax(s.masked_fill(~keep, float("-inf")), dim=-1), v)


def sdpa_call(q, k, v):
    """The user's own SDPA call (issue 15: it must keep its kernel through the rewrite)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[-2] > 1)


SPELLINGS = {"decode": decode_attention, "hf": prefill_attention, "neginf": prefill_neg_inf, "sdpa_call": sdpa_call}


def variants(spelling, causal: bool) -> dict:
    out = {"sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal),
           "rewrite": rewrite.compile(spelling),
           "inductor": torch.compile(spelling, dynamic=False)}
    try:
        out["rewrite+inductor"] = rewrite.compile(spelling, inductor=True)
    except TypeError as exc:  # the option does not exist in this version
        out["rewrite+inductor"] = exc
    return out


def per_call_ms(fn, args, calls: int, device: str) -> float:
    loops = []
    for _ in range(5):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(*args)
            end.record()
            torch.cuda.synchronize()
            loops.append(start.elapsed_time(end) / calls)
        else:
            t = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            loops.append((time.perf_counter() - t) * 1e3 / calls)
    return statistics.median(loops)


def profile_calls(fn, args, row: dict, calls: int = 200) -> None:
    """Where a rewritten call's host time goes: cProfile of back-to-back calls, top functions by own time."""
    import cProfile
    import io
    import pstats

    fn(*args)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        fn(*args)
    torch.cuda.synchronize() if args[0].is_cuda else None
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(14)
    print(f"== profile of rewrite at N={row['N']} M={row['M']} {row['spelling']} ({calls} calls)\n{text.getvalue()}",
          flush=True)


def graphed(fn, args):
    """``fn`` replayed from a CUDA graph captured on ``args`` (static inputs)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn(*args)
    return lambda *_: graph.replay()


def measure(n: int, m: int, spelling_name: str, b: int, h: int, d: int, args: argparse.Namespace) -> dict:
    dev = args.device
    gen = torch.Generator(device=dev).manual_seed(n * 7 + m)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    q = torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen)
    k, v = (torch.randn(b, h, m, d, device=dev, dtype=dtype, generator=gen) for _ in range(2))
    causal = n > 1
    spelling = SPELLINGS[spelling_name]
    row = {"N": n, "M": m, "spelling": spelling_name, "B": b, "H": h, "D": d}
    site = rewrite.inspect(spelling, q, k, v).sites
    row["site"] = f"{site[0].variant} on {site[0].kernel}" if site and site[0].rewritten else "not rewritten"
    ref = spelling(q.float(), k.float(), v.float())
    for name, fn in variants(spelling, causal).items():
        if isinstance(fn, Exception):
            row[name] = f"n/a: {fn}"[:120]
            continue
        try:
            fn(q, k, v)  # compile outside the timing
            row[f"{name}_err"] = float((fn(q, k, v).float() - ref).abs().max())
            row[name] = per_call_ms(fn, (q, k, v), args.calls, dev)
            if args.cudagraphs and dev == "cuda":
                row[f"{name}_graphed"] = per_call_ms(graphed(fn, (q, k, v)), (q, k, v), args.calls, dev)
        except Exception as exc:  # noqa: BLE001 - a failing variant is a result, with its error
            row.setdefault(name, f"failed: {type(exc).__name__}: {exc}"[:160])
            if args.cudagraphs:
                row.setdefault(f"{name}_graphed", f"failed: {type(exc).__name__}: {exc}"[:160])
    if args.profile and not isinstance(row.get("rewrite"), str):
        profile_calls(variants(spelling, causal)["rewrite"], (q, k, v), row)
    anchor = row.get("sdpa")
    for name in ("rewrite", "inductor", "rewrite+inductor"):
        if isinstance(row.get(name), float) and isinstance(anchor, float):
            row[f"{name}_vs_sdpa"] = anchor / row[name]
    print(json.dumps(row), flush=True)
    return row


def points(args: argparse.Namespace) -> list[tuple[int, int, str]]:
    sizes = [(1, 64), (17, 17)] if args.smoke else [(1, 4096), (1, 32768), (128, 128), (1024, 1024), (4096, 4096)]
    return [(n, m, name) for n, m in sizes for name in (["decode", "sdpa_call"] if n == 1 else
                                                        ["hf", "neginf", "sdpa_call"])]


def fmt(x) -> str:
    return f"{x:.4f}" if isinstance(x, float) else str(x or "–")


def write(rows: list[dict], out: Path, device: str, suffix: str = "") -> None:
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    date = dt.date.today().isoformat()
    triton = sys.modules.get("triton")
    meta = {"card": card, "date": date, "torch": torch.__version__,
            "triton": getattr(triton, "__version__", "none"), "command": "python -P " + shlex.join(sys.argv)}
    stem = f"overhead_{re.sub(r'[^A-Za-z0-9]+', '_', card).strip('_')}_{date}{suffix}"
    (out / f"{stem}.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    names = ["sdpa", "rewrite", "inductor", "rewrite+inductor"]
    graphed_cols = [f"{n}_graphed" for n in names] if any(f"{names[0]}_graphed" in r for r in rows) else []
    lines = [f"# Per-call time of a short attention: rewrite vs the direct SDPA call ({card})", "",
             f"{date}, torch {meta['torch']}, triton {meta['triton']}; `{meta['command']}`", "",
             "ms per call (median of 5 loops of back-to-back calls); ×: the direct SDPA call's time / this one's.", "",
             "| N | M | spelling | site | " + " | ".join(names + graphed_cols) + " | rewrite × | inductor × |",
             "|" + "---|" * (6 + len(names) + len(graphed_cols))]
    for r in rows:
        cells = [fmt(r.get(c)) for c in names + graphed_cols]
        lines.append(f"| {r['N']} | {r['M']} | {r['spelling']} | {r['site']} | " + " | ".join(cells)
                     + f" | {fmt(r.get('rewrite_vs_sdpa'))} | {fmt(r.get('inductor_vs_sdpa'))} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--b", type=int, default=2)
    p.add_argument("--h", type=int, default=16)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--cudagraphs", action="store_true")
    p.add_argument("--profile", action="store_true", help="print a cProfile of the rewrite variant's calls per point")
    p.add_argument("--smoke", action="store_true", help="tiny sizes (checks the script; a CPU run shows host time)")
    args = p.parse_args()
    rows = [measure(n, m, name, args.b, args.h, args.d, args) for n, m, name in points(args)]
    args.out.mkdir(parents=True, exist_ok=True)
    write(rows, args.out, args.device, "_smoke" if args.smoke else "")


if __name__ == "__main__":
    main()
