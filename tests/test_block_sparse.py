"""Tests of the block maps (codegen/block_map.py) and the block-sparse Triton kernel
(codegen/triton_block_sparse.py).

CPU: Triton's interpreter (TRITON_INTERPRET=1, tests/conftest.py) at small, odd sizes; the
builders' Triton kernels are checked against their torch implementations and against brute force
on the token-level mask. GPU (``-m gpu``): real sizes, against SDPA on the materialised mask.

Reference: eager float64 ``softmax(scale q kᵀ + bias, not kept −inf) @ v``. Tolerances as in
tests/test_triton_attention.py (fp32 ieee dots; fp16/bf16 output and P rounding). NaNs (rows
that keep no key) must sit exactly where the reference has them, LSE −inf there.
"""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import KERNEL_TOL, check_kernel

from rewrite.codegen import block_map as bmod
from rewrite.codegen.block_map import (
    BlockMap,
    block_map_from_block_keep,
    block_map_from_key_blocks,
    block_map_from_mask,
    cached_block_map,
)
from rewrite.codegen.triton_attention import AttentionConfig
from rewrite.codegen.triton_block_sparse import block_sizes, block_sparse_attention

FIELDS = ("full_count", "full_index", "partial_count", "partial_index")
cpu = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                         reason="interpreter tests run on the CPU")
FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def reference(q, k, v, scale, keep, bias=None):
    """Eager float64 attention and row logsumexp; GQA by repeating kv heads."""
    g = q.shape[1] // k.shape[1]
    k64 = k.double().repeat_interleave(g, 1)
    v64 = v.double().repeat_interleave(g, 1)
    s = scale * (q.double() @ k64.transpose(-1, -2))
    if bias is not None:
        s = s + bias.double()
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v64, torch.logsumexp(s, -1)


def check(out, ref, lse, ref_lse, dtype, what=""):
    check_kernel(out, ref, dtype, what, lse, ref_lse)


def token_mask(keep_blocks: torch.Tensor, bq: int, bk: int, n: int, m: int) -> torch.Tensor:
    return keep_blocks.repeat_interleave(bq, -2)[..., :n, :].repeat_interleave(bk, -1)[..., :m]


def brute_force_check(bmap: BlockMap, keep: torch.Tensor) -> None:
    """keep: the token-level bool mask [Bm, Hm, N, M] the map describes (exactly)."""
    bm, bn, n, m = bmap.block_m, bmap.block_n, bmap.n, bmap.m
    tq, tk = math.ceil(n / bm), math.ceil(m / bn)
    assert bmap.full_count.shape == keep.shape[:2] + (tq,) and bmap.full_index.shape[-1] == tk
    for cnt, idx in ((bmap.full_count, bmap.full_index), (bmap.partial_count, bmap.partial_index)):
        assert cnt.dtype == idx.dtype == torch.int32
        ar = torch.arange(tk)
        valid = ar < cnt[..., None]
        listed = idx.masked_fill(~valid, tk)
        assert (listed[..., 1:] > listed[..., :-1]).logical_or(~valid[..., 1:]).all(), "not ascending"
        assert (idx[~valid] == 0).all(), "tail not zero"
        assert ((idx >= 0) & (idx < tk)).all()
    cls = bmap.classes()
    for i in range(tq):
        for j in range(tk):
            tile = keep[:, :, i * bm:(i + 1) * bm, j * bn:(j + 1) * bn]
            full, some = tile.flatten(2).all(-1), tile.flatten(2).any(-1)
            c = cls[:, :, i, j]
            assert torch.equal(c == 2, full), f"tile ({i}, {j}): full tiles"
            assert torch.equal(c >= 1, some), f"tile ({i}, {j}): every kept pair in a visited tile"


def assert_same_map(a: BlockMap, b: BlockMap) -> None:
    for f in FIELDS:
        assert torch.equal(getattr(a, f), getattr(b, f)), f


# --------------------------------------------------------------------------------------------------
# Block maps
# --------------------------------------------------------------------------------------------------


