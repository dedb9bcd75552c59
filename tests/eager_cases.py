"""Shared by the eager-semantics tests (test_eager_*.py): spellings as users write them, a compiled
function with the report of its one capture, the eager float64 answer of the same spelling, and a
comparison that needs NaN and ±inf in the same places.

The reference is the spelling itself run eagerly on float64 copies of the (rounded) inputs, so it
has every artefact eager has: a NaN key that masked_fill removes is hidden, one that an additive
−inf bias removes is not, a NaN value at a removed key reaches every row through 0·NaN.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings
from reference import TOLERANCES

from rewrite.backend import make_backend
from rewrite.options import Options
from rewrite.report import Report

NEG_INF = float("-inf")


def few(examples: int):
    """Hypothesis settings for the compile-heavy tests: a few examples, no deadline, no shrinking."""
    return settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                    phases=[Phase.explicit, Phase.reuse, Phase.generate])


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from a clean Dynamo cache (import it into a test module to use it)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def compiled(fn, backend: str, **options):
    """``fn`` compiled through the rewriter (more ``Options`` as keywords) and the report its capture
    fills (one compile)."""
    torch._dynamo.reset()
    report = Report()
    return torch.compile(fn, backend=make_backend(Options(backend=backend, **options), report), dynamic=False), report


def rewritten_site(report: Report, variants: tuple[str, ...], backend: str):
    """The one site, rewritten, of one of ``variants``, on the backend's kernels."""
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten, site.reason
    assert site.variant in variants, f"{site.variant} not in {variants}"
    if backend == "triton":
        assert site.kernel == "triton", site.kernel
    else:
        assert site.kernel in ("sdpa", "torch"), site.kernel
    return site


def modified_site(report: Report, backend: str):
    """The one site, rewritten with a score modifier (the cascade shows QKM = mod(QK)), on the backend's
    modifier kernel (the generated Triton tiles, or eager's math by row blocks)."""
    assert len(report.sites) == 1, str(report)
    site = report.sites[0]
    assert site.rewritten, site.reason
    assert site.score_mod, "no score modifier on the site"
    assert site.kernel == ("triton" if backend == "triton" else "torch"), site.kernel
    assert "QKM" in site.cascade and "mod(" in site.cascade, site.cascade
    return site


def grads_as_float64(fn, leaves, out, atol=2e-5, rtol=1e-4) -> None:
    """The gradients of ``out`` (the rewritten ``fn`` on ``leaves``) against autograd through eager ``fn``
    on float64 copies, for one random output gradient."""
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    ref = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(fn(*ref), ref, g.double())
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a.double(), b, atol=atol, rtol=rtol, msg=lambda m, i=i: f"grad of input {i}: {m}")


def double(args):
    return tuple(a.detach().double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def same_as_eager(out, ref, dtype, what: str, lowp=None) -> None:
    """NaN and ±inf where the float64 eager result has them; finite entries within the dtype's
    tolerance, widened to twice eager's own error in ``dtype`` (``lowp``) where that is larger."""
    a, e = out.detach().double(), ref.detach().double()
    assert a.shape == e.shape, what
    assert torch.equal(torch.isnan(a), torch.isnan(e)), (
        f"{what}: NaN positions differ ({int(torch.isnan(a).sum())} vs {int(torch.isnan(e).sum())} expected)")
    assert torch.equal(torch.isposinf(a), torch.isposinf(e)) and torch.equal(torch.isneginf(a), torch.isneginf(e)), \
        f"{what}: inf positions differ"
    fin = torch.isfinite(e)
    atol, rtol = TOLERANCES[dtype]
    if lowp is not None:
        own = (lowp.detach().double() - e)[fin & torch.isfinite(lowp.detach().double())]
        if own.numel():
            atol = max(atol, 2 * float(own.abs().max()))
    torch.testing.assert_close(a[fin], e[fin], atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def inputs(gen, b, hq, hkv, n, m, d, dtype, dv=None):
    """q, k, v from randn (never zeros), rounded to ``dtype``; ``dv`` is kept within the kernels' 256."""
    dv = dv or d
    dv = dv if dv <= 256 else 251  # an odd value width beside the widest head
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, m, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, m, dv, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


def _kv(q, k, v):
    g = q.shape[1] // k.shape[1]
    return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))


# ---------------------------------------------------------------- spellings

def window(w: int, fill: float = NEG_INF):
    """A 1-D band |p − m| ≤ w from arange, masked_fill(fill); a run-time bias added before it."""
    def fn(q, k, v, bias):
        k, v = _kv(q, k, v)
        i = torch.arange(q.shape[-2], device=q.device)
        keep = (i[:, None] - i[None, :]).abs() <= w
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return torch.softmax(s.masked_fill(~keep, fill), -1) @ v
    return fn


def causal(fill: float = NEG_INF):
    """tril masked_fill(fill) (nanoGPT with −inf, old GPT-2 with finfo.min)."""
    def fn(q, k, v, bias):
        k, v = _kv(q, k, v)
        n = q.shape[-2]
        keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return torch.softmax(s.masked_fill(~keep, fill), -1) @ v
    return fn


def runtime(fill: float = NEG_INF):
    """A run-time bool mask, masked_fill(fill)."""
    def fn(q, k, v, bias, keep):
        k, v = _kv(q, k, v)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return torch.softmax(s.masked_fill(~keep, fill), -1) @ v
    return fn


def where_runtime(q, k, v, keep):
    """torch.where(keep, scores, −inf): a selection like masked_fill."""
    k, v = _kv(q, k, v)
    s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5
    return torch.softmax(torch.where(keep, s, NEG_INF), -1) @ v


def additive_lag(lag: int):
    """An additive −inf bias from arange, keeping m ≤ p − lag: the rows p < lag keep no key."""
    def fn(q, k, v):
        k, v = _kv(q, k, v)
        i = torch.arange(q.shape[-2], device=q.device)
        bias = torch.where(i[None, :] <= i[:, None] - lag, 0.0, NEG_INF)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return torch.softmax(s, -1) @ v
    return fn


def additive_window(w: int):
    """An additive −inf bias from arange: a 1-D band |p − m| ≤ w."""
    def fn(q, k, v):
        k, v = _kv(q, k, v)
        i = torch.arange(q.shape[-2], device=q.device)
        bias = torch.where((i[:, None] - i[None, :]).abs() <= w, 0.0, NEG_INF)
        s = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + bias
        return torch.softmax(s, -1) @ v
    return fn


def sdpa_mask(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
