"""Tests of the fused sparse attention for structured masks (codegen/triton_neighborhood.py).

CPU: Triton's interpreter at small, odd grids (7×9, 5×6×7 …), every axis kind, GQA, odd head dims,
strided layouts, runtime masks with empty rows, biases. GPU (``-m gpu``): real sizes.

Reference: eager float64 ``softmax(scale·q kᵀ + bias, −inf where not (spec_keep & mask)) @ v`` on
the same rounded inputs, NaN rows where no key is kept (tests/mask_reference.py is
the definition of a spec). Tolerances as in tests/test_triton_attention.py.

The interpreter checks every int32 add/mul for overflow (about 1 ms an operation); the kernel's
index math is per tile, so most tests switch that check off (``fast_interpreter``) to stay within
the suite's time, and ``test_interpreter_overflow_checks_on`` runs a 2-D and a 3-D case with it on.
"""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mask_reference import naive_axis_keep, naive_keep_matrix
from reference import check_kernel

from rewrite.codegen.neighborhood_tiles import (
    NeighborhoodConfig,
    axis_patches,
    axis_tiles,
    kernel_axes,
    plan_tiles,
)
from rewrite.codegen.triton_neighborhood import neighborhood_attention
from rewrite.ir.mask import MaskSpec, axes_of

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

cpu = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                         reason="interpreter tests run on the CPU")


@pytest.fixture
def fast_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    from triton.runtime import interpreter

    opts = interpreter.interpreter_builder.options
    monkeypatch.setattr(interpreter.interpreter_builder, "options",
                        dataclasses.replace(opts, sanitize_overflow=False))


# --------------------------------------------------------------------------------------------------
# reference and helpers
# --------------------------------------------------------------------------------------------------


def keep_matrix(spec: MaskSpec, n: int, m: int) -> torch.Tensor:
    return naive_keep_matrix(spec, n, m)


def reference(q, k, v, spec, scale, bias=None, mask=None):
    """Eager float64 attention restricted to spec_keep & mask, and its row logsumexp."""
    g = q.shape[1] // k.shape[1]
    q64 = q.double()
    k64 = k.double().repeat_interleave(g, dim=1)
    v64 = v.double().repeat_interleave(g, dim=1)
    s = scale * (q64 @ k64.transpose(-1, -2))
    if bias is not None:
        s = s + bias.double()
    keep = keep_matrix(spec, q.shape[2], k.shape[2]).to(q.device)
    if mask is not None:
        keep = keep & mask
    s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, dim=-1) @ v64, torch.logsumexp(s, dim=-1)


check = check_kernel


def randn(shape, dtype, layout, gen, device="cpu"):
    """[B, H, L, D] with a memory layout; random normal (never zeros)."""
    b, h, n, d = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, device=device).to(dtype)
    if layout == "bnhd":
        return torch.randn((b, n, h, d), generator=gen, device=device).to(dtype).transpose(1, 2)
    t = torch.randn((b, h, 2 * n, d + 3), generator=gen, device=device).to(dtype)  # strided
    return t[:, :, ::2, 3:]


def nbhd(grid, window, dilation=None, causal=None, clamped=None, stride=None, block=None, halo=None,
         offset=0, kind="neighborhood") -> MaskSpec:
    nd = len(grid)
    return MaskSpec(kind, offset=offset, grid=tuple(grid), window=tuple(window),
                    dilation=tuple(dilation or (1,) * nd), causal=tuple(causal or (False,) * nd),
                    clamped=tuple(clamped or (False,) * nd), stride=tuple(stride or (1,) * nd),
                    block=tuple(block) if block else (), halo=tuple(halo) if halo else ())


