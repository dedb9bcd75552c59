"""Plans that are one plain SDPA call run as a direct ``aten.scaled_dot_product_attention`` call in the
rewritten graph (passes/direct.py): no custom op, no per-call work. Everything else keeps its op.

The decision is tested for both devices (it is made from the plan and the first call's device); the
CUDA half plans CPU-captured sites as if for a GPU, which is all the decision reads.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from eager_cases import double, few, fresh_dynamo, same_as_eager  # noqa: F401
from hypothesis import given
from hypothesis import strategies as st

import rewrite
from rewrite.capture import to_aten
from rewrite.passes.plan import plan_site
from rewrite.patterns import find_sites

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CUDA = torch.device("cuda")


def ops_called(gm) -> set:
    return {n.target for n in gm.graph.nodes if n.op == "call_function"}


def rewrite_ops(gm) -> set:
    return {t for t in ops_called(gm) if str(t).startswith("rewrite.")}


def plans(fn, *args, device=None):
    gm = to_aten(fn, args)
    out = []
    for site, reason in find_sites(gm.graph):
        assert site is not None, reason
        out.append(plan_site(site, "torch", device or args[0].device))
    return out


# ---------------------------------------------------------------- spellings, written as users do

def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def sdpa_is_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])


def nanogpt_causal(q, k, v):
    n = q.shape[-2]
    s = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).tril().logical_not(), float("-inf"))
    return F.softmax(s, dim=-1) @ v


def hf_finite_causal(q, k, v):
    n = q.shape[-2]
    pos = torch.arange(n)
    bias = torch.zeros(n, n, dtype=q.dtype).masked_fill(pos[None, :] > pos[:, None], torch.finfo(q.dtype).min)
    s = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(q.shape[-1]) + bias
    return torch.matmul(torch.softmax(s.float(), -1).to(q.dtype), v)


def sdpa_with_mask(q, k, v, keep):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def sdpa_shifted_causal(q, k, v):
    n, m = q.shape[-2], k.shape[-2]
    keep = torch.ones(n, m, dtype=torch.bool).tril(diagonal=m - n + 1)  # one key more than bottom-right causal
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def dense_eager(q, k, v):
    return torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, -1) @ v


def qkv(n=13, m=13, hq=4, hk=4, d=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, hq, n, d, generator=g).to(dtype), torch.randn(2, hk, m, d, generator=g).to(dtype),
            torch.randn(2, hk, m, d, generator=g).to(dtype))


# ---------------------------------------------------------------- runs direct

@given(n=st.integers(2, 70), m=st.integers(2, 70), d=st.sampled_from([16, 24, 64, 136, 256]),
       groups=st.sampled_from([1, 2, 4]), causal=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 2**16))
@few(8)
def test_an_unmasked_sdpa_call_runs_as_itself(n, m, d, groups, causal, dtype, seed):
    fn = sdpa_is_causal if causal else sdpa_plain
    q, k, v = qkv(n, n if causal else m, 4, 4 // groups, d, dtype, seed)
    graphs = rewrite.rewritten_graphs(fn, q, k, v, backend="torch")
    assert len(graphs) == 1 and SDPA in ops_called(graphs[0]) and not rewrite_ops(graphs[0]), graphs[0].code
    report = rewrite.inspect(fn, q, k, v, backend="torch")
    site = report.sites[0]
    assert site.rewritten and site.direct and site.kernel == "sdpa", str(report)
    assert any("direct aten.scaled_dot_product_attention" in note for note in site.notes), site.notes
    torch._dynamo.reset()
    out = rewrite.compile(fn, backend="torch")(q, k, v)
    assert torch.equal(out, fn(q, k, v))  # the very call the user wrote
    same_as_eager(out, fn(*double((q, k, v))), dtype, "direct sdpa")


@pytest.mark.parametrize("spelling", [sdpa_is_causal, nanogpt_causal, dense_eager])
def test_on_a_gpu_an_eager_spelling_with_nothing_to_settle_runs_direct(spelling):
    (plan,) = plans(spelling, *qkv(), device=CUDA)
    assert plan.direct, plan.notes


def test_gqa_causal_runs_direct_with_enable_gqa():
    q, k, v = qkv(hq=8, hk=2)
    (gm,) = rewrite.rewritten_graphs(sdpa_is_causal, q, k, v, backend="torch")
    (call,) = [n for n in gm.graph.nodes if n.target is SDPA]
    assert call.kwargs.get("enable_gqa") is True and call.args[5] is True, call
    torch._dynamo.reset()
    torch.testing.assert_close(rewrite.compile(sdpa_is_causal, backend="torch")(q, k, v), sdpa_is_causal(q, k, v),
                               rtol=0, atol=0)


# ---------------------------------------------------------------- near misses: keep the op

def test_a_finite_causal_fill_keeps_the_op_that_settles_rows():
    (plan,) = plans(hf_finite_causal, *qkv(), device=CUDA)
    assert plan.variant == "causal" and not plan.direct  # rows eager's finfo.min fill may not round away


def test_on_a_cpu_an_eager_spelling_keeps_the_op_that_checks_inputs():
    for fn in (nanogpt_causal, dense_eager):
        (plan,) = plans(fn, *qkv())
        assert not plan.direct, fn.__name__
        (gm,) = rewrite.rewritten_graphs(fn, *qkv(), backend="torch")
        assert SDPA not in ops_called(gm) and rewrite_ops(gm), gm.code


def test_a_run_time_mask_keeps_the_op():
    q, k, v = qkv()
    keep = torch.rand(13, 13, generator=torch.Generator().manual_seed(3)) > 0.3
    keep[:, 0] = True
    (plan,) = plans(sdpa_with_mask, q, k, v, keep, device=CUDA)
    assert not plan.direct


def test_a_causal_offset_keeps_the_op():
    (plan,) = plans(sdpa_shifted_causal, *qkv(n=5, m=9), device=CUDA)
    assert plan.variant == "causal" and not plan.direct, (plan.variant, plan.causal_offset)


def test_a_key_shared_by_the_batch_folds_into_rows_and_stays_exact():
    q, k, v = qkv()
    (plan,) = plans(dense_eager, q, k[:1], v[:1], device=CUDA)
    assert plan.direct  # one problem with the batch's queries as rows
    (gm,) = rewrite.rewritten_graphs(dense_eager, q, k[:1], v[:1], backend="torch")
    torch._dynamo.reset()
    out = rewrite.compile(dense_eager, backend="torch")(q, k[:1], v[:1])
    same_as_eager(out, dense_eager(*double((q, k[:1], v[:1]))), torch.float32, "shared key")


def test_the_replaced_sdpa_call_no_longer_runs():
    """fx counts aten SDPA impure (a seeded dropout op): dead-code elimination alone kept the original
    call, which then ran beside the op that replaced it."""
    q, k, v = qkv()
    keep = torch.rand(13, 13, generator=torch.Generator().manual_seed(4)) > 0.3
    (gm,) = rewrite.rewritten_graphs(sdpa_with_mask, q, k, v, keep, backend="torch")
    assert rewrite_ops(gm) and SDPA not in ops_called(gm), gm.code


# ---------------------------------------------------------------- issue 15: a user's SDPA call keeps SDPA

def padding_keep(q, k):
    keep = torch.ones(q.shape[0], 1, 1, k.shape[-2], dtype=torch.bool)
    keep[0, ..., -3:] = False  # the first sequence is padded by 3 keys
    return keep


SDPA_CALLS = {
    "plain": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
    "is_causal": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "scale": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.3),
    "gqa": lambda q, k, v: F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True),
    "bool padding mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=padding_keep(q, k)),
    "float padding bias": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.zeros(()).masked_fill(~padding_keep(q, k), -1e4)),
    "dense float bias": lambda q, k, v: F.scaled_dot_product_attention(
        q, k, v, attn_mask=torch.linspace(-1, 1, q.shape[-2] * k.shape[-2]).reshape(q.shape[-2], k.shape[-2])),
}


@pytest.mark.parametrize("device", [torch.device("cpu"), CUDA], ids=["cpu", "cuda"])
@pytest.mark.parametrize("name", list(SDPA_CALLS))
def test_a_users_sdpa_call_is_planned_on_sdpa(name, device):
    """With no measurement saying otherwise, ``auto`` keeps a user's own SDPA call on SDPA (issue 15): a
    dense call with any mask it can run, on either device (the decision is the plan's, read here)."""
    q, k, v = qkv()
    gm = to_aten(SDPA_CALLS[name], (q, k, v))
    (found,) = find_sites(gm.graph)
    site, reason = found
    assert site is not None, reason
    plan = plan_site(site, "auto", device)
    assert plan.kernel == "sdpa" and not plan.sparse, (name, plan.kernel, plan.variant, plan.notes)


# ---------------------------------------------------------------- nothing left around the op

VIEW_OPS = {torch.ops.aten.permute.default, torch.ops.aten.transpose.int, torch.ops.aten.reshape.default}


@pytest.mark.parametrize("fn", [dense_eager, nanogpt_causal], ids=["dense", "causal"])
def test_a_transposed_key_and_a_same_shape_output_leave_no_view_on_the_call_path(fn):
    """``k.transpose(-2, -1)`` read back as k, and an output already in the site's shape: the rewritten graph
    is the op alone (passes/apply.py, permuted_source and op_output_shape), still eager's answer."""
    q, k, v = qkv(n=11, m=11)
    (gm,) = rewrite.rewritten_graphs(fn, q, k, v, backend="torch")
    assert rewrite_ops(gm) and not (ops_called(gm) & VIEW_OPS), gm.code
    torch._dynamo.reset()
    same_as_eager(rewrite.compile(fn, backend="torch")(q, k, v), fn(*double((q, k, v))), torch.float32, fn.__name__)


def heads_last(q, k, v):  # [B, N, H, D] in, [B, N, H·D] out: both views are needed
    b, n, h, d = q.shape
    s = q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * d ** -0.5
    return (torch.softmax(s, -1) @ v.transpose(1, 2)).transpose(1, 2).reshape(b, n, h * d)


def test_views_that_change_the_layout_stay():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 9, 3, 16, generator=g) for _ in range(3))
    (gm,) = rewrite.rewritten_graphs(heads_last, q, k, v, backend="torch")
    assert rewrite_ops(gm) and ops_called(gm) & VIEW_OPS, gm.code
    torch._dynamo.reset()
    same_as_eager(rewrite.compile(heads_last, backend="torch")(q, k, v), heads_last(*double((q, k, v))),
                  torch.float32, "heads last")
