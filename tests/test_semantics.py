"""What a rewrite must preserve beyond the happy path, and how the public API behaves.

Non-contiguous inputs, dtype promotion, dropout in training (left alone, same RNG stream),
gradients, verify=True, softmaxes that are not attention, models without attention, bad
arguments, the torch.compile entry point, the decorator forms, and the report's shape.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from reference import assert_close, attention_reference
from spellings import BY_NAME, Shape, case_for, first_output

import rewrite

SHAPE = Shape(B=2, H=2, Hkv=2, N=9, M=13, D=16, Dv=24, dtype=torch.float32, seed=7)


def _case(name: str, **overrides):
    spelling = BY_NAME[name]
    shape = replace(SHAPE, **overrides)
    if spelling.square:
        shape = replace(shape, M=shape.N)
    if spelling.kv_heads == "group":
        shape = replace(shape, H=4, Hkv=2)
    elif spelling.kv_heads == "one":
        shape = replace(shape, H=4, Hkv=1)
    if spelling.same_dv:
        shape = replace(shape, Dv=shape.D)
    return case_for(spelling, shape)


def _single_site(report):
    assert len(report.sites) == 1, f"expected one site:\n{report}"
    return report.sites[0]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ------------------------------------------------------------------------ layouts and dtypes


def _non_contiguous(t):
    """Same values, other strides: a [.., N, D] tensor stored as the transpose of its transpose,
    then every other element of a doubled last axis."""
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() < 2:
        return t
    wide = torch.stack([t, torch.full_like(t, float("nan"))], dim=-1).flatten(-2)
    out = wide[..., ::2]
    assert not out.is_contiguous() and torch.equal(out, t)
    return out


@pytest.mark.parametrize("name", ["matmul_operator", "einsum_bnhd", "bias_bhnm", "sdpa_plain", "bmm_flat"])
def test_non_contiguous_inputs(name):
    case = _case(name)
    args = tuple(_non_contiguous(a) for a in case.args)
    out = rewrite.compile(case.fn)(*args)
    assert_close(out, case.expected, torch.float32, f"{name} on non-contiguous inputs")
    site = _single_site(rewrite.inspect(case.fn, *args))
    assert site.rewritten, site.reason


def _promoting_bias(q, k, v, bias):
    """bf16 scores + fp32 bias promote to fp32; the probabilities are cast back for the product."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias
    return scores.softmax(dim=-1).to(v.dtype) @ v


def test_dtype_promotion_fp32_bias_on_bf16_scores():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 9, 32, generator=g).bfloat16()
    k, v = (torch.randn(2, 2, 13, 32, generator=g).bfloat16() for _ in range(2))
    bias = torch.randn(2, 2, 9, 13, generator=g)  # float32
    eager = _promoting_bias(q, k, v, bias)
    out = rewrite.compile(_promoting_bias)(q, k, v, bias)
    assert out.dtype == eager.dtype == torch.bfloat16
    expected = attention_reference(q, k, v, scale=32**-0.5, bias=bias)
    assert_close(out, expected, torch.bfloat16, "promoted bias")
    site = _single_site(rewrite.inspect(_promoting_bias, q, k, v, bias))
    assert site.rewritten or site.reason, "a site left alone must say why"


# ------------------------------------------------------------------------ dropout in training


class _TrainingDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)

    def forward(self, q, k, v):
        return self.drop(torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)) @ v


def _functional_training_dropout(q, k, v):
    p = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    return F.dropout(p, p=0.3, training=True) @ v


@pytest.mark.parametrize("fn", [_TrainingDropout().train(), _functional_training_dropout], ids=["module", "functional"])
def test_training_dropout_is_left_alone(fn):
    case = _case("matmul_operator")
    q, k, v = case.args
    site = _single_site(rewrite.inspect(fn, q, k, v))
    assert not site.rewritten
    assert site.reason and "dropout" in site.reason.lower(), site.reason
    compiled = rewrite.compile(fn)
    torch.manual_seed(1234)
    eager = fn(q, k, v)
    torch.manual_seed(1234)
    out = compiled(q, k, v)
    torch.testing.assert_close(out, eager)
    # dropout really was active: the output is not the dropout-free attention
    assert not torch.allclose(eager, case.expected.float(), atol=1e-3)


# ------------------------------------------------------------------------------- gradients

GRAD_SPELLINGS = [
    "matmul_operator",
    "einsum_bnhd",
    "bias_bhnm",
    "causal_arange",
    "causal_tril_bool",
    "gqa_repeat_interleave",
    "sdpa_float_mask",
    "explicit_normalise_after",
    "baddbmm_bias",
]


