"""Eager semantics on a GPU, as README's Semantics section states them: what the rewritten sites give for
NaN/inf inputs (no input check there) and finite fills (settled rows), against the spelling run eagerly in
float64. Prints one line per case; run on a CUDA machine: python benchmarks/gpu_semantics_check.py"""

from __future__ import annotations

import sys

import torch

sys.path.insert(0, "tests")
from eager_cases import causal, compiled, double, inputs, runtime, window  # noqa: E402

dev = "cuda"


def same_nan(out, ref):
    return bool(torch.equal(out.isnan().cpu(), ref.isnan().cpu()))


def err(out, ref):
    fin = torch.isfinite(ref)
    return float((out.double() - ref)[fin].abs().max()) if bool(fin.any()) else 0.0


def main():
    gen = torch.Generator().manual_seed(0)
    n = 300
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v = (t.to(dev) for t in inputs(gen, 2, 4, 2, n, n, 64, dtype))
        zero = torch.zeros(1, 1, 1, n, dtype=dtype, device=dev)
        keep = (torch.rand(1, 1, n, n, generator=gen) < 0.7).to(dev)
        keep[..., 5, :] = False
        sites = {"window (Triton neighborhood)": (window(16), (zero,)), "causal": (causal(), (zero,)),
                 "run-time mask (SDPA)": (runtime(), (zero, keep)),
                 "window, fill -1e4": (window(16, -1e4), (zero,)),
                 "run-time mask, finfo.min": (runtime(torch.finfo(dtype).min), (zero, keep))}
        for name, (fn, extra) in sites.items():
            run, report = compiled(fn, "auto")
            s = None
            for what in ("clean", "NaN key at a removed key", "NaN value at a removed key", "NaN query"):
                qq, kk, vv = q.clone(), k.clone(), v.clone()
                if what == "NaN key at a removed key":
                    kk[0, 0, n - 1, 0] = float("nan")  # removed for row 0 by every mask above
                elif what == "NaN value at a removed key":
                    vv[0, 0, n - 1, 0] = float("nan")
                elif what == "NaN query":
                    qq[0, 0, 3, 0] = float("nan")
                out = run(qq, kk, vv, *extra)
                s = s or report.sites[0]
                ref = fn(*double((qq, kk, vv, *extra)))
                print(f"{str(dtype):15s} {name:30s} {s.variant:12s} {s.kernel:7s} {what:28s} "
                      f"NaN as eager: {same_nan(out, ref)!s:5s} max err {err(out, ref):.2e}")
    # gradients of a dense site with a row that keeps no key
    q, k, v = (t.to(dev).requires_grad_() for t in inputs(gen, 1, 4, 4, 64, 64, 64, torch.float32))
    keep = torch.ones(1, 1, 64, 64, dtype=torch.bool, device=dev)
    keep[..., 7, :] = False
    fn = runtime()
    zero = torch.zeros(1, 1, 1, 64, device=dev)
    run, _ = compiled(fn, "auto")
    got = torch.autograd.grad(run(q, k, v, zero, keep).sum(), (q, k, v))
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = torch.autograd.grad(fn(qd, kd, vd, zero.double(), keep).sum(), (qd, kd, vd))
    print("grads, masked_fill -inf with an empty row:",
          [bool(torch.equal(a.isnan(), b.isnan())) for a, b in zip(got, want)])


if __name__ == "__main__":
    main()
