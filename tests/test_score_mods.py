"""Score modifiers inferred from unmodified code: soft-capping, tensor scales, biases inside a map,
clamps. Each spelling is compiled, asserted rewritten *with* the modifier, and compared with the same
function run eagerly in float64 (eager_cases.same_as_eager); the kernel counters say what ran.
Near-misses (a mask before the modifier, the scores squared, a sparse structure) must be refused
with their reason. Triton runs under the interpreter on the CPU (tests/conftest.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eager_cases import compiled, double, grads_as_float64, inputs, modified_site, same_as_eager
from hypothesis import given, settings
from hypothesis import strategies as st

from rewrite.codegen.score_mod_gen import apply_torch, modified_bound
from rewrite.ir.score_mod import STEP_OPS, ModStep, ScoreMod

NEG_INF = float("-inf")


# ---- spellings, as models write them -------------------------------------------------------------
def gemma2_softcap(q, k, v, cap=50.0):
    """Gemma 2: scale, soft-cap in three statements, then an additive causal mask of finfo.min."""
    n, m = q.shape[-2], k.shape[-2]
    w = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    w = w / cap
    w = torch.tanh(w)
    w = w * cap
    mask = torch.full((n, m), torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device).triu(1 + m - n)
    w = w + mask
    return F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softcap_einsum(q, k, v):
    s = torch.einsum("bhid,bhjd->bhij", q / math.sqrt(q.shape[-1]), k)
    return torch.softmax(30.0 * torch.tanh(s / 30.0), -1) @ v


def cosine_swin_v2(q, k, v, logit_scale):
    """Swin V2: cosine similarity times a learned per-head scale (clamped, exponentiated)."""
    attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
    attn = attn * torch.clamp(logit_scale, max=math.log(1.0 / 0.01)).exp()
    return attn.softmax(dim=-1) @ v


def biased_softcap(q, k, v, bias):
    s = (q @ k.transpose(-1, -2)) / q.shape[-1] ** 0.5
    s = torch.tanh((s + bias) / 20.0) * 20.0
    return torch.softmax(s, dim=-1) @ v


def clamped_scores(q, k, v, keep):
    s = (q @ k.mT).clamp(-4.0, 4.0)
    s = s.masked_fill(~keep, NEG_INF)
    return s.softmax(-1) @ v


# ---- the rewrite happened, with the modifier ------------------------------------------------------
def ran_kernel(site, backend):
    ran = site.ran
    key = ("triton (generated score modifier)" if backend == "triton"
           else "torch (eager math by row blocks, score modifier)")
    assert any(key in name.split(" + ") for name in ran), ran  # counters join what one call ran with " + "


DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 45), extra=st.integers(0, 9), d=st.sampled_from([16, 24, 64]), dtype=DTYPES,
       groups=st.sampled_from([1, 2]), backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**16))
def test_gemma2_softcap_causal(n, extra, d, dtype, groups, backend, seed):
    q, k, v = inputs(torch.Generator().manual_seed(seed), 2, 2 * groups, 2, n, n + extra, d, dtype)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    fn, report = compiled(gemma2_softcap, backend)
    out = fn(q, k, v)
    site = modified_site(report, backend)
    assert "tanh" in site.score_mod
    if dtype == torch.float16:
        # finfo(fp16).min = -65504 is not a mask in float16 (a score near +65504 cancels it), so the
        # bias is applied as the graph computes it
        assert site.variant == "dense" and site.mask == "run-time tensor", (site.variant, site.mask)
    elif n > 1:
        assert site.variant == "causal", site.variant  # the additive finfo.min mask proven causal
    ran_kernel(site, backend)
    same_as_eager(out, gemma2_softcap(*double((q, k, v))), dtype, "gemma2", lowp=gemma2_softcap(q, k, v))


@settings(max_examples=5, deadline=None)
@given(n=st.integers(1, 40), m=st.integers(1, 40), d=st.sampled_from([16, 32, 128]), dtype=DTYPES,
       backend=st.sampled_from(["torch", "triton"]), seed=st.integers(0, 2**16))
def test_softcap_einsum_and_a_tensor_scale(n, m, d, dtype, backend, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 1, 3, 3, n, m, d, dtype)
    fn, report = compiled(softcap_einsum, backend)
    out = fn(q, k, v)
    ran_kernel(modified_site(report, backend), backend)
    same_as_eager(out, softcap_einsum(*double((q, k, v))), dtype, "softcap einsum", lowp=softcap_einsum(q, k, v))

    scale = (torch.rand(3, 1, 1, generator=gen, dtype=torch.float64) * 3 + 0.5).to(dtype)
    fn, report = compiled(cosine_swin_v2, backend)
    out = fn(q, k, v, scale)
    site = modified_site(report, backend)
    assert "L0" in site.score_mod, site.score_mod  # the scale is a tensor leaf
    same_as_eager(out, cosine_swin_v2(*double((q, k, v, scale))), dtype, "swin v2",
                  lowp=cosine_swin_v2(q, k, v, scale))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bias_inside_the_map_and_empty_rows(backend):
    gen = torch.Generator().manual_seed(3)
    q, k, v = inputs(gen, 2, 2, 2, 37, 29, 16, torch.float32)
    slopes = torch.tensor([0.5, 0.125]).view(1, 2, 1, 1)
    alibi = -slopes * (torch.arange(37)[:, None] - torch.arange(29)[None, :]).abs().float()
    fn, report = compiled(biased_softcap, backend)
    out = fn(q, k, v, alibi)
    ran_kernel(modified_site(report, backend), backend)
    same_as_eager(out, biased_softcap(*double((q, k, v, alibi))), torch.float32, "bias inside tanh")

    keep = torch.rand(37, 29, generator=gen) > 0.4
    keep[5] = False  # a row with no kept key: NaN, as eager
    fn, report = compiled(clamped_scores, backend)
    out = fn(q, k, v, keep)
    ran_kernel(modified_site(report, backend), backend)
    ref = clamped_scores(*double((q, k, v)), keep)
    assert torch.isnan(ref[:, :, 5]).all()
    same_as_eager(out, ref, torch.float32, "clamp + run-time mask")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_nan_at_masked_and_kept_keys(backend):
    q, k, v = inputs(torch.Generator().manual_seed(4), 1, 2, 2, 20, 20, 16, torch.float32)
    keep = torch.ones(20, 20, dtype=torch.bool).tril()
    k = k.clone()
    k[0, 0, 19] = float("nan")  # only the last query keeps key 19: that row is NaN in eager, the rest not
    fn, report = compiled(clamped_scores, backend)
    out = fn(q, k, v, keep)
    modified_site(report, backend)
    same_as_eager(out, clamped_scores(*double((q, k, v)), keep), torch.float32, "NaN key")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_gradients_reach_q_k_v_and_the_learned_scale(backend):
    q, k, v = inputs(torch.Generator().manual_seed(5), 1, 2, 2, 23, 19, 16, torch.float32)
    scale = torch.tensor([[[2.0]], [[0.7]]])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, scale)]
    fn, report = compiled(cosine_swin_v2, backend)
    out = fn(*leaves)
    modified_site(report, backend)
    grads_as_float64(cosine_swin_v2, leaves, out)


# ---- near-misses: refused, with the reason --------------------------------------------------------
def mask_then_tanh(q, k, v, keep):
    s = (q @ k.mT).masked_fill(~keep, NEG_INF)
    return torch.softmax(torch.tanh(s / 10) * 10, -1) @ v  # tanh(−inf) = −1: the mask no longer removes


def softcap_through_half(q, k, v):
    s = q @ k.mT
    return torch.softmax(torch.tanh(s.to(torch.float16) / 10).to(q.dtype) * 10, -1) @ v  # rounds s to fp16 first


def clamp_to_a_tensor(q, k, v):
    s = q @ k.mT
    return torch.softmax(torch.clamp(s, max=s.detach().mean(-1, keepdim=True)), -1) @ v


def squared_scores(q, k, v):
    s = q @ k.mT / 4
    return torch.softmax(s * s, -1) @ v


@pytest.mark.parametrize("fn, args, why", [
    (mask_then_tanh, "keep", "mask applied before a score modifier"),
    (squared_scores, "", "which operand of mul holds the scores"),
    (softcap_through_half, "", "narrowing cast rounds them"),
    (clamp_to_a_tensor, "", "clamp to a tensor bound"),  # it depends on the scores: not pointwise
])
def test_near_misses_are_left_alone_with_their_reason(fn, args, why):
    q, k, v = inputs(torch.Generator().manual_seed(6), 1, 2, 2, 96, 96, 16, torch.float32)
    extra = (torch.ones(96, 96, dtype=torch.bool).tril(),) if args else ()
    cfn, report = compiled(fn, "torch")
    out = cfn(q, k, v, *extra)
    assert report.sites and not any(s.rewritten for s in report.sites), str(report)
    assert any(why in (s.reason or "") for s in report.sites), [s.reason for s in report.sites]
    same_as_eager(out, fn(*double((q, k, v)), *extra), torch.float32, fn.__name__)


def softcap_finite_fill(q, k, v):
    """A soft-capped score with a finite fill over a bottom-right causal mask: with more queries than
    keys the first rows keep no key, and eager's softmax over equal fills averages v there."""
    n, m = q.shape[-2], k.shape[-2]
    s = 15.0 * torch.tanh(q @ k.mT / 15.0)
    keep = torch.ones(n, m, dtype=torch.bool).tril(m - n)
    return torch.softmax(s.masked_fill(~keep, -1e9), -1) @ v


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_finite_fill_settles_the_rows_it_changes(backend):
    q, k, v = inputs(torch.Generator().manual_seed(8), 1, 2, 2, 41, 30, 16, torch.float32)
    fn, report = compiled(softcap_finite_fill, backend)
    out = fn(q, k, v)
    site = modified_site(report, backend)
    ran_kernel(site, backend)
    ref = softcap_finite_fill(*double((q, k, v)))
    assert torch.allclose(ref[:, :, 0], double((v,))[0].mean(-2))  # an empty row: the mean of v
    same_as_eager(out, ref, torch.float32, "finite fill")
    if backend == "triton":  # the kernel skipped the empty rows' keys: they were recomputed
        assert any("rows recomputed with eager's spelling" in name for name in site.ran), site.ran


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16),  # gather reads a table leaf: its bound is the table's, tested with tables
       ops=st.lists(st.sampled_from(sorted(set(STEP_OPS) - {"gather"})), min_size=1, max_size=5))
