"""A bias that is a constant fill outside a keep and arbitrary values inside it: Falcon's ALiBi as
Hugging Face 5.25 folds it into the mask, ``masked_fill(alibi / √d, mask < −1, finfo.min)``, or
``where(causal, rel_bias, −inf)``. The keep is lifted on its own and gives the tiles (causal, a
window); the tensor stays and is applied as the graph computes it, inside the tiles. Near-misses:
a fill that is a tensor, a fill that does not remove (−1), a keep edited in place by one entry, a
keep that is only a run-time tensor.
"""

from __future__ import annotations

import pytest
import torch
from eager_cases import compiled, double, few, fresh_dynamo, inputs, rewritten_site, same_as_eager  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

FEW = few(8)


def falcon_like(q, k, v, alibi):
    """The positions bias [B, H, 1, M] written into the causal mask, as one additive tensor."""
    n, m = q.shape[-2], k.shape[-2]
    above = torch.ones(n, m, dtype=torch.bool, device=q.device).triu(1)
    bias = torch.masked_fill(alibi / q.shape[-1] ** 0.5, above, torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5 + bias
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def windowed_rel(w: int):
    """where(|p − m| ≤ w, a learned [H, N, M] table, −inf): the table only inside the band."""
    def fn(q, k, v, table):
        i = torch.arange(q.shape[-2], device=q.device)
        band = (i[:, None] - i[None, :]).abs() <= w
        s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
        return (s + torch.where(band, table, float("-inf"))).softmax(-1) @ v
    return fn


def causal_and_padding(q, k, v, alibi, pad):
    """The causal keep and a [B, M] key padding in one bool, then the values where it keeps."""
    n = q.shape[-2]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))[None, None] & pad[:, None, None, :]
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    s = s + torch.where(keep, alibi, torch.finfo(s.dtype).min)
    return s.softmax(-1) @ v


def _note(site):
    assert any("constant fill outside a lifted keep" in n for n in site.notes), site.notes


@FEW
@given(n=st.integers(2, 37), d=st.sampled_from([16, 40, 64]), h=st.integers(1, 3),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), backend=st.sampled_from(["torch", "triton"]),
       seed=st.integers(0, 2**31 - 1))
def test_falcon_like_bias_runs_causal(n, d, h, dtype, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 2, h, h, n, n, d, dtype)
    slopes = torch.rand(h, generator=gen, dtype=torch.float64) + 0.1
    alibi = (slopes[None, :, None, None] * torch.arange(n)[None, None, None, :]).expand(2, h, 1, n).to(dtype)
    alibi = alibi.contiguous()
    alibi[0, 0, 0, -1] = float("nan")  # under the mask in every row but the last: eager removes it there
    run, report = compiled(falcon_like, backend)
    out = run(q, k, v, alibi)
    site = rewritten_site(report, ("causal",), backend)
    _note(site)
    same_as_eager(out, falcon_like(*double((q, k, v, alibi))), dtype, f"falcon-like n={n} {dtype} {backend}",
                  lowp=falcon_like(q, k, v, alibi))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_table_inside_a_band_runs_on_the_window_tiles(backend):
    gen = torch.Generator().manual_seed(1)
    n, d, w = 29, 16, 4
    q, k, v = inputs(gen, 1, 3, 3, n, n, d, torch.float32)
    table = torch.randn(3, n, n, generator=gen)
    fn = windowed_rel(w)
    run, report = compiled(fn, backend)
    out = run(q, k, v, table)
    site = rewritten_site(report, ("neighborhood",), backend)
    _note(site)
    same_as_eager(out, fn(*double((q, k, v, table))), torch.float32, f"band table {backend}")


def test_padding_in_the_keep_leaves_the_causal_part_proven():
    gen = torch.Generator().manual_seed(2)
    n, d = 19, 24
    q, k, v = inputs(gen, 2, 2, 2, n, n, d, torch.float32)
    alibi = torch.randn(2, 2, 1, n, generator=gen)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, :5] = False  # left padding: the first rows of batch 1 keep no key
    run, report = compiled(causal_and_padding, "torch")
    out = run(q, k, v, alibi, pad)
    site = rewritten_site(report, ("causal",), "torch")
    _note(site)
    same_as_eager(out, causal_and_padding(*double((q, k, v, alibi, pad))), torch.float32, "causal & padding")


def _site(fn, *args):
    run, report = compiled(fn, "torch")
    out = run(*args)
    assert len(report.sites) == 1, str(report)
    same_as_eager(out, fn(*double(args)), torch.float32, fn.__name__)
    return report.sites[0]


