"""The report says why a site found with a mask or bias that removes keys runs dense: the density it
measured and the decision (issue 11: a BigBird-style layout expanded into a −inf bias ran dense with
no word about why), and a graph break that splits an attention is named."""

from __future__ import annotations

import torch
from eager_cases import compiled, double, inputs, same_as_eager

import rewrite


def layout_as_bias(q, k, v, layout):
    """A block layout kept as a buffer, expanded with repeat_interleave into a −inf bias."""
    bias = torch.zeros(layout.shape, dtype=q.dtype).masked_fill(~layout, float("-inf"))
    bias = bias.repeat_interleave(16, -2).repeat_interleave(16, -1)
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(s + bias, -1) @ v


def runtime_mask(q, k, v, keep):
    s = torch.einsum("bhnd,bhmd->bhnm", q, k)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def test_a_layout_carried_as_a_bias_reports_its_density_and_the_decision():
    gen = torch.Generator().manual_seed(0)
    q, k, v = inputs(gen, 1, 2, 2, 64, 64, 16, torch.float32)
    layout = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 0]], dtype=torch.bool)  # 7 of 16
    fn, report = compiled(layout_as_bias, "torch")
    out = fn(q, k, v, layout)
    site = report.sites[0]
    assert site.rewritten and site.variant == "dense", str(report)
    note = next(n for n in site.notes if n.startswith("run-time bias removes"))
    assert "removes 56.2%" in note and "keeping 43.8%" in note and "pass the layout as a bool mask" in note, note
    same_as_eager(out, layout_as_bias(*double((q, k, v)), layout), torch.float32, "layout bias")


def test_a_dense_runtime_mask_reports_why_it_is_not_block_sparse():
    gen = torch.Generator().manual_seed(1)
    q, k, v = inputs(gen, 1, 2, 2, 48, 40, 16, torch.float32)
    keep = torch.rand(48, 40, generator=gen) < 0.8
    keep[:, 0] = True
    fn, report = compiled(runtime_mask, "torch")
    out = fn(q, k, v, keep)
    site = report.sites[0]
    kept = float(keep.float().mean())
    assert any(n.startswith(f"run-time mask keeps {kept:.1%}") and "at most 50% kept" in n for n in site.notes), \
        site.notes
    same_as_eager(out, runtime_mask(*double((q, k, v)), keep), torch.float32, "dense run-time mask")

    sparse = torch.rand(48, 40, generator=gen) < 0.2
    sparse[:, 0] = True
    fn, report = compiled(runtime_mask, "torch")
    fn(q, k, v, sparse)
    assert report.sites[0].variant == "block_sparse", report.sites[0].variant  # below half: the sparse kernel


def attention_with_a_graph_break(q, k, v):
    s = q @ k.transpose(-1, -2)
    shift = int(s.amax().item() > 0)  # .item() breaks the graph between the product and the softmax
    return torch.softmax(s + shift, -1) @ v


def test_a_graph_break_inside_attention_is_in_the_report():
    """Split across two graphs, the attention is in no graph whole: no site, but the report says why."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=gen) for _ in range(3))
    report = rewrite.inspect(attention_with_a_graph_break, q, k, v)
    assert report.sites == [] and any("item()" in b for b in report.graph_breaks), report.graph_breaks
    assert "graph break" in str(report)
    whole = rewrite.inspect(lambda q, k, v: torch.softmax(q @ k.transpose(-1, -2), -1) @ v, q, k, v)
    assert whole.graph_breaks == [] and len(whole.sites) == 1
