"""Gradients follow the spelling's eager gradients (issue 10, item 8), and deliberate departures from
eager are in the report (item 10).

Where a row keeps no key eager's gradients differ by spelling: ``masked_fill(−inf)`` / ``where``
give a NaN row whose weights make every grad_v NaN, grad_q and grad_k finite; an additive −inf bias
makes grad_q (that row) and grad_k (every key) NaN too; a finite fill gives finite gradients; an
``F.scaled_dot_product_attention`` call gives 0 and finite gradients. Each is compiled on the torch
and Triton backends and its gradients compared with eager autograd in float64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from eager_cases import (
    additive_lag,
    additive_window,
    compiled,
    double,
    inputs,
    rewritten_site,
    runtime,
    same_as_eager,
    sdpa_mask,
    where_runtime,
    window,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.reuse, Phase.generate])
GRAD_TOL = {torch.float64: 1e-8, torch.float32: 5e-4}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _grads(fn, args, weight):
    leaves = [a.detach().clone().requires_grad_() if a.is_floating_point() else a for a in args]
    out = fn(*leaves)
    wrt = [t for t in leaves if t.requires_grad]
    return out, torch.autograd.grad((out * weight.to(out.dtype)).sum(), wrt)


def _compare_grads(got, want, dtype, what):
    for i, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(torch.isnan(g), torch.isnan(w)), (
            f"{what}: grad {i} NaN positions differ ({int(torch.isnan(g).sum())} vs {int(torch.isnan(w).sum())})")
        tol = GRAD_TOL[dtype] * max(1.0, float(w.nan_to_num().abs().max()))
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=GRAD_TOL[dtype], equal_nan=True,
                                   msg=lambda m, i=i: f"{what}: grad {i}: {m}")


def _case(kind, n, gen, dtype):
    """(spelling, extra args, variants the plan may choose)."""
    small = torch.randn(1, 1, 1, n, generator=gen) * 0.1  # a key bias beside the mask
    keep = torch.rand(1, 1, n, n, generator=gen) < 0.7
    keep[..., n // 2, :] = False  # a row that keeps no key
    band = window(max(1, n // 4))
    if kind == "sdpa bool mask":
        return sdpa_mask, (keep,), ("dense", "block_sparse", "neighborhood")
    if kind == "masked_fill -inf":
        return runtime(), (small, keep), ("dense", "block_sparse", "neighborhood")
    if kind == "where -inf":
        return where_runtime, (keep,), ("dense", "block_sparse", "neighborhood")
    if kind == "masked_fill finfo.min":
        return runtime(torch.finfo(dtype).min), (small, keep), \
            ("dense", "block_sparse", "neighborhood")
    if kind == "additive -inf, empty rows":
        return additive_lag(2), (), ("causal",)
    if kind == "additive -inf band":
        return additive_window(max(1, n // 4)), (), ("neighborhood", "dense")
    # a band and a run-time padding bias of −inf that empties a row: tiles forward, eager backward
    pad = torch.randn(1, 1, n, 1, generator=gen) * 0.1
    pad[..., n // 3, :] = float("-inf")
    return band, (pad,), ("neighborhood", "dense")


@FEW
@given(kind=st.sampled_from(["sdpa bool mask", "masked_fill -inf", "where -inf", "masked_fill finfo.min",
                             "additive -inf, empty rows", "additive -inf band", "band, empty row"]),
       backend=st.sampled_from(["torch", "triton"]), n=st.integers(3, 33), d=st.sampled_from([16, 32, 64]),
       gqa=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_gradients_follow_the_spelling(kind, backend, n, d, gqa, seed):
    dtype = torch.float32 if backend == "triton" else torch.float64  # Triton has no float64
    gen = torch.Generator().manual_seed(seed)
    fn, extra, variants = _case(kind, n, gen, dtype)
    extra = tuple(t.to(dtype) if t.is_floating_point() else t for t in extra)
    q, k, v = inputs(gen, 1, 4, 2 if gqa else 4, n, n, d, dtype, dv=d + 3)
    weight = torch.randn(1, 4, n, d + 3, generator=gen, dtype=torch.float64)
    run, report = compiled(fn, backend)
    out, got = _grads(run, (q, k, v, *extra), weight)
    rewritten_site(report, variants, backend)
    ref, want = _grads(fn, double((q, k, v, *extra)), weight)
    same_as_eager(out, ref, dtype, f"{kind} forward")
    _compare_grads(got, want, dtype, f"{kind} on {backend}")


def test_gradient_nan_patterns_differ_by_spelling():
    """The facts the backward reproduces, on eager itself (float64, one row keeping no key)."""
    gen = torch.Generator().manual_seed(1)
    n = 6
    q, k, v = inputs(gen, 1, 1, 1, n, n, 8, torch.float64)
    keep = torch.ones(1, 1, n, n, dtype=torch.bool)
    keep[..., 2, :] = False
    bias = torch.zeros(n, n, dtype=torch.float64).masked_fill(~keep[0, 0], float("-inf"))
    weight = torch.randn(1, 1, n, 8, generator=gen, dtype=torch.float64)
    spellings = {
        "masked_fill": lambda q, k, v: (q @ k.mT).masked_fill(~keep, float("-inf")).softmax(-1) @ v,
        "additive": lambda q, k, v: ((q @ k.mT) + bias).softmax(-1) @ v,
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
    }
    nan = {name: [bool(g.isnan().any()) for g in _grads(f, (q, k, v), weight)[1]] for name, f in spellings.items()}
    assert nan == {"masked_fill": [False, False, True], "additive": [True, True, True],
                   "sdpa": [False, False, False]}


# ---------------------------------------------------------------- item 10: the report says so

def _plain(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def _no_max(q, k, v):
    e = torch.exp(q @ k.transpose(-1, -2))
    return (e / e.sum(-1, keepdim=True)) @ v


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_score_overflow_is_reported(backend):
    """Eager's float16 q·kᵀ overflows to inf (rows NaN); the rewrite accumulates in float32 and
    stays finite: a deliberate departure, named in the site's notes."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = inputs(gen, 1, 2, 2, 9, 9, 16, torch.float16)
    q[0, 0, 4], k[0, 0, 5] = 100.0, 100.0  # q·k = 160000 > 65504
    run, report = compiled(_plain, backend)
    out = run(q, k, v)
    site = rewritten_site(report, ("dense",), backend)
    assert any("float16 scores" in note for note in site.notes), site.notes
    assert bool(_plain(q, k, v)[0, 0, 4].isnan().all()) and bool(torch.isfinite(out).all())
    for dtype, fn in ((torch.float32, _plain), (torch.bfloat16, _plain), (torch.float16, _sdpa)):
        run, report = compiled(fn, backend)
        run(*(t.to(dtype) for t in (q, k, v)))
        assert not any("float16 scores" in note for note in report.sites[0].notes), (dtype, report.sites[0].notes)


@pytest.mark.parametrize("dtype,threshold", [(torch.float32, "88.72"), (torch.float16, "11.09")])
def test_softmax_without_max_subtraction_is_reported(dtype, threshold):
    gen = torch.Generator().manual_seed(3)
    q, k, v = inputs(gen, 1, 2, 2, 7, 7, 16, dtype)
    run, report = compiled(_no_max, "torch")
    run(q, k, v)
    site = rewritten_site(report, ("dense",), "torch")
    assert any("max subtraction" in note and threshold in note for note in site.notes), site.notes
