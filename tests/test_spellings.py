"""Every softmax-attention spelling is found, rewritten, and still computes attention.

For each entry of the catalogue (``tests/spellings.py``), on hypothesis-drawn odd sizes,
head dims and dtypes:

(a) ``rewrite.compile(fn)(*inputs)`` equals the float64 reference and the spelling itself
    run eagerly in float64, with NaN (fully-masked rows) in exactly the same places;
(b) ``rewrite.inspect(fn, *inputs)`` reports exactly one site, rewritten, with the expected
    mask variant and the 3 → 1 pass count of softmax attention.

Example counts are small because each example is a fresh Dynamo capture (~0.3-1 s on the
CPU); raise them with REWRITE_TEST_EXAMPLES / REWRITE_TEST_INSPECT_EXAMPLES.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import assert_close
from spellings import BY_NAME, SPELLINGS, Shape, case_for, first_output, run_eager_float64, shape_strategy

import rewrite

N_EXAMPLES = int(os.environ.get("REWRITE_TEST_EXAMPLES", "3"))
N_INSPECT_EXAMPLES = int(os.environ.get("REWRITE_TEST_INSPECT_EXAMPLES", "2"))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_SETTINGS = dict(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
    # No shrinking: every example is a Dynamo capture, and shrinking a failure would run
    # dozens more. The failing draw is printed as drawn.
    phases=(Phase.explicit, Phase.reuse, Phase.generate),
)


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
@settings(max_examples=N_EXAMPLES, **_SETTINGS)
@given(data=st.data())
def test_compiled_matches_reference(spelling, data):
    shape = data.draw(shape_strategy(spelling, DTYPES), label="shape")
    # rewrite.compile captures with Dynamo; a fresh cache per example keeps every example a
    # real capture of this shape instead of hitting the recompile limit and running eagerly.
    torch._dynamo.reset()
    case = case_for(spelling, shape)
    eager = first_output(case.fn(*case.args))
    out = first_output(rewrite.compile(case.fn)(*case.args))
    assert out.dtype == eager.dtype, f"dtype {out.dtype} != eager {eager.dtype}"
    assert out.shape == eager.shape, f"shape {tuple(out.shape)} != eager {tuple(eager.shape)}"
    assert_close(out, case.expected, shape.dtype, f"{spelling.name}: compiled vs float64 reference")
    assert_close(out, run_eager_float64(case), shape.dtype, f"{spelling.name}: compiled vs eager float64")


@pytest.mark.parametrize("spelling", SPELLINGS, ids=lambda s: s.name)
@settings(max_examples=N_INSPECT_EXAMPLES, **_SETTINGS)
@given(data=st.data())
def test_inspect_reports_one_rewritten_site(spelling, data):
    shape = data.draw(shape_strategy(spelling, DTYPES), label="shape")
    case = case_for(spelling, shape)
    report = rewrite.inspect(case.fn, *case.args)
    assert len(report.sites) == 1, f"expected one attention site, found {len(report.sites)}:\n{report}"
    site = report.sites[0]
    assert site.rewritten, f"{spelling.name} left alone: {site.reason}"
    allowed = {spelling.expected_variant}
    if spelling.expected_variant == "causal" and shape.M == 1:
        allowed.add("dense")  # one key: a top-left causal mask keeps it for every query (all kept)
    runtime_mask = any(isinstance(a, torch.Tensor) and a.dtype == torch.bool and a.dim() >= 2 and a.shape[-2] > 1
                       and a.shape[-1] > 1 for a in case.args)
    if spelling.expected_variant == "dense" and runtime_mask and site.density <= 0.5:
        # A run-time mask over queries and keys keeping at most half on the first call (small N with an
        # emptied row): the planner visits its tiles only (passes/plan.py), a band through the analytic kernel.
        allowed |= {"block_sparse", "neighborhood"}
    assert site.variant in allowed, f"{spelling.name}: variant {site.variant!r}"
    assert site.pass_count == {"original": 3, "rewritten": 1}
    assert site.gqa == (spelling.kv_heads != "same"), f"{spelling.name}: gqa={site.gqa}"


@pytest.mark.parametrize("name", ["matmul_operator", "hf_finfo_min_padding", "gqa_llama_repeat_kv", "sdpa_plain"])
def test_single_query_decode_is_rewritten(name):
    """N = 1 is a decoding step against M cached keys, the commonest inference shape: the
    hypothesis draws reach it only now and then, so it is pinned here."""
    spelling = BY_NAME[name]
    hkv = 2 if spelling.kv_heads == "group" else 4
    shape = Shape(B=2, H=4, Hkv=hkv, N=1, M=37, D=64, Dv=64, dtype=torch.float32, seed=5)
    case = case_for(spelling, shape)
    torch._dynamo.reset()
    out = rewrite.compile(case.fn)(*case.args)
    assert_close(out, case.expected, torch.float32, f"{name} decode step")
    report = rewrite.inspect(case.fn, *case.args)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten, f"{name} decode step left alone: {site.reason}"
    assert site.variant == spelling.expected_variant
