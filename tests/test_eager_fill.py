"""A finite fill is exact (issue 10, item 7): ``masked_fill(−1e4)``, ``masked_fill(−1e9)`` and
``masked_fill(finfo.min)`` give eager's result also in rows whose kept scores come close to the
fill (eager then gives the masked keys real weight) and in rows that keep no key (eager averages
V over every key). A run-time bias shifts chosen rows' scores to fill + δ for δ on both sides of
the threshold (codegen/eager.py: recompute unless fill − floor < ln(smallest subnormal) − 1).
"""

from __future__ import annotations

import math

import pytest
import torch
from eager_cases import causal, compiled, double, inputs, rewritten_site, runtime, same_as_eager, window
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import rewrite.codegen.eager as eager
from rewrite.codegen.eager import Spelling, underflow, unsettled

FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.reuse, Phase.generate])
# Offsets of a row's kept scores above the fill: inside, at and beyond the ~104 + ln M threshold.
SHIFTS = (-40.0, 0.0, 2.0, 30.0, 95.0, 104.0, 112.0, 140.0, 800.0)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _fill_of(name: str, dtype: torch.dtype) -> float:
    value = {"-1e4": -1e4, "-1e9": -1e9, "finfo.min": torch.finfo(dtype).min}[name]
    return float(torch.tensor(value).to(dtype))  # as the scores hold it


@FEW
@given(kind=st.sampled_from(["window", "causal", "runtime"]), fill_name=st.sampled_from(["-1e4", "-1e9", "finfo.min"]),
       backend=st.sampled_from(["torch", "triton"]), n=st.integers(3, 37), d=st.sampled_from([16, 24, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), gqa=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_finite_fill_is_exact(kind, fill_name, backend, n, d, dtype, gqa, seed):
    fill = _fill_of(fill_name, dtype)
    if not math.isfinite(fill):  # −1e9 in float16 is −inf there: an ordinary −inf site
        fill = torch.finfo(dtype).min
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 2, 2, 1 if gqa else 2, n, n, d, dtype, dv=d + 5)
    # Rows shifted towards the fill; the rest stay where randn puts them.
    bias = torch.randn(1, 1, n, n, generator=gen, dtype=torch.float64) * 0.5  # an ordinary bias (ALiBi-like)
    rows = torch.randperm(n, generator=gen)[: min(n, len(SHIFTS))]
    for r, shift in zip(rows.tolist(), SHIFTS):
        bias[..., r, :] += fill + shift if abs(fill) < 1e30 else fill
    bias = bias.to(dtype)
    if kind == "window":
        fn, extra, variants = window(max(1, n // 4), fill), (bias,), ("neighborhood", "dense")
    elif kind == "causal":
        fn, extra, variants = causal(fill), (bias,), ("causal", "dense")
    else:
        keep = torch.rand(1, 1, n, n, generator=gen) < 0.6
        keep[..., int(rows[0]), :] = False  # a row that keeps no key: eager averages V
        fn, extra, variants = runtime(fill), (bias, keep), ("dense", "block_sparse", "neighborhood")
    run, report = compiled(fn, backend)
    out = run(q, k, v, *extra)
    rewritten_site(report, variants, backend)
    with torch.no_grad():
        lowp = fn(q, k, v, *extra)  # eager in the inputs' dtype: its own rounding at scores ~ fill
    same_as_eager(out, fn(*double((q, k, v, *extra))), dtype, f"{kind} fill={fill:g} {backend} {dtype}", lowp=lowp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_finite_fill_without_a_bias(backend):
    """Old GPT-2 (tril, finfo.min; the common SDPA path) and −1e4: a query so large and so opposed
    to the first keys that row 3's kept scores fall below the fill."""
    gen = torch.Generator().manual_seed(0)
    n = 21
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    u = k[0, 0, 0]
    k[0, 0, :4] = u  # row 3 keeps keys 0..3, all u: its kept scores are −1e4 − 50, below the fill
    q[0, 0, 3] = -u * (1e4 + 50) / (16**-0.5 * float(u @ u))
    small = torch.randn(1, 1, 1, n, generator=gen) * 0.1
    for fill in (-1e4, torch.finfo(torch.float32).min):
        fn = causal(fill)
        run, report = compiled(fn, backend)
        out = run(q, k, v, small)
        rewritten_site(report, ("causal",), backend)
        ref = fn(*double((q, k, v, small)))
        with torch.no_grad():
            same_as_eager(out, ref, torch.float32, f"fill {fill:g}", lowp=fn(q, k, v, small))
        if fill == -1e4:  # the masked keys really carry weight in eager's row 3
            kept_only = causal(float("-inf"))(*double((q, k, v, small)))
            assert float((ref[0, 0, 3] - kept_only[0, 0, 3]).abs().max()) > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_threshold_is_where_eager_rounds_the_masked_weight_to_zero(dtype):
    """The justification, checked on eager's own exp: at the threshold the weight of a masked key is
    0 in eager's softmax arithmetic (float32 for half types), one nat above it is not flagged only if
    it would be; a row is flagged exactly when fill − floor ≥ underflow(dtype)."""
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    u = underflow(dtype)
    assert float(torch.exp(torch.tensor(u, dtype=sdt))) == 0.0
    assert float(torch.softmax(torch.tensor([0.0, u], dtype=sdt), 0)[1]) == 0.0
    assert float(torch.exp(torch.tensor(u + 2.0, dtype=sdt))) > 0.0  # the bound is not loose by more
    sem = Spelling(fill=-1e4)
    floors = torch.tensor([-1e4 - u - 0.5, -1e4 - u + 0.5, float("-inf"), float("nan"), 0.0], dtype=torch.float64)
    assert unsettled(floors, sem, dtype).tolist() == [True, False, True, False, False]


def test_eager_recomputes_only_flagged_rows(monkeypatch):
    """Rows far from the fill are left to the kernel: the recomputation visits the flagged rows'
    blocks only (here: one row of 300)."""
    gen = torch.Generator().manual_seed(3)
    n = 300
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    bias = torch.randn(1, 1, n, 1, generator=gen) * 0.3
    bias[..., 7, 0] = -1e4 + 5
    fn = window(9, -1e4)
    seen = []
    real = eager.eager_attention

    def spy(*a, **kw):
        rows = a[7] if len(a) > 7 else kw.get("rows")
        seen.append(None if rows is None else int(rows.sum()))
        return real(*a, **kw)

    monkeypatch.setattr("rewrite.codegen.sparse_ops.eager_attention", spy)
    run, report = compiled(fn, "torch")
    out = run(q, k, v, bias)
    rewritten_site(report, ("neighborhood",), "torch")
    assert seen == [2], seen  # row 7 of both heads
    with torch.no_grad():
        same_as_eager(out, fn(*double((q, k, v, bias))), torch.float32, "one flagged row", lowp=fn(q, k, v, bias))
