"""NaN and ±inf in the inputs give eager's NaN/inf pattern on every rewritten site (issue 10, item 4).

Eager's masked_fill hides a NaN or ±inf key that the mask removes (the score is replaced, whatever
q·k was); a NaN query row is a NaN row at every size (SDPA on the CPU returns 0 for it at small N:
the op must not); a NaN value at a removed key reaches every row of its column through 0·NaN. Sites
written with masks (a band from arange, a causal tril, a run-time mask) are compiled on the torch and
Triton backends and compared with the spelling run eagerly in float64. The kernels themselves apply
masks by selection, checked without the op's input check in between.
"""

from __future__ import annotations

import pytest
import torch
from eager_cases import (
    NEG_INF,
    causal,
    compiled,
    double,
    inputs,
    rewritten_site,
    runtime,
    same_as_eager,
    sdpa_causal,
    sdpa_mask,
    window,
)
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from rewrite.codegen.sparse_torch import sparse_attention_torch
from rewrite.codegen.triton_attention import triton_attention
from rewrite.codegen.triton_block_sparse import block_sparse_attention
from rewrite.codegen.triton_neighborhood import neighborhood_attention
from rewrite.ir.mask import MaskSpec, keep_matrix

FEW = settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck),
               phases=[Phase.explicit, Phase.reuse, Phase.generate])
NAN, INF = float("nan"), float("inf")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _band(n: int, w: int) -> MaskSpec:
    """|p − m| ≤ w over n positions."""
    return MaskSpec("neighborhood", grid=(n,), window=(w,), dilation=(1,), causal=(False,), clamped=(False,),
                    stride=(1,), block=(0,), halo=(0,))