def test_the_interval_bound_of_a_modifier_holds(seed, ops):
    """modified_bound is sound: random straight-line modifiers over s and one leaf, evaluated on
    random scores within the bound given, never exceed the bound returned."""
    gen = torch.Generator().manual_seed(seed)
    steps, prev = [], "s"
    for i, op in enumerate(ops):
        other = ["L0", 0.5, -3.0, 7.0][int(torch.randint(4, (1,), generator=gen))]
        steps.append(ModStep(op, (prev, other) if STEP_OPS[op] == 2 else (prev,)))
        prev = f"r{i}"
    mod = ScoreMod(tuple(steps), leaves=1)
    leaf = torch.randn(3, 1, 5, generator=gen, dtype=torch.float64) * 4
    s_bound = torch.rand(3, 4, generator=gen, dtype=torch.float64) * 20
    s = (torch.rand(3, 4, 5, generator=gen, dtype=torch.float64) * 2 - 1) * s_bound[..., None]
    s[..., 0] = s_bound  # the interval's ends are reached
    s[..., 1] = -s_bound
    got = apply_torch(mod, s, [leaf.expand(3, 4, 5)]).abs().nan_to_num(nan=0.0)
    bound = modified_bound(mod, s_bound, [leaf])
    assert (got <= bound[..., None] * (1 + 1e-12) + 1e-12).all(), (str(mod), got.max(), bound.max())


