"""Linear attention: recognition, the reassociation proof, the kernels (torch and Triton, the latter
under TRITON_INTERPRET=1 on a CPU), against eager float64 quadratic references."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite
from rewrite.codegen.linear_ops import linear_reference, linear_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow],
                phases=(Phase.explicit, Phase.reuse, Phase.generate))


close = close_relative


# ---- spellings ------------------------------------------------------------------------------
def quad_elu_norm(q, k, v):  # Katharopoulos, quadratic, normaliser after the product
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = q @ k.transpose(-2, -1)
    return (s @ v) / s.sum(-1, keepdim=True)


def quad_relu_causal_tril(q, k, v):  # causal by a tril multiply, weights normalised before the product
    q, k = F.relu(q), F.relu(k)
    n = q.shape[-2]
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * torch.tril(torch.ones(n, n, device=q.device, dtype=q.dtype))
    a = s / (s.sum(-1, keepdim=True) + 1e-6)
    return torch.einsum("bhnm,bhmd->bhnd", a, v)


def quad_exp_causal_masked_fill(q, k, v):  # φ = exp, causal by masked_fill(…, 0), [B, N, H, D] layout
    q, k = torch.exp(q * 0.25), torch.exp(k * 0.25)
    n = q.shape[1]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = torch.einsum("bnhd,bmhd->bhnm", q, k).masked_fill(~keep, 0.0)
    return torch.einsum("bhnm,bmhd->bnhd", s, v) / s.sum(-1, keepdim=True).transpose(1, 2)


def quad_identity_scaled(q, k, v):  # φ = identity, no normaliser, a scale: exact without sign facts
    return ((q @ k.transpose(-2, -1)) * 0.125) @ v


def quad_softmax_features(q, k, v):  # φ = softmax over the features, causal by where
    q, k = q.softmax(-1), k.softmax(-1)
    n = q.shape[-2]
    keep = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    s = torch.where(keep, q @ k.transpose(-2, -1), 0.0)
    return s @ v


def reassoc_elu(q, k, v):  # already reassociated (non-causal), normaliser as an einsum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
    return torch.einsum("bhnd,bhde->bhne", q, kv) / (z.unsqueeze(-1) + 1e-6)


def merged_heads_bmm(q, k, v):  # [B·H, N, D] with bmm
    b, h, n, d = q.shape
    q, k, v = (F.elu(t).add(1).reshape(b * h, n, d) if i < 2 else t.reshape(b * h, n, -1)
               for i, t in enumerate((q, k, v)))
    s = torch.bmm(q, k.transpose(1, 2))
    return (torch.bmm(s, v) / s.sum(-1, keepdim=True)).reshape(b, h, n, -1)


def cumsum_outer_normalised(q, k, v):  # causal as a cumsum of outer products (Katharopoulos' reference)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
    z = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2))
    return torch.einsum("bhnd,bhnde->bhne", q, kv) / (z.unsqueeze(-1) + 1e-6)


def cumsum_outer_plain(q, k, v):  # the same without normaliser, φ = identity
    kv = torch.einsum("bhnd,bhne->bhnde", k, v).cumsum(2)
    return torch.einsum("bhnd,bhnde->bhne", q, kv)


SPELLINGS = {
    "cumsum_outer_normalised": (cumsum_outer_normalised, True, True, "elu"),
    "cumsum_outer_plain": (cumsum_outer_plain, True, False, "id"),
    "quad_elu_norm": (quad_elu_norm, False, True, "elu"),
    "quad_relu_causal_tril": (quad_relu_causal_tril, True, True, "relu"),
    "quad_exp_causal_masked_fill": (quad_exp_causal_masked_fill, True, True, "exp"),
    "quad_identity_scaled": (quad_identity_scaled, False, False, "id"),
    "quad_softmax_features": (quad_softmax_features, True, False, "softmax"),
    "reassoc_elu": (reassoc_elu, False, True, "elu"),
    "merged_heads_bmm": (merged_heads_bmm, False, True, "elu"),
}


def make(b, h, n, d, f, seed, dtype, layout="bhnd"):
    g = torch.Generator().manual_seed(seed)
    shape = (b, h, n) if layout == "bhnd" else (b, n, h)
    q = torch.randn(*shape, d, generator=g)
    k = torch.randn(*shape, d, generator=g)
    v = torch.randn(*shape, f, generator=g)
    return tuple(t.to(DEVICE, dtype) for t in (q, k, v))


def run(name, backend, dtype, b, h, n, d, f, seed):
    fn, causal, normalized, _ = SPELLINGS[name]
    layout = "bnhd" if name == "quad_exp_causal_masked_fill" else "bhnd"
    q, k, v = make(b, h, n, d, f, seed, dtype, layout)
    torch._dynamo.reset()
    report = rewrite.inspect(fn, q, k, v, backend=backend)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(lin) == 1 and lin[0].rewritten, report
    assert lin[0].mask == ("causal m <= p" if causal else "none"), lin[0].mask
    torch._dynamo.reset()
    got = rewrite.compile(fn, backend=backend)(q, k, v)
    want = fn(q.double(), k.double(), v.double())  # eager, float64, the quadratic form as written
    close(got, want, dtype, f"{name} {backend} {dtype}")
    assert got.dtype == dtype


@settings(max_examples=10, **SETTINGS)
@given(name=st.sampled_from(sorted(SPELLINGS)), n=st.integers(3, 40).map(lambda x: 2 * x + 1),
       d=st.sampled_from([16, 24, 32, 64, 128]), f=st.sampled_from([16, 32, 40]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), seed=st.integers(0, 2**16))
def test_spellings_torch_backend(name, n, d, f, dtype, seed):
    run(name, "torch", dtype, 1, 2, n, d, f, seed)


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=6, **SETTINGS)
@given(name=st.sampled_from(sorted(SPELLINGS)), n=st.integers(10, 70).map(lambda x: 2 * x + 1),
       d=st.sampled_from([16, 32, 64, 128]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_spellings_triton_backend(name, n, d, dtype, seed):
    run(name, "triton", dtype, 1, 2, n, d, 32, seed)


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=8, **SETTINGS)
@given(causal=st.booleans(), normalize=st.booleans(), n=st.integers(1, 100).map(lambda x: 2 * x + 1),
       d=st.sampled_from([16, 24, 64, 128]), f=st.sampled_from([16, 48, 64]), seed=st.integers(0, 2**16),
       cfg_index=st.integers(0, 15))
def test_triton_kernel_matches_quadratic_float64(causal, normalize, n, d, f, seed, cfg_index):
    from rewrite.codegen.triton_linear import candidate_configs, linear_attention_triton

    cands = candidate_configs(d, f, causal)  # every launch configuration the GPU tuner may pick (bf16)
    cfg = cands[cfg_index % len(cands)]
    q, k, v = make(1, 3, n, d, f, seed, torch.float32)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    want = linear_reference(fq.double(), fk.double(), v.double(), causal, normalize)
    close(linear_attention_triton(fq, fk, v, causal, normalize, cfg=cfg), want, torch.float32, "fp32")
    got = linear_attention_triton(fq.bfloat16(), fk.bfloat16(), v.bfloat16(), causal, normalize, cfg=cfg)
    close(got, want, torch.bfloat16, "bf16")
    close(linear_torch(fq, fk, v, causal, normalize), want, torch.float32, "torch path")


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=10, **SETTINGS)
@given(causal=st.booleans(), normalize=st.booleans(), n=st.integers(1, 150).map(lambda x: 2 * x + 1),
       d=st.sampled_from([16, 24, 40, 64, 72, 128]), f=st.sampled_from([16, 24, 64, 128]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), target=st.sampled_from([1, 5, 10**6]),
       chunk=st.sampled_from([64, 128]), eps=st.sampled_from([0.0, 1e-6]), seed=st.integers(0, 2**16))
def test_triton_segments_and_runs(causal, normalize, n, d, f, dtype, target, chunk, eps, seed):
    """Every way the kernels split the sequence: one segment (a walk over many chunks / query blocks per
    program), a few, one block each; several heads (the per-(bh, segment) state indexing)."""
    from rewrite.codegen.triton_linear import linear_attention_triton

    cfg = {"target": target, "out_target": target, "causal_target": target, "chunk": chunk, "out_block": chunk}
    q, k, v = make(2, 3, n, d, f, seed, torch.float32)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    want = linear_reference(fq.double(), fk.double(), v.double(), causal, normalize, eps)
    got = linear_attention_triton(fq.to(dtype), fk.to(dtype), v.to(dtype), causal, normalize, eps, cfg=cfg)
    assert got.dtype == dtype and got.shape == want.shape
    close(got, want, dtype, f"{dtype} target={target} chunk={chunk}")


@pytest.mark.skipif(not TRITON_OK, reason="needs a GPU or TRITON_INTERPRET=1")
@settings(max_examples=6, **SETTINGS)
@given(nseg=st.integers(1, 9), unfilled=st.integers(0, 2), be=st.sampled_from([16, 32, 64]),
       bf=st.sampled_from([16, 64]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_combine_states_prefix_and_total(nseg, unfilled, be, bf, dtype, seed):
    """Segments past ``filled`` hold garbage (NaN here) and must count as 0."""
    from rewrite.codegen.triton_linear import combine_states

    filled = max(0, nseg - unfilled)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(3, nseg, be, bf, generator=g).to(DEVICE)
    z = torch.randn(3, nseg, be, generator=g).to(DEVICE)
    s[:, filled:], z[:, filled:] = float("nan"), float("nan")
    s_ref, z_ref = s.double().nan_to_num(0.0), z.double().nan_to_num(0.0)
    s_total, z_total = combine_states(s.clone(), z.clone(), exclusive=False, dtype=dtype, filled=filled)
    assert s_total.dtype == dtype and z_total.dtype == torch.float32
    close(s_total, s_ref.sum(1), dtype, "total")
    close(z_total, z_ref.sum(1), torch.float32, "z total")
    s_pre, z_pre = combine_states(s.clone(), z.clone(), exclusive=True, filled=filled)
    close(s_pre, s_ref.cumsum(1) - s_ref, torch.float32, "exclusive prefix")
    close(z_pre, z_ref.cumsum(1) - z_ref, torch.float32, "z exclusive prefix")


# ---- near-zero normalisers --------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_zero_normaliser_gives_nan_where_eager_does(backend):
    if backend == "triton" and not TRITON_OK:
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    q, k, v = make(1, 2, 33, 16, 16, 3, torch.float32)
    q[0, 1, 5] = -q[0, 1, 5].abs() - 0.1  # relu(q) = 0 on this row: its row sum is exactly 0 (0/0)
    k[0, 0, :, :] = -k[0, 0, :, :].abs()  # head 0: every key's φ is 0
    for fn in (quad_relu_causal_tril, lambda q, k, v: (lambda s: (s @ v) / s.sum(-1, keepdim=True))(
            F.relu(q) @ F.relu(k).transpose(-2, -1))):
        want = fn(q.double(), k.double(), v.double())
        torch._dynamo.reset()
        got = rewrite.compile(fn, backend=backend)(q, k, v)
        close(got, want, torch.float32, f"{backend}")
    want = quad_relu_causal_tril(q, k, v)  # eps = 1e-6: no NaN at all, in either
    assert not torch.isnan(want).any()


# ---- left alone, with the reason ----------------------------------------------------------------
def relu_between(q, k, v):
    return torch.relu(q @ k.transpose(-2, -1)) @ v


def squared_between(q, k, v):
    return (q @ k.transpose(-2, -1)) ** 2 @ v


def identity_normalised(q, k, v):
    s = q @ k.transpose(-2, -1)
    return (s @ v) / s.sum(-1, keepdim=True)


def window_mask(q, k, v):
    n = q.shape[-2]
    i = torch.arange(n, device=q.device)
    return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * ((i[:, None] - i[None, :]).abs() <= 3)) @ v


def runtime_mask(q, k, v, keep):
    return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * keep) @ v


def anti_causal(q, k, v):
    n = q.shape[-2]
    upper = torch.triu(torch.ones(n, n, device=q.device, dtype=q.dtype))
    return ((F.relu(q) @ F.relu(k).transpose(-2, -1)) * upper) @ v


@pytest.mark.parametrize("fn,reason", [
    (relu_between, "nonlinearity (relu)"), (squared_between, "nonlinearity"),
    (identity_normalised, "not provably non-negative"), (window_mask, "not causal or dense"),
    (runtime_mask, "run-time"), (anti_causal, "not causal or dense")])
def test_unsafe_shapes_are_left_alone(fn, reason):
    q, k, v = make(1, 2, 21, 16, 16, 1, torch.float32)
    args = (q, k, v) if fn is not runtime_mask else (q, k, v, torch.rand(21, 21, device=DEVICE) > 0.5)
    torch._dynamo.reset()
    report = rewrite.inspect(fn, *args)
    lin = [s for s in report.sites if s.variant == "linear"]
    assert len(lin) == 1 and not lin[0].rewritten and reason in lin[0].reason, report
    assert "left alone" in str(report)
    torch._dynamo.reset()
    close(rewrite.compile(fn)(*args), fn(*(a.double() if a.is_floating_point() else a for a in args)),
          torch.float32, fn.__name__)


def test_plain_mlp_and_softmax_attention_are_not_claimed():
    x = torch.randn(2, 17, 32, device=DEVICE)
    w1, w2 = torch.randn(32, 64, device=DEVICE), torch.randn(64, 32, device=DEVICE)

    def mlp(x, w1, w2):
        return (x @ w1) @ w2

    torch._dynamo.reset()
    assert not [s for s in rewrite.inspect(mlp, x, w1, w2).sites if s.variant == "linear"]
    q, k, v = make(1, 2, 17, 16, 16, 0, torch.float32)

    def softmax_attn(q, k, v):
        return (q @ k.transpose(-2, -1) / 4.0).softmax(-1) @ v

    torch._dynamo.reset()
    sites = rewrite.inspect(softmax_attn, q, k, v).sites
    assert [s.variant for s in sites] == ["dense"], sites


def test_report_shows_both_cascades_passes_and_complexity():
    q, k, v = make(1, 2, 19, 16, 16, 0, torch.float32)
    torch._dynamo.reset()
    report = rewrite.inspect(quad_relu_causal_tril, q, k, v)
    (s,) = report.sites
    assert s.complexity == "O(N²·D) → O(N·D²)"
    assert "QK[b,h,m,p]" in s.cascade and "(scan m)" in s.rewritten_cascade
    assert s.pass_count["rewritten"] == 1 and s.pass_count["original"] >= 1
    text = str(report)
    assert "O(N²·D) → O(N·D²)" in text and "running Σ φK·Vᵀ" in text and "proof:" in text


def test_gradients_match_eager():
    q, k, v = (t.requires_grad_() for t in make(1, 2, 23, 16, 16, 5, torch.float64))
    torch._dynamo.reset()
    out = rewrite.compile(quad_relu_causal_tril, backend="torch")(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(quad_relu_causal_tril(q, k, v), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_kernels_at_size(d, causal):
    from rewrite.codegen.triton_linear import linear_attention_triton

    q, k, v = make(2, 4, 4097, d, d, 0, torch.bfloat16)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    want = linear_torch(fq.double(), fk.double(), v.double(), causal, True)
    close(linear_attention_triton(fq, fk, v, causal, True), want, torch.bfloat16, "bf16 gpu")
    close(linear_attention_triton(fq.float(), fk.float(), v.float(), causal, True), want, torch.float32, "fp32 gpu")


@pytest.mark.parametrize("causal", [False, True])
def test_custom_op_registration_opcheck(causal):
    """Fake kernel, schema and autograd registration agree with the real kernel (torch.library.opcheck)."""
    q, k, v = make(1, 1, 7, 16, 16, 2, torch.float64)
    fq, fk = (F.elu(t) + 1 for t in (q, k))
    args = (fq.requires_grad_(), fk.requires_grad_(), v.requires_grad_(), causal, True, 1e-6, "torch", torch.float64)
    torch.library.opcheck(torch.ops.rewrite.linear_attention.default, args)
    flow_args = (q.detach().requires_grad_(), k.detach().requires_grad_(), v.detach().requires_grad_(), causal, True,
                 1e-6, "torch", torch.float64)
    torch.library.opcheck(torch.ops.rewrite.flow_attention.default, flow_args)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_every_candidate_config(d, causal):
    """The tuner may pick any candidate on the GPU: each one against float64 (bf16 normalised and not,
    fp32 normalised with the default configuration, the one fp32 inputs get),
    at a size with many segments and runs. A configuration that does not fit the GPU's shared memory raises
    OutOfResources, which the tuner skips too; at least the default must run."""
    from triton.runtime.errors import OutOfResources

    from rewrite.codegen.triton_linear import candidate_configs, linear_attention_triton

    q, k, v = make(2, 4, 4097, d, d, 1, torch.float32)
    fq, fk = F.elu(q) + 1, F.elu(k) + 1
    skipped = []
    for normalize in (True, False):
        want = linear_torch(fq.double(), fk.double(), v.double(), causal, normalize)
        for i, cfg in enumerate(candidate_configs(d, d, causal)):
            for dtype in (torch.bfloat16, torch.float32) if normalize and i == 0 else (torch.bfloat16,):
                try:
                    got = linear_attention_triton(fq.to(dtype), fk.to(dtype), v.to(dtype), causal, normalize,
                                                  cfg=cfg)
                except OutOfResources:
                    assert i > 0, f"the default configuration does not fit: {dtype} {cfg}"
                    skipped.append((dtype, cfg))
                    continue
                close(got, want, dtype, f"{dtype} normalize={normalize} {cfg}")
    print("out of resources (skipped by the tuner too):", skipped)
