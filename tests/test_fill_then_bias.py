"""A bias added after a finite fill (GPT-Neo: ``where(causal, s, finfo.min)`` then ``+ attention_mask``):
eager's removed scores are then fill + bias, not the fill. The site is rewritten with that spelling
(masked_row "biased_fill"): kept scores are s + bias as usual, and a row whose kept scores come near
fill + its largest bias (a row the padding empties, a bias that lifts removed keys) is recomputed over
every key in eager's order. Near-misses (biases on both sides of the fill, a fill after such a bias,
a score modifier with it) are left alone with their reason.
"""

from __future__ import annotations

import pytest
import torch
from eager_cases import compiled, double, few, fresh_dynamo, inputs, rewritten_site, same_as_eager  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

import rewrite

FEW = few(10)


def neo_local(window: int):
    """GPT-Neo's order, written here from its description: a band buffer selected with a tensor fill,
    then the additive padding mask on top."""
    def fn(q, k, v, pad):
        n = q.shape[-2]
        band = torch.tril(torch.ones(n, n, dtype=torch.bool)) & ~torch.tril(torch.ones(n, n, dtype=torch.bool),
                                                                           -window)
        s = torch.matmul(q, k.transpose(-1, -2))
        lowest = torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype)
        s = torch.where(band[None, None], s, lowest) + pad
        return torch.matmul(torch.softmax(s, dim=-1), v)
    return fn


def masked_then_biased(fill: float):
    """masked_fill with a run-time bool mask, a scale, then a dense float bias [B, H, N, M]."""
    def fn(q, k, v, keep, bias):
        s = (q @ k.transpose(-2, -1)).masked_fill(~keep, fill) / q.shape[-1] ** 0.5
        s = s + bias
        return s.softmax(-1) @ v
    return fn


