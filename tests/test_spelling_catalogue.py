"""The spelling catalogue is attention: every entry, run eagerly, equals the float64 reference.

No rewriter here: this checks the test material itself. In float64 the spellings must agree
with ``attention_reference`` to rounding; in float32 / bfloat16 / float16, eager PyTorch
must already sit inside the tolerances the rewriter is held to (so those tolerances are
honest, not tuned to a kernel).
"""

from __future__ import annotations

import pytest
import torch
from reference import TOLERANCES, assert_close, attention_reference
from spellings import SPELLINGS, case_for, first_output, fixed_shapes, run_eager_float64

LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
def test_spelling_catalogue_is_attention(spelling):
    for shape in fixed_shapes(spelling, torch.float64):
        case = case_for(spelling, shape)
        for a in case.args:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                assert a.abs().sum() > 0, "inputs must be real random data, never zeros"
        out = first_output(case.fn(*case.args))
        assert out.dtype == torch.float64
        # Spellings that cast the probabilities to float32 are only that accurate.
        dtype = torch.float32 if "fp32_cast" in spelling.tags else torch.float64
        assert_close(out, case.expected, dtype, f"{spelling.name} {shape}")
        assert torch.equal(torch.isnan(run_eager_float64(case)), torch.isnan(case.expected))
        if spelling.empty_rows == "nan":
            assert torch.isnan(case.expected).any(), "catalogue must feed fully-masked rows"
        elif spelling.empty_rows == "zero":
            assert (case.expected == 0).all(dim=-1).any(), "catalogue must feed fully-masked rows"
        else:
            assert not torch.isnan(case.expected).any()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
def test_eager_low_precision_within_tolerance(spelling, dtype):
    shapes = fixed_shapes(spelling, dtype)
    for shape in (shapes[0], shapes[2]):  # the generic one and the largest
        case = case_for(spelling, shape)
        out = first_output(case.fn(*case.args))
        assert out.dtype == dtype
        assert_close(out, case.expected, dtype, f"eager {spelling.name} {shape}")


def test_reference_fully_masked_rows():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 3, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.ones(1, 1, 3, 3, dtype=torch.bool)
    keep[..., 1, :] = False
    nan = attention_reference(q, k, v, scale=0.5, mask=keep)
    assert torch.isnan(nan[..., 1, :]).all() and not torch.isnan(nan[..., [0, 2], :]).any()
    zero = attention_reference(q, k, v, scale=0.5, mask=keep, fully_masked="zero")
    assert (zero[..., 1, :] == 0).all()
    torch.testing.assert_close(zero[..., [0, 2], :], nan[..., [0, 2], :])


def test_reference_gqa_and_causal_match_sdpa():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 5, 8, generator=g, dtype=torch.float64)
    k = torch.randn(2, 2, 7, 8, generator=g, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 6, generator=g, dtype=torch.float64)
    ref = attention_reference(q, k, v, scale=8**-0.5, causal=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(ref, sdpa)


def test_tolerances_cover_the_dtypes_tested():
    assert set(LOW_PRECISION) <= set(TOLERANCES)