def _removed_key(keep: torch.Tensor) -> int:
    """A key some row removes and some row keeps (else one every row removes, else 0)."""
    kept, removed = keep.any(0), (~keep).any(0)
    both = torch.nonzero(kept & removed).flatten()
    if len(both):
        return int(both[len(both) // 2])
    gone = torch.nonzero(~kept).flatten()
    return int(gone[0]) if len(gone) else 0


def _injections(keep, q, k, v):
    """(name, q, k, v) with one non-finite entry each: at removed keys, and at live positions."""
    j = _removed_key(keep)
    live = int(torch.nonzero(keep.any(1)).flatten()[0]) if bool(keep.any()) else 0
    d, f = q.shape[-1] - 1, v.shape[-1] - 1

    def put(t, idx, val):
        t = t.clone()
        t[idx] = val
        return t

    return [
        ("clean", q, k, v),
        ("NaN key at a removed key", q, put(k, (0, 0, j, 0), NAN), v),
        ("+inf key at a removed key", q, put(k, (0, -1, j, d), INF), v),
        ("-inf key at a removed key", q, put(k, (-1, 0, j, 1), -INF), v),
        ("NaN query", put(q, (0, 0, live, 0), NAN), k, v),
        ("+inf query", put(q, (-1, -1, min(live + 1, q.shape[2] - 1), d), INF), k, v),
        ("NaN live key", q, put(k, (0, 0, live, 0), NAN), v),
        ("NaN value at a removed key", q, k, put(v, (0, 0, j, 0), NAN)),
        ("+inf value at a removed key", q, k, put(v, (0, 0, j, f), INF)),
        ("+inf live value", q, k, put(v, (-1, -1, live, 0), INF)),
    ]


@FEW
@given(kind=st.sampled_from(["window", "causal", "runtime dense", "runtime sparse", "sdpa mask", "sdpa causal"]),
       backend=st.sampled_from(["torch", "triton"]), n=st.integers(1, 41), d=st.sampled_from([16, 24, 40, 64, 256]),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), gqa=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_nonfinite_inputs_follow_eager(kind, backend, n, d, dtype, gqa, seed):
    gen = torch.Generator().manual_seed(seed)
    hkv = 1 if gqa else 2
    if kind.startswith("sdpa"):
        dtype = torch.float32  # SDPA's own NaN handling is the reference: its half-precision kernels differ
    q, k, v = inputs(gen, 2, 2, hkv, n, n, d, dtype, dv=d + 3)
    bias = (torch.randn(1, 1, 1, n, generator=gen) * 0.1).to(dtype)  # a key bias beside the mask
    if kind == "window":
        w = n // 4
        fn, extra, variants = window(w), (bias,), ("neighborhood", "dense")
        keep = keep_matrix(_band(n, w), n, n)
    elif kind == "causal":
        fn, extra, variants = causal(), (bias,), ("causal", "dense")
        keep = torch.ones(n, n, dtype=torch.bool).tril()
    elif kind == "sdpa causal":
        fn, extra, variants = sdpa_causal, (), ("causal",)
        keep = torch.ones(n, n, dtype=torch.bool).tril()
    elif kind == "sdpa mask":
        keep = torch.rand(1, 1, n, n, generator=gen) < 0.7
        keep[..., n // 2, :] = False
        fn, extra, variants = sdpa_mask, (keep,), ("dense", "block_sparse", "neighborhood")
        keep = keep[0, 0]
    else:
        frac = 0.8 if kind == "runtime dense" else 0.3
        keep = torch.rand(1, 1, n, n, generator=gen) < frac
        keep[..., n // 2, :] = False  # a row that keeps no key
        fn, extra, variants = runtime(), (bias, keep), ("dense", "block_sparse", "neighborhood")
        keep = keep[0, 0]
    run, report = compiled(fn, backend)
    for name, qi, ki, vi in _injections(keep, q, k, v):
        out = run(qi, ki, vi, *extra)
        ref = fn(*double((qi, ki, vi, *extra)))
        same_as_eager(out, ref, dtype, f"{kind}/{backend}/{dtype}: {name}", lowp=None)
    rewritten_site(report, variants, backend)


@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_nan_query_row_is_nan_on_the_dense_cpu_path(n):
    """SDPA's CPU kernel returns 0 for a NaN query row at small N; eager's softmax gives NaN."""
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v

    gen = torch.Generator().manual_seed(n)
    q, k, v = inputs(gen, 1, 2, 2, n, n, 16, torch.float32)
    q[0, 0, 0, 3] = NAN
    run, report = compiled(fn, "auto")
    out = run(q, k, v)
    rewritten_site(report, ("dense",), "auto")
    same_as_eager(out, fn(*double((q, k, v))), torch.float32, f"N={n}")
    assert bool(out[0, 0, 0].isnan().all()) and not bool(out[0, 1].isnan().any())


# ---------------------------------------------------------------- the kernels select

def _masked_eager(q, k, v, keep, scale):
    g = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    s = (q.double() @ k.transpose(-1, -2) * scale).masked_fill(~keep, NEG_INF)
    return torch.softmax(s, -1) @ v


@FEW
@given(kernel=st.sampled_from(["tiles window", "tiles causal", "tiles block map", "triton dense mask",
                                "triton causal", "triton window", "triton block-sparse"]),
       n=st.integers(3, 45), d=st.sampled_from([16, 32, 64]), value=st.sampled_from([NAN, INF, -INF]),
       dtype=st.sampled_from([torch.float32, torch.float16]), seed=st.integers(0, 2**31 - 1))
def test_kernels_apply_masks_by_selection(kernel, n, d, value, dtype, seed):
    """A non-finite key that a row's mask removes leaves that row finite in every kernel (no input
    check in front: the kernels alone)."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = inputs(gen, 1, 2, 1, n, n, d, dtype)
    scale = d**-0.5
    spec = _band(n, max(1, n // 5))
    mask = None
    if "window" in kernel:
        keep = keep_matrix(spec, n, n)
    elif "causal" in kernel:
        keep = torch.ones(n, n, dtype=torch.bool).tril()
    else:
        mask = torch.rand(1, 1, n, n, generator=gen) < 0.4
        mask[..., torch.arange(n), torch.arange(n)] = True
        keep = mask[0, 0]
    j = _removed_key(keep)
    k = k.clone()
    k[0, 0, j, :] = value  # every entry: the score is ±inf or NaN wherever it is computed
    if kernel == "tiles window":
        out = sparse_attention_torch(q, k, v, spec, scale=scale)
    elif kernel == "tiles causal":
        out = sparse_attention_torch(q, k, v, MaskSpec("causal", predicate="m <= p"), scale=scale)
    elif kernel == "tiles block map":
        from rewrite.codegen.block_map import cached_block_map

        bmap = cached_block_map(mask.expand(1, 2, n, n), 16, 16)
        out = sparse_attention_torch(q, k, v, None, scale=scale, mask=mask, block_map=bmap)
    elif kernel == "triton dense mask":
        out = triton_attention(q, k, v, scale=scale, mask=mask)
    elif kernel == "triton causal":
        out = triton_attention(q, k, v, scale=scale, causal=True)
    elif kernel == "triton window":
        out = neighborhood_attention(q, k, v, spec, scale=scale)
    else:
        out = block_sparse_attention(q, k, v, scale=scale, mask=mask)
    ref = _masked_eager(q, k, v, keep, scale)
    spared = torch.nonzero(~keep[:, j]).flatten()  # rows that remove key j: finite in eager
    assert not bool(ref[0, :, spared].isnan().any())
    same_as_eager(out, ref, dtype, f"{kernel}, key {j} = {value}")
