"""A catalogue of softmax-attention spellings, written as people write them in PyTorch.

Each entry is a `Spelling`: a plain torch function (or an nn.Module instance), the layout
its arguments take, the mask variant a recogniser should report ("dense" or "causal"), and
``make_inputs(shape)`` which builds real random inputs for one `Shape` and the float64
reference output (``tests/reference.py``) in the spelling's own output layout.

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
import torch.nn.functional as F
from reference import attention_reference

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


# ------------------------------------------------------------------- plain dense spellings


def matmul_operator(q, k, v):
    scale = q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1) @ v


def torch_matmul_divide(q, k, v):
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


def mT_functional_softmax(q, k, v):
    return F.softmax(q @ k.mT * q.shape[-1] ** -0.5, dim=-1) @ v


class SoftmaxModuleAttention(nn.Module):
    """K transposed with permute, softmax as an nn.Softmax submodule."""

    def __init__(self) -> None:
        super().__init__()
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, q, k, v):
        scores = torch.matmul(q, k.permute(0, 1, 3, 2)) * (1.0 / math.sqrt(q.shape[-1]))
        return torch.matmul(self.softmax(scores), v)


def k_pretransposed(q, kT, v):
    """k arrives as [B, H, D, M]."""
    return torch.softmax(q @ kT / q.shape[-1] ** 0.5, dim=-1) @ v


def scale_on_q(q, k, v):
    q = q * q.shape[-1] ** -0.5
    return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def scale_on_q_and_k(q, k, v):
    r = q.shape[-1] ** -0.25
    return torch.softmax((q * r) @ (k * r).transpose(-2, -1), dim=-1) @ v


def no_scale(q, k, v):
    return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v


def bmm_flat(q, k, v):
    """q, k, v are [B*H, N, D]."""
    scores = torch.bmm(q, k.transpose(1, 2)) * q.shape[-1] ** -0.5
    return torch.bmm(scores.softmax(dim=-1), v)


def bmm_reshape_inside(q, k, v):
    b, h, n, d = q.shape
    m, dv = k.shape[2], v.shape[3]
    qf, kf, vf = q.reshape(b * h, n, d), k.reshape(b * h, m, d), v.reshape(b * h, m, dv)
    p = torch.softmax(torch.bmm(qf, kf.transpose(1, 2)) / math.sqrt(d), dim=-1)
    return torch.bmm(p, vf).view(b, h, n, dv)


def baddbmm_bias(q, k, v, bias):
    """[B*H, N, D] inputs; bias [B*H, N, M] is baddbmm's input (beta=1)."""
    scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=q.shape[-1] ** -0.5)
    return torch.bmm(F.softmax(scores, dim=-1), v)


def baddbmm_beta0(q, k, v):
    """The old HF GPT-2 / BLOOM idiom: an uninitialised input ignored through beta=0."""
    bh, n, d = q.shape
    empty = torch.empty(bh, n, k.shape[1], dtype=q.dtype, device=q.device)
    scores = torch.baddbmm(empty, q, k.transpose(1, 2), beta=0.0, alpha=1.0 / math.sqrt(d))
    return torch.bmm(scores.softmax(-1), v)


