"""Flow-Attention recognised by what it computes: independent spellings (the official code, the paper's
equations with named flows, a [B, N, H, D] layout with matmul and negative dims, reciprocals written as
multiplications, a causal form with its own cumsum and arange) are rewritten to the flow op and match
float64 eager; near-misses are refused with their reason and claimed by nothing else."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.patterns.flow_attention import official_flow, official_flow_causal

close = close_relative
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# ---- spellings, each written from the equations in its own style ---------------------------------------
def paper_flow(q, k, v, eps=1e-6):
    """Named flows of the paper: I, O, Î, Ô, competition, allocation (layout [B, H, L, D])."""
    phi_q, phi_k = q.sigmoid(), k.sigmoid()
    n, m = q.shape[-2], k.shape[-2]
    incoming = ((phi_q + eps) * (phi_k.sum(-2, keepdim=True) + eps)).sum(-1)
    outgoing = ((phi_k + eps) * (phi_q.sum(-2, keepdim=True) + eps)).sum(-1)
    conserved_in = ((phi_q + eps) * ((phi_k / outgoing.unsqueeze(-1)).sum(-2, keepdim=True) + eps)).sum(-1)
    conserved_out = ((phi_k + eps) * ((phi_q / incoming.unsqueeze(-1)).sum(-2, keepdim=True) + eps)).sum(-1)
    competition = conserved_out.clamp(-1, 1).softmax(dim=-1) * m
    allocation = torch.sigmoid(conserved_in * (n / m))
    v_hat = v * competition.unsqueeze(-1)
    aggregated = (phi_q / incoming.unsqueeze(-1)) @ (phi_k.transpose(-2, -1) @ v_hat)
    return aggregated * allocation.unsqueeze(-1)


def bnhd_flow(q, k, v, eps=1e-6):
    """[B, L, H, D] tensors, negative dims, matmul for the contractions, (x·N)/M for the ratio."""
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    inc = ((q + eps) * (k.sum(dim=-3) + eps)[:, None]).sum(-1)
    outg = ((k + eps) * (q.sum(dim=-3) + eps)[:, None]).sum(-1)
    c_in = ((q + eps) * ((k / outg[..., None]).sum(-3) + eps)[:, None]).sum(-1)
    c_out = ((k + eps) * ((q / inc[..., None]).sum(-3) + eps)[:, None]).sum(-1)
    comp = torch.softmax(torch.clamp(c_out, -1.0, 1.0), dim=-2) * k.shape[-3]
    alloc = torch.sigmoid(c_in * q.shape[-3] / k.shape[-3])
    kv = torch.matmul(k.permute(0, 2, 3, 1), (v * comp[..., None]).transpose(-3, -2))
    r = torch.matmul((q / inc[..., None]).transpose(-3, -2), kv)
    return r.transpose(-3, -2) * alloc[..., None]


def reciprocal_flow(q, k, v, eps=1e-6):
    """No division: reciprocal, pow(-1), x·(1/y); softmax by hand on a clamp written as clamp_min then
    clamp_max; einsum with other letters."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    inv_in = torch.reciprocal(torch.einsum("bhnd,bhd->bhn", fq + eps, fk.sum(2) + eps))
    inv_out = torch.einsum("bhmd,bhd->bhm", fk + eps, fq.sum(2) + eps).pow(-1)
    c_in = torch.einsum("bhnd,bhd->bhn", fq + eps, torch.einsum("bhmd,bhm->bhd", fk, inv_out) + eps)
    c_out = torch.einsum("bhmd,bhd->bhm", fk + eps, torch.einsum("bhnd,bhn->bhd", fq, inv_in) + eps)
    ex = torch.exp(c_out.clamp_min(-1.0).clamp_max(1.0))
    comp = ex * (1.0 / ex.sum(-1, keepdim=True)) * k.shape[2]
    alloc = torch.sigmoid(c_in * (1.0 / k.shape[2]) * q.shape[2])
    kv = torch.einsum("bhmd,bhmf->bhdf", fk, v * comp.unsqueeze(-1))
    return alloc.unsqueeze(-1) * torch.einsum("bhnd,bhdf->bhnf", fq * inv_in.unsqueeze(-1), kv)


