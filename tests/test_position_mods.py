"""Biases computed from positions (ALiBi and relatives) lifted into the score modifier: the tile
computes them from its row and column indices, no N×M bias tensor is built or read. Each spelling
(written as models write ALiBi, not as the recogniser reads it) is asserted rewritten WITH a
positional modifier (its text names p / m) whose op receives no N×M operand, and compared with the
same function run eagerly in float64. Near-misses stay a tensor bias (exact, as the graph computes
it) with the reason in the site's notes. Triton runs under the interpreter on the CPU."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eager_cases import compiled, double, grads_as_float64, inputs, same_as_eager
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch.fx.passes.shape_prop import ShapeProp

from rewrite.capture import to_aten
from rewrite.passes.pipeline import rewrite_graph

MODDED = torch.ops.rewrite.modded_attention.default


def alibi_slopes(h: int) -> torch.Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, h + 1) / h)


# ---- spellings ------------------------------------------------------------------------------------
def alibi_bottom_right(q, k, v):
    """[B, H, N, M] scores; query positions end-aligned with the keys (a decode step's N < M)."""
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    qpos = torch.arange(m - n, m)
    kpos = torch.arange(m)
    alibi = alibi_slopes(h)[:, None, None] * (kpos[None, :] - qpos[:, None])
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + alibi.to(q.dtype)
    return s.softmax(-1) @ v


def symmetric_alibi_einsum_causal(q, k, v):
    """−slope·|i − j| (top-left), einsum letters of its own, an additive causal mask after it."""
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    dist = (torch.arange(n).view(n, 1) - torch.arange(m).view(1, m)).abs()
    bias = -alibi_slopes(h).view(1, h, 1, 1) * dist
    w = torch.einsum("zhqc,zhkc->zhqk", q, k) / math.sqrt(q.shape[-1])
    w = w + bias.to(w.dtype)
    causal = torch.full((n, m), float("-inf"), dtype=w.dtype).triu(1)
    return F.softmax(w + causal, dim=-1) @ v


def alibi_merged_baddbmm(q, k, v):
    """[B·H, N, M] through baddbmm (Bloom's layout), relative positions, slopes repeated over batch."""
    b, h, n, d = q.shape
    m = k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    alibi = alibi_slopes(h).repeat(b)[:, None, None] * rel
    s = torch.baddbmm(alibi.to(q.dtype), q.reshape(b * h, n, d), k.reshape(b * h, m, d).transpose(1, 2), beta=1.0,
                      alpha=d ** -0.5)
    return torch.softmax(s, -1).bmm(v.reshape(b * h, m, -1)).view(b, h, n, -1)


def bloom_style_arange(q, k, v):
    """Bloom's per-row-constant form slope·m (no padding mask), [H, 1, M], added after the scale."""
    h, m = q.shape[1], k.shape[2]
    alibi = alibi_slopes(h)[:, None] * torch.arange(m)[None, :]
    s = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    return torch.softmax(s + alibi[:, None, :].to(s.dtype), dim=-1) @ v


def gqa_alibi_repeat_kv(q, k, v):
    """GQA: key heads repeated for their query groups (HF's repeat_kv), ALiBi per query head."""
    hq, hkv, n, m = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    k = k[:, :, None].expand(-1, -1, hq // hkv, -1, -1).reshape(k.shape[0], hq, m, -1)
    v = v[:, :, None].expand(-1, -1, hq // hkv, -1, -1).reshape(v.shape[0], hq, m, -1)
    pos = torch.arange(m)
    alibi = alibi_slopes(hq).reshape(1, hq, 1, 1) * (pos[None, :] - pos[m - n:, None]).float()
    s = q @ k.mT * q.shape[-1] ** -0.5
    return (s + alibi.to(s.dtype)).softmax(-1) @ v


def alibi_in_model_dtype(q, k, v):
    """The bias built in the model's dtype (slopes and positions cast to it before the product)."""
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    rel = (torch.arange(m)[None, :] - torch.arange(n)[:, None]).to(q.dtype)
    alibi = alibi_slopes(h).to(q.dtype)[:, None, None] * rel
    return torch.softmax(q @ k.mT / q.shape[-1] ** 0.5 + alibi, -1) @ v


def learned_slopes(q, k, v, slopes):
    h, n, m = q.shape[1], q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    return torch.softmax(q @ k.mT * 0.25 - slopes.view(h, 1, 1) * rel.abs(), -1) @ v


SPELLINGS = [alibi_bottom_right, symmetric_alibi_einsum_causal, alibi_merged_baddbmm, bloom_style_arange,
             gqa_alibi_repeat_kv, alibi_in_model_dtype]


# ---- the rewrite: a positional modifier, no N×M operand -------------------------------------------
def positional_site(report, backend):
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten, site.reason
    assert site.kernel == ("triton" if backend == "triton" else "torch"), site.kernel
    assert "p" in site.score_mod or "m" in site.score_mod, site.score_mod
    assert "position bias computed in the tile" in site.spelling, site.spelling
    return site


def op_operands(fn, args):
    """The rewritten graph's modded_attention call: its bias argument and its leaf tensors' shapes."""
    gm, reports = rewrite_graph(to_aten(fn, args), "torch", args)
    ShapeProp(gm).propagate(*args)
    assert [r.rewritten for r in reports] == [True], [r.reason for r in reports]
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target == MODDED]
    assert len(calls) == 1, gm.graph
    leaves, bias = calls[0].args[3], calls[0].args[4]
    return bias, [tuple(x.meta["tensor_meta"].shape) for x in leaves], gm


def no_nm_operand(fn, args, n, m):
    bias, leaf_shapes, gm = op_operands(fn, args)
    assert bias is None, bias
    for shape in leaf_shapes:
        assert math.prod(shape) < n * m or (n * m <= 16), f"an N×M-sized leaf {shape}"
    built = [x for x in gm.graph.nodes if x.op == "call_function" and x.target != MODDED
             and hasattr(x.meta.get("tensor_meta"), "shape") and tuple(x.meta["tensor_meta"].shape[-2:]) == (n, m)]
    assert not built, f"an [N, M] tensor is still built: {built}"


@settings(max_examples=16, deadline=None, phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(spelling=st.sampled_from(SPELLINGS), n=st.integers(2, 41), extra=st.integers(0, 9),
       d=st.sampled_from([16, 24, 64, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**16))
def test_alibi_spellings_computed_in_the_tile(spelling, n, extra, d, dtype, backend, seed):
    hkv = 1 if spelling is gqa_alibi_repeat_kv else 3
    hq = 3
    m = n + extra if spelling is not symmetric_alibi_einsum_causal else n
    q, k, v = inputs(torch.Generator().manual_seed(seed), 2, hq, hkv, n, m, d, dtype)
    fn, report = compiled(spelling, backend)
    out = fn(q, k, v)
    site = positional_site(report, backend)
    same_as_eager(out, spelling(*double((q, k, v))), dtype, spelling.__name__, lowp=spelling(q, k, v))
    no_nm_operand(spelling, (q, k, v), n, m)
    if spelling is symmetric_alibi_einsum_causal and n > 1:
        assert site.variant == "causal", site.variant  # the mask stays a mask


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_offsets_and_rounding_at_large_positions(backend):
    """Positions past bfloat16's exact integers (256): eager rounds the positions and the products
    to bfloat16, the tile must round where eager does; the offset M − N must be exact."""
    q, k, v = inputs(torch.Generator().manual_seed(1), 1, 2, 2, 70, 333, 16, torch.bfloat16)
    fn, report = compiled(alibi_in_model_dtype, backend)
    out = fn(q, k, v)
    site = positional_site(report, backend)
    assert "bf16" in site.score_mod, site.score_mod
    same_as_eager(out, alibi_in_model_dtype(q.float(), k.float(), v.float()).to(torch.bfloat16).float(),
                  torch.bfloat16, "bf16 alibi", lowp=alibi_in_model_dtype(q, k, v))
    fn, report = compiled(alibi_bottom_right, backend)
    q32, k32, v32 = (t.float() for t in (q, k, v))
    out = fn(q32, k32, v32)
    assert "m - p - 263" in positional_site(report, backend).score_mod
    same_as_eager(out, alibi_bottom_right(*double((q32, k32, v32))), torch.float32, "offset 263")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_reach_q_k_v_and_learned_slopes(backend):
    q, k, v = inputs(torch.Generator().manual_seed(2), 1, 3, 3, 19, 23, 16, torch.float32)
    slopes = torch.tensor([0.5, 0.3, 0.07])
    args = [t.clone().requires_grad_() for t in (q, k, v, slopes)]
    fn, report = compiled(learned_slopes, backend)
    out = fn(*args)
    site = positional_site(report, backend)
    assert "L0" in site.score_mod, site.score_mod  # the slopes are a leaf, read as the graph holds them
    grads_as_float64(learned_slopes, args, out)


# ---- near-misses: a tensor bias, with the reason ----------------------------------------------------
def alibi_times_runtime(q, k, v, gate):
    rel = torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None]
    return torch.softmax(q @ k.mT + 0.5 * rel * gate, -1) @ v  # gate: a run-time [N, M] tensor


def slopes_along_queries(q, k, v, row_slopes):
    rel = torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None]
    return torch.softmax(q @ k.mT + row_slopes * rel, -1) @ v  # row_slopes: [N, 1], varies with p


def edited_positions(q, k, v):
    pos = torch.arange(q.shape[2])
    pos[0] = 7  # an in-place edit after the arange
    return torch.softmax(q @ k.mT - 0.25 * (pos[:, None] - torch.arange(k.shape[2])[None, :]).abs(), -1) @ v


def alibi_in_float64(q, k, v):
    rel = (torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None]).double()
    return torch.softmax(q @ k.mT + (rel * 0.1).float(), -1) @ v  # rounded once in float64, then to float32


def alibi_divided(q, k, v):
    rel = (torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None]).float()
    return torch.softmax(q @ k.mT + rel / 3.0, -1) @ v


