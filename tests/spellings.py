"""A catalogue of softmax-attention spellings, written as people write them in PyTorch.

Each entry is a `Spelling`: a plain torch function or an nn.Module instance (the spelled
code itself lives in ``tests/spelling_fns.py``), the layout its arguments take, the mask
variant a recogniser should report ("dense" or "causal"), and ``make_inputs(shape)`` which
builds real random inputs for one `Shape` and the float64 reference output
(``tests/reference.py``) in the spelling's own output layout.

Rules the catalogue keeps:
- inputs are ``torch.randn`` from a seeded ``torch.Generator`` (never zeros), so a wrong
  kernel cannot pass by accident;
- the expected variant is "causal" only where the causal structure is built inside the
  function (tril / triu / arange / a registered tril buffer / ``is_causal=True``); a mask
  or bias that arrives as a tensor argument counts as "dense";
- spellings whose eager semantics give NaN on a fully-masked row (softmax of all -inf) are
  fed such rows (``empty_rows="nan"``); SDPA on the CPU returns zeros there
  (``empty_rows="zero"``); spellings where a fully-masked row is not meaningful in low
  precision (finite fill values added to scores) never get one (``empty_rows=None``).

``tests/test_spelling_catalogue.py`` checks every entry against the reference without the
rewriter, so the catalogue itself is known to be attention.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from reference import attention_reference
from spelling_fns import (
    DropoutModuleAttention,
    GPT2BufferAttention,
    NanoGPTBufferAttention,
    SoftmaxModuleAttention,
    baddbmm_beta0,
    baddbmm_bias,
    bias_add,
    bmm_flat,
    bmm_reshape_inside,
    causal_arange,
    causal_tril_bool,
    causal_tril_float_eq0,
    causal_triu_additive,
    causal_triu_masked_fill,
    dropout_eval_functional,
    einsum_bhnd,
    einsum_bnhd,
    einsum_bqhd,
    einsum_ellipsis,
    einsum_flat,
    einsum_k_pretransposed,
    explicit_exp_amax,
    explicit_exp_max_values,
    explicit_exp_no_max,
    explicit_normalise_after,
    gqa_grouped_einsum,
    gqa_llama_repeat_kv,
    gqa_repeat_interleave,
    heads_after_sequence,
    hf_bert_minus_10000,
    hf_finfo_min_padding,
    k_pretransposed,
    lengths_padding,
    masked_fill_finfo_min,
    masked_fill_neg_inf,
    matmul_operator,
    mqa_expand,
    mT_functional_softmax,
    no_scale,
    scale_on_q,
    scale_on_q_and_k,
    sdpa_dropout_zero,
    sdpa_enable_gqa,
    sdpa_heads_after_sequence,
    sdpa_is_causal,
    sdpa_mask,
    sdpa_plain,
    sdpa_scale,
    softmax_float_cast,
    softmax_fp32_dtype,
    torch_matmul_divide,
    where_neg_inf,
)

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- plumbing


@dataclass(frozen=True)
class Shape:
    """One draw of sizes. k/v carry Hkv heads; Dv is the value (output) head size."""

    B: int
    H: int
    Hkv: int
    N: int
    M: int
    D: int
    Dv: int
    dtype: torch.dtype
    seed: int


@dataclass
class Case:
    """What one example runs: ``fn(*args)``, expected to equal ``expected`` (float64)."""

    fn: Callable[..., Any]
    args: tuple
    expected: torch.Tensor


@dataclass(frozen=True)
class Spelling:
    name: str
    fn: Callable[..., Any] | None  # None: built per case (needs sizes), see Case.fn
    layout: str
    expected_variant: str  # "dense" | "causal"
    make_inputs: Callable[[Shape], Case]
    kv_heads: str = "same"  # "same" (Hkv == H) | "group" (GQA, Hkv < H divides H) | "one" (MQA)
    square: bool = False  # mask built for N == M only
    same_dv: bool = False  # value head size must equal D
    empty_rows: str | None = None  # None | "nan" | "zero": fully-masked rows fed, and what eager gives
    tags: tuple[str, ...] = field(default=())

    def __repr__(self) -> str:  # short ids in pytest output
        return f"Spelling({self.name})"


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


def _plain(
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


def as_float64(obj: Any) -> Any:
    """Floating tensors to float64, modules deep-copied to float64; the rest unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(torch.float64) if obj.is_floating_point() else obj
    if isinstance(obj, nn.Module):
        return copy.deepcopy(obj).to(torch.float64)
    if isinstance(obj, tuple):
        return tuple(as_float64(o) for o in obj)
    return obj