def causal_flow(q, k, v, eps=1e-6):
    """Causal: arange(1, N+1) as a column, keepdim sums, the [.., N, D, F] prefix sum by broadcasting."""
    n = q.shape[-2]
    fq, fk = q.sigmoid(), k.sigmoid()
    pos = torch.arange(1, n + 1, device=q.device, dtype=q.dtype)[:, None]
    inc = ((fq + eps) * (torch.cumsum(fk, dim=-2) + eps)).sum(-1, keepdim=True)
    outg = ((fk + eps) * (torch.cumsum(fq, dim=-2) + eps)).sum(-1, keepdim=True)
    c_in = ((fq + eps) * ((fk * pos / outg).cumsum(-2) + eps)).sum(-1, keepdim=True) / pos
    c_out = ((fk + eps) * ((fq * pos / inc).cumsum(-2) + eps)).sum(-1, keepdim=True) / pos
    e = c_out.clamp(min=-1.0, max=1.0).exp()
    comp = e / e.cumsum(-2) * pos
    kv = torch.cumsum(fk.unsqueeze(-1) * (v * comp).unsqueeze(-2), dim=-3)
    return (fq.unsqueeze(-1) / inc.unsqueeze(-1) * kv).sum(-2) * torch.sigmoid(c_in)


def merged_heads_flow(q, k, v, eps=1e-6, heads=3):
    """q, k, v [B, L, H·D]: the sigmoid before the head split, the output merged back to [B, L, H·F]."""
    b, n, _ = q.shape
    m = k.shape[1]
    fq = torch.sigmoid(q).view(b, n, heads, -1).transpose(1, 2)
    fk = torch.sigmoid(k).view(b, m, heads, -1).transpose(1, 2)
    vv = v.view(b, m, heads, -1).transpose(1, 2)
    inc = torch.einsum("bhnd,bhd->bhn", fq + eps, fk.sum(2) + eps)
    outg = torch.einsum("bhmd,bhd->bhm", fk + eps, fq.sum(2) + eps)
    c_in = torch.einsum("bhnd,bhd->bhn", fq + eps, (fk / outg[..., None]).sum(2) + eps)
    c_out = torch.einsum("bhmd,bhd->bhm", fk + eps, (fq / inc[..., None]).sum(2) + eps).clamp(-1, 1)
    kv = torch.einsum("bhmd,bhmf->bhdf", fk, vv * (torch.softmax(c_out, -1) * m)[..., None])
    out = torch.einsum("bhnd,bhdf->bhnf", fq / inc[..., None], kv) * torch.sigmoid(c_in * n / m)[..., None]
    return out.transpose(1, 2).reshape(b, n, -1)