def test_the_ir_checks_its_steps_and_prints_one_expression():
    mod = ScoreMod((ModStep("div", ("s", 30.0)), ModStep("tanh", ("r0",)), ModStep("mul", ("r1", "L0"))), leaves=1)
    assert str(mod) == "L0*tanh(s/30)"
    assert ScoreMod.from_json(mod.to_json()) == mod
    with pytest.raises(ValueError, match="not defined before"):
        ScoreMod((ModStep("tanh", ("r0",)),))
    with pytest.raises(ValueError, match="not defined before"):
        ScoreMod((ModStep("mul", ("s", "L0")),), leaves=0)


# ---- on a GPU: the generated kernel compiled for real ----------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,extra,d,groups", [(1, 0, 64, 1), (77, 0, 128, 2), (300, 45, 256, 1), (1000, 3, 16, 4)])
def test_generated_modifiers_on_the_gpu(dtype, n, extra, d, groups):
    gen = torch.Generator().manual_seed(n + d)
    q, k, v = (t.cuda() for t in inputs(gen, 2, 2 * groups, 2, n, n + extra, d, dtype))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    fn, report = compiled(gemma2_softcap, "auto")
    out = fn(q, k, v)
    ran_kernel(modified_site(report, "triton"), "triton")
    same_as_eager(out, gemma2_softcap(*double((q, k, v))), dtype, "gemma2 (GPU)", lowp=gemma2_softcap(q, k, v))

    scale = (torch.rand(2 * groups, 1, 1, generator=gen, dtype=torch.float64) * 3 + 0.5).to(dtype).cuda()
    leaves = [t.clone().requires_grad_() for t in (q, k, v, scale)]
    fn, report = compiled(cosine_swin_v2, "auto")
    out = fn(*leaves)
    ran_kernel(modified_site(report, "triton"), "triton")
    ref_in = [t.detach().double().requires_grad_() for t in leaves]
    ref = cosine_swin_v2(*ref_in)
    same_as_eager(out, ref, dtype, "swin v2 (GPU)", lowp=cosine_swin_v2(*(t.detach() for t in leaves)))
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, leaves, g.to(dtype))
    want = torch.autograd.grad(ref, ref_in, g)
    low_in = [t.detach().clone().requires_grad_() for t in leaves]  # eager's own error in this dtype
    low = torch.autograd.grad(cosine_swin_v2(*low_in), low_in, g.to(dtype))
    for name, a, b, c in zip("qkvs", got, want, low):
        def rel(x, b=b):
            return float((x.double() - b).abs().max() / (b.abs().max() + 1e-9))
        tol = max(2e-4 if dtype == torch.float32 else 5e-2, 2 * rel(c))
        assert rel(a) < tol, f"grad {name}: relative error {rel(a):.2e} (eager's own in {dtype}: {rel(c):.2e})"


def test_a_finite_fill_is_proven_invisible_only_where_it_is():
    """The shortcut that skips the row check: a bounded modifier, no empty row, a fill far enough
    below. Each near-miss (an unbounded modifier, an offset that empties rows, a fill close to the
    capped scores, a mask tensor) must keep the check."""
    from rewrite.codegen.eager import Spelling
    from rewrite.codegen.modded_ops import fill_cannot_show

    cap = ScoreMod((ModStep("mul", ("s", 0.01)), ModStep("tanh", ("r0",))))
    clamp_hi = ScoreMod((ModStep("min", ("s", 4.0)),))  # bounded above only
    fmin = Spelling(torch.finfo(torch.float32).min, True)

    def ok(mod, fill=fmin, mask=None, offset=0, scale=50.0):
        return fill_cannot_show(mod, [], None, mask, True, offset, scale, fill, torch.float32)

    assert ok(cap)
    assert ok(cap, Spelling(-1e4, False))
    assert not ok(clamp_hi)
    assert not ok(cap, offset=-1)
    assert not ok(cap, Spelling(-150.0, True))  # removed ≤ −150 + 50, kept ≥ −50: a weight e^−50 survives
    assert not ok(cap, mask=torch.ones(1, 1, dtype=torch.bool))
