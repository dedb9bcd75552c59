"""codegen/sparse_torch.py (the CPU sparse attention path) against eager float64 attention.

The reference is ``softmax(q kᵀ·scale + bias, masked by spec_keep ∧ mask) @ v`` in float64 on the
materialised N×M mask (K/V repeated for GQA); a row with no kept key is NaN, its LSE −inf. The
per-axis key intervals (rewrite/ir/mask.py) are checked against tests/mask_reference.py by brute force.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from mask_reference import naive_axis_keep, naive_keep_matrix

from rewrite.codegen.block_map import BlockMap
from rewrite.codegen.sparse_torch import sparse_attention_torch
from rewrite.ir.mask import Axis, MaskSpec, axis_keep, spec_keep

FAST = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 2.5e-2, torch.float16: 5e-3}


# ---------------------------------------------------------------- strategies

@st.composite
def axes(draw, size: int):
    kind = draw(st.sampled_from(["window", "window", "clamped", "blocked"]))
    if kind == "window":
        return Axis("window", draw(st.integers(0, max(0, size + 1))), draw(st.integers(1, 4)), draw(st.booleans()))
    if kind == "blocked":
        return Axis("blocked", block=draw(st.integers(1, max(1, size))), halo=draw(st.integers(0, 3)))
    d = draw(st.integers(1, max(1, min(3, size))))
    k = draw(st.integers(1, max(1, size // d)))  # NATTEN needs every residue group ≥ k
    return Axis("clamped", k, d, stride=draw(st.integers(1, k)))


def make_spec(grid, axs, offset=0) -> MaskSpec:
    kind = "blocked" if all(a.kind == "blocked" for a in axs) else "neighborhood"
    return MaskSpec(kind, grid=tuple(grid), offset=offset, window=tuple(a.window for a in axs),
                    dilation=tuple(a.dilation for a in axs), causal=tuple(a.causal for a in axs),
                    clamped=tuple(a.kind == "clamped" for a in axs), stride=tuple(a.stride for a in axs),
                    block=tuple(a.block for a in axs), halo=tuple(a.halo for a in axs))


def broadcast_shape(draw, full):
    """A shape that broadcasts to ``full`` (dims 1 or full, leading 1s sometimes dropped)."""
    shape = [x if draw(st.booleans()) else 1 for x in full]
    while len(shape) > 2 and shape[0] == 1 and draw(st.booleans()):
        shape.pop(0)
    return shape


@st.composite
def extras(draw, b, hq, n, m, gen):
    """Optional bias and bool mask (with some rows emptied)."""
    bias = mask = None
    if draw(st.booleans()):
        bias = torch.randn(broadcast_shape(draw, [b, hq, n, m]), generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        shape = broadcast_shape(draw, [b, hq, n, m])
        mask = torch.rand(shape, generator=gen) < draw(st.sampled_from([0.3, 0.7, 0.95]))
        if shape[-2] > 1 and draw(st.booleans()):
            mask[..., torch.randperm(shape[-2], generator=gen)[: max(1, shape[-2] // 4)], :] = False
    return bias, mask


def inputs(b, hq, hkv, n, m, d, dv, dtype, gen):
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64)
    k = torch.randn(b, hkv, m, d, generator=gen, dtype=torch.float64)
    v = torch.randn(b, hkv, m, dv, generator=gen, dtype=torch.float64)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ---------------------------------------------------------------- reference and check

def spec_matrix(spec: MaskSpec | None, n: int, m: int) -> torch.Tensor:
    return naive_keep_matrix(spec, n, m)


def reference(q, k, v, keep, scale, bias):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = q.double() @ k.transpose(-1, -2) * scale
    if bias is not None:
        s = s + bias.double()
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def check(q, k, v, spec, *, bias=None, mask=None, block_map=None, keep=None):
    n, m = q.shape[2], k.shape[2]
    scale = 1 / math.sqrt(q.shape[-1])
    if keep is None:
        keep = spec_matrix(spec, n, m)
        if mask is not None:
            keep = keep & mask
    out, lse = sparse_attention_torch(q, k, v, spec, scale=scale, bias=None if bias is None else bias.to(q.dtype),
                                      mask=mask, block_map=block_map, return_lse=True)
    # half types: the reference sees the same rounded inputs and bias
    ref, ref_lse = reference(q, k, v, keep, scale, None if bias is None else bias.to(q.dtype))
    ref_lse = ref_lse.expand(lse.shape)
    assert out.dtype == q.dtype and out.shape == ref.shape
    empty = ref_lse == float("-inf")
    assert torch.equal(torch.isnan(out).any(-1), empty), "NaN rows must be exactly the rows keeping nothing"
    assert torch.equal(lse == float("-inf"), empty)
    tol = TOL[q.dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol, equal_nan=True)
    torch.testing.assert_close(lse.double(), ref_lse, atol=min(tol, 1e-3), rtol=min(tol, 1e-3), equal_nan=True)


# ---------------------------------------------------------------- key intervals

@settings(FAST, max_examples=300)
@given(data=st.data(), size=st.integers(1, 40), keys_extra=st.integers(-6, 6), offset=st.integers(-12, 12))
def test_intervals_match_axis_keep(data, size, keys_extra, offset):
    ax = data.draw(axes(size))
    keys, off = max(1, size + keys_extra), offset
    if ax.kind != "window":
        off = 0  # the 1-D offset shifts sliding windows only
    q, k = np.arange(size)[:, None], np.arange(keys)[None, :]
    want = np.broadcast_to(naive_axis_keep(ax, q, k, size, off), (size, keys))
    got = axis_keep(ax, torch.from_numpy(q), torch.from_numpy(k), size, keys, off).numpy()
    assert np.array_equal(got, want), (ax, size, keys, off)


@settings(FAST, max_examples=60)
@given(data=st.data(), grid=st.lists(st.integers(1, 9), min_size=2, max_size=3))
def test_spec_keep_torch_matches_spec_keep(data, grid):
    axs = [data.draw(axes(g)) for g in grid]
    spec = make_spec(grid, axs)
    n = math.prod(grid)
    p, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(spec_keep(spec, p, k, n, n), spec_matrix(spec, n, n))


# ---------------------------------------------------------------- structured specs

@FAST
@given(data=st.data(), n=st.integers(1, 150), m_extra=st.integers(-40, 40), offset=st.integers(-30, 30),
       heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]), d=st.sampled_from([16, 24, 64, 128]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_neighborhood_1d(data, n, m_extra, offset, heads, d, dtype, seed):
    ax = data.draw(axes(n))
    m, off = max(1, n + m_extra), offset
    if ax.kind != "window":
        m, off = n, 0
    symbolic = ax.kind == "window" and data.draw(st.booleans())  # a proven band has grid (None,)
    spec = make_spec((None,) if symbolic else (n,), [ax], off)
    gen = torch.Generator().manual_seed(seed)
    b = data.draw(st.integers(1, 2))
    bias, mask = data.draw(extras(b, heads[0], n, m, gen))
    q, k, v = inputs(b, *heads, n, m, d, data.draw(st.sampled_from([d, 8])), dtype, gen)
    check(q, k, v, spec, bias=bias, mask=mask)


@FAST
@given(data=st.data(), grid=st.lists(st.integers(1, 11), min_size=2, max_size=3),
       heads=st.sampled_from([(1, 1), (2, 1), (4, 2)]), d=st.sampled_from([16, 24, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_neighborhood_grid(data, grid, heads, d, dtype, seed):
    axs = [data.draw(axes(g)) for g in grid]
    spec = make_spec(grid, axs)
    n = math.prod(grid)
    gen = torch.Generator().manual_seed(seed)
    b = data.draw(st.integers(1, 2))
    bias, mask = data.draw(extras(b, heads[0], n, n, gen)) if data.draw(st.booleans()) else (None, None)
    q, k, v = inputs(b, *heads, n, n, d, d, dtype, gen)
    check(q, k, v, spec, bias=bias, mask=mask)


def test_big_windows_and_gna():
    """Sizes where tiles hold many queries: a 2-D dilated window, GNA-strided NATTEN, HaloNet."""
    gen = torch.Generator().manual_seed(0)
    cases = [((33, 35), [Axis("window", 6, 2), Axis("window", 4, 1, True)]),
             ((31, 29), [Axis("clamped", 7, 2, stride=3), Axis("clamped", 5, 1, stride=2)]),
             ((24, 20), [Axis("blocked", block=8, halo=2), Axis("blocked", block=5, halo=1)]),
             ((9, 11, 13), [Axis("clamped", 3), Axis("window", 2, 1, True), Axis("blocked", block=4, halo=1)])]
    for grid, axs in cases:
        n = math.prod(grid)
        q, k, v = inputs(1, 4, 2, n, n, 32, 32, torch.float32, gen)
        check(q, k, v, make_spec(grid, axs))
    q, k, v = inputs(1, 2, 1, 3000, 2900, 64, 64, torch.float32, gen)
    spec = make_spec((3000,), [Axis("window", 300, 3)], offset=-50)
    check(q, k, v, spec)
    out, _ = sparse_attention_torch(q, k, v, spec, scale=0.125, return_lse=True)
    assert torch.equal(sparse_attention_torch(q, k, v, spec, scale=0.125), out)


def test_empty_sizes():
    q, k = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 0, 8)
    out, lse = sparse_attention_torch(q, k, k, None, scale=1.0, return_lse=True)
    assert out.shape == (1, 2, 5, 8) and torch.isnan(out).all() and (lse == float("-inf")).all()
    assert sparse_attention_torch(q[:, :, :0], q, q, MaskSpec("causal"), scale=1.0).shape == (1, 2, 0, 8)


@FAST
@given(data=st.data(), n=st.integers(1, 300), m_extra=st.integers(-60, 60), offset=st.integers(-80, 80),
       heads=st.sampled_from([(1, 1), (4, 2), (2, 1)]), d=st.sampled_from([16, 64]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_causal_and_dense(data, n, m_extra, offset, heads, d, dtype, seed):
    m = max(1, n + m_extra)
    spec = data.draw(st.sampled_from([MaskSpec("causal", offset=offset), MaskSpec("causal"), None,
                                      MaskSpec("dense")]))
    gen = torch.Generator().manual_seed(seed)
    bias, mask = data.draw(extras(1, heads[0], n, m, gen))
    q, k, v = inputs(1, *heads, n, m, d, d, dtype, gen)
    check(q, k, v, spec, bias=bias, mask=mask)


# ---------------------------------------------------------------- block maps

def brute_block_map(keep: torch.Tensor, bm: int, bn: int, mask=None) -> BlockMap:
    """keep [Bm, Hm, N, M]: full tiles keep every (existing) pair, partial some."""
    b, h, n, m = keep.shape
    tq, tk = -(-n // bm), -(-m // bn)
    pad = torch.zeros(b, h, tq * bm, tk * bn, dtype=torch.bool)
    exists = torch.zeros_like(pad)
    pad[..., :n, :m] = keep
    exists[..., :n, :m] = True
    tiles = pad.view(b, h, tq, bm, tk, bn)
    any_ = tiles.any(-1).any(-2)
    full = (tiles | ~exists.view(b, h, tq, bm, tk, bn)).all(-1).all(-2) & any_
    part = any_ & ~full

    def compress(sel):
        count = sel.sum(-1).to(torch.int32)
        order = torch.sort((~sel).to(torch.int8), dim=-1, stable=True).indices  # selected first, ascending
        return count, order.to(torch.int32)
    fc, fi = compress(full)
    pc, pi = compress(part)
    return BlockMap(bm, bn, n, m, fc, fi, pc, pi, mask)


@FAST
@given(data=st.data(), n=st.integers(1, 200), m=st.integers(1, 200),
       tiles=st.sampled_from([(16, 16), (32, 16), (8, 32)]),
       heads=st.sampled_from([(1, 1), (4, 2), (2, 1)]), d=st.sampled_from([16, 24]),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31))
def test_block_map(data, n, m, tiles, heads, d, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    b, hq = data.draw(st.integers(1, 2)), heads[0]
    bm_, bn_ = tiles
    per_b, per_h = data.draw(st.booleans()), data.draw(st.booleans())
    mb, mh = (b if per_b else 1), (hq if per_h else 1)
    # A tile-structured random mask: every tile all kept, all dropped or random.
    tq, tk = -(-n // bm_), -(-m // bn_)
    kind = torch.randint(0, 3, (mb, mh, tq, tk), generator=gen)
    rnd = torch.rand(mb, mh, tq * bm_, tk * bn_, generator=gen) < 0.5
    kind = kind.repeat_interleave(bm_, 2).repeat_interleave(bn_, 3)
    mask = ((kind == 1) | ((kind == 2) & rnd))[..., :n, :m]
    spec = data.draw(st.sampled_from([None, MaskSpec("causal", offset=data.draw(st.integers(-20, 20)))]))
    keep = spec_matrix(spec, n, m) & mask
    in_map = data.draw(st.booleans())  # the element mask carried by the map, or passed as mask=
    bmap = brute_block_map(keep, bm_, bn_, mask if in_map else None)
    bias = torch.randn(1, hq, n, m, generator=gen, dtype=torch.float64) if data.draw(st.booleans()) else None
    q, k, v = inputs(b, *heads, n, m, d, d, dtype, gen)
    check(q, k, v, spec, bias=bias, mask=None if in_map else mask, block_map=bmap, keep=keep)


def test_block_map_skips_unlisted_tiles():
    """Only listed tiles are visited: a map listing nothing for a query tile leaves its rows NaN."""
    gen = torch.Generator().manual_seed(1)
    q, k, v = inputs(1, 2, 2, 64, 64, 16, 16, torch.float64, gen)
    keep = torch.ones(1, 1, 64, 64, dtype=torch.bool)
    bmap = brute_block_map(keep, 16, 16)
    bmap.full_count[..., 1] = 0
    out, lse = sparse_attention_torch(q, k, v, None, scale=0.25, block_map=bmap, return_lse=True)
    assert torch.isnan(out[:, :, 16:32]).all() and (lse[:, :, 16:32] == float("-inf")).all()
    ref, _ = reference(q, k, v, keep[0], 0.25, None)
    torch.testing.assert_close(out[:, :, 32:], ref[:, :, 32:])


def test_errors():
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError):
        sparse_attention_torch(q, q, q, MaskSpec("arbitrary"), scale=1.0)
    with pytest.raises(TypeError):
        sparse_attention_torch(q, q, q, None, scale=1.0, mask=torch.ones(8, 8))
    with pytest.raises(ValueError):
        sparse_attention_torch(q, q, q, make_spec((3, 3), [Axis("window", 1)] * 2), scale=1.0)
