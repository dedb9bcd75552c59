"""Tests of the fused Triton attention forward (codegen/triton_attention.py).

CPU: Triton's interpreter (TRITON_INTERPRET=1, set by tests/conftest.py) at small, odd sizes.
GPU (``-m gpu``, skipped without CUDA): real sizes, bf16/fp16/fp32.

Reference: eager float64 ``softmax(scale q kᵀ + bias, masked −inf) @ v`` on the same (rounded)
inputs. Tolerances, as ‖out − ref‖ / ‖ref‖ (NaN-free entries) and elementwise atol + rtol·|ref|:
  fp32: 1e-5 relative norm; elementwise 1e-5 + 1e-4·|ref| (ieee dots, exp2 rounding ~1e-7).
  fp16: 2e-3 / 5e-3 + 5e-3·|ref| (output rounding 2⁻¹¹, P rounded to fp16 before P·V).
  bf16: 1.5e-2 / 3e-2 + 2e-2·|ref| (output rounding 2⁻⁸, P rounded to bf16 before P·V).
NaNs must sit exactly where the reference has them (fully-masked rows).
"""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import KERNEL_TOL, check_kernel

from rewrite.codegen.triton_attention import AttentionConfig, choose_config, triton_attention

F32_MIN = torch.finfo(torch.float32).min


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              causal: bool = False, causal_offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager float64 attention and row logsumexp; GQA by repeating kv heads."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k64 = k64.repeat_interleave(g, dim=1)
    v64 = v64.repeat_interleave(g, dim=1)
    s = scale * (q64 @ k64.transpose(-1, -2))
    if bias is not None:
        s = s + bias.double()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    if causal:
        n, m = s.shape[-2:]
        i = torch.arange(n, device=s.device)[:, None]
        j = torch.arange(m, device=s.device)[None, :]
        s = s.masked_fill(j > i + causal_offset, float("-inf"))
    return torch.softmax(s, dim=-1) @ v64, torch.logsumexp(s, dim=-1)


check = check_kernel


def randn(shape: tuple[int, ...], dtype: torch.dtype, layout: str, gen: torch.Generator,
          device: str = "cpu") -> torch.Tensor:
    """[B, H, L, D] tensor with the given memory layout (never a contiguous copy afterwards)."""
    b, h, n, d = shape
    if layout == "contiguous":
        return torch.randn(shape, generator=gen, device=device).to(dtype)
    if layout == "bnhd":  # [B, N, H, D] storage viewed as [B, H, N, D], as after a projection
        return torch.randn((b, n, h, d), generator=gen, device=device).to(dtype).transpose(1, 2)
    if layout == "strided":  # every other row and an offset in the last dim: no unit strides left
        t = torch.randn((b, h, 2 * n, d + 3), generator=gen, device=device).to(dtype)
        return t[:, :, ::2, 3:]
    raise AssertionError(layout)


# --------------------------------------------------------------------------------------------------
# CPU (interpreter) tests
# --------------------------------------------------------------------------------------------------

cpu = pytest.mark.skipif(torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                         reason="interpreter tests run on the CPU")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# None: the interpreter's default table entry; tma=True: the Hopper TMA-descriptor path, which the
# interpreter also runs (zero-filled out-of-bounds loads, clipped stores) where strides allow it.
CONFIGS = [None, AttentionConfig(16, 16, 4, 1), AttentionConfig(16, 32, 4, 1),
           AttentionConfig(64, 16, 4, 1), AttentionConfig(32, 16, 4, 1, tma=True),
           AttentionConfig(16, 32, 4, 1, tma=True)]