def einsum_bhnd(q, k, v):
    scores = torch.einsum("bhnd,bhmd->bhnm", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("bhnm,bhmd->bhnd", scores.softmax(-1), v)


def einsum_bnhd(q, k, v):
    """[B, N, H, D] in and out."""
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(q.shape[-1])
    return torch.einsum("bhnm,bmhd->bnhd", torch.softmax(scores, dim=-1), v)


def einsum_bqhd(q, k, v):
    """[B, N, H, D] in and out, other letters, value head size its own letter."""
    attn = torch.einsum("bqhd,bkhd->bhqk", q * q.shape[-1] ** -0.5, k).softmax(dim=-1)
    return torch.einsum("bhqk,bkhv->bqhv", attn, v)


def einsum_flat(q, k, v):
    """[B*H, N, D]."""
    attn = F.softmax(torch.einsum("xid,xjd->xij", q, k) * q.shape[-1] ** -0.5, dim=-1)
    return torch.einsum("xij,xjd->xid", attn, v)


def einsum_ellipsis(q, k, v):
    attn = torch.einsum("...id,...jd->...ij", q, k).mul(q.shape[-1] ** -0.5).softmax(-1)
    return torch.einsum("...ij,...jd->...id", attn, v)


def einsum_k_pretransposed(q, kT, v):
    """k arrives as [B, H, D, M]."""
    attn = torch.einsum("bhqd,bhdk->bhqk", q, kT).div(q.shape[-1] ** 0.5).softmax(-1)
    return torch.einsum("bhqk,bhkd->bhqd", attn, v)


def heads_after_sequence(q, k, v):
    """HF style: [B, N, H, D] in, transpose to heads-first, out back to [B, N, H, Dv]."""
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    attn = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    attn = F.softmax(attn, dim=-1)
    return torch.matmul(attn, v).transpose(1, 2).contiguous()


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


# ----------------------------------------------------------------- softmax written otherwise


def softmax_fp32_dtype(q, k, v):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def softmax_float_cast(q, k, v):
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    return scores.float().softmax(dim=-1).to(v.dtype) @ v


def explicit_exp_amax(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    e = torch.exp(s - s.amax(dim=-1, keepdim=True))
    return (e / e.sum(dim=-1, keepdim=True)) @ v


def explicit_exp_max_values(q, k, v):
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    e = (s - s.max(dim=-1, keepdim=True).values).exp()
    p = e / torch.sum(e, dim=-1, keepdim=True)
    return torch.matmul(p, v)


def explicit_exp_no_max(q, k, v):
    e = torch.exp(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5)
    return e / e.sum(-1, keepdim=True) @ v


def explicit_normalise_after(q, k, v):
    s = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    e = torch.exp(s - s.amax(-1, keepdim=True))
    return (e @ v) / e.sum(-1, keepdim=True)


def dropout_eval_functional(q, k, v):
    p = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1)
    p = F.dropout(p, p=0.1, training=False)
    return p @ v


class DropoutModuleAttention(nn.Module):
    """nn.Dropout submodule; the catalogue instance is in .eval()."""

    def __init__(self, p: float = 0.1) -> None:
        super().__init__()
        self.attn_dropout = nn.Dropout(p)

    def forward(self, q, k, v):
        p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
        return self.attn_dropout(p) @ v


# -------------------------------------------------------------- additive biases and masks


def bias_add(q, k, v, bias):
    return torch.softmax(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias, dim=-1) @ v


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


def hf_finfo_min_padding(q, k, v, attention_mask):
    """attention_mask: [B, M] of 1 (attend) / 0 (pad), as HF tokenizers give it."""
    ext = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * torch.finfo(q.dtype).min
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1]) + ext
    return torch.matmul(F.softmax(scores, dim=-1), v)


def hf_bert_minus_10000(q, k, v, attention_mask):
    """HF BERT (pre-4.x masks): (1.0 - mask) * -10000.0 added to the scores."""
    ext = (1.0 - attention_mask[:, None, None, :].to(q.dtype)) * -10000.0
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores + ext
    return torch.matmul(nn.functional.softmax(scores, dim=-1), v)


def _hf_padding_case(fill: Callable[[torch.dtype], float]) -> Callable[[Shape], Case]:
    def make(s: Shape) -> Case:
        g = _gen(s)
        q, k, v = _qkv(s, g)
        lengths = _lengths(s, g, empty=False)
        am = (torch.arange(s.M)[None, :] < lengths[:, None]).long()
        bias = (1.0 - am[:, None, None, :].double()) * fill(s.dtype)
        return Case(None, (q, k, v, am), _ref(q, k, v, scale=s.D**-0.5, bias=bias))

    return make


