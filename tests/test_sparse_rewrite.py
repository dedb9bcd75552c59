"""Sparse sites end to end: masks written in model code → proven MaskSpec → rewrite::sparse_attention
on the torch (CPU) path and the Triton kernels (interpreter), equal to eager float64.

Masks are built inside the function from arange the way users write them (row-major grid
coordinates with // and %, abs, comparisons, &), with random windows, dilations, grids, causal
flags, odd sizes; the report must name the variant and the exact density.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rewrite
from rewrite.ir.mask import MaskSpec, kept_count

SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _window_1d(w: int, d: int, causal: bool):
    def fn(q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        t = i[:, None] - i[None, :]
        keep = ((t >= 0) & (t <= w) if causal else t.abs() <= w) & (t % d == 0)
        s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
        return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    return fn


def _window_2d(width: int, ry: int, rx: int, d: int):
    def fn(q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        y, x = i // width, i % width
        dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
        keep = (dy.abs() <= ry * d) & (dx.abs() <= rx * d) & (dy % d == 0) & (dx % d == 0)
        bias = torch.zeros(keep.shape, device=q.device).masked_fill(~keep, float("-inf"))
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        return s.softmax(-1) @ v
    return fn


def _halo(block: int, halo: int):
    def fn(q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        start = (i // block) * block
        keep = (i[None, :] >= start[:, None] - halo) & (i[None, :] <= start[:, None] + block - 1 + halo)
        s = torch.einsum("bhnd,bhmd->bhnm", q, k) * 0.3
        return torch.einsum("bhnm,bhmd->bhnd", s.masked_fill(~keep, float("-inf")).softmax(-1), v)
    return fn


def _reference(fn, q, k, v):
    return fn(q.double(), k.double(), v.double())


def _run(fn, q, k, v, backend: str):
    report = rewrite.inspect(fn, q, k, v, backend=backend)
    torch._dynamo.reset()
    out = rewrite.compile(fn, backend=backend)(q, k, v)
    return report.sites[0], out


@SETTINGS
@given(n=st.integers(9, 70), w=st.integers(1, 9), d=st.integers(1, 3), causal=st.booleans(),
       e=st.sampled_from([16, 24]), backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 99))
def test_sliding_window_1d(n, w, d, causal, e, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, e, generator=g) for _ in range(3))
    fn = _window_1d(w * d, d, causal)
    site, out = _run(fn, q, k, v, backend)
    assert site.rewritten and site.variant == "neighborhood", site
    assert site.kernel == backend
    torch.testing.assert_close(out.double(), _reference(fn, q, k, v), atol=2e-5, rtol=2e-5)


@SETTINGS
@given(h=st.integers(3, 8), width=st.integers(3, 9), ry=st.integers(0, 2), rx=st.integers(1, 2),
       d=st.integers(1, 2), backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 99))
def test_neighborhood_2d_row_major(h, width, ry, rx, d, backend, seed):
    n = h * width
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, 16, generator=g) for _ in range(3))
    fn = _window_2d(width, ry, rx, d)
    site, out = _run(fn, q, k, v, backend)
    assert site.rewritten, site
    want = _reference(fn, q, k, v)
    i = torch.arange(n)
    y, x = i // width, i % width
    dy, dx = y[:, None] - y[None, :], x[:, None] - x[None, :]
    kept = float(((dy.abs() <= ry * d) & (dx.abs() <= rx * d) & (dy % d == 0) & (dx % d == 0)).double().mean())
    # A window that keeps everything is dense; anything else must be proven a neighborhood.
    assert site.variant == ("dense" if kept == 1 else "neighborhood"), site
    assert site.density == pytest.approx(kept)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5)


@SETTINGS
@given(n=st.integers(10, 60), block=st.integers(2, 9), halo=st.integers(0, 3),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 99))
def test_halo_blocks(n, block, halo, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    fn = _halo(block, halo)
    site, out = _run(fn, q, k, v, backend)
    assert site.rewritten, site
    i = torch.arange(n)
    start = (i // block) * block
    keep = (i[None, :] >= start[:, None] - halo) & (i[None, :] <= start[:, None] + block - 1 + halo)
    kept = float(keep.double().mean())
    assert site.variant == ("dense" if kept == 1 else "neighborhood"), site  # a window covering all is dense
    torch.testing.assert_close(out.double(), _reference(fn, q, k, v), atol=2e-5, rtol=2e-5)


def test_window_density_and_report_fields():
    n, w = 40, 3
    q, k, v = (torch.randn(1, 2, n, 16) for _ in range(3))
    site, _ = _run(_window_1d(w, 1, False), q, k, v, "torch")
    spec_density = kept_count(MaskSpec("neighborhood", grid=(n,), window=(w,), dilation=(1,),
                                                            causal=(False,), clamped=(False,), stride=(1,),
                                                            block=(0,), halo=(0,)), n, n) / n**2
    assert site.density == pytest.approx(spec_density)
    assert site.ideal_speedup == pytest.approx(1 / spec_density)
    assert "window=(3,)" in site.mask


def _unknown_layout(q, k, v):
    """A position-only mask of no known family (a hashed layout, diagonal kept): block-sparse."""
    i = torch.arange(q.shape[-2], device=q.device)
    keep = ((i[:, None] // 8 * 5 + i[None, :] // 8 * 3) % 7 == 0) | (i[:, None] // 8 == i[None, :] // 8)
    s = q @ k.transpose(-1, -2) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unknown_layout_is_block_sparse(backend):
    q, k, v = (torch.randn(1, 2, 77, 16, generator=torch.Generator().manual_seed(1)) for _ in range(3))
    site, out = _run(_unknown_layout, q, k, v, backend)
    assert site.variant == "block_sparse", site
    assert "folded to a constant" in " ".join(site.notes)
    torch.testing.assert_close(out.double(), _reference(_unknown_layout, q, k, v), atol=2e-5, rtol=2e-5)


def _routed(q, k, v, keep):
    """Attention with a run-time routing mask (top-k key blocks per query), as MoBA writes it."""
    s = q @ k.transpose(-1, -2) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_runtime_routing_mask_with_empty_rows(backend):
    g = torch.Generator().manual_seed(2)
    n, blk = 70, 16
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    scores = torch.rand(2, 2, n, math.ceil(n / blk), generator=g)
    top = scores.topk(2, dim=-1).indices
    sel = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    keep = sel.repeat_interleave(blk, dim=-1)[..., :n]
    keep[:, :, 5] = False  # a row with no kept key: NaN, as eager
    site_report = rewrite.inspect(_routed, q, k, v, keep, backend=backend).sites[0]
    assert site_report.variant == "block_sparse", site_report
    torch._dynamo.reset()
    out = rewrite.compile(_routed, backend=backend)(q, k, v, keep)
    want = _routed(q.double(), k.double(), v.double(), keep)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=2e-5, equal_nan=True)
    # A new mask on the next call: the block map is rebuilt, never reused.
    keep2 = keep.roll(7, dims=-1)
    torch.testing.assert_close(rewrite.compile(_routed, backend=backend)(q, k, v, keep2).double(),
                               _routed(q.double(), k.double(), v.double(), keep2), atol=2e-5, rtol=2e-5,
                               equal_nan=True)


def test_wrong_mask_shape_errors_as_eager():
    q, k, v = (torch.randn(1, 2, 12, 16) for _ in range(3))
    bad = torch.ones(11, 12, dtype=torch.bool)
    with pytest.raises(Exception) as eager_err:
        _routed(q, k, v, bad)
    with pytest.raises(Exception) as ours:
        rewrite.compile(_routed)(q, k, v, bad)
    assert "size" in str(ours.value) and "size" in str(eager_err.value)


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["band", "grid", "grid_dilated", "halo", "layout"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_sparse_sites_on_gpu(case, dtype):
    """The auto backend on a GPU: proven structure → Triton kernels, at sizes spanning many tiles."""
    fns = {"band": (_window_1d(37, 1, False), 1000), "grid": (_window_2d(48, 3, 2, 1), 48 * 40),
           "grid_dilated": (_window_2d(32, 2, 2, 2), 32 * 33), "halo": (_halo(64, 16), 777),
           "layout": (_unknown_layout, 1000)}
    fn, n = fns[case]
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, 64, device="cuda", dtype=dtype, generator=g) for _ in range(3))
    site = rewrite.inspect(fn, q, k, v).sites[0]
    assert site.kernel == "triton" and site.variant in ("neighborhood", "block_sparse"), site
    torch._dynamo.reset()
    out = rewrite.compile(fn)(q, k, v)
    want = _reference(fn, q, k, v)
    tol = 2e-2 if dtype != torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)


def _moba_routed(q, k, v, sel):
    """MoBA-style routing: each query keeps its top key blocks, the table expanded per token."""
    keep = sel.repeat_interleave(16, dim=-1)[..., :q.shape[-2]]
    s = q @ k.transpose(-1, -2) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _bigbird_table(q, k, v, blk):
    """A block layout table [nb, nb] expanded to tokens (BigBird-like)."""
    n = q.shape[-2]
    keep = blk.repeat_interleave(16, 0).repeat_interleave(16, 1)[:n, :n]
    s = q @ k.transpose(-1, -2) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def _expanded_table(q, k, v, sel):
    b, h, n, nb = sel.shape
    keep = sel[..., None].expand(b, h, n, nb, 16).reshape(b, h, n, nb * 16)
    s = q @ k.transpose(-1, -2) * 0.25
    return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", ["moba", "bigbird", "expanded"])
def test_block_table_masks_pass_the_table(case, backend):
    """A run-time mask read per block is recognised as such: the kernel gets the table (the
    token-level mask is not built), results equal eager, rows with no kept key included, and a
    different table on the next call is honoured."""
    g = torch.Generator().manual_seed(3)
    n = 64 if case == "expanded" else 70
    q, k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(3))
    fn = {"moba": _moba_routed, "bigbird": _bigbird_table, "expanded": _expanded_table}[case]
    shape = (5, 5) if case == "bigbird" else (2, 2, n, math.ceil(n / 16))
    tables = [torch.rand(*shape, generator=g) < 0.3 for _ in range(2)]
    site = rewrite.inspect(fn, q, k, v, tables[0], backend=backend).sites[0]
    assert site.variant == "block_sparse", site
    assert any("block: the kernel takes the table" in n for n in site.notes), site.notes
    torch._dynamo.reset()
    fast = rewrite.compile(fn, backend=backend)
    for t in tables:
        want = fn(q.double(), k.double(), v.double(), t)
        assert want.isnan().any()  # some rows keep no key: NaN, as eager
        torch.testing.assert_close(fast(q, k, v, t).double(), want, atol=2e-5, rtol=2e-5, equal_nan=True)


def _natten_2d(h: int, w: int, ks: int):
    """NATTEN's edge-clamped window, written as users write it (the window start clamped)."""
    def fn(q, k, v):
        i = torch.arange(q.shape[-2], device=q.device)
        y, x = i // w, i % w
        sy = (y - ks // 2).clamp(0, h - ks)
        sx = (x - ks // 2).clamp(0, w - ks)
        keep = ((y[None, :] >= sy[:, None]) & (y[None, :] < sy[:, None] + ks)
                & (x[None, :] >= sx[:, None]) & (x[None, :] < sx[:, None] + ks))
        s = q @ k.transpose(-1, -2) * 0.25
        return s.masked_fill(~keep, float("-inf")).softmax(-1) @ v
    return fn


@SETTINGS
@given(h=st.integers(3, 8), w=st.integers(3, 8), ks=st.sampled_from([3, 5]),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 99))
def test_natten_clamped_2d(h, w, ks, backend, seed):
    ks = min(ks, h, w)
    ks -= 1 - ks % 2  # odd, at most the grid (NATTEN's kernel fits every axis)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, h * w, 16, generator=g) for _ in range(3))
    fn = _natten_2d(h, w, ks)
    site, out = _run(fn, q, k, v, backend)
    kept = (ks * ks) / (h * w)
    assert site.variant == ("dense" if kept == 1 else "neighborhood"), site
    # (on small axes an equivalent rule may be chosen: a clamped 3-window on 4 is also blocks + halo)
    assert site.density == pytest.approx(kept)
    torch.testing.assert_close(out.double(), _reference(fn, q, k, v), atol=2e-5, rtol=2e-5)


def _sliding_bias(q, k, v, window=6):
    """Mistral-style sliding window as an additive bias built with where(cond, 0.0, -inf)."""
    i = torch.arange(q.shape[-2], device=q.device)
    dist = i[:, None] - i[None, :]
    bias = torch.where((dist >= 0) & (dist < window), 0.0, float("-inf"))
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + bias, dim=-1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sliding_window_written_as_where_bias(backend):
    q, k, v = (torch.randn(1, 3, 45, 16, generator=torch.Generator().manual_seed(4)) for _ in range(3))
    site, out = _run(_sliding_bias, q, k, v, backend)
    assert site.variant == "neighborhood" and "causal=(True,)" in site.mask and "window=(5,)" in site.mask, site
    torch.testing.assert_close(out.double(), _reference(_sliding_bias, q, k, v), atol=2e-5, rtol=2e-5)


class _BandBuffer(torch.nn.Module):
    """A sliding window built once in __init__ and registered (Longformer-style local attention):
    under torch.compile the buffer is a run-time input, not a mask the graph computes."""

    def __init__(self, n: int, before: int, after: int):
        super().__init__()
        i = torch.arange(n)
        self.register_buffer("local", ((i[None, :] - i[:, None]) >= -before) & ((i[None, :] - i[:, None]) <= after))

    def forward(self, q, k, v):
        s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        return s.masked_fill(~self.local, float("-inf")).softmax(-1) @ v


@pytest.mark.parametrize("backend,before,after", [("torch", 5, 5), ("torch", 7, 0), ("torch", 3, 9),
                                                   ("triton", 3, 9)])
def test_band_buffer_runs_neighborhood_and_is_rechecked(backend, before, after):
    """A registered band buffer: read as a 1-D window on the first call (analytic tiles, the tensor still
    applied inside them); a later in-place change that keeps keys outside the band is seen (version
    counter) and runs block-sparse; both equal eager float64."""
    g = torch.Generator().manual_seed(before * 10 + after)
    n = 83
    model = _BandBuffer(n, before, after)
    q, k, v = (torch.randn(2, 3, n, 16, generator=g) for _ in range(3))
    report = rewrite.inspect(model, q, k, v, backend=backend)
    site = report.sites[0]
    assert site.variant == "neighborhood", site
    window = before if not after else (before + after) // 2  # causal window, or centred half-width
    assert site.mask_spec.proof.startswith("first-call value") and site.mask_spec.window == (window,), site.mask_spec
    torch._dynamo.reset()
    compiled = rewrite.compile(model, backend=backend)
    ref = _BandBuffer(n, before, after).double()
    torch.testing.assert_close(compiled(q, k, v).double(), ref(q.double(), k.double(), v.double()),
                               atol=2e-5, rtol=2e-5)
    # In place: a key far outside the band for some rows, and a row that loses its band entirely (NaN).
    with torch.no_grad():
        model.local[10, 60] = True
        model.local[40] = False
        ref.local.copy_(model.local)
    torch.testing.assert_close(compiled(q, k, v).double(), ref(q.double(), k.double(), v.double()),
                               atol=2e-5, rtol=2e-5, equal_nan=True)
