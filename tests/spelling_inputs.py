"""Input builders of the spelling catalogue (tests/spellings.py), one family per section.

Each builder is a ``make_inputs(shape) -> Case``: seeded random q / k / v (and masks, biases,
module weights) for one ``Shape``, laid out as the spelling takes them, with the float64
reference output (tests/reference.py) in the spelling's own output layout. Families: plain
inputs in a layout, biases and masks given as tensors, causal, SDPA, nn.MultiheadAttention.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn
from reference import attention_reference
from spelling_cases import Case, Shape

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- seeded inputs


def _gen(s: Shape) -> torch.Generator:
    return torch.Generator().manual_seed(s.seed)


def _randn(g: torch.Generator, *shape: int, dtype: torch.dtype, std: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g, dtype=torch.float32) * std).to(dtype)


def _qkv(s: Shape, g: torch.Generator, q_std: float = 1.0):
    q = _randn(g, s.B, s.H, s.N, s.D, dtype=s.dtype, std=q_std)
    k = _randn(g, s.B, s.Hkv, s.M, s.D, dtype=s.dtype)
    v = _randn(g, s.B, s.Hkv, s.M, s.Dv, dtype=s.dtype)
    return q, k, v


def _keep_mask(s: Shape, g: torch.Generator, shape: tuple[int, ...], empty: bool) -> torch.Tensor:
    """Random boolean keep-mask (True = attend) over [..., N, M].

    empty=True: query row 0 of every leading index is fully masked (when N > 1; with N == 1
    only batch 0 is). empty=False: key 0 is always kept, so no row is empty.
    """
    keep = torch.rand(*shape, generator=g) < 0.7
    if empty:
        if s.N > 1:
            keep[..., 0, :] = False
        else:
            keep[0] = False
    else:
        keep[..., 0] = True
    return keep


def _lengths(s: Shape, g: torch.Generator, empty: bool) -> torch.Tensor:
    lengths = torch.randint(1, s.M + 1, (s.B,), generator=g)
    if empty:
        lengths[0] = 0
    return lengths


def _ref(q, k, v, **kw) -> torch.Tensor:
    return attention_reference(q, k, v, **kw)


# Layout converters: canonical tensors are [B, H, N, D].
def to_bnhd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous()


def to_flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1])


def to_merged(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def to_kT(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(-2, -1).contiguous()


_LAYOUT_IN = {"bhnd": lambda t: t, "bnhd": to_bnhd, "flat": to_flat, "merged": to_merged}


def plain_case(
    fn_layout: str = "bhnd",
    out_layout: str | None = None,
    *,
    k_transposed: bool = False,
    q_std: float = 1.0,
    scale: Callable[[Shape], float] = lambda s: s.D**-0.5,
) -> Callable[[Shape], Case]:
    """Inputs (q, k, v) in a layout, no mask; k optionally pre-transposed [.., D, M]."""
    out_layout = out_layout or fn_layout

    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g, q_std)
        ref = _ref(q, k, v, scale=scale(s))
        conv = _LAYOUT_IN[fn_layout]
        kk = to_kT(k) if k_transposed else conv(k)
        return Case(None, (conv(q), kk, conv(v)), _LAYOUT_IN[out_layout](ref))

    return make


# -------------------------------------------------------------------- builders: layouts


def merged_heads_case(s: Shape) -> Case:
    """[B, N, H*D] in and out; the function splits heads with view + permute."""
    g = _gen(s)
    q, k, v = _qkv(s, g)
    heads = s.H

    def merged_heads(q, k, v):
        b, n, _ = q.shape
        m = k.shape[1]
        qh = q.view(b, n, heads, -1).permute(0, 2, 1, 3)
        kh = k.view(b, m, heads, -1).permute(0, 2, 1, 3)
        vh = v.view(b, m, heads, -1).permute(0, 2, 1, 3)
        p = (qh @ kh.transpose(-2, -1) / math.sqrt(qh.shape[-1])).softmax(-1)
        return (p @ vh).permute(0, 2, 1, 3).reshape(b, n, -1)

    ref = _ref(q, k, v, scale=s.D**-0.5)
    return Case(merged_heads, (to_merged(q), to_merged(k), to_merged(v)), to_merged(ref))


# ----------------------------------------------------------- builders: biases and masks


def bias_case(bias_shape: Callable[[Shape], tuple[int, ...]]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        bias = _randn(g, *bias_shape(s), dtype=s.dtype)
        return Case(None, (q, k, v, bias), _ref(q, k, v, scale=s.D**-0.5, bias=bias))

    return make


def baddbmm_bias_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    bias = _randn(g, s.B * s.H, s.N, s.M, dtype=s.dtype)
    ref = _ref(q, k, v, scale=s.D**-0.5, bias=bias.view(s.B, s.H, s.N, s.M))
    return Case(None, (to_flat(q), to_flat(k), to_flat(v), bias), to_flat(ref))


def neg_inf_additive_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    additive = torch.zeros(s.B, 1, s.N, s.M, dtype=s.dtype).masked_fill(~keep, NEG_INF)
    return Case(None, (q, k, v, additive), _ref(q, k, v, scale=s.D**-0.5, bias=additive))


def hf_padding_case(fill: Callable[[torch.dtype], float]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        lengths = _lengths(s, g, empty=False)
        am = (torch.arange(s.M)[None, :] < lengths[:, None]).long()
        bias = (1.0 - am[:, None, None, :].double()) * fill(s.dtype)
        return Case(None, (q, k, v, am), _ref(q, k, v, scale=s.D**-0.5, bias=bias))

    return make


def keep_case(shape: Callable[[Shape], tuple[int, ...]]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        keep = _keep_mask(s, g, shape(s), empty=True)
        return Case(None, (q, k, v, keep), _ref(q, k, v, scale=s.D**-0.5, mask=keep))

    return make


def finfo_fill_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    # Fully-masked rows: every score equals finfo.min, so softmax is uniform (no NaN).
    ref = _ref(q, k, v, scale=s.D**-0.5, mask=keep, fill=torch.finfo(s.dtype).min)
    return Case(None, (q, k, v, ~keep), ref)


def lengths_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    lengths = _lengths(s, g, empty=True)
    keep = (torch.arange(s.M)[None, :] < lengths[:, None])[:, None, None, :]
    return Case(None, (q, k, v, lengths), _ref(q, k, v, scale=s.D**-0.5, mask=keep))


# --------------------------------------------------------------------- builders: causal


def causal_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.D**-0.5, causal=True))


def gpt2_buffer_case(s: Shape) -> Case:
    # GPT-2 scales by the value head size.
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.Dv**-0.5, causal=True))


# ----------------------------------------------------------------------- builders: SDPA


def sdpa_bool_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    return Case(None, (q, k, v, keep), _ref(q, k, v, scale=s.D**-0.5, mask=keep, fully_masked="zero"))


def sdpa_float_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    bias = _randn(g, s.B, s.H, s.N, s.M, dtype=s.dtype)
    return Case(None, (q, k, v, bias), _ref(q, k, v, scale=s.D**-0.5, bias=bias))


def sdpa_float_neg_inf_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    additive = torch.zeros(s.B, 1, s.N, s.M, dtype=s.dtype).masked_fill(~keep, NEG_INF)
    return Case(None, (q, k, v, additive), _ref(q, k, v, scale=s.D**-0.5, bias=additive, fully_masked="zero"))


# ------------------------------------------------------ builders: nn.MultiheadAttention


def mha_case(*, batch_first: bool, need_weights: bool, key_padding: bool, attn_mask: bool):
    def make(s: Shape) -> Case:
        g = _gen(s)
        e = s.H * s.D
        mha = nn.MultiheadAttention(e, s.H, batch_first=batch_first, dtype=s.dtype).eval()
        with torch.no_grad():
            for p in mha.parameters():
                p.copy_(_randn(g, *p.shape, dtype=s.dtype, std=e**-0.5))
        x = _randn(g, s.B, s.N, e, dtype=s.dtype)
        y = _randn(g, s.B, s.M, e, dtype=s.dtype)
        kpm = None
        keep = None
        bias = None
        if key_padding:
            lengths = _lengths(s, g, empty=False)
            kpm = torch.arange(s.M)[None, :] >= lengths[:, None]  # True = ignore
            keep = ~kpm[:, None, None, :]
        if attn_mask:
            bias = _randn(g, s.N, s.M, dtype=s.dtype)

        w = mha.in_proj_weight.detach().double()
        b = mha.in_proj_bias.detach().double()
        wq, wk, wv = w.chunk(3)
        bq, bk, bv = b.chunk(3)

        def heads(t, n):
            return t.view(s.B, n, s.H, s.D).transpose(1, 2)

        q = heads(x.double() @ wq.T + bq, s.N)
        k = heads(y.double() @ wk.T + bk, s.M)
        v = heads(y.double() @ wv.T + bv, s.M)
        attn = _ref(q, k, v, scale=s.D**-0.5, bias=bias, mask=keep)
        merged = attn.transpose(1, 2).reshape(s.B, s.N, e)
        ref = merged @ mha.out_proj.weight.detach().double().T + mha.out_proj.bias.detach().double()

        if not batch_first:
            x, y, ref = x.transpose(0, 1).contiguous(), y.transpose(0, 1).contiguous(), ref.transpose(0, 1)

        # A module holding the MHA so that rewrite.compile / inspect get an nn.Module.
        wrapper = _MHAWrapper(mha, need_weights)
        args: tuple = (x, y)
        if key_padding or attn_mask:
            args = (x, y, kpm, bias)
        return Case(wrapper, args, ref)

    return make


class _MHAWrapper(nn.Module):
    """Calls nn.MultiheadAttention(query, kv, kv, ...) and returns the attention output only."""

    def __init__(self, mha: nn.MultiheadAttention, need_weights: bool) -> None:
        super().__init__()
        self.mha = mha
        self.need_weights = need_weights

    def forward(self, query, kv, key_padding_mask=None, attn_mask=None):
        out, _ = self.mha(
            query,
            kv,
            kv,
            key_padding_mask=key_padding_mask,
            attn_mask=attn_mask,
            need_weights=self.need_weights,
        )
        return out