@cpu
@settings(FAST, max_examples=25)
@given(st.data())
def test_block_map_from_mask(data) -> None:
    bq = data.draw(st.sampled_from([(), (2,), (2, 3), (1, 3), (2, 1)]), "batch dims")
    n, m = data.draw(st.integers(1, 70)), data.draw(st.integers(1, 70))
    m = data.draw(st.sampled_from([m, 8 * math.ceil(m / 8)]))  # word-readable widths too
    bm, bn = data.draw(st.sampled_from([16, 32])), data.draw(st.sampled_from([16, 32]))
    density = data.draw(st.sampled_from([0.0, 0.1, 0.5, 0.97, 1.0]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    mask = torch.rand(*bq, n, m, generator=gen) < density
    mask[..., : n // 2, : m // 3] = True  # full tiles
    word = data.draw(st.sampled_from([1, 4, 8]))
    old = bmod.MASK_WORD_BYTES
    try:
        bmod.MASK_WORD_BYTES = word
        a = block_map_from_mask(mask, bm, bn, impl="torch")
        b = block_map_from_mask(mask, bm, bn, impl="triton")
    finally:
        bmod.MASK_WORD_BYTES = old
    assert_same_map(a, b)
    brute_force_check(a, bmod.as_4d(mask, "mask"))
    assert a.mask is not None and a.mask.dim() == 4


@cpu
def test_block_map_broadcast_dims_stay_one() -> None:
    mask = (torch.rand(1, 1, 40, 48) < 0.5).expand(3, 4, 40, 48)  # stride-0 batch/head dims
    a = block_map_from_mask(mask, 16, 16, impl="triton")
    assert a.full_count.shape[:2] == (1, 1)
    key_padding = torch.rand(2, 1, 1, 48) < 0.6  # [B, 1, 1, M]: the query dim broadcasts
    b = block_map_from_mask(key_padding.expand(2, 1, 40, 48), 16, 16, impl="triton")
    assert_same_map(b, block_map_from_mask(key_padding.expand(2, 1, 40, 48).contiguous(), 16, 16, impl="torch"))


@cpu
@settings(FAST, max_examples=25)
@given(st.data())
def test_block_map_from_block_keep(data) -> None:
    bm, bn = data.draw(st.sampled_from([16, 32])), data.draw(st.sampled_from([16, 32]))
    aligned = data.draw(st.booleans())
    if aligned:
        bq, bk = bm * data.draw(st.sampled_from([1, 2])), bn * data.draw(st.sampled_from([1, 2]))
    else:
        bq, bk = data.draw(st.integers(1, 40)), data.draw(st.integers(1, 40))
    nb, mb = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 6))
    n = data.draw(st.integers((nb - 1) * bq + 1, nb * bq))
    m = data.draw(st.integers((mb - 1) * bk + 1, mb * bk))
    lead = data.draw(st.sampled_from([(), (2,), (1, 3), (2, 2)]))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    keep = torch.rand(*lead, nb, mb, generator=gen) < data.draw(st.sampled_from([0.2, 0.5, 0.9]))
    a = block_map_from_block_keep(keep, bq, bk, n, m, bm, bn, impl="torch")
    b = block_map_from_block_keep(keep, bq, bk, n, m, bm, bn, impl="triton")
    assert_same_map(a, b)
    tok = bmod.as_4d(token_mask(keep, bq, bk, n, m), "keep")
    assert_same_map(a, block_map_from_mask(tok, bm, bn, impl="torch"))
    brute_force_check(a, tok)
    if aligned:
        assert int(a.partial_count.sum()) == 0, "block sizes that are multiples of the tiles: no partial tile"
    assert (a.mask_block_q, a.mask_block_k) == (bq, bk)


@cpu
@settings(FAST, max_examples=12)
@given(st.data())
def test_block_map_from_key_blocks(data) -> None:
    n, bk = data.draw(st.integers(1, 70)), data.draw(st.sampled_from([16, 32, 20]))
    mb = data.draw(st.integers(1, 4))
    m = data.draw(st.integers((mb - 1) * bk + 1, mb * bk))
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    keep = torch.rand(2, 1, n, mb, generator=gen) < 0.7
    keep[:, :, : n // 2] = True  # full tiles where every row keeps a block
    a = block_map_from_key_blocks(keep, bk, m, 16, 16, impl="torch")
    b = block_map_from_key_blocks(keep, bk, m, 16, 16, impl="triton")
    assert_same_map(a, b)
    brute_force_check(a, token_mask(keep, 1, bk, n, m))


@cpu
def test_cached_block_map_identity(monkeypatch) -> None:
    bmod.clear_block_map_cache()
    calls = []
    real = bmod.block_map_from_mask
    monkeypatch.setattr(bmod, "block_map_from_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    mask = torch.rand(1, 2, 40, 40) < 0.5
    a = cached_block_map(mask, 16, 16)
    b = cached_block_map(mask, 16, 16)
    assert len(calls) == 1 and b.mask.data_ptr() == mask.data_ptr()
    assert_same_map(a, b)
    cached_block_map(mask, 32, 16)  # other tiles: another entry
    assert len(calls) == 2
    mask[0, 0, :16, :16] = True  # in place: the version counter moves, the map is rebuilt
    c = cached_block_map(mask, 16, 16)
    assert len(calls) == 3
    assert_same_map(c, real(mask, 16, 16))
    # a freed mask whose memory a new tensor reuses is not mistaken for the old one
    ptr = mask.data_ptr()
    del mask, a, b, c
    gc.collect()
    for _ in range(20):
        new = torch.zeros(1, 2, 40, 40, dtype=torch.bool)
        if new.data_ptr() == ptr:
            break
    d = cached_block_map(new, 16, 16)
    assert int(d.full_count.sum() + d.partial_count.sum()) == 0
    with torch.inference_mode():  # no version counter: built every call, still correct
        inf_mask = torch.rand(40, 40) < 0.5
        assert_same_map(cached_block_map(inf_mask, 16, 16), real(inf_mask, 16, 16))
    # block-level keeps go through block_map_from_block_keep
    keep = torch.rand(3, 3) < 0.5
    e = cached_block_map(keep, 16, 16, block_q=32, block_k=32, n=90, m=70)
    assert_same_map(e, block_map_from_block_keep(keep, 32, 32, 90, 70, 16, 16))


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------

CPU_TILE = (32, 16)  # the interpreter's default tiles (block_sizes on the CPU)


def bigbird_keep(lead, nb, mb, gen, n_global=1, window=1, n_random=1) -> torch.Tensor:
    """BigBird-like block layout: global rows/columns, a band around the diagonal, random blocks."""
    keep = torch.zeros(*lead, nb, mb, dtype=torch.bool)
    keep[..., :n_global, :] = True
    keep[..., :, :n_global] = True
    i = torch.arange(nb)[:, None]
    j = torch.arange(mb)[None, :]
    keep |= (j - i * mb // max(nb, 1)).abs() <= window
    r = torch.rand(*lead, nb, mb, generator=gen)
    keep |= r < n_random / max(mb, 1)
    return keep


def randn(shape, dtype, gen, layout="contiguous"):
    if layout == "bnhd":
        b, h, n, d = shape
        return torch.randn((b, n, h, d), generator=gen).to(dtype).transpose(1, 2)
    return torch.randn(shape, generator=gen).to(dtype)


@st.composite
def problems(draw):
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2]))
    n, m = draw(st.integers(1, 75)), draw(st.integers(1, 75))
    d = draw(st.sampled_from([16, 24, 64, 128]))
    kind = draw(st.sampled_from(["blocks_aligned", "blocks_unaligned", "element", "key_blocks"]))
    return dict(b=b, hq=hq, hkv=hkv, n=n, m=m, d=d, dv=draw(st.sampled_from([d, 16, 40])), kind=kind,
                dtype=draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16])),
                bias=draw(st.booleans()), heads=draw(st.sampled_from([1, hq])), layout=draw(st.sampled_from(
                    ["contiguous", "bnhd"])), lse=draw(st.booleans()), seed=draw(st.integers(0, 2**31 - 1)),
                bq=draw(st.integers(3, 40)), bk=draw(st.integers(3, 40)))


