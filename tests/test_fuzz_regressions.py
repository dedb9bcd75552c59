"""Regressions for the classes the differential fuzzer found (tests/test_fuzz.py), each written
the way the fuzzer's programs write it and compared with eager (own dtype) and float64:

- a half-precision ``(1 − keep) · finfo.min`` bias over rows it masks entirely: eager's float16
  sum absorbs the scores (the row averages v); a float32 kernel keeps them;
- scores narrowed for the softmax (``softmax(s, dtype=torch.float32)`` on float64 scores): values
  beyond float32's range become −inf there; the site must be left alone;
- a scale from ``torch.tensor(d).sqrt()``: a float32 value, not Python's float64 square root;
- an SDPA call whose own bool mask is causal, with a NaN key it removes: SDPA adds the mask, so the
  row is NaN (``is_causal`` would hide the key);
- eager's half-precision bias sum reproduced only where the bias is coarse in that type (an
  explore-profile case: rounding every score made bf16 near-ties exact ties);
- an SDPA call whose bool mask keeps every key (a sink column over one key, a window wider than
  the grid): dropping it changes SDPA's kernel, and with it what a NaN or inf input gives (at
  M = 1 the mask-free CPU kernel returns v for a NaN key; the masked call returns NaN);
- gradients where the fused backward's float32 LSE is coarse: a finfo.min bias over a masked row,
  scores of ~10⁴ (exp(s − LSE) of the winning key is then not 1).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eager_cases import compiled, double, inputs, rewritten_site, same_as_eager
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rewrite.codegen.eager import add_as_eager

FEW = settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.reuse, Phase.generate])
BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def band_bias_fp16(q, k, v):
    """A band |p − m| ≤ 2 as a finfo.min bias; with N > M + 2 the last rows keep no key."""
    n, m = q.shape[-2], k.shape[-2]
    i = torch.arange(n)[:, None]
    j = torch.arange(m)[None, :]
    keep = (i - j).abs() <= 2
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    s = s + (~keep).to(s.dtype) * torch.finfo(s.dtype).min
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("backend", BACKENDS)
@FEW
@given(n=st.integers(9, 40), m=st.integers(3, 7), d=st.sampled_from([16, 24, 64]), seed=st.integers(0, 2**31))
def test_half_bias_over_a_masked_row_is_eagers_sum(backend, n, m, d, seed):
    q, k, v = inputs(torch.Generator().manual_seed(seed), 2, 2, 2, n, m, d, torch.float16)
    fn, report = compiled(band_bias_fp16, backend)
    out = fn(q, k, v)
    rewritten_site(report, ("dense", "neighborhood", "block_sparse"), backend)
    want = band_bias_fp16(q, k, v)  # eager float16: the masked rows average v
    same_as_eager(out, band_bias_fp16(*double((q, k, v))), torch.float16, "out", lowp=want)
    assert (out[..., m + 3:, :].float() - want[..., m + 3:, :].float()).abs().max() < 1e-2


def narrowed_softmax(q, k, v):
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril()
    keep[1] = False
    s = s + (1.0 - keep.to(s.dtype)) * torch.finfo(s.dtype).min
    return torch.softmax(s, -1, dtype=torch.float32).to(v.dtype) @ v


def test_scores_narrowed_for_the_softmax_are_left_alone():
    q, k, v = inputs(torch.Generator().manual_seed(3), 1, 2, 2, 9, 9, 16, torch.float64)
    fn, report = compiled(narrowed_softmax, "torch")
    out = fn(q, k, v)
    assert len(report.sites) == 1 and not report.sites[0].rewritten
    assert "narrowed" in report.sites[0].reason, report.sites[0].reason
    want = narrowed_softmax(q, k, v)
    assert torch.isnan(want[:, :, 1]).all()
    assert torch.equal(torch.isnan(out), torch.isnan(want))


def tensor_sqrt_scale(q, k, v):
    d = q.shape[-1]
    s = torch.matmul(q, k.transpose(-1, -2)) / torch.tensor(d).sqrt()
    return torch.softmax(s, -1) @ v


@FEW
@given(n=st.integers(1, 33), d=st.sampled_from([24, 32, 80, 96]), seed=st.integers(0, 2**31))
def test_a_tensor_square_root_scale_is_its_float32_value(n, d, seed):
    q, k, v = inputs(torch.Generator().manual_seed(seed), 1, 3, 3, n, n + 2, d, torch.float64)
    fn, report = compiled(tensor_sqrt_scale, "torch")
    out = fn(q, k, v)
    rewritten_site(report, ("dense",), "torch")
    torch.testing.assert_close(out, tensor_sqrt_scale(q, k, v), atol=1e-12, rtol=1e-12)


def sdpa_own_causal_mask(q, k, v):
    n, m = q.shape[-2], k.shape[-2]
    keep = ~torch.triu(torch.ones(n, m, dtype=torch.bool), diagonal=1)
    return F.scaled_dot_product_attention(q, k, v, keep)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@FEW
@given(n=st.integers(4, 40), dm=st.integers(0, 30), seed=st.integers(0, 2**31))
def test_sdpa_bool_mask_proven_causal_keeps_a_removed_nan_key_in_its_rows(backend, n, dm, seed):
    m = n + dm
    q, k, v = inputs(torch.Generator().manual_seed(seed), 2, 2, 2, n, m, 16, torch.float32)
    k[0, 1, m - 1, 3] = float("nan")  # removed for every row but the last (when m == n)
    fn, report = compiled(sdpa_own_causal_mask, backend)
    out = fn(q, k, v)
    site = rewritten_site(report, ("causal",), "torch")
    same_as_eager(out, sdpa_own_causal_mask(*double((q, k, v))), torch.float32, "out")
    q2, k2, v2 = inputs(torch.Generator().manual_seed(seed + 1), 2, 2, 2, n, m, 16, torch.float32)
    same_as_eager(fn(q2, k2, v2), sdpa_own_causal_mask(*double((q2, k2, v2))), torch.float32, "finite inputs")
    assert any("causal kernel" in path for path in site.ran), site.ran  # finite inputs: the causal kernel


def finfo_bias_with_empty_rows(q, k, v, keep):
    s = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    s = s + (keep == 0).to(s.dtype) * torch.finfo(s.dtype).min
    return F.softmax(s, dim=-1) @ v


def unscaled_decode(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), -1) @ v


def _grads(fn, args):
    xs = [a.detach().requires_grad_() for a in args[:3]]
    out = fn(*xs, *args[3:])
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    return torch.autograd.grad((out * g).sum(), xs)


@FEW
@given(n=st.integers(2, 31), m=st.integers(2, 65), dtype=st.sampled_from([torch.float32, torch.float64]),
       seed=st.integers(0, 2**31))
def test_gradients_where_the_fused_lse_is_coarse(n, m, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 2, 2, 2, n, m, 40, dtype)
    keep = torch.rand(2, 1, n, m, generator=gen) < 0.6
    keep[:, :, n // 2] = False  # a row the finfo.min bias masks entirely: eager's weights are uniform
    fn, report = compiled(finfo_bias_with_empty_rows, "torch")
    got = _grads(fn, (q, k, v, keep))
    site = rewritten_site(report, ("dense",), "torch")
    own = _grads(finfo_bias_with_empty_rows, (q, k, v, keep))
    for a, e, o, name in zip(got, _grads(finfo_bias_with_empty_rows, (*double((q, k, v)), keep)), own, "qkv"):
        same_as_eager(a, e, dtype, f"grad_{name}", lowp=o)
    assert site.ran.get("backward: eager spelling"), site.ran

    q, k, v = (30 * t for t in inputs(gen, 1, 2, 2, 1, m, 256, torch.float32))  # scores of ~10⁴
    fn, report = compiled(unscaled_decode, "torch")
    got = _grads(fn, (q, k, v))
    rewritten_site(report, ("dense",), "torch")
    own = _grads(unscaled_decode, (q, k, v))
    for a, e, o, name in zip(got, _grads(unscaled_decode, double((q, k, v))), own, "qkv"):
        same_as_eager(a, e, torch.float32, f"large scores: grad_{name}", lowp=o)



@FEW
@given(seed=st.integers(0, 2**31), big=st.floats(1e3, 3e4))
def test_only_a_coarse_half_bias_is_summed_as_eager_rounds_it(seed, big):
    """Scores the kernels hold in float32 (here ~10⁴, where bf16's ulp is 64) stay unrounded beside a
    small bias (an explore-profile fuzz case: rounding them made near-ties exact ties); a bias that is
    coarse in the half type (finfo(float16).min) gives eager's half-precision sum."""
    s = (torch.randn(3, 40, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * big).float()
    zero = torch.zeros(3, 40, dtype=torch.bfloat16)
    assert torch.equal(add_as_eager(s, zero.float(), torch.bfloat16), s)
    s16 = s.clamp(-6e4, 6e4)
    fmin = torch.full((3, 40), torch.finfo(torch.float16).min)
    want = (s16.half() + fmin.half()).float()
    assert torch.equal(add_as_eager(s16, fmin, torch.float16), want)


def sink_over_one_key(q, k, v):
    n, m = q.shape[-2], k.shape[-2]
    keep = (torch.arange(m)[None, :] <= torch.arange(n)[:, None]) | (torch.arange(m)[None, :] == 0)
    return F.scaled_dot_product_attention(q, k, v, keep)


def window_wider_than_the_grid(q, k, v):
    side = 3
    i, j = torch.arange(q.shape[-2])[:, None], torch.arange(k.shape[-2])[None, :]
    keep = ((i // side - j // side).abs() <= 2) & ((i % side - j % side).abs() <= 2)
    keep[..., -1] = True
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("fn,m,poison", [(sink_over_one_key, 1, "nan_k"), (window_wider_than_the_grid, 6, "inf_k"),
                                         (window_wider_than_the_grid, 6, "nan_q")])
def test_an_sdpa_mask_that_keeps_everything_is_passed_again_on_non_finite_inputs(fn, m, poison, dtype):
    q, k, v = inputs(torch.Generator().manual_seed(11), 2, 3, 3, 6 if m == 6 else 31, m, 16, dtype)
    if poison == "nan_k":
        k[0, 1, 0, 3] = float("nan")
    elif poison == "inf_k":
        k[1, 2, 4, 0] = float("inf")
    else:
        q[0, 0, 2, 5] = float("nan")
    cfn, report = compiled(fn, "torch")
    out = cfn(q, k, v)
    site = rewritten_site(report, ("dense",), "torch")
    assert site.mask == "none", site.mask  # the mask was proven to keep every key and dropped
    ref = fn(*double((q, k, v)))
    assert torch.isnan(ref).any()
    same_as_eager(out, ref, dtype, fn.__name__, lowp=fn(q, k, v))