def masked_fill_neg_inf(q, k, v, keep):
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def masked_fill_finfo_min(q, k, v, masked_out):
    """masked_out: True where a key must be ignored; filled with the dtype's lowest value."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(masked_out, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v


def where_neg_inf(q, k, v, keep):
    scores = torch.matmul(q, k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    scores = torch.where(keep, scores, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)


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


def lengths_padding(q, k, v, lengths):
    """Padding mask built in the graph from a lengths tensor [B] (int64)."""
    m = k.shape[-2]
    keep = torch.arange(m, device=q.device)[None, :] < lengths[:, None]
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def _lengths_case(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    lengths = _lengths(s, g, empty=True)
    keep = (torch.arange(s.M)[None, :] < lengths[:, None])[:, None, None, :]
    return Case(None, (q, k, v, lengths), _ref(q, k, v, scale=s.D**-0.5, mask=keep))


# ------------------------------------------------------------------------ causal spellings


def causal_tril_bool(q, k, v):
    n = q.shape[-2]
    keep = torch.tril(torch.ones(n, n, dtype=torch.bool, device=q.device))
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(-1) @ v


def causal_tril_float_eq0(q, k, v):
    n = q.size(-2)
    tril = torch.tril(torch.ones(n, n, device=q.device))
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(tril == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def causal_triu_masked_fill(q, k, v):
    n = q.shape[-2]
    future = torch.triu(torch.ones(n, n, dtype=torch.bool, device=q.device), diagonal=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.matmul(torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1), v)


def causal_triu_additive(q, k, v):
    """nn.Transformer.generate_square_subsequent_mask style: -inf above the diagonal, added."""
    n = q.shape[-2]
    additive = torch.triu(torch.full((n, n), float("-inf"), dtype=q.dtype, device=q.device), diagonal=1)
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + additive
    return scores.softmax(-1) @ v


def causal_arange(q, k, v):
    """Top-left aligned, any N and M."""
    n, m = q.shape[-2], k.shape[-2]
    keep = torch.arange(n, device=q.device)[:, None] >= torch.arange(m, device=q.device)[None, :]
    scores = torch.where(keep, q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


class GPT2BufferAttention(nn.Module):
    """Old HF GPT-2: a bool tril buffer sliced to [:, :, :N, :N], torch.where with finfo.min."""

    def __init__(self, max_positions: int = 128) -> None:
        super().__init__()
        self.register_buffer(
            "bias",
            torch.tril(torch.ones((max_positions, max_positions), dtype=torch.bool)).view(
                1, 1, max_positions, max_positions
            ),
            persistent=False,
        )

    def forward(self, q, k, v):
        attn_weights = torch.matmul(q, k.transpose(-1, -2))
        attn_weights = attn_weights / torch.full(
            [], v.size(-1) ** 0.5, dtype=attn_weights.dtype, device=attn_weights.device
        )
        n = q.size(-2)
        causal_mask = self.bias[:, :, :n, :n]
        mask_value = torch.full([], torch.finfo(attn_weights.dtype).min, dtype=attn_weights.dtype)
        attn_weights = torch.where(causal_mask, attn_weights, mask_value)
        attn_weights = nn.functional.softmax(attn_weights, dim=-1).type(v.dtype)
        return torch.matmul(attn_weights, v)


class NanoGPTBufferAttention(nn.Module):
    """nanoGPT: a float tril buffer, masked_fill(bias[:, :, :T, :T] == 0, -inf)."""

    def __init__(self, block_size: int = 128) -> None:
        super().__init__()
        self.register_buffer(
            "bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size)
        )

    def forward(self, q, k, v):
        t = q.size(-2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        return F.softmax(att, dim=-1) @ v


def _causal_plain(s: Shape) -> Case:
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.D**-0.5, causal=True))


def _gpt2_buffer_case(s: Shape) -> Case:
    # GPT-2 scales by the value head size.
    g = _gen(s)
    q, k, v = _qkv(s, g)
    return Case(None, (q, k, v), _ref(q, k, v, scale=s.Dv**-0.5, causal=True))


# -------------------------------------------------------------------------------- GQA / MQA


def gqa_repeat_interleave(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(n_rep, dim=1)
    v = torch.repeat_interleave(v, n_rep, dim=1)
    return (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(-1) @ v


def _repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Llama's repeat_kv, verbatim."""
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def gqa_llama_repeat_kv(q, k, v):
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)
    attn = torch.matmul(q, k.transpose(2, 3)) * q.shape[-1] ** -0.5
    attn = nn.functional.softmax(attn, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(attn, v)


def mqa_expand(q, k, v):
    """One key/value head broadcast to all query heads with expand."""
    h = q.shape[1]
    k, v = k.expand(-1, h, -1, -1), v.expand(-1, h, -1, -1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v


def gqa_grouped_einsum(q, k, v):
    """No repeat at all: query heads grouped as [B, Hkv, R, N, D] against [B, Hkv, M, D]."""
    b, h, n, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, h // hkv, n, d)
    attn = torch.einsum("bgrnd,bgmd->bgrnm", qg, k).mul(d**-0.5).softmax(-1)
    return torch.einsum("bgrnm,bgmf->bgrnf", attn, v).reshape(b, h, n, v.shape[-1])


# ------------------------------------------------------------------------------------ SDPA


def sdpa_plain(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def sdpa_mask(q, k, v, attn_mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


def sdpa_is_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_scale(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, scale=0.3)


def sdpa_enable_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def sdpa_dropout_zero(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0)


def sdpa_heads_after_sequence(q, k, v):
    """[B, N, H, D] in and out, as HF's sdpa_attention_forward."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).contiguous()


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


# ---------------------------------------------------------------------- nn.MultiheadAttention


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


# -------------------------------------------------------------------------------- catalogue


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
    _S(
        "bias_bhnm", bias_add, BHND + " + bias [B,H,N,M]", "dense", _bias_case(lambda s: (s.B, s.H, s.N, s.M))
    ),
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


# ------------------------------------------------------------------------------ shape draws

HEAD_DIMS = (16, 24, 32, 64, 80, 128)
ODD_SIZES = tuple(range(1, 68, 2))


def shape_strategy(spelling: Spelling, dtypes: tuple[torch.dtype, ...]):
    """Hypothesis strategy of `Shape`s a spelling accepts."""
    from hypothesis import strategies as st

    @st.composite
    def draw(d):
        if spelling.kv_heads == "same":
            h = d(st.sampled_from((1, 2, 4)))
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