NEAR_MISSES = [
    (alibi_times_runtime, lambda n, m: (torch.rand(n, m) + 0.5,), "stays a tensor"),
    (slopes_along_queries, lambda n, m: (torch.rand(n, 1),), "stays a tensor"),
    (edited_positions, lambda n, m: (), "has cases"),
    (alibi_in_float64, lambda n, m: (), "float64"),
    (alibi_divided, lambda n, m: (), "division"),
]


@pytest.mark.parametrize("case", range(len(NEAR_MISSES)))
def test_near_misses_stay_a_tensor_bias_with_the_reason(case):
    spelling, extra, reason = NEAR_MISSES[case]
    q, k, v = inputs(torch.Generator().manual_seed(case), 1, 2, 2, 11, 13, 16, torch.float32)
    args = (q, k, v, *extra(11, 13))
    fn, report = compiled(spelling, "torch")
    out = fn(*args)
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten, site.reason  # as a tensor bias: exact, as the graph computes it
    assert not site.score_mod, site.score_mod
    notes = " | ".join(site.notes)
    assert "stays a tensor" in notes and reason in notes, notes
    same_as_eager(out, spelling(*double(args)), torch.float32, spelling.__name__)


# ---- the IR and its generators --------------------------------------------------------------------
def test_position_operands_in_the_ir_and_both_generators():
    from rewrite.codegen.score_mod_gen import apply_torch, modified_bound, position_grid, triton_source
    from rewrite.ir.score_mod import ModStep, ScoreMod

    mod = ScoreMod((ModStep("sub", ("m", "p")), ModStep("sub", ("r0", 300.0)), ModStep("round_bf16", ("r1",)),
                    ModStep("mul", ("L0", "r2")), ModStep("add", ("s", "r3"))), leaves=1)
    assert mod.positional and str(mod) == "L0*bf16(m - p - 300) + s", str(mod)
    assert ScoreMod.from_json(mod.to_json()) == mod
    src = triton_source(mod)
    assert "p = rows[:, None].to(tl.float32)" in src and ".to(tl.bfloat16).to(tl.float32)" in src, src
    with pytest.raises(ValueError, match="not defined before"):
        ScoreMod((ModStep("add", ("s", "q")),))
    # rows 5:9 of a 9×700 score: eager's bf16 rounding of m − p − 300 (past 256: not every integer is exact)
    s = torch.randn(1, 1, 4, 700, dtype=torch.float64)
    slope = torch.tensor(0.37).view(1, 1, 1, 1)
    got = apply_torch(mod, s, [slope], position_grid(5, 9, 700, s.device))
    rel = (torch.arange(700)[None, :] - torch.arange(5, 9)[:, None] - 300).to(torch.bfloat16).float()
    assert torch.equal(got, s + slope * rel)  # the product rounded in float32, as eager computes the bias
    bound = modified_bound(mod, torch.full((1, 1, 9), 1.0, dtype=torch.float64), [slope], (9, 700))
    assert float(bound.max()) >= float(got.abs().max()) and math.isfinite(float(bound.max()))
    with pytest.raises(ValueError, match="without the score positions"):
        apply_torch(mod, s, [slope])


