"""Backward of the attention ops: gradients of q, k, v (and bias) equal eager float64 autograd, and
the recomputation keeps no N×M scores where it need not.

- ``rewrite::attention`` recomputes through SDPA; only a row that keeps no key recomputes the
  eager spelling (codegen/backward.py).
- ``rewrite::sparse_attention`` recomputes through the kept tiles (sparse_torch.py); a bias, an
  empty row or a mask too dense for tiles falls back to sparse_ops.dense_grads.
The "no N×M" claims are checked by making the fallbacks raise.
"""

from __future__ import annotations

import math
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from test_sparse_torch import axes, make_spec, spec_matrix

import rewrite.codegen.backward as backward
import rewrite.codegen.ops as ops
import rewrite.codegen.sparse_ops as sparse_ops
from rewrite.codegen.sparse_ops import op_spec
from rewrite.ir.mask import Axis, MaskSpec

FAST = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.explicit, Phase.reuse, Phase.generate])
# Gradients of an O(1) output; bf16 inputs round q·kᵀ before the softmax (see reference.py).
GRAD_TOL = {torch.float64: 1e-8, torch.float32: 5e-4, torch.bfloat16: 8e-2}


def eager_grads(q, k, v, bias, keep, scale, grad):
    """float64 eager attention and its autograd: the ground truth (NaN rows as eager gives them)."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().double().requires_grad_()
    g = q.shape[-3] // k.shape[-3]
    kk, vv = leaves[1].repeat_interleave(g, -3), leaves[2].repeat_interleave(g, -3)
    s = leaves[0] @ kk.transpose(-1, -2) * scale
    if b is not None:
        s = s + b
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    out = torch.softmax(s, -1) @ vv
    wrt = leaves + ([b] if b is not None else [])
    return out, torch.autograd.grad(out, wrt, grad.double())


def op_grads(call, q, k, v, bias, grad):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    b = None if bias is None else bias.detach().clone().requires_grad_()
    out = call(*leaves, b)
    wrt = leaves + ([b] if b is not None else [])
    return out, torch.autograd.grad(out, wrt, grad.to(out.dtype))


def compare(got, want, dtype, what):
    tol = GRAD_TOL[dtype]
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.shape == w.shape, f"{what}: grad {i} shape {tuple(g.shape)} != {tuple(w.shape)}"
        assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: grad {i} NaN positions differ"
        scale = max(1.0, float(w.nan_to_num().abs().max()))
        torch.testing.assert_close(g.double(), w, atol=tol * scale, rtol=tol, equal_nan=True, msg=f"{what}: grad {i}")


def _forbid(monkeypatch, module, name):
    def boom(*a, **k):
        raise AssertionError(f"{name} was called: the backward materialised N×M scores")
    monkeypatch.setattr(module, name, boom)


def _inputs(gen, b, hq, hkv, n, m, d, dtype):
    q = torch.randn(b, hq, n, d, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, m, d, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, m, d + 3, generator=gen, dtype=torch.float64).to(dtype)
    return q, k, v


# ---------------------------------------------------------------- rewrite::attention

@FAST
@given(n=st.integers(1, 40), m=st.integers(1, 40), d=st.sampled_from([16, 24, 64]), gqa=st.booleans(),
       causal=st.booleans(), offset=st.integers(-3, 6), with_bias=st.booleans(), with_mask=st.booleans(),
       dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]), seed=st.integers(0, 2**31 - 1))
def test_dense_op_gradients(n, m, d, gqa, causal, offset, with_bias, with_mask, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(gen, 2, 4, 2 if gqa else 4, n, m, d, dtype)
    bias = torch.randn(1, 4, n, m, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    mask = (torch.rand(2, 1, n, m, generator=gen) < 0.7) if with_mask else None
    scale = 1 / math.sqrt(d)
    keep = ops.keep_mask(None, mask, causal, offset, n, m, "cpu")

    def call(q, k, v, b):
        return torch.ops.rewrite.attention(q, k, v, b, mask, scale, causal, offset, "nan", "sdpa", dtype)

    grad = torch.randn(2, 4, n, d + 3, generator=gen, dtype=torch.float64)
    out, got = op_grads(call, q, k, v, bias, grad)
    _, want = eager_grads(q, k, v, bias, keep, scale, grad)
    compare(got, want, dtype, "rewrite::attention")


def test_dense_op_backward_is_sdpa_without_empty_rows(monkeypatch):
    """Causal (offset ≥ 0), a mask with every row kept somewhere, GQA: no eager recomputation."""
    _forbid(monkeypatch, backward, "eager_attention")
    gen = torch.Generator().manual_seed(1)
    q, k, v = _inputs(gen, 1, 4, 2, 33, 40, 16, torch.float32)
    mask = torch.rand(1, 4, 33, 40, generator=gen) < 0.5
    mask[..., 0] = True
    for causal, msk in ((True, None), (False, mask), (True, mask)):
        def call(q, k, v, b, causal=causal, msk=msk):
            return torch.ops.rewrite.attention(q, k, v, b, msk, 0.25, causal, 7, "nan", "sdpa", torch.float32)

        grad = torch.randn(1, 4, 33, 19, generator=gen, dtype=torch.float64)
        _, got = op_grads(call, q, k, v, None, grad)
        keep = ops.keep_mask(None, msk, causal, 7, 33, 40, "cpu")
        _, want = eager_grads(q, k, v, None, keep, 0.25, grad)
        compare(got, want, torch.float32, f"causal={causal} mask={msk is not None}")


# ---------------------------------------------------------------- rewrite::sparse_attention

@st.composite
def sparse_cases(draw):
    ndim = draw(st.integers(1, 2))
    grid = [draw(st.integers(2, 40 if ndim == 1 else 9)) for _ in range(ndim)]
    axs = [draw(axes(g)) for g in grid]
    offset = draw(st.integers(-4, 4)) if ndim == 1 and axs[0].kind == "window" else 0
    return make_spec(grid, axs, offset)


@FAST
@given(spec=sparse_cases(), d=st.sampled_from([16, 32]), gqa=st.booleans(), with_mask=st.booleans(),
       with_bias=st.booleans(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**31 - 1))
def test_sparse_op_gradients(spec, d, gqa, with_mask, with_bias, dtype, seed):
    n = math.prod(spec.grid)
    gen = torch.Generator().manual_seed(seed)
    q, k, v = _inputs(gen, 2, 4, 2 if gqa else 4, n, n, d, dtype)
    mask = (torch.rand(2, 4, n, n, generator=gen) < 0.8) if with_mask else None
    bias = torch.randn(2, 1, n, n, generator=gen, dtype=torch.float64).to(dtype) if with_bias else None
    scale = 1 / math.sqrt(d)
    keep = spec_matrix(spec, n, n) if mask is None else spec_matrix(spec, n, n) & mask

    def call(q, k, v, b):
        return torch.ops.rewrite.sparse_attention(q, k, v, b, mask, scale, op_spec(spec, False), "nan", "torch", dtype)

    grad = torch.randn(2, 4, n, d + 3, generator=gen, dtype=torch.float64)
    fallbacks = []
    dense_grads = sparse_ops.dense_grads
    with mock.patch.object(sparse_ops, "dense_grads", lambda *a: fallbacks.append(1) or dense_grads(*a)):
        _, got = op_grads(call, q, k, v, bias, grad)
    _, want = eager_grads(q, k, v, bias, keep, scale, grad)
    compare(got, want, dtype, spec.describe())
    # The tiled path took every case it can: no bias, every row keeping a key.
    assert bool(fallbacks) == (bias is not None or not bool(keep.any(-1).all()))


@pytest.mark.parametrize("axis", [Axis("window", 20, 1, False), Axis("window", 12, 3, True),
                                  Axis("clamped", 9, 2, stride=3), Axis("blocked", block=32, halo=5)])
def test_sparse_backward_keeps_only_tiles(monkeypatch, axis):
    """1-D specs at N = 301 with GQA and a run-time mask that leaves no row empty: the backward
    runs the tiled path only (neither SDPA nor the eager reference on an N×M mask)."""
    _forbid(monkeypatch, sparse_ops, "dense_grads")
    n = 301
    spec = make_spec([n], [axis])
    gen = torch.Generator().manual_seed(3)
    q, k, v = _inputs(gen, 1, 4, 2, n, n, 32, torch.float32)
    mask = torch.rand(1, 1, n, n, generator=gen) < 0.6
    spec_keep = spec_matrix(spec, n, n)
    mask |= spec_keep & (spec_keep.int().cumsum(1) == 1)  # each row keeps its first spec key

    def call(q, k, v, b):
        return torch.ops.rewrite.sparse_attention(q, k, v, b, mask, 0.2, op_spec(spec, False), "nan", "torch",
                                                  torch.float32)

    grad = torch.randn(1, 4, n, 35, generator=gen, dtype=torch.float64)
    _, got = op_grads(call, q, k, v, None, grad)
    _, want = eager_grads(q, k, v, None, spec_matrix(spec, n, n) & mask, 0.2, grad)
    compare(got, want, torch.float32, "1-D window, tiled backward")


def test_sparse_backward_block_table(monkeypatch):
    """A MoBA-style block table (the op gets the table, not the token mask): tiled backward too."""
    _forbid(monkeypatch, sparse_ops, "dense_grads")

    n, blk = 512, 16
    gen = torch.Generator().manual_seed(4)
    q, k, v = _inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    table = torch.rand(1, 2, n // blk, n // blk, generator=gen) < 0.02
    table |= torch.eye(n // blk, dtype=torch.bool)  # every query block keeps its own block
    spec = op_spec(MaskSpec("arbitrary", runtime=True), False, (blk, blk))

    def call(q, k, v, b):
        return torch.ops.rewrite.sparse_attention(q, k, v, b, table, 0.25, spec, "nan", "torch", torch.float32)

    grad = torch.randn(1, 2, n, 19, generator=gen, dtype=torch.float64)
    _, got = op_grads(call, q, k, v, None, grad)
    keep = table.repeat_interleave(blk, -2).repeat_interleave(blk, -1)
    _, want = eager_grads(q, k, v, None, keep, 0.25, grad)
    compare(got, want, torch.float32, "block table")


# ---------------------------------------------------------------- on a GPU (FlashAttention / cuDNN backward)

@pytest.mark.gpu
@pytest.mark.parametrize("causal,gqa,dtype", [(True, False, torch.bfloat16), (False, True, torch.float16),
                                              (True, True, torch.float32)])
def test_dense_gradients_gpu(causal, gqa, dtype):
    gen = torch.Generator().manual_seed(5)
    q, k, v = (t.cuda() for t in _inputs(gen, 2, 8, 2 if gqa else 8, 1031, 1031, 64, dtype))
    keep = ops.keep_mask(None, None, causal, 0, 1031, 1031, "cuda")

    def call(q, k, v, b):
        return torch.ops.rewrite.attention(q, k, v, b, None, 0.125, causal, 0, "nan", "sdpa", dtype)

    grad = torch.randn(2, 8, 1031, 67, generator=gen, dtype=torch.float64).cuda()
    _, got = op_grads(call, q, k, v, None, grad)
    _, want = eager_grads(q, k, v, None, keep, 0.125, grad)
    compare(got, want, torch.bfloat16 if dtype != torch.float32 else dtype, f"gpu dense causal={causal}")


@pytest.mark.gpu
def test_sparse_gradients_gpu(monkeypatch):
    """A 1-D window through the Triton forward; backward through the kept tiles on the GPU."""
    _forbid(monkeypatch, sparse_ops, "dense_grads")
    n = 2049
    spec = make_spec([n], [Axis("window", 100, 1, False)])
    gen = torch.Generator().manual_seed(6)
    q, k, v = (t.cuda() for t in _inputs(gen, 1, 8, 2, n, n, 64, torch.bfloat16))

    def call(q, k, v, b):
        return torch.ops.rewrite.sparse_attention(q, k, v, b, None, 0.125, op_spec(spec, False), "nan", "triton",
                                                  torch.bfloat16)

    grad = torch.randn(1, 8, n, 67, generator=gen, dtype=torch.float64).cuda()
    _, got = op_grads(call, q, k, v, None, grad)
    _, want = eager_grads(q, k, v, None, spec_matrix(spec, n, n).cuda(), 0.125, grad)
    compare(got, want, torch.bfloat16, "gpu 1-D window")


def test_backward_returns_one_gradient_per_passed_input():
    """torch before 2.14 checks an op with a tensor-list input against the inputs the caller passed
    (trailing defaults dropped by the dispatcher): the ops' backwards cut or pad their Nones to that."""
    from types import SimpleNamespace

    from rewrite.codegen.backward import one_per_passed_input

    ctx = SimpleNamespace(needs_input_grad=(True, False, True, False))
    assert one_per_passed_input(ctx, 1, 2, 3) == (1, 2, 3, None)
    assert one_per_passed_input(ctx, 1, 2, 3, [4], None, None) == (1, 2, 3, [4])
