"""The scalar settle check (codegen/eager.py, ``settled_by_norms``): one bound for the whole site that,
when it holds, implies the per-row check flags no row; near its edge it must refuse, and the rows
it would have let through are then settled per row as before."""

from __future__ import annotations

import math

import torch
from eager_cases import double, few, fresh_dynamo, same_as_eager  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

import rewrite
from rewrite.codegen.eager import Spelling, excess_of, keep_floor, unsettled
from rewrite.codegen.settle_bound import settled_by_norms

FILLS = [None, -1e4, -1e9, -65504.0]


def spelling(fill, additive, dtype):
    return Spelling.of("mean", fill, additive, dtype)


@given(log_scale=st.floats(-2, 19), d=st.sampled_from([16, 33, 64, 128, 256]), n=st.integers(1, 40),
       additive=st.booleans(), fill=st.sampled_from(FILLS),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]),
       seed=st.integers(0, 2**16))
@few(60)
def test_the_scalar_bound_implies_every_row_settled(log_scale, d, n, additive, fill, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    amp = 10.0 ** (log_scale / 2)
    q = (torch.randn(2, 3, n, d, generator=g, dtype=torch.float64) * amp).to(dtype)
    k = (torch.randn(2, 3, n + 2, d, generator=g, dtype=torch.float64) * amp).to(dtype)
    scale = d ** -0.5
    sem = spelling(fill, additive, dtype)
    rows = unsettled(keep_floor(q, k, None, None, scale, bound=True), sem, dtype, excess_of(q, k, scale, sem))
    if settled_by_norms(q, k, scale, sem, dtype):
        assert not bool(rows.any())


def test_the_bound_refuses_just_past_its_edge():
    """Norms set so the bound sits on either side of the fill's reach: refused on the far side."""
    d, scale, fill = 64, 0.125, -1e4
    sem = spelling(fill, False, torch.float32)
    q = torch.randn(1, 1, 5, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    k = torch.randn(1, 1, 7, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    q, k = q / q.norm(dim=-1).amax(), k / k.norm(dim=-1).amax()  # max norms exactly 1
    reach = -fill - 104  # B below |fill| − 104 nats: no removed weight survives float32's exp
    for factor, want in ((0.99, True), (1.01, False)):
        c = math.sqrt(reach * factor / scale)
        assert settled_by_norms((q * c).float(), (k * c).float(), scale, sem, torch.float32) is want, factor


def test_norms_that_overflow_leave_it_to_the_rows():
    q = torch.full((1, 1, 3, 16), 3e38)
    assert not settled_by_norms(q, q, 0.25, spelling(None, False, torch.float32), torch.float32)


def filled_causal(q, k, v, fill):
    n = q.shape[-2]
    pos = torch.arange(n)
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(pos[None, :] > pos[:, None], fill)
    return torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), v)


@given(amp=st.sampled_from([1.0, 30.0, 300.0]), n=st.integers(2, 33), seed=st.integers(0, 2**16))
@few(6)
def test_a_causal_finite_fill_site_is_eager_on_both_sides_of_the_bound(amp, n, seed):
    """amp 1: the bound settles every row; 30 and 300: scores beyond −1e4's reach, rows per row."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 32, generator=g, dtype=torch.float64).float() for _ in range(3))
    q, k = q * amp, k * amp

    def fn(q, k, v):
        return filled_causal(q, k, v, -1e4)

    report = rewrite.inspect(fn, q, k, v, backend="torch")
    assert report.sites[0].rewritten and report.sites[0].variant == "causal", str(report)
    torch._dynamo.reset()
    out = rewrite.compile(fn, backend="torch")(q, k, v)
    same_as_eager(out, fn(*double((q, k, v))), torch.float32, f"amp {amp}")


def test_a_nan_or_inf_among_the_operands_is_never_settled_by_the_bound():
    """max|x| must see the NaN (aminmax propagates it): a NaN key under the mask makes eager's row NaN."""
    sem = spelling(None, False, torch.float32)
    for bad in (float("nan"), float("inf"), -float("inf")):
        for which in ("q", "k"):
            q, k = torch.randn(1, 2, 5, 16), torch.randn(1, 2, 7, 16)
            {"q": q, "k": k}[which][0, 1, 3, 5] = bad
            assert not settled_by_norms(q, k, 0.25, sem, torch.float32), (which, bad)


def test_the_max_abs_stage_is_only_a_shortcut():
    """Operands whose max |x| bound is too loose (one large entry per row, spread so the row norms stay
    small enough) are still settled, by the row norms."""
    d, scale, fill = 256, 1 / 16, -1e4
    sem = spelling(fill, False, torch.float32)
    q = torch.zeros(1, 1, 4, d)
    q[..., 0] = 90.0  # ‖q‖ = 90, D·max|q| = 23040
    q = q + 1e-3 * torch.randn(1, 1, 4, d, generator=torch.Generator().manual_seed(3))
    # scale·D·max|q|·max|k| ≈ 1/16·256·90·90 ≈ 1.3e5 > |fill|; scale·‖q‖·‖k‖ ≈ 506 ≪ |fill|
    assert settled_by_norms(q, q.clone(), scale, sem, torch.float32)