def case_for(spelling: Spelling, shape: Shape) -> Case:
    """Build a case; the callable is the spelling's fn unless the builder made one."""
    case = spelling.make_inputs(shape)
    if case.fn is None:
        case.fn = spelling.fn
    return case


def run_eager_float64(case: Case) -> torch.Tensor:
    return as_float64(case.fn)(*as_float64(case.args))


def first_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


# -------------------------------------------------------------------- builders: layouts


def _merged_heads_case(s: Shape) -> Case:
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


def _bias_case(bias_shape: Callable[[Shape], tuple[int, ...]]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        bias = _randn(g, *bias_shape(s), dtype=s.dtype)
        return Case(None, (q, k, v, bias), _ref(q, k, v, scale=s.D**-0.5, bias=bias))

    return make


def _baddbmm_bias_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    bias = _randn(g, s.B * s.H, s.N, s.M, dtype=s.dtype)
    ref = _ref(q, k, v, scale=s.D**-0.5, bias=bias.view(s.B, s.H, s.N, s.M))
    return Case(None, (to_flat(q), to_flat(k), to_flat(v), bias), to_flat(ref))


def _neg_inf_additive_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    additive = torch.zeros(s.B, 1, s.N, s.M, dtype=s.dtype).masked_fill(~keep, NEG_INF)
    return Case(None, (q, k, v, additive), _ref(q, k, v, scale=s.D**-0.5, bias=additive))


def _hf_padding_case(fill: Callable[[torch.dtype], float]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        lengths = _lengths(s, g, empty=False)
        am = (torch.arange(s.M)[None, :] < lengths[:, None]).long()
        bias = (1.0 - am[:, None, None, :].double()) * fill(s.dtype)
        return Case(None, (q, k, v, am), _ref(q, k, v, scale=s.D**-0.5, bias=bias))

    return make


def _keep_case(shape: Callable[[Shape], tuple[int, ...]]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        keep = _keep_mask(s, g, shape(s), empty=True)
        return Case(None, (q, k, v, keep), _ref(q, k, v, scale=s.D**-0.5, mask=keep))

    return make


def _finfo_fill_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    # Fully-masked rows: every score equals finfo.min, so softmax is uniform (no NaN).
    ref = _ref(q, k, v, scale=s.D**-0.5, mask=keep, fill=torch.finfo(s.dtype).min)
    return Case(None, (q, k, v, ~keep), ref)


def _lengths_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    lengths = _lengths(s, g, empty=True)
    keep = (torch.arange(s.M)[None, :] < lengths[:, None])[:, None, None, :]
    return Case(None, (q, k, v, lengths), _ref(q, k, v, scale=s.D**-0.5, mask=keep))


# --------------------------------------------------------------------- builders: causal


def _causal_plain(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.D**-0.5, causal=True))


def _gpt2_buffer_case(s: Shape) -> Case:
    # GPT-2 scales by the value head size.
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.Dv**-0.5, causal=True))


# ----------------------------------------------------------------------- builders: SDPA


def _sdpa_bool_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    return Case(None, (q, k, v, keep), _ref(q, k, v, scale=s.D**-0.5, mask=keep, fully_masked="zero"))


def _sdpa_float_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    bias = _randn(g, s.B, s.H, s.N, s.M, dtype=s.dtype)
    return Case(None, (q, k, v, bias), _ref(q, k, v, scale=s.D**-0.5, bias=bias))


def _sdpa_float_neg_inf_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    keep = _keep_mask(s, g, (s.B, 1, s.N, s.M), empty=True)
    additive = torch.zeros(s.B, 1, s.N, s.M, dtype=s.dtype).masked_fill(~keep, NEG_INF)
    return Case(None, (q, k, v, additive), _ref(q, k, v, scale=s.D**-0.5, bias=additive, fully_masked="zero"))


