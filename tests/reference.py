"""Eager float64 reference for softmax attention, and the tolerances tests compare with.

``attention_reference`` is the ground truth every spelling in ``tests/spellings.py`` is
checked against: ``softmax(scale · q·kᵀ + bias, masked) @ v`` computed in float64.
Fully-masked rows follow eager PyTorch: ``torch.softmax`` of a row of ``-inf`` is NaN
(the default, ``fully_masked="nan"``); ``F.scaled_dot_product_attention`` on the CPU
returns zeros there instead (``fully_masked="zero"``).
"""

from __future__ import annotations

import torch

__all__ = ["attention_reference", "tolerance", "assert_close", "TOLERANCES"]

# (atol, rtol) per dtype, for an attention output of O(1) magnitude compared with the
# float64 reference. Measured (tests/test_spelling_catalogue.py) on eager low-precision runs of
# every spelling with D up to 128 and N, M up to 67: eager itself stays below ~0.7 of these
# (bf16 with a bias is the closest), and a rewritten kernel must be at least as accurate as eager.
#   fp32: matmul + exp rounding, ~1e-6 observed.
#   bf16: 8 bits of mantissa: rounding q·kᵀ of magnitude ~4 costs ~2e-2 in a weight before
#         softmax, observed output error up to ~1.5e-2.
#   fp16: 11 bits: about 8x tighter than bf16.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-5, 1e-4),
    torch.bfloat16: (3e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """Compare in float64 at the tolerance of ``dtype``; NaNs must sit in the same places."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().to(torch.float64)
    e = expected.detach().to(torch.float64)
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{msg}: NaN positions differ ({int(nan_a.sum())} NaNs in actual, {int(nan_e.sum())} expected)"
    )
    torch.testing.assert_close(a, e, equal_nan=True, msg=lambda m: f"{msg}: {m}", **tolerance(dtype))


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float,
    bias: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    fill: float = float("-inf"),
    fully_masked: str = "nan",
) -> torch.Tensor:
    """``softmax(scale · q @ kᵀ + bias, masked) @ v`` in float64.

    q: [..., H, N, D]; k: [..., Hkv, M, D]; v: [..., Hkv, M, Dv] with H a multiple of Hkv
    (GQA: key/value head j serves query heads j·H/Hkv ... (j+1)·H/Hkv − 1, as
    ``repeat_interleave`` does). Any leading dims broadcast; 3-d inputs are [B·H, N, D].

    bias: added to the scaled scores (broadcast to [..., H, N, M]); may hold -inf.
    mask: boolean, True = attend (broadcast to the scores); masked scores become ``fill``.
    causal: query p attends key m iff m <= p (top-left aligned, as SDPA's is_causal).
    fully_masked: "nan" (eager softmax) or "zero" (SDPA on the CPU) for rows whose scores
    are all -inf.
    """
    if fully_masked not in ("nan", "zero"):
        raise ValueError(f"fully_masked must be 'nan' or 'zero', not {fully_masked!r}")
    q, k, v = (t.detach().to(torch.float64) for t in (q, k, v))
    if q.dim() >= 4 and k.shape[-3] != q.shape[-3]:
        h, hkv = q.shape[-3], k.shape[-3]
        assert h % hkv == 0, f"query heads {h} not a multiple of key/value heads {hkv}"
        k = k.repeat_interleave(h // hkv, dim=-3)
        v = v.repeat_interleave(h // hkv, dim=-3)
    scores = (q @ k.transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.detach().to(torch.float64)
    n, m = scores.shape[-2], scores.shape[-1]
    if causal:
        keep = torch.ones(n, m, dtype=torch.bool).tril()
        scores = scores.masked_fill(~keep, fill)
    if mask is not None:
        assert mask.dtype == torch.bool, "mask must be boolean (True = attend)"
        scores = scores.masked_fill(~mask, fill)
    probs = torch.softmax(scores, dim=-1)
    out = probs @ v
    if fully_masked == "zero":
        empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
        out = out.masked_fill(empty, 0.0)
    return out


# Fused kernels against the float64 reference: (norm-relative, atol, rtol) per input dtype.
# The norm-relative bound catches a systematically wrong kernel that elementwise tolerances
# sized for bf16 rounding would let through.
KERNEL_TOL: dict[torch.dtype, tuple[float, float, float]] = {
    torch.float32: (1e-5, 1e-5, 1e-4),
    torch.float16: (2e-3, 5e-3, 5e-3),
    torch.bfloat16: (1.5e-2, 3e-2, 2e-2),
}


def check_kernel(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                 lse: torch.Tensor | None = None, ref_lse: torch.Tensor | None = None) -> None:
    """A kernel's output (and row LSE) against the float64 reference: NaN rows in the same
    places (rows with no kept key), the rest within ``KERNEL_TOL``; LSE −inf on the same rows."""
    assert out.shape == ref.shape, what
    o = out.double()
    nan_o, nan_r = torch.isnan(o), torch.isnan(ref)
    assert torch.equal(nan_o, nan_r), (f"{what}: NaN positions differ ({int(nan_o.sum())} vs "
                                       f"{int(nan_r.sum())} expected)")
    o, r = o[~nan_r], ref[~nan_r]
    if r.numel():
        rel, atol, rtol = KERNEL_TOL[dtype]
        err = float((o - r).norm() / r.norm().clamp_min(1e-30))
        assert err <= rel, f"{what}: relative error {err:.3g} > {rel}"
        torch.testing.assert_close(o, r, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")
    if lse is not None:
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite), f"{what}: LSE −inf rows differ"
        assert (lse[~finite] == float("-inf")).all()
        torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=1e-4, rtol=1e-5)


# Linear-time kernels (linear, flow): error relative to the largest |expected|.
LINEAR_REL = {torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float64: 1e-10}


def close_relative(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, msg: str = "") -> None:
    """NaN and inf in the same places as the reference; finite entries within ``LINEAR_REL``
    of the largest finite |expected|."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, msg
    assert torch.equal(torch.isnan(a), torch.isnan(e)), f"{msg}: NaN positions differ"
    assert torch.equal(torch.isinf(a), torch.isinf(e)), f"{msg}: inf positions differ"
    fin = torch.isfinite(e)
    if not fin.any():
        return
    err = (a[fin] - e[fin]).abs().max() / e[fin].abs().max().clamp_min(1e-30)
    assert err <= LINEAR_REL[dtype], f"{msg}: relative error {err:.3g} > {LINEAR_REL[dtype]}"
