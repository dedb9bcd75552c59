"""Linear attention in spellings the recognisers reach only through the normal form (patterns/linear_normal.py):
einsums of three or four operands, a multiplication by the reciprocal of the normaliser (as an operator, a method,
a power, an einsum operand), the causal prefix sum of outer products contracted with the queries by einsum or by a
row-vector matmul, the normaliser written as an einsum, a product-then-sum or a matmul. Each is asserted rewritten
(the report's kernel and mask) and equal to eager float64 on random inputs with odd N (the near-misses are in
test_linear_normal_form_refused.py). The spellings are written the way model code writes them, letters and
layouts varied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import close_relative

import rewrite

B, H, D, E = 2, 3, 8, 6


def phi(x):
    return F.elu(x) + 1


def qkv(n, layout="bhnd", seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, n) if layout == "bhnd" else (B, n, H)
    return (torch.randn(*shape, D, generator=g).to(dtype), torch.randn(*shape, D, generator=g).to(dtype),
            torch.randn(*shape, E, generator=g).to(dtype))


# ---- non-causal, reassociated, normalised by a reciprocal --------------------------------------------------
def three_operand_recip(q, k, v):  # the spelling
    q, k = phi(q), phi(k)
    kv = torch.einsum("bhnd,bhne->bhde", k, v)
    z = 1 / torch.einsum("bhnd,bhd->bhn", q, k.sum(2))
    return torch.einsum("bhnd,bhde,bhn->bhne", q, kv, z)


def three_operand_bnhd_reordered(q, k, v):  # [B, N, H, D], other letters, z first, eps inside the reciprocal
    q, k = F.relu(q) + 1e-3, F.relu(k) + 1e-3
    state = torch.einsum("bshi,bshj->bhij", k, v)
    z = 1.0 / (torch.einsum("bthi,bhi->bth", q, k.sum(dim=1)) + 1e-6)
    return torch.einsum("bth,bhij,bthi->bthj", z, state, q)


def four_operand_pow(q, k, v):  # q, k, v and the normaliser as ** -1 in one einsum
    q, k = torch.exp(q * 0.3), torch.exp(k * 0.3)
    den = torch.einsum("xynd,xyd->xyn", q, k.sum(-2)) ** -1
    return torch.einsum("xynd,xymd,xyme,xyn->xyne", q, k, v, den)


def three_operand_normalised_by_key_einsum(q, k, v):  # ÷ Σ_m φq·φk written as one einsum over m and d
    q, k = phi(q), phi(k)
    return torch.einsum("bhnd,bhmd,bhme->bhne", q, k, v) / torch.einsum("bhnd,bhmd->bhn", q, k)[..., None]


def three_operand_plain(q, k, v):  # no normaliser: q, k, v in one einsum, φ = identity, scaled
    return torch.einsum("bhid,bhjd,bhje->bhie", q * D ** -0.5, k, v)


def reassoc_times_reciprocal(q, k, v):  # out * (1/den) after the product
    q, k = phi(q), phi(k)
    kv = k.transpose(-2, -1) @ v
    den = q @ k.sum(-2, keepdim=True).transpose(-2, -1)
    return (q @ kv) * (1.0 / (den + 1e-6))


def reassoc_reciprocal_method_inplace(q, k, v):  # out.mul_(den.reciprocal()), den by product-then-sum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    kv = torch.einsum("bnhd,bnhe->bhde", k, v)
    out = torch.einsum("bnhd,bhde->bnhe", q, kv)
    den = (q * k.sum(1, keepdim=True)).sum(-1, keepdim=True)
    out.mul_(den.reciprocal())
    return out


def quadratic_times_reciprocal(q, k, v):  # weights normalised by a multiplication with 1/Σ
    s = F.relu(q) @ F.relu(k).transpose(-1, -2)
    return (s * (1 / (s.sum(-1, keepdim=True) + 1e-6))) @ v


# ---- causal: prefix sums of outer products -------------------------------------------------------------------
def cumsum_broadcast_einsum(q, k, v):  # the spelling, no normaliser
    q, k = phi(q), phi(k)
    s = torch.cumsum(k[..., None] * v[..., None, :], dim=2)
    return torch.einsum("bhnd,bhnde->bhne", q, s)


def cumsum_rowvector_matmul(q, k, v):  # (q.unsqueeze(-2) @ S).squeeze(-2), normaliser a row-vector matmul too
    q, k = phi(q), phi(k)
    s = (k.unsqueeze(-1) * v.unsqueeze(-2)).cumsum(-3)
    num = (q.unsqueeze(-2) @ s).squeeze(-2)
    den = (q.unsqueeze(-2) @ k.cumsum(-2).unsqueeze(-1)).squeeze(-1)
    return num / (den + 1e-6)


def cumsum_rowvector_select(q, k, v):  # the row-vector product read back with [..., 0, :], eps outside
    q, k = phi(q), phi(k)
    s = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=2)
    num = torch.matmul(q.unsqueeze(3), s)[:, :, :, 0, :]
    den = torch.matmul(q.unsqueeze(3), k.cumsum(2).unsqueeze(4)).squeeze()
    return num / den.unsqueeze(-1)


def cumsum_bnhd_letters(q, k, v):  # [B, N, H, D], own letters for the normaliser, in-place /=, no eps
    q, k = F.relu(q) + 0.01, F.relu(k) + 0.01
    state = torch.cumsum(torch.einsum("blhi,blhj->blhij", k, v), 1)
    out = torch.einsum("blhi,blhij->blhj", q, state)
    den = torch.einsum("xyzw,xyzw->xyz", q, torch.cumsum(k, 1))
    out /= den[..., None]
    return out


def cumsum_times_reciprocal(q, k, v):  # × 1/(den + eps), den as product-then-sum
    q, k = torch.sigmoid(q), torch.sigmoid(k)
    s = torch.cumsum(k[:, :, :, :, None] * v[:, :, :, None, :], dim=-3)
    num = torch.einsum("bhtd,bhtde->bhte", q, s)
    den = (q * k.cumsum(dim=2)).sum(dim=-1)
    return num * (1.0 / (den.unsqueeze(-1) + 1e-5))


def cumsum_recip_operand(q, k, v):  # the normaliser as an einsum operand of the causal product
    q, k = phi(q), phi(k)
    s = torch.cumsum(k.unsqueeze(4) * v.unsqueeze(3), dim=2)
    z = torch.einsum("bhnd,bhnd->bhn", q, k.cumsum(2)).reciprocal()
    return torch.einsum("bhnd,bhnde,bhn->bhne", q, s, z)


def four_operand_causal_mask(q, k, v):  # q, k, a tril mask and v in one einsum: the quadratic causal form
    n = q.shape[2]
    keep = torch.tril(torch.ones(n, n, dtype=q.dtype, device=q.device))
    return torch.einsum("bhid,bhjd,ij,bhjf->bhif", F.relu(q), F.relu(k), keep, v)


def chunked_reciprocal(q, k, v, C=4):  # chunked causal; the states as product-then-sum; × 1/(den + eps)
    B_, H_, N, _ = q.shape
    q, k = F.elu(q) + 1, F.elu(k) + 1
    q, k, v = (t.reshape(B_, H_, N // C, C, -1) for t in (q, k, v))
    kv = (k[..., :, None] * v[..., None, :]).sum(3)
    kv = kv.cumsum(2) - kv
    z = k.sum(3).cumsum(2) - k.sum(3)  # the key sums computed twice
    s = (q @ k.transpose(-1, -2)) * torch.tril(torch.ones(C, C, dtype=q.dtype, device=q.device))
    num = q @ kv + s @ v
    den = torch.einsum("bhncd,bhnd->bhnc", q, z).unsqueeze(-1) + s.sum(-1, keepdim=True)
    return (num * (1.0 / (den + 1e-6))).reshape(B_, H_, N, -1)


def recomputed_feature_maps(q, k, v):  # φ written out again at each use: the same values
    kv = torch.einsum("bhnd,bhne->bhde", F.elu(k) + 1, v)
    den = torch.einsum("bhnd,bhd->bhn", F.elu(q) + 1, (F.elu(k) + 1).sum(2))
    return torch.einsum("bhnd,bhde->bhne", F.elu(q) + 1, kv) / den[..., None]


def tril_of_the_scores(q, k, v):  # causal by .tril() on the scores themselves
    s = (F.relu(q) @ F.relu(k).transpose(-1, -2)).tril()
    return s @ v / (s.sum(-1, keepdim=True) + 1e-6)


def ellipsis_cumsum(q, k, v):  # einsums with ellipses, the normaliser unsqueezed after its einsum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = torch.einsum("...nd,...ne->...nde", k, v).cumsum(-3)
    den = torch.einsum("...nd,...nd->...n", q, k.cumsum(-2))
    return torch.einsum("...nd,...nde->...ne", q, s) / den.unsqueeze(-1)


def query_product_as_mul_sum(q, k, v):  # the query product as a broadcast multiply and a sum
    q, k = F.elu(q) + 1, F.elu(k) + 1
    s = (k[..., :, None] * v[..., None, :]).cumsum(2)
    return (q[..., :, None] * s).sum(-2)


SPELLINGS = {  # name: (fn, layout, causal, normalised)
    "tril_of_the_scores": (tril_of_the_scores, "bhnd", True, True),
    "ellipsis_cumsum": (ellipsis_cumsum, "bhnd", True, True),
    "query_product_as_mul_sum": (query_product_as_mul_sum, "bhnd", True, False),
    "recomputed_feature_maps": (recomputed_feature_maps, "bhnd", False, True),
    "four_operand_causal_mask": (four_operand_causal_mask, "bhnd", True, False),
    "three_operand_recip": (three_operand_recip, "bhnd", False, True),
    "three_operand_bnhd_reordered": (three_operand_bnhd_reordered, "bnhd", False, True),
    "four_operand_pow": (four_operand_pow, "bhnd", False, True),
    "three_operand_plain": (three_operand_plain, "bhnd", False, False),
    "three_operand_normalised_by_key_einsum": (three_operand_normalised_by_key_einsum, "bhnd", False, True),
    "reassoc_times_reciprocal": (reassoc_times_reciprocal, "bhnd", False, True),
    "reassoc_reciprocal_method_inplace": (reassoc_reciprocal_method_inplace, "bnhd", False, True),
    "quadratic_times_reciprocal": (quadratic_times_reciprocal, "bhnd", False, True),
    "cumsum_broadcast_einsum": (cumsum_broadcast_einsum, "bhnd", True, False),
    "cumsum_rowvector_matmul": (cumsum_rowvector_matmul, "bhnd", True, True),
    "cumsum_bnhd_letters": (cumsum_bnhd_letters, "bnhd", True, True),
    "cumsum_rowvector_select": (cumsum_rowvector_select, "bhnd", True, True),
    "cumsum_times_reciprocal": (cumsum_times_reciprocal, "bhnd", True, True),
    "cumsum_recip_operand": (cumsum_recip_operand, "bhnd", True, True),
    "chunked_reciprocal": (chunked_reciprocal, "bhnd", True, True),
}


def linear_sites(fn, *args):
    torch._dynamo.reset()
    report = rewrite.inspect(fn, *args, backend="torch")
    return report, [s for s in report.sites if s.variant == "linear"]


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_spelling_is_rewritten_and_matches_float64(name):
    fn, layout, causal, normalised = SPELLINGS[name]
    for n, seed in ((12, 0), (28, 1)) if name == "chunked_reciprocal" else ((13, 0), (31, 1)):
        q, k, v = qkv(n, layout, seed)
        report, lin = linear_sites(fn, q, k, v)
        assert len(lin) == 1 and lin[0].rewritten, report
        assert lin[0].kernel == "rewrite::linear_attention[torch]", lin[0].kernel
        assert lin[0].mask == ("causal m <= p" if causal else "none"), lin[0].mask
        assert any(note.startswith("normalised (eps") for note in lin[0].notes) == normalised, lin[0].notes
        torch._dynamo.reset()
        got = rewrite.compile(fn, backend="torch")(q, k, v)
        want = fn(q.double(), k.double(), v.double())
        close_relative(got, want, torch.float32, name)


def test_the_rewritten_graph_calls_the_op_and_replaces_the_whole_einsum():
    q, k, v = qkv(17)
    report, (site,) = linear_sites(three_operand_recip, q, k, v)
    assert "read as binary products" in site.spelling and "÷ φQ·ΣφK" in site.spelling, site.spelling
    from rewrite.capture import to_aten
    from rewrite.passes.pipeline import rewrite_graph

    gm, reports = rewrite_graph(to_aten(three_operand_recip, (q, k, v)), "torch")
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert reports[0].rewritten and torch.ops.rewrite.linear_attention.default in targets, gm.graph
    assert torch.ops.aten.einsum.default not in targets and torch.ops.aten.reciprocal.default not in targets, gm.graph
    close_relative(gm(q, k, v), three_operand_recip(q.double(), k.double(), v.double()), torch.float32, "graph")


@pytest.mark.parametrize("name", ["three_operand_recip", "cumsum_rowvector_matmul", "cumsum_bnhd_letters"])
def test_gradients_through_compile_match_float64(name):
    fn, layout, _, _ = SPELLINGS[name]
    q, k, v = (t.double().requires_grad_() for t in qkv(15, layout, 3))
    torch._dynamo.reset()
    out = rewrite.compile(fn, backend="torch")(q, k, v)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(fn(q, k, v), (q, k, v), g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# ---- drawn spellings: letters, operand orders, layouts, state layouts, reciprocal spellings, eps --------------
RECIPROCALS = {"1/x": lambda x: 1 / x, "reciprocal": torch.reciprocal, "pow": lambda x: x ** -1}


def drawn_spelling(draw, causal: bool):
    b, h, n, m, d, e = draw(st.permutations(list("abhijnmpdefxyz")))[:6]
    layout = draw(st.sampled_from(["bhnd", "bnhd"]))

    def sub(seq, feat):
        return "".join({"b": b, "h": h, "n": seq, "d": feat}[c] for c in layout)

    def rows(seq):
        return "".join({"b": b, "h": h, "n": seq}[c] for c in layout.replace("d", ""))

    seq_dim = layout.index("n")
    recip = draw(st.sampled_from(sorted(RECIPROCALS)))
    eps = draw(st.sampled_from([0.0, 1e-6]))
    order = draw(st.permutations([0, 1, 2]))
    if causal:
        state = "".join(draw(st.permutations([b, h, n, d, e])))
        state_eq = f"{sub(n, d)},{sub(n, e)}->{state}"
        den_eq = f"{sub(n, d)},{sub(n, d)}->{rows(n)}"
    else:
        state = "".join(draw(st.permutations([b, h, d, e])))
        state_eq = f"{sub(m, d)},{sub(m, e)}->{state}"
        den_eq = f"{sub(n, d)},{''.join(c for c in (b, h, d) if c in sub(n, d))}->{rows(n)}"
    subs = [sub(n, d), state, rows(n)]
    out_eq = ",".join(subs[i] for i in order) + "->" + sub(n, e)

    def fn(q, k, v):
        q, k = F.elu(q) + 1, F.elu(k) + 1
        s = torch.einsum(state_eq, k, v)
        if causal:
            s = s.cumsum(state.index(n))
            ks = k.cumsum(seq_dim)
        else:
            ks = k.sum(seq_dim)
        z = RECIPROCALS[recip](torch.einsum(den_eq, q, ks) + eps)
        ops = [q, s, z]
        return torch.einsum(out_eq, *(ops[i] for i in order))

    return fn, layout, f"{state_eq} | {den_eq} | {out_eq} | {recip} eps={eps}"


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(data=st.data(), causal=st.booleans(), n=st.integers(2, 12).map(lambda x: 2 * x + 1),
       seed=st.integers(0, 2**16))
def test_drawn_three_operand_einsums_are_rewritten(data, causal, n, seed):
    fn, layout, what = drawn_spelling(data.draw, causal)
    q, k, v = qkv(n, layout, seed)
    report, lin = linear_sites(fn, q, k, v)
    assert len(lin) == 1 and lin[0].rewritten, (what, report)
    assert lin[0].mask == ("causal m <= p" if causal else "none"), what
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn, backend="torch")(q, k, v), fn(q.double(), k.double(), v.double()),
                   torch.float32, what)


# ---- one canonical cascade: every form reduces to it, and the site's facts must agree ------------------------
@pytest.mark.parametrize("name,masked", [("quadratic_times_reciprocal", False), ("three_operand_recip", False),
                                         ("four_operand_causal_mask", True), ("cumsum_rowvector_matmul", True),
                                         ("chunked_reciprocal", True)])
def test_every_form_reduces_to_the_canonical_cascade_and_the_site_must_agree(name, masked):
    from rewrite.capture import to_aten
    from rewrite.ir.cascade import Cascade
    from rewrite.passes.linearize import NotLinearizable, plan_linear, reduce_to_normal_form
    from rewrite.patterns.linear_find import find_linear_sites

    fn, layout, causal, normalised = SPELLINGS[name]
    q, k, v = qkv(12, layout, 2)
    (site,) = find_linear_sites(to_aten(fn, (q, k, v)).graph)
    form = reduce_to_normal_form(site.cascade)
    assert (form.normalised, form.masked, form.decayed) == (normalised, masked, False), form
    plan = plan_linear(site, "torch", None)
    assert plan.causal == causal
    assert str(form.cascade(plan.causal)) == str(Cascade.linear_attention(causal=causal, normalize=normalised))
    site.normalize = not site.normalize  # a recogniser that got the normaliser wrong is caught by the proof
    with pytest.raises(NotLinearizable, match="disagree"):
        plan_linear(site, "torch", None)


@pytest.mark.parametrize("name", ["three_operand_bnhd_reordered", "cumsum_rowvector_matmul", "tril_of_the_scores"])
def test_bfloat16_inputs(name):
    fn, layout, causal, _ = SPELLINGS[name]
    q, k, v = qkv(19, layout, 7, torch.bfloat16)
    report, lin = linear_sites(fn, q, k, v)
    assert len(lin) == 1 and lin[0].rewritten, report
    torch._dynamo.reset()
    got = rewrite.compile(fn, backend="torch")(q, k, v)
    assert got.dtype == torch.bfloat16
    close_relative(got, fn(q.double(), k.double(), v.double()), torch.bfloat16, name)


def retention_einsum(q, k, v, transposed=False):  # RetNet retention as one einsum of q, k, the decay matrix and v
    h, n = q.shape[1], q.shape[2]
    gamma = 1 - 2.0 ** (-5 - torch.arange(h, dtype=torch.float32))
    i = torch.arange(n)
    dist = (i[:, None] - i[None, :]).float()
    decay = (gamma.view(-1, 1, 1) ** dist.clamp(min=0)).masked_fill(dist < 0, 0.0)
    return torch.einsum("bhnd,bhmd,hmn,bhme->bhne" if transposed else "bhnd,bhmd,hnm,bhme->bhne", q, k, decay, v)


@pytest.mark.parametrize("transposed", [False, True])
def test_retention_as_one_four_operand_einsum(transposed):
    q, k, v = qkv(15, seed=9)
    fn = (lambda q, k, v: retention_einsum(q, k, v, transposed))
    report, lin = linear_sites(fn, q, k, v)
    assert len(lin) == 1, report
    if transposed:  # the decay read as γ^(m − p) above the diagonal: anti-causal
        assert not lin[0].rewritten and "keeps pairs m > p" in lin[0].reason, report
    else:
        assert lin[0].rewritten and lin[0].kernel == "rewrite::decay_linear_attention[torch]", report
    torch._dynamo.reset()
    close_relative(rewrite.compile(fn, backend="torch")(q, k, v), fn(q.double(), k.double(), v.double()),
                   torch.float32, "retention")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_every_spelling_runs_the_triton_kernel(dtype):
    for name, (fn, layout, causal, _) in sorted(SPELLINGS.items()):
        q, k, v = (t.cuda() for t in qkv(1028 if name == "chunked_reciprocal" else 1027, layout, 8, dtype))
        report, lin = linear_sites_on(fn, "triton", q, k, v)
        assert len(lin) == 1 and lin[0].rewritten, (name, report)
        assert lin[0].kernel == "rewrite::linear_attention[triton]", (name, lin[0].kernel)
        assert lin[0].mask == ("causal m <= p" if causal else "none"), (name, lin[0].mask)
        torch._dynamo.reset()
        got = rewrite.compile(fn, backend="triton")(q, k, v)
        close_relative(got, fn(q.double(), k.double(), v.double()), dtype, f"{name} {dtype}")


def linear_sites_on(fn, backend, *args):
    torch._dynamo.reset()
    report = rewrite.inspect(fn, *args, backend=backend)
    return report, [s for s in report.sites if s.variant == "linear"]
