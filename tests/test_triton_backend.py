"""``rewrite.compile(..., backend="triton")``: the rewritten graph runs the Triton kernel.

On a machine without a GPU, tests/conftest.py sets TRITON_INTERPRET=1, so the kernel runs
in Triton's interpreter on the CPU at small sizes; the results must equal eager float64.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from reference import assert_close, attention_reference

import rewrite

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and __import__("os").environ.get("TRITON_INTERPRET") != "1",
    reason="needs a GPU or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def causal_tril(q, k, v):
    n, m = q.shape[-2], k.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    keep = torch.tril(torch.ones(n, m, dtype=torch.bool, device=q.device), diagonal=m - n)
    return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v


def padded(q, k, v, keep):
    s = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    s = torch.where(keep[:, None, None, :], s, float("-inf"))
    return torch.einsum("bhnm,bhmd->bhnd", s.softmax(-1), v)


def biased(q, k, v, bias):
    return torch.softmax(q @ k.mT / 8.0 + bias, dim=-1) @ v


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=(Phase.explicit, Phase.reuse, Phase.generate))
@given(b=st.integers(1, 2), h=st.sampled_from([1, 2, 4]), n=st.integers(2, 40), extra=st.integers(0, 20),
       d=st.sampled_from([16, 24, 32, 64]), variant=st.sampled_from(["causal", "padded", "biased"]),
       seed=st.integers(0, 2**16))
def test_triton_backend_matches_reference(b, h, n, extra, d, variant, seed):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(seed)
    m = n + extra if variant == "causal" else n + extra // 2
    q = torch.randn(b, h, n, d, generator=g).to(DEVICE)
    k = torch.randn(b, h, m, d, generator=g).to(DEVICE)
    v = torch.randn(b, h, m, d, generator=g).to(DEVICE)
    if variant == "causal":
        fn, args = causal_tril, (q, k, v)
        keep = torch.tril(torch.ones(n, m, dtype=torch.bool, device=DEVICE), diagonal=m - n)
        want = attention_reference(q, k, v, scale=d**-0.5, mask=keep)
    elif variant == "padded":
        keep = torch.rand(b, m, generator=g).to(DEVICE) > 0.3
        keep[0] = False  # a batch whose rows are all masked: NaN, as eager
        fn, args = padded, (q, k, v, keep)
        want = attention_reference(q, k, v, scale=d**-0.5, mask=keep[:, None, None, :])
    else:
        bias = torch.randn(1, h, n, m, generator=g).to(DEVICE)
        fn, args = biased, (q, k, v, bias)
        want = attention_reference(q, k, v, scale=1 / 8.0, bias=bias)
    report = rewrite.inspect(fn, *args, backend="triton")
    assert [s.kernel for s in report.sites] == ["triton"], report
    got = rewrite.compile(fn, backend="triton")(*args)
    assert_close(got, want, torch.float32, f"triton backend, {variant}")