def folded_gqa_alibi(q, k, v):
    """GQA by broadcasting ([B, Hkv, R, N, D] against [B, Hkv, 1, M, D]): the query groups fold into
    the rows, where a position along the queries is not one axis."""
    b, hq, n, d = q.shape
    hkv, m = k.shape[1], k.shape[2]
    q5 = q.view(b, hkv, hq // hkv, n, d)
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    s = q5 @ k[:, :, None].transpose(-1, -2) * 0.25 - 0.125 * rel.abs()
    return (s.softmax(-1) @ v[:, :, None]).reshape(b, hq, n, -1)


def test_a_position_off_the_sites_axes_stays_a_tensor_with_the_reason():
    q, k, v = inputs(torch.Generator().manual_seed(9), 1, 4, 2, 9, 12, 16, torch.float32)
    fn, report = compiled(folded_gqa_alibi, "torch")
    out = fn(q, k, v)
    site = report.sites[0]
    assert site.rewritten, site.reason
    notes = " | ".join(site.notes)
    assert not site.score_mod, site.score_mod  # the tile's rows are group·N + p here: not modelled yet
    assert "a bias built from positions stays a tensor: the bias varies along" in notes, notes
    same_as_eager(out, folded_gqa_alibi(*double((q, k, v))), torch.float32, "folded GQA")


def alibi_after_the_mask(q, k, v):
    n, m = q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    s = (q @ k.mT).masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(s - 0.25 * rel.abs(), -1) @ v


def alibi_hf_finite_fill(q, k, v):
    """ALiBi, then HF's causal mask as masked_fill(finfo.min): a finite fill the rows are settled to."""
    n, m = q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(m - n, m)[:, None]
    s = q @ k.mT / 4 + alibi_slopes(q.shape[1]).view(-1, 1, 1) * rel
    s = s.masked_fill(rel > 0, torch.finfo(s.dtype).min)
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_masks_around_a_position_bias(backend):
    q, k, v = inputs(torch.Generator().manual_seed(6), 1, 2, 2, 13, 17, 16, torch.float32)
    fn, report = compiled(alibi_hf_finite_fill, backend)
    out = fn(q, k, v)
    site = positional_site(report, backend)
    assert site.variant == "causal", site.variant
    same_as_eager(out, alibi_hf_finite_fill(*double((q, k, v))), torch.float32, "alibi + finite causal fill")
    fn, report = compiled(alibi_after_the_mask, backend)  # added after the mask: a tensor bias, as before
    out = fn(q, k, v)
    site = report.sites[0]
    assert site.rewritten and not site.score_mod, (site.reason, site.score_mod)
    assert any("added after a mask" in n for n in site.notes), site.notes
    same_as_eager(out, alibi_after_the_mask(*double((q, k, v))), torch.float32, "alibi after the mask")


# ---- relative-position tables gathered at a function of p − m ------------------------------------
K_REL = 4


def relative_table_index(q, k, v, table):
    """A per-head table [H, 2K+1] read at the clipped relative position (Shaw-style)."""
    n, m = q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    return torch.softmax(q @ k.mT * 0.25 + table[:, torch.clamp(rel + K_REL, 0, 2 * K_REL)], -1) @ v


def relative_table_embedding(q, k, v, table):
    """The same through an embedding [2K+1, H] and a permute to heads first (T5's layout)."""
    n, m = q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    vals = F.embedding(rel.clamp(-K_REL, K_REL) + K_REL, table.t().contiguous())  # [N, M, H]
    return torch.softmax(q @ k.mT * 0.25 + vals.permute(2, 0, 1).unsqueeze(0), -1) @ v


def relative_table_wrapping(q, k, v, table):
    """Negative indices wrap around in torch: not the clipped table the tile would read."""
    n, m = q.shape[2], k.shape[2]
    rel = torch.arange(m)[None, :] - torch.arange(n)[:, None]
    return torch.softmax(q @ k.mT * 0.25 + table[:, rel], -1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("spelling", [relative_table_index, relative_table_embedding])
def test_relative_position_tables_gathered_in_the_tile(spelling, backend):
    q, k, v = inputs(torch.Generator().manual_seed(7), 2, 3, 3, 13, 21, 16, torch.float32)
    table = torch.randn(3, 2 * K_REL + 1, generator=torch.Generator().manual_seed(8))
    args = [t.clone().requires_grad_() for t in (q, k, v, table)]
    fn, report = compiled(spelling, backend)
    out = fn(*args)
    site = positional_site(report, backend)
    assert "L0(" in site.score_mod, site.score_mod  # the table, as a function of its index
    same_as_eager(out, spelling(*double((q, k, v, table))), torch.float32, spelling.__name__)
    no_nm_operand(spelling, (q, k, v, table), 13, 21)
    grads_as_float64(spelling, args, out)


def test_a_table_index_that_wraps_stays_a_tensor_with_the_reason():
    q, k, v = inputs(torch.Generator().manual_seed(10), 1, 2, 2, 9, 12, 16, torch.float32)
    table = torch.randn(2, 40)
    fn, report = compiled(relative_table_wrapping, "torch")
    out = fn(q, k, v, table)
    site = report.sites[0]
    assert site.rewritten and not site.score_mod, (site.reason, site.score_mod)
    assert any("not proven within [0, 40)" in n for n in site.notes), site.notes
    same_as_eager(out, relative_table_wrapping(*double((q, k, v, table))), torch.float32, "wrapping index")