def test_a_tensor_fill_is_not_a_fill():
    def fn(q, k, v, alibi, other):
        n = q.shape[-2]
        keep = torch.tril(torch.ones(n, n, dtype=torch.bool))
        return (q @ k.transpose(-1, -2) + torch.where(keep, alibi, other)).softmax(-1) @ v
    gen = torch.Generator().manual_seed(3)
    q, k, v = inputs(gen, 1, 2, 2, 9, 9, 16, torch.float32)
    site = _site(fn, q, k, v, torch.randn(1, 2, 1, 9, generator=gen), torch.randn(1, 2, 9, 9, generator=gen) - 5)
    assert site.variant == "dense" and not any("constant fill outside" in n for n in site.notes), site.notes


def test_a_fill_that_does_not_remove_gives_no_tiles():
    def fn(q, k, v, alibi):
        n = q.shape[-2]
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        return (q @ k.transpose(-1, -2) + alibi.masked_fill(above, -1.0)).softmax(-1) @ v
    gen = torch.Generator().manual_seed(4)
    q, k, v = inputs(gen, 1, 2, 2, 11, 11, 16, torch.float32)
    site = _site(fn, q, k, v, torch.randn(1, 2, 1, 11, generator=gen))
    assert site.variant == "dense", site.variant  # the keys above the diagonal still weigh (s − 1)


def test_one_extra_kept_entry_is_not_causal():
    def fn(q, k, v, alibi):
        n = q.shape[-2]
        above = torch.ones(n, n, dtype=torch.bool).triu(1)
        above[2, 7] = False  # one key above the diagonal kept
        return (q @ k.transpose(-1, -2) + alibi.masked_fill(above, float("-inf"))).softmax(-1) @ v
    gen = torch.Generator().manual_seed(5)
    q, k, v = inputs(gen, 1, 2, 2, 11, 11, 16, torch.float32)
    site = _site(fn, q, k, v, torch.randn(1, 2, 1, 11, generator=gen))
    assert site.variant != "causal", site.variant


def test_a_run_time_keep_proves_nothing():
    def fn(q, k, v, alibi, keep):
        return (q @ k.transpose(-1, -2) + torch.where(keep, alibi, float("-inf"))).softmax(-1) @ v
    gen = torch.Generator().manual_seed(6)
    n = 10
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool))  # causal on this call, but an input
    site = _site(fn, q, k, v, torch.randn(1, 2, 1, n, generator=gen), keep)
    assert site.variant == "dense", site.variant


def padded_falcon(q, k, v, alibi, pad):
    """Falcon 5.25 with a padding mask: the float mask where(causal & pad, 0, min), compared with −1
    to select where the positions bias goes."""
    n = q.shape[-2]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None] & pad[:, None, None, :]
    low = torch.finfo(q.dtype).min
    mask = torch.where(keep, torch.zeros((), dtype=q.dtype), low)
    bias = torch.masked_fill(alibi, mask < -1, low)
    return (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_float_mask_compared_with_a_constant_keeps_its_structure(backend):
    """The compared tensor is a run-time choice between two constants (no NaN can be in it): the
    comparison is read through the choice, the causal part is proven, the padding stays run-time."""
    gen = torch.Generator().manual_seed(7)
    n = 21
    q, k, v = inputs(gen, 2, 2, 2, n, n, 16, torch.float32)
    alibi = torch.randn(2, 2, 1, n, generator=gen)
    pad = torch.ones(2, n, dtype=torch.bool)
    pad[1, n - 6:] = False
    run, report = compiled(padded_falcon, backend)
    out = run(q, k, v, alibi, pad)
    site = rewritten_site(report, ("causal",), backend)
    _note(site)
    same_as_eager(out, padded_falcon(*double((q, k, v, alibi, pad))), torch.float32, f"padded falcon {backend}")


def test_a_run_time_float_compared_with_a_constant_stays_run_time():
    """``x < −1`` where x holds values read at run time (possibly NaN): the lifter leaves the comparison
    opaque, so no structure is claimed from it."""
    def fn(q, k, v, alibi, scores_mask):
        n = q.shape[-2]
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        mask = torch.where(causal, scores_mask, torch.finfo(q.dtype).min)  # run-time values inside
        return (q @ k.transpose(-1, -2) + alibi.masked_fill(mask < -1, float("-inf"))).softmax(-1) @ v
    gen = torch.Generator().manual_seed(8)
    n = 12
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    scores_mask = torch.zeros(1, 1, n, n)
    scores_mask[..., 3, 1] = float("nan")  # NaN < −1 is False: this key stays kept
    site = _site(fn, q, k, v, torch.randn(1, 2, 1, n, generator=gen), scores_mask)
    assert site.variant == "dense", site.variant