def mean_flow(q, k, v, eps=1e-6):
    """The incoming flow as a mean over features times D; every other sum a sum."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    n, m, d = q.shape[2], k.shape[2], q.shape[3]
    inc = ((fq + eps) * (fk.sum(2, keepdim=True) + eps)).mean(-1) * d
    outg = ((fk + eps) * (fq.sum(2, keepdim=True) + eps)).sum(-1)
    c_in = ((fq + eps) * ((fk / outg[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
    c_out = ((fk + eps) * ((fq / inc[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
    out = (fq / inc[..., None]) @ (fk.transpose(-1, -2) @ (v * (torch.softmax(c_out, -1) * m)[..., None]))
    return out * torch.sigmoid(c_in * n / m)[..., None]


def stable_softmax_flow(use_amax: bool):
    """The competition as the stable softmax written out, exp(Ô − max Ô)/Σ exp(Ô − max Ô), no clamp."""
    def flow(q, k, v, eps=1e-6):
        fq, fk = torch.sigmoid(q), torch.sigmoid(k)
        n, m = q.shape[2], k.shape[2]
        inc = ((fq + eps) * (fk.sum(2, keepdim=True) + eps)).sum(-1)
        outg = ((fk + eps) * (fq.sum(2, keepdim=True) + eps)).sum(-1)
        c_in = ((fq + eps) * ((fk / outg[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        c_out = ((fk + eps) * ((fq / inc[..., None]).sum(2, keepdim=True) + eps)).sum(-1)
        top = c_out.amax(-1, keepdim=True) if use_amax else c_out.max(dim=-1, keepdim=True)[0]
        ex = torch.exp(c_out - top)
        out = (fq / inc[..., None]) @ (fk.transpose(-1, -2) @ (v * (ex / ex.sum(-1, keepdim=True) * m)[..., None]))
        return out * torch.sigmoid(c_in * n / m)[..., None]
    return flow


def _inputs(layout: str, n: int, m: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = {"bnhd": lambda L, d: (2, L, 3, d), "merged": lambda L, d: (2, L, 3 * d)}.get(
        layout, lambda L, d: (2, 3, L, d))
    return (torch.randn(shape(n, 16), generator=g) * 2, torch.randn(shape(m, 16), generator=g) * 2,
            torch.randn(shape(m, 12), generator=g))


SPELLINGS = [  # (name, fn, layout, causal, clamp, N, M)
    ("official", official_flow(1e-6, True), "bhnd", False, True, 37, 23),
    ("official causal", official_flow_causal(1e-6, False), "bhnd", True, False, 29, 29),
    ("paper equations", paper_flow, "bhnd", False, True, 31, 45),
    ("[B, N, H, D] with matmul", bnhd_flow, "bnhd", False, True, 27, 19),
    ("reciprocals as products", reciprocal_flow, "bhnd", False, True, 33, 21),
    ("causal, own cumsum and arange", causal_flow, "bhnd", True, True, 35, 35),
    ("sigmoid before the head split", merged_heads_flow, "merged", False, True, 29, 17),
    ("a mean times D", mean_flow, "bhnd", False, False, 21, 13),
    ("stable softmax by amax", stable_softmax_flow(True), "bhnd", False, False, 23, 15),
    ("stable softmax by max(...)[0]", stable_softmax_flow(False), "bhnd", False, False, 15, 23),
]


def _flow_sites(report):
    assert not [s for s in report.sites if s.variant != "flow"], report  # nothing claims part of it as linear
    return [s for s in report.sites if s.variant == "flow"]


@pytest.mark.parametrize("name,fn,layout,causal,clamp,n,m", SPELLINGS, ids=[s[0] for s in SPELLINGS])
def test_spelling_rewritten_to_flow_and_exact(name, fn, layout, causal, clamp, n, m):
    q, k, v = _inputs(layout, n, m)
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v)
    flow = _flow_sites(report)
    assert len(flow) == 1 and flow[0].rewritten, report
    assert flow[0].kernel.startswith("rewrite::flow_attention"), flow[0].kernel
    assert ("Causal" in flow[0].spelling) == causal and ("no clamp" in flow[0].spelling) != clamp, flow[0].spelling
    notes = " ".join(flow[0].notes)
    assert "proof: the canonical form of the graph equals" in notes and "eps = 1e-06" in notes, notes
    torch._dynamo.reset()
    got = rewrite.compile(fn)(q, k, v)
    close(got, fn(q.double(), k.double(), v.double()), torch.float32, name)


def _variant(*, eps2=1e-6, drop_eps=False, comp_dim=-1, ratio="n/m", bounds=(-1.0, 1.0), q_map=torch.sigmoid,
             wrong_flow=False, times="m"):
    """The paper spelling with one thing changed (each near-miss below changes one)."""
    def flow(q, k, v, eps=1e-6):
        fq, fk = q_map(q), torch.sigmoid(k)
        n, m = q.shape[-2], k.shape[-2]
        inc = ((fq + eps) * (fk.sum(-2, keepdim=True) + eps)).sum(-1)
        outg = ((fk + eps2) * (fq.sum(-2, keepdim=True) + (0.0 if drop_eps else eps))).sum(-1)
        out_flow = outg.unsqueeze(-1) if not wrong_flow else 1.0 / outg.unsqueeze(-1)
        c_in = ((fq + eps) * ((fk / out_flow).sum(-2, keepdim=True) + eps)).sum(-1)
        c_out = ((fk + eps) * ((fq / inc.unsqueeze(-1)).sum(-2, keepdim=True) + eps)).sum(-1)
        comp = torch.softmax(c_out.clamp(*bounds), dim=comp_dim) * (m if times == "m" else n)
        alloc = torch.sigmoid(c_in * (n / m if ratio == "n/m" else m / n))
        kv = fk.transpose(-2, -1) @ (v * comp.unsqueeze(-1))
        return (fq / inc.unsqueeze(-1)) @ kv * alloc.unsqueeze(-1)
    return flow


NEAR_MISSES = [  # (name, variant, a fragment of the reported reason)
    ("eps differs in one place", _variant(eps2=1e-5), "eps is not one number"),
    ("eps missing in one place", _variant(drop_eps=True), "the outgoing flow O is not what the graph computes"),
    ("competition over the heads", _variant(comp_dim=1), "the competition softmax over the sources"),
    ("allocation with M/N", _variant(ratio="m/n"), "allocation σ(Î · N/M): a constant is 1.4"),
    ("clamp to [-2, 1]", _variant(bounds=(-2.0, 1.0)), "a clamp to [-2.0, 1.0]"),
    ("relu feature map for the queries", _variant(q_map=torch.relu), "queries and keys both enter through a sigmoid"),
    ("conservation with O, not 1/O", _variant(wrong_flow=True), "the conserved incoming flow Î"),
]


@pytest.mark.parametrize("name,fn,why", NEAR_MISSES, ids=[s[0] for s in NEAR_MISSES])
def test_near_miss_refused_with_reason(name, fn, why):
    q, k, v = _inputs("bhnd", 25, 35, seed=1)
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v)
    flow = _flow_sites(report)
    assert len(flow) == 1 and not flow[0].rewritten, report
    assert why in flow[0].reason, flow[0].reason
    torch._dynamo.reset()
    close(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32, name)


def _causal_variant(*, offset=1.0, divide_sink=True, cast=None):
    """The causal spelling with one thing changed: p + offset, Î not divided by p + 1, a cast of I."""
    def flow(q, k, v, eps=1e-6):
        fq, fk = q.sigmoid(), k.sigmoid()
        pos = torch.arange(q.shape[-2], dtype=q.dtype)[:, None] + offset
        inc = ((fq + eps) * (torch.cumsum(fk, dim=-2) + eps)).sum(-1, keepdim=True)
        if cast is not None:
            inc = inc.to(cast).to(q.dtype)
        outg = ((fk + eps) * (torch.cumsum(fq, dim=-2) + eps)).sum(-1, keepdim=True)
        c_in = ((fq + eps) * ((fk * pos / outg).cumsum(-2) + eps)).sum(-1, keepdim=True)
        c_in = c_in / pos if divide_sink else c_in
        c_out = ((fk + eps) * ((fq * pos / inc).cumsum(-2) + eps)).sum(-1, keepdim=True) / pos
        e = c_out.exp()
        kv = torch.cumsum(fk.unsqueeze(-1) * (v * (e / e.cumsum(-2) * pos)).unsqueeze(-2), dim=-3)
        return (fq.unsqueeze(-1) / inc.unsqueeze(-1) * kv).sum(-2) * torch.sigmoid(c_in)
    return flow


def _masked_competition(q, k, v, eps=1e-6):
    """A where() inside the competition: an op the lifter does not model, reported as such."""
    fq, fk = torch.sigmoid(q), torch.sigmoid(k)
    inc = torch.einsum("bhnd,bhd->bhn", fq + eps, fk.sum(2) + eps)
    outg = torch.einsum("bhmd,bhd->bhm", fk + eps, fq.sum(2) + eps)
    c_in = torch.einsum("bhnd,bhd->bhn", fq + eps, (fk / outg[..., None]).sum(2) + eps)
    c_out = torch.einsum("bhmd,bhd->bhm", fk + eps, (fq / inc[..., None]).sum(2) + eps)
    comp = torch.softmax(torch.where(c_out > 3.0, 0.0, c_out), dim=-1) * k.shape[2]
    kv = torch.einsum("bhmd,bhmf->bhdf", fk, v * comp[..., None])
    out = torch.einsum("bhnd,bhdf->bhnf", fq / inc[..., None], kv)
    return out * torch.sigmoid(c_in * q.shape[2] / k.shape[2])[..., None]


def _written_out(clamped: bool, cancel_v: bool = False):
    """exp/Σexp by hand for the competition (clamped or not); optionally out·v/v (v may be 0)."""
    def flow(q, k, v, eps=1e-6):
        fq, fk = torch.sigmoid(q), torch.sigmoid(k)
        inc = torch.einsum("bhnd,bhd->bhn", fq + eps, fk.sum(2) + eps)
        outg = torch.einsum("bhmd,bhd->bhm", fk + eps, fq.sum(2) + eps)
        c_in = torch.einsum("bhnd,bhd->bhn", fq + eps, (fk / outg[..., None]).sum(2) + eps)
        c_out = torch.einsum("bhmd,bhd->bhm", fk + eps, (fq / inc[..., None]).sum(2) + eps)
        ex = torch.exp(c_out.clamp(-1.0, 1.0) if clamped else c_out)
        vh = v * (ex / ex.sum(-1, keepdim=True) * k.shape[2])[..., None]
        vh = vh * v / v if cancel_v else vh
        out = torch.einsum("bhnd,bhdf->bhnf", fq / inc[..., None], torch.einsum("bhmd,bhmf->bhdf", fk, vh))
        return out * torch.sigmoid(c_in * (q.shape[2] / k.shape[2]))[..., None]
    return flow


MORE_NEAR_MISSES = [  # (name, fn, N, M, reason fragment)
    ("exp/Σexp on an unclamped Ô", _written_out(False), 25, 35, "eager overflows to inf/NaN there"),
    ("v·v⁻¹ (v may be 0)", _written_out(True, cancel_v=True), 25, 35, "may be 0 or ∞ cancels against its reciprocal"),
    ("causal: p + 2 for p + 1", _causal_variant(offset=2.0), 27, 27,
     "the conserved incoming flow Î (Σ over sources of σK/O): a constant is 2 where Flow-Attention has 1"),
    ("causal: Î not divided by p + 1", _causal_variant(divide_sink=False), 27, 27, "the conserved incoming flow Î"),
    ("causal: I rounded through float16", _causal_variant(cast=torch.float16), 27, 27, "a narrowing cast"),
    ("competition × N for × M", _variant(times="n"), 25, 35,
     "the competition softmax over the sources (m) · M: a constant is 25 where Flow-Attention has 35"),
    ("a where() in the competition", _masked_competition, 25, 35,
     "on values of the flow, an op the lifter does not model"),
]


@pytest.mark.parametrize("name,fn,n,m,why", MORE_NEAR_MISSES, ids=[s[0] for s in MORE_NEAR_MISSES])
def test_more_near_misses_refused_with_reason(name, fn, n, m, why):
    q, k, v = _inputs("bhnd", n, m, seed=2)
    torch._dynamo.reset()
    flow = _flow_sites(rewrite.inspect(fn, q, k, v))
    assert len(flow) == 1 and not flow[0].rewritten and why in flow[0].reason, flow
    torch._dynamo.reset()
    close(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32, name)


@pytest.mark.parametrize("fn", [_variant(), _causal_variant(), _written_out(True)], ids=["base", "causal", "clamped"])
def test_the_unchanged_variants_are_flow(fn):
    """The near-misses' base spellings, unchanged, are rewritten: each refusal is due to its one change."""
    q, k, v = _inputs("bhnd", 27, 27, seed=1)
    torch._dynamo.reset()
    flow = _flow_sites(rewrite.inspect(fn, q, k, v))
    assert len(flow) == 1 and flow[0].rewritten, flow
    torch._dynamo.reset()
    close(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32, "base")


