"""Inductor around the rewrite on a GPU (`gpu`-marked): CUDA graphs with the rewritten ops partitioned out,
and auto's Inductor for GPU inputs, with the counted op and with a direct SDPA call. The helpers are
test_inductor.py's (the same block: causal attention, gelu, layer norm)."""

from __future__ import annotations

import pytest
import torch
from test_inductor import block, block_inputs, causal_site, compiled_with_report, same_as_float64


@pytest.mark.gpu
def test_reduce_overhead_with_the_rewritten_ops():
    fn, report = compiled_with_report(block, mode="reduce-overhead", count_calls=True)  # keeps the counted op
    for seed in range(4):  # warm-up, recording, replays
        args = block_inputs(20 + seed, device="cuda")
        same_as_float64(fn(*args).cpu(), [a.cpu() for a in args], f"call {seed}")
    site = causal_site(report)
    assert sum(site.ran.values()) == 4, site.ran  # partitioned out of the CUDA graphs: every call counted
    assert any("CUDA graphs around the rewrite:: ops" in n for n in report.notes), report.notes
    torch._dynamo.reset()
    fn = torch.compile(block, backend="rewrite", mode="reduce-overhead")
    args = block_inputs(30, device="cuda")
    for _ in range(3):
        same_as_float64(fn(*args).cpu(), [a.cpu() for a in args], "torch.compile(mode='reduce-overhead')")


@pytest.mark.gpu
def test_auto_is_on_for_gpu_inputs():
    fn, report = compiled_with_report(block, count_calls=True)
    args = block_inputs(40, device="cuda")
    same_as_float64(fn(*args).cpu(), [a.cpu() for a in args], "auto on a GPU")
    assert causal_site(report).ran
    assert "Inductor compiled the rest of the graph (auto: inputs on a GPU)" in report.notes[0], report.notes
    # Uncounted, the plain causal site is a direct SDPA call; Inductor still compiles the gelu and norm.
    fn, report = compiled_with_report(block)
    same_as_float64(fn(*args).cpu(), [a.cpu() for a in args], "auto on a GPU, direct SDPA")
    assert causal_site(report).direct and not causal_site(report).ran
    assert "Inductor compiled the rest of the graph (auto: inputs on a GPU)" in report.notes[0], report.notes