def padding(gen, b, n, dtype):
    """HF's additive key-padding mask [B, 1, 1, N]: 0 or finfo.min, one batch element left-padded (its
    first rows keep no key under the band) and one right-padded."""
    keep = torch.ones(b, n, dtype=torch.bool)
    keep[0, : max(1, n // 3)] = False
    if b > 1:
        keep[1, n - max(1, n // 4):] = False
    return torch.zeros(b, 1, 1, n, dtype=dtype).masked_fill(~keep[:, None, None, :], torch.finfo(dtype).min)


@FEW
@given(n=st.integers(2, 29), d=st.sampled_from([16, 24, 64]), window=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       backend=st.sampled_from(["torch", "triton"]),
       seed=st.integers(0, 2**31 - 1))
def test_gpt_neo_order_is_exact(n, d, window, dtype, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 2, 3, 3, n, n, d, dtype)
    pad = padding(gen, 2, n, dtype)
    fn = neo_local(window)
    run, report = compiled(fn, backend)
    out = run(q, k, v, pad)
    site = rewritten_site(report, ("neighborhood", "causal", "dense"), backend)
    assert any("fill + bias" in note for note in site.notes), site.notes
    with torch.no_grad():
        lowp = fn(q, k, v, pad)
    # The float64 reference with float64's finfo.min as the padding, so that it absorbs a kept score and
    # overflows to −inf over the fill exactly as finfo(dtype).min does in eager's own dtype.
    ref = fn(*double((q, k, v)), pad.double().masked_fill(pad < 0, torch.finfo(torch.float64).min))
    same_as_eager(out, ref, dtype, f"neo n={n} w={window} {dtype} {backend}", lowp=lowp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_bias_over_the_fill_decides_rows_that_keep_no_key(backend):
    """A row the mask empties: eager's answer is softmax(fill + bias) over every key, i.e. the bias
    decides it (not a uniform average); a row whose bias lifts removed keys above its kept scores too."""
    gen = torch.Generator().manual_seed(3)
    n, d = 13, 16
    q, k, v = inputs(gen, 1, 2, 2, n, n, d, torch.float32)
    keep = torch.rand(1, 2, n, n, generator=gen) < 0.5
    keep[0, 0, 4] = False  # keeps nothing
    bias = torch.randn(1, 2, n, n, generator=gen) * 2
    bias[0, 1, 7] = torch.where(keep[0, 1, 7], -50.0, 2480.0)  # removed keys (fill/4 + bias = −20) outrank kept
    fn = masked_then_biased(-1e4)
    run, report = compiled(fn, backend)
    out = run(q, k, v, keep, bias)
    rewritten_site(report, ("dense", "block_sparse", "neighborhood"), backend)
    ref = fn(*double((q, k, v, keep, bias)))
    same_as_eager(out, ref, torch.float32, f"biased fill {backend}", lowp=fn(q, k, v, keep, bias))
    kept_only = masked_then_biased(float("-inf"))(*double((q, k, v, keep, bias)))
    assert float((ref[0, 1, 7] - kept_only[0, 1, 7]).abs().max()) > 0.1  # the removed keys do carry weight


def test_gradients_through_a_biased_fill():
    gen = torch.Generator().manual_seed(5)
    n, d = 11, 16
    q, k, v = (t.requires_grad_() for t in inputs(gen, 2, 2, 2, n, n, d, torch.float64))
    keep = torch.rand(1, 1, n, n, generator=gen) < 0.6
    keep[..., 2, :] = False
    bias = torch.randn(2, 2, n, n, generator=gen, dtype=torch.float64) * 3
    bias[0, 1, 5] += torch.where(keep[0, 0, 5], 0.0, 2500.0 - 2.0)  # its removed keys at fill/4 + bias ≈ −2 weigh
    bias.requires_grad_()
    fn = masked_then_biased(-1e4)
    run, report = compiled(fn, "torch")
    out = run(q, k, v, keep, bias)
    rewritten_site(report, ("dense", "block_sparse", "neighborhood"), "torch")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias), do)
    want = torch.autograd.grad(fn(q, k, v, keep, bias), (q, k, v, bias), do)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-7)


def _reason(fn, *args):
    report = rewrite.inspect(fn, *args)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert not site.rewritten
    return site.reason


def test_near_misses_are_left_alone_with_their_reason():
    gen = torch.Generator().manual_seed(0)
    n, d = 9, 16
    q, k, v = inputs(gen, 1, 2, 2, n, n, d, torch.float32)
    keep = torch.rand(1, 1, n, n, generator=gen) < 0.7
    b1, b2 = torch.randn(1, 2, n, n, generator=gen), torch.randn(1, 1, 1, n, generator=gen)

    def both_sides(q, k, v, keep, b1, b2):
        s = q @ k.transpose(-1, -2) + b1
        return (s.masked_fill(~keep, -1e4) + b2).softmax(-1) @ v

    def fill_after_the_bias(q, k, v, keep, b1, b2):
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep, -1e4) + b2
        return s.masked_fill(~keep.transpose(-1, -2), -1e4).softmax(-1) @ v

    def capped(q, k, v, keep, b1, b2):
        s = 30.0 * torch.tanh(q @ k.transpose(-1, -2) / 30.0)
        return (s.masked_fill(~keep, -1e4) + b2).softmax(-1) @ v

    args = (q, k, v, keep, b1, b2)
    assert "before and after a finite masked_fill" in _reason(both_sides, *args)
    assert "a masked_fill after a bias that was added over a finite fill" in _reason(fill_after_the_bias, *args)
    assert "score modifier" in _reason(capped, *args)
    for fn in (both_sides, fill_after_the_bias, capped):  # left alone: eager's own result
        torch.testing.assert_close(rewrite.compile(fn)(*args), fn(*args))


def neo_buffer(q, k, v, band, pad):
    """GPT-Neo's local layer as it runs: the window is a buffer (an input here), the 4-D mask an additive
    finfo.min bias built beside it from positions (causal) and the key padding, as Hugging Face builds it."""
    s = torch.matmul(q, k.transpose(-1, -2))
    lowest = torch.finfo(s.dtype).min
    s = torch.where(band, s, torch.tensor(lowest, dtype=s.dtype))
    i = torch.arange(s.shape[-1])
    allowed = (i[None, :] <= i[:, None])[None, None] & pad[:, None, None, :]
    mask = torch.zeros(allowed.shape, dtype=s.dtype).masked_fill(~allowed, lowest)
    return torch.matmul(torch.softmax(s + mask, dim=-1), v)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_window_buffer_beside_a_causal_mask_runs_on_the_window_tiles(backend):
    """The buffer is read as a causal window on the first call (tiles from the window, both tensors applied
    inside them); a later, wider buffer is outside that window and is re-checked, not assumed."""
    gen = torch.Generator().manual_seed(11)
    n, d = 41, 16
    q, k, v = inputs(gen, 2, 2, 2, n, n, d, torch.float32)
    i = torch.arange(n)
    band = ((i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 6))[None, None]
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[0, :7] = False  # left padding: rows 0..6 of sequence 0 keep no key
    pad[1, n - 5:] = False
    run, report = compiled(neo_buffer, backend)
    out = run(q, k, v, band, pad)
    site = rewritten_site(report, ("neighborhood",), backend)
    assert any("causal window inside the proven causal structure" in note for note in site.notes), site.notes
    same_as_eager(out, neo_buffer(*double((q, k, v)), band, pad), torch.float32, f"window buffer {backend}",
                  lowp=neo_buffer(q, k, v, band, pad))
    wider = ((i[:, None] - i[None, :] >= 0) & (i[:, None] - i[None, :] < 20))[None, None]
    out = run(q, k, v, wider, pad)
    assert any(path.startswith("new mask outside the first call's band") for path in site.ran), site.ran
    same_as_eager(out, neo_buffer(*double((q, k, v)), wider, pad), torch.float32, f"wider buffer {backend}",
                  lowp=neo_buffer(q, k, v, wider, pad))


@pytest.mark.parametrize("edit", ["extra key", "missing key", "two-sided", "wide"])
def test_window_buffers_that_are_not_a_narrow_causal_window_stay_on_the_causal_kernel(edit):
    """Near-misses of the window read: one kept pair outside the window, one hole inside it, a two-sided
    band, a window keeping more than half the pairs. Each runs causal with the buffer applied as given."""
    gen = torch.Generator().manual_seed(12)
    n = 33
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    i = torch.arange(n)
    lag = i[:, None] - i[None, :]
    band = (lag >= 0) & (lag < 5)
    if edit == "extra key":
        band[20, 3] = True
    elif edit == "missing key":
        band[20, 18] = False
    elif edit == "two-sided":
        band = lag.abs() < 5
    else:
        band = (lag >= 0) & (lag < 30)
    pad = torch.ones(1, n, dtype=torch.bool)
    run, report = compiled(neo_buffer, "torch")
    out = run(q, k, v, band[None, None], pad)
    site = rewritten_site(report, ("causal",), "torch")
    assert not any("causal window inside" in note for note in site.notes), site.notes
    same_as_eager(out, neo_buffer(*double((q, k, v)), band[None, None], pad), torch.float32, edit,
                  lowp=neo_buffer(q, k, v, band[None, None], pad))
