"""The cached verdict of a run-time bias (codegen/bias_verdict.py): one reduction per bias tensor, re-derived
after an in-place edit, and the rows it would have to settle still settled (eager's NaN rows, coarse rows)."""

from __future__ import annotations

import torch
from eager_cases import fresh_dynamo  # noqa: F401

import rewrite
import rewrite.codegen.bias_verdict as bias_verdict
from rewrite.codegen.eager import Spelling

PLAIN = Spelling.of("nan", None, False, torch.float32)  # a bias added to the scores, no fill of its own


def hf_mask(n: int, m: int, dtype=torch.float32) -> torch.Tensor:
    keep = torch.arange(m)[None, :] <= torch.arange(n)[:, None] + (m - n)
    return torch.zeros(1, 1, n, m, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)


def with_bias(q, k, v, bias):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(s, dim=-1) @ v


def qkv(n, m, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 3, n, 16, generator=g).to(dtype), torch.randn(2, 3, m, 16, generator=g).to(dtype),
            torch.randn(2, 3, m, 16, generator=g).to(dtype))


def test_the_verdict_is_derived_once_per_bias_tensor(monkeypatch):
    q, k, _ = qkv(5, 9)
    bias = hf_mask(5, 9)
    assert bias_verdict.bias_settles(q, k, bias, PLAIN)
    monkeypatch.setattr(bias_verdict, "coarse_rows", lambda *a: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert bias_verdict.bias_settles(q, k, bias.view(1, 1, 5, 9), PLAIN)  # another view, the same memory
    with torch.no_grad():
        bias[0, 0, 2] = float("-inf")  # in place: a row with no key left; the version changes
    monkeypatch.undo()
    assert not bias_verdict.bias_settles(q, k, bias, PLAIN)


def test_a_row_masked_in_place_between_calls_is_nan_as_in_eager(fresh_dynamo):  # noqa: F811
    q, k, v = qkv(5, 9, seed=1)
    bias = hf_mask(5, 9)
    report = rewrite.Report()
    fn = torch.compile(with_bias, backend=rewrite.backend.make_backend(rewrite.options.Options(), report))
    torch.testing.assert_close(fn(q, k, v, bias), with_bias(q, k, v, bias))
    assert report.sites and report.sites[0].rewritten, str(report)
    with torch.no_grad():
        bias[..., 3, :] = float("-inf")
    got, want = fn(q, k, v, bias), with_bias(q, k, v, bias)
    assert torch.isnan(want[:, :, 3]).all() and torch.isnan(got[:, :, 3]).all()
    torch.testing.assert_close(got, want, equal_nan=True)


def test_a_coarse_half_precision_row_is_not_settled_by_the_verdict():
    """fp16: a finfo.min bias over a whole row makes eager's fp16 sum uniform there: a row to recompute."""
    q, k, _ = qkv(4, 6, torch.float16)
    bias = torch.zeros(1, 1, 4, 6, dtype=torch.float16)
    bias[..., 1, :] = torch.finfo(torch.float16).min
    assert not bias_verdict.bias_settles(q, k, bias, Spelling.of("nan", None, False, torch.float16))
    assert bias_verdict.bias_settles(q, k, hf_mask(4, 6, torch.float16), Spelling.of("nan", None, False, torch.float16))
