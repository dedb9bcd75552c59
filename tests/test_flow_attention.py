"""Flow-Attention: recognition of the official Flowformer forward, the kernels (torch, Triton under
TRITON_INTERPRET=1 on a CPU) against the official code in float64."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.codegen.linear_ops import flow_reference, flow_torch
from rewrite.patterns.flow_attention import official_flow, official_flow_causal

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))


close = close_relative
# launch configurations (non-causal keys: block, warps, target, stages, atomic; causal: chunk, bft, warps, stages);
# target 8 splits each (bh) row in several segments even at the small sizes of the CPU interpreter
CONFIGS = [{}, {"block": 64, "warps": 4, "target": 8, "atomic": False, "chunk": 32, "bft": 16},
           {"block": 128, "warps": 8, "target": 2112, "stages": 2, "chunk": 128, "bft": 64}]


class Flowformer(nn.Module):
    """A Flowformer block as thuml/Flowformer writes it: projections, Flow_Attention, out projection."""

    def __init__(self, d_model=64, n_heads=4, causal=False, eps=1e-6, clamp=True):
        super().__init__()
        self.n_heads = n_heads
        self.query_projection = nn.Linear(d_model, d_model)
        self.key_projection = nn.Linear(d_model, d_model)
        self.value_projection = nn.Linear(d_model, d_model)
        self.out_projection = nn.Linear(d_model, d_model)
        self.flow = (official_flow_causal if causal else official_flow)(eps, clamp)

    def forward(self, x):
        B, L, _ = x.shape
        q = self.query_projection(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        k = self.key_projection(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        v = self.value_projection(x).view(B, L, self.n_heads, -1).transpose(1, 2)
        out = self.flow(q, k, v).transpose(1, 2).reshape(B, L, -1)
        return self.out_projection(out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("clamp", [True, False])
def test_official_module_is_recognised_and_exact(causal, clamp):
    torch.manual_seed(0)
    model = Flowformer(causal=causal, clamp=clamp, eps=1e-5).to(DEVICE).double()
    x = torch.randn(2, 37, 64, device=DEVICE, dtype=torch.float64)
    torch._dynamo.reset()
    report = rewrite.inspect(model, x)
    flow = [s for s in report.sites if s.variant == "flow"]
    assert len(flow) == 1 and flow[0].rewritten, report
    assert "eps = 1e-05" in " ".join(flow[0].notes)
    assert not [s for s in report.sites if s.variant != "flow"], report  # nothing else claimed inside it
    if not causal:
        assert flow[0].pass_count["rewritten"] == 4 and "[pass 4]" in flow[0].rewritten_cascade
    assert flow[0].complexity
    torch._dynamo.reset()
    got = rewrite.compile(model)(x)
    close(got, model(x), torch.float32, f"causal={causal} clamp={clamp}")


def test_changed_spelling_is_not_claimed_as_flow():
    """The clamp moved to [-2, 2] (and no N/M in the allocation): not Flow-Attention, so the flow site is
    reported refused with its reason, nothing else claims it, and the result stays exact."""
    def flow_variant(q, k, v, eps=1e-6):
        q, k = torch.sigmoid(q), torch.sigmoid(k)
        si = 1.0 / torch.einsum("nhld,nhd->nhl", q + eps, k.sum(dim=2) + eps)
        so = 1.0 / torch.einsum("nhld,nhd->nhl", k + eps, q.sum(dim=2) + eps)
        cs = torch.einsum("nhld,nhd->nhl", q + eps, (k * so[:, :, :, None]).sum(dim=2) + eps)
        cr = torch.clamp(torch.einsum("nhld,nhd->nhl", k + eps, (q * si[:, :, :, None]).sum(dim=2) + eps), -2.0, 2.0)
        alloc = torch.sigmoid(cs)
        comp = torch.softmax(cr, dim=-1) * float(k.shape[2])
        kv = torch.einsum("nhld,nhlm->nhdm", k, v * comp[:, :, :, None])
        return torch.einsum("nhld,nhdm->nhlm", q * si[:, :, :, None], kv) * alloc[:, :, :, None]

    q, k, v = (torch.randn(1, 2, 29, 16, device=DEVICE) for _ in range(3))
    torch._dynamo.reset()
    report = rewrite.inspect(flow_variant, q, k, v)
    assert [(s.variant, s.rewritten) for s in report.sites] == [("flow", False)], report
    assert "clamp to [-2.0, 2.0]" in report.sites[0].reason, report.sites[0].reason
    torch._dynamo.reset()
    close(rewrite.compile(flow_variant)(q, k, v), flow_variant(q.double(), k.double(), v.double()), torch.float32)


@settings(max_examples=8, **SETTINGS)
@given(causal=st.booleans(), clamp=st.booleans(), n=st.integers(2, 90).map(lambda x: 2 * x + 1),
       d=st.sampled_from([16, 24, 64, 128]), f=st.sampled_from([16, 32, 64]), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 4.0]), cfg=st.sampled_from(CONFIGS))
def test_kernels_match_official_float64(causal, clamp, n, d, f, seed, scale, cfg):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, n, d, generator=g).to(DEVICE) * scale for _ in range(2))
    v = torch.randn(2, 2, n, f, generator=g).to(DEVICE)
    want = flow_reference(q.double(), k.double(), v.double(), causal, clamp)
    close(flow_torch(q, k, v, causal, clamp), want, torch.float32, "torch fp32")
    close(flow_torch(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, clamp), want, torch.bfloat16, "torch bf16")
    if TRITON_OK:
        from rewrite.codegen.triton_flow import flow_attention_triton

        close(flow_attention_triton(q, k, v, causal, clamp, cfg=cfg), want, torch.float32, "triton fp32")
        got = flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), causal, clamp, cfg=cfg)
        close(got, want, torch.bfloat16, "triton bf16")


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
def test_triton_backend_runs_the_flow_kernel():
    torch.manual_seed(1)
    model = Flowformer(d_model=32, n_heads=2).to(DEVICE)
    x = torch.randn(1, 45, 32, device=DEVICE)
    torch._dynamo.reset()
    report = rewrite.inspect(model, x, backend="triton")
    assert [s.kernel for s in report.sites] == ["rewrite::flow_attention[triton]"], report
    torch._dynamo.reset()
    close(rewrite.compile(model, backend="triton")(x), model.double()(x.double()), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("cfg", [{}, {"atomic": False, "target": 528, "stages": 2}])
def test_gpu_flow_at_size(d, cfg):
    from rewrite.codegen.triton_flow import flow_attention_triton

    q, k, v = (torch.randn(2, 4, 8191, d, device="cuda") for _ in range(3))
    want = flow_reference(q.double(), k.double(), v.double(), False, True)
    close(flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), cfg=cfg), want, torch.bfloat16, "bf16")
    close(flow_attention_triton(q, k, v, cfg=cfg), want, torch.float32, "fp32")


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=10, **SETTINGS)
@given(clamp=st.booleans(), n=st.integers(1, 150).map(lambda x: 2 * x + 1),
       m=st.integers(1, 150).map(lambda x: 2 * x + 1),
       e=st.sampled_from([16, 40, 64, 128]), f=st.sampled_from([16, 24, 64, 128]), seed=st.integers(0, 2**16),
       scale=st.sampled_from([1.0, 4.0]), cfg=st.sampled_from(CONFIGS))
def test_triton_noncausal_queries_and_keys_differ(clamp, n, m, e, f, seed, scale, cfg):
    """N != M, E != F, segments that do not divide the sequence: the 4 passes against float64."""
    from rewrite.codegen.triton_flow import flow_attention_triton

    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(3, n, e, generator=g) * scale).to(DEVICE)
    k = (torch.randn(3, m, e, generator=g) * scale).to(DEVICE)
    v = torch.randn(3, m, f, generator=g).to(DEVICE)
    want = flow_reference(q.double(), k.double(), v.double(), False, clamp)
    close(flow_attention_triton(q, k, v, False, clamp, cfg=cfg), want, torch.float32, "triton fp32")
    close(flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, clamp, cfg=cfg), want,
          torch.bfloat16, "triton bf16")


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("cfg", CONFIGS[:2])
def test_triton_causal_overflow_is_nan_where_eager_is(cfg):
    """Unclamped causal: e^{src} overflows at the rows where k jumps from -30 to +30; eager's comp is
    inf/inf = NaN there and every later row is NaN. The fused kernel: the same NaN rows, the rest exact."""
    from rewrite.codegen.triton_flow import flow_attention_triton

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 77, 16, generator=g) + 30
    k = torch.randn(1, 2, 77, 16, generator=g) - 30
    k[0, 0, 40] += 60
    k[0, 1, 55] += 60
    v = torch.randn(1, 2, 77, 16, generator=g)
    q, k, v = q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)
    want = flow_reference(q.double(), k.double(), v.double(), True, False)
    nan_rows = torch.isnan(want).any(-1)[0]
    assert nan_rows[0, 40:].all() and not nan_rows[0, :40].any() and nan_rows[1, 55:].all()
    assert torch.equal(torch.isnan(want), torch.isnan(flow_reference(q, k, v, True, False)))  # fp32 eager too
    close(flow_attention_triton(q, k, v, True, False, cfg=cfg), want, torch.float32, "fp32")
    close(flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, False, cfg=cfg), want,
          torch.bfloat16, "bf16")


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("clamp", [True, False])
def test_gpu_causal_flow_at_size(d, clamp):
    from rewrite.codegen.triton_flow import flow_attention_triton

    g = torch.Generator(device="cuda").manual_seed(d)
    q, k, v = (torch.randn(1, 2, 4097, d, device="cuda", generator=g) for _ in range(3))
    want = flow_reference(q.double(), k.double(), v.double(), True, clamp)
    close(flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), True, clamp, cfg={}), want,
          torch.bfloat16, "bf16")
    close(flow_attention_triton(q, k, v, True, clamp, cfg={}), want, torch.float32, "fp32")


@pytest.mark.gpu
@pytest.mark.parametrize("clamp", [True, False])
def test_gpu_noncausal_flow_long_unequal(clamp):
    from rewrite.codegen.triton_flow import flow_attention_triton

    g = torch.Generator(device="cuda").manual_seed(7)
    q = torch.randn(2, 3, 20001, 96, device="cuda", generator=g) * 3
    k = torch.randn(2, 3, 9999, 96, device="cuda", generator=g) * 3
    v = torch.randn(2, 3, 9999, 80, device="cuda", generator=g)
    want = flow_reference(q.double(), k.double(), v.double(), False, clamp)
    close(flow_attention_triton(q.bfloat16(), k.bfloat16(), v.bfloat16(), False, clamp, cfg={}), want,
          torch.bfloat16, "bf16")
    close(flow_attention_triton(q, k, v, False, clamp, cfg={}), want, torch.float32, "fp32")