@pytest.mark.parametrize("name", GRAD_SPELLINGS)
def test_gradients_match_eager(name):
    case = _case(name, dtype=torch.float64)
    fn = case.fn

    def leaves():
        return tuple(
            a.detach().clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
            for a in case.args
        )

    g = torch.Generator().manual_seed(11)
    eager_args, compiled_args = leaves(), leaves()
    eager_out = fn(*eager_args)
    weight = torch.randn(eager_out.shape, generator=g, dtype=torch.float64)
    compiled_out = rewrite.compile(fn)(*compiled_args)
    assert_close(compiled_out, eager_out, torch.float64, f"{name} forward")
    wrt_e = [a for a in eager_args if isinstance(a, torch.Tensor) and a.requires_grad]
    wrt_c = [a for a in compiled_args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads_e = torch.autograd.grad((eager_out * weight).sum(), wrt_e)
    grads_c = torch.autograd.grad((compiled_out * weight).sum(), wrt_c)
    assert len(grads_e) >= 3
    for i, (ge, gc) in enumerate(zip(grads_e, grads_c)):
        torch.testing.assert_close(gc, ge, atol=1e-9, rtol=1e-7, msg=lambda m, i=i: f"{name} grad of arg {i}: {m}")


# ---------------------------------------------------------------------------------- verify


@pytest.mark.parametrize("name", ["matmul_operator", "masked_fill_neg_inf", "causal_tril_bool", "sdpa_bool_mask"])
def test_verify_true_on_a_correct_site(name):
    case = _case(name)
    out = rewrite.compile(case.fn, verify=True)(*case.args)
    assert_close(first_output(out), case.expected, torch.float32, f"{name} with verify=True")


# ----------------------------------------------------------------------- not attention at all


def _classifier_head(x, w):
    logits = x @ w
    return logits.softmax(-1)


def test_classifier_softmax_is_not_attention():
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(4, 7, 32, generator=g), torch.randn(32, 10, generator=g)
    report = rewrite.inspect(_classifier_head, x, w)
    assert all(not s.rewritten for s in report.sites), str(report)
    torch.testing.assert_close(rewrite.compile(_classifier_head)(x, w), _classifier_head(x, w))


def test_model_without_attention_has_no_sites():
    mlp = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(2))
    report = rewrite.inspect(mlp, x)
    assert report.sites == []
    with torch.no_grad():
        torch.testing.assert_close(rewrite.compile(mlp)(x), mlp(x))


# ------------------------------------------------------------------------------ bad arguments


def test_compile_rejects_a_non_callable():
    with pytest.raises(TypeError) as info:
        rewrite.compile(42)
    msg = str(info.value)
    assert re.search(r"\bfn(_or_module)?\b", msg), msg
    assert "int" in msg or "42" in msg, msg


def test_compile_rejects_an_unknown_backend():
    with pytest.raises(ValueError) as info:
        rewrite.compile(BY_NAME["matmul_operator"].fn, backend="nope")
    msg = str(info.value)
    for choice in ("auto", "torch", "triton"):
        assert choice in msg, msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without a GPU")
def test_triton_backend_without_gpu_or_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _case("matmul_operator")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET|GPU"):
        compiled = rewrite.compile(case.fn, backend="triton")
        compiled(*case.args)


# ------------------------------------------------------------------ entry points and decorators


def test_torch_compile_backend_entry_point():
    case = _case("causal_tril_bool")
    out = torch.compile(case.fn, backend="rewrite")(*case.args)
    assert_close(out, case.expected, torch.float32, "torch.compile(backend='rewrite')")


@rewrite.compile
def _decorated(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, dim=-1) @ v


@rewrite.compile(backend="torch")
def _decorated_torch(q, k, v):
    return F.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]), dim=-1) @ v


@rewrite.compile
class _DecoratedModule(nn.Module):
    def forward(self, q, k, v):
        return torch.einsum(
            "bhnm,bhmd->bhnd", torch.einsum("bhnd,bhmd->bhnm", q, k).mul(q.shape[-1] ** -0.5).softmax(-1), v
        )


@rewrite.compile(backend="torch")
class _DecoratedModuleTorch(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


class _PlainModule(nn.Module):
    def forward(self, q, k, v):
        return (q @ k.mT / math.sqrt(q.shape[-1])).softmax(-1) @ v


@pytest.mark.parametrize(
    "make",
    [
        lambda: _decorated,
        lambda: _decorated_torch,
        lambda: _DecoratedModule(),
        lambda: _DecoratedModuleTorch(),
        lambda: rewrite.compile(_PlainModule()),
        lambda: rewrite.compile(_PlainModule(), backend="torch"),
        lambda: rewrite.compile(backend="torch")(_PlainModule()),
    ],
    ids=[
        "fn",
        "fn_backend_torch",
        "class",
        "class_backend_torch",
        "instance",
        "instance_backend_torch",
        "instance_via_partial",
    ],
)
def test_decorator_and_wrapper_forms(make):
    case = _case("matmul_operator")
    fn = make()
    assert_close(fn(*case.args), case.expected, torch.float32, "decorated")


# ---------------------------------------------------------------------------------- report


def test_report_fields_json_and_table():
    case = _case("masked_fill_neg_inf")
    report = rewrite.inspect(case.fn, *case.args)
    site = _single_site(report)
    assert site.variant == "dense" and site.rewritten and site.reason is None
    assert isinstance(site.spelling, str) and site.spelling
    assert "spelling_fns.py" in site.location, site.location  # points at the user's source
    assert isinstance(site.cascade, str) and "exp" in site.cascade, site.cascade
    assert isinstance(site.mask, str) and isinstance(site.shapes, dict) and site.shapes
    assert isinstance(site.flops, int) and site.flops > 0
    assert isinstance(site.kernel, str) and site.kernel
    assert site.gqa is False
    dumped = json.loads(json.dumps(report.to_dict()))
    assert dumped
    text = str(report)
    assert text and "dense" in text


def test_report_causal_and_gqa():
    case = _case("causal_arange")
    text = str(rewrite.inspect(case.fn, *case.args))
    assert "causal" in text
    case = _case("gqa_llama_repeat_kv")
    site = _single_site(rewrite.inspect(case.fn, *case.args))
    assert site.gqa is True and site.rewritten, site.reason


def test_inspect_does_not_change_the_model():
    case = _case("causal_gpt2_buffer")
    module = case.fn
    before = {k: v.clone() for k, v in module.state_dict().items()}
    rewrite.inspect(module, *case.args)
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert_close(module(*case.args), case.expected, torch.float32, "module after inspect")
