"""Score modifiers inside the neighborhood kernel's tiles: a window that replaced its mask tensor and a
modifier together run on the window's tiles only (the Triton neighborhood kernel with the generated
modifier; eager's math by row blocks with the window on the CPU path), against float64 eager: a banded
soft-cap, Gemma 2's causal sliding window with finite and −inf fills (hypothesis), and a 2-D window with
a learned per-head scale, with gradients.
"""

from __future__ import annotations

import pytest
import torch
from eager_cases import compiled, double, grads_as_float64, inputs, modified_site, same_as_eager
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

NEG_INF = float("-inf")
DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def banded_softcap(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n)
    s = torch.tanh((q @ k.mT) / 8) * 8
    s = s.masked_fill((i[:, None] - i[None, :]).abs() > 3, NEG_INF)
    return s.softmax(-1) @ v


def causal_window_capped(w: int, fill: float):
    """Gemma 2's sliding layer as a hand-written window: soft-capped scores, a causal band of w keys."""
    def fn(q, k, v):
        n = q.shape[-2]
        i = torch.arange(n, device=q.device)
        s = torch.tanh((q @ k.mT) * q.shape[-1] ** -0.5 / 20.0) * 20.0
        keep = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < w)
        return torch.where(keep, s, torch.tensor(fill)).softmax(-1) @ v
    return fn


def grid_window_scaled(q, k, v, head_scale):
    """A 2-D 3×3 window on a 5×7 grid (NATTEN's neighbourhood, clamped at the borders written by hand
    as |Δrow| ≤ 1 and |Δcol| ≤ 1) with a learned per-head scale on the scores."""
    r, c = torch.arange(35) // 7, torch.arange(35) % 7
    keep = ((r[:, None] - r[None, :]).abs() <= 1) & ((c[:, None] - c[None, :]).abs() <= 1)
    s = (q @ k.mT) * head_scale
    return s.masked_fill(~keep, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_band_with_a_modifier_runs_on_the_window_tiles(backend):
    q, k, v = inputs(torch.Generator().manual_seed(9), 1, 2, 2, 45, 45, 16, torch.float32)
    fn, report = compiled(banded_softcap, backend)
    out = fn(q, k, v)
    site = modified_site(report, backend)
    assert site.variant == "neighborhood", site.variant
    assert any("neighborhood kernel's tiles" in n for n in site.notes), site.notes
    key = "triton neighborhood tiles (generated score modifier)" if backend == "triton" else \
        "torch (eager math by row blocks, score modifier)"
    assert any(key in name.split(" + ") for name in site.ran), site.ran
    same_as_eager(out, banded_softcap(*double((q, k, v))), torch.float32, "banded softcap")


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(2, 70), d=st.sampled_from([16, 40, 64, 128]), w=st.integers(1, 9), dtype=DTYPES,
       fill=st.sampled_from([NEG_INF, -1e4, "finfo.min"]), seed=st.integers(0, 2**31 - 1))
def test_causal_window_with_softcap_on_the_tiles_is_exact(n, d, w, dtype, fill, seed):
    fill = torch.finfo(dtype).min if fill == "finfo.min" else fill
    q, k, v = inputs(torch.Generator().manual_seed(seed), 2, 2, 1, n, n, d, dtype)
    fn = causal_window_capped(w, fill)
    run, report = compiled(lambda q, k, v: fn(q, k, v), "triton")
    out = run(q, k, v)
    site = modified_site(report, "triton")
    assert site.variant == "neighborhood" or w >= n, (site.variant, w, n)
    if site.variant == "neighborhood":
        assert any("triton neighborhood tiles" in name for name in site.ran), site.ran
    with torch.no_grad():
        lowp = fn(q, k, v)
    same_as_eager(out, fn(*double((q, k, v))), dtype, f"window {w} fill {fill} {dtype}", lowp=lowp)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_2d_window_with_a_learned_scale_on_the_tiles_with_gradients(backend):
    gen = torch.Generator().manual_seed(12)
    q, k, v = (t.requires_grad_() for t in inputs(gen, 2, 3, 3, 35, 35, 16, torch.float32))
    head_scale = (torch.rand(1, 3, 1, 1, generator=gen) + 0.5).requires_grad_()
    fn, report = compiled(grid_window_scaled, backend)
    out = fn(q, k, v, head_scale)
    site = modified_site(report, backend)
    assert site.variant == "neighborhood", site.variant
    same_as_eager(out, grid_window_scaled(*double((q, k, v, head_scale))), torch.float32, "2-D window, learned scale")
    grads_as_float64(grid_window_scaled, [q, k, v, head_scale], out)


def alibi_window(q, k, v, slopes):
    """ALiBi over a causal window of 7 keys, both built from positions: the bias is computed in the tiles
    from the row and column indices, and only the window's tiles run."""
    i = torch.arange(q.shape[-2])
    rel = (i[None, :] - i[:, None]).float()
    s = q @ k.mT * q.shape[-1] ** -0.5 + slopes[:, None, None] * rel
    keep = (rel <= 0) & (rel > -7)
    return s.masked_fill(~keep, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_position_bias_on_the_window_tiles(backend):
    gen = torch.Generator().manual_seed(13)
    q, k, v = inputs(gen, 2, 4, 4, 53, 53, 32, torch.float32)
    slopes = 2.0 ** (-8.0 * torch.arange(1, 5) / 4)
    fn, report = compiled(alibi_window, backend)
    out = fn(q, k, v, slopes)
    site = modified_site(report, backend)
    assert site.variant == "neighborhood", site.variant
    assert "(m - p)" in site.score_mod, site.score_mod  # computed from the tile's indices, no N×M bias
    same_as_eager(out, alibi_window(*double((q, k, v, slopes))), torch.float32, "ALiBi on the window tiles")


def capped_with_a_runtime_mask(q, k, v, keep):
    s = 10.0 * torch.tanh(q @ k.mT / 10.0)
    return s.masked_fill(~keep, NEG_INF).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_sparse_runtime_mask_with_a_modifier_runs_dense_and_says_why(backend):
    """A run-time mask keeping a fifth of the pairs would be block-sparse without the modifier; with it the
    dense kernel applies the mask, and the note says so."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = inputs(gen, 1, 2, 2, 40, 40, 16, torch.float32)
    keep = torch.rand(1, 1, 40, 40, generator=gen) < 0.2
    keep[..., torch.arange(40), torch.arange(40)] = True
    fn, report = compiled(capped_with_a_runtime_mask, backend)
    out = fn(q, k, v, keep)
    site = modified_site(report, backend)
    assert site.variant == "dense", site.variant
    assert any("only analytic windows take a modifier" in n for n in site.notes), site.notes
    same_as_eager(out, capped_with_a_runtime_mask(*double((q, k, v, keep))), torch.float32, "capped, run-time mask")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_sliding_softcap_at_size(dtype):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 8, 2048, 128, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    fn = causal_window_capped(512, torch.finfo(dtype).min)
    run, report = compiled(lambda q, k, v: fn(q, k, v), "auto")
    out = run(q, k, v)
    site = modified_site(report, "triton")
    assert site.variant == "neighborhood" and any("triton neighborhood tiles" in r for r in site.ran), site.ran
    same_as_eager(out, fn(*double((q, k, v))), dtype, "sliding soft-cap on the GPU")