@st.composite
def problems(draw: st.DrawFn) -> dict:
    b = draw(st.integers(1, 2))
    hkv = draw(st.integers(1, 2))
    hq = hkv * draw(st.sampled_from([1, 2, 3]))
    n = draw(st.integers(1, 70))
    m = draw(st.integers(1, 70))
    d = draw(st.sampled_from([16, 24, 32, 64, 80, 128]))
    dv = draw(st.sampled_from([d, 16, 40, 64]))
    causal = draw(st.booleans())
    offset = draw(st.sampled_from([0, m - n, draw(st.integers(-8, 8))])) if causal else 0
    return dict(
        b=b, hq=hq, hkv=hkv, n=n, m=m, d=d, dv=dv, causal=causal, offset=offset,
        dtype=draw(st.sampled_from(DTYPES)),
        layout=draw(st.sampled_from(["contiguous", "bnhd", "strided"])),
        bias=draw(st.sampled_from([None, "b11m", "11nm", "nm", "bhnm"])),
        mask=draw(st.sampled_from([None, "b1nm", "nm", "bhnm"])),
        config=draw(st.sampled_from(CONFIGS)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_bias(kind: str | None, b: int, hq: int, n: int, m: int, gen: torch.Generator,
              device: str = "cpu") -> torch.Tensor | None:
    if kind is None:
        return None
    shape = {"b11m": (b, 1, 1, m), "11nm": (1, 1, n, m), "nm": (n, m), "bhnm": (b, hq, n, m)}[kind]
    bias = torch.randn(shape, generator=gen, device=device)
    # sprinkle −inf and finfo.min entries (padding masks written as additive biases)
    r = torch.rand(shape, generator=gen, device=device)
    bias[r < 0.1] = float("-inf")
    bias[(r >= 0.1) & (r < 0.2)] = F32_MIN
    return bias


def make_mask(kind: str | None, b: int, hq: int, n: int, m: int, gen: torch.Generator,
              device: str = "cpu") -> torch.Tensor | None:
    if kind is None:
        return None
    shape = {"b1nm": (b, 1, n, m), "nm": (n, m), "bhnm": (b, hq, n, m)}[kind]
    mask = torch.rand(shape, generator=gen, device=device) > 0.3
    mask[..., n // 2, :] = False  # a fully masked query row
    return mask


@cpu
@settings(max_examples=45, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_matches_float64_reference(p: dict) -> None:
    gen = torch.Generator().manual_seed(p["seed"])
    b, hq, hkv, n, m, d, dv, dtype = (p[k] for k in ("b", "hq", "hkv", "n", "m", "d", "dv", "dtype"))
    q = randn((b, hq, n, d), dtype, p["layout"], gen)
    k = randn((b, hkv, m, d), dtype, p["layout"], gen)
    v = randn((b, hkv, m, dv), dtype, p["layout"], gen)
    bias = make_bias(p["bias"], b, hq, n, m, gen)
    mask = make_mask(p["mask"], b, hq, n, m, gen)
    scale = 1.0 / math.sqrt(d)
    out, lse = triton_attention(q, k, v, scale=scale, bias=bias, mask=mask, causal=p["causal"],
                                causal_offset=p["offset"], return_lse=True, config=p["config"])
    ref, ref_lse = reference(q, k, v, scale, bias, mask, p["causal"], p["offset"])
    assert out.dtype == dtype and lse.dtype == torch.float32
    check(out, ref, dtype, str(p))
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite), "LSE: −inf rows differ"
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


@cpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_rows_nan_and_finfo_min_rows_uniform(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(1)
    b, h, n, m, d = 1, 2, 37, 45, 32
    q, k, v = (randn(s, dtype, "contiguous", gen) for s in ((b, h, n, d), (b, h, m, d), (b, h, m, d)))
    bias = torch.randn(n, m, generator=gen)
    bias[3] = float("-inf")  # every score −inf: eager gives NaN
    bias[5] = F32_MIN  # every score finfo.min (finite, all equal): eager gives the mean of v
    bias[9, :40] = float("-inf")  # only the last key tile visible
    mask = torch.ones(b, h, n, m, dtype=torch.bool)
    mask[0, 1, 11] = False  # masked through the bool mask, in one head only
    out = triton_attention(q, k, v, scale=0.3, bias=bias, mask=mask)
    ref, _ = reference(q, k, v, 0.3, bias, mask)
    assert torch.isnan(out[0, :, 3]).all() and torch.isnan(out[0, 1, 11]).all()
    assert not torch.isnan(out[0, 0, 11]).any()
    torch.testing.assert_close(out[0, :, 5].double(), v[0].double().mean(dim=1),
                               atol=KERNEL_TOL[dtype][1], rtol=KERNEL_TOL[dtype][2])
    check(out, ref, dtype)


@cpu
def test_causal_bottom_right_and_rows_without_keys() -> None:
    gen = torch.Generator().manual_seed(2)
    # N > M with bottom-right alignment: the first N − M queries see no key at all (NaN rows)
    q = randn((1, 2, 50, 16), torch.float32, "contiguous", gen)
    k = randn((1, 1, 20, 16), torch.float32, "bnhd", gen)
    v = randn((1, 1, 20, 24), torch.float32, "bnhd", gen)
    for off in (20 - 50, 0, 7, 100):
        out = triton_attention(q, k, v, scale=0.25, causal=True, causal_offset=off,
                               config=AttentionConfig(32, 16, 4, 1))
        ref, _ = reference(q, k, v, 0.25, causal=True, causal_offset=off)
        check(out, ref, torch.float32, f"offset {off}")
    assert torch.isnan(out).sum() == 0  # offset 100: every key visible
    out = triton_attention(q, k, v, scale=0.25, causal=True, causal_offset=-30)
    assert torch.isnan(out[0, :, :30]).all() and not torch.isnan(out[0, :, 30:]).any()


@cpu
def test_no_keys_gives_eager_zeros() -> None:
    q = torch.randn(1, 2, 5, 16)
    k, v = torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 8)
    out, lse = triton_attention(q, k, v, scale=1.0, return_lse=True)
    eager = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
    assert torch.equal(out, eager) and torch.isneginf(lse).all()


@cpu
def test_errors() -> None:
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)
    with pytest.raises(ValueError, match=r"\(1, 4, 8, 16\)"):  # Hq % Hkv != 0, shapes named
        triton_attention(q, k, v, scale=1.0)
    with pytest.raises(ValueError, match="shape mismatch"):
        triton_attention(q, torch.randn(1, 4, 8, 32), torch.randn(1, 4, 8, 16), scale=1.0)
    k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="not broadcastable"):
        triton_attention(q, k, v, scale=1.0, bias=torch.randn(3, 8))
    with pytest.raises(ValueError, match="bool"):
        triton_attention(q, k, v, scale=1.0, mask=torch.ones(8, 8))
    with pytest.raises(ValueError, match="dtype"):
        triton_attention(q, k.half(), v, scale=1.0)


@cpu
def test_cpu_without_interpreter_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        triton_attention(q, q, q, scale=1.0)


# --------------------------------------------------------------------------------------------------
# GPU tests: real sizes
# --------------------------------------------------------------------------------------------------


def _poison_allocator(numel: int, device: str = "cuda") -> None:
    """Fill freed cached memory with NaN so an output element the kernel never writes reads NaN."""
    junk = torch.full((numel * 4,), float("nan"), dtype=torch.float32, device=device)
    del junk


@pytest.mark.gpu
@pytest.mark.parametrize("n", [128, 1000, 4096])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_bf16_real_sizes(n: int, d: int, causal: bool) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n + d)
    b, h = 2, 4
    q, k, v = (randn((b, h, n, d), torch.bfloat16, "contiguous", gen, "cuda") for _ in range(3))
    ref, ref_lse = reference(q, k, v, d**-0.5, causal=causal)
    table = choose_config(d, d, torch.bfloat16, q.device, causal)
    # the table's choice (pointer loads) and the same tiles through TMA descriptors
    for cfg in (None, dataclasses.replace(table, tma=True)):
        _poison_allocator(b * h * n * d)
        out, lse = triton_attention(q, k, v, scale=d**-0.5, causal=causal, return_lse=True, config=cfg)
        check(out, ref, torch.bfloat16, f"n={n} d={d} causal={causal} {cfg}")
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-3, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d,dv", [(64, 64), (80, 80), (96, 64), (256, 256), (32, 128)])
def test_gpu_dtypes_head_dims_gqa_bias_mask(dtype: torch.dtype, d: int, dv: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(d * dv)
    b, hq, hkv, n, m = 2, 8, 2, 777, 1029
    q = randn((b, hq, n, d), dtype, "bnhd", gen, "cuda")
    k = randn((b, hkv, m, d), dtype, "bnhd", gen, "cuda")
    v = randn((b, hkv, m, dv), dtype, "strided", gen, "cuda")
    bias = make_bias("b11m", b, hq, n, m, gen, "cuda")
    mask = make_mask("b1nm", b, hq, n, m, gen, "cuda")
    for causal, off in ((False, 0), (True, m - n)):
        _poison_allocator(b * hq * n * dv)
        out = triton_attention(q, k, v, scale=d**-0.5, bias=bias, mask=mask, causal=causal,
                               causal_offset=off)
        ref, _ = reference(q, k, v, d**-0.5, bias, mask, causal, off)
        check(out, ref, dtype, f"{dtype} d={d} dv={dv} causal={causal}")


@pytest.mark.gpu
def test_gpu_long_causal_bottom_right() -> None:
    gen = torch.Generator(device="cuda").manual_seed(7)
    q = randn((1, 4, 1024, 128), torch.bfloat16, "contiguous", gen, "cuda")
    k, v = (randn((1, 1, 4096, 128), torch.bfloat16, "contiguous", gen, "cuda") for _ in range(2))
    out = triton_attention(q, k, v, scale=128**-0.5, causal=True, causal_offset=4096 - 1024)
    ref, _ = reference(q, k, v, 128**-0.5, causal=True, causal_offset=4096 - 1024)
    check(out, ref, torch.bfloat16)