@cpu
@settings(FAST, max_examples=14)
@given(problems())
def test_matches_float64_reference(p) -> None:
    gen = torch.Generator().manual_seed(p["seed"])
    b, hq, hkv, n, m, d, dv, dtype = (p[k] for k in ("b", "hq", "hkv", "n", "m", "d", "dv", "dtype"))
    q = randn((b, hq, n, d), dtype, gen, p["layout"])
    k = randn((b, hkv, m, d), dtype, gen, p["layout"])
    v = randn((b, hkv, m, dv), dtype, gen)
    bm, bn = CPU_TILE
    lead = (b if p["heads"] > 1 else 1, p["heads"])
    if p["kind"].startswith("blocks"):
        bq, bk = (bm * 2, bn) if p["kind"] == "blocks_aligned" else (p["bq"], p["bk"])
        nb, mb = math.ceil(n / bq), math.ceil(m / bk)
        keep_blocks = bigbird_keep(lead, nb, mb, gen)
        keep_blocks[..., nb // 2, :] = False  # a query block that keeps nothing: NaN rows
        bmap = block_map_from_block_keep(keep_blocks, bq, bk, n, m, bm, bn)
        keep = token_mask(keep_blocks, bq, bk, n, m)
        mask_arg = None
    elif p["kind"] == "key_blocks":
        bk = p["bk"]
        keep_tok = torch.rand(*lead, n, math.ceil(m / bk), generator=gen) < 0.4
        keep_tok[..., n // 3, :] = False
        bmap = block_map_from_key_blocks(keep_tok, bk, m, bm, bn)
        keep = token_mask(keep_tok, 1, bk, n, m)
        mask_arg = None
    else:
        keep = torch.rand(*lead, n, m, generator=gen) < 0.25
        keep[..., : n // 2, : m // 2] = True  # full tiles
        keep[..., n // 3, :] = False  # rows that keep no key
        bmap, mask_arg = None, keep  # built inside from the mask
    bias = torch.randn(b, hq, n, m, generator=gen) if p["bias"] else None
    scale = 1 / math.sqrt(d)
    res = block_sparse_attention(q, k, v, bmap, scale=scale, bias=bias, mask=mask_arg, return_lse=p["lse"])
    out, lse = res if p["lse"] else (res, None)
    ref, ref_lse = reference(q, k, v, scale, keep, bias)
    assert out.dtype == dtype and out.shape == (b, hq, n, dv)
    check(out, ref, lse, ref_lse, dtype, str(p))


@cpu
def test_map_with_mask_argument_and_larger_map_tiles() -> None:
    """A map with 64 x 32 tiles runs as 32 x 16 kernel tiles; a mask argument different from the
    map's own is AND'ed in the partial tiles."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = randn((1, 2, 70, 32), torch.float32, gen), randn((1, 2, 77, 32), torch.float32, gen), \
        randn((1, 2, 77, 32), torch.float32, gen)
    keep_blocks = bigbird_keep((1, 2), 3, 4, gen)
    bmap = block_map_from_block_keep(keep_blocks, 24, 20, 70, 77, 64, 32)
    tok = token_mask(keep_blocks, 24, 20, 70, 77)
    out = block_sparse_attention(q, k, v, bmap, scale=0.2)
    check(out, reference(q, k, v, 0.2, tok)[0], None, None, torch.float32, "64x32 map")
    extra = torch.rand(70, 77, generator=gen) < 0.8
    out = block_sparse_attention(q, k, v, bmap, scale=0.2, mask=extra)
    check(out, reference(q, k, v, 0.2, tok & extra)[0], None, None, torch.float32, "map & mask")
    # no map and no mask: dense attention
    out = block_sparse_attention(q, k, v, scale=0.2, config=AttentionConfig(16, 16, 4, 1))
    check(out, reference(q, k, v, 0.2, None)[0], None, None, torch.float32, "dense")


@cpu
def test_rejects_mismatched_maps() -> None:
    q = torch.randn(1, 1, 40, 16)
    bmap = block_map_from_mask(torch.ones(40, 41, dtype=torch.bool), 32, 16)
    with pytest.raises(ValueError, match="does not fit"):
        block_sparse_attention(q, q, q, bmap, scale=1.0)
    bmap = block_map_from_mask(torch.ones(40, 40, dtype=torch.bool), 24, 16)
    with pytest.raises(ValueError, match="power-of-2 divisor"):
        block_sparse_attention(q, q, q, bmap, scale=1.0)


# --------------------------------------------------------------------------------------------------
# GPU
# --------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_block_layout_vs_sdpa(d: int, dtype: torch.dtype) -> None:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    b, h, n = 2, 4, 4096 + 77
    q, k, v = (torch.randn(b, h, n, d, device=dev, dtype=dtype, generator=gen) for _ in range(3))
    bm, bn = block_sizes(d, d, dtype, dev)
    nb = math.ceil(n / 128)
    keep_blocks = (torch.rand(1, h, nb, nb, device=dev, generator=gen) < 0.1) | torch.eye(nb, device=dev, dtype=bool)
    bmap = block_map_from_block_keep(keep_blocks, 128, 128, n, n, bm, bn)
    ref_map = block_map_from_block_keep(keep_blocks.cpu(), 128, 128, n, n, bm, bn, impl="torch")
    for f in FIELDS:
        assert torch.equal(getattr(bmap, f).cpu(), getattr(ref_map, f)), f
    out = block_sparse_attention(q, k, v, bmap, scale=d**-0.5)
    keep = token_mask(keep_blocks, 128, 128, n, n)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=keep)
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < KERNEL_TOL[dtype][0], err
    # the element-mask path on the same (materialised) mask gives the same map
    emap = block_map_from_mask(keep, bm, bn)
    ref_emap = block_map_from_mask(keep.cpu(), bm, bn, impl="torch")
    for f in FIELDS:
        assert torch.equal(getattr(emap, f).cpu(), getattr(ref_emap, f)), f
    out2 = block_sparse_attention(q, k, v, scale=d**-0.5, mask=keep)
    assert float((out2.float() - ref).norm() / ref.norm()) < KERNEL_TOL[dtype][0]
