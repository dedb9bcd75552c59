"""Chunked causal linear attention (flash-linear-attention's naive ``chunk_linear_attn``, Lightning
Attention's reference) recognised as one causal linear site, against an eager float64 quadratic causal
reference; near misses (a mask not causal inside a chunk, an inclusive prefix, a nonlinearity between the
products, strided chunks) are left alone with the reason."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.codegen.linear_ops import linear_reference

TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))


close = close_relative


def phi_elu(x):
    return F.elu(x) + 1


def ident(x):
    return x


# ---- spellings: make(C) → fn(q, k, v); q, k, v are [B, H, N, D] unless the layout says [B, N, H, D] ---------
def fla_naive(C):  # flash-linear-attention's naive chunk_linear_attn: cat-with-zeros, in-place masked_fill_
    def fn(q, k, v):
        B, H, N, D = q.shape
        q = q * D ** -0.5
        q, k, v = (t.view(B, H, N // C, C, t.shape[-1]) for t in (q, k, v))
        kv = k.transpose(-1, -2) @ v
        kv = kv.cumsum(2)
        kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
        inter = q @ kv
        mask = torch.triu(torch.ones(C, C, dtype=torch.bool, device=q.device), diagonal=1)
        intra = (q @ k.transpose(-1, -2)).masked_fill_(mask, 0) @ v
        return (inter + intra).view(B, H, N, -1)
    return fn


def sub_where_relu(C):  # φ = relu, exclusive prefix as cumsum − kv, intra mask by where(tril)
    def fn(q, k, v):
        B, H, N, D = q.shape
        q, k = F.relu(q), F.relu(k)
        q, k, v = (t.reshape(B, H, -1, C, t.shape[-1]) for t in (q, k, v))
        kv = k.transpose(-1, -2) @ v
        state = kv.cumsum(2) - kv
        keep = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        intra = torch.where(keep, q @ k.transpose(-1, -2), 0.0) @ v
        return (intra + q @ state).flatten(2, 3)
    return fn


def einsum_pad_normalised(C):  # φ = elu+1, einsum, F.pad + slice, tril multiply, normalised (Katharopoulos)
    def fn(q, k, v):
        B, H, N, D = q.shape
        q, k = F.elu(q) + 1, F.elu(k) + 1
        q, k, v = (t.reshape(B, H, N // C, C, -1) for t in (q, k, v))
        kv = torch.einsum("bhncd,bhnce->bhnde", k, v).cumsum(2)
        kv = F.pad(kv, (0, 0, 0, 0, 1, 0))[:, :, :-1]
        z = F.pad(k.sum(3).cumsum(2), (0, 0, 1, 0))[:, :, :-1]
        s = torch.einsum("bhncd,bhnmd->bhncm", q, k) * torch.tril(torch.ones(C, C, device=q.device, dtype=q.dtype))
        num = torch.einsum("bhncd,bhnde->bhnce", q, kv) + torch.einsum("bhncm,bhnme->bhnce", s, v)
        den = torch.einsum("bhncd,bhnd->bhnc", q, z).unsqueeze(-1) + s.sum(-1, keepdim=True)
        return (num / (den + 1e-6)).reshape(B, H, N, -1)
    return fn


def bnhd_shifted_before_cumsum(C):  # [B, N, H, D] layout, states shifted (pad(…, (1, -1))) *before* the cumsum
    def fn(q, k, v):
        B, N, H, D = q.shape
        q, k, v = (t.view(B, N // C, C, H, t.shape[-1]) for t in (q, k, v))
        kv = torch.einsum("bclhd,bclhf->bchdf", k, v)
        kv = F.pad(kv, (0, 0, 0, 0, 0, 0, 1, -1)).cumsum(1)
        inter = torch.einsum("bclhd,bchdf->bclhf", q, kv)
        scores = torch.einsum("bclhd,bcmhd->bchlm", q, k) * torch.ones(C, C, device=q.device, dtype=q.dtype).tril()
        intra = torch.einsum("bchlm,bcmhf->bclhf", scores, v)
        return (inter + intra).reshape(B, N, H, -1)
    return fn


def lightning_scaled(C):  # Lightning-style: the scale on each product's output, the state kept as [F, D]
    def fn(q, k, v):
        B, H, N, D = q.shape
        s = 0.25
        q, k, v = (t.view(B, H, N // C, C, t.shape[-1]) for t in (q, k, v))
        vk = torch.matmul(v.transpose(-1, -2), k).cumsum(2)
        vk = torch.cat([vk.new_zeros(B, H, 1, v.shape[-1], D), vk[:, :, :-1]], 2)
        mask = torch.tril(torch.ones(C, C, device=q.device, dtype=q.dtype))
        intra = torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * s * mask, v)
        inter = torch.matmul(q, vk.transpose(-1, -2)) * s
        return (inter + intra).reshape(B, H, N, -1)
    return fn


# name: (make, φ, scale(D), normalised, eps, layout)
SPELLINGS = {
    "fla_naive": (fla_naive, ident, lambda d: d ** -0.5, False, 0.0, "bhnd"),
    "sub_where_relu": (sub_where_relu, F.relu, lambda d: 1.0, False, 0.0, "bhnd"),
    "einsum_pad_normalised": (einsum_pad_normalised, phi_elu, lambda d: 1.0, True, 1e-6, "bhnd"),
    "bnhd_shifted_before_cumsum": (bnhd_shifted_before_cumsum, ident, lambda d: 1.0, False, 0.0, "bnhd"),
    "lightning_scaled": (lightning_scaled, ident, lambda d: 1.0, False, 0.0, "bhnd"),
}


def make_inputs(b, h, n, d, f, seed, dtype, layout):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, n) if layout == "bhnd" else (b, n, h)
    q, k = (torch.randn(*shape, d, generator=g) for _ in range(2))
    v = torch.randn(*shape, f, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def quadratic_reference(name, q, k, v):
    """Eager float64 causal linear attention over the flattened positions, the quadratic form."""
    _, phi, scale, normalised, eps, layout = SPELLINGS[name]
    q, k, v = (t.double() for t in (q, k, v))
    if layout == "bnhd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if name == "lightning_scaled":
        scale = lambda d: 0.25  # noqa: E731
    out = linear_reference(phi(q) * scale(q.shape[-1]), phi(k), v, causal=True, normalize=normalised, eps=eps)
    return out.transpose(1, 2) if layout == "bnhd" else out


def run(name, backend, dtype, n_chunks, C, d, f, seed, h=2):
    make, *_, layout = SPELLINGS[name]
    fn = make(C)
    q, k, v = make_inputs(1, h, n_chunks * C, d, f, seed, dtype, layout)
    want = quadratic_reference(name, q, k, v)
    close(fn(q.double(), k.double(), v.double()), want, torch.float64, f"{name}: eager chunked vs quadratic")
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v, backend=backend)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(report.sites) == 1 and len(lin) == 1, report
    assert lin[0].rewritten and lin[0].mask == "causal m <= p" and "chunked" in lin[0].spelling, report
    assert lin[0].shapes["n"] == n_chunks * C, lin[0].shapes
    torch._dynamo.reset()
    got = rewrite.compile(fn, backend=backend)(q, k, v)
    assert got.dtype == dtype
    close(got, want, dtype, f"{name} {backend} {dtype}")


@settings(max_examples=12, **SETTINGS)
@given(name=st.sampled_from(sorted(SPELLINGS)), n_chunks=st.sampled_from([1, 3, 5, 7]), C=st.integers(4, 32),
       d=st.sampled_from([16, 24, 32, 64]), f=st.sampled_from([8, 20, 40]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_chunked_spellings_torch_backend(name, n_chunks, C, d, f, dtype, seed):
    run(name, "torch", dtype, n_chunks, C, d, f, seed)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_each_chunked_spelling_once(name):
    run(name, "torch", torch.float32, 3, 8, 16, 12, 0)


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=3, **SETTINGS)
@given(name=st.sampled_from(sorted(SPELLINGS)), n_chunks=st.sampled_from([3, 5]), C=st.sampled_from([4, 8, 16]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_chunked_spellings_triton_backend(name, n_chunks, C, dtype, seed):
    run(name, "triton", dtype, n_chunks, C, 16, 24, seed, h=1)


# ---- near misses: left alone, whole, with the reason ------------------------------------------------------
C_NEG = 8


def _chunks(q, k, v):
    B, H, N, _ = q.shape
    return (t.view(B, H, N // C_NEG, C_NEG, t.shape[-1]) for t in (q, k, v))


def _exclusive(kv):
    kv = kv.cumsum(2)
    return torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)


def _out(o, q):
    return o.reshape(q.shape[0], q.shape[1], q.shape[2], -1)


def mask_not_causal_in_chunk(q, k, v):  # triu(diagonal=2): each position also sees the next one
    qc, kc, vc = _chunks(q, k, v)
    mask = torch.triu(torch.ones(C_NEG, C_NEG, dtype=torch.bool, device=q.device), diagonal=2)
    intra = (qc @ kc.transpose(-1, -2)).masked_fill(mask, 0) @ vc
    return _out(qc @ _exclusive(kc.transpose(-1, -2) @ vc) + intra, q)


def no_mask_in_chunk(q, k, v):
    qc, kc, vc = _chunks(q, k, v)
    return _out(qc @ _exclusive(kc.transpose(-1, -2) @ vc) + (qc @ kc.transpose(-1, -2)) @ vc, q)


def inclusive_prefix(q, k, v):  # the chunk's own keys counted twice
    qc, kc, vc = _chunks(q, k, v)
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    return _out(qc @ (kc.transpose(-1, -2) @ vc).cumsum(2) + ((qc @ kc.transpose(-1, -2)) * keep) @ vc, q)


def relu_between_products(q, k, v):  # a nonlinearity on the intra-chunk scores
    qc, kc, vc = _chunks(q, k, v)
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    return _out(qc @ _exclusive(kc.transpose(-1, -2) @ vc) + (torch.relu(qc @ kc.transpose(-1, -2)) * keep) @ vc, q)


def relu_on_state(q, k, v):  # a nonlinearity on the inter-chunk state
    qc, kc, vc = _chunks(q, k, v)
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    state = torch.relu(_exclusive(kc.transpose(-1, -2) @ vc))
    return _out(qc @ state + ((qc @ kc.transpose(-1, -2)) * keep) @ vc, q)


def strided_chunks(q, k, v):  # 'b h (c n) d -> b h n c d': the chunk index is the inner part of the sequence
    B, H, N, _ = q.shape
    qc, kc, vc = (t.view(B, H, C_NEG, N // C_NEG, t.shape[-1]).transpose(2, 3) for t in (q, k, v))
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    o = qc @ _exclusive(kc.transpose(-1, -2) @ vc) + ((qc @ kc.transpose(-1, -2)) * keep) @ vc
    return o.transpose(2, 3).reshape(B, H, N, -1)


def scaled_differently(q, k, v):  # the own chunk scaled, the earlier ones not
    qc, kc, vc = _chunks(q, k, v)
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    return _out(qc @ _exclusive(kc.transpose(-1, -2) @ vc) + ((qc @ kc.transpose(-1, -2)) * 0.5 * keep) @ vc, q)


def state_from_other_keys(q, k, v):  # the state is built from keys the intra-chunk part does not read
    qc, kc, vc = _chunks(q, k, v)
    keep = torch.ones(C_NEG, C_NEG, device=q.device, dtype=q.dtype).tril()
    return _out(qc @ _exclusive((2 * kc).transpose(-1, -2) @ vc) + ((qc @ kc.transpose(-1, -2)) * keep) @ vc, q)


@pytest.mark.parametrize("fn,reason", [
    (mask_not_causal_in_chunk, "not l' <= l"), (no_mask_in_chunk, "not masked"), (inclusive_prefix, "inclusive"),
    (relu_between_products, "nonlinearity (relu)"), (relu_on_state, "not an exclusive prefix"),
    (strided_chunks, "inner part"), (scaled_differently, "scaled"), (state_from_other_keys, "very keys and values")])
def test_near_misses_are_left_alone(fn, reason):
    q, k, v = make_inputs(1, 2, 5 * C_NEG, 16, 12, 1, torch.float32, "bhnd")
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(report.sites) == 1 and len(lin) == 1, report
    assert not lin[0].rewritten and reason in lin[0].reason and "chunked" in lin[0].reason, report
    torch._dynamo.reset()
    close(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32, fn.__name__)


def test_report_names_the_chunked_form():
    q, k, v = make_inputs(1, 2, 24, 16, 16, 0, torch.float32, "bhnd")
    torch._dynamo.reset()
    (s,) = rewrite.inspect(fla_naive(8), q, k, v).sites
    assert s.kernel == "rewrite::linear_attention[torch]" and s.pass_count["rewritten"] == 1
    assert any("3 chunks of 8" in n and "chunk index outer" in n for n in s.notes), s.notes
    assert "(scan m)" in s.rewritten_cascade and "cumsum shifted by one chunk (cat with zeros)" in s.spelling


def test_gradients_match_eager():
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 24, 16, 12, 5, torch.float64, "bhnd"))
    fn = einsum_pad_normalised(8)
    torch._dynamo.reset()
    out = rewrite.compile(fn, backend="torch")(q, k, v)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(fn(q, k, v), (q, k, v), g)):
        torch.testing.assert_close(a, b)
