"""Decay-gated linear attention (RetNet retention, Lightning Attention, simple gated linear attention):
the op's kernels (chunked torch; Triton forward and backward, under TRITON_INTERPRET=1 on a CPU) against a
float64 quadratic reference, recognition of the quadratic spellings, and the near-misses that must be
left alone with their reason. The spellings below are written the way the papers' reference code and
model repositories write them, not from the recogniser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.codegen.decay_ops import decay_reference, decay_torch
from rewrite.codegen.triton_decay import decay_attention_triton, decay_attention_triton_backward

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))
SMALL = {"chunk": 16, "target": 3, "bwd_target": 3, "state_block": 16}  # several segments and chunks at small N


def _inputs(b, h, n, e, f, dtype, seed, gate_lo=0.7):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, h, n, e, generator=gen, dtype=torch.float64) / e ** 0.25 for _ in range(2))
    v = torch.randn(b, h, n, f, generator=gen, dtype=torch.float64)
    log_gate = torch.log(gate_lo + (1 - gate_lo) * torch.rand(b, h, n, generator=gen, dtype=torch.float64))
    return q.to(dtype), k.to(dtype), v.to(dtype), log_gate.cumsum(-1)


TOL = {torch.float32: 2e-5, torch.float16: 6e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def _close(actual, expected, dtype, what, scale=None):
    """Relative to the largest |expected| (or ``scale``: dG = q·dq − k·dk cancels, so its terms set the scale)."""
    scale = expected.double().abs().max() if scale is None else scale
    err = (actual.double() - expected.double()).abs().max() / scale.clamp_min(1e-30)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]}"


# ---- kernels -----------------------------------------------------------------------------------
@settings(max_examples=12, **SETTINGS)
@given(n=st.integers(1, 150), e=st.sampled_from([16, 24, 64]), f=st.sampled_from([16, 40]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
def test_triton_forward_and_backward_match_float64(n, e, f, dtype, seed):
    q, k, v, g = _inputs(1, 2, n, e, f, dtype, seed)
    ref_in = [t.double().requires_grad_() for t in (q, k, v, g)]
    ref = decay_reference(*ref_in)
    out = decay_attention_triton(q, k, v, g.float(), cfg=SMALL)
    _close(out, ref, dtype, "forward")
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    ref.backward(do)
    grads = decay_attention_triton_backward(q, k, v, g.float(), do.to(dtype), cfg=SMALL)
    for name, got, want in zip("q k v".split(), grads, (t.grad for t in ref_in)):
        _close(got, want, dtype, f"d{name}")
    _close(grads[3], ref_in[3].grad, dtype, "dG", scale=(ref_in[0] * ref_in[0].grad).sum(-1).abs().max())


@settings(max_examples=15, **SETTINGS)
@given(n=st.integers(1, 200), h=st.integers(1, 3), e=st.sampled_from([16, 32, 128, 256]),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16),
       gate_lo=st.sampled_from([0.05, 0.9, 1.0]))
def test_torch_path_matches_float64(n, h, e, dtype, seed, gate_lo):
    q, k, v, g = _inputs(2, h, n, e, 16, dtype, seed, gate_lo)
    _close(decay_torch(q, k, v, g), decay_reference(q.double(), k.double(), v.double(), g), dtype, "torch path")


def test_triton_broadcast_heads_and_gates():
    """An MQA key/value (one head) and a per-head G broadcast over the batch: the kernels expand them."""
    q, _, _, g = _inputs(2, 3, 37, 16, 16, torch.float32, 0)
    _, k, v, _ = _inputs(2, 1, 37, 16, 16, torch.float32, 1)
    g1 = g[:1]
    out = decay_attention_triton(q, k, v, g1, cfg=SMALL)
    close_relative(out, decay_reference(q.double(), k.double(), v.double(), g1), torch.float32)
    dq, dk, dv, dg = decay_attention_triton_backward(q, k, v, g1, torch.ones_like(out), cfg=SMALL)
    assert dk.shape == k.shape and dv.shape == v.shape and dg.shape == (2, 3, 37)


# ---- spellings (quadratic forms as model code writes them) ----------------------------------------
def retnet_pow_masked_fill(q, k, v):  # RetNet parallel retention: γ_h = 1 − 2^(−5−h), decay masked after pow
    n, h = q.shape[-2], q.shape[1]
    gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32, device=q.device))
    idx = torch.arange(n, device=q.device)
    dist = (idx[:, None] - idx[None, :]).float()
    decay = (gamma.view(-1, 1, 1) ** dist.clamp(min=0)).masked_fill(dist < 0, 0.0)
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2) * decay) @ v


def retnet_exp_tril_bnhd(q, k, v):  # [B, N, H, D], decay = exp(log γ · (i − j)) with tril, einsum letters x y
    n, h = q.shape[1], q.shape[2]
    log_gamma = torch.log(1 - torch.exp2(-5.0 - torch.arange(h, device=q.device, dtype=torch.float32)))
    i = torch.arange(n, device=q.device, dtype=torch.float32)
    decay = torch.tril(torch.exp(log_gamma[:, None, None] * (i[:, None] - i[None, :])))
    s = torch.einsum("bxhd,byhd->bhxy", q, k) * decay
    return torch.einsum("bhxy,byhd->bxhd", s, v)


def lightning_scores_masked_then_decay(q, k, v):  # Lightning: causal mask on the scores, exp(−s·(i−j)) apart
    n, h = q.shape[-2], q.shape[1]
    slope = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device=q.device)
    i = torch.arange(n, device=q.device)
    keep = i[:, None] >= i[None, :]
    decay = torch.exp(-slope[:, None, None] * (i[:, None] - i[None, :]).clamp(min=0))
    s = torch.where(keep, q @ k.transpose(-1, -2), 0.0)
    return (s * decay) @ v


def gla_quadratic(q, k, v, g):  # simple GLA: per-head scalar log gate per step, G = cumsum, mask after exp
    G = g.cumsum(-1)
    n = q.shape[-2]
    D = torch.exp(G[..., :, None] - G[..., None, :])
    D = D.masked_fill(~torch.ones(n, n, dtype=torch.bool, device=q.device).tril(), 0)
    return (q @ k.transpose(-1, -2) * D) @ v


def gla_inf_inside_exp(q, k, v, gate_logits):  # gate = logsigmoid(x)/16 in [B, N, H]; −inf before exp
    G = (F.logsigmoid(gate_logits) / 16).cumsum(1).transpose(1, 2)  # [B, H, N]
    n = q.shape[-2]
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    diff = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf"))
    w = torch.einsum("bhqd,bhkd->bhqk", q, k) * diff.exp()
    return torch.einsum("bhqk,bhkd->bhqd", w, v)


def gla_negated(q, k, v, G):  # exp(−(G_m − G_p)) written as exp(G_m' … ) with the operands swapped
    n = q.shape[-2]
    D = torch.where(torch.ones(n, n, dtype=torch.bool, device=q.device).tril(),
                    torch.exp(-(G.unsqueeze(-2) - G.unsqueeze(-1))), 0.0)
    return (q @ k.transpose(-1, -2)) .mul(D) @ v


def scalar_gamma_where_relu(q, k, v):  # one γ for every head, integer distances, relu features
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    decay = torch.where(i[:, None] >= i[None, :], 0.9 ** (i[:, None] - i[None, :]).to(q.dtype), 0.0)
    return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * decay) @ v


def _qkv(b, h, n, d, layout="bhnd", dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, h, n, d) if layout == "bhnd" else (b, n, h, d)
    return [torch.randn(*shape, generator=gen).to(dtype) / d ** 0.25 for _ in range(3)]


def _decay_site(fn, *args):
    report = rewrite.inspect(fn, *args)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(lin) == 1, report
    return lin[0], report


CONSTANT_SPELLINGS = [(retnet_pow_masked_fill, "bhnd"), (retnet_exp_tril_bnhd, "bnhd"),
                      (lightning_scores_masked_then_decay, "bhnd"), (scalar_gamma_where_relu, "bhnd")]


@pytest.mark.parametrize("fn,layout", CONSTANT_SPELLINGS, ids=[f.__name__ for f, _ in CONSTANT_SPELLINGS])
@pytest.mark.parametrize("n", [2, 37, 130])
def test_constant_decay_spellings_rewritten(fn, layout, n):
    q, k, v = _qkv(2, 3, n, 16, layout)
    site, report = _decay_site(fn, q, k, v)
    assert site.rewritten and "decay_linear_attention" in site.kernel, report
    assert "γ^(p−m)" in " ".join(site.notes)
    ref = fn(*(t.double() for t in (q, k, v)))
    close_relative(rewrite.compile(fn)(q, k, v), ref, torch.float32)


def test_gated_spellings_rewritten_with_gradients():
    q, k, v = (t.requires_grad_() for t in _qkv(2, 2, 45, 16))
    g = F.logsigmoid(torch.randn(2, 2, 45)).requires_grad_()
    site, report = _decay_site(gla_quadratic, q, k, v, g)
    assert site.rewritten and "decay_linear_attention" in site.kernel and "gated" in " ".join(site.notes), report
    out = rewrite.compile(gla_quadratic)(q, k, v, g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, g)]
    ref = gla_quadratic(*ref_in)
    close_relative(out, ref, torch.float32)
    do = torch.randn(out.shape)
    grads = torch.autograd.grad(out, (q, k, v, g), do)
    want = torch.autograd.grad(ref, ref_in, do.double())
    for got, w in zip(grads, want):
        close_relative(got, w, torch.float32)


def test_gate_with_inf_inside_exp_and_negated_difference():
    q, k, v = _qkv(1, 2, 33, 16)
    logits = torch.randn(1, 33, 2)
    site, report = _decay_site(gla_inf_inside_exp, q, k, v, logits)
    assert site.rewritten, report
    close_relative(rewrite.compile(gla_inf_inside_exp)(q, k, v, logits),
                   gla_inf_inside_exp(*(t.double() for t in (q, k, v, logits))), torch.float32)
    G = torch.log(torch.rand(1, 2, 33) * 0.5 + 0.5).cumsum(-1)
    site, report = _decay_site(gla_negated, q, k, v, G)
    assert site.rewritten, report
    close_relative(rewrite.compile(gla_negated)(q, k, v, G),
                   gla_negated(*(t.double() for t in (q, k, v, G))), torch.float32)


# ---- near-misses: left alone, with the reason ---------------------------------------------------------
def _decay(n, h, device=None):
    gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32))
    i = torch.arange(n)
    return gamma.view(-1, 1, 1) ** (i[:, None] - i[None, :]).float(), i


def two_sided(q, k, v):  # γ^|i−j|: no causal mask
    d, i = _decay(q.shape[-2], q.shape[1])
    d = d ** torch.sign((i[:, None] - i[None, :]).float())
    return (q @ k.transpose(-1, -2) * d) @ v


def edited_entry(q, k, v):  # one entry 1 % off γ^(p−m)
    d, i = _decay(q.shape[-2], q.shape[1])
    d = torch.tril(d)
    d[1, 20, 7] *= 1.01
    return (q @ k.transpose(-1, -2) * d) @ v


def extra_entry_above(q, k, v):  # a kept pair m > p
    d, i = _decay(q.shape[-2], q.shape[1])
    d = torch.tril(d)
    d[0, 3, 9] = 0.5
    return (q @ k.transpose(-1, -2) * d) @ v


def scaled_diagonal(q, k, v):  # 2·γ^(p−m): a scale the kernel does not take
    d, _ = _decay(q.shape[-2], q.shape[1])
    return (q @ k.transpose(-1, -2) * (2 * torch.tril(d))) @ v


def gate_without_mask(q, k, v, G):
    return (q @ k.transpose(-1, -2) * torch.exp(G[..., :, None] - G[..., None, :])) @ v


def gate_strict_mask(q, k, v, G):  # m < p (tril(−1)): not m ≤ p
    n = q.shape[-2]
    D = torch.exp(G[..., :, None] - G[..., None, :]) * torch.ones(n, n).tril(-1)
    return (q @ k.transpose(-1, -2) * D) @ v


def normalised_decay(q, k, v):
    d, _ = _decay(q.shape[-2], q.shape[1])
    w = F.relu(q) @ F.relu(k).transpose(-1, -2) * torch.tril(d)
    return (w @ v) / w.sum(-1, keepdim=True)


def abs_normalised_retention(q, k, v):  # torchscale's parallel retention divides by Σ|qk ⊙ D|: nonlinear
    d, _ = _decay(q.shape[-2], q.shape[1])
    w = q @ k.transpose(-1, -2) * torch.tril(d)
    w = w / w.detach().abs().sum(-1, keepdim=True).clamp(min=1)
    return w @ v


NEAR_MISSES = [(two_sided, "not causal"), (edited_entry, "not γ^(p−m)"), (extra_entry_above, "m > p"),
               (scaled_diagonal, "diagonal is not 1"), (normalised_decay, "normalised decay-gated"),
               (abs_normalised_retention, "")]


@pytest.mark.parametrize("fn,reason", NEAR_MISSES, ids=[f.__name__ for f, _ in NEAR_MISSES])
def test_constant_near_misses_left_alone(fn, reason):
    q, k, v = _qkv(1, 2, 40, 16)
    report = rewrite.inspect(fn, q, k, v)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert lin and not any(s.rewritten for s in lin), report
    assert reason in lin[0].reason, lin[0].reason


@pytest.mark.parametrize("fn", [gate_without_mask, gate_strict_mask])
def test_gate_near_misses_left_alone(fn):
    q, k, v = _qkv(1, 2, 40, 16)
    G = torch.log(torch.rand(1, 2, 40) * 0.5 + 0.5).cumsum(-1)
    site, report = _decay_site(fn, q, k, v, G)
    assert not site.rewritten and "causal" in site.reason, report
    torch.testing.assert_close(rewrite.compile(fn)(q, k, v, G), fn(q, k, v, G))


def test_half_precision_constant_decay_refused():
    q, k, v = _qkv(1, 2, 24, 16, dtype=torch.bfloat16)

    def bf16_decay(q, k, v):
        d, _ = _decay(q.shape[-2], q.shape[1])
        return (q @ k.transpose(-1, -2) * torch.tril(d).to(q.dtype)) @ v

    site, report = _decay_site(bf16_decay, q, k, v)
    assert not site.rewritten and "half precision" in site.reason, report


def test_decay_rates_recovered_per_head():
    """The γ the report names are the model's, to the printed digits (one rate per head)."""
    q, k, v = _qkv(1, 4, 64, 16)
    site, _ = _decay_site(retnet_pow_masked_fill, q, k, v)
    text = " ".join(site.notes)
    for h in range(4):
        assert f"{round(1 - 2.0 ** (-5 - h), 6):g}" in text, text
    assert math.isfinite(float(rewrite.compile(retnet_pow_masked_fill)(q, k, v).abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_decay_op_forward_backward(d):
    q, k, v, g = (t.cuda() for t in _inputs(2, 4, 1000, d, d, torch.bfloat16, 3))
    g = g.float()
    ref_in = [t.double().requires_grad_() for t in (q, k, v, g)]
    ref = decay_reference(*ref_in)
    tq, tk, tv, tg = (t.detach().clone().requires_grad_() for t in (q, k, v, g))
    out = torch.ops.rewrite.decay_linear_attention(tq, tk, tv, tg, "triton", torch.bfloat16)
    _close(out, ref, torch.bfloat16, "forward")
    do = torch.randn_like(out)
    out.backward(do)
    ref.backward(do.double())
    for got, want, name in zip((tq.grad, tk.grad, tv.grad), (t.grad for t in ref_in), "qkv"):
        _close(got, want, torch.bfloat16, f"d{name}")
    _close(tg.grad, ref_in[3].grad, torch.bfloat16, "dG", scale=(ref_in[0] * ref_in[0].grad).sum(-1).abs().max())


class MultiScaleRetention(torch.nn.Module):
    """A RetNet-style layer (parallel form, as the paper's pseudo-code writes it): projections, per-head
    γ = 1 − 2^(−5−h), swish gate and group norm after the retention."""

    def __init__(self, dim=64, heads=4):
        super().__init__()
        self.h, self.d = heads, dim // heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
        self.gate = torch.nn.Linear(dim, dim, bias=False)
        self.out = torch.nn.Linear(dim, dim, bias=False)
        self.norm = torch.nn.GroupNorm(heads, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.h, self.d).permute(2, 0, 3, 1, 4)
        gamma = 1 - torch.exp2(-5 - torch.arange(self.h, device=x.device, dtype=x.dtype))
        idx = torch.arange(n, device=x.device)
        decay = torch.where(idx[:, None] >= idx[None, :],
                            gamma[:, None, None] ** (idx[:, None] - idx[None, :]).to(x.dtype), 0.0)
        ret = (q @ k.transpose(-1, -2) * self.d ** -0.5 * decay) @ v  # [b, h, n, d]
        y = self.norm(ret.transpose(1, 2).reshape(b * n, -1)).view(b, n, -1)
        return self.out(F.silu(self.gate(x)) * y)


def test_retnet_style_model_rewritten_forward_and_backward():
    torch.manual_seed(0)
    model = MultiScaleRetention()
    x = torch.randn(2, 50, 64)
    report = rewrite.inspect(model, x)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(lin) == 1 and lin[0].rewritten and "decay_linear_attention" in lin[0].kernel, report
    compiled = rewrite.compile(model)
    out = compiled(x)
    ref_model = MultiScaleRetention().double()
    ref_model.load_state_dict(model.state_dict())
    ref = ref_model(x.double())
    close_relative(out, ref, torch.float32)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        close_relative(p.grad, p_ref.grad, torch.float32, name)


def two_gates(q, k, v, G, H):  # exp(G_p − H_m): two different tensors, not one decay
    n = q.shape[-2]
    D = torch.exp(G[..., :, None] - H[..., None, :]) * torch.ones(n, n).tril()
    return (q @ k.transpose(-1, -2) * D) @ v


def test_gate_of_two_tensors_left_alone():
    q, k, v = _qkv(1, 2, 30, 16)
    G, H = (torch.log(torch.rand(1, 2, 30) * 0.5 + 0.5).cumsum(-1) for _ in range(2))
    site, report = _decay_site(two_gates, q, k, v, G, H)
    assert not site.rewritten and "neither a 0/1 mask nor a decay" in site.reason, report


def test_decay_above_the_checked_size_is_refused(monkeypatch):
    """The entry-by-entry check switches off above VERIFY_LIMIT: the site is then left alone, with that reason."""
    import rewrite.patterns.linear_decay as linear_decay

    q, k, v = _qkv(1, 2, 40, 16)
    monkeypatch.setattr(linear_decay, "VERIFY_LIMIT", 2 * 40 * 40 - 1)
    site, report = _decay_site(retnet_pow_masked_fill, q, k, v)
    assert not site.rewritten and "checked one by one" in site.reason, report
    monkeypatch.setattr(linear_decay, "VERIFY_LIMIT", 2 * 40 * 40)
    rewrite.clear_caches()
    site, report = _decay_site(retnet_pow_masked_fill, q, k, v)
    assert site.rewritten, report


def test_one_gamma_broadcast_over_heads_as_size_one_axis():
    """A [1, N, N] decay (a size-1 head axis) is one γ shared by every head: read back as that γ."""
    q, k, v = _qkv(2, 3, 33, 16)

    def shared(q, k, v):
        i = torch.arange(q.shape[-2])
        d = torch.tril(0.95 ** (i[:, None] - i[None, :]).float())[None]
        return (q @ k.transpose(-1, -2) * d) @ v

    site, report = _decay_site(shared, q, k, v)
    assert site.rewritten and "0.95" in " ".join(site.notes), report
    close_relative(rewrite.compile(shared)(q, k, v), shared(*(t.double() for t in (q, k, v))), torch.float32)
