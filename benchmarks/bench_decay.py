"""GPU benchmark: decay-gated linear attention (codegen/triton_decay.py through ``rewrite::decay_linear_attention``)
against flash-linear-attention, side by side in one run, kernel only.

    python benchmarks/bench_decay.py --out benchmarks/results [--ns 16384,65536] [--ds 64,128]

B=2, H=16, bf16, D in (64, 128), N in (16k, 64k). Our layout is [B, H, N, D]; fla gets its native
[B, N, H, D] (the same values, made contiguous outside the timing). Both get scale = 1 (the queries are
pre-scaled by D^-½ for both).

Rows:
- retention (RetNet, γ_h = 1 − 2^(−5−h)): ours with the constant G_p = p·log γ_h vs fla ``chunk_retention``.
- simple GLA (a per-head log gate per step, g = logsigmoid(randn)): ours with G = cumsum(g) computed inside
  the timed region (what a rewritten model runs) vs fla ``chunk_simple_gla(g=g)``.
- forward, and forward + backward (grads of q, k, v and, for GLA, g; retention's G is a constant).
``triton.testing.do_bench`` median, ms. Errors: max |ours − fla| ÷ max |fla| per output and gradient.
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

import rewrite.codegen.decay_ops  # noqa: F401  (registers torch.ops.rewrite.decay_linear_attention)
from rewrite.codegen.linear_kernel_utils import TIMINGS, TUNED

OP = torch.ops.rewrite.decay_linear_attention


def bench(fn):
    fn()  # the first call times a few launch configurations per shape (rewrite's tuner)
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def relerr(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def _fwd_bwd(run, leaves, do):
    def step():
        for t in leaves:
            t.grad = None
        run().backward(do)
    return step


def run_one(d: int, n: int, fla_ops, B: int = 2, H: int = 16, dev: str = "cuda") -> dict:
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, H, n, d, device=dev, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    q = (q * d ** -0.5).to(torch.bfloat16)
    gate = F.logsigmoid(torch.randn(B, H, n, device=dev, generator=gen))
    do = torch.randn(B, H, n, d, device=dev, dtype=torch.bfloat16, generator=gen)
    tq, tk, tv, tdo = (t.transpose(1, 2).contiguous() for t in (q, k, v, do))
    tgate = gate.transpose(1, 2).contiguous()
    log_gamma = (1 - 2.0 ** (-5.0 - torch.arange(H, device=dev, dtype=torch.float32))).log()
    g_ret = (log_gamma[:, None] * torch.arange(n, device=dev, dtype=torch.float32)).expand(B, H, n).contiguous()
    r = {"D": d, "N": n}
    ours = {"ret": lambda q, k, v, g: OP(q, k, v, g_ret, "triton", torch.bfloat16),
            "gla": lambda q, k, v, g: OP(q, k, v, g.cumsum(-1), "triton", torch.bfloat16)}
    theirs = {}
    if fla_ops is not None:
        chunk_retention, chunk_simple_gla = fla_ops
        theirs = {"ret": lambda q, k, v, g: chunk_retention(q, k, v, scale=1.0)[0],
                  "gla": lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g, scale=1.0)[0]}
    for name in ("ret", "gla"):
        r[f"{name}_fwd_ours"] = bench(lambda f=ours[name]: f(q, k, v, gate))
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v, gate)]
        if name == "ret":
            leaves[3].requires_grad_(False)
        r[f"{name}_fwdbwd_ours"] = bench(_fwd_bwd(lambda f=ours[name], a=leaves: f(*a), leaves, do))
        if name in theirs:
            r[f"{name}_fwd_fla"] = bench(lambda f=theirs[name]: f(tq, tk, tv, tgate))
            tleaves = [t.detach().clone().requires_grad_() for t in (tq, tk, tv, tgate)]
            if name == "ret":
                tleaves[3].requires_grad_(False)
            r[f"{name}_err_out"] = relerr(ours[name](q, k, v, gate), theirs[name](tq, tk, tv, tgate).transpose(1, 2))
            try:  # fla refuses some backward passes on some (GPU, Triton) pairs: recorded, not hidden
                r[f"{name}_fwdbwd_fla"] = bench(_fwd_bwd(lambda f=theirs[name], a=tleaves: f(*a), tleaves, tdo))
            except RuntimeError as exc:
                r[f"{name}_fwdbwd_fla_error"] = str(exc)[:300]
                _check_against_torch_path(r, name, ours[name], leaves, do)
                continue
            # gradient differences on one fresh call each
            for t in (*leaves, *tleaves):
                t.grad = None
            ours[name](*leaves).backward(do)
            theirs[name](*tleaves).backward(tdo)
            for i, what in enumerate("qkvg"):
                if leaves[i].grad is not None and tleaves[i].grad is not None:
                    want = tleaves[i].grad.transpose(1, 2) if what != "g" else tleaves[i].grad.transpose(1, 2)
                    r[f"{name}_err_d{what}"] = relerr(leaves[i].grad, want)
        torch.cuda.empty_cache()
    return r


def _check_against_torch_path(r, name, run, leaves, do):
    """Where fla gives no backward: our Triton gradients against our chunked PyTorch path in float32."""
    for t in leaves:
        t.grad = None
    run(*leaves).backward(do)
    got = [t.grad for t in leaves]
    ref = [t.detach().float().requires_grad_(t.requires_grad) for t in leaves]
    torch_op = (lambda q, k, v, g: OP(q, k, v, g.cumsum(-1), "torch", torch.float32)) if name == "gla" else None
    if torch_op is None:
        return
    torch_op(*ref).backward(do.float())
    for i, what in enumerate("qkvg"):
        if got[i] is not None and ref[i].grad is not None:
            r[f"{name}_err_vs_torch_d{what}"] = relerr(got[i], ref[i].grad)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ns", default="16384,65536")
    ap.add_argument("--ds", default="64,128")
    args = ap.parse_args()
    try:
        import fla
        from fla.ops.retention import chunk_retention
        from fla.ops.simple_gla import chunk_simple_gla
        fla_ops, fla_version = (chunk_retention, chunk_simple_gla), getattr(fla, "__version__", "?")
    except Exception as exc:  # recorded, not hidden
        fla_ops, fla_version = None, f"unavailable: {exc}"
    B, H = 2, 16
    card = torch.cuda.get_device_name()
    meta = {"card": card, "date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton.__version__, "fla": fla_version, "python": platform.python_version(),
            "command": "python " + " ".join(sys.argv), "B": B, "H": H, "dtype": "bfloat16",
            "timing": "triton.testing.do_bench median, ms"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"decay_{card.replace(' ', '_')}_{meta['date']}"
    rows = []
    for d in (int(x) for x in args.ds.split(",")):
        for n in (int(x) for x in args.ns.split(",")):
            rows.append(run_one(d, n, fla_ops, B, H))
            print(json.dumps(rows[-1]), flush=True)
            meta["tuned_configs"] = {str(k): c for k, c in TUNED.items()}
            meta["tuner_timings_ms"] = {str(k): [(c, t) for c, t in v] for k, v in TIMINGS.items()}
            (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
            (out / f"{stem}.md").write_text(_markdown(meta, rows))
    print(_markdown(meta, rows))


def _markdown(meta, rows) -> str:
    def cell(r, a, b):
        if r.get(a) is None or r.get(b) is None:
            return f"{r.get(a, float('nan')):.3f} | — | —"
        return f"{r[a]:.3f} | {r[b]:.3f} | {r[b] / r[a]:.2f}"

    lines = [f"# Decay-gated linear attention on {meta['card']}", "",
             f"{meta['date']}, torch {meta['torch']}, triton {meta['triton']}, fla-core {meta['fla']}, "
             f"B={meta['B']}, H={meta['H']}, {meta['dtype']}, {meta['timing']}.", "",
             f"Command: `{meta['command']}`", "",
             "| D | N | retention fwd ours | fla | × | retention fwd+bwd ours | fla | × | "
             "GLA fwd ours | fla | × | GLA fwd+bwd ours | fla | × |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['D']} | {r['N']} | {cell(r, 'ret_fwd_ours', 'ret_fwd_fla')} | "
                     f"{cell(r, 'ret_fwdbwd_ours', 'ret_fwdbwd_fla')} | {cell(r, 'gla_fwd_ours', 'gla_fwd_fla')} | "
                     f"{cell(r, 'gla_fwdbwd_ours', 'gla_fwdbwd_fla')} |")
    lines += ["", "× = fla time ÷ ours (higher is better). ours = `rewrite::decay_linear_attention[triton]` "
              "(GLA: including the cumsum of the gates); fla = `chunk_retention` / `chunk_simple_gla`, kernel only.",
              "", "Max relative differences ours vs fla (÷ max |fla|), per row:", ""]
    for r in rows:
        errs = ", ".join(f"{k.replace('_err_', ' ')} {v:.2g}" for k, v in r.items() if "_err_" in k)
        lines.append(f"- D={r['D']}, N={r['N']}: {errs or '—'}")
        lines += [f"  - {k}: {v}" for k, v in r.items() if k.endswith("_error")]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