# ------------------------------------------------------ builders: nn.MultiheadAttention


def _mha_case(*, batch_first: bool, need_weights: bool, key_padding: bool, attn_mask: bool):
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


# ---------------------------------------------------------------------------- catalogue


def _S(name, fn, layout, variant, make, **kw) -> Spelling:
    return Spelling(name=name, fn=fn, layout=layout, expected_variant=variant, make_inputs=make, **kw)


BHND = "q [B,H,N,D], k [B,Hkv,M,D], v [B,Hkv,M,Dv] -> [B,H,N,Dv]"
BNHD = "q [B,N,H,D], k [B,M,H,D], v [B,M,H,Dv] -> [B,N,H,Dv]"
FLAT = "q [B*H,N,D], k [B*H,M,D], v [B*H,M,Dv] -> [B*H,N,Dv]"
KT = "q [B,H,N,D], kT [B,H,D,M], v [B,H,M,Dv] -> [B,H,N,Dv]"

SPELLINGS: list[Spelling] = [
    # operators and layouts
    _S("matmul_operator", matmul_operator, BHND, "dense", _plain()),
    _S("torch_matmul_divide", torch_matmul_divide, BHND, "dense", _plain()),
    _S("mT_functional_softmax", mT_functional_softmax, BHND, "dense", _plain()),
    _S("permute_softmax_module", SoftmaxModuleAttention(), BHND, "dense", _plain()),
    _S("k_pretransposed", k_pretransposed, KT, "dense", _plain(k_transposed=True)),
    _S("scale_on_q", scale_on_q, BHND, "dense", _plain()),
    _S("scale_on_q_and_k", scale_on_q_and_k, BHND, "dense", _plain()),
    _S("no_scale", no_scale, BHND, "dense", _plain(q_std=0.125, scale=lambda s: 1.0)),
    _S("bmm_flat", bmm_flat, FLAT, "dense", _plain("flat")),
    _S("bmm_reshape_inside", bmm_reshape_inside, BHND, "dense", _plain()),
    _S("baddbmm_bias", baddbmm_bias, FLAT + " + bias [B*H,N,M]", "dense", _baddbmm_bias_case),
    _S("baddbmm_beta0", baddbmm_beta0, FLAT, "dense", _plain("flat")),
    _S("einsum_bhnd", einsum_bhnd, BHND, "dense", _plain()),
    _S("einsum_bnhd", einsum_bnhd, BNHD, "dense", _plain("bnhd")),
    _S("einsum_bqhd", einsum_bqhd, BNHD, "dense", _plain("bnhd")),
    _S("einsum_flat", einsum_flat, FLAT, "dense", _plain("flat")),
    _S("einsum_ellipsis", einsum_ellipsis, BHND, "dense", _plain()),
    _S("einsum_k_pretransposed", einsum_k_pretransposed, KT, "dense", _plain(k_transposed=True)),
    _S("heads_after_sequence", heads_after_sequence, BNHD, "dense", _plain("bnhd")),
    _S(
        "merged_heads",
        None,
        "q [B,N,H*D], k [B,M,H*D], v [B,M,H*Dv] -> [B,N,H*Dv]",
        "dense",
        _merged_heads_case,
    ),
    # softmax written otherwise
    _S("softmax_fp32_dtype", softmax_fp32_dtype, BHND, "dense", _plain(), tags=("fp32_cast",)),
    _S("softmax_float_cast", softmax_float_cast, BHND, "dense", _plain(), tags=("fp32_cast",)),
    _S("explicit_exp_amax", explicit_exp_amax, BHND, "dense", _plain()),
    _S("explicit_exp_max_values", explicit_exp_max_values, BHND, "dense", _plain()),
    _S("explicit_exp_no_max", explicit_exp_no_max, BHND, "dense", _plain()),
    _S("explicit_normalise_after", explicit_normalise_after, BHND, "dense", _plain()),
    _S("dropout_eval_functional", dropout_eval_functional, BHND, "dense", _plain()),
    _S("dropout_module_eval", DropoutModuleAttention().eval(), BHND, "dense", _plain()),
    # additive biases and masks given as tensors
    _S("bias_bhnm", bias_add, BHND + " + bias [B,H,N,M]", "dense", _bias_case(lambda s: (s.B, s.H, s.N, s.M))),
    _S("bias_b11m", bias_add, BHND + " + bias [B,1,1,M]", "dense", _bias_case(lambda s: (s.B, 1, 1, s.M))),
    _S("bias_nm", bias_add, BHND + " + bias [N,M]", "dense", _bias_case(lambda s: (s.N, s.M))),
    _S(
        "additive_neg_inf_mask",
        bias_add,
        BHND + " + 0/-inf [B,1,N,M]",
        "dense",
        _neg_inf_additive_case,
        empty_rows="nan",
    ),
    _S(
        "hf_finfo_min_padding",
        hf_finfo_min_padding,
        BHND + " + attention_mask [B,M] 1/0",
        "dense",
        _hf_padding_case(lambda dt: torch.finfo(dt).min),
    ),
    _S(
        "hf_bert_minus_10000",
        hf_bert_minus_10000,
        BHND + " + attention_mask [B,M] 1/0",
        "dense",
        _hf_padding_case(lambda dt: -10000.0),
    ),
    _S(
        "masked_fill_neg_inf",
        masked_fill_neg_inf,
        BHND + " + keep [B,1,N,M] bool",
        "dense",
        _keep_case(lambda s: (s.B, 1, s.N, s.M)),
        empty_rows="nan",
    ),
    _S(
        "masked_fill_finfo_min",
        masked_fill_finfo_min,
        BHND + " + masked_out [B,1,N,M] bool",
        "dense",
        _finfo_fill_case,
    ),
    _S(
        "where_neg_inf",
        where_neg_inf,
        BHND + " + keep [B,H,N,M] bool",
        "dense",
        _keep_case(lambda s: (s.B, s.H, s.N, s.M)),
        empty_rows="nan",
    ),
    _S(
        "lengths_padding",
        lengths_padding,
        BHND + " + lengths [B] int64",
        "dense",
        _lengths_case,
        empty_rows="nan",
    ),
    # causal structure built in the graph
    _S("causal_tril_bool", causal_tril_bool, BHND, "causal", _causal_plain, square=True),
    _S("causal_tril_float_eq0", causal_tril_float_eq0, BHND, "causal", _causal_plain, square=True),
    _S("causal_triu_masked_fill", causal_triu_masked_fill, BHND, "causal", _causal_plain, square=True),
    _S("causal_triu_additive", causal_triu_additive, BHND, "causal", _causal_plain, square=True),
    _S("causal_arange", causal_arange, BHND, "causal", _causal_plain),
    _S("causal_gpt2_buffer", GPT2BufferAttention(), BHND, "causal", _gpt2_buffer_case, square=True),
    _S("causal_nanogpt_buffer", NanoGPTBufferAttention(), BHND, "causal", _causal_plain, square=True),
    # GQA / MQA
    _S("gqa_repeat_interleave", gqa_repeat_interleave, BHND, "dense", _plain(), kv_heads="group"),
    _S(
        "gqa_llama_repeat_kv",
        gqa_llama_repeat_kv,
        BHND,
        "dense",
        _plain(),
        kv_heads="group",
        tags=("fp32_cast",),
    ),
    _S("mqa_expand", mqa_expand, BHND, "dense", _plain(), kv_heads="one"),
    _S("gqa_grouped_einsum", gqa_grouped_einsum, BHND, "dense", _plain(), kv_heads="group"),
    # F.scaled_dot_product_attention
    _S("sdpa_plain", sdpa_plain, BHND, "dense", _plain()),
    _S(
        "sdpa_bool_mask",
        sdpa_mask,
        BHND + " + keep [B,1,N,M] bool",
        "dense",
        _sdpa_bool_case,
        empty_rows="zero",
    ),
    _S("sdpa_float_mask", sdpa_mask, BHND + " + bias [B,H,N,M]", "dense", _sdpa_float_case),
    _S(
        "sdpa_float_neg_inf_mask",
        sdpa_mask,
        BHND + " + 0/-inf [B,1,N,M]",
        "dense",
        _sdpa_float_neg_inf_case,
        empty_rows="zero",
    ),
    _S("sdpa_is_causal", sdpa_is_causal, BHND, "causal", _causal_plain),
    _S("sdpa_scale", sdpa_scale, BHND, "dense", _plain(scale=lambda s: 0.3)),
    _S("sdpa_enable_gqa", sdpa_enable_gqa, BHND, "dense", _plain(), kv_heads="group"),
    _S("sdpa_dropout_zero", sdpa_dropout_zero, BHND, "dense", _plain()),
    _S("sdpa_heads_after_sequence", sdpa_heads_after_sequence, BNHD, "dense", _plain("bnhd")),
    # nn.MultiheadAttention (eval); the callable is a module built per case
    _S(
        "mha_batch_first",
        None,
        "x [B,N,E], kv [B,M,E] -> [B,N,E]",
        "dense",
        _mha_case(batch_first=True, need_weights=False, key_padding=False, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_seq_first_need_weights",
        None,
        "x [N,B,E], kv [M,B,E] -> [N,B,E]",
        "dense",
        _mha_case(batch_first=False, need_weights=True, key_padding=False, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_key_padding_mask",
        None,
        "x [B,N,E], kv [B,M,E], key_padding_mask [B,M] -> [B,N,E]",
        "dense",
        _mha_case(batch_first=True, need_weights=False, key_padding=True, attn_mask=False),
        same_dv=True,
    ),
    _S(
        "mha_attn_mask_need_weights",
        None,
        "x [B,N,E], kv [B,M,E], attn_mask [N,M] float -> [B,N,E]",
        "dense",
        _mha_case(batch_first=True, need_weights=True, key_padding=False, attn_mask=True),
        same_dv=True,
    ),
]

BY_NAME: dict[str, Spelling] = {s.name: s for s in SPELLINGS}
assert len(BY_NAME) == len(SPELLINGS), "duplicate spelling names"


# -------------------------------------------------------------------------- shape draws

# Hypothesis's first example is built from each list's first element, and every spelling
# gets it: lead with an ordinary size so that the degenerate ones (1) are drawn, not forced.
HEAD_DIMS = (64, 16, 24, 32, 80, 128)
ODD_SIZES = (17, *(n for n in range(1, 68, 2) if n != 17))


def shape_strategy(spelling: Spelling, dtypes: tuple[torch.dtype, ...]):
    """Hypothesis strategy of `Shape`s a spelling accepts."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        if spelling.kv_heads == "same":
            h = d(st.sampled_from((2, 1, 4)))
            hkv = h
        elif spelling.kv_heads == "one":
            h, hkv = d(st.sampled_from((2, 4))), 1
        else:
            h = d(st.sampled_from((2, 4)))
            hkv = d(st.sampled_from([x for x in (1, 2) if x < h]))
        n = d(st.sampled_from(ODD_SIZES))
        m = n if spelling.square else d(st.sampled_from(ODD_SIZES))
        head = d(st.sampled_from(HEAD_DIMS))
        dv = head if spelling.same_dv else d(st.sampled_from(HEAD_DIMS))
        return Shape(
            B=d(st.sampled_from((1, 2))),
            H=h,
            Hkv=hkv,
            N=n,
            M=m,
            D=head,
            Dv=dv,
            dtype=d(st.sampled_from(dtypes)),
            seed=d(st.integers(0, 2**31 - 1)),
        )

    return draw()


def fixed_shapes(spelling: Spelling, dtype: torch.dtype) -> list[Shape]:
    """A few deterministic shapes (odd, N != M where allowed, GQA where asked) for self-checks."""
    out = []
    for i, (b, n, m, d, dv) in enumerate(
        [(2, 17, 33, 64, 32), (1, 1, 5, 16, 16), (1, 67, 67, 128, 80), (1, 9, 1, 24, 24)]
    ):
        if spelling.square:
            m = n
        if spelling.same_dv:
            dv = d
        h, hkv = {"same": (4, 4), "group": (4, 2), "one": (4, 1)}[spelling.kv_heads]
        if spelling.kv_heads == "same" and i == 1:
            h = hkv = 1
        out.append(Shape(B=b, H=h, Hkv=hkv, N=n, M=m, D=d, Dv=dv, dtype=dtype, seed=1000 + i))
    return out