class FlowLayer(nn.Module):
    """A Flowformer-style layer: q/k/v projections to [B, L, H, D], the flow, the output projection."""

    def __init__(self, d_model=32, heads=4):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x):
        b, L, d = x.shape
        q, k, v = self.qkv(x).view(b, L, 3, self.heads, d // self.heads).unbind(2)
        return self.proj(bnhd_flow(q, k, v).reshape(b, L, d)) + x


def test_stacked_layers_are_one_site_each():
    """Layer i+1's q, k, v come from layer i's output through projections (an op the lifter does not
    model, so a leaf): every layer is its own flow site, none claimed as linear."""
    torch.manual_seed(4)
    model = nn.Sequential(*[FlowLayer() for _ in range(3)])
    x = torch.randn(2, 33, 32)
    torch._dynamo.reset()
    flow = _flow_sites(rewrite.inspect(model, x))
    assert len(flow) == 3 and all(s.rewritten for s in flow), flow
    torch._dynamo.reset()
    close(rewrite.compile(model)(x), copy.deepcopy(model).double()(x.double()), torch.float32, "stacked")


def test_module_forward_and_gradients_against_float64():
    torch.manual_seed(3)
    model = FlowLayer()
    ref = copy.deepcopy(model).double()
    x = torch.randn(2, 41, 32)
    torch._dynamo.reset()
    report = rewrite.inspect(model, x)
    flow = _flow_sites(report)
    assert len(flow) == 1 and flow[0].rewritten, report
    torch._dynamo.reset()
    fast = rewrite.compile(model)
    xg, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    out, want = fast(xg), ref(xr)
    close(out, want, torch.float32, "forward")
    do = torch.randn_like(want)
    out.backward(do.float())
    want.backward(do)
    close(xg.grad, xr.grad, torch.float32, "dx")
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        close(p.grad, p_ref.grad, torch.float32, name)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(b=st.integers(1, 2), h=st.integers(1, 3), n=st.integers(1, 30).map(lambda x: 2 * x + 1),
       m=st.integers(1, 30).map(lambda x: 2 * x + 1), d=st.sampled_from([2, 8, 12]), f=st.sampled_from([2, 5, 16]),
       layout=st.sampled_from(["bhnd", "bnhd"]), seed=st.integers(0, 2**16))
def test_sizes_and_layouts(b, h, n, m, d, f, layout, seed):
    """Size-1 batch and head axes, odd N ≠ M, both layouts: rewritten and exact (non-causal)."""
    g = torch.Generator().manual_seed(seed)
    shape = (lambda L, x: (b, L, h, x)) if layout == "bnhd" else (lambda L, x: (b, h, L, x))
    q, k = (torch.randn(shape(L, d), generator=g) * 2 for L in (n, m))
    v = torch.randn(shape(m, f), generator=g)
    fn = bnhd_flow if layout == "bnhd" else paper_flow
    torch._dynamo.reset()
    flow = _flow_sites(rewrite.inspect(fn, q, k, v))
    assert len(flow) == 1 and flow[0].rewritten, flow
    torch._dynamo.reset()
    close(rewrite.compile(fn)(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32, "sizes")


@pytest.mark.parametrize("d,f", [(1, 5), (8, 1)])
def test_size_one_features_refused_with_reason(d, f):
    """A size-1 feature axis names no atom, so q, k, v's roles cannot be read: refused, not guessed."""
    q, k, v = torch.randn(1, 2, 5, d), torch.randn(1, 2, 7, d), torch.randn(1, 2, 7, f)
    torch._dynamo.reset()
    flow = _flow_sites(rewrite.inspect(paper_flow, q, k, v))
    assert len(flow) == 1 and not flow[0].rewritten and "axes of the two sigmoid inputs" in flow[0].reason, flow


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("fn,layout,n,m", [(bnhd_flow, "bnhd", 27, 19), (causal_flow, "bhnd", 35, 35)],
                         ids=["bnhd", "causal"])
def test_triton_backend_runs_other_spellings(fn, layout, n, m):
    q, k, v = (t.to("cuda" if torch.cuda.is_available() else "cpu") for t in _inputs(layout, n, m))
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v, backend="triton")
    assert [s.kernel for s in report.sites] == ["rewrite::flow_attention[triton]"], report
    torch._dynamo.reset()
    close(rewrite.compile(fn, backend="triton")(q, k, v), fn(q.double(), k.double(), v.double()), torch.float32)


def test_sigmoid_gated_softmax_attention_stays_softmax():
    """Sigmoid feature maps and a sigmoid gate around softmax attention: no allocation of a flow, so the
    softmax recogniser keeps it (rewritten as dense attention), and no flow site is reported."""
    def gated(q, k, v, g):
        s = torch.sigmoid(q) @ torch.sigmoid(k).transpose(-1, -2) / 4
        a = torch.softmax(s, -1) @ v
        return a * torch.sigmoid((g * a).sum(-1, keepdim=True) + g.sum(-2, keepdim=True).mean())

    q, k, v, g = (torch.randn(2, 3, 33, 16) for _ in range(4))
    torch._dynamo.reset()
    report = rewrite.inspect(gated, q, k, v, g)
    assert [(s.variant, s.rewritten) for s in report.sites] == [("dense", True)], report