@st.composite
def axis_rule(draw: st.DrawFn, size: int) -> dict:
    """One axis: a (dilated, maybe causal) window, a NATTEN clamped kernel (GNA stride) or a block."""
    kind = draw(st.sampled_from(["window", "window", "clamped", "blocked"]))
    if kind == "window":
        d = draw(st.integers(1, 3))
        return dict(window=draw(st.integers(0, 2 * size)), dilation=d, causal=draw(st.booleans()),
                    clamped=False, stride=1, block=0, halo=0)
    if kind == "clamped":
        d = draw(st.integers(1, max(1, min(3, size // 2))))
        k = draw(st.integers(1, max(1, size // d)))  # NATTEN needs L_r >= k
        return dict(window=k, dilation=d, causal=False, clamped=True, stride=draw(st.integers(1, k)),
                    block=0, halo=0)
    return dict(window=0, dilation=1, causal=False, clamped=False, stride=1,
                block=draw(st.integers(1, size)), halo=draw(st.integers(0, 3)))


def spec_from_axes(grid, rules, offset=0) -> MaskSpec:
    blocked = any(r["block"] for r in rules)
    return MaskSpec("neighborhood", offset=offset, grid=tuple(grid),
                    window=tuple(r["window"] for r in rules), dilation=tuple(r["dilation"] for r in rules),
                    causal=tuple(r["causal"] for r in rules), clamped=tuple(r["clamped"] for r in rules),
                    stride=tuple(r["stride"] for r in rules),
                    block=tuple(r["block"] for r in rules) if blocked else (),
                    halo=tuple(r["halo"] for r in rules) if blocked else ())


@st.composite
def problems(draw: st.DrawFn) -> dict:
    ndim = draw(st.sampled_from([1, 1, 2, 2, 3]))
    if ndim == 1:
        n = draw(st.integers(1, 64))
        kind = draw(st.sampled_from(["window", "window", "causal", "clamped", "blocked"]))
        if kind == "causal":
            m = draw(st.integers(1, 64))
            spec = MaskSpec("causal", offset=draw(st.sampled_from([0, m - n, draw(st.integers(-20, 20))])))
        elif kind == "window":  # N != M and an offset are 1-D only
            m = draw(st.integers(1, 64))
            d = draw(st.integers(1, 4))
            spec = nbhd((n,), (draw(st.integers(0, 40)),), (d,), (draw(st.booleans()),),
                        offset=draw(st.integers(-25, 25)))
        else:
            m = n
            spec = spec_from_axes((n,), [draw(axis_rule(n))])
    else:
        sizes = (st.integers(2, 10) if ndim == 2 else st.integers(2, 5))
        grid = tuple(draw(sizes) for _ in range(ndim))
        spec = spec_from_axes(grid, [draw(axis_rule(g)) for g in grid])
        n = m = math.prod(grid)
    hkv = draw(st.integers(1, 2))
    d = draw(st.sampled_from([16, 24, 64, 128]))
    return dict(
        spec=spec, n=n, m=m, b=draw(st.sampled_from([1, 1, 2])), hkv=hkv, hq=hkv * draw(st.sampled_from([1, 2])),
        d=d, dv=draw(st.sampled_from([d, 16, 40])), dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "bnhd", "strided"])),
        bias=draw(st.sampled_from([None, None, "nm", "b1nm"])),
        mask=draw(st.sampled_from([None, None, "nm", "bhnm"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_extras(p: dict, gen: torch.Generator, device: str = "cpu"):
    b, hq, n, m = p["b"], p["hq"], p["n"], p["m"]
    bias = mask = None
    if p["bias"]:
        shape = (n, m) if p["bias"] == "nm" else (b, 1, n, m)
        bias = torch.randn(shape, generator=gen, device=device)
        bias[torch.rand(shape, generator=gen, device=device) < 0.05] = float("-inf")
    if p["mask"]:
        shape = (n, m) if p["mask"] == "nm" else (b, hq, n, m)
        mask = torch.rand(shape, generator=gen, device=device) > 0.25
        mask[..., n // 2, :] = False  # an empty row through the runtime mask
    return bias, mask


def run_case(p: dict, config: NeighborhoodConfig | None = None, device: str = "cpu") -> None:
    gen = torch.Generator(device=device).manual_seed(p["seed"])
    b, hq, hkv, n, m, d, dv, dtype = (p[x] for x in ("b", "hq", "hkv", "n", "m", "d", "dv", "dtype"))
    q = randn((b, hq, n, d), dtype, p["layout"], gen, device)
    k = randn((b, hkv, m, d), dtype, p["layout"], gen, device)
    v = randn((b, hkv, m, dv), dtype, p["layout"], gen, device)
    bias, mask = make_extras(p, gen, device)
    scale = d**-0.5
    out, lse = neighborhood_attention(q, k, v, p["spec"], scale=scale, bias=bias, mask=mask,
                                      return_lse=True, config=config)
    ref, ref_lse = reference(q, k, v, p["spec"], scale, bias, mask)
    what = f"{p['spec'].describe()} n={n} m={m} d={d} {dtype}"
    assert out.dtype == dtype and lse.dtype == torch.float32
    check(out, ref, dtype, what)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), ~finite), f"{what}: LSE −inf rows differ"
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------------------
# CPU (interpreter) tests
# --------------------------------------------------------------------------------------------------


@cpu
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(problems())
def test_matches_float64_reference(fast_interpreter, p: dict) -> None:
    run_case(p)


CASES = {  # named specs the hypothesis search might take long to reach
    "2d_window_7x9": (nbhd((7, 9), (2, 3)), None),
    "2d_dilated_causal": (nbhd((7, 9), (4, 4), (2, 2), (True, False)), None),
    "2d_natten_gna": (nbhd((7, 9), (3, 5), (2, 1), clamped=(True, True), stride=(1, 2)), None),
    "2d_halo": (nbhd((8, 9), (0, 0), block=(4, 3), halo=(1, 2), kind="blocked"), None),
    "3d_567": (nbhd((5, 6, 7), (1, 2, 3), (1, 2, 1), (False, False, True)), None),
    "3d_clamped": (nbhd((5, 6, 7), (3, 3, 5), (1, 2, 1), clamped=(True,) * 3, stride=(1, 1, 2)), None),
    # full tiles in 2-D / 3-D (wider windows) through explicit patches (asserted below)
    "2d_full_tiles": (nbhd((8, 13), (5, 9)), NeighborhoodConfig(16, 16, 4, 1, (2, 8), (4, 4))),
    "3d_full_tiles": (nbhd((3, 4, 10), (1, 2, 6)), NeighborhoodConfig(16, 16, 4, 1, (1, 2, 8), (2, 2, 4))),
    "2d_dilated_full": (nbhd((12, 12), (10, 10), (2, 2)), NeighborhoodConfig(16, 16, 4, 1, (2, 8), (4, 4))),
    "1d_offset_n_ne_m": (nbhd((50,), (9,), (2,), (True,), offset=13), None),
    "1d_wide_full_tiles": (nbhd((70,), (40,)), NeighborhoodConfig(16, 16, 4, 1)),
}


@cpu
@pytest.mark.parametrize("name", list(CASES))
def test_named_specs(fast_interpreter, name: str) -> None:
    spec, cfg = CASES[name]
    n = 50 if name == "1d_offset_n_ne_m" else math.prod(spec.grid)
    m = 37 if name == "1d_offset_n_ne_m" else n
    p = dict(spec=spec, n=n, m=m, b=1, hq=2, hkv=1, d=24, dv=16, dtype=torch.float32, layout="bnhd",
             bias=None, mask=None, seed=len(name))
    run_case(p, cfg)
    if cfg is not None:
        axes = [ax for ax in kernel_axes(spec, n, m) if ax.kind]
        patches = zip(axes, cfg.q_patch or (16,), cfg.k_patch or (16,))
        assert math.prod(axis_tiles(ax, a, b)[1] for ax, a, b in patches) > 0  # some tiles full


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_analytic_tile_ranges_cover_kept_keys_and_full_tiles_are_full(size: int, keys: int, data) -> None:
    """Per axis, against tests/mask_reference.py's naive rule by brute force: every kept key of every query of a
    patch lies in the patch's visited key tiles (same residue class), and every pair of a tile
    counted full is kept and in range."""
    rule = data.draw(axis_rule(size))
    one_d = data.draw(st.booleans())
    off = data.draw(st.integers(-10, 10)) if one_d and not rule["clamped"] and not rule["block"] else 0
    if not one_d or rule["clamped"] or rule["block"]:
        keys = size
    spec = spec_from_axes((size,), [rule], offset=off)
    ax = kernel_axes(spec, size, keys)[2]
    (ref_ax,) = axes_of(spec)
    q = np.arange(size)[:, None]
    kept = naive_axis_keep(ref_ax, q, np.arange(keys)[None, :], size, off)
    p, kp = data.draw(st.sampled_from([1, 2, 4, 8])), data.draw(st.sampled_from([1, 2, 4, 8]))
    seen = np.zeros_like(kept)
    for r, rk, _c, lq, lk, _lf, i0, klo, nk, flo, fhi in axis_patches(ax, p, kp):
        for t in range(len(i0)):
            qs = [r + ax.d * i for i in range(i0[t], min(i0[t] + p, lq))]
            for tile in range(nk[t]):
                js = np.arange(klo[t] + tile * kp, klo[t] + (tile + 1) * kp)
                ks = rk + ax.d * js
                if flo[t] <= tile < fhi[t]:
                    assert (js < lk).all() and all(kept[x, ks].all() for x in qs), (ax, r, t, tile)
                ks = ks[js < lk]
                for x in qs:
                    seen[x, ks] = True
    assert not (kept & ~seen).any(), f"kept keys outside the visited tiles: {ax}"


@cpu
def test_planner_counts() -> None:
    """A wide 1-D window is mostly full tiles; a dilated 2-D window tiles inside its residue
    classes, so it gets exactly the plain window's tiles (per class) and full tiles."""
    axes = tuple(kernel_axes(nbhd((4096,), (512,)), 4096, 4096))
    qp, kp, _, total, full = plan_tiles(axes, 128, 64)
    assert qp == (128,) and kp == (64,)
    assert full / total > 0.75
    plain = plan_tiles(tuple(kernel_axes(nbhd((64, 64), (16, 16)), 4096, 4096)), 64, 64)
    dil = plan_tiles(tuple(kernel_axes(nbhd((128, 128), (32, 32), (2, 2)), 16384, 16384)), 64, 64)
    assert plain[4] > 0 and dil[:2] == plain[:2]
    assert dil[4] == 4 * plain[4] and dil[3] == 4 * plain[3]


@cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_nan_and_lse(fast_interpreter, dtype: torch.dtype) -> None:
    """Rows with no kept key (1-D offset past the keys, a runtime mask, a blocked row with a mask
    over its block) are NaN with LSE −inf, as eager's softmax of all −inf."""
    gen = torch.Generator().manual_seed(3)
    n, m = 40, 30
    spec = nbhd((n,), (4,), offset=-12)  # t = p − 12 − k: queries p > 45 or … keep nothing past M
    q = randn((1, 2, n, 16), dtype, "contiguous", gen)
    k = randn((1, 1, m, 16), dtype, "contiguous", gen)
    v = randn((1, 1, m, 16), dtype, "contiguous", gen)
    mask = torch.rand(n, m, generator=gen) > 0.2
    mask[20] = False
    out, lse = neighborhood_attention(q, k, v, spec, scale=0.5, mask=mask, return_lse=True)
    ref, _ = reference(q, k, v, spec, 0.5, mask=mask)
    check(out, ref, dtype)
    assert torch.isnan(out[0, :, 20]).all() and torch.isneginf(lse[0, :, 20]).all()
    assert torch.isnan(out[0, :, :8]).all()  # p − 12 + 4 < 0: no key at all
    assert torch.isneginf(lse).sum() == torch.isnan(ref[..., 0]).sum()


@cpu
def test_interpreter_overflow_checks_on() -> None:
    for spec, n in ((nbhd((7, 9), (2, 5), (1, 2)), 63), (nbhd((3, 4, 5), (1, 1, 2)), 60)):
        p = dict(spec=spec, n=n, m=n, b=1, hq=1, hkv=1, d=16, dv=16, dtype=torch.float32,
                 layout="contiguous", bias=None, mask="nm", seed=5)
        run_case(p)


@cpu
def test_no_keys_and_errors() -> None:
    q = torch.randn(1, 2, 5, 16)
    k, v = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 8)
    out, lse = neighborhood_attention(q, k, v, MaskSpec("causal"), scale=1.0, return_lse=True)
    assert torch.equal(out, torch.zeros(1, 2, 5, 8)) and torch.isneginf(lse).all()
    q = torch.randn(1, 2, 12, 16)
    with pytest.raises(ValueError, match="flattens to"):
        neighborhood_attention(q, q, q, nbhd((3, 5), (1, 1)), scale=1.0)
    with pytest.raises(ValueError, match="neighborhood_attention takes"):
        neighborhood_attention(q, q, q, MaskSpec("arbitrary"), scale=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        neighborhood_attention(q, torch.randn(1, 3, 12, 16), q, MaskSpec("causal"), scale=1.0)
    with pytest.raises(ValueError, match="patches"):
        neighborhood_attention(q, q, q, nbhd((3, 4), (1, 1)), scale=1.0,
                               config=NeighborhoodConfig(16, 16, 4, 1, (4, 2), (4, 4)))


# --------------------------------------------------------------------------------------------------
# GPU tests: real sizes
# --------------------------------------------------------------------------------------------------

GPU_CASES = [
    (nbhd((4096,), (256,)), 4096, 4096),
    (nbhd((4000,), (300,), (3,), (True,), offset=100), 4000, 4500),
    (MaskSpec("causal", offset=500), 3000, 3500),
    (nbhd((64, 96), (6, 6)), 6144, 6144),
    (nbhd((64, 64), (12, 12), (2, 2)), 4096, 4096),
    (nbhd((61, 67), (7, 9), (2, 1), clamped=(True, True), stride=(1, 2)), 61 * 67, 61 * 67),
    (nbhd((16, 20, 24), (3, 3, 3)), 16 * 20 * 24, 16 * 20 * 24),
    (nbhd((32, 32), (0, 0), block=(8, 8), halo=(3, 3), kind="blocked"), 1024, 1024),
]


@pytest.mark.gpu
@pytest.mark.parametrize("i", range(len(GPU_CASES)))
@pytest.mark.parametrize("d,dtype", [(64, torch.float16), (128, torch.bfloat16)])
def test_gpu_real_sizes(i: int, d: int, dtype: torch.dtype) -> None:
    spec, n, m = GPU_CASES[i]
    p = dict(spec=spec, n=n, m=m, b=1, hq=4, hkv=2, d=d, dv=d, dtype=dtype, layout="bnhd",
             bias=None, mask=None, seed=i)
    run_case(p, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d,dv", [(torch.bfloat16, 80, 80), (torch.float16, 24, 40),
                                        (torch.float32, 256, 256)])
def test_gpu_bias_mask_odd_dims(dtype: torch.dtype, d: int, dv: int) -> None:
    for spec, n in ((nbhd((3000,), (200,)), 3000), (nbhd((40, 45), (5, 5), (2, 1)), 1800)):
        p = dict(spec=spec, n=n, m=n, b=2, hq=2, hkv=1, d=d, dv=dv, dtype=dtype, layout="strided",
                 bias="b1nm", mask="bhnm", seed=d)
        run_case(p, device="cuda")
