"""Which kernel really ran, per site: the run-time counters (codegen/counters.py) in the report.

A plan names one kernel; a run-time check may change what one call runs. Each such change must be
visible: in ``SiteReport.ran`` (and the printed report) and, the first time, in the "rewrite" log.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from eager_cases import compiled, inputs, rewritten_site


def runtime_mask(q, k, v, keep):
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def test_a_causal_runtime_mask_runs_the_causal_kernel_and_says_so(caplog):
    q, k, v = inputs(torch.Generator().manual_seed(0), 1, 2, 2, 24, 24, 16, torch.float32)
    tril = torch.ones(24, 24, dtype=torch.bool).tril()
    fn, report = compiled(runtime_mask, "torch")
    with caplog.at_level(logging.INFO, logger="rewrite"):
        fn(q, k, v, tril)
        fn(q, k, v, tril)
    site = rewritten_site(report, ("causal",), "torch")
    assert site.ran == {"run-time mask causal: causal kernel + sdpa": 2}, site.ran
    assert "ran (calls so far): run-time mask causal: causal kernel + sdpa ×2" in str(report)
    assert sum("ran run-time mask causal" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_non_finite_inputs_and_a_dense_second_mask_are_counted():
    q, k, v = inputs(torch.Generator().manual_seed(1), 1, 2, 2, 130, 130, 16, torch.float32)
    sparse = torch.zeros(130, 130, dtype=torch.bool)
    sparse[:, :20] = True  # a run-time mask keeping 15%: the block-sparse plan
    fn, report = compiled(runtime_mask, "torch")
    fn(q, k, v, sparse)
    site = rewritten_site(report, ("block_sparse",), "torch")
    assert site.ran == {"torch": 1}, site.ran
    fn(q, k, v, torch.ones(130, 130, dtype=torch.bool))  # the next tensor keeps every key
    bad = v.clone()
    bad[0, 0, 100, 0] = float("nan")  # a value at a key the mask removes: eager's 0·NaN reaches every row
    fn(q, k, bad, sparse)
    ran = site.ran
    assert ran["torch"] == 1 and len(ran) == 3, ran
    dense = [p for p in ran if p.startswith("dense (the block map")]
    eager = [p for p in ran if "eager spelling (inputs not finite" in p]
    assert dense and eager, ran


def test_sdpa_spelling_counts_its_backward():
    q, k, v = (t.requires_grad_() for t in inputs(torch.Generator().manual_seed(2), 1, 2, 2, 9, 9, 16,
                                                 torch.float32))
    fn, report = compiled(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), "torch",
                          count_calls=True)  # else a direct aten call: nothing counted
    fn(q, k, v).sum().backward()
    site = rewritten_site(report, ("causal",), "torch")
    assert site.ran.get("sdpa") == 1 and site.ran.get("backward: fused sdpa") == 1, site.ran
